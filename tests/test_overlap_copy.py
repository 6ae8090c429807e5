"""Async saves whose writer copies the optimizer's tensors while training runs on (issue 17):
``save_async(copy_later=...)`` and ``Session(async_save=True)``'s optimizer step pre-hook.

The writer's copy is held back by a gate at our own boundary (``checkpoint_async.copy_all``,
on the writer thread only), so each test knows whether training ran before or after it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
import torch
from integration_helpers import wait_for

from session_watchdog.channel import RunDir, lock_held
from session_watchdog.trainer import checkpoint_async, checkpoint_types
from session_watchdog.trainer.checkpoint import (
    CheckpointManager,
    CheckpointWriteError,
    StateChangedError,
)
from session_watchdog.trainer.session import Session

WAIT_S = 60.0


class WriterGate:
    """Holds the writer thread before it copies anything, until :meth:`open`."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.writer_waiting = threading.Event()
        self.copied_by_writer: List[int] = []

    def wrap(self, real: Callable[..., int]) -> Callable[..., int]:
        def copy_all(pairs: Any, threads: int = 0) -> int:
            if threading.current_thread().name.startswith("sw-checkpoint-save"):
                self.writer_waiting.set()
                assert self.opened.wait(WAIT_S), "the test never opened the gate"
                self.copied_by_writer.extend(data.data_ptr() for _, data in pairs)
            return real(pairs, threads)
        return copy_all

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[WriterGate]:
    held = WriterGate()
    monkeypatch.setattr(checkpoint_async, "copy_all", held.wrap(checkpoint_async.copy_all))
    yield held
    held.open()  # a failed test must not leave a writer waiting


def model_and_adam() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.Linear(32, 4))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def forward_backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()


def clone_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": {i: {k: v.clone() for k, v in s.items()}
                          for i, s in enumerate(optimizer.state.values())}}


def assert_saved_equals(loaded: Dict[str, Any], expected: Dict[str, Any]) -> None:
    for key, value in expected["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    for index, per_param in expected["optimizer"].items():
        for key, value in per_param.items():
            assert torch.equal(loaded["optimizer"]["state"][index][key], value), (index, key)


class TestSaveAsyncCopyLater:
    def test_the_writer_copies_the_tensors_left_to_it_and_the_rest_is_copied_at_once(
            self, tmp_path: Path, gate: WriterGate) -> None:
        """``copy_later`` tensors are copied by the writer, before ``wait_copied`` returns; a
        tensor not among them is copied during the call (changing it after does not matter)."""
        later = torch.arange(1000, dtype=torch.float32)
        now = torch.full((1000,), 7.0)
        manager = CheckpointManager(tmp_path, keep=1)
        pending = manager.save_async({"later": later, "now": now}, step=1, copy_later=[later])
        now.fill_(-1.0)  # copied already: the checkpoint holds 7s
        assert gate.writer_waiting.wait(WAIT_S)
        assert not pending._copied.is_set()
        waiter = threading.Thread(target=manager.wait_copied)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # it waits for the writer's copy
        gate.open()
        waiter.join(WAIT_S)
        assert not waiter.is_alive()
        later.fill_(-2.0)  # copied now: allowed
        saved = pending.result()
        assert gate.copied_by_writer == [later.data_ptr()]
        loaded = manager.load(saved)
        assert torch.equal(loaded["later"], torch.arange(1000, dtype=torch.float32))
        assert torch.equal(loaded["now"], torch.full((1000,), 7.0))
        assert manager.verify(saved.path)

    def test_a_tensor_changed_before_its_copy_fails_the_save_and_keeps_the_previous(
            self, tmp_path: Path, gate: WriterGate) -> None:
        """An in-place change to a ``copy_later`` tensor before the writer copied it: that save
        fails (StateChangedError naming the tensor), nothing is written, the previous stays."""
        weight = torch.ones(64)
        manager = CheckpointManager(tmp_path, keep=2)
        gate.open()
        first = manager.save_async({"model": {"weight": weight}}, step=1, copy_later=[weight]).result()
        gate.opened.clear()
        gate.writer_waiting.clear()
        pending = manager.save_async({"model": {"weight": weight}}, step=2, copy_later=[weight])
        assert gate.writer_waiting.wait(WAIT_S)
        weight.mul_(3.0)  # the caller broke its promise
        gate.open()
        with pytest.raises(CheckpointWriteError) as raised:
            pending.result()
        assert isinstance(raised.value.cause, StateChangedError)
        assert "1 tensor(s) changed before the writer's copy of them was over (the first: " \
            "model/weight)" in str(raised.value)
        assert pending._copied.is_set()
        assert [saved.step for saved in manager.list()] == [1]
        assert torch.equal(manager.load(first)["model"]["weight"], torch.ones(64))
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
        # the next save works, its buffers reused
        saved = manager.save_async({"model": {"weight": weight}}, step=3).result()
        assert torch.equal(manager.load(saved)["model"]["weight"], torch.full((64,), 3.0))


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Callable[..., Session]]:
    made: List[Session] = []

    def make(model: torch.nn.Module, optimizer: Any, **kwargs: Any) -> Session:
        kwargs.setdefault("overlap_copy", True)  # None: the Session's default
        if kwargs["overlap_copy"] is None:
            del kwargs["overlap_copy"]
        session = Session(tmp_path / "ckpt", model=model, optimizer=optimizer,
                          run_dir=tmp_path / "run", poll_interval=0.02, heartbeat_interval=60.0,
                          checkpoint_every=None, handle_signals=False, exit_on_stop=False,
                          async_save=True, **kwargs)
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()


def request_checkpoint(session: Session, seq: int) -> None:
    from session_watchdog.channel import Request

    RunDir(session.run_dir.path).write_request(Request(seq=seq, action="checkpoint", reason="test",
                                                       deadline=None, issued=time.time()))


def step_until_saving(session: Session, gate: WriterGate) -> Dict[str, Any]:
    """Train (forward, backward, step, session.step) until the session's async save has its
    writer at the gate; return the state it snapshotted (the state after that step)."""
    model, optimizer = session.model, session.optimizer
    deadline = 2000
    for _ in range(deadline):
        forward_backward(model, optimizer)
        optimizer.step()
        expected = clone_state(model, optimizer)
        session.step()
        if gate.writer_waiting.wait(0.01):
            return expected
    raise AssertionError("no async save reached its writer")


def train_until(session: Session, done: Callable[[], bool],
                clamp: bool = False) -> Dict[int, Dict[str, Any]]:
    """Train until ``done()``; return the state after each step, by step number. ``clamp``:
    change the first layer's weight in place after each step (outside optimizer.step())."""
    model, optimizer = session.model, session.optimizer
    states: Dict[int, Dict[str, Any]] = {}
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "timed out training until the condition"
        forward_backward(model, optimizer)
        optimizer.step()
        states[session.global_step + 1] = clone_state(model, optimizer)
        session.step()
        if clamp:
            with torch.no_grad():
                model[0].weight.clamp_(-0.01, 0.01)
        time.sleep(0.001)
    return states


def assert_request_saves_its_step(session: Session, seq: int) -> None:
    """Request checkpoint ``seq``, train until it is acked, and check the checkpoint holds the
    state of exactly the step it was taken at."""
    request_checkpoint(session, seq)
    states = train_until(session, lambda: session.acked_seq == seq)
    saved = session.manager.latest()
    assert saved is not None
    assert_saved_equals(session.manager.load(saved), states[saved.step])


class TestSessionOverlapsTheCopy:
    def test_the_next_optimizer_step_waits_for_the_writers_copy(
            self, sessions: Callable[..., Session], gate: WriterGate) -> None:
        """The forward and backward pass after an async save run while the writer still has
        to copy; the optimizer's step waits for that copy, and the checkpoint holds exactly
        the state of the step it was asked at (parameters, Adam's moments, BatchNorm stats)."""
        model, optimizer = model_and_adam()
        session = sessions(model, optimizer)
        request_checkpoint(session, 1)
        expected = step_until_saving(session, gate)
        forward_backward(model, optimizer)  # not held up: the writer has copied nothing yet
        stepped = threading.Event()

        def optimizer_step() -> None:
            optimizer.step()
            stepped.set()
        stepper = threading.Thread(target=optimizer_step)
        stepper.start()
        try:
            assert not stepped.wait(0.3)  # held by the pre-hook while the gate is shut
            assert torch.equal(model.state_dict()["0.weight"], expected["model"]["0.weight"])
        finally:
            gate.open()
            stepper.join(WAIT_S)
        assert stepped.is_set()
        session.step()
        wait_for(lambda: session.acked_seq == 1, "the ack of the async save")
        ckpt = session.last_checkpoint
        assert ckpt is not None
        loaded = session.manager.load(session.manager.latest())
        assert_saved_equals(loaded, expected)
        params = {p.data_ptr() for p in model.parameters()}
        assert params <= set(gate.copied_by_writer)  # the writer, not session.step(), copied them
        # BatchNorm's running stats change in forward: copied at once, never left to the writer
        assert model.state_dict()["1.running_mean"].data_ptr() not in gate.copied_by_writer

    def test_a_loop_that_changes_the_weights_outside_the_step_turns_the_overlap_off(
            self, sessions: Callable[..., Session], gate: WriterGate,
            caplog: pytest.LogCaptureFixture) -> None:
        """A change between session.step() and the optimizer's step fails that save (said in
        the log), and the next async save copies everything at once and succeeds."""
        model, optimizer = model_and_adam()
        session = sessions(model, optimizer, retry_after="10m")
        request_checkpoint(session, 1)
        step_until_saving(session, gate)
        with torch.no_grad():
            model[0].weight.clamp_(-0.01, 0.01)  # outside optimizer.step(), in place
        with caplog.at_level(logging.WARNING, logger="session_watchdog"):
            gate.open()
            wait_for(lambda: not lock_held(session.run_dir.path / "save.lock"),
                     "the failed save to let go of save.lock")
            forward_backward(model, optimizer)
            optimizer.step()
            first = {session.global_step + 1: clone_state(model, optimizer)}
            writer_copies = len(gate.copied_by_writer)
            session.step()
        assert any("overlap_copy_off" in record.getMessage() for record in caplog.records)
        # the same request is saved again at once (retry_after is 10 minutes), every tensor
        # copied in the stall
        states = {**first, **train_until(session, lambda: session.acked_seq == 1)}
        saved = session.manager.latest()
        assert saved is not None
        assert_saved_equals(session.manager.load(saved), states[saved.step])
        request_checkpoint(session, 2)
        states = train_until(session, lambda: session.acked_seq == 2, clamp=True)
        assert len(gate.copied_by_writer) == writer_copies  # the writer copied nothing itself
        saved = session.manager.latest()
        assert saved is not None
        assert_saved_equals(session.manager.load(saved), states[saved.step])

    def test_optimizer_state_leaves_the_moments_to_the_writer_and_the_parameters_to_the_stall(
            self, sessions: Callable[..., Session], gate: WriterGate) -> None:
        """``overlap_copy="optimizer_state"``: Adam's moments are left to the writer, the
        parameters are copied in the stall. An EMA evaluation that swaps the weights through
        ``.data`` while the writer still copies (no version counter moves) cannot reach the
        checkpoint: it holds the weights of the step it was asked at."""
        model, optimizer = model_and_adam()
        session = sessions(model, optimizer, overlap_copy="optimizer_state")
        assert len(optimizer._optimizer_step_pre_hooks) == 1
        request_checkpoint(session, 1)
        expected = step_until_saving(session, gate)
        trained = [p.detach().clone() for p in model.parameters()]
        for param in model.parameters():  # EMA's copy_to: the shadow weights in, unseen
            param.data.fill_(0.5)
        gate.open()
        session.manager.wait_copied()
        for param, weights in zip(model.parameters(), trained):  # EMA's restore
            param.data.copy_(weights)
        forward_backward(model, optimizer)
        optimizer.step()
        session.step()
        wait_for(lambda: session.acked_seq == 1, "the ack of the async save")
        saved = session.manager.latest()
        assert saved is not None
        assert_saved_equals(session.manager.load(saved), expected)
        moments = {t.data_ptr() for s in optimizer.state.values() for k, t in s.items()
                   if k in ("exp_avg", "exp_avg_sq")}
        assert len(moments) == 12 and moments <= set(gate.copied_by_writer)  # 6 parameters
        assert not {p.data_ptr() for p in model.parameters()} & set(gate.copied_by_writer)

    @pytest.mark.parametrize("overlap", [None, False])
    def test_without_overlap_copy_everything_is_copied_in_the_stall(
            self, sessions: Callable[..., Session], gate: WriterGate, overlap: Any) -> None:
        """Off unless asked for (None: the default): writes through ``.data`` right after the
        save (pruning that masks weights and momentum buffers, an EMA swap), which move no
        version counter, cannot reach the checkpoint: it holds the state of its step."""
        model, optimizer = model_and_adam()
        session = sessions(model, optimizer, overlap_copy=overlap)
        assert session._copy_hook is None
        assert optimizer._optimizer_step_pre_hooks == {}
        request_checkpoint(session, 1)
        before = session.manager._pending
        for _ in range(2000):
            forward_backward(model, optimizer)
            optimizer.step()
            expected = clone_state(model, optimizer)
            session.step()
            if session.manager._pending is not before:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the requested checkpoint was never taken")
        written = [*model.parameters(), *(t for per_param in optimizer.state.values()
                                          for t in per_param.values())]
        for tensor in written:
            tensor.data.mul_(0.0)
        gate.open()  # a writer that had been left tensors to copy would copy the zeros now
        wait_for(lambda: session.acked_seq == 1, "the ack of the async save")
        saved = session.manager.latest()
        assert saved is not None
        assert_saved_equals(session.manager.load(saved), expected)
        assert gate.copied_by_writer == []

    @pytest.mark.parametrize("value", ["yes", "optimizer", 1, None])
    def test_an_overlap_copy_value_not_known_is_refused(self, tmp_path: Path,
                                                       value: Any) -> None:
        model, optimizer = model_and_adam()
        with pytest.raises(ValueError) as raised:
            Session(tmp_path / "ckpt", model=model, optimizer=optimizer, run_dir=tmp_path / "run",
                    async_save=True, handle_signals=False, overlap_copy=value)
        assert str(raised.value) == (f"Session(overlap_copy={value!r}): use False (the default), "
                                     "\"optimizer_state\" or True (the parameters too)")
        assert optimizer._optimizer_step_pre_hooks == {}
        assert not (tmp_path / "run").exists()

    def test_close_removes_the_pre_hook(self, sessions: Callable[..., Session]) -> None:
        model, optimizer = model_and_adam()
        session = sessions(model, optimizer)
        assert len(optimizer._optimizer_step_pre_hooks) == 1
        session.close()
        assert optimizer._optimizer_step_pre_hooks == {}


class TestChangesSeenLate:
    """An in-place operation moves a tensor's version counter when it has finished: one that
    overlapped the writer's copy may not have moved it yet when the writer looks. The verdict
    comes from the training thread (``wait_copied``) or, failing that, from the writer
    ``_Settle.SETTLE_S`` after the copy; until then nothing is committed."""

    @staticmethod
    def change_late(weight: torch.Tensor, gate: WriterGate, pending: Any) -> None:
        """Change ``weight``'s values before the writer copies them, and move its version
        counter only once the copy is over: an operation still running at the writer's own
        look (``.data`` shares the memory, not the counter)."""
        assert gate.writer_waiting.wait(WAIT_S)
        weight.data.mul_(3.0)
        gate.open()
        assert pending._copied.wait(WAIT_S)
        weight.add_(0.0)  # the operation ends: its counter moves

    def test_a_change_the_writer_could_not_see_yet_is_seen_on_the_training_thread(
            self, tmp_path: Path, gate: WriterGate) -> None:
        weight = torch.ones(64)
        manager = CheckpointManager(tmp_path, keep=2)
        pending = manager.save_async({"weight": weight}, step=1, copy_later=[weight])
        self.change_late(weight, gate, pending)
        manager.wait_copied()  # the training thread's check
        with pytest.raises(CheckpointWriteError) as raised:
            pending.result()
        assert isinstance(raised.value.cause, StateChangedError)
        assert "changed before the writer's copy of them was over (the first: weight)" \
            in str(raised.value)
        assert manager.list() == []
        assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []

    def test_without_a_word_from_the_training_thread_the_writer_checks_itself_later(
            self, tmp_path: Path, gate: WriterGate, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(checkpoint_types._Settle, "SETTLE_S", 0.5)
        weight = torch.ones(64)
        manager = CheckpointManager(tmp_path, keep=2)
        pending = manager.save_async({"weight": weight}, step=1, copy_later=[weight])
        self.change_late(weight, gate, pending)
        with pytest.raises(CheckpointWriteError) as raised:
            pending.result()
        assert isinstance(raised.value.cause, StateChangedError)
        assert manager.list() == []

    def test_the_commit_waits_for_the_training_threads_word(
            self, tmp_path: Path, gate: WriterGate, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(checkpoint_types._Settle, "SETTLE_S", 120.0)
        gate.open()
        weight = torch.ones(64)
        manager = CheckpointManager(tmp_path, keep=2)
        pending = manager.save_async({"weight": weight}, step=1, copy_later=[weight])
        assert pending._copied.wait(WAIT_S)
        with pytest.raises(futures.TimeoutError):
            pending._future.result(timeout=0.3)  # written, not committed
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".json")] == []
        # another thread's look (a mirror's) is no word from the training loop
        lister = threading.Thread(target=manager.list)
        lister.start()
        with pytest.raises(futures.TimeoutError):
            pending._future.result(timeout=0.3)
        manager.wait_copied()
        lister.join(WAIT_S)
        saved = pending.result()
        assert [s.step for s in manager.list()] == [1]
        assert torch.equal(manager.load(saved)["weight"], torch.ones(64))


class OptimizerWrapper(torch.optim.Optimizer):
    """A wrapper as accelerate's AcceleratedOptimizer and Lookahead-style ones are built: a
    torch.optim.Optimizer subclass whose __init__ never ran Optimizer.__init__."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    @property
    def param_groups(self) -> Any:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()


class TestOptimizersWithoutPreHooks:
    @pytest.mark.parametrize("wrap", ["ours", "accelerate"])
    def test_a_wrapper_optimizer_saves_without_the_overlap(
            self, sessions: Callable[..., Session], gate: WriterGate, wrap: str) -> None:
        """Its step never runs pre-hooks: the Session registers none and copies everything
        at once (building it raised AttributeError before)."""
        model, inner = model_and_adam()
        if wrap == "accelerate":
            from accelerate import Accelerator

            model, optimizer = Accelerator(cpu=True).prepare(model, inner)
            assert type(optimizer).__name__ == "AcceleratedOptimizer"
        else:
            optimizer = OptimizerWrapper(inner)
        session = sessions(model, optimizer)
        assert session._copy_hook is None
        gate.open()
        assert_request_saves_its_step(session, 1)
        assert gate.copied_by_writer == []

    def test_a_sparse_parameter_is_copied_at_once(self, sessions: Callable[..., Session],
                                                  gate: WriterGate) -> None:
        """A sparse tensor has no data pointer to match: it is never left to the writer (its
        save raised RuntimeError out of session.step() before)."""
        sparse = torch.nn.Parameter(torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,)))
        dense = torch.nn.Parameter(torch.ones(4))
        model = torch.nn.Module()
        model.sparse, model.dense = sparse, dense
        optimizer = torch.optim.SGD([sparse, dense], lr=0.1)
        session = sessions(model, optimizer)
        gate.open()
        request_checkpoint(session, 1)
        deadline = time.monotonic() + WAIT_S
        while session.acked_seq != 1:
            assert time.monotonic() < deadline
            optimizer.step()
            session.step()
            time.sleep(0.001)
        saved = session.manager.latest()
        assert saved is not None
        loaded = session.manager.load(saved)["model"]
        assert torch.equal(loaded["sparse"].to_dense(), torch.tensor([1.0, 0.0, 2.0, 0.0]))
        assert gate.copied_by_writer == [dense.data_ptr()]

    def test_a_session_that_fails_to_start_leaves_no_pre_hook(self, tmp_path: Path) -> None:
        from session_watchdog.trainer.session import SessionError

        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        os.symlink(tmp_path / "elsewhere", run / "save.lock")  # refused: a planted symlink
        model, optimizer = model_and_adam()
        with pytest.raises(SessionError):
            Session(tmp_path / "ckpt", model=model, optimizer=optimizer, run_dir=run,
                    checkpoint_every=None, handle_signals=False, async_save=True)
        assert optimizer._optimizer_step_pre_hooks == {}


EXIT_RIGHT_AFTER_SAVE = r"""
import sys, threading, time
from pathlib import Path
import torch
from session_watchdog.trainer import checkpoint_async, checkpoint_types
from session_watchdog.trainer.checkpoint import CheckpointManager

real = checkpoint_async.copy_all

def late(pairs, threads=0):  # the writer runs only once the interpreter is shutting down
    if threading.current_thread().name.startswith("sw-checkpoint-save"):
        while threading.main_thread().is_alive():
            time.sleep(0.01)
    return real(pairs, threads)

checkpoint_async.copy_all = late
weight = torch.arange(20 << 20, dtype=torch.float32)  # 80 MiB: copied on helper threads too
CheckpointManager(Path(sys.argv[1]), keep=1).save_async({"weight": weight}, step=7,
                                                        copy_later=[weight])
"""


def test_a_script_that_ends_right_after_an_async_save_still_gets_its_checkpoint(
        tmp_path: Path) -> None:
    """The writer copies after the interpreter began to shut down, when no new helper thread
    may start: it copies alone (the save failed with 'cannot schedule new futures' before)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", EXIT_RIGHT_AFTER_SAVE, str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manager = CheckpointManager(tmp_path / "ckpt", keep=1)
    saved = manager.latest()
    assert saved is not None and saved.step == 7
    assert manager.verify(saved.path)
    assert torch.equal(manager.load(saved)["weight"], torch.arange(20 << 20, dtype=torch.float32))


class TestHookOrderAndWaits:
    def test_a_pre_hook_registered_before_the_session_runs_after_ours(
            self, sessions: Callable[..., Session], gate: WriterGate) -> None:
        """A user's pre-hook that changes the weights (a projection run with each step) is part
        of the step: it must not run while the writer copies (that save failed before)."""
        model, optimizer = model_and_adam()

        def project(opt: Any, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                model[0].weight.clamp_(-0.5, 0.5)
        optimizer.register_step_pre_hook(project)
        session = sessions(model, optimizer)
        assert next(iter(optimizer._optimizer_step_pre_hooks)) == session._copy_hook.id
        gate.open()
        assert_request_saves_its_step(session, 1)
        assert session._overlap_copy
        assert {p.data_ptr() for p in model.parameters()} <= set(gate.copied_by_writer)

    def test_a_global_pre_hook_leaves_the_overlap_off(
            self, sessions: Callable[..., Session]) -> None:
        """Global pre-hooks run before the optimizer's own: ours could not come first."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        handle = register_optimizer_step_pre_hook(lambda *a: None)
        try:
            model, optimizer = model_and_adam()
            session = sessions(model, optimizer)
            assert session._copy_hook is None
            assert optimizer._optimizer_step_pre_hooks == {}
        finally:
            handle.remove()

    def test_result_on_the_thread_that_saved_gives_the_word_itself(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """``pending.result()`` there does not wait for the writer's own look (SETTLE_S)."""
        monkeypatch.setattr(checkpoint_types._Settle, "SETTLE_S", 600.0)
        weight = torch.ones(64)
        manager = CheckpointManager(tmp_path, keep=2)
        pending = manager.save_async({"weight": weight}, step=1, copy_later=[weight])
        saved = pending.result(timeout=WAIT_S)
        assert saved.step == 1 and manager.verify(saved.path)
        pending = manager.save_async({"weight": weight}, step=2, copy_later=[weight])
        assert wait_for(pending.done, "done() polled on the saving thread to see it committed")
