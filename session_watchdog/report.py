"""JSONL logs -> a session summary (text or JSON), a timeline figure (PNG), a one-file HTML report.

``session-watchdog report LOG... [--json] [--out report.html|report.png]`` reads one or more
JSONL files written by :mod:`session_watchdog.log` (rotated siblings and gzip included) in one
pass, keeping a few columns per sample (never the parsed lines), and summarises the session: time
used against the budget, GPU utilisation and memory, GPU-idle time and its cost, RAM, disks,
checkpoints, every decision and action, how the session ended, and an input-bound hint.
``session-watchdog tail LOG [--follow]`` prints one compact line per new sample.

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
  longer than :data:`GAP_FACTOR` intervals (the watchdog was down) count as unknown time.
- Rotated files: a base path ``x.jsonl`` is expanded to the siblings that exist
  (``x.jsonl.3`` .. ``x.jsonl.1``, each possibly ``.gz``, then ``x.jsonl``, oldest first) unless
  ``--no-rotated`` is given; a rotated file named on its own (``x.jsonl.2``) is read on its own.
  Files named explicitly are put in rotation order whatever the order on the command line (a
  shell glob ``x.jsonl*`` lists them newest first). gzip is recognised by its magic bytes.
- Several sessions in one log (a log on Drive outlives its runtime): a ``daemon_started`` whose
  ``session_start`` differs from the current one begins a new session; the report covers the last
  one unless ``--session N`` is given, and says how many there were.

matplotlib is imported only to draw (the optional ``plot`` extra) and only through the Agg canvas.
"""

from __future__ import annotations

import argparse
import base64
import collections
import gzip
import html
import io
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

REPORT_VERSION = 1
EXIT_OK = 0
EXIT_USAGE = 2

GPU_IDLE_PCT = 5.0  # the policy's default gpu_idle_pct: below this every GPU is idle
GAP_FACTOR = 3.0  # an interval longer than this many nominal intervals is a gap (watchdog down)
SESSION_TOLERANCE_S = 60.0  # session starts closer than this are the same session
INPUT_BOUND_PCT = 40.0  # issue 6: training under 40 % mean GPU utilisation ...
INPUT_BOUND_WINDOW_S = 600.0  # ... for 10+ minutes suggests a data-loading bottleneck

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
# run --restarts and snapshots (issue 13): listed with the decisions and actions; the cause of a
# failure or restart is their reason.
SUPERVISE_EVENTS = frozenset({
    "child_failed", "child_hung", "child_restarted", "restart_scheduled", "restarts_given_up",
    "restarts_exhausted", "snapshot_persisted", "trainer_stacks",
})
# Lifecycle events this version knows and does not summarise: not "unknown".
QUIET_EVENTS = frozenset({"signal_received", "state_quarantined"}) | frozenset({
    # notifications and remote commands (issue 15)
    "notify_sent", "notify_failed", "notify_suppressed", "notify_dropped", "notify_unsent",
    "remote_started", "remote_command", "remote_ignored", "remote_replied", "remote_reply_failed",
    "remote_poll_failed", "remote_poll_recovered", "budget_extended"})

_ROTATED = re.compile(r"^(?P<base>.+?)\.(?P<index>\d+)(?:\.gz)?$")
_GZIP_MAGIC = b"\x1f\x8b"


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
    """Per-sample columns, aligned with ``elapsed_s``; None = unknown."""

    elapsed_s: List[float] = field(default_factory=list)
    gpu_names: Dict[int, Optional[str]] = field(default_factory=dict)
    gpu_util: Dict[int, List[Optional[float]]] = field(default_factory=dict)
    gpu_mem: Dict[int, List[Optional[int]]] = field(default_factory=dict)
    gpu_mem_total: Dict[int, Optional[int]] = field(default_factory=dict)
    gpu_max_util: List[Optional[float]] = field(default_factory=list)  # None if any GPU unknown
    gpu_mean_util: List[Optional[float]] = field(default_factory=list)  # over the known GPUs
    ram_used: List[Optional[int]] = field(default_factory=list)
    ram_total: List[Optional[int]] = field(default_factory=list)
    disk_free: Dict[str, List[Optional[int]]] = field(default_factory=dict)
    disk_total: Dict[str, Optional[int]] = field(default_factory=dict)
    training: List[bool] = field(default_factory=list)  # trainer alive and state "running"
    markers: List[Marker] = field(default_factory=list)
    budget_s: Optional[float] = None


class _Session:
    """Accumulates one session from its events, one event at a time."""

    def __init__(self, start: Optional[float]) -> None:
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

    @property
    def empty(self) -> bool:
        return not self.tl.elapsed_s and not self.tl.markers and self.daemon_starts == 0

    def session_start(self) -> Optional[float]:
        return self.start if self.start is not None else self.start_derived

    def _now_s(self, event: Dict[str, Any]) -> Optional[float]:
        if self.tl.elapsed_s:
            return self.tl.elapsed_s[-1]
        start, ts = self.session_start(), _num(event.get("ts"))
        return None if start is None or ts is None else ts - start

    # ---- events -----------------------------------------------------------------------------

    def started(self, event: Dict[str, Any]) -> None:
        self.daemon_starts += 1
        self.last_lifecycle = "daemon_started"
        self.platform = _str(event.get("platform")) or self.platform
        self.interval_s = _num(event.get("interval_s")) or self.interval_s
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
        if name == "decision" and kind == "ack" and mark.action == "stop":
            self.stop_acked = _str(event.get("request_reason")) or mark.reason or "unknown"
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
        n = len(tl.elapsed_s)
        tl.elapsed_s.append(elapsed)
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
                tl.gpu_util[index] = [None] * n
                tl.gpu_mem[index] = [None] * n
                tl.gpu_mem_total[index] = None
                tl.gpu_names[index] = None
            util = _num(gpu.get("util_pct"))
            if len(tl.gpu_util[index]) == n:  # a repeated index counts once
                tl.gpu_util[index].append(util)
                tl.gpu_mem[index].append(_int(gpu.get("mem_used_bytes")))
                utils.append(util)
            total = _int(gpu.get("mem_total_bytes"))
            if total is not None:
                tl.gpu_mem_total[index] = total
            tl.gpu_names[index] = _str(gpu.get("name")) or tl.gpu_names[index]
        for index, column in tl.gpu_util.items():
            if len(column) == n:
                column.append(None)
                tl.gpu_mem[index].append(None)
                utils.append(None)
        known = [u for u in utils if u is not None]
        tl.gpu_max_util.append(max(known) if utils and len(known) == len(utils) else None)
        tl.gpu_mean_util.append(sum(known) / len(known) if known else None)

        ram = _dict(event.get("ram"))
        total, available = _int(ram.get("total_bytes")), _int(ram.get("available_bytes"))
        tl.ram_total.append(total)
        tl.ram_used.append(None if total is None or available is None else max(0, total - available))
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
                tl.disk_free[path] = [None] * n
                tl.disk_total[path] = None
            free_column = tl.disk_free[path]
            if len(free_column) == n:
                free_column.append(_int(disk.get("free_bytes")))
            total_disk = _int(disk.get("total_bytes"))
            if total_disk is not None:
                tl.disk_total[path] = total_disk
        for free_column in tl.disk_free.values():
            if len(free_column) == n:
                free_column.append(None)

        trainer = _dict(event.get("trainer"))
        state = _str(trainer.get("state"))
        tl.training.append(trainer.get("alive") is True and state == "running")
        if state is not None:
            self.trainer_state = state
            self.trainer_step = _int(trainer.get("step"))
            self.trainer_epoch = _int(trainer.get("epoch"))
        ckpt = _dict(trainer.get("checkpoint"))
        if ckpt:
            key = (ckpt.get("path"), ckpt.get("at"))
            if key not in self.checkpoints and (key[0] is not None or key[1] is not None):
                self.checkpoints[key] = {
                    "at": _num(ckpt.get("at")), "step": _int(ckpt.get("step")),
                    "path": _str(ckpt.get("path")), "duration_s": _num(ckpt.get("duration_s")),
                    "bytes": _int(ckpt.get("bytes"))}
        return True


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Report:
    summary: Dict[str, Any]
    timeline: Timeline


def load(paths: Sequence[Path], *, rotated: bool = True, session: int = -1,
         price_per_hour: Optional[float] = None, gpu_idle_pct: float = GPU_IDLE_PCT) -> Report:
    """Read the logs and summarise one session (the last by default; 1-based, negative from the end)."""
    files = expand_paths(paths, rotated)
    stats = InputStats()
    sessions: List[_Session] = [_Session(None)]
    for event in read_events(files, stats):
        name = event.get("event")
        current = sessions[-1]
        if not isinstance(name, str):
            stats.bad_events += 1
        elif name == "sample":
            if not current.sample(event):
                stats.bad_events += 1
        elif name in ("decision", "action"):
            if not current.marker(event, name):
                stats.bad_events += 1
        elif name == "daemon_started":
            start = _num(event.get("session_start"))
            known = current.session_start()
            if start is not None and known is not None and abs(start - known) > SESSION_TOLERANCE_S \
                    and not current.empty:
                current = _Session(start)
                sessions.append(current)
            elif start is not None and current.start is None:
                current.start = start
            current.started(event)
        elif name == "daemon_stopped":
            current.stopped(event)
        elif name in SUPERVISE_EVENTS:
            current.supervised(event, name)
        elif name == "tick_failed":
            current.ticks_failed += 1
        elif name == "tick_missed":
            current.ticks_missed += 1
        elif name not in QUIET_EVENTS:
            stats.unknown_events += 1
            stats.unknown_names[name] = stats.unknown_names.get(name, 0) + 1
    count = len(sessions)
    index = session - 1 if session > 0 else count + session
    if not 0 <= index < count:
        raise ReportError(f"--session {session} is out of range: the log holds {count} "
                          f"session{'s' if count != 1 else ''}")
    chosen = sessions[index]
    torn_end = stats.torn_at_end and index == count - 1  # an earlier session ended otherwise
    summary = _summarize(chosen, stats, index + 1, count, price_per_hour, gpu_idle_pct, torn_end)
    return Report(summary, chosen.tl)


# --------------------------------------------------------------------------------------------
# The summary (pure: columns in, dict out)


def percentile(values: Sequence[float], pct: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default, Excel's PERCENTILE.INC)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100.0
    low = int(math.floor(pos))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _intervals(elapsed: Sequence[float], nominal: Optional[float]) -> List[float]:
    """Seconds each sample stands for: up to the next sample; gaps and the last sample count 0."""
    diffs = [b - a for a, b in zip(elapsed, elapsed[1:])]
    if nominal is None:
        positive = sorted(d for d in diffs if d > 0)
        nominal = positive[len(positive) // 2] if positive else None
    cap = GAP_FACTOR * nominal if nominal else math.inf
    return [d if 0 < d <= cap else 0.0 for d in diffs] + ([0.0] if elapsed else [])


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _summarize(s: _Session, stats: InputStats, ordinal: int, count: int,
               price_flag: Optional[float], gpu_idle_pct: float, torn_end: bool) -> Dict[str, Any]:
    tl = s.tl
    el = tl.elapsed_s
    dt = _intervals(el, s.interval_s)
    start = s.session_start()
    last_s = el[-1] if el else None
    budget = tl.budget_s
    remaining = s.last_remaining
    if remaining is None and budget is not None and last_s is not None:
        remaining = budget - last_s

    gpus = []
    for index in sorted(tl.gpu_util):
        known = [u for u in tl.gpu_util[index] if u is not None]
        mems = [m for m in tl.gpu_mem[index] if m is not None]
        gpus.append({
            "index": index, "name": tl.gpu_names[index], "samples": len(known),
            "unknown_samples": len(el) - len(known),
            "util_mean_pct": _round(sum(known) / len(known)) if known else None,
            "util_p50_pct": _round(percentile(known, 50)),
            "util_p95_pct": _round(percentile(known, 95)),
            "mem_peak_bytes": max(mems) if mems else None,
            "mem_total_bytes": tl.gpu_mem_total[index],
        })

    idle_s = sum(d for d, u in zip(dt, tl.gpu_max_util) if u is not None and u < gpu_idle_pct)
    known_s = sum(d for d, u in zip(dt, tl.gpu_max_util) if u is not None)
    price: Optional[float]
    price_source: Optional[str]
    if price_flag is not None:
        price, price_source = price_flag, "flag"
    elif s.price_per_hour is not None:
        price, price_source = s.price_per_hour, "log"
    else:
        price = PLATFORM_PRICE_PER_HOUR.get(s.platform or "")
        price_source = "platform" if price is not None else None

    used = [u for u in tl.ram_used if u is not None]
    totals = [t for t in tl.ram_total if t is not None]
    peak_used = max(used) if used else None
    limit = max(totals) if totals else None
    peak_at = el[tl.ram_used.index(peak_used)] if peak_used is not None else None

    disks = []
    for path, column in tl.disk_free.items():
        known_free = [f for f in column if f is not None]
        low = min(known_free) if known_free else None
        disks.append({"path": path, "min_free_bytes": low, "total_bytes": tl.disk_total[path],
                      "min_free_at_s": el[column.index(low)] if low is not None else None})

    ckpts = list(s.checkpoints.values())
    durations = [c["duration_s"] for c in ckpts if c["duration_s"] is not None]
    sizes = [c["bytes"] for c in ckpts if c["bytes"] is not None]

    summary: Dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "input": {
            "files": stats.files, "lines": stats.lines, "events": stats.events,
            "samples": len(el), "torn_lines": stats.torn_lines,
            "invalid_lines": stats.invalid_lines, "unknown_events": stats.unknown_events,
            "unknown_event_names": dict(sorted(stats.unknown_names.items())),
            "bad_events": stats.bad_events, "sessions": count, "session": ordinal,
        },
        "session": {
            "platform": s.platform,
            "start": _round(start, 3), "start_utc": _iso(start),
            "end": _round(None if start is None or last_s is None else start + last_s, 3),
            "end_utc": _iso(None if start is None or last_s is None else start + last_s),
            "first_sample_s": _round(el[0], 3) if el else None,
            "elapsed_s": _round(last_s, 3), "budget_s": budget,
            "used_pct": _round(100.0 * last_s / budget) if budget and last_s is not None else None,
            "remaining_s": _round(remaining, 3),
            "daemon_starts": s.daemon_starts, "daemon_stops": s.daemon_stops,
            "ticks_failed": s.ticks_failed, "ticks_missed": s.ticks_missed,
        },
        "gpus": gpus,
        "gpu_idle": {
            "threshold_pct": gpu_idle_pct, "idle_s": _round(idle_s, 3),
            "known_s": _round(known_s, 3), "price_per_hour": price, "price_source": price_source,
            "cost": None if price is None else round(idle_s / 3600.0 * price, 4),
        },
        "ram": {
            "source": s.ram_source, "limit_bytes": limit, "peak_used_bytes": peak_used,
            "peak_used_pct": _round(100.0 * peak_used / limit) if peak_used is not None and limit
            else None,
            "peak_at_s": peak_at,
            "oom_kills": s.oom_increase if s.oom_last is not None else None,
            "oom_kills_counter": s.oom_last,
        },
        "disks": disks,
        "checkpoints": {
            "count": len(ckpts),
            "duration_mean_s": _round(sum(durations) / len(durations), 3) if durations else None,
            "duration_max_s": max(durations) if durations else None,
            "bytes_last": ckpts[-1]["bytes"] if ckpts else None,
            "bytes_max": max(sizes) if sizes else None,
            "list": [{**c, "at_s": _round(c["at"] - start, 3)
                      if c["at"] is not None and start is not None else None} for c in ckpts],
        },
        "trainer": {"state": s.trainer_state, "step": s.trainer_step, "epoch": s.trainer_epoch},
        "input_bound": input_bound(el, dt, tl.training, tl.gpu_mean_util),
        "events": [m.to_json() for m in tl.markers],
        "ended": _ending(s, stats, last_s, remaining, torn_end),
    }
    return summary


def input_bound(elapsed: Sequence[float], dt: Sequence[float], training: Sequence[bool],
                mean_util: Sequence[Optional[float]], threshold_pct: float = INPUT_BOUND_PCT,
                window_s: float = INPUT_BOUND_WINDOW_S) -> Dict[str, Any]:
    """Is training input-bound (issue 6: under 40 % mean GPU utilisation for 10+ minutes)?

    A window is a run of training samples without a gap covering at least ``window_s`` (sample
    *i* covers ``dt[i]``, up to the next sample). It is low when its time-weighted mean GPU
    utilisation, over the samples with a known reading (at least half its time), is under
    ``threshold_pct``. The lowest window is reported, with the hint.
    """
    n = len(elapsed)
    training_s = sum(d for d, t in zip(dt, training) if t)
    weighted = [(u * d, d) for u, d, t in zip(mean_util, dt, training) if t and u is not None]
    known_s = sum(d for _, d in weighted)
    worst: Optional[Tuple[float, float, float]] = None  # (mean, from_s, to_s)
    first_at: Optional[float] = None
    k = 0
    while k < n:
        if not training[k]:
            k += 1
            continue
        a = k  # a segment: consecutive training samples, no gap between them (dt > 0)
        while k + 1 < n and training[k + 1] and dt[k] > 0:
            k += 1
        b = k
        k += 1
        cover, area, known = [0.0], [0.0], [0.0]  # prefix sums over the segment
        for j in range(a, b + 1):
            u = mean_util[j]
            cover.append(cover[-1] + dt[j])
            area.append(area[-1] + (u * dt[j] if u is not None else 0.0))
            known.append(known[-1] + (dt[j] if u is not None else 0.0))
        i = 0  # window [i, j] in segment positions
        for j in range(b - a + 1):
            while i < j and cover[j + 1] - cover[i + 1] >= window_s:
                i += 1
            span = cover[j + 1] - cover[i]
            seen = known[j + 1] - known[i]
            if span < window_s or seen <= 0 or 2 * seen < span:
                continue
            mean = (area[j + 1] - area[i]) / seen
            if mean < threshold_pct:
                if first_at is None:
                    first_at = elapsed[a + i]
                if worst is None or mean < worst[0]:
                    worst = (mean, elapsed[a + i], elapsed[a + i] + span)
    hint = None
    if worst is not None:
        hint = (f"training ran {_clock(worst[2] - worst[1])} at a mean GPU utilization of "
                f"{worst[0]:.0f}% (from {_clock(worst[1], sign=True)}): the GPU waits for data. "
                "Try more DataLoader workers (num_workers), pin_memory=True, "
                "persistent_workers=True, and data on the local disk")
    return {
        "suspected": worst is not None, "threshold_pct": threshold_pct, "window_s": window_s,
        "training_s": _round(training_s, 3),
        "training_util_mean_pct": _round(sum(w for w, _ in weighted) / known_s) if known_s else None,
        "first_at_s": first_at,
        "worst_window_util_pct": _round(worst[0]) if worst else None,
        "worst_window_from_s": worst[1] if worst else None,
        "worst_window_to_s": worst[2] if worst else None,
        "hint": hint,
    }


def _ending(s: _Session, stats: InputStats, last_s: Optional[float],
            remaining: Optional[float], torn_end: bool) -> Dict[str, Any]:
    """How the session ended, from the last events: a code and one sentence."""
    trainer = ""
    if s.trainer_state is not None:
        trainer = f"trainer {s.trainer_state} at step {s.trainer_step}"
        if s.stop_acked:
            trainer += f" after acknowledging a stop request ({s.stop_acked})"
    if s.empty and stats.events == 0:
        code, text = "empty", "the log holds no events"
    elif s.end_action is not None and s.samples_after_end <= 1:
        # The end transaction's last step (end_* actions; one more tick may follow it).
        mark = s.end_action
        code = "end_action"
        text = f"the watchdog's end transaction: {mark.kind} ({mark.reason or 'no reason'})"
    elif torn_end:
        code = "torn"
        text = "the log ends mid-line: the runtime died while the watchdog was writing"
    elif s.last_lifecycle == "daemon_stopped":
        code, text = "daemon_stopped", "the watchdog stopped cleanly"
    else:
        code = "log_stops"
        text = "the log stops without a stop event: the runtime or the watchdog died"
    if code in ("torn", "log_stops") and remaining is not None and s.interval_s is not None \
            and remaining <= 2 * s.interval_s:
        text += " at the session limit"
    if trainer:
        text += f"; {trainer}"
    return {"code": code, "at_s": _round(last_s, 3), "trainer_state": s.trainer_state,
            "trainer_step": s.trainer_step, "stop_acked": s.stop_acked, "text": text}


# --------------------------------------------------------------------------------------------
# Text


def _clock(seconds: Optional[float], sign: bool = False) -> str:
    """``3725`` -> ``1h02m05s``; ``sign`` adds ``+`` (a place on the session clock)."""
    if seconds is None:
        return "-"
    total = int(round(abs(seconds)))
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    text = f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")
    return ("+" if sign and seconds >= 0 else "-" if seconds < 0 else "") + text


def _gib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}%"


Table = Tuple[str, List[str], List[List[str]]]  # (title, headers, rows)


def tables(summary: Dict[str, Any]) -> List[Table]:
    """The summary as titled tables of strings (the text and HTML views share them)."""
    ses, idle, ram, ck, ib, inp = (summary[k] for k in (
        "session", "gpu_idle", "ram", "checkpoints", "input_bound", "input"))
    budget = ses["budget_s"]
    used = _clock(ses["elapsed_s"]) + (
        f" of {_clock(budget)} ({ses['used_pct']:.1f}%), {_clock(ses['remaining_s'])} left"
        if budget else " (no budget)")
    cost = "" if idle["cost"] is None else (
        f"; cost {idle['cost']:.2f} at {idle['price_per_hour']:g}/h")
    out: List[Table] = [
        ("Session", ["", ""], [
            ["platform", str(ses["platform"] or "-")],
            ["start", str(ses["start_utc"] or "-")],
            ["end", str(ses["end_utc"] or "-")],
            ["time used", used],
            ["ended", summary["ended"]["text"]],
            [f"GPU idle (< {idle['threshold_pct']:g}%)",
             f"{_clock(idle['idle_s'])} of {_clock(idle['known_s'])} with known readings{cost}"],
            ["RAM peak", f"{_gib(ram['peak_used_bytes'])} of {_gib(ram['limit_bytes'])} "
             f"({_pct(ram['peak_used_pct'])}, {ram['source'] or '-'}) at "
             f"{_clock(ram['peak_at_s'], sign=True)}; OOM kills: "
             f"{'-' if ram['oom_kills'] is None else ram['oom_kills']}"],
            ["checkpoints", f"{ck['count']}, duration mean {_clock(ck['duration_mean_s'])} "
             f"max {_clock(ck['duration_max_s'])}, last {_gib(ck['bytes_last'])}, "
             f"largest {_gib(ck['bytes_max'])}"],
            ["trainer", f"{summary['trainer']['state'] or '-'} at step "
             f"{summary['trainer']['step'] if summary['trainer']['step'] is not None else '-'}"],
        ]),
        ("GPUs", ["GPU", "name", "util mean", "p50", "p95", "unknown", "mem peak", "mem total"], [
            [str(g["index"]), str(g["name"] or "-"), _pct(g["util_mean_pct"]),
             _pct(g["util_p50_pct"]), _pct(g["util_p95_pct"]), str(g["unknown_samples"]),
             _gib(g["mem_peak_bytes"]), _gib(g["mem_total_bytes"])] for g in summary["gpus"]]),
        ("Disks", ["path", "min free", "total", "at"], [
            [d["path"], _gib(d["min_free_bytes"]), _gib(d["total_bytes"]),
             _clock(d["min_free_at_s"], sign=True)] for d in summary["disks"]]),
        ("Decisions and actions", ["at", "event", "kind", "reason", "action", "seq", "message"], [
            [_clock(e["at_s"], sign=True), e["event"], e["kind"], e["reason"] or "-",
             e["action"] or "-", "-" if e["seq"] is None else str(e["seq"]), e["message"]]
            for e in summary["events"]]),
    ]
    if ib["hint"]:
        out.insert(1, ("Hint: input-bound", [""], [[ib["hint"]]]))
    skipped = [(inp["torn_lines"], "torn lines"), (inp["invalid_lines"], "invalid lines"),
               (inp["unknown_events"], "unknown events"), (inp["bad_events"], "events missing fields")]
    rows = [[str(n), what] for n, what in skipped if n]
    rows += [[str(n), f"  {name}"] for name, n in inp["unknown_event_names"].items()]
    if inp["sessions"] > 1:
        rows.append([str(inp["sessions"]), f"sessions in the log; this is number {inp['session']}"
                                           " (--session N)"])
    if rows:
        out.append(("Skipped input", ["count", "what"], rows))
    return out


def render_text(summary: Dict[str, Any]) -> str:
    """Compact plain-text tables."""
    lines = [f"session-watchdog report: {summary['input']['samples']} samples from "
             f"{len(summary['input']['files'])} file(s)"]
    for title, headers, rows in tables(summary):
        if not rows:
            continue
        lines.append("")
        lines.append(title)
        show_headers = any(headers)
        widths = [max([len(headers[i]) if show_headers else 0] + [len(r[i]) for r in rows])
                  for i in range(len(headers))]
        if show_headers:
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Figure and HTML (matplotlib only here)


class PlotUnavailable(ReportError):
    pass


def _figure_class() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(
            "the timeline needs matplotlib: pip install 'session-watchdog[plot]' "
            "(--json and the text summary work without it)") from None
    return Figure, FigureCanvasAgg


# Markers: dashed lines plus a symbol above the top panel, in colours outside matplotlib's default
# line cycle so that a marker never reads as a GPU's line. (colour, symbol) by kind.
_MARKER_STYLE = {"request": ("crimson", "v"), "resend": ("crimson", "1"),
                 "warn": ("goldenrod", "o"), "ack": ("seagreen", "^"), "action": ("navy", "s"),
                 "end": ("black", "X")}


def render_png(report: Report, dpi: int = 100) -> bytes:
    """The timeline figure as PNG bytes: GPU util and memory per GPU, RAM, disk free, markers."""
    Figure, Canvas = _figure_class()
    tl = report.timeline
    hours = bool(tl.elapsed_s) and max(tl.elapsed_s[-1], tl.budget_s or 0) > 3 * 3600
    scale, unit = (3600.0, "h") if hours else (60.0, "min")
    import numpy as np  # a dependency of matplotlib

    x = np.asarray(tl.elapsed_s, dtype=float) / scale
    # More points than pixels only costs drawing time: above 2 x 1000 samples a series is drawn
    # as its per-bucket min/max envelope (the same picture at this width; a spike stays visible).
    buckets = 1000
    starts = np.linspace(0, len(x), buckets + 1).astype(int)[:-1] if len(x) > 2 * buckets else None
    x_plot = x if starts is None else np.repeat(x[starts], 2)

    def col(values: Iterable[Optional[float]], div: float = 1.0) -> Any:
        y = np.array([math.nan if v is None else v / div for v in values], dtype=float)
        if starts is None:
            return y
        out = np.empty(2 * len(starts))
        with np.errstate(invalid="ignore"):
            out[0::2] = np.fmin.reduceat(y, starts)  # fmin/fmax skip NaN; an all-NaN bucket
            out[1::2] = np.fmax.reduceat(y, starts)  # stays NaN, so long gaps stay gaps
        return out

    fig = Figure(figsize=(12, 10), dpi=dpi)
    # Fixed margins: constrained_layout re-measures every label and costs a second on a 12 h log.
    fig.subplots_adjust(left=0.07, right=0.86, top=0.94, bottom=0.06, hspace=0.12)
    Canvas(fig)
    axes = fig.subplots(4, 1, sharex=True)
    gib = float(2**30)
    for index, util in tl.gpu_util.items():
        axes[0].plot(x_plot, col(util), lw=0.9, label=f"GPU{index}")
        axes[1].plot(x_plot, col(tl.gpu_mem[index], gib), lw=0.9, label=f"GPU{index}")
    axes[0].set_ylabel("GPU util (%)")
    axes[0].set_ylim(-2, 102)
    axes[1].set_ylabel("GPU memory (GiB)")
    axes[2].plot(x_plot, col(tl.ram_used, gib), lw=0.9, color="tab:purple", label="used")
    axes[2].plot(x_plot, col(tl.ram_total, gib), lw=0.9, ls="--", color="gray", label="limit")
    axes[2].set_ylabel("RAM (GiB)")
    for path, free in tl.disk_free.items():
        axes[3].plot(x_plot, col(free, gib), lw=0.9, label=path)
    axes[3].set_ylabel("disk free (GiB)")
    axes[3].set_xlabel(f"session time ({unit})")

    by_key: Dict[str, List[float]] = {}
    for mark in tl.markers:
        if mark.at_s is not None:
            key = "end" if mark.kind.startswith("end_") else (
                "action" if mark.event == "action" else mark.kind)
            by_key.setdefault(key, []).append(mark.at_s / scale)
    for key, xs in by_key.items():  # one collection per kind and axis: thousands stay cheap
        color, symbol = _MARKER_STYLE.get(key, ("dimgray", "."))
        for ax in axes:
            ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), colors=color, lw=0.8,
                      alpha=0.7, linestyles=(0, (4, 3)))
        axes[0].plot(xs, [108] * len(xs), marker=symbol, color=color, ms=6, ls="",
                     clip_on=False, label=key)
    title = "session-watchdog timeline"
    if tl.budget_s:
        last = tl.elapsed_s[-1] if tl.elapsed_s else 0.0
        if tl.budget_s <= 1.25 * max(last, 1.0):
            for ax in axes:
                ax.axvline(tl.budget_s / scale, color="black", lw=1.2, ls="--")
            axes[0].plot([], [], color="black", ls="--", label="deadline")
        else:
            title += f" (deadline at {_clock(tl.budget_s, sign=True)}, off the chart)"
    axes[0].set_title(title, pad=16)
    for ax in axes[1:]:
        ax.set_ylim(bottom=0)  # amounts from zero: a drop from 47 to 6 GiB must look like one
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px;vertical-align:top}
th{background:#f3f3f3}
img{max-width:100%}
.hint{background:#fff7e0;border:1px solid #e8c060;padding:0.6em 1em}
"""


def render_html(summary: Dict[str, Any], png: Optional[bytes]) -> str:
    """One self-contained HTML page: the tables and the figure as a base64 data URI."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<title>session-watchdog report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>session-watchdog report</h1>",
             f"<p>{summary['input']['samples']} samples from "
             f"{esc(', '.join(summary['input']['files']))}</p>"]
    for title, headers, rows in tables(summary):
        parts.append(f"<h2>{esc(title)}</h2>")
        if title.startswith("Hint"):
            parts.append(f"<p class=\"hint\">{esc(rows[0][0])}</p>")
            continue
        if not rows:
            parts.append("<p>none</p>")
            continue
        parts.append("<table>")
        if any(headers):
            parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    if png:
        data = base64.b64encode(png).decode("ascii")
        parts.append("<h2>Timeline</h2>")
        parts.append(f"<img alt=\"session timeline\" src=\"data:image/png;base64,{data}\">")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# tail


def format_sample(event: Dict[str, Any]) -> str:
    """One compact line for a ``sample`` event: elapsed, left, GPU util/mem, RAM, trainer."""
    parts = [_clock(_num(event.get("elapsed_s")), sign=True).rjust(10)]
    remaining = _num(event.get("remaining_s"))
    if remaining is not None:
        parts.append(f"left {_clock(remaining)}" if remaining >= 0 else f"over {_clock(-remaining)}")
    gpus = _list(event.get("gpus"))
    for position, raw in enumerate(gpus):
        gpu = _dict(raw)
        index = _int(gpu.get("index"))
        util = _num(gpu.get("util_pct"))
        used, total = _int(gpu.get("mem_used_bytes")), _int(gpu.get("mem_total_bytes"))
        mem = "?" if used is None else f"{used / 2**30:.1f}"
        if total is not None:
            mem += f"/{total / 2**30:.0f}G"
        parts.append(f"GPU{position if index is None else index} "
                     f"{'?' if util is None else f'{util:.0f}'}% {mem}")
    if not gpus:
        parts.append("GPU -")
    ram = _dict(event.get("ram"))
    available = _int(ram.get("available_bytes"))
    parts.append("RAM " + ("?" if available is None else f"{available / 2**30:.1f}G") + " avail")
    trainer = _dict(event.get("trainer"))
    if trainer.get("alive") is True or trainer.get("state") is not None:
        state = _str(trainer.get("state")) or "alive"
        step = _int(trainer.get("step"))
        parts.append(f"trainer {state}" + ("" if step is None else f" step {step}")
                     + ("" if trainer.get("alive") is not False else " (exited)"))
    else:
        parts.append("no trainer")
    return "  ".join(parts)


def _format_marker(event: Dict[str, Any], at_s: Optional[float]) -> Optional[str]:
    name = event.get("event")
    kind = _str(event.get("kind") if name == "decision" else event.get("step"))
    if kind is None:
        return None
    bits = [_clock(at_s, sign=True).rjust(10), f"{name} {kind}"]
    if _str(event.get("action")):
        bits.append(str(event["action"]))
    if _str(event.get("reason")):
        bits.append(f"({event['reason']})")
    message = _str(event.get("message")) or _str(event.get("error"))
    if message:
        bits.append(message)
    return "  ".join(bits)


class _Follower:
    """Reads complete new lines of a growing file; follows it across rotation (a new inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: Optional[IO[bytes]] = None
        self.inode: Optional[int] = None
        self.partial = b""

    def _open(self) -> bool:
        try:
            self.fh = open(self.path, "rb")
        except FileNotFoundError:
            return False
        self.inode = os.fstat(self.fh.fileno()).st_ino
        self.partial = b""
        return True

    def read(self) -> List[bytes]:
        if self.fh is None and not self._open():
            return []
        assert self.fh is not None
        lines = self._drain()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return lines  # rotated away, the new file not there yet: keep the old one open
        if st.st_ino != self.inode or st.st_size < self.fh.tell():
            self.fh.close()  # the old file was read to its end above
            if self._open():
                lines += self._drain()
        return lines

    def _drain(self) -> List[bytes]:
        assert self.fh is not None
        data = self.fh.read()
        if not data:
            return []
        *complete, self.partial = (self.partial + data).split(b"\n")
        return complete

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def tail(path: Path, *, follow: bool = False, for_s: Optional[float] = None, lines: int = 10,
         out: Optional[IO[str]] = None, err: Optional[IO[str]] = None, poll_s: float = 0.5,
         clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the last ``lines`` samples (and decisions/actions); with ``follow``, every new one.

    ``follow`` stops on Ctrl-C or after ``for_s`` seconds. Bad lines are counted, never raised.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    follower = _Follower(Path(path))
    if not follow and not Path(path).exists():
        raise ReportError(f"no such log file: {path}")
    skipped = {"invalid": 0, "unknown": 0}
    last_elapsed: List[Optional[float]] = [None]

    def render(raw: bytes) -> Optional[str]:
        if not raw.strip(b" \t\r\x00"):
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            skipped["invalid"] += 1
            return None
        name = obj.get("event")
        if name == "sample":
            last_elapsed[0] = _num(obj.get("elapsed_s"))
            return format_sample(obj)
        if name in ("decision", "action"):
            return _format_marker(obj, last_elapsed[0])
        if name not in HANDLED_EVENTS and name not in QUIET_EVENTS:
            skipped["unknown"] += 1
        return None

    deadline = None if for_s is None else clock() + for_s
    try:
        backlog: Deque[str] = collections.deque(maxlen=max(0, lines))
        for raw in follower.read():
            text = render(raw)
            if text is not None:
                backlog.append(text)
        for text in backlog:
            print(text, file=out, flush=True)
        while follow and (deadline is None or clock() < deadline):
            sleep(poll_s)
            for raw in follower.read():
                text = render(raw)
                if text is not None:
                    print(text, file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
    torn = 1 if follower.partial.strip(b" \t\r\x00") else 0
    notes = [f"{n} {what}" for n, what in ((torn, "torn line"),
                                           (skipped["invalid"], "invalid lines"),
                                           (skipped["unknown"], "unknown events")) if n]
    if notes:
        print(f"session-watchdog tail: skipped {', '.join(notes)}", file=err)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# CLI (wired into cli.py as the `report` and `tail` subcommands)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``report LOG... [--json] [--out FILE] [--price-per-hour P] ...``."""
    parser = sub.add_parser(
        "report", help="summarise JSONL logs: tables, JSON, a timeline PNG or an HTML report",
        description="Summarise one session from JSONL logs (rotated and .gz files included).")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="JSONL log file(s)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--out", metavar="FILE",
                        help="also write report.png (timeline) or report.html (tables + timeline)")
    parser.add_argument("--price-per-hour", type=_non_negative, metavar="PRICE",
                        help="runtime price per hour for the cost of GPU-idle time "
                             "(default: from the log, else the platform's where known)")
    parser.add_argument("--gpu-idle-pct", type=_non_negative, default=GPU_IDLE_PCT, metavar="PCT",
                        help=f"every GPU below this is idle (default {GPU_IDLE_PCT:g})")
    parser.add_argument("--session", type=int, default=-1, metavar="N",
                        help="which session of the log to report: 1 = first, -1 = last (default)")
    parser.add_argument("--no-rotated", dest="rotated", action="store_false",
                        help="read only the files named, not their rotated siblings (x.jsonl.1...)")


def run(args: argparse.Namespace) -> int:
    """The ``report`` subcommand: summary on stdout, the figure/HTML to ``--out``; 2 on bad input."""
    try:
        if args.session == 0:
            raise ReportError("--session 0 is invalid: 1 is the first session, -1 the last")
        out_kind = None
        if args.out:
            suffix = Path(args.out).suffix.lower()
            out_kind = {".png": "png", ".html": "html", ".htm": "html"}.get(suffix)
            if out_kind is None:
                raise ReportError(f"--out {args.out!r}: expected a .png or .html file name")
            if not Path(args.out).resolve().parent.is_dir():
                raise ReportError(f"cannot write {args.out}: its directory does not exist")
        report = load([Path(p) for p in args.logs], rotated=args.rotated, session=args.session,
                      price_per_hour=args.price_per_hour, gpu_idle_pct=args.gpu_idle_pct)
        _refuse_no_log(report.summary["input"])
        png = render_png(report) if out_kind is not None else None
        if out_kind is not None:
            assert png is not None
            data = png if out_kind == "png" else render_html(report.summary, png).encode("utf-8")
            try:
                Path(args.out).write_bytes(data)
            except OSError as err:
                raise ReportError(f"cannot write {args.out}: {err.strerror or err}") from None
    except ReportError as err:
        print(f"session-watchdog: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.summary, indent=2))
    else:
        print(render_text(report.summary))
    if args.out:
        print(f"session-watchdog: wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def _refuse_no_log(inp: Dict[str, Any]) -> None:
    """An empty file, or one with no watchdog event in it, is a wrong path, not an empty report
    (issue 11: `report notes.txt` said exit 0 with an empty report)."""
    names = ", ".join(inp["files"]) or "the files given"
    fix = "give the watchdog's JSONL log (`session-watchdog status` prints its path)"
    if inp["lines"] == 0:
        raise ReportError(f"{names}: empty, nothing to report; {fix}")
    if inp["events"] == 0:
        raise ReportError(f"{names}: not a JSONL log ({inp['lines']} lines, none a JSON object); "
                          f"{fix}")
    if inp["unknown_events"] + inp["bad_events"] >= inp["events"]:
        raise ReportError(f"{names}: no session-watchdog event in {inp['events']} JSON lines; {fix}")


def add_tail_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tail LOG [--follow] [--for DURATION] [--lines N]``."""
    parser = sub.add_parser("tail", help="a compact live view of the newest samples of a log",
                            description="One line per sample: elapsed, GPU util/memory, RAM "
                                        "available, trainer step/state; decisions in between.")
    parser.add_argument("log", metavar="LOG", help="the JSONL log file being written")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing appended samples until Ctrl-C")
    parser.add_argument("--for", dest="tail_for", metavar="DURATION",
                        help="with --follow: stop after this long (e.g. 30s, 5m)")
    parser.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                        help="lines of history to print first (default 10)")


def run_tail(args: argparse.Namespace) -> int:
    """The ``tail`` subcommand."""
    from session_watchdog.config import parse_duration

    try:
        for_s = None
        if args.tail_for:
            try:
                for_s = parse_duration(args.tail_for)
            except ValueError as err:
                raise ReportError(f"--for {args.tail_for!r} is invalid: {err}") from None
        return tail(Path(args.log), follow=args.follow, for_s=for_s, lines=args.lines)
    except ReportError as err:
        print(f"session-watchdog: error: {err}", file=sys.stderr)
        return EXIT_USAGE


__all__ = [
    "Report", "ReportError", "Timeline", "load", "expand_paths", "read_events", "percentile",
    "input_bound", "tables", "render_text", "render_png", "render_html", "format_sample", "tail",
    "add_parser", "run", "add_tail_parser", "run_tail",
]
