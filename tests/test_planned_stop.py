"""A planned stop (trainer state ``stopped``, exit 75) is said as such, never as a failure (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from fakes import sample, status

from session_watchdog.config import OFF, Config
from session_watchdog.policy import EXIT_STOPPED, Decision, PolicyState, decide

NOW = 1_800_000_000.0
CLI = [sys.executable, "-m", "session_watchdog"]
STOPPED_MESSAGE = ("the trainer stopped as asked at step 198 (exit code 75), after saving its "
                   "checkpoint; the runtime is left running: start the training again to resume "
                   "from /ckpt/ckpt-1.pt")


def cfg(**kw) -> Config:
    base = dict(platform="colab", max_session=OFF, end_when_done=True, end_on_failure=False,
                grace=120.0, idle_end_after=1800.0, idle_limit=OFF, idle_warn=OFF, checkpoint_every=OFF)
    base.update(kw)
    return Config(**base)


def stopped(child_exit, state="stopped", alive=False):
    st_ = status(state=state, step=198, ckpt_at=NOW - 5, heartbeat=NOW)
    return sample(now=NOW, elapsed=100.0, alive=alive, trainer_status=st_, child_exit=child_exit)


class TestPolicy:
    def test_exit_75_after_a_stop_is_one_info_decision_with_the_step_and_checkpoint(self):
        """Trainer state stopped + exit 75: one ``info`` / ``training_stopped`` decision, no failure."""
        state, decisions = decide(cfg(), PolicyState(), stopped(EXIT_STOPPED))
        assert decisions == [Decision("info", "training_stopped", STOPPED_MESSAGE, data={
            "step": 198, "child_exit": 75, "checkpoint": "/ckpt/ckpt-1.pt"})]
        assert state.failed is False

    def test_it_is_said_once_while_it_lasts(self):
        """The next ticks with the same stopped trainer add nothing."""
        state, _ = decide(cfg(), PolicyState(), stopped(EXIT_STOPPED))
        state, again = decide(cfg(), state, stopped(EXIT_STOPPED))
        assert again == []

    def test_an_attached_trainer_that_stopped_is_said_without_an_exit_code(self):
        """No exit code known (attach, or a trainer the daemon does not wrap): the same note."""
        _, decisions = decide(cfg(), PolicyState(), stopped(None))
        assert [(d.kind, d.reason, d.message) for d in decisions] == [
            ("info", "training_stopped", STOPPED_MESSAGE.replace(" (exit code 75)", ""))]

    @pytest.mark.parametrize("child_exit, state, alive, expected", [
        (75, "running", False, [("warn", "training_failed")]),   # 75 without a reported stop
        (1, "stopped", False, [("warn", "training_failed")]),    # a crash after the stop's save
        (None, "stopped", True, []),                             # still holds run.lock: not yet said
        (75, "failed", False, [("warn", "training_failed")]),
    ])
    def test_only_a_reported_stop_of_a_gone_trainer_counts(self, child_exit, state, alive, expected):
        """Exit 75 alone is not enough, nor is a stop the trainer has not finished."""
        _, decisions = decide(cfg(), PolicyState(), stopped(child_exit, state, alive))
        assert [(d.kind, d.reason) for d in decisions if d.reason.startswith("training_")] == expected

    def test_the_runtime_is_not_ended_after_a_planned_stop(self):
        """end_when_done never ends the runtime for a stop (training did not complete)."""
        _, decisions = decide(cfg(end_on_failure=True), PolicyState(), stopped(EXIT_STOPPED))
        assert [d.kind for d in decisions] == ["info"]

    def test_the_value_is_the_trainers_exit_status(self):
        """policy.EXIT_STOPPED is the trainer side's EXIT_STOPPED (kept apart: that side imports torch)."""
        from session_watchdog.trainer.session import EXIT_STOPPED as TRAINER_EXIT_STOPPED

        assert EXIT_STOPPED == TRAINER_EXIT_STOPPED == 75


# A wrapped command that reports a stop in trainer.json, as the Session does, and exits 75.
STOPPING_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from session_watchdog import channel
    rd = channel.RunDir(Path(os.environ[channel.ENV_RUN_DIR]))
    ckpt = channel.CheckpointInfo(path="/ckpt/ckpt-7.pt", seq=2, step=198, at=time.time(),
                                  duration_s=0.5, bytes=1000, sha256="ab" * 32)
    rd.write_status(channel.TrainerStatus(
        pid=os.getpid(), start_time=0.0, state="stopped", step=198, epoch=3, step_time_s=0.1,
        acked_seq=2, last_checkpoint=ckpt, heartbeat=time.time()))
    sys.exit(75)
""")


class TestWrappedCommand:
    def test_log_and_console_say_stopped_as_asked_not_failed(self, tmp_path):
        """`run -- cmd` whose trainer stopped and exited 75: the JSONL decision and the console line
        say it stopped as asked and the runtime stays; nothing says failed; the exit code is 75."""
        log_file = tmp_path / "log.jsonl"
        proc = subprocess.run(
            [*CLI, "run", "--interval", "0.3s", "--platform", "generic", "--end-when-done", "--dry-run",
             "--end-command", "/bin/true", "--run-dir", str(tmp_path / "run"), "--log-file", str(log_file),
             "--", sys.executable, "-c", STOPPING_CHILD],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 75, proc.stderr[-3000:]
        evs = [json.loads(line) for line in log_file.read_text().splitlines()]
        message = STOPPED_MESSAGE.replace("ckpt-1", "ckpt-7")
        decisions = [e for e in evs if e["event"] == "decision"]
        # (a loaded machine may add a resource decision; the training outcome is exactly this one)
        training = [e for e in decisions if e["reason"].startswith("training_")]
        assert [(e["kind"], e["reason"], e["message"], e["step"], e["child_exit"], e["checkpoint"])
                for e in training] == [
            ("info", "training_stopped", message, 198, 75, "/ckpt/ckpt-7.pt")], decisions
        assert not any("fail" in e["reason"] for e in decisions), decisions
        assert "level" not in training[0]  # an info event
        assert [e["exit_code"] for e in evs if e["event"] == "child_exited"] == [75]
        assert not any(e["event"] == "action" for e in evs)  # the runtime is not ended
        console = proc.stderr.splitlines()
        assert [line.split("] ", 1)[1] for line in console if "training_stopped" in line] == [
            f"decision info (training_stopped) - {message}"]
        assert [line.split("] ", 1)[1] for line in console if "child_exited" in line] == [
            "child_exited exit_code=75"]
        assert "fail" not in proc.stderr

    def test_the_stopping_child_writes_what_the_trainer_writes(self, tmp_path):
        """The stand-in trainer's trainer.json passes the typed parser (it is no looser fake)."""
        from session_watchdog import channel

        subprocess.run([sys.executable, "-c", STOPPING_CHILD], timeout=60, check=False,
                       env={**os.environ, channel.ENV_RUN_DIR: str(tmp_path / "run")})
        st = channel.RunDir(tmp_path / "run", create=False).read_status()
        assert st is not None and (st.state, st.step, st.acked_seq) == ("stopped", 198, 2)
