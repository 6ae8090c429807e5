"""The copy of a state into an async save's snapshot buffers (trainer/buffers.py, issue 17), as
behaviour: every byte lands, helpers share the work and are done when the copy returns, and the
manager's first and later async saves write exactly what a sync save writes. No test asserts on
time; benchmarks/bench_checkpoint.py measures the stall.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch

from session_watchdog.trainer import buffers
from session_watchdog.trainer.checkpoint import CheckpointManager

Pairs = List[Tuple[torch.Tensor, torch.Tensor]]
WAIT_S = 120.0  # a deadline for the other thread, never a measure of speed


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 4 KiB + 4 bytes (not a multiple of any element size's page), helpers from 0 B."""
    monkeypatch.setattr(buffers, "CHUNK_BYTES", 4100)
    monkeypatch.setattr(buffers, "PARALLEL_FROM_BYTES", 0)


def sources() -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [
        torch.rand(300_001, generator=generator),
        torch.randint(-(2**40), 2**40, (7777,), generator=generator),
        torch.rand(513, 257, generator=generator).to(torch.bfloat16),
        torch.rand(0),
        torch.tensor(2.5),
        torch.randint(0, 2, (4099,), generator=generator).bool(),
    ]


def fresh_pairs(data: List[torch.Tensor]) -> Pairs:
    return [(torch.full_like(t, 0), t) for t in data]


def big_state(mib: int) -> Dict[str, Any]:
    """A state of ``mib`` MiB in a few tensors, over the default parallel threshold."""
    generator = torch.Generator().manual_seed(7)
    per = (mib << 20) // 4 // 4
    return {"model": {f"w{i}": torch.rand(per + i, generator=generator) for i in range(4)},
            "step": 5}


class TestCopyAll:
    def test_every_byte_of_every_pair_is_copied(self, small_chunks: None):
        """Pairs of several dtypes and sizes, split into pieces over 4 threads, come out equal."""
        data = sources()
        pairs = fresh_pairs(data)
        buffers.copy_all(pairs, threads=4)
        for buf, src in pairs:
            assert buf.dtype == src.dtype and torch.equal(buf, src)

    def test_one_thread_copies_everything_itself(self, small_chunks: None):
        """threads=1 copies every pair on the caller's thread: one thread took part."""
        pairs = fresh_pairs(sources())
        assert buffers.copy_all(pairs, threads=1) == 1
        assert all(torch.equal(buf, src) for buf, src in pairs)

    def test_a_small_copy_stays_on_the_callers_thread(self, monkeypatch: pytest.MonkeyPatch):
        """Below PARALLEL_FROM_BYTES no helper is asked, whatever the thread count."""
        monkeypatch.setattr(buffers, "CHUNK_BYTES", 4096)
        pairs = fresh_pairs([torch.rand(100_000)])  # 400 kB in ~98 pieces, under 64 MiB
        assert buffers.copy_all(pairs, threads=4) == 1
        assert torch.equal(pairs[0][0], pairs[0][1])

    def test_helpers_take_part_in_a_large_copy(self, small_chunks: None):
        """With two threads a helper copies some of the pieces (seen within a 60 s deadline)."""
        data = [torch.rand(1 << 22)]  # 16 MiB in ~4000 pieces
        deadline = time.monotonic() + 60
        participants = 0
        while participants < 2 and time.monotonic() < deadline:
            pairs = fresh_pairs(data)
            participants = buffers.copy_all(pairs, threads=2)
            assert torch.equal(pairs[0][0], data[0])
        assert participants == 2

    def test_a_helper_that_cannot_start_does_not_hold_up_the_copy(self, small_chunks: None):
        """With every helper thread busy elsewhere, the caller copies it all and returns."""
        release = threading.Event()
        pool = buffers._helpers()
        blockers = [pool.submit(release.wait, 120) for _ in range(buffers._MAX_THREADS - 1)]
        try:
            pairs = fresh_pairs(sources())
            assert buffers.copy_all(pairs, threads=4) == 1
            assert all(torch.equal(buf, src) for buf, src in pairs)
        finally:
            release.set()
            for blocker in blockers:
                blocker.result(timeout=120)

    @pytest.mark.parametrize("lost_future", [False, True], ids=["between-pieces", "in-submit"])
    def test_an_interrupted_copy_stops_its_helpers_before_it_raises(
            self, small_chunks: None, monkeypatch: pytest.MonkeyPatch, lost_future: bool):
        """A Ctrl-C on the caller's thread (between two pieces, or inside submit once the helper
        is queued, its future lost), then a second one while it waits for the helper to finish
        the piece it holds: when copy_all raises, no helper is copying any more and the pieces
        left were never handed out (the caller's buffers may be freed right after)."""
        main = threading.main_thread()
        assert threading.current_thread() is main  # signals reach the main thread only
        real_memmove = buffers.ctypes.memmove
        real_wait = buffers.Work.wait_helpers
        lock = threading.Lock()
        seen = {"active": 0, "pieces": 0, "interrupts": 0}
        helper_in_piece = threading.Event()
        caller_waits = threading.Event()
        interrupted = threading.Event()

        def wait(event: threading.Event) -> None:
            assert event.wait(WAIT_S), "the other thread never got there"

        def memmove(dst: int, src: int, nbytes: int) -> None:
            with lock:
                seen["active"] += 1
                seen["pieces"] += 1
            try:
                real_memmove(dst, src, nbytes)
                if threading.current_thread() is main:
                    if seen["pieces"] >= 3:
                        wait(helper_in_piece)
                        raise KeyboardInterrupt  # the first Ctrl-C, between two pieces
                elif not helper_in_piece.is_set():  # the helper's first piece: held until
                    helper_in_piece.set()           # the caller waits for it, then the
                    wait(caller_waits)              # second Ctrl-C comes
                    signal.pthread_kill(main.ident, signal.SIGINT)
                    wait(interrupted)
            finally:
                with lock:
                    seen["active"] -= 1

        def wait_helpers(work: buffers.Work) -> None:
            caller_waits.set()
            real_wait(work)

        def on_sigint(signum: int, frame: Any) -> None:
            seen["interrupts"] += 1
            interrupted.set()
            raise KeyboardInterrupt

        class Pool:  # the real pool, whose submit is cut short by a Ctrl-C after queueing
            def __init__(self, pool: Any) -> None:
                self.pool = pool

            def submit(self, fn: Any, *args: Any) -> Any:
                self.pool.submit(fn, *args)  # queued, then the Ctrl-C: its future is lost
                wait(helper_in_piece)
                raise KeyboardInterrupt

        monkeypatch.setattr(buffers.ctypes, "memmove", memmove)
        monkeypatch.setattr(buffers.Work, "wait_helpers", wait_helpers)
        if lost_future:
            real_pool = buffers._helpers()
            monkeypatch.setattr(buffers, "_helpers", lambda: Pool(real_pool))
        pairs = fresh_pairs([torch.rand(1 << 20)])  # 4 MiB in 1024 pieces
        pieces = len(buffers.Work(buffers._chunks(pairs, buffers.CHUNK_BYTES)))
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            with pytest.raises(KeyboardInterrupt):
                buffers.copy_all(pairs, threads=2)
        finally:
            signal.signal(signal.SIGINT, previous)
        assert (seen["active"], seen["interrupts"]) == (0, 1)
        assert seen["pieces"] < pieces  # the pieces left were never handed out
        assert int((pairs[0][0] != 0).sum()) <= seen["pieces"] * buffers.CHUNK_BYTES // 4

    def test_page_in_zeroes_every_byte_once_across_threads(self, small_chunks: None):
        """Three threads running one page-in work zero every byte and do each piece once."""
        bufs = [torch.full((100_003,), 7.0), torch.full((33, 65), 9, dtype=torch.int16)]
        work = buffers.page_in(bufs)
        counts: List[int] = []
        threads = [threading.Thread(target=lambda: counts.append(work.run())) for _ in range(2)]
        for thread in threads:
            thread.start()
        counts.append(work.run())
        for thread in threads:
            thread.join(120)
        assert sum(counts) == len(work) == 98 + 2  # 400012 B and 4290 B in 4100 B pieces
        assert all(int(buf.count_nonzero()) == 0 for buf in bufs)

    def test_copy_threads_follows_torch_thread_count(self):
        """torch.set_num_threads(1) makes the copy single-threaded; the count is at least 1."""
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert buffers.copy_threads() == 1
        finally:
            torch.set_num_threads(previous)
        assert 1 <= buffers.copy_threads() <= 8

    def test_is_plain_only_for_contiguous_cpu_pairs_of_one_dtype(self):
        """Transposed, dtype-changing and size-changing pairs are not plain memmoves."""
        matrix = torch.rand(8, 4)
        assert buffers.is_plain(torch.empty(8, 4), matrix)
        assert not buffers.is_plain(torch.empty(4, 8), matrix.t())
        assert not buffers.is_plain(torch.empty(8, 4, dtype=torch.float64), matrix)
        assert not buffers.is_plain(torch.empty(31), matrix)


@pytest.fixture
def parallel_copy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The manager's fresh buffers go through the multi-threaded copy in 64 KiB pieces."""
    monkeypatch.setattr(buffers, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(buffers, "PARALLEL_FROM_BYTES", 0)
    yield


class TestManagerSnapshot:
    def test_first_async_save_is_byte_identical_to_a_sync_save(self, tmp_path: Path,
                                                               parallel_copy: None):
        """A bare manager's first save_async writes the same file, byte for byte, as save."""
        state = big_state(8)
        synced = CheckpointManager(tmp_path / "sync").save(state, step=1)
        pending = CheckpointManager(tmp_path / "async").save_async(state, step=1)
        saved = pending.result()
        assert saved.path.name == synced.path.name
        assert saved.path.read_bytes() == synced.path.read_bytes()

    def test_later_saves_reuse_the_buffers_and_match_a_sync_save(self, tmp_path: Path,
                                                                 parallel_copy: None):
        """The second and third async saves copy into the first one's buffers (same addresses)
        and each file equals a sync save of the state at that moment."""
        state = big_state(4)
        manager = CheckpointManager(tmp_path / "async", keep=3)
        reference = CheckpointManager(tmp_path / "sync", keep=3)
        addresses: List[Dict[Tuple[Any, ...], int]] = []
        for step in (1, 2, 3):
            for tensor in state["model"].values():
                tensor.add_(1.0)
            saved = manager.save_async(state, step=step).result()
            addresses.append({path: buf.data_ptr() for path, buf in manager._spare.items()})
            assert saved.path.read_bytes() == reference.save(state, step=step).path.read_bytes()
        assert len(addresses[0]) == 4
        assert addresses[0] == addresses[1] == addresses[2]

    def test_lazy_conj_and_neg_views_are_saved_as_their_values(self, tmp_path: Path) -> None:
        """A ``.conj()`` view and a neg view (bytes that are not their values) are saved, by the
        first and a later async save and by a shared-memory snapshot, as their resolved values."""
        from session_watchdog.trainer.snapshot import _copy_state

        state = {"z": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
                 "n": torch._neg_view(torch.tensor([1.0, 2.0]))}
        expected = {"z": [1 - 2j, 3 + 4j], "n": [-1.0, -2.0]}
        manager = CheckpointManager(tmp_path, keep=2)
        for step in (1, 2):  # into fresh buffers, then into reused ones
            loaded = manager.load(manager.save_async(state, step=step).result(timeout=120))
            assert {key: value.resolve_conj().resolve_neg().tolist()
                    for key, value in loaded.items()} == expected, step
        copied = _copy_state(state, {}, {})
        assert {key: value.resolve_conj().resolve_neg().tolist()
                for key, value in copied.items()} == expected

    def test_a_save_right_after_prepare_async_uses_the_prepared_buffers(
            self, tmp_path: Path, parallel_copy: None, monkeypatch: pytest.MonkeyPatch):
        """A save_async that comes while prepare_async may still be paging in copies into the
        prepared buffers and writes what a sync save writes."""
        allocated: List[int] = []  # by prepare_async's thread, or by the save: never both
        allocate = buffers._allocate

        def recording(shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
            buf = allocate(shape, dtype, pin)
            allocated.append(buf.data_ptr())
            return buf
        monkeypatch.setattr(buffers, "_allocate", recording)
        state = big_state(8)
        manager = CheckpointManager(tmp_path / "async")
        manager.prepare_async(state)
        saved = manager.save_async(state, step=1).result()
        assert sorted(buf.data_ptr() for buf in manager._spare.values()) == sorted(allocated)
        assert len(allocated) == 4
        synced = CheckpointManager(tmp_path / "sync").save(state, step=1)
        assert saved.path.read_bytes() == synced.path.read_bytes()

    def test_a_tensor_mutated_right_after_save_async_is_saved_as_it_was(self, tmp_path: Path,
                                                                        parallel_copy: None):
        """Every tensor overwritten as soon as save_async returns, on the first save and on a
        later one, leaves the checkpoint holding the values from before."""
        state = big_state(4)
        manager = CheckpointManager(tmp_path, keep=2)
        for step in (1, 2):
            expected = {key: t.clone() for key, t in state["model"].items()}
            pending = manager.save_async(state, step=step)
            for tensor in state["model"].values():
                tensor.fill_(-1.0)
            loaded = manager.load(pending.result())
            for key, value in expected.items():
                assert torch.equal(loaded["model"][key], value)
            for key, value in expected.items():  # the next round saves fresh values again
                state["model"][key].copy_(value * 2)
