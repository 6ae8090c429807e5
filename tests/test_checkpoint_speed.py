"""The mechanisms behind checkpoint speed (issue 17), as behaviour: what an async save copies and
reuses, what prepare_async pages in, and that a large save starts the disk before its fsync.
No test asserts on time; benchmarks/bench_checkpoint.py measures the speed itself.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from session_watchdog.trainer import buffers, checkpoint_dir, checkpoint_write
from session_watchdog.trainer.checkpoint import CheckpointManager
from session_watchdog.trainer.session import Session


def odd_state() -> Dict[str, Any]:
    """Tensors of every shape the snapshot copy must handle: contiguous, views with a storage
    offset, transposed (non-contiguous), bfloat16, int64, empty, a 0-d scalar, tied twice."""
    base = torch.arange(4096, dtype=torch.float32)
    matrix = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)
    tied = torch.linspace(-1, 1, 300)
    return {
        "model": {
            "plain": base.clone(),
            "offset_view": base[100:900],
            "transposed": matrix.t(),
            "bf16": torch.linspace(0, 5, 777).to(torch.bfloat16),
            "ints": torch.arange(50, dtype=torch.int64) * 7,
            "empty": torch.empty(0),
            "scalar": torch.tensor(3.5),
            "tied_a": tied,
            "tied_b": tied,
        },
        "optimizer": {"state": [torch.full((1000,), 0.25), torch.full((3, 5), -2.0)]},
        "step": 12,
    }


def assert_same(loaded: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(loaded, torch.Tensor)
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert torch.equal(loaded, expected)
    elif isinstance(expected, dict):
        assert set(loaded) == set(expected)
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, list):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            assert_same(a, b)
    else:
        assert loaded == expected


def buffer_addresses(manager: CheckpointManager) -> Dict[Tuple[Any, ...], int]:
    return {path: buf.data_ptr() for path, buf in manager._spare.items()}


class TestAsyncSnapshot:
    def test_async_save_of_odd_tensors_loads_back_equal(self, tmp_path: Path):
        """Views, transposed, bfloat16, int, empty and 0-d tensors come back bit-identical."""
        state = odd_state()
        expected = {"model": {k: v.clone() for k, v in state["model"].items()},
                    "optimizer": {"state": [t.clone() for t in state["optimizer"]["state"]]},
                    "step": 12}
        manager = CheckpointManager(tmp_path, keep=2)
        pending = manager.save_async(state, step=1)
        for tensor in state["model"].values():  # training goes on at once: mutate everything
            tensor.add_(1)
        saved = pending.result()
        assert_same(manager.load(saved), expected)

    def test_later_async_saves_reuse_the_snapshot_buffers(self, tmp_path: Path):
        """The second async save copies into the first one's buffers, and writes the new values."""
        state = {"w": torch.zeros(10_000), "b": torch.zeros(10)}
        manager = CheckpointManager(tmp_path, keep=2)
        manager.save_async(state, step=1).result()
        first = buffer_addresses(manager)
        state["w"].fill_(7.0)
        saved = manager.save_async(state, step=2).result()
        assert buffer_addresses(manager) == first
        assert torch.equal(manager.load(saved)["w"], torch.full((10_000,), 7.0))

    def test_prepare_async_pages_in_the_buffers_the_first_save_uses(self, tmp_path: Path):
        """After prepare_async, the first async save writes through the buffers it prepared."""
        state = odd_state()
        manager = CheckpointManager(tmp_path, keep=2)
        manager.prepare_async(state)
        manager._join_prepare()  # its thread allocates them
        prepared = buffer_addresses(manager)
        assert prepared  # one buffer per strided tensor
        saved = manager.save_async(state, step=1).result()
        assert buffer_addresses(manager) == prepared
        assert_same(manager.load(saved), odd_state())

    def test_prepare_async_allocates_on_its_own_thread(self, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
        """The training thread only walks the state: every buffer (pinned ones, for CUDA state,
        cost ~0.5 s per GiB) is allocated by prepare_async's thread, and the save uses them."""
        threads: List[str] = []
        allocate = buffers._allocate

        def recording(shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
            threads.append(threading.current_thread().name)
            return allocate(shape, dtype, pin)
        monkeypatch.setattr(buffers, "_allocate", recording)
        state = odd_state()
        manager = CheckpointManager(tmp_path, keep=2)
        manager.prepare_async(state)
        assert manager._prepare_thread is not None
        assert not manager._prepare_thread.daemon  # the exit waits: one inside torch.empty aborted
        manager._join_prepare()
        prepared = buffer_addresses(manager)
        assert threads == ["sw-checkpoint-prepare"] * 10 and len(prepared) == 10
        saved = manager.save_async(state, step=1).result()
        assert buffer_addresses(manager) == prepared and len(threads) == 10
        assert_same(manager.load(saved), odd_state())

    def test_a_failed_prepare_leaves_the_first_save_to_allocate(self, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
        """Pinned memory that cannot be had (an allocation error in the thread): prepare_async
        does not raise, and the first save allocates what is missing and saves it whole."""
        allocate, calls = buffers._allocate, []

        def failing_third(shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("CUDA error: out of memory")
            return allocate(shape, dtype, pin)
        monkeypatch.setattr(buffers, "_allocate", failing_third)
        state = odd_state()
        manager = CheckpointManager(tmp_path, keep=2)
        manager.prepare_async(state)
        manager._join_prepare()
        assert len(buffer_addresses(manager)) == 2
        saved = manager.save_async(state, step=1).result()
        assert len(buffer_addresses(manager)) == 10 and len(calls) == 3 + 8
        assert_same(manager.load(saved), odd_state())

    def test_prepare_async_then_a_sync_save_is_unaffected(self, tmp_path: Path):
        """A sync save right after prepare_async writes the live state, not the zeroed buffers."""
        state = {"w": torch.full((50_000,), 3.0)}
        manager = CheckpointManager(tmp_path, keep=2)
        manager.prepare_async(state)
        saved = manager.save(state, step=1)
        assert torch.equal(manager.load(saved)["w"], torch.full((50_000,), 3.0))
        saved = manager.save_async(state, step=2).result()
        assert torch.equal(manager.load(saved)["w"], torch.full((50_000,), 3.0))


class TestEarlyWriteback:
    def test_a_large_save_starts_writeback_of_what_is_written(self, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
        """A save larger than the writeback stride asks the kernel to write each finished stride
        while it goes on serializing, covering the file from byte 0 without gaps or overlaps."""
        calls: List[Tuple[int, int]] = []
        real = checkpoint_write._start_writeback

        def recording(fd: int, offset: int, nbytes: int) -> None:
            calls.append((offset, nbytes))
            real(fd, offset, nbytes)

        monkeypatch.setattr(checkpoint_write, "_start_writeback", recording)
        stride = checkpoint_write._WRITEBACK_EVERY
        state = {f"t{i}": torch.full((stride // 4 // 3,), float(i)) for i in range(8)}  # ~2.7 strides
        manager = CheckpointManager(tmp_path, keep=1)
        saved = manager.save(state, step=1)
        assert len(calls) >= 2
        position = 0
        for offset, nbytes in calls:
            assert offset == position and nbytes >= stride
            position += nbytes
        assert position <= saved.bytes
        assert manager.verify(saved.path)
        assert torch.equal(manager.load(saved)["t7"], torch.full((stride // 4 // 3,), 7.0))


class TestSessionPreparesAsyncBuffers:
    def test_first_step_pages_in_the_buffers_the_first_async_save_uses(self, tmp_path: Path):
        """With async_save, the Session prepares the snapshot buffers at its first step boundary,
        and its first async checkpoint is written through exactly those buffers."""
        model = torch.nn.Linear(64, 32)
        optimizer = torch.optim.Adam(model.parameters())
        session = Session(checkpoint_dir=tmp_path / "ckpt", run_dir=tmp_path / "run", model=model,
                          optimizer=optimizer, async_save=True, exit_on_stop=False,
                          handle_signals=False)
        try:
            assert buffer_addresses(session.manager) == {}
            model(torch.randn(4, 64)).sum().backward()
            optimizer.step()
            session.step()
            session.manager._join_prepare()  # the prepare thread allocates them
            prepared = buffer_addresses(session.manager)
            assert ("model", "weight") in prepared
            assert ("optimizer", "state", 0, "exp_avg") in prepared
            saved = session.manager.save_async(session._capture(), step=1).result()
            assert buffer_addresses(session.manager) == prepared
            assert torch.equal(session.manager.load(saved)["model"]["weight"], model.weight.detach())
        finally:
            session.close()

    def test_a_sync_session_prepares_nothing(self, tmp_path: Path):
        """Without async_save no snapshot buffers are allocated (no second copy of the state)."""
        model = torch.nn.Linear(8, 4)
        session = Session(checkpoint_dir=tmp_path / "ckpt", run_dir=tmp_path / "run", model=model,
                          exit_on_stop=False, handle_signals=False)
        try:
            session.step()
            assert buffer_addresses(session.manager) == {}
        finally:
            session.close()


class TestPruneOffTheCallersThread:
    def test_large_pruned_files_are_unlinked_by_a_helper_thread(self, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
        """A pruned file of _UNLINK_AHEAD_BYTES or more is unlinked by a helper thread: save()
        returns with its marker already gone, and list() (like the next save) waits for the file."""
        monkeypatch.setattr(checkpoint_dir, "_UNLINK_AHEAD_BYTES", 1000)
        release = threading.Event()
        real_remove = checkpoint_dir._remove_any

        def remove_when_released(path: Path) -> None:
            if path.suffix == ".pt":
                release.wait(120)
            real_remove(path)

        monkeypatch.setattr(checkpoint_dir, "_remove_any", remove_when_released)
        manager = CheckpointManager(tmp_path, keep=1)
        first = manager.save({"w": torch.ones(10_000)}, step=1)
        second = manager.save({"w": torch.full((10_000,), 2.0)}, step=2)
        assert sorted(os.listdir(tmp_path)) == sorted(
            [first.path.name, second.path.name, second.path.name + ".sha256"])
        release.set()
        assert manager.list() == [second]
        assert sorted(os.listdir(tmp_path)) == [second.path.name, second.path.name + ".sha256"]

    def test_a_closed_session_has_finished_unlinking(self, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
        """Session.close() returns once the helper thread has unlinked the pruned file: after
        it nothing of ours changes the checkpoint directory (a copy of it to Drive comes next)."""
        monkeypatch.setattr(checkpoint_dir, "_UNLINK_AHEAD_BYTES", 1000)
        real_remove = checkpoint_dir._remove_any
        unlinking = threading.Event()

        def remove_slowly(path: Path) -> None:
            if path.suffix == ".pt":
                unlinking.set()
                time.sleep(0.5)
            real_remove(path)

        monkeypatch.setattr(checkpoint_dir, "_remove_any", remove_slowly)
        model = torch.nn.Linear(100, 100)
        session = Session(tmp_path / "ckpt", model=model, run_dir=tmp_path / "run", keep=1,
                          checkpoint_every=None, exit_on_stop=False, handle_signals=False)
        try:
            session.step()
            session.checkpoint()
            session.step()
            second = session.checkpoint()
            assert unlinking.is_set()
        finally:
            session.close()
        assert not [t for t in threading.enumerate() if t.name == "sw-checkpoint-prune"]
        assert sorted(os.listdir(tmp_path / "ckpt")) == [second.path.name,
                                                          second.path.name + ".sha256"]

    def test_small_pruned_files_are_gone_when_save_returns(self, tmp_path: Path):
        """Below the threshold nothing changes: the pruned checkpoint is gone when save() returns."""
        manager = CheckpointManager(tmp_path, keep=1)
        manager.save({"w": torch.ones(10)}, step=1)
        second = manager.save({"w": torch.ones(10)}, step=2)
        assert sorted(os.listdir(tmp_path)) == [second.path.name, second.path.name + ".sha256"]
