"""Session: the trainer side of the watchdog, driven from the training loop one step at a time.

Usage in a script::

    from session_watchdog.trainer import Session

    with Session("checkpoints/", model=model, optimizer=opt, scheduler=sched) as session:
        loader = session.track(loader)        # its position travels with every checkpoint
        start = session.resume()              # newest verified checkpoint, or a fresh start
        for epoch in session.epochs(num_epochs):
            for batch in loader:              # after a resume: the rest of the epoch
                ...                           # forward, backward, optimizer.step()
                session.step()                # a memory read unless a flag is set
        session.complete()                    # final checkpoint, verified, state=completed

What ``step()`` does: it adds one to the global step counter and reads one attribute. Everything
else happens only when that attribute (``_pending``) is set, by

- the poller thread, which reads ``request.json`` every ``poll_interval`` seconds (a request with a
  new ``seq``), writes the heartbeat (``trainer.json``) every ``heartbeat_interval`` seconds and
  flags the periodic checkpoint every ``checkpoint_every`` seconds;
- the SIGTERM / SIGUSR1 handlers, which only set flags and wake the poller (never save inside a
  handler: DESIGN.md, STYLE.md #6). They are installed only from the main thread, chain to the
  handlers that were there before and are restored by ``close()`` (Lightning's signal_connector).

At that step boundary the session saves a checkpoint (holding ``save.lock``), then acknowledges
the request in ``trainer.json`` (``acked_seq`` and ``last_checkpoint``) once the file is durable.

Stopping. A ``stop`` request, SIGTERM, or SIGUSR1 with no new request and no daemon holding
``daemon.lock`` (SLURM's ``--signal=USR1@120``) means: checkpoint, acknowledge, close the session,
then leave the training loop from inside ``step()``:

- scripts (``exit_on_stop=True``, the default): ``step()`` raises :class:`SessionExit`, a
  ``SystemExit`` with code :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL`` in sysexits.h: "try again
  later"), so an unmodified script exits with 75 and a wrapper knows the run can be resumed;
- notebooks (``exit_on_stop=False``): ``step()`` raises :class:`StopTraining`, an ordinary
  ``Exception`` that never ends the kernel. A ``with Session(...)`` block swallows it, so the cell
  ends cleanly and ``session.stopped`` is True afterwards.

A second SIGTERM that arrives before the first was handled at a step boundary (a loop stuck in a
data loader, an idle notebook that never closed its session) gets the previous disposition back
and is delivered again, so "kill, then kill again" still ends the process.

Resuming. ``resume()`` loads the newest *verified* checkpoint into the model, optimizer, scheduler
and scaler (RNG states too, through ``checkpoint.restore_state``) and returns a :class:`Start`.
``Start.batch`` is the number of steps already done inside ``Start.epoch`` (the step counter,
``Start.step``, already counts them). Data loaders registered with ``track()`` continue there by
themselves - the batches already done are not loaded again - and the resumed run is
bit-identical to an uninterrupted one (``session_watchdog.trainer.data``); a loop that draws its
own batches skips ``Start.batch`` of them.

States reported in ``trainer.json``: ``starting`` (built, no step yet), ``running``, ``saving``
(a synchronous checkpoint is being written; ``save.lock`` is held), ``stopping`` -> ``stopped``
(the stop checkpoint is durable and acknowledged), ``completed`` (final checkpoint verified),
``failed`` (``fail()``, an exception leaving the ``with`` block - KeyboardInterrupt included -, or
a stop/final checkpoint that could not be saved). ``close()`` alone leaves the state as it is.

Mirroring (``mirror=``, trainer/mirror.py). Every committed checkpoint is also copied to a second
tier (Drive, autodl-fs, an fsspec URL) by a background thread and verified there; ``trainer.json``
reports it (``extra["mirror"]``, ``extra["last_mirrored"]``). Only ``complete()`` and a stop wait
for the copy, at most ``mirror_wait_s``. ``resume()`` first copies a newer verified checkpoint down
from the mirror.

Failures. A malformed ``request.json`` is logged and ignored. A checkpoint that fails to save is
logged and not acknowledged (the request is tried again after ``retry_after`` seconds, the daemon
may resend it), training goes on - except for a stop, where ``step()`` re-raises the error after
writing ``state=failed`` (exiting with "resumable" would be a lie). ``complete()`` writes
``state=completed`` only after the final checkpoint is saved and verified.

Distributed training (torch.distributed: torchrun, SLURM, DDP, FSDP). A Session built inside an
initialized process group (build it on every rank, after ``init_process_group``) makes every rank
take the same decision at the same step; see ``session_watchdog.trainer.distributed``:

- rank-local flags (requests seen by each rank's poller, signals, the periodic timer) are combined
  by one small all-reduce (MAX) at agreed steps only: every ``sync_every`` steps, or fewer when
  that many would take longer than ``sync_interval_s`` at the step time the ranks agreed on.
  ``step()`` stays an increment and a comparison on every other step. A request waits up to
  ``window x step time`` for the agreement: published as ``extra["agree_delay_s"]``;
- ranks that share a run directory (the local ranks of one node, by default) form a group whose
  lowest rank is the *reporter*: the only one that writes ``trainer.json`` and acknowledges
  requests there; every rank holds ``run.lock`` shared. A request seen in any group's run dir
  reaches all ranks through the all-reduce;
- DDP (default): rank 0 writes the single-file checkpoint with every rank's RNG states while the
  others wait for its outcome, then all ranks acknowledge (each reporter in its run dir) and stop
  together; ``resume()`` loads the file rank 0 chose on every rank (a shared filesystem);
- sharded (``sharded=True``, FSDP or any DCP user): every rank writes its shards with
  ``torch.distributed.checkpoint`` into a fresh step directory committed by a marker written last
  (:class:`~session_watchdog.trainer.distributed.ShardedCheckpointer`).

``resume()``, ``checkpoint()`` and ``complete()`` are collectives then: call them on every rank.
``async_save`` is ignored (a background thread cannot join the ranks' collectives safely).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
    Type,
    Union,
    cast,
)

from session_watchdog import channel
from session_watchdog.channel import (
    DAEMON_LOCK,
    RUN_LOCK,
    SAVE_LOCK,
    ChannelError,
    CheckpointInfo,
    Request,
    RunDir,
    TrainerStatus,
)
from session_watchdog.config import parse_duration
from session_watchdog.trainer.stacks import StackDump

if TYPE_CHECKING:  # torch is imported with the checkpoint module, only when a Session is built
    from session_watchdog.trainer.checkpoint import (
        CheckpointManager,
        PendingSave,
        SavedCheckpoint,
    )
    from session_watchdog.trainer.distributed import (
        Agreement,
        ShardedCheckpoint,
        ShardedCheckpointer,
    )
    from session_watchdog.trainer.mirror import Mirror
    from session_watchdog.trainer.snapshot import Snapshotter

__all__ = [
    "EXIT_STOPPED",
    "Session",
    "SessionExit",
    "Start",
    "StopTraining",
]

EXIT_STOPPED = 75
"""Exit status of a script stopped on request after a durable checkpoint (EX_TEMPFAIL: resumable)."""

# run.lock objects of completed sessions that stay held until the process exits (a reference
# here keeps the open file, and with it the lock, alive after the Session is gone).
_HELD_UNTIL_EXIT: List[channel.FileLock] = []


def _process_outlives_training() -> bool:
    """A notebook kernel, or training on a thread: the process goes on after complete()."""
    if threading.current_thread() is not threading.main_thread():
        return True
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return callable(get_ipython) and get_ipython() is not None


DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_CHECKPOINT_EVERY_S = 30 * 60.0
DEFAULT_RETRY_AFTER_S = 30.0
DEFAULT_MIRROR_WAIT_S = 300.0  # complete() / a stop wait this long at most for the mirror
_STEP_TIME_EMA_ALPHA = 0.3  # weight of the newest step-time sample (one per poll with progress)
_RUN_LOCK_WAIT_S = 30.0  # the daemon holds run.lock exclusively only briefly, before ending
_SESSION_EXTRAS_KEY = "session_watchdog"  # our bookkeeping inside the checkpoint's extras
DEFAULT_SYNC_EVERY = 50  # steps between two agreements of the ranks (distributed.py)
DEFAULT_SYNC_INTERVAL_S = 10.0  # ... or fewer steps, when 50 would take longer than this
_NEVER = sys.maxsize  # _sync_at of a single process: step() never reaches it

_log = logging.getLogger(__name__)

RunDirLike = Union[str, "os.PathLike[str]", RunDir]
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


def _event(level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with fields: stdlib logging (structlog costs ~0.1 s to import in a trainer).

    The record carries ``record.event`` and ``record.fields`` so tests assert on data, not text.
    """
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


class SessionError(Exception):
    """The session cannot start (run directory locked, bad arguments)."""


class StopTraining(Exception):
    """Raised by ``step()`` on a stop when ``exit_on_stop=False`` (notebooks): leave the loop.

    Attributes:
        reason: why training stopped ("request:<daemon reason>", "SIGTERM", "SIGUSR1").
        checkpoint: the durable checkpoint written for the stop.
    """

    def __init__(self, reason: str, checkpoint: SavedCheckpoint) -> None:
        super().__init__(f"training stopped ({reason}) at step {checkpoint.step}; "
                         f"checkpoint {checkpoint.path}")
        self.reason = reason
        self.checkpoint = checkpoint


class SessionExit(SystemExit):
    """Raised by ``step()`` on a stop when ``exit_on_stop=True``: exits with :data:`EXIT_STOPPED`."""

    def __init__(self, reason: str, checkpoint: SavedCheckpoint) -> None:
        super().__init__(EXIT_STOPPED)
        self.reason = reason
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Start:
    """Where training starts: from scratch or from the newest verified checkpoint.

    Attributes:
        epoch: the epoch to start in.
        step: the global step counter (steps already done in all epochs).
        elapsed_s: training time accumulated before this start, in seconds.
        resumed: whether a checkpoint was loaded.
        path: the checkpoint loaded, or None.
        batch: steps already done inside ``epoch``; skip that many batches of it.
        extras: what the loop stored in ``session.extras`` before the checkpoint.
    """

    epoch: int
    step: int
    elapsed_s: float
    resumed: bool
    path: Optional[Path]
    batch: int = 0
    extras: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Flags:
    """What to do at this step boundary (the unit that ranks agree on, see ``_agree``).

    ``code`` ranks the reason (distributed.NOTHING .. SIGTERM_STOP); ``ack_seq`` is the request
    the checkpoint answers (after an agreement: the newest one any rank of this run dir saw).
    """

    save: bool
    stop: bool
    request: Optional[Request]
    reason: str
    code: int = 0
    ack_seq: Optional[int] = None


def _seconds(name: str, value: Any, *, off: Optional[str] = None) -> Any:
    """A Session duration: seconds (a number) or a string like ``"30m"``; None/``"off"`` when
    ``off`` says what that means. Parsed by the daemon's own parser (issue 11: ``"30m"`` was a
    TypeError here while the daemon took it)."""
    if off is not None and (value is None or (isinstance(value, str)
                                              and value.strip().lower() == "off")):
        return None
    try:
        return parse_duration(value)
    except ValueError as err:
        text = str(err)
        if "has no unit" not in text:
            text = "expected a positive number of seconds or a duration like '30m'"
        if off is not None:
            text += f" (None or 'off' to {off})"
        raise ValueError(f"Session({name}={value!r}): {text}") from None


def _snapshot_every(value: Any) -> Tuple[Optional[int], Optional[float]]:
    """``snapshot_every``: an int is steps, a string (or float) a duration; None/"off": off."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None, None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"Session(snapshot_every={value!r}): expected at least 1 step, or a "
                             "duration like '1m'")
        return value, None
    return None, float(_seconds("snapshot_every", value, off="turn snapshots off"))


TRACEBACK_LINES = 6
TRACEBACK_MAX_CHARS = 1000


def _traceback_tail(error: BaseException) -> str:
    """The last :data:`TRACEBACK_LINES` lines of ``error``'s traceback, at most 1000 characters."""
    lines = [line.rstrip() for chunk in traceback.format_exception(
        type(error), error, error.__traceback__) for line in chunk.splitlines() if line.strip()]
    return "\n".join(lines[-TRACEBACK_LINES:])[-TRACEBACK_MAX_CHARS:]


class Session:
    """Checkpoint, acknowledge and stop at step boundaries, as the watchdog or a signal asks.

    Args:
        checkpoint_dir: where checkpoints go (``CheckpointManager(checkpoint_dir, keep)``).
        model, optimizer, scheduler, scaler: what a checkpoint holds (any may be None).
        run_dir: the run directory shared with the daemon: a path, a ``RunDir``, or None for
            ``$SESSION_WATCHDOG_RUN_DIR`` / ``channel.default_run_dir()``.
        keep: checkpoints kept on disk (newest first).
        poll_interval: seconds between reads of ``request.json`` by the poller thread.
        heartbeat_interval: seconds between heartbeat writes of ``trainer.json``.
        checkpoint_every: seconds between periodic checkpoints (no daemon needed); None: off.
            Every duration here also takes the daemon's strings: ``"30m"``, ``"1h30m"``,
            ``"off"`` (where None is allowed); a string without a unit is refused.
        async_save: write requested and periodic checkpoints in the background (the ack goes
            out when the file is durable); stop and final checkpoints are always synchronous.
            The snapshot buffers (a CPU copy of the state) are allocated and paged in at the
            first step boundary, so that even the first save stalls only for a memory copy.
        exit_on_stop: on a stop, raise :class:`SessionExit` (True, scripts) or
            :class:`StopTraining` (False, notebooks).
        handle_signals: install SIGTERM / SIGUSR1 handlers (only possible from the main thread).
        retry_after: seconds before a requested checkpoint that failed to save is tried again.
        extras: initial value of ``session.extras``, a dict saved with every checkpoint.
        sync_every: distributed only: the most steps between two agreements of the ranks (one
            all-reduce each); the same on every rank.
        sync_interval_s: distributed only: the most seconds between two agreements, turned into
            a step count from the step time agreed at the previous one; None: ``sync_every``
            alone decides. The same on every rank.
        sharded: save with ``torch.distributed.checkpoint`` into committed step directories
            (FSDP; every rank writes its shards) instead of rank 0's single file.
        mirror: a second tier for every committed checkpoint (a Drive / autodl-fs / NFS path,
            an fsspec URL such as ``s3://bucket/run1``, or a ``trainer.mirror.Mirror``): copied
            and verified in the background (trainer/mirror.py); ``resume()`` looks there too.
            Rank 0's checkpoints under DDP; the framework sessions mirror their committed
            directories (integrations/_mirror.py); not with ``sharded=True`` (``mirror_ignored``).
        mirror_wait_s: the most seconds ``complete()`` and a stop wait for the last checkpoint
            to verify on the mirror (said in the log either way).
        snapshot_every: copy the training state into a shared-memory snapshot (``/dev/shm``)
            every N steps (an int) or every duration (``"1m"``); when the trainer dies without
            saving, the watchdog of ``session-watchdog run`` commits the newest snapshot as a
            checkpoint, so a restart loses at most this much (trainer/snapshot.py). Under
            DDP every rank snapshots at the same steps (a duration becomes a step count from
            the ranks' agreed step time); not with ``sharded=True``. None: off.
    """

    def __init__(
        self,
        checkpoint_dir: Union[str, os.PathLike[str]],
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        run_dir: Optional[RunDirLike] = None,
        keep: int = 2,
        poll_interval: Union[float, str] = DEFAULT_POLL_INTERVAL_S,
        heartbeat_interval: Union[float, str] = DEFAULT_HEARTBEAT_INTERVAL_S,
        checkpoint_every: Union[float, str, None] = DEFAULT_CHECKPOINT_EVERY_S,
        async_save: bool = False,
        exit_on_stop: bool = True,
        handle_signals: bool = True,
        retry_after: Union[float, str] = DEFAULT_RETRY_AFTER_S,
        extras: Optional[Dict[str, Any]] = None,
        sync_every: int = DEFAULT_SYNC_EVERY,
        sync_interval_s: Union[float, str, None] = DEFAULT_SYNC_INTERVAL_S,
        sharded: bool = False,
        mirror: Union[None, str, os.PathLike[str], Mirror] = None,
        mirror_wait_s: float = DEFAULT_MIRROR_WAIT_S,
        snapshot_every: Union[int, str, None] = None,
    ) -> None:
        # Seconds, or the daemon's duration strings ("30m", "off" where None is allowed).
        poll_interval = _seconds("poll_interval", poll_interval)
        heartbeat_interval = _seconds("heartbeat_interval", heartbeat_interval)
        retry_after = _seconds("retry_after", retry_after)
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"Session(sync_every={sync_every!r}): expected a whole number of "
                             "steps, at least 1")
        sync_interval_s = _seconds("sync_interval_s", sync_interval_s,
                                   off="synchronise on sync_every alone")
        checkpoint_every = _seconds("checkpoint_every", checkpoint_every,
                                    off="turn periodic checkpoints off")
        snap_steps, snap_s = _snapshot_every(snapshot_every)

        # Imported here, not at module level: the checkpoint module imports torch, and
        # `import session_watchdog.trainer` must stay cheap until a Session is built.
        import psutil

        from session_watchdog.trainer import checkpoint, distributed

        self._ckpt = checkpoint
        self._distmod = distributed
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.extras: Dict[str, Any] = dict(extras or {})
        self.poll_interval = float(poll_interval)
        self.heartbeat_interval = float(heartbeat_interval)
        self.checkpoint_every = None if checkpoint_every is None else float(checkpoint_every)
        self.async_save = async_save
        self.exit_on_stop = exit_on_stop
        self.retry_after = float(retry_after)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.manager: CheckpointManager = checkpoint.CheckpointManager(self.checkpoint_dir, keep=keep)
        self.sync_every = sync_every
        self.sync_interval_s = None if sync_interval_s is None else float(sync_interval_s)
        self.sharded = bool(sharded)

        # --- state read by step() and the poller (plain attributes: reads are atomic under the GIL)
        self._step = 0  # global step counter
        self._pending = False  # THE per-step flag: something waits for the next step boundary
        self._epoch = 0
        self._epoch_start_step = 0
        self._state = "starting"
        self._closed = False
        self._keep_run_lock = False  # complete(end_runtime_after="exit"): held until we exit
        self._stopped = False
        self._sigterm = False
        self._sigusr1 = False
        self._periodic_due = False
        self._request: Optional[Request] = None  # newest unhandled request seen by the poller
        self._handled_seq = 0  # requests up to this seq are done (acked or stale)
        self._acked_seq = 0
        # Requests with an id (rid, #18) are matched by it, not by seq: a new daemon's seq
        # restarts at 1 while a previous session's acked_seq may say 6.
        self._handled_rid: Optional[str] = None
        # (rid, issued) of a request written before this process started: skipped, but the
        # daemon's re-send of it (same rid, issued later) is answered.
        self._stale_rid: Optional[Tuple[str, float]] = None
        self._acked_rid = ""
        self._rids: Dict[int, Optional[str]] = {}  # seq -> rid of the requests read
        self._failed: Tuple[int, float] = (0, 0.0)  # (seq, monotonic) of a failed requested save
        self._last_checkpoint: Optional[CheckpointInfo] = None
        self._extra: Dict[str, Any] = {}
        self._step_time_s: Optional[float] = None
        self._elapsed_base = 0.0
        self._mono_start = time.monotonic()
        self._last_save_mono = self._mono_start  # periodic checkpoints count from here
        self._rate_anchor: Tuple[float, int] = (self._mono_start, 0)
        self._last_heartbeat_mono = 0.0
        self._last_request_error: Optional[str] = None
        self._async_thread: Optional[threading.Thread] = None
        self._inflight_seq: Optional[int] = None  # request answered by the async save in flight
        self._start_step = 0  # "starting" turns "running" once the counter moves past it
        self._status_lock = threading.Lock()
        # --- distributed agreement (distributed.py); None / _NEVER in a single process
        self._dist: Optional[Agreement] = None
        self._reporter = True  # writes trainer.json and acks (a group's lowest rank)
        self._sync_at = _NEVER  # step() services at this step even without a flag
        self._window = 0  # steps from the last agreement to the next
        self._sync_anchor: Tuple[float, int] = (self._mono_start, 0)  # for the agreed step time
        self._agreed_step_time_s: Optional[float] = None
        self._out_of_step_logged = False
        self._sharded_ckpt: Optional[ShardedCheckpointer] = None
        self._resume_called = False  # resume() was called (whatever it found)
        self._ahead_checked = False  # the first save looked for checkpoints of later steps
        self._tracked: List[Any] = []  # data loaders whose position checkpoints carry (data.py)
        self._snapshots: Optional[Snapshotter] = None  # trainer/snapshot.py (issue 13)
        self._snap_at = _NEVER  # step() services at this step for a snapshot
        self._snap_due = False  # the poller: a duration-based snapshot is due

        self.run_dir = self._open_run_dir(run_dir)
        if distributed.is_initialized() and _world_size() > 1:
            # Collective: every rank builds its Session here, with the same settings.
            self._dist = distributed.setup(self.run_dir.path, {
                "sync_every": self.sync_every, "sync_interval_s": self.sync_interval_s,
                "sharded": self.sharded,
                # a snapshot is a collective too (trainer/snapshot.py): the same on every rank
                "snapshot_every": [snap_steps, snap_s]})
            self._reporter = self._dist.reporter
            self._schedule_sync()
            self._extra["distributed"] = self._dist.describe()
        if self.sharded:
            self._sharded_ckpt = distributed.ShardedCheckpointer(self.checkpoint_dir, keep=keep)
        if self.async_save and (self._dist is not None or self.sharded):
            # The ack of a background write would need a collective from a second thread.
            self.async_save = False
            _event(logging.INFO, "async_save_ignored", reason="distributed or sharded: saves "
                   "are collective and synchronous")
        # Async saves: allocate and page in the snapshot buffers at the first step boundary, so
        # the first save's stall is a memory copy like every later one (issue 17).
        self._prepare_snapshot = self.async_save
        self._pending = self._pending or self.async_save
        self.mirror_wait_s = float(mirror_wait_s)
        if snap_steps is not None or snap_s is not None:
            if self.sharded:
                _event(logging.WARNING, "snapshot_ignored", reason="snapshots are not taken "
                       "with sharded=True (every rank's shards would have to be committed alike)")
            else:
                from session_watchdog.trainer.snapshot import Snapshotter

                dist_ = self._dist
                here = None if dist_ is None else dist_.members[dist_.rank].host
                self._snapshots = Snapshotter(
                    self.run_dir.path, self.manager.directory, self.manager.prefix, snap_steps,
                    snap_s, self._snapshot_changed, rank=None if dist_ is None else dist_.rank,
                    world_size=None if dist_ is None else dist_.world_size,
                    local_ranks=() if dist_ is None else
                    [m.rank for m in dist_.members if m.host == here])
                self._snap_at = snap_steps if snap_steps is not None else _NEVER
        self._mirror: Optional[Mirror] = None
        self._pid = os.getpid()
        self._create_time = psutil.Process(self._pid).create_time()
        self._run_lock = self.run_dir.lock(RUN_LOCK, shared=True)
        self._save_lock = self.run_dir.lock(SAVE_LOCK)
        self._prev_handlers: Dict[int, _Handler] = {}
        self._stacks: Optional[StackDump] = None
        self._on_signal_bound = self._on_signal  # one object, so close() can recognise it
        # A self-pipe wakes the poller from a signal handler without taking any lock.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = threading.Thread(target=self._poll_loop, name="session-watchdog-poller",
                                        daemon=True)
        try:
            self._acquire_run_lock()
            self._check_save_lock()
            self._adopt_previous_status()
            self._write_status()
            if handle_signals:
                self._install_signal_handlers()
                self._register_stack_dump()
            self._poller.start()
        except BaseException:
            self._restore_signal_handlers()
            self._run_lock.release()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            raise
        _event(logging.INFO, "session_started", run_dir=str(self.run_dir.path),
               checkpoint_dir=str(self.manager.directory), acked_seq=self._acked_seq)
        if mirror is not None and (self.sharded or self._rank != 0):
            if self.sharded:  # each rank's shards would need their own copy: not built yet
                _event(logging.WARNING, "mirror_ignored", reason="sharded checkpoints are not "
                       "mirrored; use a checkpoint_dir on persistent storage")
        elif mirror is not None:  # last: its reports go to trainer.json (issue 14)
            self._mirror = self._open_mirror(mirror)

    # ------------------------------------------------------------------------------------------
    # The training loop's side

    def step(self) -> None:
        """Count one optimizer step; at a flagged boundary checkpoint, acknowledge or stop.

        Call it once per iteration, after ``optimizer.step()``. Costs an increment, one
        attribute read and one comparison unless the poller or a signal set the flag - or,
        under torch.distributed, at the agreed steps (every ``sync_every`` at most), where the
        ranks all-reduce their flags.

        Raises:
            SessionExit: on a stop with ``exit_on_stop=True`` (exit code :data:`EXIT_STOPPED`).
            StopTraining: on a stop with ``exit_on_stop=False``.
            CheckpointError: the checkpoint for a stop could not be saved (state=failed).
        """
        self._step += 1
        if self._pending or self._step >= self._sync_at or self._step >= self._snap_at:
            self._service()

    @property
    def global_step(self) -> int:
        """Steps counted so far (restored by ``resume()``)."""
        return self._step

    @property
    def epoch(self) -> int:
        """The current epoch; set it at the start of each epoch (or iterate ``epochs()``)."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if value != self._epoch:
            self._epoch = int(value)
            self._epoch_start_step = self._step

    def epochs(self, total: int) -> Iterator[int]:
        """Yield the epochs from the current one (after ``resume()``) up to ``total``, setting ``epoch``."""
        epoch = self._epoch
        while epoch < total:
            self.epoch = epoch
            yield epoch
            epoch += 1

    @property
    def state(self) -> str:
        """The state reported in ``trainer.json`` (channel.TRAINER_STATES)."""
        return self._state

    @property
    def stopped(self) -> bool:
        """True once the session stopped on request or signal (after the stop checkpoint)."""
        return self._stopped

    @property
    def acked_seq(self) -> int:
        """The newest request acknowledged in ``trainer.json``."""
        return self._acked_seq

    @property
    def elapsed_s(self) -> float:
        """Training time so far, including the time before the checkpoint resumed from."""
        return self._elapsed_base + (time.monotonic() - self._mono_start)

    @property
    def last_checkpoint(self) -> Optional[CheckpointInfo]:
        """The newest durable checkpoint as reported in ``trainer.json``."""
        return self._last_checkpoint

    @property
    def agreement(self) -> Optional[Agreement]:
        """The link to the other ranks under torch.distributed (None in a single process)."""
        return self._dist

    @property
    def reporter(self) -> bool:
        """Whether this process writes ``trainer.json`` and acks (a run dir's lowest rank)."""
        return self._reporter

    def track(self, loader: Any) -> Any:
        """Save ``loader``'s position with every checkpoint and continue there on ``resume()``.

        Call it before ``resume()``, for each loader in the same order in every run, and iterate
        what it returns: a torchdata ``StatefulDataLoader`` as it is, a plain ``DataLoader``
        wrapped so that a resumed epoch goes on at the exact batch without loading the batches
        before it (see ``session_watchdog.trainer.data``).
        """
        from session_watchdog.trainer import data

        entry, iterable = data.track(loader)
        self._tracked.append(entry)
        return iterable

    def resume(self, map_location: Any = "cpu") -> Start:
        """Load the newest verified checkpoint into the model etc., or report a fresh start.

        Under torch.distributed this is a collective (call it on every rank): rank 0 chooses
        the checkpoint, every rank loads that one (from a filesystem they share) and gets its
        own RNG states back; if any rank cannot load it, every rank raises.

        Args:
            map_location: passed to ``CheckpointManager.load`` (tensors land on the parameters'
                devices when loaded into the modules anyway).

        Returns:
            The :class:`Start` to continue from.
        """
        loaded: Optional[Tuple[Union[SavedCheckpoint, ShardedCheckpoint], Dict[str, Any]]]
        self._resume_called = True
        if self._mirror is not None:
            # A newer verified copy on the mirror (a fresh runtime's disk is empty) comes down
            # to the local directory first; the local choice below then finds it.
            self._mirror.restore(self.manager)
        if self._sharded_ckpt is not None:
            loaded = self._load_sharded()
        elif self._dist is not None:
            loaded = self._load_ddp(map_location)
        else:
            latest = self.manager.latest()
            loaded = None if latest is None else (latest, self._ckpt.restore_state(
                self.manager.load(latest, map_location=map_location), model=self.model,
                optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler))
        if loaded is None:
            _event(logging.INFO, "fresh_start", checkpoint_dir=str(self.manager.directory))
            return Start(epoch=self._epoch, step=self._step, elapsed_s=self._elapsed_base,
                         resumed=False, path=None)
        saved, meta = loaded
        extras = dict(meta.get("extras") or {})
        ours = extras.pop(_SESSION_EXTRAS_KEY, None) or {}
        step = int(meta["step"])
        epoch = int(meta["epoch"])
        self._step = step
        self._epoch = epoch
        self._epoch_start_step = int(ours.get("epoch_start_step", step))
        self._elapsed_base = float(meta.get("elapsed_s") or 0.0)
        now = time.monotonic()
        self._mono_start = now
        self._last_save_mono = now
        self._rate_anchor = (now, step)
        self._start_step = step
        self.extras = extras
        if self._tracked:
            from session_watchdog.trainer import data

            data.load_states(self._tracked, ours.get("loaders"))
            if data.between_epochs(self._tracked):
                # Saved after the epoch's loop ended: that epoch is done, resume at the next one
                # (else epochs() would run the saved epoch a second time).
                epoch += 1
                self._epoch = epoch
                self._epoch_start_step = step
        self._last_checkpoint = _info(saved, seq=None)
        if self._mirror is not None and isinstance(saved, self._ckpt.SavedCheckpoint):
            self._mirror.catch_up(saved)  # resumed from a local copy the mirror never got
        if self._dist is not None:
            self._schedule_sync()  # the counter moved: the next agreement counts from here
        self._write_status()
        start = Start(epoch=epoch, step=step, elapsed_s=self._elapsed_base, resumed=True,
                      path=Path(saved.path), batch=step - self._epoch_start_step, extras=extras)
        _event(logging.INFO, "resumed", path=str(saved.path), epoch=epoch, step=step,
               batch=start.batch)
        return start

    def _load_ddp(self, map_location: Any) -> Optional[Tuple[SavedCheckpoint, Dict[str, Any]]]:
        """Collective: every rank loads the single file rank 0 chose; own RNG states back."""
        agreement = self._dist
        assert agreement is not None
        saved: Optional[SavedCheckpoint] = agreement.broadcast(
            self.manager.latest() if agreement.rank == 0 else None)
        if saved is None:
            return None
        error: Optional[BaseException] = None
        state: Dict[str, Any] = {}
        try:
            state = self.manager.load(saved, map_location=map_location)
        except self._ckpt.CheckpointError as err:
            error = err
        if not agreement.all_ok(error is None):
            if error is not None:
                raise error
            raise self._ckpt.CheckpointError(
                f"another rank could not load {saved.path}; every rank must be able to read "
                "the checkpoint directory (a filesystem all nodes share)")
        meta = self._ckpt.restore_state(state, model=self.model, optimizer=self.optimizer,
                                        scheduler=self.scheduler, scaler=self.scaler)
        ours = (meta.get("extras") or {}).get(_SESSION_EXTRAS_KEY) or {}
        rngs = ours.get("rank_rng")
        if isinstance(rngs, list) and len(rngs) == agreement.world_size:
            self._restore_rng(rngs[agreement.rank])
        else:
            _event(logging.WARNING, "rng_not_restored", rank=agreement.rank,
                   reason="checkpoint from another world size: rank 0's RNG states are used")
        return saved, meta

    def _load_sharded(self) -> Optional[Tuple[ShardedCheckpoint, Dict[str, Any]]]:
        """Collective: DCP-load the step directory rank 0 chose into the model etc."""
        ckpt = self._sharded_ckpt
        assert ckpt is not None
        saved = ckpt.choose()
        if saved is None:
            return None
        rank = self._rank
        template = self._distmod.session_state(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, rank=rank, meta=None, rng=None,
            saved_world_size=saved.world_size)
        ckpt.load(template, saved)
        meta = self._distmod.apply_session_state(template, model=self.model,
                                                 optimizer=self.optimizer,
                                                 scheduler=self.scheduler, scaler=self.scaler)
        rng = self._distmod.rank_rng(template, rank)
        if rng is not None:
            self._restore_rng(rng)
        else:
            _event(logging.WARNING, "rng_not_restored", rank=rank,
                   reason="no RNG states for this rank in the checkpoint (other world size)")
        return saved, meta

    def _restore_rng(self, rng: Dict[str, Any]) -> None:
        self._ckpt.restore_state({"format": self._ckpt.STATE_FORMAT, "rng": rng, "epoch": 0,
                                  "step": 0, "elapsed_s": 0.0})

    @property
    def _rank(self) -> int:
        return 0 if self._dist is None else self._dist.rank

    def checkpoint(self, reason: str = "manual") -> SavedCheckpoint:
        """Save a checkpoint now, synchronously (e.g. at the end of an epoch); returns it.

        Raises:
            CheckpointError: it could not be saved (reported in ``trainer.json`` too).
        """
        self._ensure_open()
        return self._save(seq=None, reason=reason, during="saving")

    def complete(self, end_runtime_after: Optional[str] = None) -> SavedCheckpoint:
        """Write the final checkpoint, verify it, then report ``state=completed`` and close.

        Args:
            end_runtime_after: when the watchdog may end the runtime. ``"exit"``: this process
                keeps ``run.lock`` until it exits, so work after ``complete()`` (an evaluation,
                an upload) is never cut off. ``"complete"``: ``run.lock`` is released now; the
                end may follow as soon as the watchdog sees the completed state. Default:
                ``"exit"`` from the main thread of a script; ``"complete"`` in a notebook
                kernel or from another thread, where the process outlives the training.

        Raises:
            CheckpointError: the final checkpoint could not be saved or verified (state=failed).
            ValueError: ``end_runtime_after`` is not one of the values above.
        """
        if end_runtime_after not in (None, "exit", "complete"):
            raise ValueError(f"end_runtime_after={end_runtime_after!r} is not valid; use "
                             "\"exit\" or \"complete\"")
        self._ensure_open()
        request = self._request
        # The final checkpoint answers a request still open: nothing newer will ever exist.
        seq = request.seq if request is not None and not self._answered(request) else None
        try:
            saved = self._save(seq=None, reason="complete", during="saving", record=False,
                               final=True)
            # Distributed and sharded saves verify inside the collective (rank 0 decides).
            if self._dist is None and self._sharded_ckpt is None \
                    and not self.manager.verify(saved.path):
                raise self._ckpt.CheckpointError(
                    f"final checkpoint {saved.path} failed verification (size or checksum)")
        except BaseException as err:
            self._fail(err)
            self.close()
            raise
        self._record(saved, seq=seq, state="completed")
        if end_runtime_after is None:
            end_runtime_after = "complete" if _process_outlives_training() else "exit"
        self._keep_run_lock = end_runtime_after == "exit"
        _event(logging.INFO, "completed", path=str(saved.path), step=saved.step,
               checksum=getattr(saved, "checksum", "") or f"sha256:{saved.sha256}",
               end_runtime_after=end_runtime_after)
        self._wait_mirror(saved, "complete", self.mirror_wait_s)
        self.close()
        return saved

    def fail(self, error: Optional[BaseException] = None) -> None:
        """Report ``state=failed`` (the daemon then never ends the runtime) and close."""
        if self._closed:
            return
        self._fail(error)
        self.close()

    def close(self) -> None:
        """Stop the poller, restore signal handlers and release ``run.lock``. Idempotent.

        The state in ``trainer.json`` is left as it is: a session closed without ``complete()``
        or a stop looks to the daemon like a trainer that went away.
        """
        if self._closed:
            return
        self._closed = True
        self._pending = False
        self._join_async()
        if self._mirror is not None:
            self._mirror.close()  # what is queued is still copied; no more retries
        self._wake()
        if self._poller.is_alive() and self._poller is not threading.current_thread():
            self._poller.join(timeout=max(5.0, 2 * self.poll_interval))
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._snapshots is not None:
            if self._state in ("completed", "stopped"):
                self._snapshots.remove()  # a durable checkpoint of the end: give the RAM back
            else:
                self._snapshots.wait(10.0)  # a crash: the newest snapshot completes for the daemon
        self._restore_signal_handlers()
        # The loaders are the caller's: a closed session keeps none, so a StatefulDataLoader (which
        # holds its live iterator and worker processes) shuts down as soon as the caller drops it,
        # not at some later garbage collection (where torchdata waits 5 s per worker to join).
        self._tracked = []
        if self._stacks is not None:
            self._stacks.unregister()
            self._extra.pop("stacks", None)
        self._save_lock.release()
        if self._keep_run_lock:  # the kernel releases it when this process exits
            _HELD_UNTIL_EXIT.append(self._run_lock)
        else:
            self._run_lock.release()
        _event(logging.INFO, "session_closed", state=self._state, step=self._step)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> bool:
        if exc is None or isinstance(exc, (StopTraining, SessionExit)):
            self.close()
            # A notebook cell ends cleanly on a stop; a script still exits with EXIT_STOPPED.
            return isinstance(exc, StopTraining)
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            self.close()
            return False
        self.fail(exc)
        return False

    # ------------------------------------------------------------------------------------------
    # Step boundary (main thread)

    def _service(self) -> None:
        """Act on whatever set the flag. Runs in the training thread, between two steps."""
        flags = self._decide()
        if flags is not None:
            self._act(flags)

    def _decide(self) -> Optional[_Flags]:
        """What to do at this step boundary (after the ranks' agreement), or None: nothing.

        Consumes the flags. The framework integrations call it from their step-end hooks and let
        the framework write the checkpoint (``session_watchdog.integrations``).
        """
        # Clear first, read the reasons after: a flag set meanwhile is then seen now or next step.
        self._pending = False
        if self._closed:
            return None
        if self._prepare_snapshot:
            self._prepare_snapshot = False
            try:
                self.manager.prepare_async(self._capture())
            except Exception as err:  # an optimization only: the first save allocates instead
                _event(logging.WARNING, "snapshot_prepare_failed", error=str(err))
        # Distributed: only the step count decides (the same on every rank: a collective follows).
        if self._snapshots is not None and (self._step >= self._snap_at
                                            or (self._snap_due and self._dist is None)):
            self._take_snapshot()
        if self._dist is not None and self._step < self._sync_at:
            return None  # distributed: flags wait for the agreed step (never act alone)
        stop_reason: Optional[str] = None
        if self._sigterm:
            self._sigterm = False
            stop_reason = "SIGTERM"
        request = self._request
        if self._sigusr1:
            self._sigusr1 = False
            if not self._is_new(request):
                # The daemon writes the request before it signals; the poller may not have read
                # it yet, so read it here rather than wait up to poll_interval.
                request = self._poll_request()
                if not self._is_new(request) and not self._daemon_present():
                    # No daemon: SIGUSR1 is SLURM's `--signal=USR1@...` warning. With a daemon it
                    # is only a wake-up (it may resend for a request we already acknowledged).
                    stop_reason = stop_reason or "SIGUSR1"
        if not self._is_new(request):
            request = None
        periodic = self._periodic_due
        if periodic:
            # Restart the period before clearing the flag: the poller reads the flag first and
            # the time second, so it cannot flag the same period twice.
            self._last_save_mono = time.monotonic()
            self._periodic_due = False
        if stop_reason is not None:
            reason = stop_reason  # a signal's stop also answers a pending request (seq acked)
        elif request is not None:
            reason = f"request:{request.reason}"
        else:
            reason = "periodic"
        stop = stop_reason is not None or (request is not None and request.action == "stop")
        dm = self._distmod
        if stop_reason is not None:
            code = dm.SIGTERM_STOP if stop_reason == "SIGTERM" else dm.SIGUSR1_STOP
        elif request is not None:
            code = dm.REQUEST_STOP if request.action == "stop" else dm.REQUEST_CHECKPOINT
        else:
            code = dm.PERIODIC if periodic else dm.NOTHING
        flags = self._agree(_Flags(save=stop or periodic or request is not None, stop=stop,
                                   request=request, reason=reason, code=code,
                                   ack_seq=None if request is None else request.seq))
        return flags if flags.save else None

    def _act(self, flags: _Flags) -> None:
        """Checkpoint (and stop) as ``flags`` say, acknowledging the request they answer."""
        seq = flags.ack_seq
        if flags.stop:
            try:
                saved = self._save(seq=seq, reason=flags.reason, during="stopping",
                                   after="stopped")
            except BaseException as err:
                # Exiting with "resumable" after a failed save would be a lie: fail loudly.
                self._fail(err)
                self.close()
                raise
            self._stopped = True
            # Before the barrier: the other ranks wait there while rank 0's copy finishes.
            deadline = flags.request.deadline if flags.request is not None else None
            self._wait_mirror(saved, "stop", self.mirror_wait_s if deadline is None else
                              min(self.mirror_wait_s, deadline - time.time()))
            if self._dist is not None:
                # Every reporter has acked before any rank leaves: torchrun ends the other
                # workers as soon as one exits, which must not cut another node's ack short.
                self._dist.barrier()
            _event(logging.WARNING, "stopped", reason=flags.reason, step=saved.step,
                   path=str(saved.path))
            self.close()
            if self.exit_on_stop:
                raise SessionExit(flags.reason, saved)
            raise StopTraining(flags.reason, saved)
        if self.async_save:
            self._save_async(seq=seq, reason=flags.reason)
            return
        try:
            self._save(seq=seq, reason=flags.reason, during="saving")
        except (self._ckpt.CheckpointError, self._distmod.ShardedCheckpointError, OSError,
                ChannelError):  # ChannelError: save.lock could not be taken even when recreated
            pass  # logged and reported by _save; training goes on without an ack

    def _take_snapshot(self) -> None:
        """Copy the state into the shared-memory snapshot (the stall is a memory copy)."""
        snapshots = self._snapshots
        assert snapshots is not None
        self._snap_due = False
        if snapshots.every_steps is not None:
            self._snap_at = (self._step // snapshots.every_steps + 1) * snapshots.every_steps
        elif self._dist is not None:
            self._snap_at = _NEVER  # the next agreement schedules the next one (_agree)
        if self._dist is not None:
            self._take_rank_snapshot(snapshots)  # a failed collective must not be swallowed
            return
        try:
            snapshots.take(self._capture(), step=self._step, epoch=self._epoch)
        except Exception as err:  # a snapshot is a bonus: never let it stop training
            _event(logging.WARNING, "snapshot_failed", error=f"{type(err).__name__}: {err}")

    def _take_rank_snapshot(self, snapshots: Snapshotter) -> None:
        """Distributed: every rank snapshots this step, after one all-gather (a collective).

        The gather brings rank 0 every rank's RNG states (its payload is then the checkpoint it
        would write: ``_write``) and tells every rank whether all have room, so they stay or
        stop together. Each rank first waits for its previous write: once any rank passes the
        gather, every rank's previous generation is complete, so the daemon always finds one
        generation complete on every rank (supervise/snapshots.py).
        """
        agreement = self._dist
        assert agreement is not None
        rank = agreement.rank
        snapshots.wait(None)
        state: Dict[str, Any] = {}
        rng: Optional[Dict[str, Any]] = None
        try:  # never raise before the gather: the other ranks would wait in it forever
            rng = self._rng_state()
            state = self._capture() if rank == 0 else {"rank": rank, "rng": rng}
            problem = snapshots.check_room(state)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        gathered = agreement.all_gather((rng, problem, snapshots.token if rank == 0 else None))
        problems = [(r, why) for r, (_, why, _) in enumerate(gathered) if why is not None]
        if problems:
            self._snap_at = _NEVER  # on every rank alike: no more snapshot collectives
            snapshots.disable(f"rank {problems[0][0]}: {problems[0][1]}", self._step)
            return
        if rank == 0:
            state["extras"] = self._extras_to_save(rank_rng=[g[0] for g in gathered])
        else:
            state.update(step=self._step, epoch=self._epoch)
        try:
            snapshots.take(state, step=self._step, epoch=self._epoch, room_checked=True,
                           header={"rank": rank, "world_size": agreement.world_size,
                                   "job": gathered[0][2]})
        except Exception as err:  # this rank's copy failed: the daemon finds no equal generation
            _event(logging.WARNING, "snapshot_failed", error=f"{type(err).__name__}: {err}")

    def _snapshot_changed(self, report: Dict[str, Any]) -> None:
        with self._status_lock:
            self._extra["snapshot"] = report

    def _agree(self, flags: _Flags) -> _Flags:
        """Make every rank take the same decision at this step. Single process: as is.

        Distributed: one all-reduce (MAX) of (reason code, step time, step, request seq per run
        dir); every rank saves when any rank wants to, stops when any rank must, and schedules
        the next agreement from the agreed step time (so all ranks pick the same step).
        """
        agreement = self._dist
        if agreement is None:
            return flags
        now = time.monotonic()
        anchor_time, anchor_step = self._sync_anchor
        measured = ((now - anchor_time) / (self._step - anchor_step)
                    if self._step > anchor_step else None)
        agreed = agreement.exchange(code=flags.code, seq=flags.ack_seq or 0, step=self._step,
                                    step_time_s=measured)
        if not agreed.steps_agree and not self._out_of_step_logged:
            self._out_of_step_logged = True
            _event(logging.ERROR, "ranks_out_of_step", rank=agreement.rank, step=self._step,
                   hint="every rank must call step() once per optimizer step")
        self._agreed_step_time_s = agreed.step_time_s
        self._schedule_sync()
        snap = self._snapshots
        if snap is not None and snap.every_s is not None and self._snap_at == _NEVER \
                and snap.disabled is None and agreed.step_time_s:
            # A duration as a step count from the agreed step time: the same on every rank.
            self._snap_at = self._step + max(1, int(snap.every_s // agreed.step_time_s))
        dm = self._distmod
        if agreed.code == dm.NOTHING:
            return _Flags(save=False, stop=False, request=None, reason="", code=dm.NOTHING)
        if flags.code == agreed.code:
            reason = flags.reason
        else:
            reason = f"{dm.CODE_NAMES[agreed.code]} from rank {agreed.source_rank}"
        return _Flags(save=True, stop=agreed.code >= dm.REQUEST_STOP, request=flags.request,
                      reason=reason, code=agreed.code, ack_seq=agreed.seq or None)

    def _schedule_sync(self) -> None:
        """The next agreement, ``window`` steps from now: every rank computes the same step."""
        self._window = self._distmod.next_window(self.sync_every, self.sync_interval_s,
                                                 self._agreed_step_time_s, self._window)
        self._sync_at = self._step + self._window
        self._sync_anchor = (time.monotonic(), self._step)

    def _answered(self, request: Request) -> bool:
        """Whether ``request`` was acknowledged or skipped as stale (by rid when it has one)."""
        if request.rid is not None:
            stale = self._stale_rid
            return request.rid == self._handled_rid or (
                stale is not None and stale[0] == request.rid and request.issued <= stale[1])
        return request.seq <= self._handled_seq

    def _is_new(self, request: Optional[Request]) -> bool:
        """Whether ``request`` still needs an answer (not acked, not in flight, not backing off)."""
        if request is None or self._answered(request) or request.seq == self._inflight_seq:
            return False
        failed_seq, failed_at = self._failed
        return not (request.seq == failed_seq
                    and time.monotonic() - failed_at < self.retry_after)

    # ------------------------------------------------------------------------------------------
    # Saving

    def _capture(self, rank_rng: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        state: Dict[str, Any] = self._ckpt.capture_state(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, epoch=self._epoch, step=self._step, elapsed_s=self.elapsed_s,
            extras=self._extras_to_save(rank_rng))
        return state

    def _extras_to_save(self, rank_rng: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        extras = dict(self.extras)
        ours: Dict[str, Any] = {"epoch_start_step": self._epoch_start_step}
        if self._tracked:
            ours["loaders"] = [entry.state_dict() for entry in self._tracked]
        if rank_rng is not None:
            # DDP: rank 0 writes the file; every rank gets its own RNG states back on resume
            # (ranks seeded differently - per-rank augmentation - resume bit for bit too).
            ours["rank_rng"] = rank_rng
        extras[_SESSION_EXTRAS_KEY] = ours
        return extras

    def _rng_state(self) -> Dict[str, Any]:
        rng: Dict[str, Any] = self._ckpt.capture_state(epoch=0, step=0, elapsed_s=0.0)["rng"]
        return rng

    def _write(self, *, final: bool) -> Union[SavedCheckpoint, ShardedCheckpoint]:
        """Write one checkpoint: this process alone, rank 0 for all (DDP), or sharded (DCP)."""
        if self._sharded_ckpt is not None:
            state = self._distmod.session_state(
                model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, rank=self._rank, rng=self._rng_state(),
                meta={"epoch": self._epoch, "step": self._step, "elapsed_s": self.elapsed_s,
                      "extras": self._extras_to_save()})
            return self._sharded_ckpt.save(state, step=self._step, epoch=self._epoch)
        agreement = self._dist
        if agreement is None:
            self._keep_checkpoints_ahead()
            return self.manager.save(self._capture(), step=self._step, epoch=self._epoch)
        rngs = agreement.all_gather(self._rng_state())
        outcome: Any = None
        error: Optional[BaseException] = None
        if agreement.rank == 0:
            try:
                self._keep_checkpoints_ahead()
                saved = self.manager.save(self._capture(rank_rng=rngs), step=self._step,
                                          epoch=self._epoch)
                if final and not self.manager.verify(saved.path):
                    raise self._ckpt.CheckpointError(
                        f"final checkpoint {saved.path} failed verification (size or checksum)")
                outcome = ("ok", saved)
            except Exception as err:  # every rank must hear of it, or the others wait forever
                error = err
                outcome = ("error", f"{type(err).__name__}: {err}")
        # The other ranks wait here (up to the process group's timeout) while rank 0 writes.
        outcome = agreement.broadcast(outcome)
        if outcome[0] == "error":
            if error is not None:
                raise error
            raise self._ckpt.CheckpointError(f"rank 0 could not save the checkpoint: {outcome[1]}")
        result: SavedCheckpoint = outcome[1]
        return result

    def _save(self, *, seq: Optional[int], reason: str, during: str,
              after: Optional[str] = None, record: bool = True,
              final: bool = False) -> SavedCheckpoint:
        """Save synchronously under ``save.lock``; acknowledge ``seq`` once it is durable.

        Args:
            seq: the request this checkpoint answers, or None.
            reason: for the log.
            during: the state reported while saving ("saving" or "stopping").
            after: the state reported with the ack (None: the state before the save).
            record: report the checkpoint in ``trainer.json`` (``complete()`` verifies first).
            final: distributed: rank 0 verifies the file before the ranks hear the outcome.

        On failure the error is logged, reported in ``trainer.json`` (``extra.last_error``) and
        re-raised.
        """
        self._join_async()
        previous = self._state
        self._last_save_mono = time.monotonic()  # any checkpoint restarts the period
        self._set_state(during)
        # Every reporter holds its run dir's save.lock while the (collective) save runs.
        lock: Any = self._save_lock_held() if self._reporter else contextlib.nullcontext()
        try:
            with lock:
                # A ShardedCheckpoint has SavedCheckpoint's fields (path: its commit marker).
                saved = cast("SavedCheckpoint", self._write(final=final))
        except BaseException as err:
            self._save_failed(err, seq, reason, previous)
            raise
        self._rate_anchor = (time.monotonic(), self._step)  # save time is not step time
        self._sync_anchor = self._rate_anchor
        if record:
            self._record(saved, seq=seq, state=previous if after is None else after)
        _event(logging.INFO, "checkpoint_saved", reason=reason, seq=seq, step=saved.step,
               path=str(saved.path), duration_s=round(saved.duration_s, 3), bytes=saved.bytes)
        return saved

    def _keep_checkpoints_ahead(self) -> None:
        """At the first save of a run that never called resume(): keep checkpoints of later steps.

        Forgetting ``resume()`` once let saves at steps 2 and 3 prune the step-100 checkpoint
        of the run before (issue 11). They are kept for this session's life, with one warning.
        """
        if self._resume_called or self._ahead_checked:
            return
        self._ahead_checked = True
        ahead = self.manager.keep_ahead_of(self._step)
        if ahead:
            newest = max(ahead, key=lambda saved: saved.step)
            _event(logging.WARNING, "checkpoints_ahead_kept", count=len(ahead),
                   newest_step=newest.step, newest_path=str(newest.path), step=self._step,
                   message=f"{len(ahead)} checkpoint(s) of later steps (newest: step "
                           f"{newest.step}) are in {self.manager.directory} but resume() was not "
                           "called: they are kept, never pruned by this run; call "
                           "session.resume() before the first step to continue from the newest")

    def _save_async(self, *, seq: Optional[int], reason: str) -> None:
        """Snapshot now, write in the background; the ack goes out when the file is durable."""
        self._join_async()
        try:
            self._take_save_lock()  # held until the write is durable (released by the waiter)
        except (ChannelError, OSError) as err:
            self._save_failed(err, seq, reason, None)
            return
        self._last_save_mono = time.monotonic()
        try:
            self._keep_checkpoints_ahead()
            pending = self.manager.save_async(self._capture(), step=self._step, epoch=self._epoch)
        except BaseException as err:
            self._save_lock.release()
            self._save_failed(err, seq, reason, None)
            if isinstance(err, (self._ckpt.CheckpointError, OSError)):
                return
            raise
        self._rate_anchor = (time.monotonic(), self._step)
        self._inflight_seq = seq
        self._async_thread = threading.Thread(target=self._await_async,
                                              args=(pending, seq, reason),
                                              name="session-watchdog-ack", daemon=True)
        self._async_thread.start()

    def _await_async(self, pending: PendingSave, seq: Optional[int], reason: str) -> None:
        """Background: wait for the write to be durable, then acknowledge (or report failure).

        The training thread joins this thread (``_join_async``) before it saves again,
        completes or closes, so a failure is reported exactly once, here.
        """
        try:
            # hurry=False: training goes on meanwhile; the write keeps its idle priority
            saved: Optional[SavedCheckpoint] = pending.result(hurry=False)
        except BaseException as err:
            self._save_lock.release()
            self._save_failed(err, seq, reason, None)
            self._inflight_seq = None
            return
        self._save_lock.release()
        if saved is not None:
            self._record(saved, seq=seq, state=None)
            _event(logging.INFO, "checkpoint_saved", reason=reason, seq=seq, step=saved.step,
                   path=str(saved.path), duration_s=round(saved.duration_s, 3),
                   bytes=saved.bytes, mode="async")
        self._inflight_seq = None

    def _join_async(self) -> None:
        thread = self._async_thread
        if thread is not None and thread is not threading.current_thread():
            self.manager.hurry()  # training waits for the write now: normal CPU priority
            thread.join()
            self._async_thread = None

    def _save_failed(self, err: BaseException, seq: Optional[int], reason: str,
                     state: Optional[str]) -> None:
        if seq is not None:
            self._failed = (seq, time.monotonic())
        error = f"{type(err).__name__}: {err}"
        _event(logging.ERROR, "checkpoint_failed", reason=reason, seq=seq, step=self._step,
               error=error)
        with self._status_lock:
            self._extra["last_error"] = error
            if state is not None:
                self._state = state
        self._write_status()

    def _record(self, saved: SavedCheckpoint, *, seq: Optional[int],
                state: Optional[str]) -> None:
        """Report a durable checkpoint (and the ack of ``seq``) in one ``trainer.json`` write."""
        with self._status_lock:
            verification = getattr(self.manager, "verification", None)
            self._last_checkpoint = _info(
                saved, seq=seq, verified=verification(saved.path) if verification else None)
            self._extra["checkpoint_duration_s"] = round(float(saved.duration_s), 6)
            total = getattr(saved, "total_bytes", None)
            if total is not None:
                # Sharded: last_checkpoint describes the commit marker; this is the data's size.
                self._extra["checkpoint_total_bytes"] = int(total)
            self._extra.pop("last_error", None)
            if seq is not None:
                rid = self._rids.get(seq)
                self._handled_seq = max(self._handled_seq, seq)
                self._acked_seq = max(self._acked_seq, seq) if rid is None else seq
                if rid is not None:
                    self._handled_rid = self._acked_rid = rid
            if state is not None:
                self._state = state
        self._write_status()
        if self._mirror is not None and self._mirror.accepts(saved):
            self._mirror.submit(saved)

    def _open_mirror(self, mirror: Union[str, os.PathLike[str], Mirror]) -> Optional[Mirror]:
        """Build (for a path or URL), attach and start the mirror of this session's checkpoints."""
        from session_watchdog.trainer import mirror as mirror_mod

        return mirror_mod.open_mirror(mirror, self.manager, self._mirror_changed)

    def _mirror_changed(self, report: Dict[str, Any]) -> None:
        """The mirror's worker: report its state and newest verified copy in trainer.json."""
        mirror = self._mirror
        last = mirror.last if mirror is not None else None
        with self._status_lock:
            self._extra["mirror"] = report
            if last is not None:
                self._extra["last_mirrored"] = last.to_json()
        self._write_status()

    def _wait_mirror(self, saved: SavedCheckpoint, why: str, timeout: float) -> None:
        """Wait (bounded) for ``saved`` to verify on the mirror; say how it went."""
        mirror = self._mirror
        if mirror is None or not mirror.accepts(saved):
            return
        started = time.monotonic()
        _event(logging.INFO, "mirror_wait", why=why, step=saved.step, target=mirror.location,
               timeout_s=round(max(0.0, timeout), 1))
        done = mirror.wait(saved, max(0.0, timeout))
        waited = round(time.monotonic() - started, 3)
        if done is not None:
            _event(logging.INFO, "mirror_wait_done", why=why, step=saved.step, waited_s=waited,
                   path=done.location)
        else:
            _event(logging.WARNING, "mirror_wait_timeout", why=why, step=saved.step,
                   waited_s=waited, target=mirror.location, problem=mirror.problem,
                   message="the checkpoint is safe locally but not verified on the mirror; "
                           "the watchdog will not end the runtime for it")

    def _fail(self, error: Optional[BaseException]) -> None:
        text = None if error is None else f"{type(error).__name__}: {error}"
        with self._status_lock:
            self._state = "failed"
            if error is not None:
                self._extra["error"] = text
                # The traceback's last lines, for the "training failed" notification (issue 15).
                self._extra["traceback"] = _traceback_tail(error)
        self._write_status()
        _event(logging.ERROR, "failed", step=self._step, error=text)

    def _ensure_open(self) -> None:
        if self._closed:
            raise SessionError(f"session is closed (state {self._state})")

    # ------------------------------------------------------------------------------------------
    # trainer.json

    def _set_state(self, state: str, only_from: Optional[str] = None) -> None:
        """Report ``state`` now; with ``only_from``, only if the state is still that one."""
        with self._status_lock:
            if only_from is not None and self._state != only_from:
                return  # the training thread moved on meanwhile (saving, stopped...)
            self._state = state
        self._write_status()

    def _write_status(self) -> None:
        """Write the heartbeat; an I/O error is logged, never raised into training.

        Distributed: only the reporter (its run dir's lowest rank) writes.
        """
        if not self._reporter:
            self._last_heartbeat_mono = time.monotonic()
            return
        with self._status_lock:
            extra = dict(self._extra)
            if self._dist is not None:
                # The longest a request waits for the ranks' agreement: for the daemon's lead.
                extra["agree_window_steps"] = self._window
                extra["agree_delay_s"] = round(self._window * (self._agreed_step_time_s
                                                               or self._step_time_s or 0.0), 3)
            status = TrainerStatus(
                pid=self._pid, start_time=self._create_time, state=self._state, step=self._step,
                epoch=self._epoch, step_time_s=self._step_time_s, acked_seq=self._acked_seq,
                last_checkpoint=self._last_checkpoint, heartbeat=time.time(), extra=extra,
                acked_rid=self._acked_rid)
            try:
                self.run_dir.write_status(status)
            except OSError as err:
                _event(logging.WARNING, "heartbeat_failed", error=str(err))
            self._last_heartbeat_mono = time.monotonic()

    def _adopt_previous_status(self) -> None:
        """Continue the ack counter of a previous trainer in this run dir; skip stale requests.

        The daemon's seq grows across trainers; a request issued before this process started was
        addressed to a previous trainer (the daemon drops it when it sees a new pid).
        """
        try:
            previous = self.run_dir.read_status()
        except ChannelError as err:
            _event(logging.WARNING, "previous_status_ignored", error=str(err))
            previous = None
        if previous is not None:
            self._acked_seq = self._handled_seq = previous.acked_seq
            self._acked_rid = previous.acked_rid or ""
            self._handled_rid = previous.acked_rid or None
        request = self._poll_request()
        if request is not None and not self._answered(request) \
                and request.issued < self._create_time:
            if request.rid is not None:
                self._stale_rid = (request.rid, request.issued)
            else:
                self._handled_seq = request.seq
            _event(logging.INFO, "request_stale", seq=request.seq, rid=request.rid,
                   action=request.action, issued=request.issued)

    # ------------------------------------------------------------------------------------------
    # Poller thread

    def _poll_loop(self) -> None:
        while not self._closed:
            timeout = min(self.poll_interval, self.heartbeat_interval)
            try:
                ready, _, _ = select.select([self._wake_r], [], [], timeout)
                if ready:
                    self._drain_wake()
            except (OSError, ValueError):  # fds closed by close() while we waited
                return
            if self._closed:
                return
            try:
                self._poll_once()
            except Exception as err:  # never let the poller die: training depends on it
                _event(logging.ERROR, "poll_failed", error=f"{type(err).__name__}: {err}")

    def _poll_once(self) -> None:
        now = time.monotonic()
        request = self._poll_request()
        if self._is_new(request):
            self._request = request  # data first, flag second: _service clears the flag first
            self._pending = True
        every = self.checkpoint_every
        if every is not None and not self._periodic_due and now - self._last_save_mono >= every:
            self._periodic_due = True
            self._pending = True
        snap = self._snapshots
        if snap is not None and snap.every_s is not None and not self._snap_due \
                and self._dist is None and snap.due(self._step, now):
            self._snap_due = True
            self._pending = True
        self._update_step_time(now)
        if self._state == "starting" and self._step > self._start_step:
            self._set_state("running", only_from="starting")
        elif now - self._last_heartbeat_mono >= self.heartbeat_interval:
            self._write_status()

    def _poll_request(self) -> Optional[Request]:
        """Read ``request.json``; a malformed one is logged (once per distinct error) and ignored."""
        try:
            request = self.run_dir.read_request()
        except (ChannelError, OSError) as err:
            message = str(err)
            if message != self._last_request_error:
                _event(logging.WARNING, "request_ignored", error=message)
            self._last_request_error = message
            return None
        self._last_request_error = None
        if request is not None and self._rids.get(request.seq, "") != request.rid:
            rids = dict(self._rids) if len(self._rids) < 64 else {}
            rids[request.seq] = request.rid
            self._rids = rids  # one assignment: the other thread sees the old or the new map
        return request

    def _update_step_time(self, now: float) -> None:
        """EMA of seconds per step, from step-counter progress between polls (free for step())."""
        anchor_time, anchor_step = self._rate_anchor
        step = self._step
        if step > anchor_step and now > anchor_time:
            sample = (now - anchor_time) / (step - anchor_step)
            previous = self._step_time_s
            self._step_time_s = sample if previous is None else (
                _STEP_TIME_EMA_ALPHA * sample + (1 - _STEP_TIME_EMA_ALPHA) * previous)
            self._rate_anchor = (now, step)
        elif step < anchor_step:  # resume() moved the counter
            self._rate_anchor = (now, step)

    def _daemon_present(self) -> bool:
        try:
            return self.run_dir.lock_held(DAEMON_LOCK)
        except (ChannelError, OSError):
            return False

    # ------------------------------------------------------------------------------------------
    # Signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            # signal.signal works only in the main thread (a notebook's training thread, say);
            # the poller still sees requests within poll_interval.
            _event(logging.INFO, "signals_not_installed", reason="not the main thread")
            return
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._prev_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal_bound)
        # Tell the daemon it may wake us with SIGUSR1 (its default action would kill a process
        # without a handler, so the daemon signals only trainers that say this).
        self._extra["sigusr1"] = True

    def _register_stack_dump(self) -> None:
        """faulthandler on SIGUSR2: the daemon logs every thread's stack of a hung trainer."""
        self._stacks = StackDump(self.run_dir.path)
        try:
            described = self._stacks.register()
        except (OSError, RuntimeError, ValueError) as err:
            self._stacks = None
            _event(logging.WARNING, "stacks_not_registered", reason=str(err))
            return
        if described is None:
            self._stacks = None
            _event(logging.INFO, "stacks_not_registered", reason="SIGUSR2 already has a handler")
            return
        self._extra["stacks"] = described

    def _restore_signal_handlers(self) -> None:
        self._extra.pop("sigusr1", None)
        if not self._prev_handlers:
            return
        if threading.current_thread() is not threading.main_thread():
            _event(logging.WARNING, "signals_not_restored", reason="close() outside main thread")
            return
        for signum, previous in list(self._prev_handlers.items()):
            current = signal.getsignal(signum)
            # Someone installed a handler over ours (and may chain to it): leave theirs.
            if current == self._on_signal_bound and previous is not None:
                signal.signal(signum, previous)
            del self._prev_handlers[signum]

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """Set a flag and wake the poller; nothing else happens inside a handler."""
        previous = self._prev_handlers.get(signum)
        if not self._closed:
            if signum == signal.SIGTERM:
                if self._sigterm and previous == signal.SIG_DFL:
                    # Second SIGTERM before the first was handled: the loop is stuck (or the
                    # notebook idle); give the default action back and let it happen.
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                    return
                self._sigterm = True
            else:
                self._sigusr1 = True
            self._pending = True
            self._wake()
        if callable(previous):
            previous(signum, frame)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError, AttributeError):
            pass  # pipe full (the poller is awake anyway), closed, or not made yet

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno != errno.EBADF:
                raise

    # ------------------------------------------------------------------------------------------

    def _open_run_dir(self, run_dir: Optional[RunDirLike]) -> RunDir:
        if isinstance(run_dir, RunDir):
            return run_dir
        path = channel.default_run_dir() if run_dir is None else Path(run_dir)
        return RunDir(Path(os.path.abspath(path)))

    def _check_save_lock(self) -> None:
        """Refuse to start when ``save.lock`` is a symlink or not a regular file (issue 18).

        Saying so once, here, beats a crash at the first checkpoint hours later.
        """
        path = self._save_lock.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise SessionError(f"{path} is {kind}; remove it (rm {path}) and start again")

    def _take_save_lock(self) -> None:
        """Take ``save.lock``; if it was replaced during the run, recreate it and take it.

        A symlink (or FIFO, socket) put in its place after the start is unlinked, never
        followed, and a fresh lock file is created with O_NOFOLLOW; the run dir is ours (0700),
        so nobody else should have been able to do that. Losing the run over it would be worse
        than the replacement itself (issue 18). A second failure is a failed save.
        """
        try:
            self._save_lock.acquire()
            return
        except (ChannelError, OSError) as err:
            path = self._save_lock.path
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise  # not a replacement we can safely undo
            _event(logging.WARNING, "save_lock_recreated", path=str(path), error=str(err))
            if st is not None:
                os.unlink(path)
        self._save_lock.acquire()

    @contextlib.contextmanager
    def _save_lock_held(self) -> Iterator[None]:
        self._take_save_lock()
        try:
            yield
        finally:
            self._save_lock.release()

    def _acquire_run_lock(self) -> None:
        deadline = time.monotonic() + _RUN_LOCK_WAIT_S
        while not self._run_lock.acquire(blocking=False):
            # The daemon holds it exclusively only while it ends the runtime.
            if time.monotonic() >= deadline:
                raise SessionError(f"{self._run_lock.path} is held exclusively (the daemon is "
                                   "ending the runtime?)")
            time.sleep(0.1)


def _world_size() -> int:
    import torch.distributed as dist

    return int(dist.get_world_size())


def _info(saved: Union[SavedCheckpoint, ShardedCheckpoint], *, seq: Optional[int],
          verified: Optional[Tuple[float, int]] = None) -> CheckpointInfo:
    """``verified``: ``(verified_at, mtime_ns)`` of the trainer's read-back of the file, if any."""
    return CheckpointInfo(path=os.path.abspath(saved.path), seq=seq, step=int(saved.step),
                          at=float(saved.at), duration_s=float(saved.duration_s),
                          bytes=int(saved.bytes), sha256=str(saved.sha256),
                          checksum=str(getattr(saved, "checksum", "") or ""),
                          verified_at=verified[0] if verified else None,
                          mtime_ns=verified[1] if verified else None)
