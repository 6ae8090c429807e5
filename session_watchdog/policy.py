"""The only place that decides: ``decide(config, state, sample) -> (state, decisions)``.

PURE: no clock, no file, no process, no GPU. ``now`` and the session clock come in the sample;
everything remembered between ticks is in the frozen ``PolicyState`` (saved by the daemon, so a
restart does not re-issue acknowledged requests). Every rule is a table test with literal numbers.

Lead time (DESIGN.md): ``lead = margin + save_factor x checkpoint duration + step time``, with
measured figures from the trainer's status when there are some, configured defaults otherwise.
A ``checkpoint`` request goes out at ``deadline - lead``; the final ``stop`` request at
``deadline - stop_lead`` with ``stop_lead = stop_margin + checkpoint duration + step time``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from session_watchdog.channel import MAX_INT, MirrorStatus, TrainerStatus
from session_watchdog.config import Config, format_duration

if TYPE_CHECKING:  # the probes (psutil, thread pools) at run time only: `status` reads
    from session_watchdog.probes import Sample  # PolicyState without them (start-up, issue 17)

# Reason codes (also used by the log and the report).
SESSION_LIMIT = "session_limit"
IDLE_RECLAIM = "idle_reclaim"
RAM_PRESSURE = "ram_pressure"
DISK_LOW = "disk_low"
PERIODIC = "periodic"
GPU_IDLE = "gpu_idle"
TRAINER_STALLED = "trainer_stalled"
TRAINER_HUNG = "trainer_hung"
REQUEST_ACKED = "request_acked"
RESEND = "resend"
TRAINER_FINISHED = "trainer_finished"
PREEMPTION = "preemption"
TRAINING_COMPLETE = "training_complete"
TRAINING_FAILED = "training_failed"
TRAINING_STOPPED = "training_stopped"
IDLE_END = "idle_end"
NO_TRAINER = "no_trainer"

# A watched command gets this long to build its Session before we say that none did: torch's
# import alone takes 10-80 s on a busy 2-core runtime (issue 11).
NO_TRAINER_AFTER_S = 120.0

MIRROR_FAILING = "mirror_failing"

ACTIVE_STATES = ("starting", "running", "saving", "stopping")
MAX_RESENDS = 5
# In ``done`` beside "end": the user kept the runtime when that end came (daemon.py), so a
# restarted daemon does not try it again.
END_KEPT = "end_kept"
# In ``done`` instead of "end": the user cancelled the end that this run's outcome brought (a
# remote `cancel`), not the runtime's: only the idle end (a forgotten runtime) is left.
END_CANCELLED = "end_cancelled"
TRAINER_SCOPED = frozenset({"session_checkpoint", "session_stop", "end", "preemption_stop",
                            "trainer_connected", "no_trainer", END_KEPT, END_CANCELLED})
# The trainer's "stopped after a durable checkpoint, run again to resume" exit status: the same
# value as session_watchdog.trainer.session.EXIT_STOPPED (that module imports torch).
EXIT_STOPPED = 75


@dataclass(frozen=True)
class Decision:
    """What the policy wants done. ``kind``: warn | info | request | resend | ack | end."""

    kind: str
    reason: str
    message: str = ""
    action: Optional[str] = None  # requests: checkpoint | stop
    seq: Optional[int] = None
    deadline: Optional[float] = None  # wall-clock epoch seconds
    data: Mapping[str, Any] = field(default_factory=dict)
    rid: Optional[str] = None  # requests: the id the trainer echoes (None: by seq only)


@dataclass(frozen=True)
class Outstanding:
    """The request in ``request.json`` that the trainer has not acknowledged yet."""

    seq: int
    action: str
    reason: str
    sent_elapsed: float
    deadline: Optional[float] = None
    resends: int = 0
    rid: str = ""  # "" when the state had no rid_prefix (acknowledged by seq)


@dataclass(frozen=True)
class PolicyState:
    seq: int = 0
    outstanding: Optional[Outstanding] = None
    done: FrozenSet[str] = frozenset()  # one-shot rules already carried out (per trainer)
    episodes: FrozenSet[str] = frozenset()  # conditions active now (warn once per episode)
    trainer_pid: Optional[int] = None
    # With trainer_pid, which trainer that is (trainer_identity): every Session in one notebook
    # kernel reports the kernel's pid. None: not known yet (or a state saved before it was kept).
    trainer_started: Optional[float] = None
    last_checkpoint_elapsed: Optional[float] = None
    periodic_base_elapsed: Optional[float] = None
    gpu_idle_since: Optional[float] = None
    failed: bool = False  # a training run failed in this session: no end action unless asked
    child_since: Optional[float] = None  # elapsed when the watched command was first seen running
    # Request ids are f"{rid_prefix}.{seq}": a random prefix per daemon state, so a request of
    # this session never matches an acknowledgement left by another one (#18). The daemon sets
    # it (the policy draws no random numbers); "" means acknowledgements go by seq.
    rid_prefix: str = ""
    # Hang detection (issue 13): the trainer's step as last seen, since when (elapsed), whether
    # the running interval must not be learned from (it spans a save or a start), and the
    # learned intervals between observed step advances (newest last; kept across trainers).
    progress_step: Optional[int] = None
    progress_since: Optional[float] = None
    progress_skip: bool = True
    step_intervals: Tuple[float, ...] = ()
    idle_requested_elapsed: Optional[float] = None  # elapsed of the last idle-reclaim request
    # Elapsed when the runtime was last seen fall out of use (no live trainer, no save, no
    # running_work: a watched command or a notebook cell); None while in use. The idle end
    # counts from the later of this and gpu_idle_since: a CPU-only stage is not forgotten.
    unused_since: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        obj = dataclasses.asdict(self)
        obj["done"] = sorted(self.done)
        obj["episodes"] = sorted(self.episodes)
        obj["step_intervals"] = list(self.step_intervals)
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PolicyState:
        """Rebuild a saved state; raises ValueError/TypeError/KeyError when it is malformed."""
        out = obj.get("outstanding")
        for seq in (obj.get("seq"), (out or {}).get("seq")):
            if isinstance(seq, int) and not 0 <= seq <= MAX_INT:
                raise ValueError(f"seq {str(seq)[:20]} is out of range")  # every rid must parse
        return cls(
            seq=int(obj["seq"]),
            outstanding=None if out is None else Outstanding(
                seq=int(out["seq"]), action=str(out["action"]), reason=str(out["reason"]),
                sent_elapsed=float(out["sent_elapsed"]),
                deadline=None if out.get("deadline") is None else float(out["deadline"]),
                resends=int(out.get("resends", 0)),
                rid=str(out.get("rid") or ""),
            ),
            done=frozenset(str(x) for x in obj.get("done", [])),
            episodes=frozenset(str(x) for x in obj.get("episodes", [])),
            trainer_pid=None if obj.get("trainer_pid") is None else int(obj["trainer_pid"]),
            trainer_started=_opt_float(obj.get("trainer_started")),
            last_checkpoint_elapsed=_opt_float(obj.get("last_checkpoint_elapsed")),
            periodic_base_elapsed=_opt_float(obj.get("periodic_base_elapsed")),
            gpu_idle_since=_opt_float(obj.get("gpu_idle_since")),
            failed=bool(obj.get("failed", False)),
            child_since=_opt_float(obj.get("child_since")),
            rid_prefix=_rid_prefix(obj.get("rid_prefix")),
            progress_step=None if obj.get("progress_step") is None else int(obj["progress_step"]),
            progress_since=_opt_float(obj.get("progress_since")),
            progress_skip=bool(obj.get("progress_skip", True)),
            step_intervals=tuple(float(x) for x in obj.get("step_intervals", ())),
            idle_requested_elapsed=_opt_float(obj.get("idle_requested_elapsed")),
            unused_since=_opt_float(obj.get("unused_since")),
        )


def _rid_prefix(value: Any) -> str:
    """A saved rid prefix, checked: a request id built from it must be one the trainer accepts."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > 32 or not value.isalnum() or not value.isascii():
        raise ValueError("rid_prefix is not 1-32 ASCII letters and digits")
    return value


def trainer_identity(status: TrainerStatus) -> float:
    """When the trainer's Session started: with its pid, which trainer this is.

    The Session's own start (``extra["session_started"]``), not the process's: a notebook
    kernel runs one Session after another in the same process. A trainer that does not report
    it is known by its process's create time.
    """
    return _positive(status.extra.get("session_started")) or status.start_time


def trainer_change(state: PolicyState, sample: Sample) -> Optional[str]:
    """Whether the sample's live trainer is another than the state's: ``"new"`` (a new run:
    :func:`decide` judges it afresh), ``"known"`` (the first trainer the state learns, or one it
    knew by pid only), or None (the same trainer, or none alive)."""
    status = sample.trainer.status
    if status is None or not sample.trainer.alive:
        return None
    started = trainer_identity(status)
    if status.pid == state.trainer_pid and started == state.trainer_started:
        return None
    if state.trainer_pid is None or (status.pid == state.trainer_pid
                                     and state.trainer_started is None):
        return "known"
    return "new"


def acknowledges(status: TrainerStatus, out: Outstanding) -> bool:
    """Whether the trainer's status acknowledges the outstanding request.

    By request id when both sides have one: a stale ``acked_seq`` of a previous session (a run
    dir kept across a reboot) must not count for this session's seq 1 (#18). An older trainer
    (no ``acked_rid``) or a request without an id falls back to the seq.
    """
    if out.rid and status.acked_rid is not None:
        return status.acked_rid == out.rid
    return status.acked_seq >= out.seq


def _opt_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Lead:
    checkpoint_s: float  # measured or assumed checkpoint duration
    step_s: float  # measured or assumed step time
    lead_s: float  # checkpoint request this long before the deadline
    stop_lead_s: float  # stop request this long before the deadline
    agree_s: float = 0.0  # distributed ranks act at their next agreement (trainer's report)
    mirror_s: float = 0.0  # a checkpoint's local commit -> verified on the trainer's mirror


def _positive(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def lead_time(config: Config, sample: Sample) -> Lead:
    """margin + k x checkpoint + step (+ the ranks' agreement delay under torch.distributed)."""
    status = sample.trainer.status
    ckpt = config.default_checkpoint_time
    step = config.default_step_time
    agree = 0.0
    if status is not None:
        if status.last_checkpoint is not None and status.last_checkpoint.duration_s > 0:
            ckpt = status.last_checkpoint.duration_s
        if status.step_time_s is not None and status.step_time_s > 0:
            step = status.step_time_s
        # ranks check for requests every few steps (one all-reduce): a request waits that long
        agree = _positive(status.extra.get("agree_delay_s")) or 0.0
    # A mirrored checkpoint is safe once it verified on the mirror (issue 14): the measured
    # commit -> verified time; before the first one, assume a copy takes as long as a save.
    mirror = MirrorStatus.from_status(status)
    mirror_s = 0.0
    if mirror is not None and mirror.state != "refused":
        mirror_s = _positive(mirror.last_duration_s) or ckpt
    return Lead(ckpt, step, config.margin + config.save_factor * ckpt + step + agree + mirror_s,
                config.stop_margin + ckpt + step + agree + mirror_s, agree, mirror_s)


SLURM_LIMIT = "slurm"  # the notice source for a SLURM job's time limit (a deadline, not a preemption)


def remaining_s(config: Config, sample: Sample) -> Optional[float]:
    """Seconds left in the session budget (or to a SLURM time limit), None when neither is set."""
    left = config.max_session - sample.elapsed_s if config.max_session else None
    if sample.notice_source == SLURM_LIMIT and sample.notice_deadline is not None:
        limit_left = sample.notice_deadline - sample.now
        left = limit_left if left is None else min(left, limit_left)
    return left




class _Tick:
    """Collects the decisions of one tick while the state is rebuilt (a local helper)."""

    def __init__(self, state: PolicyState) -> None:
        self.state = state
        self.decisions: List[Decision] = []
        self.episodes = set()  # type: set[str]

    def update(self, **changes: Any) -> None:
        state = self.state
        if any(getattr(state, name) != value for name, value in changes.items()):
            self.state = dataclasses.replace(state, **changes)

    def warn_once(self, key: str, reason: str, message: str, **data: Any) -> None:
        """Warn when the condition ``key`` starts; stay quiet while it lasts."""
        self.say_once("warn", key, reason, message, **data)

    def say_once(self, kind: str, key: str, reason: str, message: str, **data: Any) -> None:
        """A ``kind`` decision when the condition ``key`` starts; quiet while it lasts."""
        self.episodes.add(key)
        if key not in self.state.episodes:
            self.decisions.append(Decision(kind, reason, message, data=data))

    def request(self, action: str, reason: str, elapsed: float, message: str,
                deadline: Optional[float] = None, **data: Any) -> None:
        out = self.state.outstanding
        if out is not None and (out.action == "stop" or out.action == action):
            return  # an unacknowledged request already covers this one
        seq = self.state.seq + 1
        rid = f"{self.state.rid_prefix}.{seq}" if self.state.rid_prefix else ""
        self.update(seq=seq, outstanding=Outstanding(seq, action, reason, elapsed, deadline,
                                                     rid=rid))
        self.decisions.append(
            Decision("request", reason, message, action=action, seq=seq, deadline=deadline,
                     data=data, rid=rid or None))

    def mark_done(self, key: str) -> None:
        self.update(done=self.state.done | {key})


def decide(config: Config, state: PolicyState, sample: Sample) -> Tuple[PolicyState, List[Decision]]:
    """Decide what to do for one sample. ``config`` must be resolved (platforms.resolve)."""
    t = _Tick(state)
    elapsed = sample.elapsed_s
    trainer = sample.trainer
    status = trainer.status
    lead = lead_time(config, sample)

    # A new trainer - a new process, or a new Session in the same notebook kernel - is a new
    # audience: one-shot requests apply to it again (the session warnings were for the user,
    # not the trainer, and stay said), and an earlier run's failure is not its own.
    change = trainer_change(state, sample)
    if change is not None:
        assert status is not None  # trainer_change says None without one
        started = trainer_identity(status)
        if change == "known":
            # The first trainer we know (or know by pid only: a state saved before
            # trainer_started was kept): the requests so far were addressed to it (it held
            # run.lock before its first trainer.json), so keep them.
            t.update(trainer_pid=status.pid, trainer_started=started)
        else:
            t.update(trainer_pid=status.pid, trainer_started=started, outstanding=None,
                     periodic_base_elapsed=elapsed,
                     failed=False, done=frozenset(k for k in t.state.done if k not in TRAINER_SCOPED),
                     progress_step=None, progress_since=None, progress_skip=True)

    # Acknowledgements and the last checkpoint's place on the session clock.
    if status is not None:
        out = t.state.outstanding
        if out is not None and acknowledges(status, out):
            t.decisions.append(Decision(
                "ack", REQUEST_ACKED, f"trainer acknowledged request {out.seq} ({out.action})",
                action=out.action, seq=out.seq,
                data={"request_reason": out.reason, "latency_s": round(elapsed - out.sent_elapsed, 3)}))
            t.update(outstanding=None)
        ckpt = status.last_checkpoint
        if ckpt is not None:
            at_elapsed = elapsed - max(0.0, sample.now - ckpt.at)
            if t.state.last_checkpoint_elapsed is None or at_elapsed > t.state.last_checkpoint_elapsed + 1e-6:
                t.update(last_checkpoint_elapsed=at_elapsed)
    if t.state.periodic_base_elapsed is None:
        t.update(periodic_base_elapsed=elapsed)

    active = trainer.alive and (status is None or status.state in ACTIVE_STATES)
    if trainer.alive and status is not None and status.state not in ACTIVE_STATES:
        t.warn_once(f"trainer_{status.state}", TRAINER_FINISHED,
                    f"training {status.state} at step {status.step}", state=status.state)

    # Session budget: warnings, then checkpoint at deadline - lead, then stop at deadline - stop_lead.
    left = remaining_s(config, sample)
    if left is not None:
        deadline = sample.now + left
        crossed = [w for w in config.warn_before if left <= w]
        if crossed:
            most_urgent = min(crossed)
            key = f"session_warn_{int(most_urgent)}"
            if key not in t.state.done:
                t.decisions.append(Decision(
                    "warn", SESSION_LIMIT,
                    f"session ends in about {format_duration(left)} "
                    f"(budget {format_duration(config.max_session or 0)})",
                    deadline=deadline, data={"remaining_s": round(left, 1)}))
                t.update(done=t.state.done | {f"session_warn_{int(w)}" for w in crossed})
        if active and left <= lead.stop_lead_s and "session_stop" not in t.state.done:
            t.request("stop", SESSION_LIMIT, elapsed,
                      f"session ends in {format_duration(left)}: checkpoint and stop now",
                      deadline=deadline, remaining_s=round(left, 1), lead_s=round(lead.stop_lead_s, 1))
            t.mark_done("session_stop")
            t.mark_done("session_checkpoint")
        elif active and left <= lead.lead_s and "session_checkpoint" not in t.state.done:
            t.request("checkpoint", SESSION_LIMIT, elapsed,
                      f"session ends in {format_duration(left)}: checkpoint now "
                      f"(lead {format_duration(lead.lead_s)})",
                      deadline=deadline - lead.stop_lead_s, remaining_s=round(left, 1),
                      lead_s=round(lead.lead_s, 1))
            t.mark_done("session_checkpoint")

    # A preemption notice (spot reclaim, GCP, SLURM --signal): checkpoint and stop now. SLURM's
    # time limit ("slurm") is a deadline like the session's and goes through the lead time.
    if sample.notice_deadline is not None and sample.notice_source != SLURM_LIMIT:
        left_notice = sample.notice_deadline - sample.now
        t.warn_once("preemption", PREEMPTION,
                    f"{sample.notice_source or 'preemption'} notice: the machine goes away in "
                    f"{format_duration(left_notice)}", source=sample.notice_source,
                    deadline=sample.notice_deadline)
        if active and "preemption_stop" not in t.state.done:
            t.request("stop", PREEMPTION, elapsed,
                      f"{sample.notice_source or 'preemption'} notice: checkpoint and stop now",
                      deadline=sample.notice_deadline, source=sample.notice_source)
            t.mark_done("preemption_stop")

    # Notebook idle clock (Colab reclaims a kernel that runs no cell).
    idle = sample.notebook_idle_s
    if idle is not None and idle > 0:
        if config.idle_warn and idle >= config.idle_warn:
            t.warn_once("idle_warn", IDLE_RECLAIM,
                        f"no cell has run for {format_duration(idle)}; Colab may reclaim an idle runtime "
                        "- keep a cell running with session_watchdog.wait()", idle_s=round(idle, 1))
        # One idle period, one request (issue 16): the period began at elapsed - idle; it is the
        # one already asked for when it began before that request. The threshold alone is not
        # enough: a fast first checkpoint shrinks the lead and moves the threshold past the idle
        # time, which would end the episode and start a new one.
        asked_at = t.state.idle_requested_elapsed
        asked = asked_at is not None and elapsed - idle < asked_at
        if config.idle_limit and (asked or idle >= config.idle_limit - lead.lead_s):
            t.episodes.add("idle_checkpoint")
            if active and not asked and "idle_checkpoint" not in t.state.episodes:
                t.request("checkpoint", IDLE_RECLAIM, elapsed,
                          f"idle for {format_duration(idle)}: checkpoint before an idle reclaim",
                          deadline=sample.now + max(0.0, config.idle_limit - idle),
                          idle_s=round(idle, 1))
                t.update(idle_requested_elapsed=elapsed)

    # RAM pressure -> checkpoint now (once per episode).
    host = sample.host
    if host is not None and host.ram_total_bytes > 0:
        avail_pct = 100.0 * host.ram_available_bytes / host.ram_total_bytes
        if avail_pct < config.ram_min_available_pct:
            key = "ram_pressure"
            t.warn_once(key, RAM_PRESSURE,
                        f"available RAM {avail_pct:.1f}% of {host.ram_total_bytes} bytes "
                        f"(< {config.ram_min_available_pct:g}%)",
                        available_bytes=host.ram_available_bytes, total_bytes=host.ram_total_bytes)
            if active and key not in state.episodes:
                t.request("checkpoint", RAM_PRESSURE, elapsed,
                          "RAM nearly exhausted: checkpoint before an OOM kill")

    # Disk headroom against the size of the last checkpoint.
    ckpt_bytes = status.last_checkpoint.bytes if status and status.last_checkpoint else None
    if status is not None:  # a sharded checkpoint's files, not only its marker
        ckpt_bytes = int(_positive(status.extra.get("checkpoint_total_bytes")) or 0) or ckpt_bytes
    for disk in sample.disks:
        if disk.free_bytes is None:
            continue
        level = None
        if ckpt_bytes:
            if disk.free_bytes < ckpt_bytes:
                level = "critical"
            elif disk.free_bytes < 2 * ckpt_bytes + config.disk_margin:
                level = "low"
        elif disk.free_bytes < config.disk_margin:
            level = "low"
        if level is not None:
            t.warn_once(f"disk_{level}:{disk.path}", DISK_LOW,
                        f"{disk.path}: {disk.free_bytes} bytes free"
                        + (f", last checkpoint {ckpt_bytes} bytes" if ckpt_bytes else ""),
                        level=level, path=disk.path, free_bytes=disk.free_bytes,
                        checkpoint_bytes=ckpt_bytes)

    hung = _hang_rule(config, t, sample, active)

    # GPU idle: every GPU known and below the threshold; an unknown reading resets the timer.
    # A hung trainer is not "idle": while a live trainer's step stands still and a hang timeout
    # is learned, the hang rule speaks for its idle GPUs (issue 13).
    from session_watchdog.probes import gpus_all_idle

    all_idle = gpus_all_idle(sample.gpus, config.gpu_idle_pct)
    if all_idle:
        since = t.state.gpu_idle_since if t.state.gpu_idle_since is not None else elapsed
        t.update(gpu_idle_since=since)
        progress = t.state.progress_since
        standing = (hung or (progress is not None and progress <= since
                             and hang_timeout(config, t.state.step_intervals) is not None))
        if elapsed - since >= config.gpu_idle_after and not standing:
            t.warn_once("gpu_idle", GPU_IDLE,
                        f"every GPU below {config.gpu_idle_pct:g}% for {format_duration(elapsed - since)}",
                        idle_s=round(elapsed - since, 1))
    else:
        t.update(gpu_idle_since=None)

    # Written on a change only, as gpu_idle_since is.
    if sample.trainer.alive or sample.trainer.saving or running_work(sample):
        t.update(unused_since=None)
    elif t.state.unused_since is None:
        t.update(unused_since=elapsed)

    # A trainer whose heartbeat stopped.
    if active and status is not None and sample.now - status.heartbeat > config.trainer_stall_after:
        t.warn_once("trainer_stalled", TRAINER_STALLED,
                    f"trainer heartbeat is {format_duration(sample.now - status.heartbeat)} old at step "
                    f"{status.step}", step=status.step)

    # The trainer's checkpoint mirror fails (Drive unmounted, quota, read-only...): say so once
    # per problem; training goes on with local checkpoints.
    mirror = MirrorStatus.from_status(status)
    if mirror is not None and mirror.problem is not None and trainer.alive:
        t.warn_once(f"mirror_{mirror.problem}", MIRROR_FAILING,
                    f"checkpoint mirror {mirror.target}: {mirror.problem} ({mirror.error}); "
                    "training continues, checkpoints are only local until it recovers",
                    problem=mirror.problem, target=mirror.target)

    # Periodic checkpoints, counted from the last checkpoint or the last periodic request.
    if config.checkpoint_every and active:
        base = max(x for x in (t.state.last_checkpoint_elapsed, t.state.periodic_base_elapsed)
                   if x is not None)
        if elapsed - base >= config.checkpoint_every and t.state.outstanding is None:
            t.request("checkpoint", PERIODIC, elapsed,
                      f"periodic checkpoint (every {format_duration(config.checkpoint_every)})")
            t.update(periodic_base_elapsed=elapsed)

    _no_trainer_rule(t, sample)
    _end_rules(config, t, sample, all_idle)

    # Re-send an unacknowledged request (same seq) after the timeout, while the trainer lives;
    # after MAX_RESENDS, say once that the trainer does not answer instead of signalling forever.
    out = t.state.outstanding
    if out is not None and active and elapsed - out.sent_elapsed >= config.resend_after * (out.resends + 1):
        if out.resends >= MAX_RESENDS:
            t.warn_once(f"unanswered_{out.seq}", TRAINER_STALLED,
                        f"request {out.seq} ({out.action}) unanswered after {out.resends} re-sends; "
                        "is the training loop calling session.step()?", seq=out.seq)
        elif not any(d.kind == "request" for d in t.decisions):
            t.update(outstanding=dataclasses.replace(out, resends=out.resends + 1))
            t.decisions.append(Decision(
                "resend", out.reason, f"request {out.seq} ({out.action}) unacknowledged for "
                f"{format_duration(elapsed - out.sent_elapsed)}; sending it again",
                action=out.action, seq=out.seq, deadline=out.deadline,
                data={"resends": out.resends + 1}, rid=out.rid or None))

    t.update(episodes=frozenset(t.episodes))
    return t.state, t.decisions


HANG_MIN_INTERVALS = 3  # step intervals seen before a timeout is learned (no verdict before)
HANG_WINDOW = 32  # intervals remembered: the newest ones, so a slowly growing step time is followed


def hang_timeout(config: Config, intervals: Tuple[float, ...]) -> Optional[float]:
    """The learned no-progress timeout, or None before :data:`HANG_MIN_INTERVALS` intervals.

    A robust maximum of the observed intervals between step advances (the largest, or the
    second largest once there are 8: one outlier does not set it) x ``hang_factor``, clamped
    to [``hang_floor``, ``hang_ceiling``].
    """
    if len(intervals) < HANG_MIN_INTERVALS:
        return None
    ordered = sorted(intervals, reverse=True)
    robust = ordered[1] if len(ordered) >= 8 else ordered[0]
    timeout = max(config.hang_floor, config.hang_factor * robust)
    return min(timeout, config.hang_ceiling) if config.hang_ceiling else timeout


def _hang_rule(config: Config, t: _Tick, sample: Sample, active: bool) -> bool:
    """Learn the step interval; decide ``trainer_hung`` when the step stands still too long.

    Progress, not GPU utilisation: a hung NCCL kernel spins at 100 % (issue 13). A save
    (state ``saving`` or save.lock held), a start and a stop are not hangs and are not
    learned from. Returns whether the trainer is hung now (an episode: one decision).
    """
    status = sample.trainer.status
    elapsed = sample.elapsed_s
    if not active or status is None:
        t.update(progress_step=None, progress_since=None, progress_skip=True)
        return False
    if status.state != "running" or sample.trainer.saving:
        t.update(progress_step=status.step, progress_since=elapsed, progress_skip=True)
        return False
    last, since = t.state.progress_step, t.state.progress_since
    if last is None or since is None or status.step < last:
        t.update(progress_step=status.step, progress_since=elapsed, progress_skip=True)
        return False
    if status.step > last:
        if not t.state.progress_skip and TRAINER_HUNG not in t.state.episodes:
            learned = (t.state.step_intervals + (round(elapsed - since, 3),))[-HANG_WINDOW:]
            t.update(step_intervals=learned, progress_step=status.step, progress_since=elapsed,
                     progress_skip=False)
        else:
            t.update(progress_step=status.step, progress_since=elapsed, progress_skip=False)
        return False
    timeout = hang_timeout(config, t.state.step_intervals)
    stuck = elapsed - since
    if timeout is None or stuck < timeout:
        return False
    t.episodes.add(TRAINER_HUNG)
    if TRAINER_HUNG not in t.state.episodes:
        t.decisions.append(Decision(  # a warning everywhere (notebook, log); actions add stacks
            "warn", TRAINER_HUNG,
            f"trainer's step has stayed at {status.step} for {format_duration(stuck)} (learned "
            f"timeout {format_duration(timeout)}); it looks hung",
            data={"step": status.step, "stuck_s": round(stuck, 1), "timeout_s": round(timeout, 1),
                  "pid": status.pid}))
    return True


def _no_trainer_rule(t: _Tick, sample: Sample) -> None:
    """Say once, early, that a watched command never built a Session (issue 11).

    Without a trainer on the run dir the watchdog can still end the runtime, but it cannot ask
    for a checkpoint: at the deadline nothing would happen, and nothing would be said.
    """
    if not sample.child_running:
        if t.state.child_since is not None:
            t.update(child_since=None)
        return
    since = sample.elapsed_s if t.state.child_since is None else t.state.child_since
    if t.state.child_since is None:
        t.update(child_since=since)
    if sample.trainer.alive:
        if "trainer_connected" not in t.state.done:
            t.mark_done("trainer_connected")
        return
    waited = sample.elapsed_s - since
    if waited >= NO_TRAINER_AFTER_S and not t.state.done & {"trainer_connected", "no_trainer"}:
        t.decisions.append(Decision(
            "warn", NO_TRAINER,
            f"no trainer has connected in {format_duration(waited)}: the watchdog can end the "
            "runtime but cannot ask the command for a checkpoint before a limit; build a "
            "session_watchdog.trainer.Session in the training script (README: \"In your "
            "training loop\")", data={"waited_s": round(waited, 1)}))
        t.mark_done("no_trainer")


def training_outcome(sample: Sample) -> Optional[str]:
    """"completed", "stopped", "failed" or None (running / unknown) from the trainer and the child.

    A wrapped command's exit code 0 counts as completed unless the trainer reported otherwise.
    "stopped" is a planned stop: the trainer reported ``stopped`` (it writes that only after the
    stop's checkpoint is durable) and is gone, and the command exited 75 (EXIT_STOPPED) or 0, or
    is not ours to know. Exit 75 is the stop the watchdog (or a signal) asked for, not a failure.
    """
    if sample.child_running:
        return None  # whatever trainer.json says, the command we watch has not finished
    status = sample.trainer.status
    state = status.state if status is not None else None
    if (state == "stopped" and not sample.trainer.alive
            and sample.child_exit in (None, 0, EXIT_STOPPED)):
        return "stopped"
    if state == "failed" or (sample.child_exit is not None and sample.child_exit != 0):
        return "failed"
    if state == "completed":
        return "completed"
    if sample.child_exit == 0 and state not in ACTIVE_STATES + ("stopped",):
        return "completed"
    return None


def running_work(sample: Sample) -> bool:
    """Whether work the watchdog can see runs without a trainer: a watched command, or a notebook
    cell (or ``wait()``). No end while it runs: a script tokenizing its data on the CPU keeps
    every GPU idle, and a cell after ``trainer.train()`` may be uploading the model; ending the
    runtime then would lose that work."""
    return sample.child_running or (sample.notebook_idle_s is not None
                                    and sample.notebook_idle_s <= 0.0)


def end_blocker(config: Config, reason: str, sample: Optional[Sample],
                decided: Optional[Sample] = None,
                state: Optional[PolicyState] = None) -> Optional[str]:
    """Why an end decided earlier must not happen now (the last check before the end action).

    The end transaction asks this with a sample taken after the grace period, right before the
    point of no return: a failure that came after the decision, or a GPU that woke up or became
    unknown on the idle path, stops it, and so does any :func:`running_work` (a cell or a
    command started during the grace period). The idle path needs a known, idle reading of
    every GPU; a training-complete end makes no claim about GPUs. (A live trainer or a running save cannot
    stop it here: the transaction holds both locks.)

    On the idle path, with ``decided`` (the sample the end was decided on) and the daemon's
    ``state`` now, use since the decision stops it too, even when it is over: a cell that ran
    and finished during the grace period, a command that exited since, or a tick that saw the
    runtime in use (``unused_since`` moved past the decision).
    """
    if sample is None:
        return "no fresh reading after the grace period; not ending the runtime"
    if training_outcome(sample) == "failed" and not config.end_on_failure:
        return "training failed during the grace period; the runtime is left running"
    from session_watchdog.probes import gpus_all_idle

    if reason == IDLE_END and not gpus_all_idle(sample.gpus, config.gpu_idle_pct):
        return "a GPU is busy or its reading is unknown; not ending an idle runtime"
    if running_work(sample):
        return "a watched command or a notebook cell is running; not ending the runtime"
    if reason == IDLE_END and decided is not None:
        return _used_since(decided, sample, state)
    return None


def _used_since(decided: Sample, sample: Sample, state: Optional[PolicyState]) -> Optional[str]:
    """Why the runtime is not idle any more: it was used after the idle end was decided."""
    if sample.notebook_idle_s is not None \
            and sample.elapsed_s - sample.notebook_idle_s > decided.elapsed_s:
        return "a notebook cell ran during the grace period; not ending an idle runtime"
    if sample.child_exit != decided.child_exit:
        return "a watched command ran during the grace period; not ending an idle runtime"
    if state is not None and (state.unused_since is None or state.unused_since > decided.elapsed_s):
        return ("a trainer, a command or a notebook cell ran during the grace period; not ending "
                "an idle runtime")
    return None


def _traceback(sample: Sample) -> Dict[str, str]:
    """The failed wrapped command's stderr tail, for the training_failed event (issue 15)."""
    return {"traceback": sample.child_traceback} if sample.child_traceback else {}


def _end_rules(config: Config, t: _Tick, sample: Sample, all_idle: Optional[bool]) -> None:
    """When to end the runtime (issue: release the runtime only when it is safe).

    The decision only starts the end transaction; the transaction itself re-checks everything
    (checkpoint, locks, GPUs) right before the end action and can be cancelled.
    """
    trainer = sample.trainer
    status = trainer.status
    outcome = training_outcome(sample)
    if outcome == "failed" and not t.state.failed:
        t.update(failed=True)
    if outcome == "failed":
        ending = config.end_when_done and config.end_on_failure
        if ending and "end" in t.state.done:
            return  # decided already: nothing more to say
        if ending and END_CANCELLED in t.state.done:
            pass  # this run's end was cancelled (remote cancel): the idle end below is left
        elif ending and trainer.alive:
            t.warn_once("training_failed", TRAINING_FAILED,
                        "training failed: the runtime is ended (end_on_failure) once the trainer "
                        "has exited", child_exit=sample.child_exit, **_traceback(sample))
        elif ending and running_work(sample):
            # Said when the failure is seen, as the completion path says it: the end itself
            # may come much later (an upload cell).
            t.say_once("info", "end_waits_for_work", TRAINING_FAILED,
                       "training failed; the runtime is ended (end_on_failure) once the running "
                       "notebook cell or command has finished",
                       child_exit=sample.child_exit, **_traceback(sample))
        elif ending:
            t.decisions.append(Decision(
                "end", TRAINING_FAILED, "training failed; ending the runtime (end_on_failure)",
                data={"child_exit": sample.child_exit, **_traceback(sample)}))
            t.mark_done("end")
        else:
            t.warn_once("training_failed", TRAINING_FAILED,
                        "training failed: the runtime is left running"
                        + ("" if not config.end_when_done else " (set end_on_failure to end it anyway)"),
                        child_exit=sample.child_exit, **_traceback(sample))
        if not (ending and END_CANCELLED in t.state.done):
            return
    if outcome == "stopped" and status is not None:
        # Said once, so that a planned stop never reads as a failure; the rules below still
        # apply (a forgotten runtime is ended after idle_end_after as before).
        ckpt = status.last_checkpoint
        exit_text = "" if sample.child_exit is None else f" (exit code {sample.child_exit})"
        resume = f" to resume from {ckpt.path}" if ckpt is not None else " to resume"
        t.say_once("info", TRAINING_STOPPED, TRAINING_STOPPED,
                   f"the trainer stopped as asked at step {status.step}{exit_text}, after saving "
                   f"its checkpoint; the runtime is left running: start the training again{resume}",
                   step=status.step, child_exit=sample.child_exit,
                   checkpoint=None if ckpt is None else ckpt.path)
    if "end" in t.state.done:
        return
    if t.state.failed and not config.end_on_failure:
        return
    if END_CANCELLED in t.state.done:
        outcome = None  # the user cancelled this run's end: only the idle end below is left
    if outcome == "completed" and config.end_when_done and not trainer.alive \
            and not trainer.saving and running_work(sample):
        # Work after the training (an evaluation, an upload in the next cell) is waited for.
        t.say_once("info", "end_waits_for_work", TRAINING_COMPLETE,
                   "training completed; the runtime is ended once the running notebook cell or "
                   "command has finished")
        return
    if (outcome == "completed" and config.end_when_done and not trainer.alive
            and not trainer.saving):
        ckpt = status.last_checkpoint if status is not None else None
        t.decisions.append(Decision(
            "end", TRAINING_COMPLETE,
            "training completed" + (f" at step {status.step}" if status is not None else ""),
            data={} if ckpt is None else {"checkpoint": ckpt.path, "sha256": ckpt.sha256,
                                          "checksum": ckpt.checksum, "bytes": ckpt.bytes}))
        t.mark_done("end")
        return
    # A forgotten runtime: for idle_end_after, no live trainer, no running_work and every GPU
    # known and idle.
    if (config.idle_end_after and not trainer.alive and not running_work(sample) and all_idle
            and t.state.gpu_idle_since is not None and t.state.unused_since is not None):
        last_use = max(t.state.gpu_idle_since, t.state.unused_since)
        if sample.notebook_idle_s is not None:  # a cell that ran between two ticks counts too
            last_use = max(last_use, sample.elapsed_s - sample.notebook_idle_s)
        idle_s = sample.elapsed_s - last_use
        if idle_s >= config.idle_end_after:
            t.decisions.append(Decision(
                "end", IDLE_END, f"no trainer and every GPU idle for {format_duration(idle_s)}",
                data={"idle_s": round(idle_s, 1)}))
            t.mark_done("end")
