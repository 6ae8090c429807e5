"""Session, in process: the per-step flag, requests and acks, signals, locks, completion, resume.

Real processes (exit codes, kill -9, bit-identical resume) are in test_trainer_e2e.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import pytest
import torch
from integration_helpers import wait_for

from session_watchdog import channel, checksum
from session_watchdog.channel import (
    DAEMON_LOCK,
    RUN_LOCK,
    SAVE_LOCK,
    FileLock,
    Request,
    RunDir,
    TrainerStatus,
    lock_held,
)
from session_watchdog.trainer import checkpoint
from session_watchdog.trainer.session import (
    EXIT_STOPPED,
    Session,
    SessionExit,
    Start,
    StopTraining,
)

WAIT_S = 60.0  # generous upper bound for anything asynchronous (a loaded machine); tests finish far sooner


# --------------------------------------------------------------------------------------------
# Helpers


class CountingRunDir(RunDir):
    """A RunDir that records which thread reads requests and writes statuses (our boundary)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: List[str] = []
        self.writes: List[str] = []

    def read_request(self) -> Optional[Request]:
        self.reads.append(threading.current_thread().name)
        return super().read_request()

    def write_status(self, status: TrainerStatus) -> None:
        self.writes.append(threading.current_thread().name)
        super().write_status(status)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))


def train_step(session: Session) -> None:
    """One real optimizer step on the session's model, then ``session.step()``."""
    model, optimizer = session.model, session.optimizer
    optimizer.zero_grad()
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    session.step()


def step_until(session: Session, predicate: Callable[[], bool], timeout: float = WAIT_S,
               pause: float = 0.001) -> int:
    """Train until ``predicate()`` holds; return the number of steps it took."""
    deadline = time.monotonic() + timeout
    steps = 0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met after {steps} steps / {timeout} s")
        train_step(session)
        steps += 1
        time.sleep(pause)
    return steps


def request(seq: int, action: str = "checkpoint", reason: str = "test") -> Request:
    return Request(seq=seq, action=action, reason=reason, deadline=None, issued=time.time())


def status_of(run_dir: Path) -> TrainerStatus:
    found = RunDir(run_dir).read_status()
    assert found is not None
    return found


def checksum_of(path: str) -> str:
    return checksum.of_file(path, "crc32c")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def make_session(tmp_path: Path, run_dir: Path) -> Iterator[Callable[..., Session]]:
    """Build sessions with fast test settings (no signals, no periodic saves); close them all."""
    made: List[Session] = []

    def make(**kwargs: Any) -> Session:
        kwargs.setdefault("run_dir", run_dir)
        kwargs.setdefault("poll_interval", 0.02)
        kwargs.setdefault("heartbeat_interval", 60.0)
        kwargs.setdefault("checkpoint_every", None)
        kwargs.setdefault("handle_signals", False)
        model = kwargs.pop("model", None) or tiny_model()
        optimizer = kwargs.pop("optimizer", None) or torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9)
        session = Session(kwargs.pop("checkpoint_dir", tmp_path / "ckpt"), model=model,
                          optimizer=optimizer, **kwargs)
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """Whatever a test does, SIGTERM/SIGUSR1 dispositions are as before afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------


class TestPackage:
    def test_importing_the_trainer_package_and_session_does_not_import_torch(self) -> None:
        """`from session_watchdog.trainer import Session` leaves torch unimported until a Session is built."""
        code = ("import sys\nfrom session_watchdog.trainer import Session, EXIT_STOPPED\n"
                "print('torch' in sys.modules, EXIT_STOPPED)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=60)
        assert out.stdout.split() == ["False", "75"]

    def test_a_script_ending_right_after_its_first_async_step_exits_with_its_own_code(
            self, tmp_path: Path) -> None:
        """A script that ends just after its first step with async_save=True exits with its code,
        not SIGABRT from prepare_async's thread being inside an allocation at shutdown."""
        code = (
            "import sys, torch\n"
            "from session_watchdog.trainer import Session\n"
            "model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(256)])\n"
            "opt = torch.optim.Adam(model.parameters())\n"
            "with Session(sys.argv[1] + '/ckpt', model=model, optimizer=opt,\n"
            "             run_dir=sys.argv[1] + '/run', async_save=True, checkpoint_every=None,\n"
            "             handle_signals=False) as session:\n"
            "    model(torch.randn(2, 16)).sum().backward()\n"
            "    opt.step()\n"
            "    session.step()\n"
            "sys.exit(7)\n")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        for attempt in range(3):  # the abort needed the thread inside torch.empty at exit
            out = subprocess.run([sys.executable, "-c", code, str(tmp_path / str(attempt))],
                                 capture_output=True, text=True, timeout=240, env=env)
            assert out.returncode == 7, (attempt, out.returncode, out.stderr[-2000:])

    def test_a_ctrl_c_while_close_waits_still_releases_run_lock(self, tmp_path: Path) -> None:
        """Ctrl-C while close() waits for prepare_async's thread: close() still releases run.lock
        (a second close() returns at once), so the daemon does not see a live trainer forever."""
        code = (
            "import os, signal, sys, threading, time, torch\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)  # also where it is ignored\n"
            "from session_watchdog import channel\n"
            "from session_watchdog.trainer import Session, checkpoint_async\n"
            "closing = threading.Event()\n"
            "real_run = checkpoint_async._Prepare.run\n"
            "def slow_run(self):\n"
            "    closing.wait(120)\n"
            "    time.sleep(2.0)  # close() is waiting for this thread now\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(1.0)\n"
            "    real_run(self)\n"
            "checkpoint_async._Prepare.run = slow_run\n"
            "model = torch.nn.Linear(4, 4)\n"
            "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
            "s = Session(sys.argv[1] + '/ckpt', model=model, optimizer=opt,\n"
            "            run_dir=sys.argv[1] + '/run', async_save=True, handle_signals=False,\n"
            "            checkpoint_every=None)\n"
            "s.step(); s.step()\n"
            "closing.set()\n"
            "try:\n"
            "    s.close()\n"
            "    print('close returned')\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted')\n"
            "s.close()\n"
            "run = channel.RunDir(channel.Path(sys.argv[1] + '/run'))\n"
            "print('held', channel.lock_held(run.file(channel.RUN_LOCK)))\n")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, timeout=240, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split("\n")[:2] == ["interrupted", "held False"], out.stdout

    def test_exit_stopped_is_ex_tempfail(self) -> None:
        """The stop exit code is 75 (sysexits EX_TEMPFAIL: try again later)."""
        assert EXIT_STOPPED == 75


class TestConstruction:
    @pytest.mark.parametrize("kwargs, message", [
        ({"poll_interval": 0}, "Session(poll_interval=0)"),
        ({"heartbeat_interval": -1.0}, "Session(heartbeat_interval=-1.0)"),
        ({"checkpoint_every": 0}, "Session(checkpoint_every=0)"),
        ({"retry_after": 0}, "Session(retry_after=0)"),
    ])
    def test_bad_settings_are_refused_naming_the_value(self, make_session: Callable[..., Session],
                                                       kwargs: Dict[str, Any], message: str) -> None:
        """A non-positive interval raises ValueError quoting the bad argument."""
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            make_session(**kwargs)

    def test_durations_take_the_daemons_strings(self, make_session: Callable[..., Session]) -> None:
        """checkpoint_every="30m" (a TypeError before) and the other durations read like the daemon's."""
        session = make_session(checkpoint_every="30m", poll_interval="250ms",
                               heartbeat_interval="2s", retry_after="1m")
        assert (session.checkpoint_every, session.poll_interval, session.heartbeat_interval,
                session.retry_after) == (1800.0, 0.25, 2.0, 60.0)

    def test_off_turns_periodic_checkpoints_off(self, make_session: Callable[..., Session]) -> None:
        """checkpoint_every="off" is the same as None."""
        assert make_session(checkpoint_every="off").checkpoint_every is None

    def test_a_duration_string_without_a_unit_is_refused(self,
                                                         make_session: Callable[..., Session]) -> None:
        """checkpoint_every="30" is refused with the daemon's hint, not taken as 30 seconds."""
        with pytest.raises(ValueError, match=r"^Session\(checkpoint_every='30'\): '30' has no unit; "
                                             r"write 30s, 30m or 30h"):
            make_session(checkpoint_every="30")

    def test_run_dir_comes_from_the_environment(self, make_session: Callable[..., Session],
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """Without run_dir=, $SESSION_WATCHDOG_RUN_DIR is used (created with mode 0700)."""
        target = tmp_path / "from-env"
        monkeypatch.setenv(channel.ENV_RUN_DIR, str(target))
        session = make_session(run_dir=None)
        assert session.run_dir.path == target
        assert (target.stat().st_mode & 0o777) == 0o700
        assert status_of(target).state == "starting"

    def test_first_heartbeat_names_this_process(self, make_session: Callable[..., Session],
                                                run_dir: Path) -> None:
        """trainer.json is written at once: pid, psutil create_time, state=starting, step 0."""
        import psutil

        make_session()
        status = status_of(run_dir)
        assert (status.pid, status.state, status.step, status.acked_seq) == (
            os.getpid(), "starting", 0, 0)
        assert status.start_time == psutil.Process().create_time()
        assert status.last_checkpoint is None

    def test_a_second_session_in_the_process_is_a_new_trainer(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """Two Sessions in one process (a notebook kernel's re-run) report the same pid and
        create time but their own session_started, so the daemon tells them apart."""
        from session_watchdog.policy import trainer_identity

        make_session().close()
        first = status_of(run_dir)
        make_session()
        second = status_of(run_dir)
        assert (second.pid, second.start_time) == (first.pid, first.start_time)
        assert second.extra["session_started"] > first.extra["session_started"]
        assert trainer_identity(second) == second.extra["session_started"] != trainer_identity(first)


class TestStep:
    def test_step_does_no_protocol_io_in_the_training_thread(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """50,000 steps make no request read or status write from the training thread."""
        counting = CountingRunDir(run_dir)
        session = make_session(run_dir=counting, poll_interval=0.05)
        me = threading.current_thread().name
        counting.reads.clear()
        counting.writes.clear()
        began = time.monotonic()
        for _ in range(50_000):
            session.step()
        time.sleep(0.15)  # let the poller run a few times
        elapsed = time.monotonic() - began
        assert session.global_step == 50_000
        assert me not in counting.reads and me not in counting.writes
        assert set(counting.reads) == {"session-watchdog-poller"}
        assert len(counting.reads) <= elapsed / 0.05 + 2

    def test_heartbeat_is_written_on_its_interval_not_per_step(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """Over 0.6 s of steps with a 0.2 s heartbeat, trainer.json is written a few times, not per step."""
        counting = CountingRunDir(run_dir)
        session = make_session(run_dir=counting, heartbeat_interval=0.2)
        counting.writes.clear()
        steps = 0
        began = time.monotonic()
        while (time.monotonic() - began < 0.6 or steps < 10_000 or not counting.writes) \
                and time.monotonic() - began < WAIT_S:
            session.step()
            steps += 1
            if steps % 1000 == 0:
                time.sleep(0.001)
        elapsed = time.monotonic() - began  # more than 0.6 s on a loaded machine
        # starting->running, then every 0.2 s (however long the loop took), never once per step
        assert 1 <= len(counting.writes) <= elapsed / 0.2 + 3

    def test_heartbeat_reports_running_step_epoch_and_step_time(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """The poller reports state=running, the step counter, the epoch and a measured step time."""
        began = time.monotonic()
        session = make_session(heartbeat_interval=0.05)
        session.epoch = 3
        for _ in range(20):
            session.step()
            time.sleep(0.01)
        wait_for(lambda: status_of(run_dir).step == 20)
        status = status_of(run_dir)
        assert (status.state, status.epoch) == ("running", 3)
        # Steps are >= 10 ms apart; on a loaded machine one can take up to the whole run's time.
        assert status.step_time_s is not None
        assert 0.005 < status.step_time_s <= time.monotonic() - began
        assert status.heartbeat == pytest.approx(time.time(), abs=2.0)


class TestRequests:
    def test_checkpoint_request_is_acked_with_the_file_on_disk(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """A checkpoint request is saved at a step boundary and acked: seq, path, step, bytes, checksum."""
        session = make_session()
        step_until(session, lambda: session.global_step >= 5)
        RunDir(run_dir).write_request(request(1))
        step_until(session, lambda: session.acked_seq == 1)
        status = status_of(run_dir)
        ckpt = status.last_checkpoint
        assert ckpt is not None
        assert status.acked_seq == 1 and ckpt.seq == 1
        assert Path(ckpt.path).is_file() and Path(ckpt.path).is_absolute()
        assert ckpt.bytes == os.path.getsize(ckpt.path)
        assert ckpt.checksum == checksum_of(ckpt.path)
        assert ckpt.step == session.global_step  # saved at the boundary of the step that acked
        assert ckpt.duration_s > 0 and ckpt.at == pytest.approx(time.time(), abs=5.0)
        assert status.extra["checkpoint_duration_s"] == pytest.approx(ckpt.duration_s, abs=1e-5)
        assert status.state == "running"
        saved = torch.load(ckpt.path, weights_only=True)
        assert saved["step"] == ckpt.step
        for name, tensor in session.model.state_dict().items():
            assert torch.equal(saved["model"][name], tensor)

    def test_a_request_is_answered_once(self, make_session: Callable[..., Session],
                                        run_dir: Path) -> None:
        """After the ack, further steps with the same request.json save nothing more."""
        session = make_session(keep=5)
        RunDir(run_dir).write_request(request(1))
        step_until(session, lambda: session.acked_seq == 1)
        for _ in range(30):
            train_step(session)
            time.sleep(0.005)
        assert len(session.manager.list()) == 1

    def test_newer_requests_are_answered_in_turn(self, make_session: Callable[..., Session],
                                                 run_dir: Path) -> None:
        """Requests 1 then 2 give two checkpoints, each acked with its own seq."""
        session = make_session(keep=5)
        RunDir(run_dir).write_request(request(1))
        step_until(session, lambda: session.acked_seq == 1)
        first = status_of(run_dir).last_checkpoint
        RunDir(run_dir).write_request(request(2))
        step_until(session, lambda: session.acked_seq == 2)
        second = status_of(run_dir).last_checkpoint
        assert first is not None and second is not None
        assert (first.seq, second.seq) == (1, 2)
        assert first.path != second.path and second.step > first.step

    def test_stop_request_in_a_script_raises_session_exit_75(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """A stop request checkpoints, acks, then step() raises SessionExit (a SystemExit, code 75)."""
        session = make_session()
        RunDir(run_dir).write_request(request(1, "stop", "session_limit"))
        with pytest.raises(SessionExit) as info:
            step_until(session, lambda: False)
        assert isinstance(info.value, SystemExit) and info.value.code == EXIT_STOPPED
        assert info.value.reason == "request:session_limit"
        status = status_of(run_dir)
        assert (status.state, status.acked_seq) == ("stopped", 1)
        assert status.last_checkpoint is not None
        assert status.last_checkpoint.path == str(info.value.checkpoint.path)
        assert session.stopped and not lock_held(run_dir / RUN_LOCK)

    def test_stop_request_in_a_notebook_raises_stop_training(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """With exit_on_stop=False the stop is a plain Exception, never a SystemExit."""
        session = make_session(exit_on_stop=False)
        RunDir(run_dir).write_request(request(1, "stop"))
        with pytest.raises(StopTraining) as info:
            step_until(session, lambda: False)
        assert not isinstance(info.value, SystemExit)
        assert status_of(run_dir).state == "stopped"
        assert info.value.checkpoint.step == session.global_step

    def test_with_block_ends_cleanly_on_a_notebook_stop(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """`with session:` swallows StopTraining: the cell ends, session.stopped tells why."""
        session = make_session(exit_on_stop=False)
        RunDir(run_dir).write_request(request(1, "stop"))
        with session:
            step_until(session, lambda: False)
        assert session.stopped and session.state == "stopped"
        assert not lock_held(run_dir / RUN_LOCK)

    def test_with_block_lets_session_exit_through(self, make_session: Callable[..., Session],
                                                  run_dir: Path) -> None:
        """`with session:` does not swallow SessionExit: a script still exits with 75."""
        session = make_session()
        RunDir(run_dir).write_request(request(1, "stop"))
        with pytest.raises(SessionExit):
            with session:
                step_until(session, lambda: False)

    def test_request_from_a_previous_trainer_is_not_answered(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """A request issued before this process started was for a previous trainer: ignored."""
        RunDir(run_dir).write_request(Request(seq=4, action="stop", reason="old", deadline=None,
                                              issued=1_000.0))
        session = make_session()
        for _ in range(50):
            train_step(session)
            time.sleep(0.002)
        assert not session.stopped and session.manager.list() == []

    def test_ack_counter_continues_from_the_previous_trainer(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """acked_seq is taken over from trainer.json: an already-acked request is not redone."""
        previous = TrainerStatus(pid=1, start_time=1.0, state="stopped", step=9, epoch=0,
                                 step_time_s=None, acked_seq=7, last_checkpoint=None,
                                 heartbeat=1.0)
        RunDir(run_dir).write_status(previous)
        RunDir(run_dir).write_request(request(7, "stop"))
        session = make_session()
        for _ in range(50):
            train_step(session)
            time.sleep(0.002)
        assert session.acked_seq == 7 and not session.stopped
        RunDir(run_dir).write_request(request(8))
        step_until(session, lambda: session.acked_seq == 8)

    def test_async_save_acks_only_when_durable(self, make_session: Callable[..., Session],
                                               run_dir: Path) -> None:
        """With async_save, training goes on during the write; the ack follows the durable file."""
        session = make_session(async_save=True)
        gate = threading.Event()
        real_save_async = session.manager.save_async

        class GatedPending:
            def __init__(self, pending: Any) -> None:
                self.pending = pending

            def result(self, **kwargs: Any) -> Any:
                gate.wait(WAIT_S)
                return self.pending.result(**kwargs)

        session.manager.save_async = (  # type: ignore[method-assign]
            lambda state, **kw: GatedPending(real_save_async(state, **kw)))
        RunDir(run_dir).write_request(request(1))
        step_until(session, lambda: lock_held(run_dir / SAVE_LOCK))
        at_snapshot = session.global_step
        for _ in range(20):
            train_step(session)
        time.sleep(0.1)
        assert status_of(run_dir).acked_seq == 0  # not durable yet (as far as we know)
        assert lock_held(run_dir / SAVE_LOCK)
        gate.set()
        wait_for(lambda: status_of(run_dir).acked_seq == 1)
        ckpt = status_of(run_dir).last_checkpoint
        assert ckpt is not None and ckpt.step == at_snapshot and ckpt.seq == 1
        assert ckpt.checksum == checksum_of(ckpt.path)
        assert session.manager.verify(ckpt.path)
        assert not lock_held(run_dir / SAVE_LOCK)
        assert len(session.manager.list()) == 1  # the request was not answered twice

    def test_async_write_yields_to_training_until_the_session_waits(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """The write keeps its idle priority while training goes on; close() restores it."""
        session = make_session(async_save=True)
        pendings: List[Any] = []
        real_save_async = session.manager.save_async

        def save_async(state: Any, **kw: Any) -> Any:
            pendings.append(real_save_async(state, **kw))
            return pendings[-1]

        session.manager.save_async = save_async  # type: ignore[method-assign]
        gate = threading.Event()
        real_write = session.manager._write

        def gated_write(*args: Any, **kw: Any) -> Any:  # the writer waits until the test says
            gate.wait(WAIT_S)
            return real_write(*args, **kw)

        session.manager._write = gated_write  # type: ignore[method-assign]
        closer = threading.Thread(target=session.close)
        try:
            RunDir(run_dir).write_request(request(1))
            step_until(session, lambda: bool(pendings))
            for _ in range(20):
                train_step(session)
            assert not pendings[0]._yielding.hurried  # the ack thread waits without hurrying
            closer.start()
            wait_for(lambda: pendings[0]._yielding.hurried)
        finally:
            gate.set()
        closer.join(WAIT_S)
        assert not closer.is_alive()
        assert status_of(run_dir).acked_seq == 1

    def test_failed_requested_save_is_reported_and_not_acked(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """A checkpoint that cannot be written is reported (extra.last_error), not acked; training goes on."""
        session = make_session(retry_after=60.0)
        session.manager.save = _failing_save(session)  # type: ignore[method-assign]
        RunDir(run_dir).write_request(request(1))
        step_until(session, lambda: "last_error" in status_of(run_dir).extra)
        for _ in range(20):
            train_step(session)
            time.sleep(0.002)
        status = status_of(run_dir)
        assert status.acked_seq == 0 and status.last_checkpoint is None
        assert status.extra["last_error"].startswith("CheckpointWriteError: cannot save")
        assert "ENOSPC" in status.extra["last_error"]
        assert status.state == "running" and not session.stopped
        assert session.manager.save.calls == 1  # type: ignore[attr-defined]  # no retry yet

    def test_failed_stop_save_fails_loudly(self, make_session: Callable[..., Session],
                                           run_dir: Path) -> None:
        """A stop whose checkpoint cannot be written raises the error and reports failed, not stopped."""
        session = make_session()
        session.manager.save = _failing_save(session)  # type: ignore[method-assign]
        RunDir(run_dir).write_request(request(1, "stop"))
        with pytest.raises(checkpoint.CheckpointWriteError):
            step_until(session, lambda: False)
        status = status_of(run_dir)
        assert (status.state, status.acked_seq) == ("failed", 0)
        assert not session.stopped and not lock_held(run_dir / RUN_LOCK)


def _failing_save(session: Session) -> Callable[..., Any]:
    """A manager.save that fails as a full disk does (the error the checkpoint module raises)."""

    def save(state: Dict[str, Any], **kwargs: Any) -> Any:
        save.calls += 1  # type: ignore[attr-defined]
        raise checkpoint.CheckpointWriteError(
            session.manager.directory / "ckpt-00000001-step1.pt",
            OSError(28, "No space left on device"), errno=28)

    save.calls = 0  # type: ignore[attr-defined]
    return save


def _break_directory(directory: Path) -> None:
    """Make every save into ``directory`` fail, even as root: replace it by a regular file."""
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    directory.write_bytes(b"not a directory")


class TestMalformedRequests:
    @pytest.mark.parametrize("content", [
        pytest.param(b"\x00\xffnot json{", id="garbage"),
        pytest.param(json.dumps({"v": 99, "seq": 1, "action": "stop", "reason": "x",
                                 "deadline": None, "issued": 2e9}).encode(), id="wrong_version"),
        pytest.param(json.dumps({"v": 1, "seq": 1, "action": "reboot", "reason": "x",
                                 "deadline": None, "issued": 2e9}).encode(), id="unknown_action"),
        pytest.param(json.dumps({"v": 1, "seq": -3, "action": "stop", "reason": "x",
                                 "deadline": None, "issued": 2e9}).encode(), id="negative_seq"),
        pytest.param(json.dumps({"v": 1, "seq": "1", "action": "stop", "reason": "x",
                                 "deadline": None, "issued": 2e9}).encode(), id="string_seq"),
        pytest.param(b"[1, 2, 3]", id="not_an_object"),
        pytest.param(b'{"v": 1, "pad": "' + b"x" * (channel.MAX_FILE_BYTES + 10) + b'"}',
                     id="oversized"),
        pytest.param(None, id="symlink"),
    ])
    def test_malformed_request_is_logged_and_ignored(
            self, make_session: Callable[..., Session], run_dir: Path, tmp_path: Path,
            caplog: pytest.LogCaptureFixture, content: Optional[bytes]) -> None:
        """A hostile or broken request.json never crashes training and is logged once."""
        session = make_session()
        target = run_dir / channel.REQUEST_FILE
        if content is None:
            planted = tmp_path / "planted.json"
            planted.write_text(json.dumps(request(1, "stop").to_json()))
            target.symlink_to(planted)
        else:
            target.write_bytes(content)
        with caplog.at_level(logging.WARNING, logger="session_watchdog.trainer.session"):
            step_until(session, lambda: any(getattr(r, "event", None) == "request_ignored"
                                            for r in caplog.records))
            for _ in range(60):
                train_step(session)
                time.sleep(0.002)
        assert not session.stopped and session.acked_seq == 0
        assert session.manager.list() == []
        ignored = [r for r in caplog.records if getattr(r, "event", None) == "request_ignored"]
        assert len(ignored) == 1
        # A valid request afterwards is still answered.
        target.unlink()
        RunDir(run_dir).write_request(request(1))
        step_until(session, lambda: session.acked_seq == 1)


class TestSignals:
    def test_sigusr1_without_a_daemon_checkpoints_and_stops(
            self, make_session: Callable[..., Session], run_dir: Path,
            restore_signals: None) -> None:
        """SIGUSR1 with no request and no daemon (SLURM --signal) means checkpoint and stop."""
        session = make_session(handle_signals=True, exit_on_stop=False, poll_interval=60.0)
        train_step(session)
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(StopTraining) as info:
            step_until(session, lambda: False)
        assert info.value.reason == "SIGUSR1"
        status = status_of(run_dir)
        assert status.state == "stopped" and status.last_checkpoint is not None
        assert status.last_checkpoint.seq is None

    def test_sigterm_checkpoints_and_stops(self, make_session: Callable[..., Session],
                                           run_dir: Path, restore_signals: None) -> None:
        """SIGTERM means checkpoint and stop, daemon or not."""
        session = make_session(handle_signals=True, exit_on_stop=False, poll_interval=60.0)
        holder = FileLock(run_dir / DAEMON_LOCK)
        holder.acquire()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(StopTraining) as info:
                step_until(session, lambda: False)
        finally:
            holder.release()
        assert info.value.reason == "SIGTERM"
        assert status_of(run_dir).state == "stopped"

    def test_sigusr1_from_a_daemon_wakes_the_trainer_for_its_request(
            self, make_session: Callable[..., Session], run_dir: Path,
            restore_signals: None) -> None:
        """With a daemon, SIGUSR1 reads the request at the next step (no poll wait) and is no stop."""
        session = make_session(handle_signals=True, poll_interval=60.0)
        holder = FileLock(run_dir / DAEMON_LOCK)
        holder.acquire()
        try:
            RunDir(run_dir).write_request(request(1))
            os.kill(os.getpid(), signal.SIGUSR1)
            train_step(session)
            assert session.acked_seq == 1  # handled at the very next step boundary
            os.kill(os.getpid(), signal.SIGUSR1)  # a resend for an acked request: a wake-up only
            for _ in range(5):
                train_step(session)
        finally:
            holder.release()
        assert not session.stopped and session.state in ("starting", "running")
        assert len(session.manager.list()) == 1

    def test_previous_handlers_are_chained_and_restored(
            self, make_session: Callable[..., Session], restore_signals: None) -> None:
        """A handler installed before the session still runs, and is back after close()."""
        calls: List[int] = []

        def previous(signum: int, frame: Any) -> None:
            calls.append(signum)

        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, previous)
        session = make_session(handle_signals=True, exit_on_stop=False)
        assert signal.getsignal(signal.SIGUSR1) is not previous
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(StopTraining):
            step_until(session, lambda: False)
        assert calls == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is previous

    def test_close_restores_default_dispositions(self, make_session: Callable[..., Session],
                                                 restore_signals: None) -> None:
        """close() puts SIG_DFL back where it was."""
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        session = make_session(handle_signals=True)
        session.close()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    def test_no_handlers_from_a_non_main_thread(self, make_session: Callable[..., Session],
                                                restore_signals: None) -> None:
        """A session built in a worker thread (a notebook's) leaves signal handlers alone."""
        before = signal.getsignal(signal.SIGUSR1)
        built: List[Session] = []
        worker = threading.Thread(target=lambda: built.append(make_session(handle_signals=True)))
        worker.start()
        worker.join()
        assert built and signal.getsignal(signal.SIGUSR1) is before


class TestLocks:
    def test_run_lock_is_held_shared_while_the_session_lives(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """run.lock is held from construction to close(); a second shared holder is fine."""
        session = make_session()
        assert lock_held(run_dir / RUN_LOCK)
        other = FileLock(run_dir / RUN_LOCK, shared=True)
        assert other.acquire(blocking=False)  # another rank of the same job may share it
        other.release()
        session.close()
        assert not lock_held(run_dir / RUN_LOCK)

    def test_save_lock_is_held_exactly_while_saving(self, make_session: Callable[..., Session],
                                                    run_dir: Path) -> None:
        """save.lock is held (and state=saving) during a save, free before and after."""
        session = make_session()
        entered, release = threading.Event(), threading.Event()
        real_save = session.manager.save

        def slow_save(state: Dict[str, Any], **kwargs: Any) -> Any:
            entered.set()
            release.wait(WAIT_S)
            return real_save(state, **kwargs)

        session.manager.save = slow_save  # type: ignore[method-assign]
        assert not lock_held(run_dir / SAVE_LOCK)
        trainer = threading.Thread(target=session.checkpoint)
        trainer.start()
        assert entered.wait(WAIT_S)
        assert lock_held(run_dir / SAVE_LOCK)
        assert status_of(run_dir).state == "saving"
        release.set()
        trainer.join(WAIT_S)
        assert not lock_held(run_dir / SAVE_LOCK)
        assert status_of(run_dir).state == "starting"


class TestPeriodic:
    def test_periodic_checkpoints_without_a_daemon(self, make_session: Callable[..., Session],
                                                   run_dir: Path) -> None:
        """checkpoint_every=0.2 s: checkpoints keep coming, no sooner than 0.2 s apart, with no request."""
        began = time.monotonic()  # before the session: its period counts from its creation
        session = make_session(checkpoint_every=0.2, keep=10)
        step_until(session, lambda: len(session.manager.list()) >= 3, pause=0.005)
        assert time.monotonic() - began >= 0.6
        saved = session.manager.list()
        status = status_of(run_dir)
        assert status.last_checkpoint is not None and status.last_checkpoint.seq is None
        assert status.acked_seq == 0
        assert status.last_checkpoint.path == str(saved[-1].path)

    def test_periodic_checkpoints_can_be_turned_off(self, make_session: Callable[..., Session]
                                                    ) -> None:
        """checkpoint_every=None: no checkpoint without a request or signal."""
        session = make_session(checkpoint_every=None)
        began = time.monotonic()
        step_until(session, lambda: time.monotonic() - began > 0.3, pause=0.005)
        assert session.manager.list() == []


class TestComplete:
    def test_complete_reports_completed_after_a_verified_final_checkpoint(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """complete() saves, verifies, then writes state=completed with that checkpoint, and closes."""
        session = make_session()
        seen_at_verify: List[str] = []
        real_verify = session.manager.verify

        def verify(path: Any) -> bool:
            seen_at_verify.append(status_of(run_dir).state)
            return real_verify(path)

        session.manager.verify = verify  # type: ignore[method-assign]
        for _ in range(7):
            train_step(session)
        saved = session.complete(end_runtime_after="complete")
        assert seen_at_verify and "completed" not in seen_at_verify
        status = status_of(run_dir)
        assert status.state == "completed" and status.step == 7
        assert status.last_checkpoint is not None
        assert status.last_checkpoint.path == str(saved.path)
        assert status.last_checkpoint.checksum == checksum_of(str(saved.path))
        # complete() read it back from disk: the end of the runtime need not (issue 17)
        assert status.last_checkpoint.mtime_ns == os.stat(saved.path).st_mtime_ns
        assert status.last_checkpoint.verified_at is not None
        assert not lock_held(run_dir / RUN_LOCK)

    def test_failed_final_save_is_not_completed(self, make_session: Callable[..., Session],
                                                run_dir: Path) -> None:
        """When the final checkpoint cannot be written (disk full), complete() raises and state=failed."""
        session = make_session()
        train_step(session)
        session.manager.save = _failing_save(session)  # type: ignore[method-assign]
        with pytest.raises(checkpoint.CheckpointWriteError):
            session.complete()
        status = status_of(run_dir)
        assert status.state == "failed"
        assert status.last_checkpoint is None
        assert not lock_held(run_dir / RUN_LOCK)

    def test_unwritable_checkpoint_directory_is_not_completed(
            self, make_session: Callable[..., Session], run_dir: Path, tmp_path: Path) -> None:
        """A checkpoint directory gone bad under the trainer (even for root) ends in failed."""
        session = make_session(checkpoint_dir=tmp_path / "ckpt")
        train_step(session)
        _break_directory(tmp_path / "ckpt")
        with pytest.raises((checkpoint.CheckpointError, OSError)):
            session.complete()
        assert status_of(run_dir).state == "failed"

    def test_final_checkpoint_failing_verification_is_not_completed(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """A final checkpoint that does not verify leaves state=failed, never completed."""
        session = make_session()
        session.manager.verify = lambda path: False  # type: ignore[method-assign]
        with pytest.raises(checkpoint.CheckpointError, match="failed verification"):
            session.complete()
        assert status_of(run_dir).state == "failed"

    def test_an_exception_in_the_with_block_reports_failed(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """An error escaping `with session:` writes state=failed with the error, and propagates."""
        session = make_session()
        with pytest.raises(RuntimeError):
            with session:
                train_step(session)
                raise RuntimeError("CUDA out of memory")
        status = status_of(run_dir)
        assert status.state == "failed"
        assert status.extra["error"] == "RuntimeError: CUDA out of memory"
        tail = status.extra["traceback"].splitlines()  # for the "training failed" notification
        assert tail[-2:] == ['    raise RuntimeError("CUDA out of memory")',
                             "RuntimeError: CUDA out of memory"] and len(tail) <= 6
        assert not lock_held(run_dir / RUN_LOCK)

    def test_complete_answers_an_open_request(self, make_session: Callable[..., Session],
                                              run_dir: Path) -> None:
        """A request the poller saw but no step answered yet is acked by the final checkpoint."""
        session = make_session()
        RunDir(run_dir).write_request(request(3))
        wait_for(lambda: session._request is not None)
        session.complete()
        status = status_of(run_dir)
        assert (status.state, status.acked_seq) == ("completed", 3)
        assert status.last_checkpoint is not None and status.last_checkpoint.seq == 3


class TestResume:
    def test_fresh_start(self, make_session: Callable[..., Session]) -> None:
        """With no checkpoint, resume() reports epoch 0, step 0, not resumed."""
        assert make_session().resume() == Start(epoch=0, step=0, elapsed_s=0.0, resumed=False,
                                                path=None, batch=0, extras={})

    def test_resume_restores_model_optimizer_rng_and_counters(
            self, make_session: Callable[..., Session], run_dir: Path) -> None:
        """resume() loads the newest checkpoint bit-identically, RNG included, with its counters."""
        session = make_session()
        for epoch in session.epochs(3):
            for _ in range(4 if epoch < 2 else 3):
                train_step(session)
            if epoch == 2:
                break
        session.extras["best"] = 0.25
        torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
        saved = session.checkpoint()
        model_state = {k: v.clone() for k, v in session.model.state_dict().items()}
        optim_state = session.optimizer.state_dict()
        session.close()

        torch.rand(10), random.random(), np.random.rand()  # move every RNG on
        resumed = make_session(model=torch.nn.Sequential(torch.nn.Linear(4, 8),
                                                         torch.nn.Dropout(0.2),
                                                         torch.nn.Linear(8, 2)))
        start = resumed.resume()
        assert start == Start(epoch=2, step=11, elapsed_s=start.elapsed_s, resumed=True,
                              path=Path(saved.path), batch=3, extras={"best": 0.25})
        assert start.elapsed_s > 0
        assert (resumed.global_step, resumed.epoch) == (11, 2)
        for name, tensor in resumed.model.state_dict().items():
            assert torch.equal(tensor, model_state[name])
        new_optim = resumed.optimizer.state_dict()
        for index, entry in optim_state["state"].items():
            assert torch.equal(new_optim["state"][index]["momentum_buffer"],
                               entry["momentum_buffer"])
        assert torch.equal(torch.get_rng_state(), torch_rng)
        assert random.getstate() == py_rng
        assert np.array_equal(np.random.get_state()[1], np_rng[1])
        assert status_of(run_dir).last_checkpoint is not None

    def test_epochs_continue_from_the_resumed_epoch(self, make_session: Callable[..., Session]
                                                    ) -> None:
        """After resume() at epoch 2, epochs(4) yields 2 and 3."""
        session = make_session()
        session.epoch = 2
        train_step(session)
        session.checkpoint()
        session.close()
        resumed = make_session()
        start = resumed.resume()
        assert (start.epoch, start.batch) == (2, 1)
        assert list(resumed.epochs(4)) == [2, 3]


class TestForgottenResume:
    """A run that never calls resume() must not prune the checkpoints of later steps it finds
    (issue 11: saves at steps 2 and 3 deleted the step-100 checkpoint)."""

    def _earlier_run(self, make_session: Callable[..., Session], steps: int) -> Path:
        session = make_session(keep=2)
        for _ in range(steps):
            train_step(session)
        saved = session.checkpoint()
        session.close()
        return Path(saved.path)

    def test_later_checkpoints_are_kept_with_one_warning(
            self, make_session: Callable[..., Session], caplog: pytest.LogCaptureFixture) -> None:
        """Saves at steps 1-3 without resume() keep the step-12 checkpoint (verified), prune only
        their own older ones, and warn once."""
        earlier = self._earlier_run(make_session, 12)
        session = make_session(keep=2)
        with caplog.at_level(logging.WARNING, logger="session_watchdog.trainer.session"):
            for _ in range(3):
                train_step(session)
                session.checkpoint()
        assert [saved.step for saved in session.manager.list()] == [12, 2, 3]
        assert session.manager.verify(earlier)
        kept = [r for r in caplog.records if getattr(r, "event", None) == "checkpoints_ahead_kept"]
        assert len(kept) == 1
        fields = getattr(kept[0], "fields")
        assert (fields["count"], fields["newest_step"], fields["newest_path"], fields["step"]) == (
            1, 12, str(earlier), 1)

    def test_close_drops_the_async_snapshot_buffers(
            self, make_session: Callable[..., Session]) -> None:
        """A closed session's manager keeps no copy of the state's tensors for a next save."""
        import gc
        import weakref

        session = make_session(async_save=True)
        train_step(session)  # the first step prepares the snapshot buffers
        session.run_dir.write_request(request(1))
        step_until(session, lambda: session.acked_seq >= 1)
        manager = session.manager
        held = [weakref.ref(buf) for buf in
                [*manager._spare.values(), *manager._prepare._buffers.values()]]
        assert held
        session.close()
        gc.collect()
        assert [ref for ref in held if ref() is not None] == []

    def test_kept_with_async_saves_too(self, make_session: Callable[..., Session]) -> None:
        """Background (async) saves of a run that did not resume keep the later checkpoint too."""
        # The earlier run is far ahead (2000 steps): on a loaded machine the poller may take many
        # steps to see each request, and a checkpoint this run has overtaken is not "later".
        earlier = self._earlier_run(make_session, 2000)
        session = make_session(keep=1, async_save=True)
        for seq in (1, 2, 3):
            train_step(session)
            session.run_dir.write_request(request(seq))
            step_until(session, lambda seq=seq: session.acked_seq >= seq)  # type: ignore[misc]
        session.manager.wait()
        steps = [saved.step for saved in session.manager.list()]
        assert steps[0] == 2000 and len(steps) == 2 and session.manager.verify(earlier)

    def test_a_run_that_resumed_prunes_as_usual(self, make_session: Callable[..., Session]) -> None:
        """After resume(), keep-last-K applies to every checkpoint (nothing is held back)."""
        self._earlier_run(make_session, 12)
        session = make_session(keep=2)
        assert session.resume().step == 12
        for _ in range(2):
            train_step(session)
            session.checkpoint()
        assert [saved.step for saved in session.manager.list()] == [13, 14]

    def test_a_sharded_save_of_a_step_the_earlier_run_saved_writes_this_runs_state(
            self, make_session: Callable[..., Session]) -> None:
        """sharded=True without resume(): checkpoint() at a step the run before committed saves
        this run's weights there (never the earlier run's directory reported as this save)."""
        earlier = make_session(sharded=True)
        for _ in range(4):
            train_step(earlier)
        first = earlier.checkpoint()
        earlier.close()
        session = make_session(sharded=True)
        for _ in range(4):
            train_step(session)
        with torch.no_grad():
            for param in session.model.parameters():
                param.fill_(7.0)
        saved = session.checkpoint()
        assert saved.step == first.step == 4 and saved.sha256 != first.sha256
        session.close()
        fresh = make_session(sharded=True, model=torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2)))
        assert fresh.resume().step == 4
        assert all(bool((param == 7.0).all()) for param in fresh.model.parameters())

    def test_sharded_saves_keep_later_step_directories_with_one_warning(
            self, make_session: Callable[..., Session],
            caplog: pytest.LogCaptureFixture) -> None:
        """sharded=True, keep=1, no resume(): saves at steps 1-3 keep the earlier run's step-12
        directory (loadable), prune only their own older ones, and warn once."""
        earlier = make_session(sharded=True, keep=1)
        for _ in range(12):
            train_step(earlier)
        kept_dir = Path(earlier.checkpoint().path).parent
        earlier.close()
        session = make_session(sharded=True, keep=1)
        with caplog.at_level(logging.WARNING, logger="session_watchdog.trainer.session"):
            for _ in range(3):
                train_step(session)
                session.checkpoint()
        assert sorted(os.listdir(kept_dir.parent)) == ["step-0000000003", "step-0000000012"]
        assert session._sharded_ckpt is not None
        assert session._sharded_ckpt.verify(kept_dir) is not None
        kept = [r for r in caplog.records if getattr(r, "event", None) == "checkpoints_ahead_kept"]
        assert len(kept) == 1
        fields = getattr(kept[0], "fields")
        assert (fields["count"], fields["newest_step"], fields["step"]) == (1, 12, 1)
