"""Exact DataLoader resume: continue a shuffled epoch at the batch after the checkpoint.

``session.track(loader)`` registers a data loader with a :class:`~session_watchdog.trainer.Session`;
its position is saved with every checkpoint and restored by ``session.resume()``, so the loop needs
no skip code of its own::

    loader = session.track(DataLoader(data, batch_size=32, shuffle=True, num_workers=2))
    start = session.resume()
    for epoch in session.epochs(num_epochs):
        for batch in loader:           # after a resume: the rest of the interrupted epoch
            ...
            session.step()

Two kinds of loader:

- torchdata's ``StatefulDataLoader`` (``pip install session-watchdog[data]``; the maintained
  PyTorch answer to mid-epoch resume): its own ``state_dict()`` / ``load_state_dict()``. It
  restores worker and sampler state too, so per-sample randomness in the workers resumes exactly;
  the restored iterator draws nothing from torch's global RNG (an uninterrupted run drew its seed
  before the checkpoint), so later ``torch.rand`` and dropout draws match too.
- a plain ``torch.utils.data.DataLoader`` over a map-style dataset: at each epoch start the tracked
  loader records the random states that decide the epoch's order (the generators of the loader,
  its sampler, its batch sampler and the batch sampler's inner sampler; torch's global RNG, which
  a sampler without a generator draws from; Python's and, when the program imported it, NumPy's
  global RNG, which samplers shuffling with ``random`` or ``np.random`` use); a checkpoint
  stores them with the number of batches handed out. On resume the order is drawn again from
  those states - indices only, no sample is loaded for a skipped batch - and the epoch goes
  on with the next batch, through a one-epoch DataLoader over the remaining index batches with
  the original's settings. The generators end the epoch where the uninterrupted run's did (all
  of the epoch's draws done) and the global RNGs are the checkpoint's. The order is drawn twice:
  a sampler drawing from a source none of these is (its own ``random.Random``) gives two orders,
  and the resume logs ``data_replay_inexact`` rather than going on silently in another order.
  Limit: worker processes see the remaining batches in a new round-robin order, so randomness
  drawn *inside* workers (random augmentation) is not reproduced; use a StatefulDataLoader, or
  derive it from the sample index, for that.

Everything here is plain data for ``torch.load(weights_only=True)``: tensors, ints, dicts.
"""

from __future__ import annotations

import logging
import random
import sys
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset

from session_watchdog.trainer.session_types import _event

__all__ = ["DataTrackError", "TrackedLoader", "is_stateful", "load_states", "track"]

_FORMAT = 1


class DataTrackError(ValueError):
    """A loader that cannot be tracked, or a saved position that does not fit it."""


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` saves its own position (torchdata's StatefulDataLoader and the like)."""
    return callable(getattr(loader, "state_dict", None)) \
        and callable(getattr(loader, "load_state_dict", None))


def _generator_state(gen: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    return None if gen is None else gen.get_state()


def _python_numpy_states() -> Dict[str, Any]:
    """Python's global RNG state and NumPy's (only when the program imported NumPy: never
    imported here), as tensors (``weights_only`` loading refuses NumPy arrays)."""
    version, internal, gauss = random.getstate()
    states: Dict[str, Any] = {"python": {"version": version, "gauss": gauss,
                                         "state": torch.tensor(internal, dtype=torch.int64)}}
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        states["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                           "pos": int(pos), "has_gauss": int(has_gauss),
                           "cached_gaussian": float(cached)}
    return states


def _set_python_numpy_states(states: Dict[str, Any]) -> None:
    """Set what :func:`_python_numpy_states` recorded (a state saved without them: nothing)."""
    python = states.get("python")
    if python is not None:
        random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy_state = states.get("numpy")
    np = sys.modules.get("numpy")
    if numpy_state is not None and np is not None:
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                             numpy_state["pos"], numpy_state["has_gauss"],
                             numpy_state["cached_gaussian"]))


class TrackedLoader:
    """A plain DataLoader that knows where it is in its epoch (see the module docstring).

    Iterate it like the loader it wraps; other attributes (``dataset``, ``batch_size``, ``len``)
    are the wrapped loader's.
    """

    def __init__(self, loader: DataLoader[Any]) -> None:
        if isinstance(loader.dataset, IterableDataset):
            raise DataTrackError(
                "track(): a DataLoader over an IterableDataset has no sampler to replay; use "
                "torchdata.stateful_dataloader.StatefulDataLoader (pip install "
                "'session-watchdog[data]')")
        if loader.batch_sampler is None:
            raise DataTrackError(
                "track(): the DataLoader has batch_size=None and no batch_sampler; give it a "
                "batch_size (or a batch_sampler) so its batches can be replayed")
        self.loader = loader
        self._epoch_start: Optional[Dict[str, Any]] = None  # RNG states at this epoch's start
        self._batch = 0  # batches handed out in the current epoch
        self._finished = True  # the current epoch ran out (or none started)
        self._resume: Optional[Dict[str, Any]] = None  # a saved position, used by the next iter
        self._inexact_logged = False  # the replay found a sampler it cannot replay (logged once)

    # ---- the training loop's side ---------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is not None and not resume["finished"] and resume["epoch_start"] is not None:
            return self._count(self._replay(resume), resume["epoch_start"], resume["batch"])
        states = self._epoch_start_states()  # before iter(): the iterator draws at once
        return self._count(iter(self.loader), states, 0)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _count(self, it: Iterator[Any], epoch_start: Dict[str, Any],
               batch: int) -> Iterator[Any]:
        self._epoch_start, self._batch, self._finished = epoch_start, batch, False
        for item in it:
            self._batch += 1  # counted before the loop body runs: a checkpoint after it sees it
            yield item
        self._finished = True

    # ---- saving and restoring -------------------------------------------------------------

    def _generators(self) -> Dict[str, Optional[torch.Generator]]:
        """The torch generators that can decide the order, each object once: the loader's, its
        sampler's, its batch sampler's own and the batch sampler's inner sampler's (a user's
        ``BatchSampler(RandomSampler(generator=g))``)."""
        loader = self.loader
        batch_sampler = loader.batch_sampler
        found: Dict[str, Optional[torch.Generator]] = {}
        for key, owner in (("loader", loader), ("sampler", loader.sampler),
                           ("batch_sampler", batch_sampler),
                           ("inner_sampler", getattr(batch_sampler, "sampler", None))):
            gen = getattr(owner, "generator", None)
            seen = any(gen is other for other in found.values())
            found[key] = gen if isinstance(gen, torch.Generator) and not seen else None
        return found

    def _set_generators(self, states: Dict[str, Any]) -> None:
        for key, gen in self._generators().items():
            saved = states.get(key)  # absent: a position saved before this generator was
            if gen is not None and saved is not None:
                gen.set_state(saved)

    def _states(self) -> Dict[str, Any]:
        states: Dict[str, Any] = {"global": torch.get_rng_state()}
        states.update((key, _generator_state(gen)) for key, gen in self._generators().items())
        return states

    def _epoch_start_states(self) -> Dict[str, Any]:
        """The states an epoch's order is drawn from: the generators and the global RNGs
        (torch's, Python's and, when the program imported it, NumPy's: samplers shuffle with
        ``random.shuffle`` or ``np.random.permutation`` too)."""
        states = self._states()
        states.update(_python_numpy_states())
        return states

    def state_dict(self) -> Dict[str, Any]:
        """The position: RNG states at the epoch's start, batches handed out, current states."""
        return {"format": _FORMAT, "kind": "plain", "epoch_start": self._epoch_start,
                "batch": self._batch, "finished": self._finished, "now": self._states()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue at ``state``'s position: the next ``iter()`` replays the rest of its epoch."""
        if state.get("format") != _FORMAT or state.get("kind") != "plain":
            raise DataTrackError("the checkpoint's data position was not saved for a plain "
                                 f"DataLoader (kind {state.get('kind')!r}); track the same kind "
                                 "of loader you trained with")
        self._set_generators(state["now"])
        self._resume = state
        self._epoch_start = state["epoch_start"]
        self._batch = int(state["batch"])
        self._finished = bool(state["finished"])

    def epoch_finished(self) -> bool:
        """After ``load_state_dict``: the saved position was past the end of its epoch."""
        return self._finished

    def _replay(self, state: Dict[str, Any]) -> Iterator[Any]:
        """An iterator over the rest of the saved epoch: the order drawn again, nothing loaded."""
        start, done = state["epoch_start"], int(state["batch"])
        now = {"global": torch.get_rng_state(), **_python_numpy_states()}  # resume() restored
        try:
            batches, seed_state = self._draw_epoch(start)
            # Drawn twice from the same states: an order that differs draws from a source not
            # saved (a sampler's own random.Random, a NumPy Generator): say so, once.
            again = self._draw_epoch(start)[0]
            if again != batches and not self._inexact_logged:
                self._inexact_logged = True
                _event(logging.WARNING, "data_replay_inexact",
                       sampler=type(self.loader.batch_sampler).__name__,
                       reason="the sampler draws from a random source the checkpoint does not "
                              "hold; the rest of this epoch is not the interrupted order (use "
                              "a torch.Generator, or a StatefulDataLoader with a stateful "
                              "sampler)")
            del again
        except BaseException:
            self._set_generators(state["now"])
            raise
        finally:
            # The generators stay where the whole epoch's draws leave them, as in an
            # uninterrupted run; the global RNGs go back to the checkpoint's states.
            torch.set_rng_state(now["global"])
            _set_python_numpy_states(now)
        del batches[:done]  # handed out before the checkpoint
        # The same worker seeds as the interrupted epoch: a generator in the state the original
        # drew its base seed from (the user's generators stay where they are).
        seed_gen = torch.Generator()
        seed_gen.set_state(seed_state)
        return iter(self._remaining_loader(batches, seed_gen))

    def _draw_epoch(self, start: Dict[str, Any]) -> Tuple[List[Any], torch.Tensor]:
        """The epoch's index batches drawn from its start states, and the base seed's state."""
        torch.set_rng_state(start["global"])
        _set_python_numpy_states(start)
        self._set_generators(start)
        gen = self.loader.generator
        # Draw in torch's own order: the iterator draws the workers' base seed
        # (torch/utils/data/dataloader.py, _BaseDataLoaderIter.__init__), then the sampler
        # draws its permutation at the first batch.
        seed_state = gen.get_state() if gen is not None else torch.get_rng_state()
        torch.empty((), dtype=torch.int64).random_(generator=gen)
        # All of it, now: a sampler draws lazily (RandomSampler draws once more when it runs
        # out), and every draw must come from the replayed states, none from the current.
        # Indices only: no sample is loaded.
        return list(self.loader.batch_sampler), seed_state  # type: ignore[arg-type]

    def _remaining_loader(self, batches: List[List[int]],
                          seed_gen: torch.Generator) -> DataLoader[Any]:
        loader = self.loader
        options: Dict[str, Any] = {
            "num_workers": loader.num_workers, "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory, "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn, "generator": seed_gen,
            "multiprocessing_context": loader.multiprocessing_context,
            "pin_memory_device": loader.pin_memory_device,
        }
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        if hasattr(loader, "in_order"):
            options["in_order"] = loader.in_order
        return DataLoader(loader.dataset, batch_sampler=_Remaining(batches), **options)


class _Remaining:
    """A batch sampler over the index batches left in an epoch being replayed."""

    def __init__(self, batches: List[List[int]]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


class _StatefulEntry:
    """A loader with its own ``state_dict`` (StatefulDataLoader), tracked as it is."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._finished = False

    def state_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "kind": "stateful", "state": self.loader.state_dict()}

    def epoch_finished(self) -> bool:
        """After ``load_state_dict``: the saved iterator had run out (torchdata's own flag)."""
        return self._finished

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != _FORMAT or state.get("kind") != "stateful":
            raise DataTrackError("the checkpoint's data position was saved for a plain "
                                 f"DataLoader (kind {state.get('kind')!r}), not for this "
                                 "StatefulDataLoader; track the same kind of loader")
        self.loader.load_state_dict(state["state"])
        inner = state["state"]
        self._finished = isinstance(inner, dict) and inner.get("_iterator_finished") is True
        _keep_global_rng_at_next_iterator(self.loader)


def _keep_global_rng_at_next_iterator(loader: Any) -> None:
    """Make the loader's next iterator, the restored one, draw nothing from torch's global RNG.

    torchdata's ``iter()`` builds the restored iterator through torch's
    ``_BaseDataLoaderIter.__init__``, which draws the workers' base seed again (from the global
    RNG when the loader has no generator); the interrupted run drew it before the checkpoint,
    whose global RNG state ``resume()`` restored, and the loaded state then overrides the new
    draw. Left alone, every later ``torch.rand`` and dropout mask would differ from an
    uninterrupted run's. ``StatefulDataLoader.__iter__`` calls ``self._get_iterator()``: an
    attribute of the instance, used once, wraps that one call. A later iterator (the next
    epoch's, when the saved one had finished) draws as it always does.
    """
    torchdata = any(cls.__module__.startswith("torchdata.") for cls in type(loader).__mro__)
    if not torchdata or "_get_iterator" in vars(loader) \
            or not callable(getattr(type(loader), "_get_iterator", None)):
        return  # another kind of loader, or already waiting for its next iterator
    ref = weakref.ref(loader)  # no cycle: a freed loader stops its workers at once

    def restored_iterator() -> Any:
        owner = ref()
        assert owner is not None  # called as the owner's method
        del owner._get_iterator  # once: back to the class's method
        global_state = torch.get_rng_state()
        try:
            return type(owner)._get_iterator(owner)
        finally:
            torch.set_rng_state(global_state)

    loader._get_iterator = restored_iterator


Tracked = Any  # TrackedLoader or _StatefulEntry


def track(loader: Any) -> Any:
    """The object that saves and restores ``loader``'s position, and the loader to iterate.

    Returns:
        ``(entry, iterable)``: ``entry`` has ``state_dict()`` / ``load_state_dict()``;
        ``iterable`` is what the training loop iterates (the StatefulDataLoader itself, or a
        :class:`TrackedLoader` around a plain DataLoader).

    Raises:
        DataTrackError: neither a StatefulDataLoader nor a DataLoader over a map-style dataset.
    """
    if isinstance(loader, TrackedLoader):
        return loader, loader
    if is_stateful(loader):
        return _StatefulEntry(loader), loader
    if isinstance(loader, DataLoader):
        tracked = TrackedLoader(loader)
        return tracked, tracked
    raise DataTrackError(f"track(): a {type(loader).__name__} is not a DataLoader; pass a "
                         "torch.utils.data.DataLoader or a torchdata StatefulDataLoader")


def load_states(entries: List[Tracked], states: Any) -> None:
    """Give each tracked loader its saved position (same order as they were tracked).

    Raises:
        DataTrackError: the checkpoint tracked a different number of loaders.
    """
    if not isinstance(states, list) or len(states) != len(entries):
        count = len(states) if isinstance(states, list) else 0
        raise DataTrackError(f"the checkpoint holds the position of {count} data loader(s), this "
                             f"session tracks {len(entries)}; track the same loaders, in the "
                             "same order, before resume()")
    for entry, state in zip(entries, states):
        entry.load_state_dict(state)


def between_epochs(entries: List[Tracked]) -> bool:
    """After :func:`load_states`: every loader had finished its epoch when the checkpoint was
    taken (a save after the epoch's loop: ``complete()``, a checkpoint between epochs), so the
    next epoch is the one to run, not the saved one again."""
    return bool(entries) and all(entry.epoch_finished() for entry in entries)
