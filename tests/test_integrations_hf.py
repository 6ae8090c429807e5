"""Hugging Face Trainer + WatchdogCallback in real child processes, driven by a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import TORCHRUN

pytest.importorskip("transformers")
from integration_helpers import (  # noqa: E402
    SCRIPTS,
    check_failed_run_is_not_ended,
    check_stop_then_resume,
    finish,
    free_port,
    reap,
    run_to_end,
    spawn,
    wait_for_file,
)

from session_watchdog.channel import Request, RunDir  # noqa: E402
from session_watchdog.integrations._core import COMMIT_MARKER, verify_dir  # noqa: E402
from session_watchdog.integrations.hf import watchdog_resume  # noqa: E402

SCRIPT = [sys.executable, str(SCRIPTS / "hf_train.py")]


class TestHuggingFaceUnderTheDaemon:
    def test_stop_before_the_deadline_then_resume_completes_with_identical_weights(
            self, tmp_path: Path) -> None:
        """A 40 s session: checkpoint and stop requested and acked before the limit, the script
        exits 75 with a committed checkpoint-N; the next runtime resumes from it, completes, the
        end transaction verifies the final committed checkpoint, and the weights equal an
        uninterrupted run's bit for bit."""
        check_stop_then_resume(tmp_path, SCRIPT, watchdog_resume=watchdog_resume,
                               resume_target=lambda checkpoint: checkpoint,
                               resume_arg="resume_from_checkpoint")

    def test_a_run_that_raised_is_failed_and_the_runtime_is_not_ended(self, tmp_path: Path) -> None:
        """An exception inside trainer.train() reports state=failed in trainer.json (the script's
        excepthook), and the end transaction never runs."""
        check_failed_run_is_not_ended(tmp_path, SCRIPT)


class TestKilledDuringTheTrainersOwnSave:
    def test_resume_never_picks_the_torn_checkpoint(self, tmp_path: Path) -> None:
        """kill -9 while the Trainer writes checkpoint-20: that directory has no marker, HF's own
        get_last_checkpoint would pick it, watchdog_resume picks the committed checkpoint-10 and
        the next run resumes from there and completes."""
        from transformers.trainer_utils import get_last_checkpoint

        out, flag = tmp_path / "out", tmp_path / "hanging"
        run_env = {"SESSION_WATCHDOG_RUN_DIR": str(tmp_path / "run")}
        proc = spawn([*SCRIPT, "--out", str(out), "--steps", "40", "--save-steps", "10",
                      "--hang-save-at", "20", "--hang-flag", str(flag)], **run_env)
        try:
            wait_for_file(flag, proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            reap(proc)
        torn = out / "checkpoint-20"
        assert (torn / "optimizer.pt").exists() and not (torn / COMMIT_MARKER).exists()
        assert verify_dir(torn) is None
        assert get_last_checkpoint(str(out)) == str(torn)
        assert watchdog_resume(out) == str(out / "checkpoint-10")
        marker = json.loads((out / "checkpoint-10" / COMMIT_MARKER).read_text())
        assert marker["step"] == 10 and "model.safetensors" in marker["files"]

        code, stdout, stderr = run_to_end([*SCRIPT, "--out", str(out), "--steps", "40", "--save-steps", "10"],
                        **run_env)
        assert code == 0, stderr[-3000:]
        assert f"resume_from_checkpoint={out / 'checkpoint-10'}" in stdout
        status = RunDir(tmp_path / "run").read_status()
        assert status is not None and (status.state, status.step) == ("completed", 40)

    def test_periodic_checkpoints_are_committed_without_a_daemon(self, tmp_path: Path) -> None:
        """checkpoint_every makes the Trainer save and the callback commit every interval, with no
        daemon and no request; the run then completes with its final committed checkpoint."""
        out = tmp_path / "out"
        code, stdout, stderr = run_to_end([*SCRIPT, "--out", str(out), "--steps", "80", "--step-sleep", "0.05",
                      "--checkpoint-every", "0.5"], SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run"))
        assert code == 0, stderr[-3000:]
        committed = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                           if verify_dir(p) is not None)
        assert len(committed) >= 3 and committed[-1] == 80, committed
        status = RunDir(tmp_path / "run").read_status()
        assert status is not None and (status.state, status.acked_seq) == ("completed", 0)

    def test_a_changed_file_uncommits_a_checkpoint(self, tmp_path: Path) -> None:
        """A committed directory whose file was changed afterwards no longer verifies."""
        from session_watchdog.integrations._core import commit_dir

        directory = tmp_path / "checkpoint-3"
        (directory / "sub").mkdir(parents=True)
        (directory / "a.bin").write_bytes(b"abc")
        (directory / "sub" / "b.json").write_text("{}")
        saved = commit_dir(directory, step=3)
        assert saved.total_bytes == 5 and verify_dir(directory) == saved
        assert watchdog_resume(tmp_path) == str(directory)
        (directory / "a.bin").write_bytes(b"abd")
        assert verify_dir(directory) is None and watchdog_resume(tmp_path) is None


def run_case(tmp_path: Path, case: str, *extra: str) -> tuple[int, dict, str]:
    """Run tests/scripts/hf_cases.py; its exit code, its JSON outcome line and its stderr."""
    code, stdout, stderr = run_to_end([sys.executable, str(SCRIPTS / "hf_cases.py"), "--out", str(tmp_path / "out"),
                  "--case", case, *extra], SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run"))
    lines = [line for line in stdout.splitlines() if line.startswith("{\"global_step\"")]
    return code, (json.loads(lines[-1]) if lines else {}), stderr


class TestTheTrainersOwnSchedule:
    def test_a_stop_with_save_strategy_epoch_keeps_its_checkpoint_committed(
            self, tmp_path: Path) -> None:
        """save_strategy="epoch": a stop at step 5 commits checkpoint-5; the Trainer's epoch-end
        save at the same step is not made, so the acknowledged checkpoint still verifies."""
        code, result, stderr = run_case(tmp_path, "epoch", "--sigterm-at", "5")
        assert code == 75, stderr[-3000:]
        assert result["global_step"] == 5 and result["state"] == "stopped", result
        assert result["committed"] == ["checkpoint-5"] == result["checkpoints"], result
        assert result["resume"] == str(tmp_path / "out" / "checkpoint-5")

    def test_a_stop_at_an_eval_step_without_a_new_best_still_checkpoints(
            self, tmp_path: Path) -> None:
        """save_strategy="best": the stop at step 10, an eval whose loss is no new best (the
        Trainer declines the save there), is saved at the epoch's end and acknowledged."""
        code, result, stderr = run_case(tmp_path, "best", "--sigterm-at", "10")
        assert code == 75, stderr[-3000:]
        assert (result["global_step"], result["state"], result["status_step"]) == (
            10, "stopped", 10), result
        assert "checkpoint-10" in result["committed"], result
        assert result["resume"] == str(tmp_path / "out" / "checkpoint-10")

    def test_early_stopping_completes_the_run_on_its_last_checkpoint(
            self, tmp_path: Path) -> None:
        """EarlyStoppingCallback ends training at step 20 after the Trainer's save there: that
        save is the final one and the run is reported completed."""
        code, result, stderr = run_case(tmp_path, "early_stop")
        assert code == 0, stderr[-3000:]
        assert (result["global_step"], result["state"], result["status_step"]) == (
            20, "completed", 20), result
        assert result["committed"] == ["checkpoint-10", "checkpoint-20"], result

    def test_save_strategy_best_completes_when_the_last_eval_is_no_new_best(
            self, tmp_path: Path) -> None:
        """save_strategy="best", evaluated each epoch, the best eval the first: the Trainer
        declines the final save, and the run is completed on its best committed checkpoint."""
        code, result, stderr = run_case(tmp_path, "best_epoch")
        assert code == 0, stderr[-3000:]
        assert (result["global_step"], result["state"], result["status_step"]) == (
            96, "completed", 96), result
        assert result["committed"] == ["checkpoint-32"] == result["checkpoints"], result

    def test_save_total_limit_1_with_a_best_model_is_refused_before_training(
            self, tmp_path: Path) -> None:
        """save_total_limit=1 with metric_for_best_model (the Trainer would delete the stop's
        checkpoint when training ends) raises a one-line ValueError at on_train_begin, before
        any step."""
        code, result, stderr = run_case(tmp_path, "stl1", "--sigterm-at", "12")
        assert code == 1 and result == {}, stderr[-3000:]
        assert ("ValueError: save_total_limit=1 with metric_for_best_model (or "
                "load_best_model_at_end): the Trainer deletes the watchdog's stop checkpoint "
                "when training ends; set save_total_limit=2 or more") in stderr
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("checkpoint-*"))


@TORCHRUN
class TestHuggingFaceUnderTorchrun:
    def test_both_ranks_stop_at_the_same_step_with_one_committed_checkpoint(
            self, tmp_path: Path) -> None:
        """DDP (torchrun, 2 ranks, gloo): a stop request reaches both ranks through the ranks'
        agreement, both save and stop at the same step and exit 75, and the committed
        checkpoint holds both ranks' RNG files."""
        out, run_dir = tmp_path / "out", tmp_path / "run"
        proc = spawn([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                      "--max-restarts=0", str(SCRIPTS / "hf_train.py"), "--out", str(out),
                      "--steps", "2000", "--step-sleep", "0.02"],
                     SESSION_WATCHDOG_RUN_DIR=str(run_dir))
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = RunDir(run_dir).read_status() if (run_dir / "trainer.json").exists() else None
                if status is not None and status.step >= 10:
                    break
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
            RunDir(run_dir).write_request(Request(seq=1, action="stop", reason="test",
                                                  deadline=None, issued=time.time()))
            code, stdout, stderr = finish(proc)
        finally:
            reap(proc)
        # torchrun reports a worker's 75 as failed
        assert code != 0 and "exitcode  : 75" in stderr, stdout[-3000:] + stderr[-6000:]
        steps = re.findall(r"stopped at step (\d+)", stdout)
        assert len(steps) == 2 and steps[0] == steps[1], stdout
        status = RunDir(run_dir).read_status()
        assert status is not None and (status.state, status.acked_seq) == ("stopped", 1)
        assert status.last_checkpoint is not None and status.last_checkpoint.step == int(steps[0])
        committed = verify_dir(out / f"checkpoint-{steps[0]}")
        assert committed is not None
        marker = json.loads(committed.path.read_text())
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])
