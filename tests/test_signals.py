"""Signals and user actions do what they say (issue 18), with real processes where processes matter.

SIGTERM and Ctrl-C to a wrapped run stop the trainer cleanly, a stop signal or `cancel` keeps the
runtime, a second `run` starts nothing, the end waits for a trainer still working after
complete(), an end that cannot succeed backs off, and a checkpoint error names a full disk only
when the disk is full.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import psutil
import pytest
import structlog
from fakes import FakeClock
from integration_helpers import wait_for

from session_watchdog import channel, platforms
from session_watchdog.config import Config
from session_watchdog.daemon import END_RETRY_FIRST_S, Watchdog

CLI = [sys.executable, "-m", "session_watchdog"]
DEADLINE_S = 120.0  # generous: the machine is shared and busy
NOW = 1_800_000_000.0

# A real trainer: a Session around a small model, fed by a DataLoader with two worker processes.
# It prints "ready" once the workers are delivering batches, then trains until stopped.
TRAINER = textwrap.dedent("""
    import sys, time
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from session_watchdog.trainer import Session

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(512, 8), torch.randn(512, 1))
    loader = DataLoader(data, batch_size=8, num_workers=2, persistent_workers=True)
    session = Session(sys.argv[1], model=model, optimizer=optimizer, checkpoint_every=None,
                      poll_interval=0.2)
    announced = False
    with session:
        while True:
            for x, y in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                session.step()
                if not announced:
                    announced = True
                    print("ready", flush=True)
                time.sleep(0.005)
""")


# A light trainer (no torch): holds run.lock shared and announces itself in trainer.json as a
# Session does; on SIGTERM it says so and exits 75. Prints "ready <pid>" once it is announced.
LOCK_HOLDER = textwrap.dedent("""
    import os, signal, sys, time
    import psutil
    from session_watchdog import channel

    run = channel.RunDir(os.environ["SESSION_WATCHDOG_RUN_DIR"])
    lock = run.lock(channel.RUN_LOCK, shared=True)
    lock.acquire()
    run.write_status(channel.TrainerStatus(
        pid=os.getpid(), start_time=psutil.Process().create_time(), state="running", step=0,
        epoch=0, step_time_s=None, acked_seq=0, last_checkpoint=None, heartbeat=time.time() + 600))

    def stop(signum, frame):
        print("trainer got SIGTERM", flush=True)
        sys.exit(75)

    signal.signal(signal.SIGTERM, stop)
    print("ready", os.getpid(), flush=True)
    while True:
        time.sleep(0.1)
""")


def events(log_file: Path) -> List[Dict[str, Any]]:
    if not log_file.exists():
        return []
    out = []
    for line in log_file.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


def steps(log_file: Path) -> List[str]:
    return [e.get("step", "") for e in events(log_file) if e["event"] == "action"]


@pytest.fixture
def procs():
    """Processes a test starts; each is killed with its whole process group at the end."""
    started: List[subprocess.Popen] = []
    yield started
    for proc in started:
        for pid in [c.pid for c in _descendants(proc.pid)] + [proc.pid]:
            try:
                group = os.getpgid(pid)
                if group != os.getpgrp():  # never our own group (pytest's)
                    os.killpg(group, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _descendants(pid: int) -> List[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def watchdog(procs: List[subprocess.Popen], tmp_path: Path, *args: str, name: str = "run") -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, "run", "--platform", "generic", "--interval", "0.3s",
                             "--run-dir", str(tmp_path / name), "--log-file", str(tmp_path / f"{name}.jsonl"),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    procs.append(proc)
    return proc


class TestStopSignals:
    def test_sigterm_and_ctrl_c_stop_a_dataloader_trainer_with_a_checkpoint(self, tmp_path, procs):
        """SIGTERM or a first Ctrl-C to `run -- python train.py` (DataLoader with 2 workers):
        the trainer checkpoints, exits 75, and reports `stopped` - every time."""
        script = tmp_path / "train.py"
        script.write_text(TRAINER)
        for i, sig in enumerate([signal.SIGTERM, signal.SIGINT, signal.SIGTERM]):
            ckpt = tmp_path / f"ckpt{i}"
            proc = watchdog(procs, tmp_path, "--kill-after", "120s", "--",
                            sys.executable, str(script), str(ckpt), name=f"run{i}")
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            trainer = psutil.Process(proc.pid).children()[0]
            assert len(trainer.children()) >= 2  # the DataLoader workers are running
            proc.send_signal(sig)
            code = proc.wait(timeout=DEADLINE_S)
            stderr = proc.stderr.read()
            status = channel.RunDir(tmp_path / f"run{i}").read_status()
            assert (code, status.state) == (75, "stopped"), (signal.Signals(sig).name, stderr[-2000:])
            assert status.last_checkpoint is not None and Path(status.last_checkpoint.path).exists()
            assert "killed by signal" not in stderr
            signalled = [e for e in events(tmp_path / f"run{i}.jsonl") if e["event"] == "child_signalled"]
            assert [(e["signal"], e["sent"], e["pid"]) for e in signalled] == \
                [(signal.Signals(sig).name, "SIGTERM", trainer.pid)]

    def test_a_second_ctrl_c_interrupts_at_once(self, tmp_path, procs):
        """A command that ignores the polite stop: the second Ctrl-C kills its group at once
        (long before kill_after), and the watchdog exits 130."""
        code = textwrap.dedent("""
            import signal, subprocess, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print(helper.pid, flush=True)
            time.sleep(600)
        """)
        proc = watchdog(procs, tmp_path, "--kill-after", "600s", "--", sys.executable, "-c", code)
        helper = psutil.Process(int(proc.stdout.readline()))
        proc.send_signal(signal.SIGINT)
        assert wait_for(lambda: "child_signalled" in [e["event"] for e in events(tmp_path / "run.jsonl")])
        assert helper.is_running() and helper.status() != psutil.STATUS_ZOMBIE  # only the trainer was asked
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=DEADLINE_S) == 130
        assert wait_for(lambda: not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE)
        assert [e["event"] for e in events(tmp_path / "run.jsonl")].count("child_interrupted") == 1

    @pytest.mark.parametrize("how", ["bash -c", "shebang script"])
    def test_sigterm_reaches_a_dataloader_trainer_behind_a_shell(self, tmp_path, procs, how):
        """`run -- bash -c "python train.py; ..."` or `run -- ./train.sh`: SIGTERM goes to the
        trainer the shell waits on (not to the shell, which would die of it), so it checkpoints
        and the shell exits 75."""
        script = tmp_path / "train.py"
        script.write_text(TRAINER)
        ckpt = tmp_path / "ckpt"
        line = f"{sys.executable} {script} {ckpt}; code=$?; echo after $code; exit $code"
        command = ["bash", "-c", line]
        if how == "shebang script":
            wrapper = tmp_path / "train.sh"
            wrapper.write_text(f"#!/bin/bash\n{line}\n")
            wrapper.chmod(0o755)
            command = [str(wrapper)]
        proc = watchdog(procs, tmp_path, "--kill-after", "120s", "--", *command)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        shell = psutil.Process(proc.pid).children()[0]
        trainer = shell.children()[0]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=DEADLINE_S)
        stderr = proc.stderr.read()
        assert (code, proc.stdout.read().strip()) == (75, "after 75"), stderr[-2000:]
        status = channel.RunDir(tmp_path / "run").read_status()
        assert status.state == "stopped" and status.last_checkpoint is not None
        assert "killed by signal" not in stderr
        signalled = [e for e in events(tmp_path / "run.jsonl") if e["event"] == "child_signalled"]
        assert [e["pid"] for e in signalled] == [trainer.pid]

    def test_sigterm_reaches_the_trainer_holding_run_lock_behind_a_pipeline(self, tmp_path, procs):
        """`run -- bash -c "python train.py | cat"`: the shell has two children, so SIGTERM goes
        to the trainer that trainer.json names and that holds run.lock in the command's group
        (the shell would die of it and leave the trainer to the group's SIGTERM at kill_after)."""
        script = tmp_path / "train.py"
        script.write_text(LOCK_HOLDER)
        proc = watchdog(procs, tmp_path, "--kill-after", "600s", "--",
                        "bash", "-c", f"{sys.executable} {script} | cat")
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0  # the pipeline's status: cat's
        assert proc.stdout.read().strip() == "trainer got SIGTERM"
        names = [e["event"] for e in events(tmp_path / "run.jsonl")]
        signalled = [e for e in events(tmp_path / "run.jsonl") if e["event"] == "child_signalled"]
        assert [e["pid"] for e in signalled] == [int(ready[1])]
        assert "child_escalated" not in names

    def test_nothing_of_a_stopped_shell_wrapper_is_left_behind(self, tmp_path, procs):
        """A shell running two commands at once dies of the polite SIGTERM and leaves its
        children in the group: the watchdog escalates to the group after kill_after and exits
        only once they are gone."""
        inner = "import time; print('ready', flush=True); time.sleep(600)"
        proc = watchdog(procs, tmp_path, "--kill-after", "1s", "--", "bash", "-c",
                        f"sleep 600 & {sys.executable} -c \"{inner}\"; echo after")
        assert proc.stdout.readline().strip() == "ready"
        shell = psutil.Process(proc.pid).children()[0]
        python = [c for c in shell.children() if c.name() != "sleep"][0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 128 + signal.SIGTERM  # the shell's own exit
        assert not python.is_running() or python.status() == psutil.STATUS_ZOMBIE
        assert "child_escalated" in [e["event"] for e in events(tmp_path / "run.jsonl")]

    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
    def test_a_stop_signal_during_the_grace_cancels_the_end(self, tmp_path, procs, sig):
        """Ctrl-C (or SIGTERM) while the end waits out its grace period cancels the end, says so
        in the log, and the watchdog exits with the command's code."""
        proc = watchdog(procs, tmp_path, "--end-when-done", "--dry-run", "--grace", "600s",
                        "--end-command", "/bin/true", "--", sys.executable, "-c", "pass")
        assert wait_for(lambda: "end_grace" in steps(tmp_path / "run.jsonl"))
        proc.send_signal(sig)
        assert proc.wait(timeout=DEADLINE_S) == 0
        cancelled = [e for e in events(tmp_path / "run.jsonl") if e.get("step") == "end_cancelled"]
        assert [e["by"] for e in cancelled] == [f"signal {signal.Signals(sig).name}"]
        assert "end_dry_run" not in steps(tmp_path / "run.jsonl")


    def test_ctrl_c_to_a_plain_watchdog_during_the_grace_cancels_the_end(self, tmp_path, procs):
        """`run` without a command (the trainer runs elsewhere): Ctrl-C in the grace period
        cancels the end with an event, instead of the end dying silently with the process."""
        import hashlib

        proc = watchdog(procs, tmp_path, "--end-when-done", "--dry-run", "--grace", "600s",
                        "--end-command", "/bin/true")
        assert wait_for(lambda: channel.lock_held(tmp_path / "run" / channel.DAEMON_LOCK))
        payload = b"weights" * 100
        path = tmp_path / "ckpt-1.pt"
        path.write_bytes(payload)
        ckpt = channel.CheckpointInfo(str(path), None, 5, time.time(), 1.0, len(payload),
                                      hashlib.sha256(payload).hexdigest())
        channel.RunDir(tmp_path / "run").write_status(channel.TrainerStatus(
            pid=4242, start_time=1.0, state="completed", step=5, epoch=1, step_time_s=0.1,
            acked_seq=0, last_checkpoint=ckpt, heartbeat=time.time() + 5))
        assert wait_for(lambda: "end_grace" in steps(tmp_path / "run.jsonl"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=DEADLINE_S) == 0
        cancelled = [e for e in events(tmp_path / "run.jsonl") if e.get("step") == "end_cancelled"]
        assert [e["by"] for e in cancelled] == ["signal SIGINT"]
        assert "end_dry_run" not in steps(tmp_path / "run.jsonl")


SIGNAL_MID_TICK = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    from fakes import sample
    from session_watchdog import log, platforms
    from session_watchdog.config import Config
    from session_watchdog.daemon import Watchdog

    tmp, how = Path(sys.argv[1]), sys.argv[2]
    # Python's own Ctrl-C handler, also when this test runs where SIGINT is ignored (a CI job
    # started in the background inherits SIG_IGN, and Python then installs no handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    jsonl = log.configure(tmp / "log.jsonl", console=None)
    lock = jsonl._lock  # RotatingJsonl's own lock, held by whoever writes a line

    class Probe:
        samples = 0

        def sample(self, times):
            Probe.samples += 1
            if Probe.samples == 2:
                with lock:  # as a tick writing (or rotating) the log when the signal lands
                    os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)
                    time.sleep(0.2)
            return sample(now=times.now, elapsed=times.elapsed_s)

    cfg = Config.build(run_dir=str(tmp / "run"), log_file=str(tmp / "log.jsonl"), interval=0.2)
    dog = Watchdog(cfg, platform=platforms.Platform("generic", ("test",)), probe=Probe(),
                   session_start=time.time())
    try:
        dog.run(handle_signals=how == "sigterm")
        print("returned", Probe.samples, threading.active_count(), flush=True)
    except KeyboardInterrupt:
        print("interrupted", Probe.samples, dog.running, flush=True)
""")


def run_mid_tick(procs: List[subprocess.Popen], tmp_path: Path, how: str):
    """Run SIGNAL_MID_TICK in a child of its own; (process, stdout, stderr) once it exited."""
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_MID_TICK, str(tmp_path), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    procs.append(proc)
    out, err = proc.communicate(timeout=DEADLINE_S)
    return proc, out, err


class TestSignalDuringATick:
    def test_sigterm_landing_while_a_tick_writes_the_log_stops_the_watchdog(self, tmp_path, procs):
        """A SIGTERM that arrives while a tick holds the log's lock is handled between ticks:
        the watchdog logs it and stops (its handler never waits on a lock its own thread holds)."""
        proc, out, err = run_mid_tick(procs, tmp_path, "sigterm")
        assert (proc.returncode, out.split()[0]) == (0, "returned"), err[-2000:]
        assert int(out.split()[1]) >= 2  # the tick the signal interrupted, maybe one more
        names = [e["event"] for e in events(tmp_path / "log.jsonl")]
        assert names.count("signal_received") == 1 and "tick_failed" not in names, names

    def test_ctrl_c_left_to_the_caller_interrupts_run_and_stops_the_scheduler(self, tmp_path, procs):
        """With handle_signals=False and Python's own SIGINT handler, a Ctrl-C during a tick
        raises KeyboardInterrupt out of run(), with the scheduler stopped - not a failed tick."""
        proc, out, err = run_mid_tick(procs, tmp_path, "sigint")
        assert (proc.returncode, out.split()) == (0, ["interrupted", "2", "False"]), err[-2000:]
        assert "tick_failed" not in [e["event"] for e in events(tmp_path / "log.jsonl")]


# `run -- CMD` with a stop signal sent to itself while its main thread writes the line of EVENT,
# holding the log's lock (as a SIGTERM from scancel or systemctl landing at that moment).
SIGNAL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from session_watchdog import cli, log

    tmp, event = sys.argv[1], sys.argv[2]
    write = log.RotatingJsonl.write

    def write_signalled(self, line):
        if f'"event":"{event}"' in line.replace(" ", "") and not getattr(write_signalled, "done", False):
            write_signalled.done = True
            with self._lock:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100_000):  # bytecodes: the handler runs here, the lock held
                    pass
        return write(self, line)

    log.RotatingJsonl.write = write_signalled
    sys.exit(cli.main(["run", "--platform", "generic", "--interval", "0.3s", "--dry-run",
                       "--run-dir", f"{tmp}/run", "--log-file", f"{tmp}/run.jsonl",
                       "--", sys.executable, "-c", "raise SystemExit(3)"]))
""")


class TestSignalDuringAMainThreadLogWrite:
    @pytest.mark.parametrize("event", ["daemon_stopped", "child_exited"])
    def test_a_stop_signal_landing_in_a_log_write_of_the_main_thread_is_handled(
            self, tmp_path, procs, event):
        """A SIGTERM that lands while `run -- CMD`'s main thread writes a log line (holding the
        log's lock) is handled and logged after it, whole: the process exits with the command's
        code instead of waiting for ever on the lock its own thread holds."""
        proc = subprocess.Popen([sys.executable, "-c", SIGNAL_MID_WRITE, str(tmp_path), event],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        procs.append(proc)
        try:
            out, err = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`run` hung after a SIGTERM landed in the write of {event!r}")
        assert proc.returncode == 3, err[-2000:]
        lines = (tmp_path / "run.jsonl").read_text().splitlines()
        names = [json.loads(line)["event"] for line in lines]  # every line whole
        assert names.count("signal_received") == 1 and names.count(event) == 1, names


class TestSecondRun:
    def test_a_second_run_on_a_watched_run_dir_starts_nothing(self, tmp_path, procs):
        """`run -- CMD` on a run dir another watchdog holds: exit 2, one line, CMD never started."""
        first = watchdog(procs, tmp_path)
        assert wait_for(lambda: channel.lock_held(tmp_path / "run" / channel.DAEMON_LOCK))
        token = f"never-started-{uuid.uuid4().hex}"
        second = subprocess.run(
            [*CLI, "run", "--platform", "generic", "--run-dir", str(tmp_path / "run"),
             "--log-file", str(tmp_path / "second.jsonl"), "--",
             sys.executable, "-c", "import time, sys; time.sleep(600)", token],
            capture_output=True, text=True, timeout=DEADLINE_S)
        running = [p for p in psutil.process_iter(["cmdline"]) if token in (p.info["cmdline"] or [])]
        for p in running:
            p.kill()
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is already watching" in lines[0], second.stderr
        assert running == []
        assert first.poll() is None  # the first watchdog goes on


    def test_run_beside_an_orphaned_trainer_starts_nothing(self, tmp_path, procs):
        """A trainer whose watchdog was killed still holds run.lock: `run -- CMD` on that run dir
        exits 2 with one line naming it, and CMD never starts (two trainers would share it)."""
        run_dir = tmp_path / "run"
        run_dir.mkdir(mode=0o700)
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nfrom session_watchdog import channel\n"
             "lock = channel.FileLock(sys.argv[1], shared=True)\nassert lock.acquire()\n"
             "time.sleep(600)", str(run_dir / channel.RUN_LOCK)], start_new_session=True)
        procs.append(holder)
        assert wait_for(lambda: channel.lock_held(run_dir / channel.RUN_LOCK))
        token = f"never-started-{uuid.uuid4().hex}"
        second = subprocess.run(
            [*CLI, "run", "--platform", "generic", "--run-dir", str(run_dir),
             "--log-file", str(tmp_path / "second.jsonl"), "--",
             sys.executable, "-c", "import time, sys; time.sleep(600)", token],
            capture_output=True, text=True, timeout=DEADLINE_S)
        running = [p for p in psutil.process_iter(["cmdline"]) if token in (p.info["cmdline"] or [])]
        for p in running:
            p.kill()
        assert second.returncode == 2 and running == []
        lines = second.stderr.strip().splitlines()
        assert lines == [f"session-watchdog: error: a process still holds {run_dir / 'run.lock'} "
                         "(a trainer left running?); stop it before starting another command in "
                         "this run dir"]
        assert holder.poll() is None  # the orphan is left alone


class TestCancel:
    def test_cancel_without_a_watchdog_fails_in_one_line(self, tmp_path):
        """`cancel` with no watchdog running: exit 2, one line saying nothing is running."""
        (tmp_path / "run").mkdir(mode=0o700)
        proc = subprocess.run([*CLI, "cancel", "--run-dir", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=DEADLINE_S)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"session-watchdog: error: no watchdog is running for {tmp_path / 'run'}; nothing to cancel"]

    def test_cancel_before_the_grace_keeps_the_runtime_until_a_new_run(self, tmp_path, procs):
        """A cancel while training runs is kept (shown by status): the later end is cancelled;
        the next `run` on the run dir undoes it and ends as usual."""
        go = tmp_path / "go"
        code = (f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)")
        end_flags = ["--end-when-done", "--dry-run", "--grace", "0.5s", "--end-command", "/bin/true"]
        proc = watchdog(procs, tmp_path, *end_flags, "--", sys.executable, "-c", code)
        assert wait_for(lambda: channel.lock_held(tmp_path / "run" / channel.DAEMON_LOCK))
        cancel = subprocess.run([*CLI, "cancel", "--run-dir", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=DEADLINE_S)
        assert cancel.returncode == 0, cancel.stderr
        shown = subprocess.run([*CLI, "status", "--run-dir", str(tmp_path / "run")],
                               capture_output=True, text=True, timeout=DEADLINE_S).stdout
        row = [line for line in shown.splitlines() if line.startswith("runtime end")]
        assert len(row) == 1 and "cancelled: this runtime is kept" in row[0], shown
        go.touch()
        assert proc.wait(timeout=DEADLINE_S) == 0
        evs = events(tmp_path / "run.jsonl")
        assert [e["by"] for e in evs if e.get("step") == "end_cancelled"] == ["session-watchdog cancel"]
        assert "end_dry_run" not in steps(tmp_path / "run.jsonl")
        (tmp_path / "run.jsonl").unlink()
        again = watchdog(procs, tmp_path, *end_flags, "--", sys.executable, "-c", "pass")
        assert again.wait(timeout=DEADLINE_S) == 0
        assert steps(tmp_path / "run.jsonl")[-1] == "end_dry_run"


COMPLETE_THEN_WORK = textwrap.dedent("""
    import os, sys, time
    import torch
    from session_watchdog.trainer import Session

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session(sys.argv[1], model=model, optimizer=optimizer, checkpoint_every=None,
                      poll_interval=0.2)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        session.step()
    session.complete()
    print("completed", flush=True)
    deadline = time.monotonic() + 300  # the evaluation after complete(), until the test says go
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("exiting", flush=True)
""")


class TestWorkAfterComplete:
    def test_the_end_waits_for_the_trainer_to_exit_after_complete(self, tmp_path, procs):
        """A trainer not wrapped by the watchdog completes and works on: no end step while it runs
        (the watchdog has seen `completed` for several ticks); the end comes after its exit."""
        dog = watchdog(procs, tmp_path, "--end-when-done", "--dry-run", "--grace", "0.5s",
                       "--end-command", "/bin/true")
        log_file = tmp_path / "run.jsonl"
        assert wait_for(lambda: channel.lock_held(tmp_path / "run" / channel.DAEMON_LOCK))
        script = tmp_path / "train.py"
        script.write_text(COMPLETE_THEN_WORK)
        go = tmp_path / "go"
        trainer = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), str(go)],
                                   stdout=subprocess.PIPE, text=True, start_new_session=True,
                                   env={**os.environ, channel.ENV_RUN_DIR: str(tmp_path / "run"),
                                        "PYTHONPATH": os.pathsep.join(sys.path)})
        procs.append(trainer)
        assert trainer.stdout.readline().strip() == "completed"

        def ticks_since_completed_seen() -> int:
            evs = events(log_file)
            seen = [i for i, e in enumerate(evs) if e["event"] == "decision"
                    and e.get("reason") == "trainer_finished"]
            return 0 if not seen else sum(1 for e in evs[seen[0]:] if e["event"] == "sample")

        assert wait_for(lambda: ticks_since_completed_seen() >= 5)
        assert [s for s in steps(log_file) if s.startswith("end_")] == []
        go.touch()
        assert trainer.stdout.readline().strip() == "exiting"
        go_at = time.time()
        assert trainer.wait(timeout=DEADLINE_S) == 0
        assert wait_for(lambda: "end_dry_run" in steps(log_file))
        end = [e for e in events(log_file) if e.get("step") == "end_dry_run"][0]
        assert end["reason"] == "training_complete" and end["ts"] >= go_at
        dog.send_signal(signal.SIGTERM)
        dog.wait(timeout=DEADLINE_S)

    def test_end_runtime_after_complete_releases_run_lock_now_and_exit_keeps_it(self, tmp_path):
        """complete("complete") lets go of run.lock at once; complete() in a script's main thread
        keeps it until the process exits; a bad value is a ValueError naming the choices."""
        code = textwrap.dedent("""
            import sys, torch
            from session_watchdog import channel
            from session_watchdog.trainer import Session
            def done(mode, name):
                run_dir = channel.RunDir(sys.argv[1] + "/" + name)
                s = Session(sys.argv[1] + "/ckpt-" + name, model=torch.nn.Linear(2, 1),
                            run_dir=run_dir, checkpoint_every=None, handle_signals=False)
                s.step()
                s.complete(**({} if mode is None else {"end_runtime_after": mode}))
                return channel.lock_held(run_dir.file(channel.RUN_LOCK))
            print(done("complete", "a"), done(None, "b"), done("exit", "c"))
            s = Session(sys.argv[1] + "/ckpt-d", model=torch.nn.Linear(2, 1),
                        run_dir=sys.argv[1] + "/d", checkpoint_every=None, handle_signals=False)
            try:
                s.complete(end_runtime_after="later")
            except ValueError as err:
                print(err)
            s.close()
        """)
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, timeout=DEADLINE_S)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "False True True", "end_runtime_after='later' is not valid; use \"exit\" or \"complete\""]
        assert not channel.lock_held(tmp_path / "b" / channel.RUN_LOCK)  # released by the exit


class TestEndBackoff:
    def test_a_vanished_final_checkpoint_is_tried_once_then_again_when_it_is_back(self, tmp_path):
        """The final checkpoint is gone: one aborted end, then silence while nothing changes (no
        retry every tick); the checkpoint coming back ends the runtime at the next tick."""
        import hashlib

        from session_watchdog.probes import SystemProbe

        run = channel.RunDir(tmp_path / "run")
        payload = b"weights" * 100
        path = tmp_path / "ckpt" / "ckpt-1.pt"
        path.parent.mkdir()
        ckpt = channel.CheckpointInfo(str(path), None, 5, NOW, 1.0, len(payload),
                                      hashlib.sha256(payload).hexdigest())
        run.write_status(channel.TrainerStatus(pid=4242, start_time=1.0, state="completed", step=5,
                                               epoch=1, step_time_s=0.1, acked_seq=0,
                                               last_checkpoint=ckpt, heartbeat=NOW))
        calls: List[str] = []
        clock = FakeClock(NOW)
        config = Config.build(run_dir=str(run.path), log_file=str(tmp_path / "l"), grace="1s",
                              platform="generic", end_when_done=True)
        dog = Watchdog(config, platform=platforms.Platform("generic", ("t",)), clock=clock,
                       session_start=NOW, probe=SystemProbe(run, ()),
                       end_action=("recorder", lambda: calls.append("end") or "ok"), confirm_after_s=0.0)
        with structlog.testing.capture_logs() as logged:
            for _ in range(30):  # 30 ticks of a second: the first aborts, the rest stay quiet
                dog.tick()
                dog.wait_end(30)
                clock.advance(1.0)
            aborted = [e for e in logged if e.get("step") == "end_aborted"]
            assert len(aborted) == 1 and "cannot be read" in aborted[0]["message"]
            assert [e["kind"] for e in logged if e["event"] == "decision"] == ["end"]
            clock.advance(END_RETRY_FIRST_S)  # the retry is due: one more try, one more line
            dog.tick()
            dog.wait_end(30)
            assert len([e for e in logged if e.get("step") == "end_aborted"]) == 2
            path.write_bytes(payload)  # something changed: the next tick tries at once
            clock.advance(1.0)
            dog.tick()
            dog.wait_end(30)
        assert calls[:1] == ["end"]  # (then the confirm retry: this test process is still alive)
        dog.release()


class TestCheckpointErrorWording:
    @pytest.mark.parametrize("code, space", [(errno.EINTR, False), (errno.EIO, False),
                                             (errno.ENOSPC, True), (errno.EDQUOT, True)])
    def test_bytes_needed_vs_free_only_for_a_full_disk(self, tmp_path, code, space):
        """A save cut short by a signal (EINTR) or an I/O error does not read like a full disk;
        ENOSPC and EDQUOT do say how many bytes were needed and free."""
        from session_watchdog.trainer.checkpoint import CheckpointWriteError

        err = CheckpointWriteError(tmp_path / "ckpt-1.pt", OSError(code, os.strerror(code)), errno=code,
                                   needed_bytes=2048, free_bytes=10 << 30)
        name = errno.errorcode[code]
        expected = f"cannot save checkpoint {tmp_path / 'ckpt-1.pt'}: {name} ({os.strerror(code)})"
        if space:
            expected += "; needs 2048 bytes (2.0 KiB), 10737418240 bytes (10.0 GiB) free"
        assert str(err) == expected
        assert (err.needed_bytes, err.free_bytes) == (2048, 10 << 30)  # still there for programs
