"""trainer.json: the state a Session reports to the daemon, and the fields its parts share.

The Session's parts are classes, each built on the one before: ``_StatusMixin`` (here) <-
``_SavingMixin`` (saving.py) <- ``_FlagsMixin`` (flags.py: a step boundary may take a snapshot) <-
``_ResumingMixin`` (resuming.py: a resume reschedules the ranks' agreement) <- ``Session``
(session.py), whose ``__init__`` sets every field declared here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

from session_watchdog import channel
from session_watchdog.channel import CheckpointInfo, Request, RunDir, TrainerStatus
from session_watchdog.trainer.session_types import SessionError, _event, _Handler
from session_watchdog.trainer.stacks import StackDump

if TYPE_CHECKING:  # torch is imported with the checkpoint module, only when a Session is built
    from session_watchdog.trainer.checkpoint import CheckpointManager, SavedCheckpoint
    from session_watchdog.trainer.distributed import Agreement
    from session_watchdog.trainer.mirror import Mirror
    from session_watchdog.trainer.sharded import ShardedCheckpoint, ShardedCheckpointer
    from session_watchdog.trainer.snapshot import Snapshotter

TRACEBACK_LINES = 6
TRACEBACK_MAX_CHARS = 1000


def _traceback_tail(error: BaseException) -> str:
    """The last :data:`TRACEBACK_LINES` lines of ``error``'s traceback, at most 1000 characters."""
    lines = [line.rstrip() for chunk in traceback.format_exception(
        type(error), error, error.__traceback__) for line in chunk.splitlines() if line.strip()]
    return "\n".join(lines[-TRACEBACK_LINES:])[-TRACEBACK_MAX_CHARS:]


class _StatusMixin:
    """The state reported in ``trainer.json``, and the fields every part of a Session shares."""

    # The fields the parts read and write; Session.__init__ (session.py) sets them all.
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    extras: Dict[str, Any]
    poll_interval: float
    heartbeat_interval: float
    checkpoint_every: Optional[float]
    retry_after: float
    manager: CheckpointManager
    sync_every: int
    sync_interval_s: Optional[float]
    run_dir: RunDir
    _ckpt: ModuleType
    _distmod: ModuleType
    _step: int
    _pending: bool
    _epoch: int
    _epoch_start_step: int
    _state: str
    _closed: bool
    _sigterm: bool
    _sigusr1: bool
    _periodic_due: bool
    _request: Optional[Request]
    _handled_seq: int
    _acked_seq: int
    _handled_rid: Optional[str]
    _stale_rid: Optional[Tuple[str, float]]
    _acked_rid: str
    _rids: Dict[int, Optional[str]]
    _failed: Tuple[int, float]
    _last_checkpoint: Optional[CheckpointInfo]
    _extra: Dict[str, Any]
    _step_time_s: Optional[float]
    _elapsed_base: float
    _mono_start: float
    _last_save_mono: float
    _rate_anchor: Tuple[float, int]
    _last_heartbeat_mono: float
    _last_request_error: Optional[str]
    _async_thread: Optional[threading.Thread]
    _copy_hook: Any  # the optimizer's step pre-hook handle (overlap_copy), or None
    _overlap_copy: bool
    _copy_params_later: bool  # overlap_copy=True: the parameters too, not only the state
    _inflight_seq: Optional[int]
    _start_step: int
    _status_lock: threading.Lock
    _dist: Optional[Agreement]
    _reporter: bool
    _sync_at: int
    _window: int
    _sync_anchor: Tuple[float, int]
    _agreed_step_time_s: Optional[float]
    _out_of_step_logged: bool
    _sharded_ckpt: Optional[ShardedCheckpointer]
    _resume_called: bool
    _ahead_checked: bool
    _tracked: List[Any]
    _snapshots: Optional[Snapshotter]
    _snap_at: int
    _snap_due: bool
    _mirror: Optional[Mirror]
    _pid: int
    _create_time: float
    _save_lock: channel.FileLock
    _prev_handlers: Dict[int, _Handler]
    _stacks: Optional[StackDump]
    _on_signal_bound: Callable[[int, Optional[FrameType]], None]
    _wake_r: int
    _wake_w: int
    _prepare_snapshot: bool

    @property
    def elapsed_s(self) -> float:
        """Training time so far, including the time before the checkpoint resumed from."""
        return self._elapsed_base + (time.monotonic() - self._mono_start)

    @property
    def _rank(self) -> int:
        return 0 if self._dist is None else self._dist.rank

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


def _info(saved: Union[SavedCheckpoint, ShardedCheckpoint], *, seq: Optional[int],
          verified: Optional[Tuple[float, int]] = None) -> CheckpointInfo:
    """``verified``: ``(verified_at, mtime_ns)`` of the trainer's read-back of the file, if any."""
    return CheckpointInfo(path=os.path.abspath(saved.path), seq=seq, step=int(saved.step),
                          at=float(saved.at), duration_s=float(saved.duration_s),
                          bytes=int(saved.bytes), sha256=str(saved.sha256),
                          checksum=str(getattr(saved, "checksum", "") or ""),
                          verified_at=verified[0] if verified else None,
                          mtime_ns=verified[1] if verified else None)
