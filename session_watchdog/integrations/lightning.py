"""PyTorch Lightning (2.x): checkpoint and stop ``trainer.fit()`` when the watchdog asks.

Add three lines to a stock script (``pip install 'session-watchdog[lightning]'``)::

    from session_watchdog.integrations.lightning import WatchdogCallback, watchdog_resume

    watchdog = WatchdogCallback("checkpoints/")
    trainer = L.Trainer(max_epochs=10, callbacks=[watchdog])
    trainer.fit(model, loader, ckpt_path=watchdog_resume("checkpoints/"))
    if watchdog.stopped:
        sys.exit(75)        # stopped on request after a committed checkpoint: resumable

What happens:

- ``on_train_batch_end`` (once per optimizer step: batches that only accumulate gradients are
  skipped) does what ``Session.step()`` does: one flag read; under torch.distributed every rank
  takes the same decision at the same step (the ranks' agreement of ``Session``);
- on a request every rank calls ``trainer.save_checkpoint()`` into ``<dir>/checkpoint-N/model.ckpt``
  (Lightning writes it on rank 0); the directory is then committed (sha256 and fsync of every
  file, marker written last) and the request acknowledged in ``trainer.json``;
- a stop sets ``trainer.should_stop = True``: ``fit()`` returns after the current step.
  Lightning ignores ``should_stop`` until ``min_epochs`` / ``min_steps`` are reached: with those
  set, a stop requested earlier still checkpoints, but training goes on until they are met;
- when ``fit()`` ends on its own, the final state is saved and committed and the run is reported
  ``completed``; an exception in ``fit()`` reports ``failed`` (the runtime is never ended for it);
- Lightning's own SIGTERM handling ends ``fit()`` with ``SIGTERMException`` (a ``SystemExit``)
  at the end of the epoch; the callback checkpoints first and turns its exit code into 75.

For an exact mid-epoch resume, give Lightning a loader that saves its position: torchdata's
``StatefulDataLoader`` (``pip install 'session-watchdog[data]'``); Lightning stores its state in
the checkpoint. With a plain ``DataLoader`` Lightning cannot continue an epoch where it stopped.
A save decided at an epoch's last batch is made at that epoch's end (single process): from a
save at that batch's end Lightning would skip the next epoch (see ``on_train_batch_end``).

The callback is built on ``lightning.pytorch.Callback``; when only the older ``pytorch_lightning``
package is installed (or it was imported and ``lightning`` was not), on that one instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from session_watchdog.integrations._core import (
    CommittedDir,
    FrameworkSession,
    verify_dir,
)
from session_watchdog.integrations._mirror import restore_dir
from session_watchdog.trainer.mirror import Mirror
from session_watchdog.trainer.session import (
    DEFAULT_CHECKPOINT_EVERY_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_MIRROR_WAIT_S,
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_SYNC_EVERY,
    DEFAULT_SYNC_INTERVAL_S,
    EXIT_STOPPED,
    RunDirLike,
    _Flags,
)

if TYPE_CHECKING:
    from lightning.pytorch import Callback
elif "pytorch_lightning" in sys.modules and "lightning" not in sys.modules:
    from pytorch_lightning import Callback  # the user's script runs on the older package
else:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback

__all__ = ["CHECKPOINT_FILE", "EXIT_STOPPED", "WatchdogCallback", "watchdog_resume"]

CHECKPOINT_FILE = "model.ckpt"
CHECKPOINT_PATTERN = r"^checkpoint-(\d+)$"

PathLike = Union[str, "os.PathLike[str]"]


def watchdog_resume(dirpath: Optional[PathLike],
                    mirror: Union[None, PathLike, Mirror] = None) -> Optional[str]:
    """The ``model.ckpt`` of the newest committed ``checkpoint-N`` in ``dirpath``, or None.

    ``model.ckpt`` is a file, or a directory when the strategy writes one (FSDP sharded,
    DeepSpeed): the marker covers every file under it either way.

    With ``mirror`` (the callback's): a newer committed checkpoint there is copied down into
    ``dirpath`` first, verified. Pass it to ``trainer.fit(..., ckpt_path=...)``; None starts
    from scratch.
    """
    found = restore_dir(mirror, dirpath, CHECKPOINT_PATTERN)
    # A file, or a directory: what FSDP (state_dict_type="sharded"), DeepSpeed or a CheckpointIO
    # plugin writes for one checkpoint path; ckpt_path takes either.
    if found is None or not (found.directory / CHECKPOINT_FILE).exists():
        return None
    return str(found.directory / CHECKPOINT_FILE)


def _raised_in_lightnings_broadcast(exception: BaseException) -> bool:
    """Whether Lightning raised ``exception`` after its SIGTERM broadcast and barrier."""
    tb = exception.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_broadcast_sigterm_tensor"


class WatchdogCallback(Callback):
    """A Lightning ``Callback`` that checkpoints and stops ``fit()`` as the watchdog asks.

    Args:
        dirpath: where the committed ``checkpoint-N/`` directories go.
        run_dir: the run directory shared with the daemon (default: as for ``Session``).
        checkpoint_every: seconds between periodic checkpoints (None: off).
        poll_interval, heartbeat_interval, handle_signals, sync_every, sync_interval_s: as for
            :class:`~session_watchdog.trainer.Session`.
        mirror: a second tier (a Drive / autodl-fs / NFS path, an fsspec URL, a ``Mirror``):
            every committed ``checkpoint-N/`` is copied there in the background and verified
            (integrations/_mirror.py); pass the same to ``watchdog_resume``.
        mirror_wait_s: the most seconds the final checkpoint and a stop wait for the mirror.

    Attributes:
        stopped: True once training stopped on request or signal after a committed checkpoint.
        session: the session while ``fit()`` runs.
        last_checkpoint: the newest checkpoint this callback committed.
    """

    def __init__(
        self,
        dirpath: PathLike,
        *,
        run_dir: Optional[RunDirLike] = None,
        checkpoint_every: Optional[float] = DEFAULT_CHECKPOINT_EVERY_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        handle_signals: bool = True,
        sync_every: int = DEFAULT_SYNC_EVERY,
        sync_interval_s: Optional[float] = DEFAULT_SYNC_INTERVAL_S,
        mirror: Union[None, PathLike, Mirror] = None,
        mirror_wait_s: float = DEFAULT_MIRROR_WAIT_S,
    ) -> None:
        super().__init__()
        self.dirpath = Path(os.path.abspath(dirpath))
        self._options = dict(run_dir=run_dir, checkpoint_every=checkpoint_every,
                             poll_interval=poll_interval, heartbeat_interval=heartbeat_interval,
                             handle_signals=handle_signals, sync_every=sync_every,
                             sync_interval_s=sync_interval_s, mirror=mirror,
                             mirror_wait_s=mirror_wait_s)
        self.session: Optional[FrameworkSession] = None
        self.stopped = False
        self.last_checkpoint: Optional[CommittedDir] = None
        self._last_step = -1
        self._deferred: Optional[_Flags] = None  # decided at an epoch's last batch

    # ---- hooks ---------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.session is not None:
            self.session.close()
        self.stopped = False
        self._deferred = None
        # Every rank builds it, inside the process group Lightning set up (collective).
        self.session = FrameworkSession(self.dirpath, **self._options)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.session is not None:
            self._last_step = int(trainer.global_step)
            self.session.begin(self._last_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating gradients: not an optimizer step
        self._last_step = step
        session = self.session
        if session is None or session._closed:
            return
        flags = session.at_step_end(step)
        if flags is None:
            return
        if flags.stop:
            trainer.should_stop = True
        if session._dist is None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Saved here, at an epoch's last batch, Lightning resumes the checkpoint as a
            # finished epoch while a StatefulDataLoader resumes its exhausted position: the next
            # epoch would be skipped (its own save_checkpoint here does the same). Saved at the
            # epoch's end (where ModelCheckpoint saves), it resumes exactly. Not under
            # torch.distributed: Lightning's SIGTERM may end rank 0 before the epoch's end.
            self._deferred = flags
            return
        self._save(trainer, flags)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        flags, self._deferred = self._deferred, None
        if flags is not None and self.session is not None and not self.session._closed:
            self._save(trainer, flags)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        session = self.session
        if session is None or session._closed:
            return
        saved = self._save(trainer, None, final=True)
        if saved is not None:
            session.finish(saved)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        session = self.session
        if session is None:
            return
        if isinstance(exception, SystemExit) and type(exception).__name__ == "SIGTERMException":
            # Lightning's own SIGTERM handling ends fit() at the next batch, on every rank
            # (rank 0's signal is broadcast): checkpoint now if no step end did, and exit as
            # "resumable".
            deferred, self._deferred = self._deferred, None
            if not session._closed and deferred is not None:
                self._save(trainer, deferred)  # decided at this epoch's last batch
            elif not session._closed:
                if session._dist is not None and not _raised_in_lightnings_broadcast(exception):
                    # Rank 0 (the signalled rank) raises at its batch end; the others raise at
                    # the next batch start after Lightning's barrier there
                    # (training_epoch_loop._broadcast_sigterm_tensor): meet them in it first.
                    import torch.distributed

                    torch.distributed.barrier()
                flags = session.stop_for_sigterm()
                if flags is not None and flags.stop:
                    self._save(trainer, flags)
            if session.stopped:
                exception.code = EXIT_STOPPED
                return
        if not session._closed:
            session.fail(exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.session is not None:
            self.session.close()

    # ---- saving --------------------------------------------------------------------------

    def _save(self, trainer: Any, flags: Optional[_Flags], *,
              final: bool = False) -> Optional[CommittedDir]:
        session = self.session
        assert session is not None
        step = int(trainer.global_step)
        directory = self.dirpath / f"checkpoint-{step}"
        session.saving(flags)
        try:
            if trainer.is_global_zero and directory.exists() and verify_dir(directory) is None:
                shutil.rmtree(directory)  # left by a save that was cut short: never reused
            trainer.save_checkpoint(str(directory / CHECKPOINT_FILE))  # every rank calls it
        except Exception as err:
            session.save_failed(err, final=final)
            return None
        saved = session.commit(directory, step=step, epoch=int(trainer.current_epoch),
                               final=final)
        if saved is not None:
            self.last_checkpoint = saved
            self.stopped = session.stopped
        return saved
