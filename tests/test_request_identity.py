"""Two sessions never share a request sequence: a request is acknowledged by its id (rid), which
the trainer echoes, so a stale ``acked_seq`` from before a reboot acknowledges nothing (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import psutil
import pytest
import torch
from integration_helpers import reap

from session_watchdog import channel
from session_watchdog.channel import Request, RunDir, TrainerStatus
from session_watchdog.trainer.session import Session

CLI = [sys.executable, "-m", "session_watchdog"]
WAIT_S = 60.0
OLD = "0123456789abcdef"  # the rid prefix of the previous session's daemon


def stale_status(pid: int = 4_000_000, acked_rid: Optional[str] = f"{OLD}.6") -> TrainerStatus:
    """What a trainer of the previous session left: stopped after acknowledging request 6."""
    return TrainerStatus(pid=pid, start_time=1.0, state="stopped", step=500, epoch=3,
                         step_time_s=0.1, acked_seq=6, last_checkpoint=None,
                         heartbeat=time.time() - 86400, acked_rid=acked_rid)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[List[Session]]:
    made: List[Session] = []
    yield made
    for session in made:
        session.close()


def make_session(made: List[Session], tmp_path: Path, run_dir: Path) -> Session:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    session = Session(tmp_path / "ckpt", model=model,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1), run_dir=run_dir,
                      poll_interval=0.02, heartbeat_interval=60.0, checkpoint_every=None,
                      handle_signals=False)
    made.append(session)
    return session


def train_until(session: Session, predicate, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        session.optimizer.zero_grad()
        session.model(torch.randn(3, 4)).pow(2).mean().backward()
        session.optimizer.step()
        session.step()
        time.sleep(0.002)


class TestTrainerEchoesTheRequestId:
    @pytest.mark.parametrize("acked_rid", [f"{OLD}.6", None], ids=["rid-trainer", "older-trainer"])
    def test_a_new_sessions_seq_1_is_answered_despite_a_stale_acked_seq_6(self, tmp_path, sessions,
                                                                         acked_rid):
        """After a reboot the daemon's seq restarts at 1 while trainer.json says acked_seq 6: the
        trainer still answers the new request and echoes its rid."""
        rd = RunDir(tmp_path / "run")
        rd.write_status(stale_status(acked_rid=acked_rid))
        rd.write_request(Request(6, "stop", "session_limit", None, time.time() - 86400, rid=f"{OLD}.6"))
        session = make_session(sessions, tmp_path, rd.path)
        rd.write_request(Request(1, "checkpoint", "session_limit", None, time.time(), rid="feed.1"))
        train_until(session, lambda: rd.read_status().acked_rid == "feed.1")
        answered = rd.read_status()
        assert (answered.acked_seq, answered.last_checkpoint.seq) == (1, 1)

    def test_the_previous_sessions_request_is_not_answered_again(self, tmp_path, sessions):
        """The request the previous trainer acknowledged (its rid adopted) is not redone."""
        rd = RunDir(tmp_path / "run")
        rd.write_status(stale_status())
        rd.write_request(Request(6, "checkpoint", "x", None, time.time() + 5, rid=f"{OLD}.6"))
        session = make_session(sessions, tmp_path, rd.path)
        until = time.monotonic() + 1.0  # 50 poll intervals
        while time.monotonic() < until:
            session.step()
            time.sleep(0.002)
        assert rd.read_status().last_checkpoint is None  # nothing saved for the old request

    def test_a_request_from_before_the_start_is_skipped_but_its_resend_is_answered(self, tmp_path,
                                                                                   sessions):
        """A request issued before the trainer started was meant for a previous one; when the
        daemon sends it again (same rid, issued later) it is this trainer's to answer."""
        rd = RunDir(tmp_path / "run")
        # Before this process started (the trainer here is the test process itself, which may
        # have started minutes ago in a long suite).
        born = psutil.Process().create_time()
        rd.write_request(Request(1, "checkpoint", "x", None, born - 60, rid="feed.1"))
        session = make_session(sessions, tmp_path, rd.path)
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            session.step()
            time.sleep(0.002)
        assert rd.read_status().last_checkpoint is None
        rd.write_request(Request(1, "checkpoint", "x", None, time.time(), rid="feed.1"))
        train_until(session, lambda: rd.read_status().acked_rid == "feed.1")

    def test_a_request_with_a_300_digit_seq_is_ignored(self, tmp_path, sessions):
        """A hostile seq is malformed, never acknowledged; the next valid request is answered."""
        rd = RunDir(tmp_path / "run")
        session = make_session(sessions, tmp_path, rd.path)
        (rd.path / channel.REQUEST_FILE).write_text(json.dumps(
            {"v": 1, "seq": int("9" * 300), "action": "stop", "reason": "x", "deadline": None,
             "issued": time.time(), "rid": "feed.1"}))
        for _ in range(100):
            session.step()
        time.sleep(0.1)
        assert rd.read_status().acked_rid == "" and rd.read_status().acked_seq == 0
        rd.write_request(Request(2, "checkpoint", "x", None, time.time(), rid="feed.2"))
        train_until(session, lambda: rd.read_status().acked_rid == "feed.2")


    def test_session_starts_past_5000_level_trainer_and_request_files(self, tmp_path, sessions):
        """Deeply nested trainer.json and request.json are ignored (no RecursionError); the next
        valid request is answered."""
        rd = RunDir(tmp_path / "run")
        deep = '{"v": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}"
        (rd.path / channel.TRAINER_FILE).write_text(deep)
        (rd.path / channel.REQUEST_FILE).write_text(deep)
        session = make_session(sessions, tmp_path, rd.path)
        rd.write_request(Request(1, "checkpoint", "x", None, time.time(), rid="feed.1"))
        train_until(session, lambda: rd.read_status().acked_rid == "feed.1")


class TestRebootWithAStaleAckStillStopsBeforeTheDeadline:
    def test_real_trainer_stops_before_the_budget(self, tmp_path):
        """A run dir kept across a reboot (old session.json, state.json, trainer.json acked_seq 6,
        request.json seq 6): the new watchdog's stop reaches a real trainer before the budget."""
        rd = RunDir(tmp_path / "run")
        old_start = time.time() - 86400
        rd.write(channel.SESSION_FILE, {"v": 1, "start": old_start, "source": "x",
                                        "boot_id": "a-previous-boot", "pid1": 1.0,
                                        "platform": "generic", "slurm_job": None})
        rd.write(channel.STATE_FILE, {"v": 1, "session_start": old_start, "policy": {
            "seq": 6, "rid_prefix": OLD, "outstanding": None}})
        rd.write_status(stale_status())
        rd.write_request(Request(6, "stop", "session_limit", None, old_start + 100, rid=f"{OLD}.6"))
        log_file = tmp_path / "log.jsonl"
        budget_s = 45.0
        proc = subprocess.Popen(
            [*CLI, "run", "--platform", "generic", "--max-session", f"{budget_s:g}s",
             "--interval", "0.5s", "--margin", "12s", "--stop-margin", "6s",
             "--default-checkpoint-time", "1s", "--default-step-time", "0.5s",
             "--checkpoint-every", "off", "--resend-after", "5s", "--preemption", "off",
             "--run-dir", str(rd.path), "--log-file", str(log_file),
             "--", sys.executable, "-m", "session_watchdog.trainer.example", "--device", "cpu",
             "--epochs", "400", "--steps-per-epoch", "50", "--step-sleep", "0.02",
             "--checkpoint-every", "0", "--checkpoint-dir", str(tmp_path / "ckpt"),
             "--poll-interval", "0.25", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            reap(proc)
        assert proc.returncode == 75, err[-3000:]
        events = [json.loads(line) for line in log_file.read_text().splitlines()]
        requests = [e for e in events if e["event"] == "decision" and e["kind"] == "request"]
        stop = [e for e in requests if e["action"] == "stop"][-1]
        assert stop["seq"] < 6  # the sequence restarted: only the rid tells the sessions apart
        final = rd.read_status()
        assert final.state == "stopped" and final.acked_seq == stop["seq"]
        written = [e for e in events if e.get("step") == "request_written" and e["seq"] == stop["seq"]]
        assert final.acked_rid is not None and final.acked_rid.endswith(f".{stop['seq']}")
        assert not final.acked_rid.startswith(OLD)
        # the real trainer (it holds run.lock) passes the kernel's proof: its wake-up was sent
        assert written and written[0]["signal"] == "sent", written
        acks = [e for e in events if e["event"] == "decision" and e["kind"] == "ack"
                and e["seq"] == stop["seq"]]
        assert len(acks) == 1
        # the stop was acknowledged on the session clock before the budget ran out
        before_ack = [e for e in events[:events.index(acks[0])] if e["event"] == "sample"]
        assert before_ack[-1]["elapsed_s"] < budget_s
