"""Notifications and remote commands (issue 15): real Apprise URLs to local recording servers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from fakes import FakeClock, ScriptedProbe, sample, status
from notify_servers import Recorder, wait_until

from session_watchdog import channel, cli, log, platforms
from session_watchdog.config import Config, ConfigError, load_config
from session_watchdog.daemon import Watchdog
from session_watchdog.notify import Hub
from session_watchdog.notify.channels import Channels, display_url, secret_parts
from session_watchdog.notify.messages import Context, Limiter, Message, compose
from session_watchdog.notify.remote import CommandRejected, parse_command
from session_watchdog.notify.worker import Worker
from session_watchdog.probes import DiskReading

NOW = 1_800_000_000.0
GiB = 2**30
TOKEN = "tok-7f3a9c2e"


@pytest.fixture(autouse=True)
def _fresh_log_state():
    """Listeners and configured secrets are process-wide: each test starts without them."""
    yield
    log._listeners.clear()
    log._extra_secrets.clear()


@pytest.fixture
def servers():
    made: List[Recorder] = []

    def make(*args: Any, **kw: Any) -> Recorder:
        made.append(Recorder(*args, **kw))
        return made[-1]

    yield make
    for server in made:
        server.close()


def write_checkpoint(directory: Path, step: int = 500) -> channel.CheckpointInfo:
    directory.mkdir(parents=True, exist_ok=True)
    payload = b"weights" * 1000
    path = directory / f"ckpt-{step:010d}.pt"
    path.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    channel.write_json(Path(str(path) + ".sha256"), {"v": 1, "file": path.name, "sha256": digest,
                                                     "bytes": len(payload), "step": step})
    return channel.CheckpointInfo(str(path), None, step, NOW, 1.0, len(payload), digest)


def watchdog(tmp_path: Path, probe: Any, clock: FakeClock, end_calls: List[str], **keys: Any) -> Watchdog:
    config = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"), **keys)
    log.configure(config.log_file, console=None)
    return Watchdog(config, platform=platforms.Platform("colab", ("test",)), clock=clock,
                    session_start=NOW, probe=probe, confirm_after_s=0.0,
                    end_action=("POST http://test/unassign", lambda: end_calls.append("end") or "HTTP 200"))


def events(tmp_path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


class TestGoldenSession:
    def test_a_scripted_session_sends_exactly_these_messages(self, tmp_path, servers):
        """Warnings at 60 and 15 min, the acknowledged limit checkpoint, completion, the grace and the end."""
        server = servers()
        ckpt = write_checkpoint(tmp_path / "ckpt")
        clock = FakeClock(NOW)

        def running(step: int, acked: int = 0, heartbeat: float = NOW):
            return sample(trainer_status=status(step=step, acked_seq=acked, heartbeat=heartbeat,
                                                start_time=NOW, ckpt_at=None))

        done = channel.TrainerStatus(pid=4242, start_time=NOW, state="completed", step=500, epoch=3,
                                     step_time_s=0.5, acked_seq=1, last_checkpoint=ckpt,
                                     heartbeat=NOW + 6920)
        script = [running(100), running(200, heartbeat=NOW + 3660), running(400, heartbeat=NOW + 6300),
                  running(450, heartbeat=NOW + 6900), running(460, acked=1, heartbeat=NOW + 6910),
                  sample(alive=False, trainer_status=done)]
        ends: List[str] = []
        dog = watchdog(tmp_path, ScriptedProbe(script), clock, ends, max_session="2h", grace="1s",
                       end_when_done=True, checkpoint_every="off",
                       notify=f"json://127.0.0.1:{server.port}/hook")
        dog.acquire()
        try:
            for advance in (0, 3660, 2640, 600, 10, 10):
                clock.advance(advance)
                dog.tick()
            assert dog.wait_end(60) == "ended"
        finally:
            dog.release()
        assert server.titles() == [
            "session ends in about 59m00s",
            "session ends in about 15m00s",
            "checkpoint for session_limit: acknowledged by the trainer after 10s",
            "training completed (500 steps in 1h55m)",
            "ending the runtime in 1s",
            "runtime end action done",
        ]
        bodies = [body["message"] for _, body in server.posts]
        assert bodies[3] == (f"last checkpoint: step 500, 7 KiB, {ckpt.path}\n"
                             "colab · session 1h55m of 2h00m · step 500")
        assert bodies[4] == ("ending the runtime in 1s (POST http://test/unassign)\n"
                             "cancel: `session-watchdog cancel` on the machine\n"
                             "colab · session 1h55m of 2h00m · step 500")
        assert ends == ["end", "end"]  # the action, and its one retry (the test process lives on)
        sent = [e for e in events(tmp_path) if e["event"] == "notify_sent"]
        assert [e["kind"] for e in sent] == ["session_warning", "session_warning", "checkpoint",
                                             "completed", "end_grace", "end_done"]
        assert {e["channel"] for e in sent} == {f"json://127.0.0.1:{server.port}/***"}

    def test_a_failed_command_reports_its_exit_code_and_error(self, tmp_path, servers):
        """A run that fails says so once, with the exit code and the trainer's last error."""
        server = servers()
        failed = dataclasses.replace(status(step=77, heartbeat=NOW), state="failed",
                                     extra={"error": "ValueError: loss is nan"})
        script = [sample(trainer_status=status(step=70, heartbeat=NOW)),
                  sample(alive=False, trainer_status=failed, child_exit=1)]
        dog = watchdog(tmp_path, ScriptedProbe(script), FakeClock(NOW), [], max_session="off",
                       notify=f"json://127.0.0.1:{server.port}/hook")
        dog.acquire()
        try:
            for _ in range(4):
                dog.tick()
        finally:
            dog.release()
        assert server.titles() == ["training failed (exit code 1)"]
        assert server.posts[0][1]["message"] == ("error: ValueError: loss is nan\n"
                                                 "no checkpoint was reported\n"
                                                 "the runtime is left running\n"
                                                 "colab · session 0s · step 77")

    def test_oom_kills_disk_and_notify_on(self, tmp_path, servers):
        """An OOM kill and a critical disk are sent; kinds left out of notify_on are not."""
        server = servers()
        disk = DiskReading("/data", 10 * 2**20, 100 * GiB)
        base = status(step=5, heartbeat=NOW, ckpt_at=NOW, ckpt_bytes=GiB)
        from fakes import host
        script = [sample(trainer_status=base, host_reading=host(oom=2)),
                  sample(trainer_status=base, host_reading=host(oom=3), disks=[disk])]
        dog = watchdog(tmp_path, ScriptedProbe(script), FakeClock(NOW), [], max_session="off",
                       notify=f"json://127.0.0.1:{server.port}/hook", notify_on="oom,failed")
        dog.acquire()
        try:
            dog.tick()
            dog.tick()
        finally:
            dog.release()
        assert server.titles() == ["out-of-memory kill on this machine"]
        kinds = {e.get("kind") for e in events(tmp_path) if e["event"] == "decision"}
        assert "warn" in kinds  # the disk warning was decided, and not sent (notify_on)
