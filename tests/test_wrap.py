"""Long runs outside notebooks: wrap a command, attach, detach, sd_notify, preemption -> stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from fakes import FakeClock, ScriptedProbe, sample, status
from integration_helpers import wait_for

from session_watchdog import channel, platforms, wrap
from session_watchdog.config import Config
from session_watchdog.daemon import Watchdog
from session_watchdog.preemption import Notice

CLI = [sys.executable, "-m", "session_watchdog"]


def cli_run(tmp_path: Path, *args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", "--interval", "0.3s", "--run-dir", str(tmp_path / "run"),
                           "--log-file", str(tmp_path / "log.jsonl"), *args],
                          capture_output=True, text=True, timeout=timeout, **kw)


def events(tmp_path: Path) -> list:
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


class TestWrap:
    @pytest.mark.parametrize("code", [0, 3])
    def test_exit_code_is_the_childs(self, tmp_path, code):
        """The watchdog exits with the wrapped command's exit code."""
        proc = cli_run(tmp_path, "--", sys.executable, "-c", f"raise SystemExit({code})")
        assert proc.returncode == code, proc.stderr

    def test_stdout_stderr_pass_through_and_run_dir_is_in_the_env(self, tmp_path):
        """The child's output reaches our stdout/stderr unchanged; it knows the run dir."""
        code = "import os, sys; print(os.environ['SESSION_WATCHDOG_RUN_DIR']); print('to-err', file=sys.stderr)"
        proc = cli_run(tmp_path, "--", sys.executable, "-c", code)
        assert proc.stdout.splitlines() == [str(tmp_path / "run")]
        assert "to-err" in proc.stderr.splitlines()

    def test_child_runs_in_its_own_session(self, tmp_path):
        """The child is a session leader (its own process group), so a terminal's SIGINT hits us first."""
        code = "import os; print(os.getsid(0) == os.getpid())"
        assert cli_run(tmp_path, "--", sys.executable, "-c", code).stdout.strip() == "True"

    def test_sigterm_is_forwarded(self, tmp_path):
        """SIGTERM to the watchdog reaches the child, which exits its own way (code 7 here)."""
        code = textwrap.dedent("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))
            print("ready", flush=True)
            time.sleep(60)
        """)
        proc = subprocess.Popen([*CLI, "run", "--interval", "0.3s", "--run-dir", str(tmp_path / "run"),
                                 "--log-file", str(tmp_path / "log.jsonl"), "--", sys.executable, "-c", code],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 7

    def test_sigkill_only_after_the_deadline(self, tmp_path):
        """A child ignoring SIGTERM is SIGKILLed after kill_after (1 s), not before."""
        code = textwrap.dedent("""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(60)
        """)
        proc = subprocess.Popen([*CLI, "run", "--interval", "0.3s", "--kill-after", "1s",
                                 "--run-dir", str(tmp_path / "run"), "--log-file", str(tmp_path / "log.jsonl"),
                                 "--", sys.executable, "-c", code],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGKILL
        assert time.monotonic() - sent >= 1.0
        assert [e["event"] for e in events(tmp_path)].count("child_killed") == 1

    def test_processes_the_command_left_behind_are_ended(self, tmp_path):
        """A command that exits (code 3) leaving a process of its group that ignores SIGTERM:
        the watchdog says so, SIGTERMs then SIGKILLs the group after kill_after (1 s), and exits 3."""
        with open(tmp_path / "stderr", "w") as stderr:  # a pipe would stay open in the survivor
            proc = subprocess.Popen([*CLI, "run", "--interval", "0.3s", "--kill-after", "1s",
                                     "--run-dir", str(tmp_path / "run"), "--log-file",
                                     str(tmp_path / "log.jsonl"), "--", "bash", "-c",
                                     "(trap '' TERM; sleep 600) & exit 3"],
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        group = None
        try:
            assert wait_for(lambda: (tmp_path / "log.jsonl").exists()
                            and "child_started" in (tmp_path / "log.jsonl").read_text())
            group = [e["pid"] for e in events(tmp_path) if e["event"] == "child_started"][0]
            assert proc.wait(timeout=180) == 3, (tmp_path / "stderr").read_text()
            with pytest.raises(ProcessLookupError):
                os.killpg(group, 0)
            names = [e["event"] for e in events(tmp_path)]
            assert [n for n in names if n in ("child_exited", "child_group_ended", "child_killed")] \
                == ["child_exited", "child_group_ended", "child_killed"]
        finally:
            proc.kill()
            proc.wait(timeout=60)
            if group is not None:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def test_for_stops_the_command_as_sigterm_would(self, tmp_path):
        """`run --for 1s -- CMD`: at 1 s the command is asked to stop (SIGTERM to it, its group
        only after kill_after), watched while it does, and its exit code (75) is ours."""
        code = textwrap.dedent("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
            time.sleep(600)
        """)
        proc = subprocess.Popen([*CLI, "run", "--interval", "0.3s", "--for", "1s", "--kill-after", "600s",
                                 "--run-dir", str(tmp_path / "run"), "--log-file", str(tmp_path / "log.jsonl"),
                                 "--", sys.executable, "-c", code],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.wait(timeout=180) == 75, proc.stderr.read() if proc.stderr else ""
            names = [e["event"] for e in events(tmp_path)]
            assert [n for n in names if n in ("run_for_elapsed", "child_signalled", "child_exited",
                                              "daemon_stopped")] \
                == ["run_for_elapsed", "child_signalled", "daemon_stopped", "child_exited"]
        finally:
            proc.kill()
            proc.wait(timeout=60)
            for e in events(tmp_path) if (tmp_path / "log.jsonl").exists() else []:
                if e["event"] == "child_started":
                    try:
                        os.killpg(e["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    @pytest.mark.parametrize("detach", [[], ["--detach"]])
    def test_nothing_after_the_double_dash_is_a_clear_error(self, tmp_path, detach):
        """`run -- $CMD` with CMD empty: exit 2 with one line, not a watchdog running alone."""
        proc = cli_run(tmp_path, "--for", "5s", *detach, "--", timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "session-watchdog: error: no command after '--' (an empty variable?): use "
            "`session-watchdog run [options] -- python train.py`, or leave out '--' to watch alone"]
        assert not channel.lock_held(tmp_path / "run" / channel.DAEMON_LOCK)

    def test_a_script_without_a_shebang_is_a_clear_error(self, tmp_path):
        """An executable script without '#!': exit 2, one line saying it could not be executed
        and why, and the watchdog logs its stop."""
        script = tmp_path / "train.sh"
        script.write_text("echo hi\n")
        script.chmod(0o755)
        proc = cli_run(tmp_path, "--", str(script))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"session-watchdog: error: command could not be executed: {str(script)!r}: Exec format "
            "error; a script needs a first line such as #!/bin/bash, or run it through its "
            "interpreter (bash script.sh)")
        assert [e["event"] for e in events(tmp_path)][-1] == "daemon_stopped"

    def test_missing_command_is_a_clear_error(self, tmp_path):
        """A command that does not exist: exit 2, one line."""
        proc = cli_run(tmp_path, "--", "/nonexistent/train")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == "session-watchdog: error: command not found: '/nonexistent/train'"

    def test_exit_zero_ends_the_runtime_in_dry_run_and_one_does_not(self, tmp_path):
        """With end_when_done, exit 0 goes through the end transaction (dry run); exit 1 logs and stays."""
        ok = cli_run(tmp_path, "--end-when-done", "--dry-run", "--grace", "0.5s",
                     "--end-command", "/bin/true", "--", sys.executable, "-c", "pass")
        steps = [e.get("step") for e in events(tmp_path) if e["event"] == "action"]
        assert ok.returncode == 0 and steps[-1] == "end_dry_run"
        (tmp_path / "log.jsonl").unlink()
        bad = cli_run(tmp_path, "--end-when-done", "--dry-run", "--grace", "0.5s",
                      "--end-command", "/bin/true", "--", sys.executable, "-c", "raise SystemExit(1)")
        evs = events(tmp_path)
        assert bad.returncode == 1
        assert not any(e["event"] == "action" and e.get("step", "").startswith("end_") for e in evs)
        assert [e["reason"] for e in evs if e["event"] == "decision"] == ["training_failed"]


class TestStopTarget:
    def test_a_run_lock_holder_outside_the_commands_group_is_not_the_target(self, tmp_path):
        """trainer.json naming a process that holds run.lock but is not in the wrapped command's
        process group (nor any process we started) is not believed: the stop goes to the child."""
        run = channel.RunDir(tmp_path / "run")
        holder = subprocess.Popen(["flock", "-s", str(run.file(channel.RUN_LOCK)), "sleep", "600"],
                                  start_new_session=True)
        child = None
        try:
            assert wait_for(lambda: run.lock_held(channel.RUN_LOCK))
            flock_pid = holder.pid  # flock keeps the lock open in itself and its child
            run.write_status(channel.TrainerStatus(
                pid=flock_pid, start_time=psutil.Process(flock_pid).create_time(), state="running",
                step=0, epoch=0, step_time_s=None, acked_seq=0, last_checkpoint=None,
                heartbeat=time.time()))
            child = wrap.Child(["sleep", "600"], run.path)
            assert (child.proven_trainer(), child.trainer_pid()) == (None, child.pid)
        finally:
            for proc in (holder, child.proc if child is not None else None):
                if proc is not None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)


class TestAttach:
    def _sleeper(self, seconds=60, **kw):
        return subprocess.Popen(["sleep", str(seconds)], **kw)

    def test_completion_is_detected(self, tmp_path):
        """attach ends when the watched process exits."""
        target = self._sleeper(2)
        proc = subprocess.run([*CLI, "attach", "--pid", str(target.pid), "--interval", "0.3s",
                               "--run-dir", str(tmp_path / "run"), "--log-file", str(tmp_path / "log.jsonl")],
                              capture_output=True, text=True, timeout=180)
        target.wait()
        assert proc.returncode == 0, proc.stderr
        assert "attached_exited" in [e["event"] for e in events(tmp_path)]

    def test_a_foreign_pid_is_refused(self, tmp_path):
        """A process of another user is refused (exit 2, one line)."""
        try:
            target = self._sleeper(30, user=65534) if os.getuid() == 0 else None
        except PermissionError as err:  # root in a sandbox that refuses setuid for exec
            pytest.skip(f"this machine refuses to start a process as another user: {err}")
        if target is None:
            pytest.skip("needs root to start a process as another user")
        try:
            proc = subprocess.run([*CLI, "attach", "--pid", str(target.pid), "--run-dir", str(tmp_path / "run")],
                                  capture_output=True, text=True, timeout=180)
        finally:
            target.kill()
            target.wait()
        assert proc.returncode == 2
        assert f"pid {target.pid} belongs to uid 65534" in proc.stderr

    def test_a_reused_pid_is_refused(self, tmp_path):
        """trainer.json names this pid with another start time: the pid was reused; refused."""
        target = self._sleeper(30)
        try:
            rd = channel.RunDir(tmp_path / "run")
            created = psutil.Process(target.pid).create_time()
            rd.write_status(status(pid=target.pid, start_time=created - 500.0))
            proc = subprocess.run([*CLI, "attach", "--pid", str(target.pid), "--run-dir", str(rd.path)],
                                  capture_output=True, text=True, timeout=180)
        finally:
            target.kill()
            target.wait()
        assert proc.returncode == 2 and "its pid was reused" in proc.stderr

    def test_missing_pid(self, tmp_path):
        """A pid that does not exist is a clear error."""
        proc = subprocess.run([*CLI, "attach", "--pid", "999999999", "--run-dir", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2 and "no process with pid 999999999" in proc.stderr


class TestDetach:
    def test_detached_watchdog_outlives_its_process_group_and_is_found(self, tmp_path):
        """--detach survives the death of the launching process group; status and stop find it."""
        run_dir = tmp_path / "run"
        launcher = subprocess.Popen([*CLI, "run", "--detach", "--interval", "0.3s", "--run-dir", str(run_dir),
                                     "--log-file", str(tmp_path / "log.jsonl")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        out, err = launcher.communicate(timeout=180)
        assert launcher.returncode == 0, err
        assert f"run dir: {run_dir}" in out and "session-watchdog stop --run-dir" in out
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # the terminal's process group goes away
        except ProcessLookupError:
            pass
        info = json.loads((run_dir / "daemon.json").read_text())
        assert psutil.pid_exists(info["pid"]) and channel.lock_held(run_dir / channel.DAEMON_LOCK)
        assert os.getsid(info["pid"]) != os.getsid(0)
        status_out = subprocess.run([*CLI, "status", "--run-dir", str(run_dir)], capture_output=True, text=True)
        assert f"running (pid {info['pid']}" in status_out.stdout
        stop = subprocess.run([*CLI, "stop", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=180)
        assert stop.returncode == 0, stop.stderr
        assert wait_for(lambda: not channel.lock_held(run_dir / channel.DAEMON_LOCK))

    @pytest.mark.parametrize("argv, bad", [(["run", "--det", "--", "sleep", "1"], "--det"),
                                           (["attach", "--pid", "1", "--deta"], "--deta"),
                                           (["status", "--run-d", "x"], "--run-d x")])
    def test_an_abbreviated_option_is_refused(self, argv, bad, capsys):
        """`run --det` is not --detach (the detached copy, started with --detach removed by name,
        would detach again for ever): no long option is accepted abbreviated; exit 2, one line."""
        from session_watchdog import cli

        with pytest.raises(SystemExit) as exited:
            cli.build_parser().parse_args(argv)
        err = capsys.readouterr().err
        assert (exited.value.code, len(err.strip().splitlines())) == (2, 1)
        assert f"unrecognized arguments: {bad} " in err

    def test_stop_without_a_watchdog(self, tmp_path):
        """stop when nothing runs says so (exit 2)."""
        (tmp_path / "run").mkdir(mode=0o700)
        proc = subprocess.run([*CLI, "stop", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)
        assert proc.returncode == 2 and "no watchdog is running" in proc.stderr


class TestSdNotify:
    def test_ready_status_and_watchdog_pings_from_the_real_daemon(self, tmp_path):
        """Under NOTIFY_SOCKET the daemon sends READY=1, STATUS=... and WATCHDOG=1 every half period."""
        sock_path = tmp_path / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(0.2)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        proc = subprocess.Popen([*CLI, "run", "--interval", "0.1s", "--run-dir", str(tmp_path / "run"),
                                 "--log-file", str(tmp_path / "log.jsonl")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        messages = []
        deadline = time.monotonic() + 120  # start-up on a loaded machine
        try:
            while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 4:
                try:
                    messages.append(sock.recv(4096).decode())
                except socket.timeout:
                    pass
        finally:
            proc.terminate()
            proc.wait(timeout=120)
            try:
                while True:
                    messages.append(sock.recv(4096).decode())
            except (socket.timeout, OSError):
                pass
            sock.close()
        assert messages[0].startswith("READY=1\nSTATUS=watching generic session")
        pings = [m for m in messages if m.startswith("WATCHDOG=1")]
        assert len(pings) >= 4 and any("STATUS=" in m for m in messages[1:])
        assert messages[-1].startswith("STOPPING=1"), messages


class _Poller:
    """A preemption source that always reports one notice ``in_s`` seconds out."""

    def __init__(self, source: str, in_s: float) -> None:
        self.name, self.in_s = source, in_s

    def poll(self, now):
        return Notice(self.name, now + self.in_s, "test")


def watchdog_with(tmp_path, poller) -> Watchdog:
    clock = FakeClock(1_800_000_000.0)
    cfg = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "l"))
    dog = Watchdog(cfg, platform=platforms.Platform("generic", ("t",)), clock=clock,
                   session_start=clock.wall(), pollers=[poller],
                   probe=ScriptedProbe([sample(trainer_status=status(heartbeat=clock.wall()))]))
    dog.poll_preemption()
    dog.tick()
    return dog


class TestPreemption:
    def test_a_notice_becomes_an_immediate_stop_request_with_its_deadline(self, tmp_path):
        """A spot notice 120 s out: the next tick writes a stop request with that deadline."""
        dog = watchdog_with(tmp_path, _Poller("aws-spot", 120.0))
        request = dog.run_dir.read_request()
        assert (request.action, request.reason, request.deadline) == ("stop", "preemption", dog.clock.wall() + 120.0)

    def test_slurm_time_limit_is_a_deadline_not_a_stop(self, tmp_path):
        """SLURM's remaining time (squeue) shortens the session like a budget: no stop while far away."""
        dog = watchdog_with(tmp_path, _Poller("slurm", 7200.0))
        assert dog.run_dir.read_request() is None
