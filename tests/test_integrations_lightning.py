"""Lightning + WatchdogCallback in real child processes, driven by a real daemon."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("torchdata")
import torch  # noqa: E402
from integration_helpers import (  # noqa: E402
    SCRIPTS,
    end_steps,
    events,
    finish,
    reap,
    requests_and_acks,
    session_clock,
    spawn,
    wait_for_file,
    watchdog_argv,
)
from torch_helpers import assert_same  # noqa: E402

from session_watchdog.actions import verify_checkpoint  # noqa: E402
from session_watchdog.channel import RunDir  # noqa: E402
from session_watchdog.integrations._core import COMMIT_MARKER, verify_dir  # noqa: E402
from session_watchdog.integrations.lightning import CHECKPOINT_FILE, watchdog_resume  # noqa: E402

SCRIPT = [sys.executable, str(SCRIPTS / "lightning_train.py")]
SESSION_S = 40.0
STEPS = 240  # 0.25 s per step in the first runtime: 60 s of steps, longer than its session


class TestLightningUnderTheDaemon:
    def test_stop_before_the_deadline_then_resume_completes_with_identical_weights(
            self, tmp_path: Path) -> None:
        """A 40 s session: checkpoint and stop requested and acked before the limit, fit() returns
        and the script exits 75 with a committed checkpoint-N; the next runtime resumes from it
        mid-epoch (a 2-worker StatefulDataLoader), completes, the end transaction verifies the
        final committed checkpoint, and the weights equal an uninterrupted run's bit for bit."""
        out, ref = tmp_path / "out", tmp_path / "ref"
        reference = spawn([*SCRIPT, "--out", str(ref), "--steps", str(STEPS), "--workers", "2", "--no-watchdog"],
                          SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "ref-run"))
        first = spawn([*watchdog_argv(tmp_path, "run-1", SESSION_S), "--", *SCRIPT, "--out",
                       str(out), "--steps", str(STEPS), "--workers", "2", "--step-sleep", "0.25"])
        try:
            code, stdout, stderr = finish(first)
            assert code == 75, stdout[-3000:] + stderr[-3000:]
            evs = events(tmp_path / "run-1.jsonl")
            requests, acks = requests_and_acks(evs)
            assert [r["action"] for r in requests] == ["checkpoint", "stop"]
            assert sorted(a["seq"] for a in acks) == [r["seq"] for r in requests]
            assert max(session_clock(evs, e) for e in requests + acks) < SESSION_S
            status = RunDir(tmp_path / "run-1").read_status()
            assert status is not None and (status.state, status.acked_seq) == (
                "stopped", requests[-1]["seq"])
            ckpt = status.last_checkpoint
            assert ckpt is not None and ckpt.seq == requests[-1]["seq"]
            assert ckpt.path == str(out / f"checkpoint-{ckpt.step}" / COMMIT_MARKER)
            assert verify_checkpoint(ckpt.path, ckpt.sha256, ckpt.bytes) is None
            assert 0 < ckpt.step < STEPS and f"stopped at step {ckpt.step}" in stdout
            assert status.step_time_s is not None and status.step_time_s > 0.2  # 0.25 s sleeps
            assert watchdog_resume(out) == str(out / f"checkpoint-{ckpt.step}" / CHECKPOINT_FILE)

            second = spawn([*watchdog_argv(tmp_path, "run-2", 3 * SESSION_S, end=True), "--",
                            *SCRIPT, "--out", str(out), "--steps", str(STEPS), "--workers", "2"])
            code, stdout, stderr = finish(second)
            assert code == 0, stdout[-3000:] + stderr[-3000:]
            assert f"ckpt_path={out / f'checkpoint-{ckpt.step}' / CHECKPOINT_FILE}" in stdout
            final = RunDir(tmp_path / "run-2").read_status()
            assert final is not None and final.state == "completed" and final.step == STEPS
            assert final.last_checkpoint is not None
            assert final.last_checkpoint.path == str(out / f"checkpoint-{STEPS}" / COMMIT_MARKER)
            evs2 = events(tmp_path / "run-2.jsonl")
            verified = [e for e in evs2 if e.get("step") == "end_verify"]
            assert verified and verified[0]["ok"] is True
            assert verified[0]["path"] == final.last_checkpoint.path
            assert end_steps(evs2).index("end_verify") < end_steps(evs2).index("end_dry_run")

            code, stdout, stderr = finish(reference)
            assert code == 0, stderr[-3000:]
            assert_same(torch.load(out / "final.pt"), torch.load(ref / "final.pt"), "weights")
        finally:
            for proc in (reference, first):
                reap(proc)

    def test_a_run_that_raised_is_failed_and_the_runtime_is_not_ended(self, tmp_path: Path) -> None:
        """An exception inside fit() reports state=failed in trainer.json (on_exception), and the
        end transaction never runs."""
        proc = spawn([*watchdog_argv(tmp_path, "run", 60.0, end=True), "--", *SCRIPT, "--out",
                      str(tmp_path / "out"), "--steps", "50", "--raise-at", "7"])
        try:
            code, stdout, stderr = finish(proc)
        finally:
            reap(proc)
        assert code == 1, stdout[-3000:] + stderr[-3000:]
        assert "RuntimeError: boom at step 7" in stderr
        status = RunDir(tmp_path / "run").read_status()
        assert status is not None and status.state == "failed"
        assert "boom at step 7" in status.extra["error"]
        steps = end_steps(events(tmp_path / "run.jsonl"))
        assert not [s for s in steps if s and s.startswith("end_")], steps


class TestKilledDuringLightningsOwnSave:
    def test_resume_never_picks_the_torn_checkpoint(self, tmp_path: Path) -> None:
        """kill -9 while Lightning writes a checkpoint's file: that directory has no marker,
        watchdog_resume picks the previous committed one and the next run resumes from there,
        replaces the torn directory when it reaches that step, and completes."""
        out, flag = tmp_path / "out", tmp_path / "hanging"
        run_env = {"SESSION_WATCHDOG_RUN_DIR": str(tmp_path / "run")}
        proc = spawn([*SCRIPT, "--out", str(out), "--steps", "60", "--step-sleep", "0.05",
                      "--checkpoint-every", "0.5", "--hang-save-at", "30",
                      "--hang-flag", str(flag)], **run_env)
        try:
            wait_for_file(flag, proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            reap(proc)
        torn = Path(flag.read_text()).parent
        assert (torn / CHECKPOINT_FILE).stat().st_size > 0 and not (torn / COMMIT_MARKER).exists()
        assert verify_dir(torn) is None
        committed = watchdog_resume(out)
        assert committed is not None and Path(committed).parent != torn
        before = int(Path(committed).parent.name.split("-")[1])
        assert 0 < before < int(torn.name.split("-")[1])
        assert json.loads((Path(committed).parent / COMMIT_MARKER).read_text())["step"] == before

        resumed = spawn([*SCRIPT, "--out", str(out), "--steps", "60"], **run_env)
        try:
            code, stdout, stderr = finish(resumed)
        finally:
            reap(resumed)
        assert code == 0, stderr[-3000:]
        assert f"ckpt_path={committed}" in stdout
        status = RunDir(tmp_path / "run").read_status()
        assert status is not None and (status.state, status.step) == ("completed", 60)
        assert watchdog_resume(out) == str(out / "checkpoint-60" / CHECKPOINT_FILE)

    def test_lightning_sigterm_exits_75_after_a_committed_checkpoint(self, tmp_path: Path) -> None:
        """SIGTERM: Lightning ends fit() with its SIGTERMException; the callback has committed a
        checkpoint first and the process exits with 75, state=stopped."""
        out = tmp_path / "out"
        run_dir = tmp_path / "run"
        proc = spawn([*SCRIPT, "--out", str(out), "--steps", "400", "--step-sleep", "0.05"],
                     SESSION_WATCHDOG_RUN_DIR=str(run_dir))
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = RunDir(run_dir).read_status() if (run_dir / "trainer.json").exists() else None
                if status is not None and status.pid == proc.pid and status.step >= 5:
                    break
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code, stdout, stderr = finish(proc)
        finally:
            reap(proc)
        assert code == 75, stderr[-3000:]
        status = RunDir(run_dir).read_status()
        assert status is not None and status.state == "stopped"
        ckpt = status.last_checkpoint
        assert ckpt is not None and verify_checkpoint(ckpt.path, ckpt.sha256, ckpt.bytes) is None
        assert watchdog_resume(out) == str(Path(ckpt.path).parent / CHECKPOINT_FILE)
