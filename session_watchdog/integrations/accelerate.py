"""Accelerate: a Session whose checkpoints are ``accelerator.save_state`` directories, committed.

``pip install 'session-watchdog[hf]'`` (accelerate comes with it)::

    from session_watchdog.integrations.accelerate import AcceleratorSession

    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    with AcceleratorSession(accelerator, "checkpoints/") as session:
        start = session.resume()                       # accelerator.load_state(newest committed)
        for epoch in session.epochs(num_epochs):
            batches = (accelerator.skip_first_batches(loader, start.batch)
                       if epoch == start.epoch else loader)
            for batch in batches:
                ...                                    # forward, accelerator.backward, step
                session.step()
        session.complete()

It is a :class:`~session_watchdog.trainer.Session` in every other way (flags, poller, signals,
periodic checkpoints, acks, ``run.lock`` / ``save.lock``, the ranks' agreement, exit code 75 on a
stop), except that a checkpoint is ``accelerator.save_state(<dir>/checkpoint-N)`` - model,
optimizer, scheduler, scaler, RNG states and registered objects, as Accelerate saves them - plus
our ``watchdog_state.json`` (epoch, step), committed with the marker written last. ``resume()``
loads the newest committed directory with ``accelerator.load_state``; ``Start.batch`` batches of
``Start.epoch`` are done: ``accelerator.skip_first_batches`` skips them. Keeps the newest ``keep``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional, Union

from session_watchdog import channel
from session_watchdog.integrations._core import (
    COMMIT_MARKER,
    CommittedDir,
    FrameworkSession,
    verify_dir,
)
from session_watchdog.integrations._mirror import restore_dir
from session_watchdog.trainer.session import (
    SessionExit,
    Start,
    StopTraining,
    _event,
    _Flags,
)

__all__ = ["AcceleratorSession"]

STATE_FILE = "watchdog_state.json"
CHECKPOINT_PATTERN = r"^checkpoint-(\d+)$"


class AcceleratorSession(FrameworkSession):
    """A Session that saves with ``accelerator.save_state`` (see the module docstring).

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared the model and optimizer.
        checkpoint_dir: where the committed ``checkpoint-N/`` directories go.
        exit_on_stop: as for Session (True: scripts exit 75 on a stop).
        **kwargs: the other Session options (run_dir, keep, checkpoint_every, ...); model,
            optimizer etc. are Accelerate's to save.
    """

    def __init__(self, accelerator: Any, checkpoint_dir: Union[str, os.PathLike[str]], *,
                 exit_on_stop: bool = True, **kwargs: Any) -> None:
        self.accelerator = accelerator
        super().__init__(checkpoint_dir, exit_on_stop=exit_on_stop, **kwargs)
        self._keep_dirs = int(kwargs.get("keep", 2))

    # ---- the training loop's side ----------------------------------------------------------

    def step(self) -> None:
        """Count one optimizer step; at a flagged boundary save, acknowledge or stop."""
        self._step += 1
        if self._pending or self._step >= self._sync_at:
            flags = self._decide()
            if flags is not None:
                self._act_on(flags)

    def resume(self, map_location: Any = "cpu") -> Start:
        """Load the newest committed directory with ``accelerator.load_state``, or start fresh."""
        found = self._choose()
        if found is None:
            self.begin(self._step)
            _event(logging.INFO, "fresh_start", checkpoint_dir=str(self.checkpoint_dir))
            return Start(epoch=self._epoch, step=self._step, elapsed_s=self._elapsed_base,
                         resumed=False, path=None)
        self.accelerator.load_state(str(found.directory))
        meta = json.loads((found.directory / STATE_FILE).read_text())
        self._epoch = int(meta["epoch"])
        self._epoch_start_step = int(meta["epoch_start_step"])
        self._elapsed_base = float(meta.get("elapsed_s", 0.0))
        self.extras = dict(meta.get("extras") or {})
        self.begin(int(meta["step"]))
        self._last_checkpoint = None
        start = Start(epoch=self._epoch, step=self._step, elapsed_s=self._elapsed_base,
                      resumed=True, path=found.directory, batch=self._step - self._epoch_start_step,
                      extras=self.extras)
        _event(logging.INFO, "resumed", path=str(found.directory), epoch=start.epoch,
               step=start.step, batch=start.batch)
        return start

    def _choose(self) -> Optional[CommittedDir]:
        """The committed directory every rank loads. With mirror=: a newer committed directory
        there comes down first (a new runtime). Under torch.distributed rank 0 (the only one
        with the mirror) chooses, the others take that one from the directory they share:
        ranks never resume different steps."""
        agreement = self._dist
        if agreement is None:
            return restore_dir(self._mirror, self.checkpoint_dir, CHECKPOINT_PATTERN)
        chosen: Optional[CommittedDir] = None
        outcome: Any = None
        if agreement.rank == 0:
            try:
                chosen = restore_dir(self._mirror, self.checkpoint_dir, CHECKPOINT_PATTERN)
                outcome = ("ok", None if chosen is None else chosen.directory.name)
            except Exception as err:  # every rank must hear of it
                outcome = ("error", f"{type(err).__name__}: {err}")
        outcome = agreement.broadcast(outcome)
        if outcome[0] == "error":
            raise OSError(f"rank 0 could not choose a checkpoint to resume from: {outcome[1]}")
        name = outcome[1]
        if name is None:
            return None
        found = chosen if agreement.rank == 0 else verify_dir(self.checkpoint_dir / name)
        if not agreement.all_ok(found is not None):
            raise OSError(f"a rank could not read the committed {self.checkpoint_dir / name} "
                          "rank 0 resumes from; every rank must see the checkpoint directory "
                          "(a filesystem all ranks share)")
        return found

    def checkpoint(self, reason: str = "manual") -> CommittedDir:  # type: ignore[override]
        """Save a committed checkpoint now (every process calls it)."""
        self._ensure_open()
        saved = self._save_state(None)
        if saved is None:
            raise OSError(f"checkpoint at step {self._step} failed: {self._extra.get('last_error')}")
        return saved

    def complete(self) -> CommittedDir:  # type: ignore[override]
        """Final committed checkpoint, then ``state=completed`` and close."""
        self._ensure_open()
        saved = self._save_state(None, final=True)
        if saved is None:
            raise OSError(f"final checkpoint failed: {self._extra.get('error')}")
        self.finish(saved)
        return saved

    # ---- saving ------------------------------------------------------------------------------

    def _act_on(self, flags: _Flags) -> None:
        saved = self._save_state(flags)
        if not flags.stop:
            return
        if saved is None:
            raise OSError(f"stop checkpoint failed: {self._extra.get('error')}")
        if self.exit_on_stop:
            raise SessionExit(flags.reason, saved)  # type: ignore[arg-type]
        raise StopTraining(flags.reason, saved)  # type: ignore[arg-type]

    def _save_state(self, flags: Optional[_Flags], *, final: bool = False) -> Optional[CommittedDir]:
        accelerator = self.accelerator
        directory = self.checkpoint_dir / f"checkpoint-{self._step}"
        self.saving(flags)
        try:
            if accelerator.is_main_process and directory.exists() and verify_dir(directory) is None:
                shutil.rmtree(directory)  # left by a save that was cut short: never reused
            accelerator.wait_for_everyone()
            accelerator.save_state(str(directory))
            if accelerator.is_main_process:
                channel.write_json(directory / STATE_FILE, {
                    "epoch": self._epoch, "step": self._step,
                    "epoch_start_step": self._epoch_start_step, "elapsed_s": self.elapsed_s,
                    "extras": self.extras})
        except Exception as err:
            self.save_failed(err, final=final)
            return None
        saved = self.commit(directory, step=self._step, epoch=self._epoch, final=final)
        if saved is not None and accelerator.is_main_process:
            self._prune_dirs(saved)
        return saved

    def _prune_dirs(self, newest: CommittedDir) -> None:
        """Keep the newest ``keep`` committed directories (by marker; older ones go)."""
        committed = []
        for name in os.listdir(self.checkpoint_dir):
            if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() \
                    and (self.checkpoint_dir / name / COMMIT_MARKER).exists():
                committed.append((int(name[len("checkpoint-"):]), name))
        for _step, name in sorted(committed, reverse=True)[self._keep_dirs:]:
            doomed = self.checkpoint_dir / name
            if doomed == newest.directory:
                continue
            try:
                os.unlink(doomed / COMMIT_MARKER)  # uncommitted first: a cut-short removal is ignored
            except FileNotFoundError:
                pass
            shutil.rmtree(doomed, ignore_errors=True)

