"""Notebook mode as a user drives it (issue 16): launch(), wait() on the right trainer, stop() and
a quick restart, status() after stop - real trainer processes, and a real Jupyter kernel where
ipykernel and jupyter_client are installed."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import psutil
import pytest
from fakes import FakeClock
from fakes import status as fake_status
from integration_helpers import wait_for

import session_watchdog as sw
from session_watchdog import channel, notebook, report
from session_watchdog.policy import Outstanding, PolicyState

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 120.0  # generous: the machine is busy

TRAINER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from session_watchdog.trainer import Session

    ckpt, finish, steps, code = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session(ckpt, model=model, optimizer=opt, poll_interval=0.05,
                      heartbeat_interval=0.1, checkpoint_every=None)
    x = torch.randn(8, 4)
    print("trainer started", flush=True)
    while session.global_step < steps or not finish.exists():
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step()
        time.sleep(0.01)
    if code:
        print(f"giving up with exit code {code}", flush=True)
        session.close()
        sys.exit(code)
    session.complete()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def killed_trainer_status(step: int, heartbeat: float) -> channel.TrainerStatus:
    """The last trainer.json of a trainer killed with SIGKILL (OOM): it says running, and names a
    real process, with its real create time, that is gone now."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        created = psutil.Process(proc.pid).create_time()
    finally:
        proc.kill()
        proc.wait(DEADLINE_S)
    return fake_status(state="running", step=step, pid=proc.pid, start_time=created,
                       heartbeat=heartbeat)


@pytest.fixture
def cfg(tmp_path) -> Dict[str, Any]:
    return {"run_dir": str(tmp_path / "run"), "log_file": str(tmp_path / "log.jsonl"),
            "interval": "0.2s", "platform": "generic"}


@pytest.fixture
def trainer_script(tmp_path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(TRAINER)
    return path


@pytest.fixture
def reap() -> Iterator[List[int]]:
    """Process groups to kill at the end of the test, whatever happened."""
    groups: List[int] = []
    yield groups
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def trainer_argv(script: Path, tmp_path: Path, steps: int, code: int = 0) -> List[str]:
    return [sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "finish"),
            str(steps), str(code)]


def log_events(path: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TestLaunch:
    def test_a_launched_trainer_runs_in_its_own_session_with_output_in_a_file(
            self, shell, cfg, tmp_path, trainer_script, reap, monkeypatch):
        """launch() starts the command as a session leader, run dir in its env, output in a log."""
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        (tmp_path / "finish").touch()
        launched = sw.launch(trainer_argv(trainer_script, tmp_path, 5), **cfg)
        reap.append(launched.pid)
        assert os.getsid(launched.pid) == launched.pid != os.getsid(0)
        result = sw.wait(poll=0.05, view="text", file=io.StringIO())
        assert (result.reason, result.state, result.step) == ("completed", "completed", 5)
        assert launched.output.parent == Path(cfg["log_file"]).parent
        assert launched.output.name.startswith("train-")
        assert "trainer started" in launched.tail(5)
        steps = [e.get("step") for e in log_events(cfg["log_file"]) if e["event"] == "action"]
        assert "launch" in steps

    def test_wait_ignores_the_previous_runs_final_state(
            self, shell, cfg, tmp_path, trainer_script, reap, monkeypatch):
        """A completed trainer.json from the last run does not end wait() on a new launch."""
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        run_dir = channel.RunDir(Path(cfg["run_dir"]))
        run_dir.write_status(fake_status(state="completed", step=999, pid=1,
                                         heartbeat=time.time() - 600))
        (tmp_path / "finish").touch()
        launched = sw.launch(trainer_argv(trainer_script, tmp_path, 30), **cfg)
        reap.append(launched.pid)
        result = sw.wait(poll=0.05, view="text", file=io.StringIO())
        assert (result.reason, result.state, result.step) == ("completed", "completed", 30)

    @pytest.mark.parametrize("last", ["completed", "killed"])
    def test_wait_waits_for_a_new_trainer_started_without_launch(
            self, shell, cfg, tmp_path, trainer_script, reap, monkeypatch, last):
        """A trainer started with Popen right before wait(): the old final state is not it, nor
        the "running" left by a trainer killed before wait() was called."""
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        sw.start(**cfg)
        run_dir = channel.RunDir(Path(cfg["run_dir"]))
        run_dir.write_status(fake_status(state="completed", step=999, pid=1,
                                         heartbeat=time.time() - 600) if last == "completed"
                             else killed_trainer_status(999, time.time() - 600))
        (tmp_path / "finish").touch()
        env = dict(os.environ, SESSION_WATCHDOG_RUN_DIR=cfg["run_dir"])
        proc = subprocess.Popen(trainer_argv(trainer_script, tmp_path, 30), env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL)
        reap.append(proc.pid)
        try:
            result = sw.wait(poll=0.05, view="text", file=io.StringIO(), start_timeout=DEADLINE_S)
        finally:
            proc.wait(DEADLINE_S)
        assert (result.reason, result.state, result.step) == ("completed", "completed", 30)

    def test_a_new_trainer_holding_run_lock_before_its_first_status_is_waited_for(
            self, shell, cfg):
        """run.lock held (a new trainer starting) beside the last run's completed trainer.json:
        wait() waits for the new trainer's own status instead of reporting the old one."""
        sw.start(**cfg)
        run_dir = channel.RunDir(Path(cfg["run_dir"]))
        run_dir.write_status(fake_status(state="completed", step=999, pid=1,
                                         heartbeat=time.time() - 600))
        lock = channel.FileLock(run_dir.file(channel.RUN_LOCK), shared=True)
        lock.acquire()
        try:
            result = sw.wait(poll=0.05, view="text", file=io.StringIO(), timeout=0.5)
        finally:
            lock.release()
        assert (result.reason, result.state) == ("timeout", None)

    def test_a_launched_trainer_that_exits_without_completing_ends_wait_with_its_code(
            self, shell, cfg, tmp_path, trainer_script, reap, monkeypatch):
        """Exit code 3 before complete(): wait() says so, names the output file, shows its tail."""
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        (tmp_path / "finish").touch()
        launched = sw.launch(trainer_argv(trainer_script, tmp_path, 5, code=3), **cfg)
        reap.append(launched.pid)
        out = io.StringIO()
        result = sw.wait(poll=0.05, view="text", file=out)
        last = channel.RunDir(Path(cfg["run_dir"]), create=False).read_status()
        assert (result.reason, result.step) == ("trainer_gone", last.step)
        lines = out.getvalue().splitlines()
        assert "  | giving up with exit code 3" in lines
        assert lines[-1] == (f"session-watchdog: the launched trainer (pid {launched.pid}) exited "
                             f"with code 3 at step {last.step} without reporting completion; its output: "
                             f"{launched.output}")

    def test_a_second_launch_while_the_first_runs_is_refused(
            self, shell, cfg, tmp_path, trainer_script, reap, monkeypatch):
        """One launched trainer at a time: the second call raises, naming the first's pid."""
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        launched = sw.launch(trainer_argv(trainer_script, tmp_path, 5), **cfg)
        reap.append(launched.pid)
        with pytest.raises(RuntimeError, match=f"still runs \\(pid {launched.pid}\\)"):
            sw.launch(trainer_argv(trainer_script, tmp_path, 5))
        (tmp_path / "finish").touch()
        assert sw.wait(poll=0.05, view="text", file=io.StringIO()).reason == "completed"

    def test_a_fixed_launch_after_a_failed_one_is_judged_afresh(self, shell, cfg, reap):
        """A launched command fails (exit 1), then the fixed one exits 0: the new run is judged
        on its own, as a new command under ``run`` is, so end_when_done ends the runtime."""
        handle = sw.start(**cfg, grace="0.1s", end_when_done=True, end_command="/bin/false")
        calls: List[int] = []
        handle.watchdog.end_action = ("recorder", lambda: calls.append(1) or "ok")
        handle.watchdog.confirm_after_s = 0.0
        first = sw.launch([sys.executable, "-c", "raise SystemExit(1)"])
        reap.append(first.pid)
        wait_for(lambda: handle.watchdog.state.failed, "the failure", timeout=DEADLINE_S)
        assert handle.watchdog.end is None
        second = sw.launch([sys.executable, "-c", "print('trained')"])
        reap.append(second.pid)
        # the outcome, not wait_end(): self.end is set before the end thread is started
        wait_for(lambda: handle.watchdog.end is not None and handle.watchdog.end.outcome == "ended",
                 "the end", timeout=DEADLINE_S)
        assert calls
        assert second.exit_code() == 0 and handle.watchdog.state.failed is False

    @pytest.mark.parametrize("argv", ["python train.py", []])
    def test_a_command_that_is_not_a_list_is_refused(self, shell, cfg, argv):
        """A string or an empty list raises ValueError naming the expected form."""
        with pytest.raises(ValueError, match="expected the command as a non-empty list"):
            sw.launch(argv, **cfg)


class TestWaitClaims:
    def test_an_interrupted_wait_without_a_live_trainer_does_not_claim_training_runs(
            self, shell, cfg, sigint_raises):
        """Ctrl-C with no trainer alive: wait() says no trainer is running."""
        handle = sw.start(**cfg)
        main = threading.main_thread().ident

        def interrupt() -> None:
            wait_for(lambda: handle.tracker.executing)
            time.sleep(0.2)
            signal.pthread_kill(main, signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        out = io.StringIO()
        result = sw.wait(poll=0.05, view="text", file=out)
        assert result.reason == "interrupted"
        assert out.getvalue().splitlines()[-1] == (
            "session-watchdog: wait() interrupted; no trainer is running; the watchdog keeps "
            "running (session_watchdog.status() shows it)")

    def test_a_dead_trainers_last_running_state_is_not_shown_as_running(self, shell, cfg):
        """trainer.json says running but nothing holds run.lock: the view says no live trainer."""
        sw.start(**cfg)
        channel.RunDir(Path(cfg["run_dir"])).write_status(
            fake_status(state="running", step=7, heartbeat=time.time()))
        out = io.StringIO()
        sw.wait(poll=0.05, view="text", file=out, timeout=0.3)
        assert "no live trainer (last report: running, step 7)" in out.getvalue()
        assert "| running, step 7" not in out.getvalue()

    def test_a_trainer_killed_before_wait_is_reported_gone_once_no_new_one_starts(
            self, shell, cfg):
        """trainer.json says running, written a minute before wait() by a process killed since,
        run.lock free: wait() gives a new trainer start_timeout to appear, then says the last
        one is gone (it does not block forever, keeping the kernel busy)."""
        sw.start(**cfg)
        channel.RunDir(Path(cfg["run_dir"])).write_status(
            killed_trainer_status(1234, time.time() - 60))
        out = io.StringIO()
        result = sw.wait(poll=0.05, view="text", file=out, start_timeout=1.0, timeout=60)
        assert (result.reason, result.state, result.step) == ("trainer_gone", "running", 1234)
        last = out.getvalue().splitlines()[-1]
        assert re.fullmatch(r"session-watchdog: no new trainer started in 1s; the last one "
                            r"\(pid \d+\) is gone without reporting completion \(killed\? out of "
                            r"memory\?\), last at step 1234, 1m\d\ds before wait\(\) was called",
                            last), last

    def test_a_trainer_that_died_before_wait_saw_it_alive_is_gone_at_once(self, shell, cfg):
        """A trainer that wrote trainer.json after wait() began and died before wait() saw it
        alive (between two polls) is reported gone without waiting for another one."""
        handle = sw.start(**cfg)
        run_dir = channel.RunDir(Path(cfg["run_dir"]))

        def trainer_came_and_died() -> bool:
            if run_dir.read_status() is None and handle.tracker.waiting:
                run_dir.write_status(killed_trainer_status(42, time.time()))
            return False

        result = sw.wait(poll=0.05, until=trainer_came_and_died, view="text", file=io.StringIO(),
                         start_timeout=DEADLINE_S, timeout=60)
        assert (result.reason, result.state, result.step) == ("trainer_gone", "running", 42)


class TestStopAndRestart:
    def test_a_quick_restart_keeps_the_trainers_final_state_and_the_report_says_so(
            self, shell, cfg, tmp_path, trainer_script, reap, monkeypatch):
        """Trainer completes, stop(), start() 1.5 s later: the log and report say completed."""
        monkeypatch.setenv("PYTHONPATH", str(ROOT))
        # One tick an hour: only start() ticks, so the completion is seen by stop()'s reading.
        slow = dict(cfg, interval="1h")
        launched = sw.launch(trainer_argv(trainer_script, tmp_path, 5), **slow)
        reap.append(launched.pid)
        run_dir = channel.RunDir(Path(cfg["run_dir"]), create=False)
        wait_for(lambda: (run_dir.read_status() or fake_status(state="none")).state == "running")
        handle = notebook._running_handle()
        wait_for(lambda: handle.watchdog.tick() is not None
                 and handle.watchdog.state.trainer_pid == launched.pid)
        (tmp_path / "finish").touch()
        launched.proc.wait(DEADLINE_S)
        sw.stop()
        time.sleep(1.5)  # the heartbeat is now older than the next watchdog's start - 1 s
        handle = sw.start(**slow)
        wait_for(lambda: handle.watchdog.ticks >= 1)
        sw.stop()
        samples = [e for e in log_events(cfg["log_file"]) if e["event"] == "sample"]
        assert samples[-1]["trainer"]["state"] == "completed"
        assert samples[-2]["trainer"]["state"] == "completed"  # stop()'s final reading
        summary = report.load([Path(cfg["log_file"])]).summary
        assert summary["trainer"]["state"] == "completed"


class TestStatusAfterStop:
    def test_status_after_stop_reads_the_run_dir_the_user_passed(self, shell, cfg):
        """After stop(), status() without arguments still shows the run dir given to start()."""
        sw.start(**cfg)
        sw.stop()
        assert sw.status().value("run dir") == cfg["run_dir"]

    def test_an_acknowledged_request_is_not_shown_as_pending(self, tmp_path):
        """Trainer stopped with acked_seq 2; state.json still holds stop #2: no pending row."""
        run_dir = channel.RunDir(tmp_path / "run")
        run_dir.write_status(fake_status(state="stopped", acked_seq=2, heartbeat=time.time()))
        state = PolicyState(seq=2, outstanding=Outstanding(2, "stop", "session_limit", 10.0))
        channel.write_json(run_dir.file(channel.STATE_FILE),
                           {"v": channel.SCHEMA_VERSION, "session_start": time.time() - 60,
                            "policy": state.to_json()})
        st = sw.status(run_dir.path)
        assert st.value("trainer").startswith("stopped, step 100")
        assert st.value("pending request") is None

    def test_the_notebook_row_gives_the_idle_time_before_the_status_cell(self, shell, cfg):
        """status() runs in a cell: the row gives the idle time before that cell, not 'executing'."""
        clock = FakeClock(wall=time.time(), mono=1000.0)
        handle = sw.start(**cfg, _clock=clock)
        shell.run_cell("x = 1")
        clock.advance(300)
        shell.user_ns["sw"] = sw
        shell.run_cell("st = sw.status()")
        assert handle.running
        assert shell.user_ns["st"].value("notebook").startswith(
            "this cell runs; idle 5m00s before it")


# --------------------------------------------------------------------------------------------
# A real Jupyter kernel (jupyter_client + ipykernel): interrupts reach the whole process group


def _kernel_available() -> bool:
    try:
        import ipykernel  # noqa: F401
        import jupyter_client  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _kernel_available(),
                    reason="needs ipykernel and jupyter_client (the test extra)")
class TestRealKernel:
    def test_interrupt_and_restart_of_a_real_kernel_leave_a_launched_trainer_running(
            self, tmp_path, trainer_script, reap):
        """Jupyter's interrupt (SIGINT to the kernel's process group) ends wait() only, and a
        kernel restart does not reach it either: the launched trainer trains on and completes."""
        from jupyter_client.manager import KernelManager

        env = dict(os.environ, PYTHONPATH=str(ROOT), IPYTHONDIR=str(tmp_path / "ipython"),
                   JUPYTER_RUNTIME_DIR=str(tmp_path / "jrt"))
        km = KernelManager(kernel_name="python3")
        km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        km.start_kernel(env=env, cwd=str(tmp_path))
        reap.append(km.provisioner.process.pid)  # the kernel leads its own process group
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=DEADLINE_S)

            def reply_to(msg_id: str) -> Dict[str, Any]:
                while True:  # skip replies to earlier requests (wait_for_ready's kernel_info)
                    reply = kc.get_shell_msg(timeout=DEADLINE_S)
                    if reply["parent_header"].get("msg_id") == msg_id:
                        return reply["content"]  # type: ignore[no-any-return]

            def run(code: str) -> Dict[str, Any]:
                return reply_to(kc.execute(code))

            argv = trainer_argv(trainer_script, tmp_path, 5)
            reply = run(textwrap.dedent(f"""
                import session_watchdog as sw
                t = sw.launch({argv!r}, run_dir={str(tmp_path / 'run')!r},
                              log_file={str(tmp_path / 'log.jsonl')!r}, interval="0.2s",
                              platform="generic")
                open({str(tmp_path / 'pid')!r}, "w").write(str(t.pid))
            """))
            assert reply["status"] == "ok", reply
            pid = int(wait_for(lambda: (tmp_path / "pid").exists()
                               and (tmp_path / "pid").read_text()))
            reap.append(pid)
            run_dir = channel.RunDir(tmp_path / "run", create=False)
            wait_for(lambda: run_dir.trainer_alive() and run_dir.read_status() is not None)
            step_before = run_dir.read_status().step

            msg_id = kc.execute("r = sw.wait(poll=0.1, view='text')\nprint('WAIT', r.reason)")
            wait_for(lambda: run_dir.read_status().step >= step_before + 5)
            time.sleep(0.5)  # let wait() enter its loop (its first poll shows in the log)
            km.interrupt_kernel()
            reply = reply_to(msg_id)
            assert reply["status"] == "ok", reply

            step_after = run_dir.read_status().step
            wait_for(lambda: run_dir.read_status().step >= step_after + 5)
            assert alive(pid) and run_dir.trainer_alive()
            assert run_dir.read_status().state == "running"

            # A kernel restart kills the kernel's process group: not the launched trainer.
            km.restart_kernel(now=True)
            kc.wait_for_ready(timeout=DEADLINE_S)
            step_after = run_dir.read_status().step
            wait_for(lambda: run_dir.read_status().step >= step_after + 5)
            assert alive(pid) and run_dir.read_status().state == "running"

            (tmp_path / "finish").touch()
            wait_for(lambda: run_dir.read_status().state == "completed")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
