"""Hugging Face ``transformers.Trainer``: checkpoint and stop when the watchdog asks.

Add two lines to a stock script (``pip install 'session-watchdog[hf]'``)::

    from session_watchdog.integrations.hf import WatchdogCallback, watchdog_resume

    watchdog = WatchdogCallback()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[watchdog])
    trainer.train(resume_from_checkpoint=watchdog_resume(args.output_dir))
    if watchdog.stopped:
        sys.exit(75)        # stopped on request after a committed checkpoint: resumable

What happens:

- ``on_step_end`` does what ``Session.step()`` does: one flag read (set by the poller that reads
  ``request.json``, by SIGTERM / SIGUSR1, or by the periodic timer); under torch.distributed the
  ranks agree at the same steps as with ``Session``. On a request it sets
  ``control.should_save`` (and ``control.should_training_stop`` for a stop);
- the Trainer writes ``checkpoint-N/`` as usual; ``on_save`` then commits that directory (sha256
  and fsync of every file, the marker ``WATCHDOG_COMMITTED.json`` written last, see
  ``_core``) and acknowledges in ``trainer.json`` (path, step, bytes, duration; step time is
  reported by the heartbeat). The Trainer's own scheduled saves are committed the same way;
- a stop ends ``trainer.train()`` normally, ``watchdog.stopped`` is True and the script exits
  with 75 (``EX_TEMPFAIL``: "try again later");
- the last step always saves (once: where the Trainer ends training, at ``on_epoch_end``, also
  when EarlyStoppingCallback ended it): its committed checkpoint makes the run ``completed`` in
  ``trainer.json`` (the watchdog may then end the runtime). With ``save_strategy="best"`` the
  Trainer may decline that save (no new best): the run completes on its newest committed
  checkpoint. A committed ``checkpoint-N`` is never saved into again. An exception that ends the script or
  the notebook cell reports ``failed``, and the runtime is never ended for it.
- ``watchdog_resume(output_dir)`` returns the newest *committed* ``checkpoint-N`` (one the process
  was killed in while the Trainer was writing it has no marker and is skipped), or None for a
  fresh start;
- ``WatchdogCallback(mirror="/content/drive/MyDrive/run1")`` copies every committed checkpoint
  there in the background, verified; ``watchdog_resume(output_dir, mirror=...)`` then copies the
  mirror's newest down when the local disk has nothing newer (a new runtime).

Keep ``save_total_limit`` at 2 or more (or None): the Trainer deletes old checkpoints *before* the
new one is committed, and with a limit of 1 a kill in between would leave no committed checkpoint
(a warning says so); with ``metric_for_best_model`` as well, the Trainer deletes the stop's
checkpoint when training ends, and the callback refuses to start (``ValueError``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Union

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from session_watchdog.integrations._core import CommittedDir, FrameworkSession
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
)

__all__ = ["EXIT_STOPPED", "WatchdogCallback", "watchdog_resume"]

CHECKPOINT_PATTERN = r"^checkpoint-(\d+)$"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def watchdog_resume(output_dir: Union[str, os.PathLike[str], None],
                    mirror: Union[None, str, os.PathLike[str], Mirror] = None) -> Optional[str]:
    """The newest committed ``checkpoint-N`` directory in ``output_dir``, or None (fresh start).

    With ``mirror`` (the callback's): when the mirror has a committed checkpoint newer than every
    local one (a new runtime's empty disk), it is copied down into ``output_dir`` first, verified.
    Pass it to ``trainer.train(resume_from_checkpoint=...)``; None starts from scratch.
    """
    found = restore_dir(mirror, output_dir, CHECKPOINT_PATTERN)
    return None if found is None else str(found.directory)


class WatchdogCallback(TrainerCallback):
    """A ``TrainerCallback`` that checkpoints and stops the Trainer as the watchdog asks.

    Args:
        run_dir: the run directory shared with the daemon (default: ``$SESSION_WATCHDOG_RUN_DIR``
            or the per-user default, as for ``Session``).
        checkpoint_every: seconds between periodic checkpoints (None: off).
        poll_interval, heartbeat_interval, handle_signals, sync_every, sync_interval_s: as for
            :class:`~session_watchdog.trainer.Session`.
        mirror: a second tier (a Drive / autodl-fs / NFS path, an fsspec URL, a ``Mirror``):
            every committed ``checkpoint-N/`` is copied there in the background and verified
            (integrations/_mirror.py); pass the same to ``watchdog_resume``.
        mirror_wait_s: the most seconds the final checkpoint and a stop wait for the mirror.

    Attributes:
        stopped: True once training stopped on request or signal after a committed checkpoint.
        session: the session while training runs (None before ``train()``).
        last_checkpoint: the newest checkpoint this callback committed.
    """

    def __init__(
        self,
        *,
        run_dir: Optional[RunDirLike] = None,
        checkpoint_every: Optional[float] = DEFAULT_CHECKPOINT_EVERY_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        handle_signals: bool = True,
        sync_every: int = DEFAULT_SYNC_EVERY,
        sync_interval_s: Optional[float] = DEFAULT_SYNC_INTERVAL_S,
        mirror: Union[None, str, os.PathLike[str], Mirror] = None,
        mirror_wait_s: float = DEFAULT_MIRROR_WAIT_S,
    ) -> None:
        self._options = dict(run_dir=run_dir, checkpoint_every=checkpoint_every,
                             poll_interval=poll_interval, heartbeat_interval=heartbeat_interval,
                             handle_signals=handle_signals, sync_every=sync_every,
                             sync_interval_s=sync_interval_s, mirror=mirror,
                             mirror_wait_s=mirror_wait_s)
        self.session: Optional[FrameworkSession] = None
        self.stopped = False
        self.last_checkpoint: Optional[CommittedDir] = None
        self._final_saved: Optional[CommittedDir] = None
        self._stopping = False  # the watchdog asked this run to stop

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        if args.save_total_limit == 1 and args.metric_for_best_model is not None:
            # Trainer._finalize_training deletes every checkpoint but the best one when
            # training ends: the checkpoint a stop acknowledged would be gone.
            raise ValueError("save_total_limit=1 with metric_for_best_model (or "
                             "load_best_model_at_end): the Trainer deletes the watchdog's stop "
                             "checkpoint when training ends; set save_total_limit=2 or more")
        if args.save_total_limit == 1:
            warnings.warn("save_total_limit=1: the Trainer deletes the previous committed "
                          "checkpoint before the new one is committed (a kill in between leaves "
                          "none); set save_total_limit=2 or more", stacklevel=2)
        self.stopped = False
        self._final_saved = None
        self._stopping = False
        self.last_checkpoint = None
        if self.session is not None:
            self.session.close()
        # Every rank builds it (under torchrun: collectively), after the process group exists.
        self.session = FrameworkSession(args.output_dir, **self._options)  # type: ignore[arg-type]
        self.session.begin(state.global_step)
        self.session.watch_for_crash()

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> TrainerControl:
        session = self.session
        if session is None or session._closed:
            return control
        if session.save_pending:
            # Asked at the previous step end, but the Trainer did not save (save_strategy="best"
            # overrides should_save with its metric): report it; the request is tried again.
            session.save_failed(RuntimeError("the Trainer did not save when asked (it overrides "
                                             "should_save with save_strategy='best')"))
            if session._closed:
                return control
        flags = session.at_step_end(state.global_step)
        if flags is not None:
            control.should_save = True
            if flags.stop:
                control.should_training_stop = True
                self._stopping = True
        if control.should_save:
            session.saving(flags)
        # The last step's save is made sure of in on_epoch_end: HF calls it after the loop
        # breaks, and it may save there itself (save_strategy="epoch"), evaluate and log.
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> TrainerControl:
        # Runs after DefaultFlowCallback, before the Trainer's last log/evaluate/save of the
        # epoch (Trainer._maybe_log_save_evaluate), also when a stop or max_steps broke the loop.
        saved = self.last_checkpoint
        if saved is not None and saved.step == state.global_step:
            # Committed at this step already (a stop, the final save, or a request): a second
            # save would rewrite the acknowledged directory in place (trainer_state.json changes
            # with an epoch's log or eval) and it would no longer verify.
            control.should_save = False
            if args.save_strategy == "best":
                control.should_evaluate = False  # its new best would set should_save again
            return control
        session = self.session
        if session is None or session._closed or not control.should_training_stop:
            return control
        # Training ends here without a checkpoint at this step yet: the stop's save (the
        # Trainer declined it at the step end: save_strategy="best" with no new best) or the
        # final save that completes the run (also when EarlyStoppingCallback ended it).
        control.should_save = True
        if args.save_strategy == "best" and self._stopping:
            control.should_evaluate = False  # a partial epoch's eval would override the save
        session.saving(None)
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        session = self.session
        if session is None or session._closed:
            return
        directory = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        # Training ends after this save (max_steps, another callback such as
        # EarlyStoppingCallback, set before the save): it is the final checkpoint, unless the
        # watchdog asked for the stop before the last step.
        final = control.should_training_stop and (not self._stopping
                                                  or state.global_step >= state.max_steps)
        saved = session.commit(directory, step=state.global_step, epoch=int(state.epoch or 0),
                               final=final)
        if saved is None:
            return
        self.last_checkpoint = saved
        if final:
            self._final_saved = saved
        self.stopped = session.stopped

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        session = self.session
        if session is None or session._closed:
            return
        if self._final_saved is not None:
            session.finish(self._final_saved)
        elif (args.save_strategy == "best" and self.last_checkpoint is not None
              and not self._stopping and state.global_step >= state.max_steps):
            # The Trainer declined the final save (save_strategy="best", the last eval no new
            # best: it overrides should_save after every callback): the run completed, its
            # checkpoints are the best ones it chose to keep.
            session.finish(self.last_checkpoint)
        else:  # training ended without its final checkpoint committed (the save failed)
            session.fail(RuntimeError("training ended without a committed final checkpoint"))
