"""Exact DataLoader resume: ``session.track(loader)`` continues a shuffled epoch bit for bit."""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from torch_helpers import assert_same

from session_watchdog.trainer import Session
from session_watchdog.trainer.data import DataTrackError, TrackedLoader

EPOCHS = 3
SAMPLES = 96
BATCH = 8  # 12 batches per epoch, 36 steps in all


class Indexed(Dataset[Tuple[torch.Tensor, torch.Tensor, int]]):
    """Fixed features and targets; each sample also returns its index (to check the order)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, 6, generator=gen)
        self.y = torch.randn(SAMPLES, 1, generator=gen)
        self.loaded: List[int] = []  # indices loaded in this process (num_workers=0 only)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        self.loaded.append(index)
        return self.x[index], self.y[index], index


class GlobalShuffle:
    """Index batches shuffled with Python's or NumPy's global RNG at each epoch's start."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __iter__(self) -> Iterator[List[int]]:
        if self.source == "numpy":
            order = [int(i) for i in np.random.permutation(SAMPLES)]
        else:
            order = list(range(SAMPLES))
            random.shuffle(order)
        return iter([order[i:i + BATCH] for i in range(0, SAMPLES, BATCH)])

    def __len__(self) -> int:
        return SAMPLES // BATCH


class OwnRandomShuffle:
    """Index batches shuffled with a random.Random of its own (no checkpoint holds it)."""

    def __init__(self) -> None:
        self.rng = random.Random(11)

    def __iter__(self) -> Iterator[List[int]]:
        order = list(range(SAMPLES))
        self.rng.shuffle(order)
        return iter([order[i:i + BATCH] for i in range(0, SAMPLES, BATCH)])

    def __len__(self) -> int:
        return SAMPLES // BATCH


@contextlib.contextmanager
def capture_events() -> Iterator[List[logging.LogRecord]]:
    """The session's log records (``record.event``, ``record.fields``) while the block runs."""
    records: List[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("session_watchdog.trainer.session")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def build(seed: int) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


LoaderFactory = Callable[[Indexed], Any]


def plain_loader(data: Indexed, workers: int = 2) -> DataLoader[Any]:
    return DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(7))


def workerless(kind: str, data: Indexed) -> Any:
    """A shuffled loader without workers: a plain DataLoader or torchdata's StatefulDataLoader."""
    if kind == "plain":
        return plain_loader(data, workers=0)
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    return stateful.StatefulDataLoader(data, batch_size=BATCH, shuffle=True, num_workers=0,
                                       generator=torch.Generator().manual_seed(7))


def train(tmp: Path, make_loader: LoaderFactory, stop_at: Optional[int]) -> Tuple[
        torch.nn.Module, List[int], bool]:
    """Run (or resume) training; leave after step ``stop_at`` with a checkpoint (a kill after it)."""
    model, opt = build(seed=0)
    session = Session(tmp / "ckpt", model=model, optimizer=opt, run_dir=tmp / "run",
                      checkpoint_every=None, handle_signals=False, keep=1)
    seen: List[int] = []
    try:
        loader = session.track(make_loader(Indexed()))
        session.resume()
        for _epoch in session.epochs(EPOCHS):
            for x, y, index in loader:
                seen.extend(int(i) for i in index)
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                session.step()
                if stop_at is not None and session.global_step == stop_at:
                    session.checkpoint("test")
                    return model, seen, False
        return model, seen, True
    finally:
        session.close()


def interrupted_run(tmp: Path, make_loader: LoaderFactory, stops: List[int]) -> Tuple[
        torch.nn.Module, List[int]]:
    seen: List[int] = []
    for stop_at in [*stops, None]:
        model, part, done = train(tmp, make_loader, stop_at)
        seen.extend(part)
    assert done
    return model, seen


class TestExactResume:
    @pytest.mark.parametrize("kind", ["plain", "stateful"])
    def test_ten_random_interruptions_resume_bit_identically(self, tmp_path: Path,
                                                             kind: str) -> None:
        """A shuffled 2-worker loader interrupted at 10 random steps sees the same batches in the
        same order and ends with the same weights as an uninterrupted run."""
        if kind == "stateful":
            stateful = pytest.importorskip("torchdata.stateful_dataloader")

            def make_loader(data: Indexed) -> Any:
                return stateful.StatefulDataLoader(data, batch_size=BATCH, shuffle=True,
                                                   num_workers=2,
                                                   generator=torch.Generator().manual_seed(7))
        else:
            make_loader = plain_loader
        reference, expected = train(tmp_path / "a", make_loader, None)[:2]
        total = EPOCHS * SAMPLES // BATCH
        stops = sorted(random.Random(kind).sample(range(1, total), 10))
        model, seen = interrupted_run(tmp_path / "b", make_loader, stops)
        assert seen == expected
        assert_same(model.state_dict(), reference.state_dict(), "weights")

    @pytest.mark.parametrize("workers", [0, 2])
    def test_a_stateful_loader_without_generator_keeps_the_global_rng_stream(
            self, tmp_path: Path, workers: int) -> None:
        """A StatefulDataLoader drawing its seeds from torch's global RNG, interrupted mid-epoch
        and at an epoch's end: the resumed runs draw the same dropout masks as an uninterrupted
        run (same batches, same weights): the restored iterator takes no extra global draw."""
        stateful = pytest.importorskip("torchdata.stateful_dataloader")

        def make_loader(data: Indexed) -> Any:
            return stateful.StatefulDataLoader(data, batch_size=BATCH, shuffle=True,
                                               num_workers=workers)

        reference, expected = train(tmp_path / "a", make_loader, None)[:2]
        model, seen = interrupted_run(tmp_path / "b", make_loader, [5, 12, 20])
        assert seen == expected
        assert_same(model.state_dict(), reference.state_dict(), "weights")

    @pytest.mark.parametrize("kind", ["plain", "stateful"])
    def test_a_checkpoint_after_an_epoch_resumes_at_the_next_epoch(self, tmp_path: Path,
                                                                  kind: str) -> None:
        """A run that saved after its epoch loop ended (complete() after 1 epoch) and is resumed
        for 3 epochs trains epochs 1 and 2 only; a plain loader also sees an uninterrupted run's
        order and ends with its weights (torchdata 0.11 itself draws another order for the epoch
        after a state saved at an epoch's end, with or without a restart of ours)."""
        def make(data: Indexed) -> Any:
            if kind == "plain":
                return plain_loader(data, workers=0)
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(data, batch_size=BATCH, shuffle=True, num_workers=0,
                                      generator=torch.Generator().manual_seed(7))

        def run(tmp: Path, epochs: int) -> Tuple[torch.nn.Module, List[int], int]:
            model, opt = build(seed=0)
            session = Session(tmp / "ckpt", model=model, optimizer=opt, run_dir=tmp / "run",
                              checkpoint_every=None, handle_signals=False, keep=1)
            seen: List[int] = []
            with session:
                loader = session.track(make(Indexed()))
                start = session.resume()
                for _epoch in session.epochs(epochs):
                    for x, y, index in loader:
                        seen.extend(int(i) for i in index)
                        loss = torch.nn.functional.mse_loss(model(x), y)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        session.step()
                session.complete(end_runtime_after="complete")
            return model, seen, start.epoch

        steps = SAMPLES // BATCH
        _, first, _ = run(tmp_path / "a", 1)
        resumed, rest, start_epoch = run(tmp_path / "a", 3)
        whole, everything, _ = run(tmp_path / "b", 3)
        assert (len(first), len(rest), start_epoch) == (steps * BATCH, 2 * steps * BATCH, 1)
        if kind == "plain":
            assert first + rest == everything
            assert_same(resumed.state_dict(), whole.state_dict(), "weights")

    @pytest.mark.parametrize("kind", ["plain", "stateful"])
    def test_a_checkpoint_at_an_epoch_start_resumes_that_epoch(self, tmp_path: Path,
                                                              kind: str) -> None:
        """A checkpoint saved as epochs() began epoch 1 (before its loop; the loader had finished
        epoch 0), then a crash inside epoch 1: resume() starts at epoch 1, batch 0, and trains
        it whole; a plain loader also sees the uninterrupted order and ends with its weights."""
        def run(tmp: Path, crash_in: Optional[int]) -> Tuple[torch.nn.Module, List[int], int]:
            model, opt = build(seed=0)
            session = Session(tmp / "ckpt", model=model, optimizer=opt, run_dir=tmp / "run",
                              checkpoint_every=None, handle_signals=False, keep=1)
            seen: List[int] = []
            with session:
                loader = session.track(workerless(kind, Indexed()))
                start = session.resume()
                for epoch in session.epochs(EPOCHS):
                    session.checkpoint("epoch start")
                    for x, y, index in loader:
                        seen.extend(int(i) for i in index)
                        loss = torch.nn.functional.mse_loss(model(x), y)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        session.step()
                        if epoch == crash_in:
                            return model, seen, start.epoch  # a crash: no save after this step
            return model, seen, start.epoch

        per_epoch = SAMPLES
        _, crashed, _ = run(tmp_path / "a", crash_in=1)
        resumed, rest, start_epoch = run(tmp_path / "a", crash_in=None)
        whole, everything, _ = run(tmp_path / "b", crash_in=None)
        assert (len(crashed), start_epoch) == (per_epoch + BATCH, 1)
        assert len(rest) == (EPOCHS - 1) * per_epoch  # epochs 1 and 2, none skipped
        if kind == "plain":
            assert crashed[:per_epoch] + rest == everything
            assert_same(resumed.state_dict(), whole.state_dict(), "weights")

    def test_a_generator_inside_a_users_batch_sampler_is_replayed(self, tmp_path: Path) -> None:
        """batch_sampler=BatchSampler(RandomSampler(generator=g)): a run interrupted mid-epoch
        and at an epoch's end sees the uninterrupted order and ends with its weights."""
        def make_loader(data: Indexed) -> DataLoader[Any]:
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(5))
            return DataLoader(data, batch_sampler=BatchSampler(sampler, BATCH, drop_last=False))

        reference, expected = train(tmp_path / "a", make_loader, None)[:2]
        model, seen = interrupted_run(tmp_path / "b", make_loader, [5, 12, 20])
        assert seen == expected
        assert_same(model.state_dict(), reference.state_dict(), "weights")

    @pytest.mark.parametrize("source", ["python", "numpy"])
    def test_a_sampler_shuffling_with_a_global_rng_is_replayed(self, tmp_path: Path,
                                                             source: str) -> None:
        """A batch sampler shuffling with random.shuffle or np.random.permutation at each epoch:
        a run interrupted mid-epoch and at an epoch's end sees every sample once per epoch, in
        the uninterrupted order, and ends with its weights; nothing is reported."""
        def make_loader(data: Indexed) -> DataLoader[Any]:
            random.seed(3)
            np.random.seed(3)
            return DataLoader(data, batch_sampler=GlobalShuffle(source))

        reference, expected = train(tmp_path / "a", make_loader, None)[:2]
        with capture_events() as events:
            model, seen = interrupted_run(tmp_path / "b", make_loader, [5, 12, 20])
        assert seen == expected
        assert sorted(seen[:SAMPLES]) == list(range(SAMPLES))
        assert_same(model.state_dict(), reference.state_dict(), "weights")
        assert not [e for e in events if getattr(e, "event", None) == "data_replay_inexact"]

    def test_a_sampler_with_a_random_source_not_saved_is_reported_once(self,
                                                                       tmp_path: Path) -> None:
        """A batch sampler shuffling with its own random.Random cannot be replayed: resume()
        logs data_replay_inexact once, naming the sampler."""
        def make_loader(data: Indexed) -> DataLoader[Any]:
            return DataLoader(data, batch_sampler=OwnRandomShuffle())

        train(tmp_path, make_loader, 5)
        with capture_events() as events:
            train(tmp_path, make_loader, None)
        found = [e.fields for e in events  # type: ignore[attr-defined]
                 if getattr(e, "event", None) == "data_replay_inexact"]
        assert len(found) == 1 and found[0]["sampler"] == "OwnRandomShuffle"

    def test_skipped_batches_are_never_loaded(self, tmp_path: Path) -> None:
        """Resuming at batch 7 of an epoch loads only the samples of batches 7 onwards."""
        train(tmp_path, lambda d: plain_loader(d, workers=0), 12 + 7)
        model, opt = build(seed=0)
        session = Session(tmp_path / "ckpt", model=model, optimizer=opt,
                          run_dir=tmp_path / "run", checkpoint_every=None, handle_signals=False)
        try:
            data = Indexed()
            loader = session.track(plain_loader(data, workers=0))
            start = session.resume()
            assert (start.epoch, start.step) == (1, 19)
            first = next(iter(loader))
            assert len(data.loaded) == BATCH and data.loaded == [int(i) for i in first[2]]
        finally:
            session.close()

    def test_a_loader_over_an_iterable_dataset_is_refused(self, tmp_path: Path) -> None:
        """A plain DataLoader over an IterableDataset cannot be replayed: a clear error names the fix."""

        class Stream(torch.utils.data.IterableDataset[int]):
            def __iter__(self) -> Any:
                return iter(range(4))

        session = Session(tmp_path / "ckpt", run_dir=tmp_path / "run", checkpoint_every=None,
                          handle_signals=False)
        try:
            with pytest.raises(DataTrackError, match="StatefulDataLoader"):
                session.track(DataLoader(Stream(), batch_size=2))
        finally:
            session.close()

    def test_resume_without_the_tracked_loader_is_refused(self, tmp_path: Path) -> None:
        """A checkpoint that carries one loader's position cannot resume a session tracking none...
        or two: resume() says to track the same loaders."""
        train(tmp_path, plain_loader, 5)
        model, opt = build(seed=0)
        session = Session(tmp_path / "ckpt", model=model, optimizer=opt,
                          run_dir=tmp_path / "run", checkpoint_every=None, handle_signals=False)
        try:
            session.track(plain_loader(Indexed()))
            session.track(plain_loader(Indexed()))
            with pytest.raises(DataTrackError, match="1 data loader"):
                session.resume()
        finally:
            session.close()

    def test_tracked_loader_reads_like_the_loader(self) -> None:
        """The wrapper has the loader's length and attributes."""
        loader = plain_loader(Indexed(), workers=0)
        tracked = TrackedLoader(loader)
        assert (len(tracked), tracked.batch_size, tracked.dataset) == (12, BATCH, loader.dataset)

    def test_a_closed_session_keeps_no_loader_alive(self, tmp_path: Path) -> None:
        """After close(), a tracked StatefulDataLoader (and its live iterator with worker processes)
        is freed as soon as the caller drops it, not at a later garbage collection that waits for
        its workers."""
        stateful = pytest.importorskip("torchdata.stateful_dataloader")
        session = Session(tmp_path / "ckpt", run_dir=tmp_path / "run", checkpoint_every=None,
                          handle_signals=False)
        loader = session.track(stateful.StatefulDataLoader(Indexed(), batch_size=BATCH))
        next(iter(loader))  # the loader now holds its iterator
        session.close()
        ref = weakref.ref(loader)
        gc.disable()
        try:
            del loader
            assert ref() is None
        finally:
            gc.enable()
