"""End to end with real processes: the daemon and the example trainer together."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from session_watchdog import channel
from session_watchdog.actions import verify_checkpoint

CLI = [sys.executable, "-m", "session_watchdog"]


def events(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


class TestDemo:
    def test_thirty_second_session_checkpoints_stops_resumes_and_completes(self, tmp_path):
        """Daemon with a 30 s limit + example trainer: the request comes before the limit, the trainer
        acks and stops with a valid checkpoint, a new session resumes from that step and completes."""
        # no speed assumption: the demo's budgets start at the trainer's first step, however late
        proc = subprocess.run([*CLI, "demo", "--session", "30s", "--dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        evs = events(tmp_path / "watchdog.jsonl")
        starts = [i for i, e in enumerate(evs) if e["event"] == "daemon_started"]
        first = evs[starts[0]:starts[1]]
        samples = [e for e in first if e["event"] == "sample"]
        # the session limit's requests (a machine short of RAM may add a ram_pressure one)
        requests = [e for e in first if e["event"] == "decision" and e["kind"] == "request"
                    and e["reason"] == "session_limit"]
        assert [r["action"] for r in requests] == ["checkpoint", "stop"]
        # every request went out, and was acknowledged, before the 30 s limit (session clock of the tick)
        def tick_elapsed(event):
            return [e for e in first[:first.index(event)] if e["event"] == "sample"][-1]["elapsed_s"]
        acks = [e for e in first if e["event"] == "decision" and e["kind"] == "ack"
                and e["seq"] in {r["seq"] for r in requests}]
        assert sorted(e["seq"] for e in acks) == [r["seq"] for r in requests]
        assert max(tick_elapsed(e) for e in requests + acks) < 30.0
        # the stop is logged as asked for, not as a failure (the demo's trainer exits 75)
        assert samples[-1]["trainer"]["state"] == "stopped"
        assert [(e["kind"], e["reason"]) for e in first if e["event"] == "decision"
                and e["reason"].startswith("training_")] == [("info", "training_stopped")]
        stopped = samples[-1]["trainer"]["checkpoint"]
        # Runtime 2 saves too and keeps the last 2: runtime 1's file may be gone by now. Runtime
        # 2's resume, which verifies size and checksum before loading, is the proof that it was valid.
        # ("resumed from PATH at epoch ..." from the example, "resumed path=PATH" from its log)
        resumed = re.findall(r"resumed (?:from |path=)(\S+)", proc.stdout + proc.stderr)
        assert stopped["path"] in resumed, resumed
        second = evs[starts[1]:]
        seen = [e["trainer"]["step"] for e in second if e["event"] == "sample" and e["trainer"]["step"] is not None]
        # 1.6 x 30 s / 0.1 s = 480 steps, whole epochs of 60
        assert seen[0] >= stopped["step"] and seen[-1] == 480
        assert "resumed from the checkpoint at step" in proc.stdout


class TestSlurmSignal:
    def test_sigusr1_to_a_wrapped_job_becomes_a_stop_and_a_valid_checkpoint(self, tmp_path):
        """sbatch --signal=B:USR1@300 reaches the watchdog: it asks the trainer to stop, the trainer
        checkpoints, acks and exits 75, and so does the watchdog."""
        log_file = tmp_path / "log.jsonl"
        proc = subprocess.Popen(
            [*CLI, "run", "--interval", "0.5s", "--slurm-signal-grace", "300s", "--preemption", "off",
             "--run-dir", str(tmp_path / "run"), "--log-file", str(log_file), "--preemption-poll-every", "0.5s",
             "--", sys.executable, "-m", "session_watchdog.trainer.example", "--device", "cpu", "--epochs", "50",
             "--steps-per-epoch", "50", "--step-sleep", "0.02", "--checkpoint-every", "0",
             "--checkpoint-dir", str(tmp_path / "ckpt"), "--poll-interval", "0.25", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run_dir = channel.RunDir(tmp_path / "run", create=False)
        deadline = time.monotonic() + 180  # the trainer imports torch: slow on a loaded machine
        while time.monotonic() < deadline:
            status = run_dir.read_status() if (tmp_path / "run" / "trainer.json").exists() else None
            if status is not None and status.step > 20:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 75, err[-3000:]
        evs = events(log_file)
        stop = [e for e in evs if e["event"] == "decision" and e.get("kind") == "request"]
        assert [(e["action"], e["reason"], e.get("source")) for e in stop] == [("stop", "preemption", "slurm-signal")]
        final = run_dir.read_status()
        assert (final.state, final.acked_seq) == ("stopped", stop[0]["seq"])
        ckpt = final.last_checkpoint
        assert verify_checkpoint(ckpt.path, ckpt.checksum, ckpt.bytes) is None
