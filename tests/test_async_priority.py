"""The async checkpoint writer yields the CPU to training, and gets it back when waited for.

Issue 17: a background write took as much training time as a sync save on a busy 2-core
machine. The writer now runs at idle priority (session_watchdog/trainer/priority.py); whoever
waits for it (the next save, ``wait()``, ``result()``, interpreter exit) restores its priority.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from integration_helpers import wait_for

from session_watchdog.trainer import priority
from session_watchdog.trainer.checkpoint import CheckpointManager, PendingSave

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="thread priorities are changed on Linux only")

DEADLINE_S = 120.0
RESTORABLE = priority.can_restore(os.getpriority(os.PRIO_PROCESS, 0))


def lowered(tid: int) -> bool:
    """Whether thread ``tid`` runs at the priority the writer lowers itself to."""
    if RESTORABLE:
        return os.sched_getscheduler(tid) == os.SCHED_IDLE
    return os.getpriority(os.PRIO_PROCESS, tid) == 19


def normal(tid: int) -> bool:
    return (os.sched_getscheduler(tid) == os.SCHED_OTHER
            and os.getpriority(os.PRIO_PROCESS, tid) == os.getpriority(os.PRIO_PROCESS, 0))


def writer_tid(pending: PendingSave) -> int:
    wait_for(lambda: pending._yielding.thread_id is not None, "the writer thread to start")
    tid = pending._yielding.thread_id
    assert tid is not None
    return tid


@pytest.fixture
def blocked(tmp_path: Path) -> Iterator[CheckpointManager]:
    """A manager whose writes wait (holding its write lock) until the test lets them go."""
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    manager._lock.acquire()
    try:
        yield manager
    finally:
        if manager._lock.locked():
            manager._lock.release()
        try:
            manager.wait()
        except Exception:
            pass


def state() -> dict:
    return {"model": {"w": torch.arange(1 << 16, dtype=torch.float32)}}


class TestYielding:
    def test_lower_then_hurry_restores_the_thread_exactly(self):
        """A thread lowered to idle priority is back at its old policy and nice value after hurry."""
        yielding = priority.Yielding()
        ready, done = threading.Event(), threading.Event()

        def worker() -> None:
            yielding.lower()
            ready.set()
            done.wait(DEADLINE_S)
            yielding.finished()

        thread = threading.Thread(target=worker)
        thread.start()
        try:
            assert ready.wait(DEADLINE_S)
            tid = yielding.thread_id
            assert tid is not None and lowered(tid)
            yielding.hurry()
            if RESTORABLE:
                assert normal(tid)
            assert yielding.hurried
        finally:
            done.set()
            thread.join()
        assert yielding.thread_id is None

    def test_hurry_before_lower_leaves_the_thread_alone(self):
        """A writer hurried before it started never lowers itself."""
        yielding = priority.Yielding()
        yielding.hurry()
        seen = {}

        def worker() -> None:
            yielding.lower()
            tid = threading.get_native_id()
            seen["normal"] = normal(tid)
            yielding.finished()

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen == {"normal": True}


class TestAsyncWriterPriority:
    def test_writer_runs_at_idle_priority_until_the_manager_hurries_it(self, blocked):
        """save_async's writer is lowered while training goes on; manager.hurry() restores it."""
        pending = blocked.save_async(state(), step=1)
        tid = writer_tid(pending)
        assert lowered(tid)
        blocked.hurry()
        if RESTORABLE:
            assert normal(tid)
        blocked._lock.release()
        saved = pending.result()
        loaded = blocked.load(saved)
        assert torch.equal(loaded["model"]["w"], state()["model"]["w"])

    def test_result_hurries_the_write_by_default(self, blocked):
        """A caller blocked in result() gets the writer back to normal priority."""
        pending = blocked.save_async(state(), step=1)
        tid = writer_tid(pending)
        waiter = threading.Thread(target=pending.result)
        waiter.start()
        try:
            wait_for(lambda: pending._yielding.hurried, "result() to hurry the writer")
            if RESTORABLE:
                assert normal(tid)
        finally:
            blocked._lock.release()
            waiter.join()
        assert pending.result().step == 1

    def test_result_without_hurry_keeps_the_writer_idle(self, blocked):
        """A watcher waiting with hurry=False (training goes on) leaves the writer lowered."""
        pending = blocked.save_async(state(), step=1)
        tid = writer_tid(pending)
        with pytest.raises(TimeoutError):
            pending.result(timeout=0.2, hurry=False)
        assert lowered(tid)
        assert not pending._yielding.hurried

    def test_next_save_hurries_the_write_in_flight(self, blocked):
        """A save that must wait for the previous async save restores that writer's priority."""
        pending = blocked.save_async(state(), step=1)
        tid = writer_tid(pending)
        saver = threading.Thread(target=blocked.save, args=(state(),), kwargs={"step": 2})
        saver.start()
        try:
            wait_for(lambda: pending._yielding.hurried, "the next save to hurry the writer")
            if RESTORABLE:
                assert normal(tid)
        finally:
            blocked._lock.release()
            saver.join()
        assert [c.step for c in blocked.list()] == [1, 2]

    def test_interpreter_exit_hurries_the_write_it_waits_for(self, tmp_path: Path):
        """At exit, before joining the writer thread, the interpreter restores its priority."""
        script = textwrap.dedent(f"""
            import os, sys, threading, time
            import torch
            from session_watchdog.trainer import priority
            from session_watchdog.trainer.checkpoint import CheckpointManager

            manager = CheckpointManager({str(tmp_path / "ckpt")!r})
            pending = None

            def report():  # registered first, so it runs after the checkpoint module's hook
                tid = pending._yielding.thread_id
                print("hurried", pending._yielding.hurried, "idle",
                      os.sched_getscheduler(tid) == os.SCHED_IDLE, flush=True)
                manager._lock.release()

            threading._register_atexit(report)
            manager._lock.acquire()
            pending = manager.save_async({{"w": torch.ones(8)}}, step=1)
            while pending._yielding.thread_id is None:
                time.sleep(0.01)
        """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=DEADLINE_S, env=env, start_new_session=True)
        assert child.returncode == 0, child.stderr
        assert child.stdout.split() == ["hurried", "True", "idle", "False"]
        assert [c.step for c in CheckpointManager(tmp_path / "ckpt").list()] == [1]
