"""run --restarts: crashes, hangs and OOM kills are restarted; the no-progress guard (issue 13)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest
from conftest import TORCHRUN, heavy_n
from integration_helpers import reap

from session_watchdog.config import Config
from session_watchdog.supervise.restarts import (
    EXIT_GAVE_UP,
    EXIT_STOPPED,
    Supervisor,
    backoff_s,
    classify,
)

CLI = [sys.executable, "-m", "session_watchdog"]
TRAINER = str(Path(__file__).parent / "supervise_trainer.py")
REPO = str(Path(__file__).resolve().parent.parent)


# ---- unit: a scripted child at our boundary (wrap.Child's interface), a fake clock ----------

class FakeChild:
    """Exits with the next scripted code when the test says so."""

    def __init__(self, code: Optional[int], pid: int) -> None:
        self.code = code
        self.pid = pid
        self.interrupted = False
        self.signals: List[int] = []

    def exit_status(self) -> Optional[int]:
        return self.code

    def forward(self, sig: int) -> None:
        self.signals.append(sig)

    def restore(self) -> None:
        pass

    def wait_group(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def supervisor(codes: List[Optional[int]], steps: List[Optional[int]], **config):
    """A Supervisor whose children exit with ``codes`` in turn; ``steps``: newest checkpoint step
    the daemon knows while each child runs."""
    clock = Clock()
    children: List[FakeChild] = []

    def start(argv, run_dir, kill_after_s):
        children.append(FakeChild(codes[len(children)], 100 + len(children)))
        return children[-1]

    base = dict(platform="generic", restarts=10, restart_backoff=5.0, restart_backoff_max=60.0,
                restart_no_progress=2, restart_storm=10, restart_storm_window=3600.0)
    base.update(config)
    sup = Supervisor(["train"], Path("/nonexistent"), Config(**base), monotonic=clock, start=start,
                     newest_step=lambda: steps[len(children) - 1])
    return sup, clock, children


def run_out(sup: Supervisor, clock: Clock, limit: int = 200) -> Optional[int]:
    for _ in range(limit):
        code = sup.exit_status()
        if code is not None:
            return code
        clock.t += 1.0
    return None


class TestRestartRules:
    def test_the_snapshot_waits_for_run_lock_to_be_free(self):
        """A crashed command whose workers still hold run.lock: the snapshot is persisted and
        the failure judged only once the lock is free (here 3 s later)."""
        held = [True]
        persisted = []
        sup, clock, children = supervisor([1, 0], [10, 20])
        sup._trainer_alive = lambda: held[0]
        sup._persist_snapshot = lambda: persisted.append(clock.t) or 15
        for _ in range(3):
            assert sup.exit_status() is None
            clock.t += 1.0
        assert persisted == [] and sup.failures == []
        held[0] = False
        assert sup.exit_status() is None
        assert persisted == [1003.0] and sup.failures[0].newest_step == 15


    @pytest.mark.parametrize("code, hung, oom, stopped, cause", [
        (0, False, False, False, None), (75, False, False, False, None),
        (1, False, False, False, "crash"), (137, False, False, False, "killed"),
        (137, False, True, False, "oom"), (143, True, False, False, "hang"),
        (75, True, False, False, "hang"), (0, True, False, False, None),
        (1, False, False, True, None), (1, True, False, True, "hang"),
    ])
    def test_classify(self, code, hung, oom, stopped, cause):
        """0, 75 and a reported stop are never restarted; a hang we ended (even one that then
        saved and exited 75), an OOM kill and a crash are."""
        assert classify(code, hung=hung, oom_kills_rose=oom, stopped=stopped) == cause

    def test_a_stopped_status_older_than_the_attempt_is_a_crash(self, tmp_path):
        """trainer.json saying "stopped" from before this attempt started (an earlier run's):
        the command's exit 1 is a crash, restarted (--restarts 1), and its code the result."""
        import time
        import types

        from session_watchdog import channel
        from session_watchdog.supervise.restarts import supervisor_for

        run = channel.RunDir(tmp_path / "run")
        run.write_status(channel.TrainerStatus(
            pid=1, start_time=time.time() - 20, state="stopped", step=40, epoch=0,
            step_time_s=0.1, acked_seq=0, last_checkpoint=None, heartbeat=time.time() - 10))
        watchdog = types.SimpleNamespace(run_dir=run, last_sample=None, config=Config(
            platform="generic", restarts=1, restart_backoff=0.1, kill_after=1.0))
        sup = supervisor_for([sys.executable, "-c", "raise SystemExit(1)"], watchdog)
        assert finish_supervised(sup) == 1
        assert [f.cause for f in sup.failures] == ["crash", "crash"] and sup.restarts == 1

    def test_backoff_doubles_up_to_the_maximum(self):
        """10 s, 20 s, 40 s ... capped at restart_backoff_max."""
        config = Config(restart_backoff=10.0, restart_backoff_max=60.0)
        assert [backoff_s(config, n) for n in range(5)] == [10.0, 20.0, 40.0, 60.0, 60.0]

    def test_crashes_with_progress_are_restarted_after_the_backoff(self):
        """Two crashes, each after a newer checkpoint: restarted after 5 s then 10 s; the third
        child's exit 0 is the result."""
        sup, clock, children = supervisor([1, 1, 0], [10, 20, 30])
        assert run_out(sup, clock) == 0
        assert len(children) == 3 and sup.restarts == 2
        assert [f.cause for f in sup.failures] == ["crash", "crash"]
        assert sup.restart_times == [1005.0, 1016.0]

    def test_exit_75_is_never_restarted(self):
        """A stop we asked for (75) ends the supervision with 75."""
        sup, clock, children = supervisor([75], [10])
        assert run_out(sup, clock) == 75 and len(children) == 1

    def test_no_progress_guard_gives_up_after_k_restarts(self):
        """Always crashing with no checkpoint: K=2 restarts, then exit 76 with a reason."""
        sup, clock, children = supervisor([1] * 10, [None] * 10)
        assert run_out(sup, clock) == EXIT_GAVE_UP
        assert len(children) == 3 and sup.restarts == 2
        assert "no newer checkpoint" in (sup.gave_up or "")

    def test_storm_gives_up(self):
        """3 restarts within the window (restart_storm=3) and a 4th failure: exit 76."""
        sup, clock, children = supervisor([1] * 10, list(range(10, 200, 10)), restart_storm=3,
                                          restart_backoff=1.0, restart_backoff_max=1.0)
        assert run_out(sup, clock) == EXIT_GAVE_UP
        assert sup.restarts == 3 and "restarts within" in (sup.gave_up or "")

    def test_restarts_exhausted_returns_the_childs_code(self):
        """With --restarts 1 the second crash's exit code is the result."""
        sup, clock, children = supervisor([3, 4], [10, 20], restarts=1)
        assert run_out(sup, clock) == 4

    def test_a_user_stop_during_the_backoff_cancels_the_restart(self):
        """SIGTERM while a restart waits: no restart, the crash's code is the result."""
        sup, clock, children = supervisor([1, 0], [10, 20])
        assert sup.exit_status() is None  # the crash is seen, a restart scheduled
        sup.forward(signal.SIGTERM)
        assert run_out(sup, clock) == 1 and len(children) == 1

    def test_gpu_memory_is_awaited_bounded(self):
        """The restart waits while NVML lists the dead child's pid, at most restart_gpu_wait."""
        held = {100}
        sup, clock, children = supervisor([1, 0], [10, 20], restart_gpu_wait=30.0)
        sup._read_gpu_pids = lambda: set(held)
        assert sup.exit_status() is None
        clock.t += 20.0
        assert sup.exit_status() is None and len(children) == 1  # still held
        held.clear()
        assert sup.exit_status() is None and len(children) == 2  # released: restarted


# ---- real processes ------------------------------------------------------------------------

def env() -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
    return out


def events(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_watched(tmp_path: Path, trainer_args: List[str], *flags: str, timeout: float = 900):
    """session-watchdog run ... -- python supervise_trainer.py; the group is killed at the end."""
    argv = [*CLI, "run", "--interval", "0.3s", "--run-dir", str(tmp_path / "run"), "--platform",
            "generic", "--log-file", str(tmp_path / "log.jsonl"), *flags, "--", sys.executable,
            TRAINER, str(tmp_path / "ckpt"), str(tmp_path / "out.pt"), *trainer_args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        reap(proc)
        try:  # the trainer runs in its own session: kill whatever the watchdog left
            for e in events(tmp_path / "log.jsonl"):
                if e.get("event") == "child_started":
                    try:
                        os.killpg(e["pid"], signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        except FileNotFoundError:
            pass
    return proc.returncode, out, err


def uninterrupted(tmp_path: Path, steps: int):
    import torch

    ref = tmp_path / "ref"
    subprocess.run([sys.executable, TRAINER, str(ref / "ckpt"), str(ref / "out.pt"), "--steps",
                    str(steps), "--step-sleep", "0"], check=True, env=env(), timeout=600,
                   capture_output=True)
    return torch.load(ref / "out.pt", weights_only=True)


class TestRestartsRealProcesses:
    def test_random_crashes_complete_with_the_weights_of_an_uninterrupted_run(self, tmp_path):
        """A trainer that crashes at random steps completes under --restarts; its final weights
        equal an uninterrupted run's, bit for bit; each restart is logged with its cause."""
        import torch

        rng = random.Random(13)
        crashes = heavy_n(2)
        steps = 10 * (crashes + 1) + 5
        # attempt i crashes at a random step of its own tens: it resumes from step 10 * i
        crash_at = [10 * i + rng.randint(1, 9) for i in range(crashes)]
        code, out, err = run_watched(
            tmp_path, ["--steps", str(steps), "--save-every", "10", "--crash-at",
                       ",".join(map(str, crash_at)), "--step-sleep", "0"],
            "--restarts", str(crashes + 1), "--restart-backoff", "0.1s")
        assert code == 0, err[-3000:]
        got = torch.load(tmp_path / "out.pt", weights_only=True)
        want = uninterrupted(tmp_path, steps)
        assert all(torch.equal(got[k], want[k]) for k in want)
        restarted = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "child_restarted"]
        assert [(e["cause"], e["resume_from_step"]) for e in restarted] == \
            [("crash", 10 * i if i else None) for i in range(crashes)]

    def test_no_progress_guard_stops_a_trainer_that_always_crashes(self, tmp_path):
        """Crashing before its first checkpoint on every attempt: K=2 restarts, then exit 76 with
        a one-line reason, in bounded time."""
        code, out, err = run_watched(
            tmp_path, ["--always-crash-at", "3", "--save-every", "10"],
            "--restarts", "10", "--restart-no-progress", "2", "--restart-backoff", "0.1s",
            timeout=600)
        assert code == EXIT_GAVE_UP, err[-3000:]
        assert (tmp_path / "ckpt" / "attempts").read_text() == "3"
        assert "session-watchdog: gave up restarting (exit 76): no newer checkpoint" in err
        given_up = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "restarts_given_up"]
        assert len(given_up) == 1

    def test_a_hung_trainer_is_detected_with_stacks_killed_and_restarted(self, tmp_path):
        """The main thread sleeps inside step 25 (the count stays at 24): trainer_hung within the learned timeout + 1
        tick, its stacks (the sleeping frame) are in the log, and under --restarts it is
        killed, restarted from step 20 and completes; exactly 40 steps counted."""
        code, out, err = run_watched(
            tmp_path, ["--steps", "40", "--save-every", "10", "--hang-at", "25",
                       "--step-sleep", "0.1"],
            "--restarts", "1", "--restart-backoff", "0.1s", "--hang-floor", "2s",
            "--hang-factor", "3", "--kill-after", "2s")
        assert code == 0, err[-3000:]
        log = events(tmp_path / "log.jsonl")
        hang = [e for e in log if e["event"] == "decision" and e.get("reason") == "trainer_hung"]
        assert len(hang) == 1 and hang[0]["step"] == 24  # 25 never finished
        # + 1 tick (0.3 s), + 1 s for a tick made late by a busy machine
        assert hang[0]["timeout_s"] <= hang[0]["stuck_s"] <= hang[0]["timeout_s"] + 0.3 + 1.0
        stacks = [e for e in log if e["event"] == "trainer_stacks"]
        assert stacks and "supervise_trainer.py" in stacks[0]["stacks"]
        assert "Thread" in stacks[0]["stacks"]
        restarted = [e for e in log if e["event"] == "child_restarted"]
        assert [(e["cause"], e["resume_from_step"]) for e in restarted] == [("hang", 20)]
        assert "attempt 1 starts at step 20" in out
        status = json.loads((tmp_path / "run" / "trainer.json").read_text())
        assert (status["state"], status["step"]) == ("completed", 40)


class TestSnapshotRestart:
    def test_a_crash_resumes_from_the_snapshot_step(self, tmp_path):
        """Snapshots every 3 steps, no checkpoint before the crash at step 17: the watchdog
        commits the step-15 snapshot, the restart resumes there (2 steps re-done, <= the
        interval) and ends with the weights of an uninterrupted run."""
        import torch

        code, out, err = run_watched(
            tmp_path, ["--steps", "25", "--save-every", "100", "--crash-at", "17",
                       "--snapshot-every", "3", "--step-sleep", "0"],
            "--restarts", "1", "--restart-backoff", "0.1s")
        try:
            assert code == 0, err[-3000:]
            log = events(tmp_path / "log.jsonl")
            persisted = [e for e in log if e["event"] == "snapshot_persisted"]
            assert [e["step"] for e in persisted] == [15]
            restarted = [e for e in log if e["event"] == "child_restarted"]
            assert [(e["cause"], e["resume_from_step"]) for e in restarted] == [("crash", 15)]
            assert "attempt 1 starts at step 15" in out
            got = torch.load(tmp_path / "out.pt", weights_only=True)
            want = uninterrupted(tmp_path, 25)
            assert all(torch.equal(got[k], want[k]) for k in want)
        finally:
            import shutil

            from session_watchdog import snapshot_slots

            shutil.rmtree(snapshot_slots.snapshot_dir(tmp_path / "run"), ignore_errors=True)


class TestKilled:
    def test_a_sigkilled_trainer_resumes_from_its_snapshot(self, tmp_path):
        """SIGKILL at step 17 (no Python cleanup, like the OOM killer) with snapshots every 3
        steps and no checkpoint: restarted (cause "killed"), resumed from the newest complete
        snapshot (15, or 12 when 15 was still being written), same final weights."""
        import torch

        code, out, err = run_watched(
            tmp_path, ["--steps", "25", "--save-every", "100", "--kill-at", "17",
                       "--snapshot-every", "3", "--step-sleep", "0.02"],
            "--restarts", "1", "--restart-backoff", "0.1s")
        try:
            assert code == 0, err[-3000:]
            log = events(tmp_path / "log.jsonl")
            persisted = [e["step"] for e in log if e["event"] == "snapshot_persisted"]
            assert len(persisted) == 1 and persisted[0] in (12, 15)
            restarted = [e for e in log if e["event"] == "child_restarted"]
            assert [(e["cause"], e["exit_code"], e["resume_from_step"]) for e in restarted] == \
                [("killed", 137, persisted[0])]
            assert f"attempt 1 starts at step {persisted[0]}" in out
            got = torch.load(tmp_path / "out.pt", weights_only=True)
            want = uninterrupted(tmp_path, 25)
            assert all(torch.equal(got[k], want[k]) for k in want)
        finally:
            import shutil

            from session_watchdog import snapshot_slots

            shutil.rmtree(snapshot_slots.snapshot_dir(tmp_path / "run"), ignore_errors=True)


class TestReport:
    def test_restarts_are_listed_with_cause_and_resume_step(self, tmp_path):
        """child_failed / child_restarted / restarts_given_up appear in the report's events with
        their cause and the step resumed from, not as unknown events."""
        from session_watchdog import report

        start = 1_800_000_000.0
        lines = [
            {"event": "daemon_started", "ts": start + 1, "session_start": start, "platform": "generic",
             "interval_s": 5.0},
            {"event": "child_failed", "ts": start + 10, "cause": "crash", "exit_code": 1,
             "message": "the command ended (crash, exit 1)"},
            {"event": "child_restarted", "ts": start + 20, "cause": "crash", "restart": 1,
             "resume_from_step": 20, "message": "restart 1/3 after a crash; resuming from step 20"},
            {"event": "restarts_given_up", "ts": start + 30, "reason": "no newer checkpoint",
             "cause": "crash", "message": "not restarting: no newer checkpoint"},
        ]
        path = tmp_path / "log.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        summary = report.load([path]).summary
        got = [(e["event"], e["kind"], e["reason"], e["seq"]) for e in summary["events"]]
        assert got == [("supervise", "child_failed", "crash", None),
                       ("supervise", "child_restarted", "crash", 1),
                       ("supervise", "restarts_given_up", "crash", None)]
        assert summary["events"][1]["message"].endswith("[step 20]")
        assert summary["input"]["unknown_events"] == 0


class TestBadInput:
    @pytest.mark.parametrize("flag, value, expect", [
        ("--restarts", "-1", "expected a whole number >= 0"),
        ("--restart-no-progress", "0", "expected a whole number >= 1"),
        ("--hang-floor", "5", "has no unit"),
        ("--restart-storm-window", "soon", "expected a duration"),
    ])
    def test_bad_values_are_one_line_and_exit_2(self, tmp_path, flag, value, expect):
        """A bad restart or hang key: one line on stderr naming it, exit code 2, no traceback."""
        proc = subprocess.run([*CLI, "run", "--run-dir", str(tmp_path / "run"), flag, value, "--",
                               "true"], capture_output=True, text=True, timeout=120, env=env())
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0] and expect in lines[0], proc.stderr


# ---- the final exit under --restarts: real child processes -----------------------------------

IGNORES_SIGTERM = ("import signal, time\n"
                   "signal.signal(signal.SIGTERM, lambda s, f: None)  # a save slower than kill_after\n"
                   "time.sleep(600)\n")


def real_supervisor(tmp_path: Path, source: str, **config):
    """A Supervisor over ``python -c source`` (wrap.Child), persisting into a recording list."""
    from session_watchdog import wrap

    persisted: List[str] = []
    base = dict(platform="generic", restarts=3, restart_backoff=1.0, kill_after=1.0)
    base.update(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sup = Supervisor([sys.executable, "-c", source], run_dir, Config(**base), start=wrap.Child,
                     persist_snapshot=lambda: persisted.append("persist") or 20)
    return sup, persisted


def finish_supervised(sup: Supervisor, deadline_s: float = 120.0) -> Optional[int]:
    import time

    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            code = sup.exit_status()
            if code is not None:
                return code
            time.sleep(0.1)
        return None
    finally:
        try:
            os.killpg(sup.child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        sup.child.proc.wait(timeout=30)


class TestFinalExit:
    def test_a_user_stop_killed_after_kill_after_persists_the_snapshot(self, tmp_path):
        """SIGTERM from the user to a command whose stop outlasts kill_after: it is SIGKILLed
        (137), not restarted, and its snapshot is persisted as without --restarts."""
        import time

        sup, persisted = real_supervisor(tmp_path, IGNORES_SIGTERM)
        deadline = time.monotonic() + 120
        while not _sigterm_caught(sup.child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # its handler is not installed yet
        sup.forward(signal.SIGTERM)
        assert finish_supervised(sup) == 128 + signal.SIGKILL
        assert persisted == ["persist"] and sup.restarts == 0


def _sigterm_caught(pid: int) -> bool:
    """Whether ``pid`` has a handler for SIGTERM (/proc's SigCgt mask)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


STOPS_ON_SIGTERM = ("import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(75))  # saved, stopped\n"
                    "time.sleep(600)\n")


class TestHangThenStop:
    def test_a_command_ended_for_hanging_that_saves_and_exits_75_is_restarted(self, tmp_path):
        """A trainer we ended for hanging answers the SIGTERM with a checkpoint and exit 75: the
        stop was ours and its training did not complete, so it is restarted as a hang."""
        import time

        sup, _ = real_supervisor(tmp_path, STOPS_ON_SIGTERM, kill_after=60.0)
        try:
            first = sup.child.pid
            deadline = time.monotonic() + 120
            while not _sigterm_caught(first) and time.monotonic() < deadline:
                time.sleep(0.05)  # its handler is not installed yet
            sup.end_hung("the step has not moved for 30m")
            while sup.restarts == 0 and sup.exit_status() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sup.exit_status() is None and sup.restarts == 1 and sup.child.pid != first
            assert [(f.exit_code, f.cause) for f in sup.failures] == [(75, "hang")]
        finally:
            finish_supervised(sup, deadline_s=0)


# torchrun's worker: reports "stopped" (as a Session does once the stop's checkpoint is durable)
# and exits 75; torchrun itself then exits 1.
STOPPED_WORKER = r'''
import os, sys, time
from pathlib import Path
import psutil
from session_watchdog import channel
run_dir = channel.RunDir(Path(os.environ[channel.ENV_RUN_DIR]))
run_dir.write_status(channel.TrainerStatus(
    pid=os.getpid(), start_time=psutil.Process().create_time(), state="stopped", step=40,
    epoch=0, step_time_s=0.1, acked_seq=0, last_checkpoint=None, heartbeat=time.time()))
sys.exit(75)
'''


@TORCHRUN
class TestTorchrunStop:
    def test_a_planned_stop_under_torchrun_is_not_restarted(self, tmp_path):
        """run --restarts -- torchrun: the worker reports stopped and exits 75, torchrun exits 1:
        a planned stop, not restarted; the run exits 75."""
        worker = tmp_path / "worker.py"
        worker.write_text(STOPPED_WORKER)
        argv = [*CLI, "run", "--interval", "0.3s", "--run-dir", str(tmp_path / "run"),
                "--platform", "generic", "--log-file", str(tmp_path / "log.jsonl"),
                "--restarts", "2", "--restart-backoff", "0.1s", "--", sys.executable, "-m",
                "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=0",
                str(worker)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env(), start_new_session=True)
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            reap(proc)
        log = events(tmp_path / "log.jsonl")
        assert proc.returncode == EXIT_STOPPED, err[-3000:]
        assert [e["exit_code"] for e in log if e["event"] == "child_stopped"] == [1]
        assert [e for e in log if e["event"] in ("child_failed", "child_restarted")] == []
