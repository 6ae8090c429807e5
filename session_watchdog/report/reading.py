"""Reading JSONL logs into one session's figures, streamed: nothing per sample or per line is
kept (issue 17); the statistics are aggregated as the samples go by and the plot columns are
downsampled while reading (:mod:`.aggregate`).

Reading rules (issue 6):

- Bad input never raises: a torn last line (the runtime died mid-write), a line that is not JSON,
  an event type this version does not know (a newer schema), a known event missing the fields it
  needs, an empty file - each is skipped and counted in the summary's ``input`` block.
- Unknown is unknown: a null GPU utilisation is never read as 0 % (STYLE.md #2), so it is left
  out of the statistics and a sample with any unknown GPU is never "idle".
- Times are on the session clock (``elapsed_s`` of the samples, monotonic-based), not on ``ts``
  (wall clock, which jumps; DESIGN.md). A decision or action is placed at the tick that produced
  it: the daemon logs each tick's ``sample`` before the tick's decisions and actions.
- A reading holds until the next one: sample *i* stands for ``[elapsed_i, elapsed_i+1)``. Gaps
  longer than :data:`GAP_FACTOR` intervals (the watchdog was down) count as unknown time; the
  interval is the one logged by the watchdog's start before them (without one in the log, the
  median of the first samples' intervals).
- Rotated files: a base path ``x.jsonl`` is expanded to the siblings that exist
  (``x.jsonl.3`` .. ``x.jsonl.1``, each possibly ``.gz``, then ``x.jsonl``, oldest first) unless
  ``--no-rotated`` is given; a rotated file named on its own (``x.jsonl.2``) is read on its own.
  Files named explicitly are put in rotation order whatever the order on the command line (a
  shell glob ``x.jsonl*`` lists them newest first). gzip is recognised by its magic bytes.
- Several sessions in one log (a log on Drive outlives its runtime): a ``daemon_started`` whose
  ``session_start`` differs from the current one begins a new session; the report covers the last
  one unless ``--session N`` is given, and says how many there were.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from session_watchdog.report.aggregate import GAP_FACTOR as GAP_FACTOR  # re-exported
from session_watchdog.report.aggregate import INPUT_BOUND_PCT as INPUT_BOUND_PCT
from session_watchdog.report.aggregate import INPUT_BOUND_WINDOW_S as INPUT_BOUND_WINDOW_S
from session_watchdog.report.aggregate import (
    Buckets,
    Column,
    Distribution,
    SampleFlow,
)

REPORT_VERSION = 1
EXIT_OK = 0
EXIT_USAGE = 2

GPU_IDLE_PCT = 5.0  # the policy's default gpu_idle_pct: below this every GPU is idle
SESSION_TOLERANCE_S = 60.0  # session starts closer than this are the same session

# Price per GPU-runtime hour by platform, used when --price-per-hour is not given and the log does
# not carry a price. None = unknown: Colab bills compute units at a rate that depends on the GPU
# type and the plan, AutoDL and rented hosts bill per instance type, SLURM per allocation; the
# platform name alone gives no price, so the report shows idle time without a cost.
PLATFORM_PRICE_PER_HOUR: Dict[str, Optional[float]] = {
    "colab": None, "autodl": None, "slurm": None, "generic": None,
}

HANDLED_EVENTS = frozenset({
    "sample", "decision", "action", "daemon_started", "daemon_stopped", "tick_failed",
    "tick_missed",
})
# Events this version writes and does not summarise: not "unknown" (issue 16: the report called
# this version's own config_not_applied an unknown input).
QUIET_EVENTS = frozenset({
    "signal_received", "signal_repeated", "state_quarantined", "state_reset", "state_not_saved",
    "config_not_applied",
    "notebook_hook_failed", "final_reading_failed", "scheduler_log", "session_clock_carried_over",
    "end_rearmed", "sd_notify_unsupported", "sd_notify_failed", "attached", "child_started",
    "child_exited", "child_signalled", "child_killed", "child_interrupted", "child_escalated",
    "preemption_notice", "preemption_cleared", "preemption_unavailable", "preemption_poll_failed",
    "preemption_poller_raised", "preemption_poll_recovered", "attached_exited", "end_probe_failed",
    "idle_end_unavailable", "signal_refused", "signal_failed", "keep_undone", "run_for_elapsed",
    "child_group_ended", "child_stopped", "snapshot_not_recorded",
    # notifications and remote commands (issue 15)
    "notify_sent", "notify_failed", "notify_suppressed", "notify_dropped", "notify_unsent",
    "remote_started", "remote_command", "remote_ignored", "remote_replied", "remote_reply_failed",
    "remote_poll_failed", "remote_poll_recovered", "budget_extended",
    # restarts whose outcome the supervise events below carry (issue 13)
    "restart_cancelled", "restart_failed", "restart_gpu_busy", "snapshot_not_persisted",
    "snapshot_persist_failed", "snapshot_generation_chosen",
})
# run --restarts and snapshots (issue 13): listed with the decisions and actions; the cause of a
# failure or restart is their reason.
SUPERVISE_EVENTS = frozenset({
    "child_failed", "child_hung", "child_restarted", "restart_scheduled", "restarts_given_up",
    "restarts_exhausted", "snapshot_persisted", "trainer_stacks",
})

_ROTATED = re.compile(r"^(?P<base>.+?)\.(?P<index>\d+)(?:\.gz)?$")
_GZIP_MAGIC = b"\x1f\x8b"
NAN = math.nan


class ReportError(Exception):
    """A problem the user can fix (missing file, bad flag value); one line, exit code 2."""


# --------------------------------------------------------------------------------------------
# Small typed readers: a value of the wrong type is unknown (None), never an exception.


def _num(value: Any) -> Optional[float]:
    kind = type(value)  # exact types: bool is an int subclass and is not a number here
    if kind is float:
        return value if math.isfinite(value) else None  # json.loads accepts NaN and Infinity
    if kind is int:
        return float(value)
    return None


def _int(value: Any) -> Optional[int]:
    kind = type(value)
    if kind is int:
        return value  # type: ignore[no-any-return]
    if kind is float:
        return int(value) if math.isfinite(value) else None
    return None


def _str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _dict(value: Any) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> List[Any]:
    return value if isinstance(value, list) else []


def _round(value: Optional[float], digits: int = 2) -> Optional[float]:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------------------------
# Finding and reading the files


def _rotation_key(path: Path) -> Tuple[Path, int]:
    """(base path, rotation index): ``x.jsonl.2.gz`` -> (x.jsonl, 2); ``x.jsonl`` -> (x.jsonl, 0)."""
    name = path.name
    match = _ROTATED.match(name)
    if match:
        return path.with_name(match.group("base")), int(match.group("index"))
    if name.endswith(".gz"):
        return path.with_name(name[:-3]), 0
    return path, 0


def expand_paths(paths: Sequence[Path], rotated: bool = True) -> List[Path]:
    """The log files to read, oldest first (see the module docstring for the rules)."""
    bases: Dict[Path, Dict[int, Path]] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"no such log file: {path}")
        if path.is_dir():
            raise ReportError(f"{path} is a directory; give the JSONL log file(s)")
        base, index = _rotation_key(path)
        bases.setdefault(base, {})[index] = path
        if rotated and index == 0:  # a rotated file named on its own is read on its own
            parent = base.parent if str(base.parent) else Path(".")
            prefix = base.name + "."
            try:
                siblings = list(parent.iterdir())
            except OSError:
                siblings = []
            for sibling in siblings:
                if sibling.name.startswith(prefix) or sibling.name == base.name + ".gz":
                    sib_base, sib_index = _rotation_key(sibling)
                    if sib_base.name == base.name and sibling.is_file():
                        bases[base].setdefault(sib_index, sibling)
            if base.is_file():
                bases[base].setdefault(0, base)
    ordered: List[Path] = []
    for indexed in bases.values():
        # Higher rotation index = older (RotatingJsonl shifts .1 -> .2 -> ...); the base is newest.
        ordered.extend(indexed[i] for i in sorted(indexed, reverse=True))
    return ordered


@dataclass
class InputStats:
    """What was read and what was skipped (never an exception)."""

    files: List[str] = field(default_factory=list)
    lines: int = 0
    events: int = 0
    torn_lines: int = 0  # a partial line at a file's end, or a truncated gzip stream
    invalid_lines: int = 0  # not JSON, or not a JSON object, elsewhere
    unknown_events: int = 0  # an event type this version does not know
    bad_events: int = 0  # a known event without the fields it needs
    unknown_names: Dict[str, int] = field(default_factory=dict)
    torn_at_end: bool = False  # the very last line read was torn: the writer died mid-line


def _open_log(path: Path) -> IO[bytes]:
    with open(path, "rb") as probe:
        head = probe.read(2)
    if head == _GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def read_events(paths: Sequence[Path], stats: InputStats) -> Iterator[Dict[str, Any]]:
    """Every JSON object line of ``paths`` in order; bad lines are counted in ``stats``."""
    for path in paths:
        stats.files.append(str(path))
        try:
            fh = _open_log(path)
        except OSError as err:
            raise ReportError(f"cannot read {path}: {err.strerror or err}") from None
        with fh:
            try:
                for raw in fh:
                    if not raw.strip(b" \t\r\n\x00"):
                        continue
                    stats.lines += 1
                    complete = raw.endswith(b"\n")
                    try:
                        obj = json.loads(raw)
                    except ValueError:  # JSONDecodeError and UnicodeDecodeError
                        obj = None
                    if not isinstance(obj, dict):
                        if complete:
                            stats.invalid_lines += 1
                        else:
                            stats.torn_lines += 1
                            stats.torn_at_end = True
                        continue
                    stats.torn_at_end = False
                    stats.events += 1
                    yield obj
            except (EOFError, OSError, zlib.error):  # a gzip file cut short: its tail is torn
                stats.torn_lines += 1
                stats.torn_at_end = True


# --------------------------------------------------------------------------------------------
# One session's columns


@dataclass
class Marker:
    """A decision or action on the session clock (for the events table and the plot)."""

    at_s: Optional[float]
    event: str  # decision | action
    kind: str  # decision kind (warn, request, ack, resend) or action step
    reason: Optional[str]
    action: Optional[str]
    seq: Optional[int]
    message: str

    def to_json(self) -> Dict[str, Any]:
        return {"at_s": _round(self.at_s, 3), "event": self.event, "kind": self.kind,
                "reason": self.reason, "action": self.action, "seq": self.seq,
                "message": self.message}


@dataclass
class Timeline:
    """One session's plot columns, downsampled while reading (issue 17: memory does not grow with
    the log's length): each :class:`Column` keeps the min and max of buckets of ``buckets.width``
    consecutive samples (1 while the log is short), at ``buckets.x``; NaN = unknown."""

    buckets: Buckets = field(default_factory=Buckets)
    samples: int = 0
    first_s: Optional[float] = None  # elapsed of the first and the last sample
    last_s: Optional[float] = None
    gpu_names: Dict[int, Optional[str]] = field(default_factory=dict)
    gpu_util: Dict[int, Column] = field(default_factory=dict)
    gpu_mem: Dict[int, Column] = field(default_factory=dict)
    gpu_mem_total: Dict[int, Optional[int]] = field(default_factory=dict)
    ram_used: Column = field(default_factory=Column)
    ram_total: Column = field(default_factory=Column)
    disk_free: Dict[str, Column] = field(default_factory=dict)
    disk_total: Dict[str, Optional[int]] = field(default_factory=dict)
    step: Column = field(default_factory=Column)  # the trainer's global step
    step_time_s: Column = field(default_factory=Column)  # its step time
    markers: List[Marker] = field(default_factory=list)
    budget_s: Optional[float] = None
    interval_s: Optional[float] = None  # the nominal tick interval (daemon_started)
    checkpoints: List[Tuple[float, Optional[int]]] = field(default_factory=list)  # (at_s, step)
    gaps: List[Tuple[float, float]] = field(default_factory=list)  # (from_s, to_s): no readings

    def columns(self) -> List[Column]:
        return [self.ram_used, self.ram_total, self.step, self.step_time_s,
                *self.gpu_util.values(), *self.gpu_mem.values(), *self.disk_free.values()]

    def new_column(self) -> Column:
        """A column that starts late (a GPU or disk first seen now): unknown before."""
        return Column(len(self.buckets.x), self.buckets.open)


@dataclass
class GpuStats:
    """One GPU's statistics over a session, streamed (its samples are not kept)."""

    known: int = 0  # samples with a utilisation reading
    util_sum: float = 0.0
    util: Distribution = field(default_factory=Distribution)
    mem_peak: Optional[int] = None


class _Session:
    """Accumulates one session from its events, one event at a time."""

    def __init__(self, start: Optional[float], gpu_idle_pct: float = GPU_IDLE_PCT) -> None:
        self.start = start
        self.start_derived: Optional[float] = None  # ts - elapsed of the first sample
        self.platform: Optional[str] = None
        self.interval_s: Optional[float] = None
        self.price_per_hour: Optional[float] = None
        self.tl = Timeline()
        self.last_remaining: Optional[float] = None
        self.last_ts: Optional[float] = None
        self.trainer_state: Optional[str] = None
        self.trainer_step: Optional[int] = None
        self.trainer_epoch: Optional[int] = None
        self.ram_source: Optional[str] = None
        self.oom_first: Optional[int] = None
        self.oom_last: Optional[int] = None
        self.oom_increase = 0
        self.checkpoints: Dict[Tuple[Any, Any], Dict[str, Any]] = {}
        self.daemon_starts = 0
        self.daemon_stops = 0
        self.ticks_failed = 0
        self.ticks_missed = 0
        self.last_lifecycle: Optional[str] = None  # daemon_started | daemon_stopped
        self.stop_acked: Optional[str] = None  # the reason of the last acknowledged stop request
        self.end_action: Optional[Marker] = None  # the last end_* action step (a later issue)
        self.samples_after_end = 0
        self.first_step: Optional[int] = None  # the first step reported (a resumed run's start)
        self.completed_at_s: Optional[float] = None  # first sample with the trainer completed
        self.released_at_s: Optional[float] = None  # the end action ran (runtime released)
        self.acked_reasons: Dict[str, int] = {}  # acknowledged requests by the request's reason
        # Streamed statistics (issue 17: nothing per sample is kept beyond the plot's buckets).
        self.flow = SampleFlow(gpu_idle_pct)
        self.gpus: Dict[int, GpuStats] = {}
        self.ram_peak: Optional[Tuple[float, float]] = None  # (used bytes, at_s), the first max
        self.ram_limit: Optional[float] = None
        self.disk_low: Dict[str, Tuple[float, float]] = {}  # path -> (free bytes, at_s), first min

    @property
    def empty(self) -> bool:
        return not self.tl.samples and not self.tl.markers and self.daemon_starts == 0

    def session_start(self) -> Optional[float]:
        return self.start if self.start is not None else self.start_derived

    def _now_s(self, event: Dict[str, Any]) -> Optional[float]:
        if self.tl.last_s is not None:
            return self.tl.last_s
        start, ts = self.session_start(), _num(event.get("ts"))
        return None if start is None or ts is None else ts - start

    # ---- events -----------------------------------------------------------------------------

    def started(self, event: Dict[str, Any]) -> None:
        self.daemon_starts += 1
        self.last_lifecycle = "daemon_started"
        self.platform = _str(event.get("platform")) or self.platform
        interval = _num(event.get("interval_s"))
        if interval:
            self.interval_s = interval
            self.flow.set_interval(interval)
        self.tl.budget_s = _num(event.get("budget_s")) or self.tl.budget_s
        # Forward-compatible: a later schema may log the configured price with the start.
        self.price_per_hour = _num(event.get("price_per_hour")) or self.price_per_hour

    def stopped(self, event: Dict[str, Any]) -> None:
        self.daemon_stops += 1
        self.last_lifecycle = "daemon_stopped"

    def supervised(self, event: Dict[str, Any], name: str) -> None:
        """A restart, its cause and the step it resumed from; a persisted snapshot; stacks."""
        step = _int(event.get("resume_from_step"))
        if step is None:
            step = _int(event.get("step"))
        message = _str(event.get("message")) or ""
        if step is not None and name in ("child_restarted", "snapshot_persisted"):
            message = f"{message} [step {step}]"
        self.tl.markers.append(Marker(self._now_s(event), "supervise", name,
                                      _str(event.get("cause")) or _str(event.get("reason")), None,
                                      _int(event.get("restart")), message))

    def marker(self, event: Dict[str, Any], name: str) -> bool:
        if name == "decision":
            kind = _str(event.get("kind"))
        else:
            kind = _str(event.get("step"))
        if kind is None:
            return False
        message = _str(event.get("message")) or _str(event.get("error")) or ""
        mark = Marker(self._now_s(event), name, kind, _str(event.get("reason")),
                      _str(event.get("action")), _int(event.get("seq")), message)
        self.tl.markers.append(mark)
        if name == "decision" and kind == "ack":
            why = _str(event.get("request_reason")) or mark.reason or "unknown"
            self.acked_reasons[why] = self.acked_reasons.get(why, 0) + 1
            if mark.action == "stop":
                self.stop_acked = why
        if name == "action" and kind == "end_action" and self.released_at_s is None:
            self.released_at_s = mark.at_s
        if name == "action" and kind.startswith("end_"):
            self.end_action = mark
            self.samples_after_end = 0
        return True

    def sample(self, event: Dict[str, Any]) -> bool:
        tl = self.tl
        elapsed = _num(event.get("elapsed_s"))
        ts = _num(event.get("ts"))
        if elapsed is None:
            start = self.session_start()
            if start is None or ts is None:
                return False
            elapsed = ts - start
        if ts is not None:
            self.last_ts = ts
            if self.start_derived is None:
                self.start_derived = ts - elapsed
        self.samples_after_end += 1
        n = tl.buckets.open  # values already in each column's open bucket
        tl.budget_s = _num(event.get("budget_s")) or tl.budget_s
        self.last_remaining = _num(event.get("remaining_s"))
        if self.last_lifecycle == "daemon_stopped":
            self.last_lifecycle = "daemon_started"  # samples again: the stop was not the end

        # GPUs: a reading missing from this sample is unknown for this sample.
        utils: List[Optional[float]] = []
        for position, raw in enumerate(_list(event.get("gpus"))):
            if not isinstance(raw, dict):
                utils.append(None)  # not a reading at all: this sample has an unknown GPU
                continue
            gpu = raw
            index = _int(gpu.get("index"))
            index = position if index is None else index
            if index not in tl.gpu_util:
                tl.gpu_util[index] = tl.new_column()
                tl.gpu_mem[index] = tl.new_column()
                tl.gpu_mem_total[index] = None
                tl.gpu_names[index] = None
                self.gpus[index] = GpuStats()
            util = _num(gpu.get("util_pct"))
            if len(tl.gpu_util[index].raw) == n:  # a repeated index counts once
                mem = _int(gpu.get("mem_used_bytes"))
                tl.gpu_util[index].raw.append(NAN if util is None else util)
                tl.gpu_mem[index].raw.append(NAN if mem is None else float(mem))
                utils.append(util)
                stats = self.gpus[index]
                if util is not None:
                    stats.known += 1
                    stats.util_sum += util
                    stats.util.add(util)
                if mem is not None and (stats.mem_peak is None or mem > stats.mem_peak):
                    stats.mem_peak = mem
            total = _int(gpu.get("mem_total_bytes"))
            if total is not None:
                tl.gpu_mem_total[index] = total
            tl.gpu_names[index] = _str(gpu.get("name")) or tl.gpu_names[index]
        for index, column in tl.gpu_util.items():
            if len(column.raw) == n:
                column.raw.append(NAN)
                tl.gpu_mem[index].raw.append(NAN)
                utils.append(None)
        known = [u for u in utils if u is not None]

        ram = _dict(event.get("ram"))
        total, available = _int(ram.get("total_bytes")), _int(ram.get("available_bytes"))
        tl.ram_total.raw.append(NAN if total is None else float(total))
        if total is not None and (self.ram_limit is None or total > self.ram_limit):
            self.ram_limit = float(total)
        if total is None or available is None:
            tl.ram_used.raw.append(NAN)
        else:
            used = float(max(0, total - available))
            tl.ram_used.raw.append(used)
            if self.ram_peak is None or used > self.ram_peak[0]:
                self.ram_peak = (used, elapsed)
        self.ram_source = _str(ram.get("source")) or self.ram_source
        oom = _int(ram.get("oom_kills"))
        if oom is not None:
            if self.oom_first is None:
                self.oom_first = oom
            if self.oom_last is not None:
                # A counter that goes down was reset (a new cgroup): count the new one from 0.
                self.oom_increase += oom - self.oom_last if oom >= self.oom_last else oom
            self.oom_last = oom

        for raw in _list(event.get("disks")):
            disk = _dict(raw)
            path = _str(disk.get("path"))
            if path is None:
                continue
            if path not in tl.disk_free:
                tl.disk_free[path] = tl.new_column()
                tl.disk_total[path] = None
            free_column = tl.disk_free[path].raw
            if len(free_column) == n:
                free = _int(disk.get("free_bytes"))
                free_column.append(NAN if free is None else float(free))
                low = self.disk_low.get(path)
                if free is not None and (low is None or free < low[0]):
                    self.disk_low[path] = (float(free), elapsed)
            total_disk = _int(disk.get("total_bytes"))
            if total_disk is not None:
                tl.disk_total[path] = total_disk
        for disk_column in tl.disk_free.values():
            if len(disk_column.raw) == n:
                disk_column.raw.append(NAN)

        trainer = _dict(event.get("trainer"))
        state = _str(trainer.get("state"))
        training = trainer.get("alive") is True and state == "running"
        step = _int(trainer.get("step")) if state is not None else None
        tl.step.raw.append(NAN if step is None else float(step))
        step_time = _num(trainer.get("step_time_s")) if state is not None else None
        tl.step_time_s.raw.append(NAN if step_time is None else step_time)
        if state is not None:
            self.trainer_state = state
            self.trainer_step = step
            self.trainer_epoch = _int(trainer.get("epoch"))
            if self.first_step is None and step is not None:
                self.first_step = step
            if state == "completed" and self.completed_at_s is None:
                self.completed_at_s = elapsed
            elif state != "completed":
                self.completed_at_s = None

        self.flow.add(elapsed,
                      max(known) if utils and len(known) == len(utils) else NAN,  # NaN: one unknown
                      sum(known) / len(known) if known else NAN,  # the known GPUs' mean
                      training)
        tl.samples += 1
        if tl.first_s is None:
            tl.first_s = elapsed
        tl.last_s = elapsed
        if tl.buckets.sampled(elapsed):
            tl.buckets.close(tl.columns())
        ckpt = _dict(trainer.get("checkpoint"))
        if ckpt:
            key = (ckpt.get("path"), ckpt.get("at"))
            if key not in self.checkpoints and (key[0] is not None or key[1] is not None):
                self.checkpoints[key] = {
                    "at": _num(ckpt.get("at")), "step": _int(ckpt.get("step")),
                    "path": _str(ckpt.get("path")), "duration_s": _num(ckpt.get("duration_s")),
                    "bytes": _int(ckpt.get("bytes"))}
        return True

    def finish(self) -> None:
        """The session's events are all read: account the last samples, close the last bucket."""
        self.flow.finish()
        self.tl.buckets.close(self.tl.columns())
        self.tl.gaps = self.flow.gaps


