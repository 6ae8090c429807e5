"""The trainer in real child processes (no daemon): exit codes, signals, kill -9 and resume.

Each child imports torch (about 3 s), so the scenarios are few and each checks a lot.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch
from torch_helpers import assert_same

from session_watchdog import checksum
from session_watchdog.channel import RUN_LOCK, Request, RunDir, TrainerStatus, lock_held
from session_watchdog.trainer.checkpoint import CheckpointManager
from session_watchdog.trainer.session import EXIT_STOPPED

START_S = 180.0  # a child's startup includes importing torch: up to 80 s on a loaded CI machine
EPOCHS, STEPS_PER_EPOCH = 3, 20


def child_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHDOG_")}
    # One intra-op thread: identical float reductions in every run, and no oversubscription.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def spawn_example(run_dir: Path, ckpt_dir: Path, *extra: str,
                  device: str = "cpu") -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "session_watchdog.trainer.example",
            "--checkpoint-dir", str(ckpt_dir), "--run-dir", str(run_dir),
            "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS_PER_EPOCH),
            "--batch-size", "16", "--poll-interval", "0.05", "--heartbeat-interval", "0.2",
            "--device", device, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())


def spawn_script(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())


def finish(proc: subprocess.Popen[str], timeout: float = START_S) -> Tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child did not finish in {timeout} s\n{out}\n{err}") from None
    return proc.returncode, out, err


def wait_for_status(run_dir: Path, proc: subprocess.Popen[str], *, state: str = "running",
                    min_checkpoint_step: Optional[int] = None,
                    timeout: float = START_S) -> TrainerStatus:
    """Wait until ``proc`` reports ``state`` (and a checkpoint at least that far) in trainer.json."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"child exited with {proc.returncode}\n{out}\n{err}")
        status = RunDir(run_dir).read_status() if (run_dir / "trainer.json").exists() else None
        if status is not None and status.pid == proc.pid and status.state == state:
            ckpt = status.last_checkpoint
            if min_checkpoint_step is None or (ckpt is not None
                                               and ckpt.step >= min_checkpoint_step):
                return status
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"child never reported state={state!r}")


def read_status(run_dir: Path) -> TrainerStatus:
    status = RunDir(run_dir).read_status()
    assert status is not None
    return status


def assert_matches_file(status: TrainerStatus) -> None:
    ckpt = status.last_checkpoint
    assert ckpt is not None
    data = Path(ckpt.path).read_bytes()
    assert (ckpt.bytes, ckpt.checksum) == (len(data), checksum.of_file(ckpt.path, "crc32c"))


class TestStopInAChild:
    def test_stop_request_exits_75_after_an_acked_checkpoint(self, tmp_path: Path) -> None:
        """A stop request makes the example checkpoint, ack, release run.lock and exit with 75."""
        run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpt"
        proc = spawn_example(run_dir, ckpt_dir, "--epochs", "1000", "--step-sleep", "0.01",
                             "--checkpoint-every", "0")
        wait_for_status(run_dir, proc)
        RunDir(run_dir).write_request(Request(seq=1, action="stop", reason="session_limit",
                                              deadline=None, issued=time.time()))
        code, out, err = finish(proc)
        assert code == EXIT_STOPPED, err
        status = read_status(run_dir)
        assert (status.state, status.acked_seq, status.pid) == ("stopped", 1, proc.pid)
        assert status.last_checkpoint is not None and status.last_checkpoint.seq == 1
        assert_matches_file(status)
        assert CheckpointManager(ckpt_dir).verify(status.last_checkpoint.path)
        assert f"stopped (request:session_limit) at step {status.last_checkpoint.step}" in out
        assert not lock_held(run_dir / RUN_LOCK)

    @pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
    def test_signal_without_a_daemon_checkpoints_and_exits_75(self, tmp_path: Path,
                                                              signum: int) -> None:
        """SIGUSR1 (SLURM --signal) or SIGTERM with no request file: checkpoint, then exit 75."""
        run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpt"
        proc = spawn_example(run_dir, ckpt_dir, "--epochs", "1000", "--step-sleep", "0.01",
                             "--checkpoint-every", "0")
        wait_for_status(run_dir, proc)
        proc.send_signal(signum)
        code, out, err = finish(proc)
        assert code == EXIT_STOPPED, err
        status = read_status(run_dir)
        assert status.state == "stopped" and status.acked_seq == 0
        assert status.last_checkpoint is not None and status.last_checkpoint.seq is None
        assert_matches_file(status)
        assert f"stopped ({signal.Signals(signum).name})" in out

    def test_an_uncaught_stop_ends_a_plain_script_with_75(self, tmp_path: Path) -> None:
        """A script that does not catch anything exits with 75 when stopped (SessionExit is a SystemExit)."""
        run_dir = tmp_path / "run"
        proc = spawn_script("""
            import sys, time, torch
            from session_watchdog.trainer import Session
            model = torch.nn.Linear(2, 2)
            session = Session(sys.argv[1], model=model, run_dir=sys.argv[2], poll_interval=0.05,
                              heartbeat_interval=0.1, checkpoint_every=None)
            while True:
                session.step()
                time.sleep(0.005)
        """, str(tmp_path / "ckpt"), str(run_dir))
        wait_for_status(run_dir, proc)
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
        assert code == EXIT_STOPPED, err
        assert read_status(run_dir).state == "stopped"

    def test_a_second_sigterm_ends_a_trainer_that_never_reaches_a_step(
            self, tmp_path: Path) -> None:
        """SIGTERM is deferred to the next step; a second one before it gets the default action."""
        run_dir = tmp_path / "run"
        proc = spawn_script("""
            import sys, time, torch
            from session_watchdog.trainer import Session
            session = Session(sys.argv[1], model=torch.nn.Linear(2, 2), run_dir=sys.argv[2],
                              checkpoint_every=None)
            print("ready", flush=True)
            # Stuck: no step boundary comes. It only watches the flag the handler sets, to say
            # when the first SIGTERM has been handled (two pending SIGTERMs would merge into one).
            deadline = time.monotonic() + 300
            while not session._sigterm and time.monotonic() < deadline:
                time.sleep(0.01)
            print("flagged", flush=True)
            time.sleep(300)
        """, str(tmp_path / "ckpt"), str(run_dir))
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "flagged"
        assert proc.poll() is None  # the first one only set a flag
        proc.send_signal(signal.SIGTERM)
        code, _, _ = finish(proc)
        assert code == -signal.SIGTERM


class TestKillAndResume:
    @pytest.mark.parametrize("device", [
        "cpu",
        pytest.param("cuda", marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ]),
    ])
    def test_resume_after_kill_9_is_bit_identical_to_an_uninterrupted_run(
            self, tmp_path: Path, device: str) -> None:
        """Killed -9 mid-training, the example resumes from its last acked checkpoint and ends
        with the same parameters, optimizer state and RNG, bit for bit, as a run never stopped."""
        ref_run, ref_ckpt = tmp_path / "ref-run", tmp_path / "ref-ckpt"
        run_dir, ckpt_dir = tmp_path / "run", tmp_path / "ckpt"
        reference = spawn_example(ref_run, ref_ckpt, "--checkpoint-every", "0", device=device)
        # Slow steps (no number changes): the kill lands before the last step even when this
        # process polls late on a loaded machine.
        victim = spawn_example(run_dir, ckpt_dir, "--step-sleep", "0.1",
                               "--checkpoint-every", "0.25", "--async-save", device=device)

        acked = wait_for_status(run_dir, victim, min_checkpoint_step=15).last_checkpoint
        assert acked is not None
        assert lock_held(run_dir / RUN_LOCK)
        victim.kill()
        finish(victim)
        assert victim.returncode == -signal.SIGKILL
        assert not lock_held(run_dir / RUN_LOCK)  # the kernel dropped it with the process
        last = read_status(run_dir).last_checkpoint
        assert last is not None and last.step < EPOCHS * STEPS_PER_EPOCH

        code, ref_out, err = finish(reference)
        assert code == 0, err
        assert f"completed at step {EPOCHS * STEPS_PER_EPOCH}" in ref_out

        code, out, err = finish(spawn_example(run_dir, ckpt_dir, device=device))
        assert code == 0, err
        match = re.search(r"resumed from (\S+) at epoch (\d+) step (\d+)", out)
        assert match is not None, out
        resumed_step = int(match.group(3))
        # The last acked checkpoint, or one committed between its marker and the ack write.
        assert last.step <= resumed_step < EPOCHS * STEPS_PER_EPOCH
        if resumed_step == last.step:
            assert match.group(1) == last.path
        assert f"completed at step {EPOCHS * STEPS_PER_EPOCH}" in out

        ours = CheckpointManager(ckpt_dir).load()
        theirs = CheckpointManager(ref_ckpt).load()
        assert (ours["step"], ours["epoch"]) == (theirs["step"], theirs["epoch"])
        assert_same(ours["model"], theirs["model"], "model")
        assert_same(ours["optimizer"]["state"], theirs["optimizer"]["state"], "optimizer")
        assert ours["scheduler"] == theirs["scheduler"]
        assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
        if device == "cuda":
            assert_same(ours["rng"]["cuda"], theirs["rng"]["cuda"], "cuda rng")


