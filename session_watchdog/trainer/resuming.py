"""Resuming: the newest verified checkpoint back into the model, optimizer, RNG and data loaders.

``track()`` registers the loaders whose position travels with every checkpoint; ``resume()``
loads the newest verified checkpoint (after copying a newer one down from the mirror): this
process alone, the file rank 0 chose on every rank (DDP), or the ranks' shards. A part of
``Session`` (session.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

from session_watchdog.trainer.flags import _FlagsMixin
from session_watchdog.trainer.session_types import _SESSION_EXTRAS_KEY, Start, _event
from session_watchdog.trainer.status import _info

if TYPE_CHECKING:  # torch is imported with the checkpoint module, only when a Session is built
    from session_watchdog.trainer.checkpoint import SavedCheckpoint
    from session_watchdog.trainer.sharded import ShardedCheckpoint


class _ResumingMixin(_FlagsMixin):
    """``track()`` and ``resume()``: continue where the newest verified checkpoint left off."""

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

            data.load_states(self._tracked, self._own_loader_states(ours))
            if step > self._epoch_start_step and data.between_epochs(self._tracked):
                # Saved after the epoch's loop ended: that epoch is done, resume at the next one
                # (else epochs() would run the saved epoch a second time). A loader reads as
                # finished before its epoch's loop too: saved when epochs() had just set the
                # epoch, no step counted in it yet, that epoch is still to run.
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

    def _own_loader_states(self, ours: Dict[str, Any]) -> Any:
        """This rank's saved loader positions: its own under DDP or sharded saves (ranks seeded
        differently shuffle differently), else the single list a process saved."""
        per_rank = ours.get("rank_loaders")
        if self._dist is None or per_rank is None:
            return ours.get("loaders")
        if isinstance(per_rank, list) and len(per_rank) == self._dist.world_size:
            return per_rank[self._dist.rank]
        _event(logging.WARNING, "loaders_not_restored", rank=self._dist.rank,
               reason="checkpoint from another world size: rank 0's loader positions are used")
        return ours.get("loaders")

    def _restore_rng(self, rng: Dict[str, Any]) -> None:
        self._ckpt.restore_state({"format": self._ckpt.STATE_FORMAT, "rng": rng, "epoch": 0,
                                  "step": 0, "elapsed_s": 0.0})
