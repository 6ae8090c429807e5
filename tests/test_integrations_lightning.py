"""Lightning + WatchdogCallback in real child processes, driven by a real daemon."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import TORCHRUN

pytest.importorskip("lightning")
pytest.importorskip("torchdata")
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

from session_watchdog.actions import verify_checkpoint  # noqa: E402
from session_watchdog.channel import RunDir  # noqa: E402
from session_watchdog.integrations._core import COMMIT_MARKER, verify_dir  # noqa: E402
from session_watchdog.integrations.lightning import CHECKPOINT_FILE, watchdog_resume  # noqa: E402

SCRIPT = [sys.executable, str(SCRIPTS / "lightning_train.py")]


class TestLightningUnderTheDaemon:
    def test_stop_before_the_deadline_then_resume_completes_with_identical_weights(
            self, tmp_path: Path) -> None:
        """A 40 s session: checkpoint and stop requested and acked before the limit, fit() returns
        and the script exits 75 with a committed checkpoint-N; the next runtime resumes from it
        mid-epoch (a 2-worker StatefulDataLoader), completes, the end transaction verifies the
        final committed checkpoint, and the weights equal an uninterrupted run's bit for bit."""
        check_stop_then_resume(tmp_path, SCRIPT, extra=("--workers", "2"),
                               watchdog_resume=watchdog_resume,
                               resume_target=lambda checkpoint: checkpoint / CHECKPOINT_FILE,
                               resume_arg="ckpt_path")

    def test_a_run_that_raised_is_failed_and_the_runtime_is_not_ended(self, tmp_path: Path) -> None:
        """An exception inside fit() reports state=failed in trainer.json (on_exception), and the
        end transaction never runs."""
        check_failed_run_is_not_ended(tmp_path, SCRIPT)


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

        code, stdout, stderr = run_to_end([*SCRIPT, "--out", str(out), "--steps", "60"], **run_env)
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


class TestDirectoryCheckpoints:
    def test_a_checkpoint_written_as_a_directory_is_resumed(self, tmp_path: Path) -> None:
        """A CheckpointIO that writes model.ckpt as a directory (as FSDP sharded and DeepSpeed
        do): the stop at step 9 commits it, watchdog_resume returns it and fit() resumes from
        step 9 and completes."""
        out, run_env = tmp_path / "out", {"SESSION_WATCHDOG_RUN_DIR": str(tmp_path / "run")}
        argv = [sys.executable, str(SCRIPTS / "lightning_cases.py"), "--out", str(out),
                "--directory-checkpoints"]
        code, stdout, stderr = run_to_end([*argv, "--sigterm-at", "9"], **run_env)
        assert code == 75, stderr[-3000:]
        ckpt = out / "checkpoint-9" / CHECKPOINT_FILE
        assert ckpt.is_dir() and verify_dir(ckpt.parent) is not None
        marker = json.loads((ckpt.parent / COMMIT_MARKER).read_text())
        assert {"model.ckpt/weights.pt", "model.ckpt/state.pt"} <= set(marker["files"])
        assert watchdog_resume(out) == str(ckpt)

        code, stdout, stderr = run_to_end([*argv, "--sigterm-at", "0"], **run_env)
        assert code == 0, stderr[-3000:]
        assert f"ckpt_path={ckpt}" in stdout and "started at step 9" in stdout, stdout
        status = RunDir(tmp_path / "run").read_status()
        assert status is not None and (status.state, status.step) == ("completed", 40)


class TestStopAtAnEpochsLastBatch:
    def test_the_resumed_run_trains_every_remaining_epoch(self, tmp_path: Path) -> None:
        """A StatefulDataLoader of 10 batches, 3 epochs: a stop at step 10 (the first epoch's
        last batch) is saved at the epoch's end, and the resumed run trains epochs 2 and 3 to
        step 30 (saved at the batch end, Lightning skipped an epoch and ended at 20)."""
        out, run_env = tmp_path / "out", {"SESSION_WATCHDOG_RUN_DIR": str(tmp_path / "run")}
        argv = [sys.executable, str(SCRIPTS / "lightning_cases.py"), "--out", str(out),
                "--stateful-loader-epochs"]
        code, stdout, stderr = run_to_end([*argv, "--sigterm-at", "10"], **run_env)
        assert code == 75, stderr[-3000:]
        assert watchdog_resume(out) == str(out / "checkpoint-10" / CHECKPOINT_FILE)
        code, stdout, stderr = run_to_end([*argv, "--sigterm-at", "0"], **run_env)
        assert code == 0, stderr[-3000:]
        assert "started at step 10" in stdout and "completed at step 30" in stdout, stdout
        status = RunDir(tmp_path / "run").read_status()
        assert status is not None and (status.state, status.step) == ("completed", 30)


@TORCHRUN
class TestLightningUnderTorchrun:
    def test_sigterm_to_rank_0_commits_a_checkpoint_and_every_rank_exits_75(
            self, tmp_path: Path) -> None:
        """DDP (torchrun, 2 ranks): SIGTERM to rank 0 alone at step 7; Lightning raises its
        SIGTERMException on rank 0 at that batch end and on rank 1 at the next batch start; both
        ranks agree on the stop, commit checkpoint-7 and exit 75 (state=stopped)."""
        out, run_dir = tmp_path / "out", tmp_path / "run"
        code, stdout, stderr = run_to_end([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                      "--max-restarts=0", str(SCRIPTS / "lightning_cases.py"), "--out", str(out),
                      "--sigterm-at", "7"], SESSION_WATCHDOG_RUN_DIR=str(run_dir))
        # torchrun reports the first worker's 75 as failed (and ends the other one)
        assert code != 0 and "exitcode  : 75" in stderr, stdout[-3000:] + stderr[-6000:]
        assert stderr.count("stopped reason=SIGTERM step=7") == 2, stderr[-6000:]
        assert "fit() returned" not in stdout
        status = RunDir(run_dir).read_status()
        assert status is not None and (status.state, status.step) == ("stopped", 7), status
        assert status.last_checkpoint is not None and status.last_checkpoint.step == 7
        assert watchdog_resume(out) == str(out / "checkpoint-7" / CHECKPOINT_FILE)
