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
  (:class:`~session_watchdog.trainer.sharded.ShardedCheckpointer`).

``resume()``, ``checkpoint()`` and ``complete()`` are collectives then: call them on every rank.
``async_save`` is ignored (a background thread cannot join the ranks' collectives safely).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Type, Union

from session_watchdog import channel
from session_watchdog.channel import RUN_LOCK, SAVE_LOCK, ChannelError, CheckpointInfo, Request, RunDir
from session_watchdog.trainer.resuming import _ResumingMixin
from session_watchdog.trainer.session_types import (
    _NEVER,
    _RUN_LOCK_WAIT_S,
    _Handler,
    _seconds,
    _snapshot_every,
)

# Re-exported (`X as X`): defined in session_types.py and status.py, shared with the Session's
# parts (flags.py, saving.py, resuming.py), and importable from here as before.
from session_watchdog.trainer.session_types import DEFAULT_CHECKPOINT_EVERY_S as DEFAULT_CHECKPOINT_EVERY_S
from session_watchdog.trainer.session_types import (
    DEFAULT_HEARTBEAT_INTERVAL_S as DEFAULT_HEARTBEAT_INTERVAL_S,
)
from session_watchdog.trainer.session_types import DEFAULT_MIRROR_WAIT_S as DEFAULT_MIRROR_WAIT_S
from session_watchdog.trainer.session_types import DEFAULT_POLL_INTERVAL_S as DEFAULT_POLL_INTERVAL_S
from session_watchdog.trainer.session_types import DEFAULT_RETRY_AFTER_S as DEFAULT_RETRY_AFTER_S
from session_watchdog.trainer.session_types import DEFAULT_SYNC_EVERY as DEFAULT_SYNC_EVERY
from session_watchdog.trainer.session_types import DEFAULT_SYNC_INTERVAL_S as DEFAULT_SYNC_INTERVAL_S
from session_watchdog.trainer.session_types import EXIT_STOPPED as EXIT_STOPPED
from session_watchdog.trainer.session_types import RunDirLike as RunDirLike
from session_watchdog.trainer.session_types import SessionError as SessionError
from session_watchdog.trainer.session_types import SessionExit as SessionExit
from session_watchdog.trainer.session_types import Start as Start
from session_watchdog.trainer.session_types import StopTraining as StopTraining
from session_watchdog.trainer.session_types import _event as _event
from session_watchdog.trainer.session_types import _Flags as _Flags
from session_watchdog.trainer.stacks import StackDump
from session_watchdog.trainer.status import TRACEBACK_LINES as TRACEBACK_LINES
from session_watchdog.trainer.status import TRACEBACK_MAX_CHARS as TRACEBACK_MAX_CHARS

if TYPE_CHECKING:  # torch is imported with the checkpoint module, only when a Session is built
    from session_watchdog.trainer.checkpoint import CheckpointManager, SavedCheckpoint
    from session_watchdog.trainer.distributed import Agreement
    from session_watchdog.trainer.mirror import Mirror
    from session_watchdog.trainer.sharded import ShardedCheckpointer
    from session_watchdog.trainer.snapshot import Snapshotter

__all__ = [
    "EXIT_STOPPED",
    "Session",
    "SessionExit",
    "Start",
    "StopTraining",
]


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


class Session(_ResumingMixin):
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
        overlap_copy: with ``async_save`` and a ``torch.optim`` optimizer (opt-in), which of
            the optimizer's CPU tensors the writer copies while the next forward and backward
            pass run, instead of the save's stall: ``False`` (the default: none, the stall
            copies the whole state), ``"optimizer_state"`` (Adam's moments: two thirds of a
            model + Adam state's bytes) or ``True`` (the parameters too). The optimizer's next
            ``step()`` waits for that copy (a step pre-hook, run before any other), and the
            checkpoint commits only after that step, or 5 s after the copy when none comes.
            Only for loops where nothing but ``optimizer.step()`` writes those tensors between
            ``session.step()`` and the next optimizer step: a write through ``.data`` there is
            saved unseen - for the state, pruning code that masks momentum buffers; for the
            parameters (``True``), also EMA evaluation helpers that swap weights in and out
            (torch_ema, diffusers' ``EMAModel``) and schedule-free optimizers' ``eval()`` /
            ``train()``. An in-place change there is seen (checked in the pre-hook; SophiaG's
            ``update_hessian`` is one): that save fails, says so in the log
            (``checkpoint_failed``, ``overlap_copy_off``), the overlap is off from then on and
            the request is retried at the next step. Optimizers whose ``step()`` runs no
            pre-hooks (wrappers such as accelerate's), or global optimizer pre-hooks, leave it
            off.
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
        overlap_copy: Union[bool, str] = False,
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
        if not (isinstance(overlap_copy, bool) or overlap_copy == "optimizer_state"):
            raise ValueError(f"Session(overlap_copy={overlap_copy!r}): use False (the default), "
                             "\"optimizer_state\" or True (the parameters too)")

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
        # When this Session started: the daemon tells trainers apart by pid and this, since
        # every Session in one notebook kernel has the kernel's pid (policy.trainer_identity).
        self._extra: Dict[str, Any] = {"session_started": time.time()}
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
        # overlap_copy: the optimizer's next step waits for the writer's copy of its tensors
        # (its pre-hook is registered last, below: a failed construction leaves none behind).
        self._copy_hook = None
        self._copy_params_later = overlap_copy is True  # and the state: "optimizer_state" too
        self._overlap_copy = True  # off after a save saw those tensors change (_await_async)
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
        if self.async_save and overlap_copy and _runs_step_pre_hooks(optimizer):
            self._copy_hook = optimizer.register_step_pre_hook(self._wait_for_copy)
            # Before the hooks registered earlier: one that changes the parameters (a projection
            # run with every step) is part of the step, and must not run while the writer copies.
            optimizer._optimizer_step_pre_hooks.move_to_end(self._copy_hook.id, last=False)

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
        try:
            self._join_async()
            self.manager.release_buffers()  # a copy of the state's tensors: not kept after the end
            # Large pruned files are unlinked by a helper thread: done before close() returns,
            # so that nothing of ours changes the directory after it (a copytree to Drive next).
            self.manager._join_pruner()
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
        finally:
            # Also after a Ctrl-C in one of the waits above (a second close() returns at once):
            # a run.lock left held made the daemon see a live trainer for the kernel's life.
            self._release_at_close()

    def _release_at_close(self) -> None:
        self._restore_signal_handlers()
        if self._copy_hook is not None:  # the optimizer outlives the session
            self._copy_hook.remove()
            self._copy_hook = None
        # The loaders are the caller's: a closed session keeps none, so a StatefulDataLoader (which
        # holds its live iterator and worker processes) shuts down as soon as the caller drops it,
        # not at some later garbage collection (where torchdata waits 5 s per worker to join).
        self._tracked = []
        if self._stacks is not None:
            self._stacks.unregister()
            self._extra.pop("stacks", None)
        writing = self._async_thread
        if writing is None or not writing.is_alive():
            self._save_lock.release()  # else its waiter releases it once the write is durable
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
    # Step boundary (main thread); what the flags mean: _decide (flags.py); saves: saving.py

    def _service(self) -> None:
        """Act on whatever set the flag. Runs in the training thread, between two steps."""
        flags = self._decide()
        if flags is not None:
            self._act(flags)

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

    # ------------------------------------------------------------------------------------------

    def _open_run_dir(self, run_dir: Optional[RunDirLike]) -> RunDir:
        if isinstance(run_dir, RunDir):
            return run_dir
        path = channel.default_run_dir() if run_dir is None else Path(run_dir)
        return RunDir(Path(os.path.abspath(path)))

    def _acquire_run_lock(self) -> None:
        deadline = time.monotonic() + _RUN_LOCK_WAIT_S
        while not self._run_lock.acquire(blocking=False):
            # The daemon holds it exclusively only while it ends the runtime.
            if time.monotonic() >= deadline:
                raise SessionError(f"{self._run_lock.path} is held exclusively (the daemon is "
                                   "ending the runtime?)")
            time.sleep(0.1)


def _runs_step_pre_hooks(optimizer: Any) -> bool:
    """Whether ``optimizer.step()`` runs the pre-hooks ``register_step_pre_hook`` adds: a
    ``torch.optim.Optimizer`` whose ``__init__`` ran (it wraps the class's ``step``). Wrappers
    that subclass it without that (accelerate's ``AcceleratedOptimizer``, Lookahead-style
    ones) have neither the hook table nor a step that runs it: no overlap for them. Nor with
    global pre-hooks: they run before the optimizer's own, ours included."""
    from torch.optim import optimizer as optim_module

    # Global pre-hooks (register_optimizer_step_pre_hook) run before any of the optimizer's own.
    if getattr(optim_module, "_global_optimizer_pre_hooks", None):
        return False
    return (callable(getattr(optimizer, "register_step_pre_hook", None))
            and isinstance(getattr(optimizer, "_optimizer_step_pre_hooks", None),
                           collections.OrderedDict)
            and bool(getattr(type(optimizer).step, "hooked", False))
            and isinstance(getattr(optimizer, "param_groups", None), list)
            and isinstance(getattr(optimizer, "state", None), dict))


def _world_size() -> int:
    import torch.distributed as dist

    return int(dist.get_world_size())
