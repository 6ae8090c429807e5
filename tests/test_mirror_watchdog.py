"""The watchdog's side of the checkpoint mirror (issue 14): lead time, warnings, the end, status.

No torch here: the daemon reads the mirror only through ``trainer.json`` (``extra["mirror"]`` and
``extra["last_mirrored"]``, which daemons that do not know mirrors ignore).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from fakes import sample, status, write_checkpoint

from session_watchdog import channel
from session_watchdog.actions import EndTransaction
from session_watchdog.cli import render_status
from session_watchdog.config import OFF, Config
from session_watchdog.policy import MIRROR_FAILING, PolicyState, decide, lead_time

NOW = 1_800_000_000.0


def cfg(**overrides: Any) -> Config:
    base = dict(platform="generic", max_session=3600.0, margin=300.0, stop_margin=60.0,
                save_factor=2.0, default_checkpoint_time=60.0, default_step_time=10.0,
                warn_before=(), resend_after=120.0, checkpoint_every=OFF, idle_limit=OFF,
                idle_warn=OFF, gpu_idle_after=600.0, trainer_stall_after=600.0)
    base.update(overrides)
    return Config(**base)


def mirror_extra(*, state: str = "ok", problem: Optional[str] = None, last: Optional[Dict[str, Any]] = None,
                 local: bool = True, target: str = "/mnt/mirror") -> Dict[str, Any]:
    mirror: Dict[str, Any] = {"target": target, "local": local, "state": state, "skipped": 0}
    if problem is not None:
        mirror.update(problem=problem, error=f"[Errno] {problem}")
    extra: Dict[str, Any] = {"mirror": mirror}
    if last is not None:
        extra["last_mirrored"] = last
    return extra


class TestProtocol:
    def test_mirror_status_is_read_from_extra_and_absent_without_a_mirror(self):
        """MirrorStatus comes from extra["mirror"]/["last_mirrored"]; a trainer without a mirror has none."""
        st = status(heartbeat=NOW, extra=mirror_extra(last={"path": "/mnt/mirror/c.pt", "step": 7,
                                                            "sha256": "ab" * 32, "bytes": 10,
                                                            "at": NOW, "duration_s": 4.5}))
        got = channel.MirrorStatus.from_status(st)
        assert got is not None
        assert (got.target, got.state, got.last_step, got.last_path, got.last_duration_s) == (
            "/mnt/mirror", "ok", 7, "/mnt/mirror/c.pt", 4.5)
        assert channel.MirrorStatus.from_status(status(heartbeat=NOW)) is None

    def test_a_trainer_json_with_mirror_fields_still_parses(self):
        """trainer.json round-trips through TrainerStatus with the mirror keys (old readers ignore them)."""
        st = status(heartbeat=NOW, extra=mirror_extra(state="failing", problem="full"))
        back = channel.TrainerStatus.from_json(st.to_json())
        assert back.extra["mirror"]["problem"] == "full"

    def test_a_malformed_mirror_report_is_ignored(self):
        """A mirror report with wrong types reads as no mirror rather than failing the tick."""
        st = status(heartbeat=NOW, extra={"mirror": {"target": 3, "state": "ok"}})
        assert channel.MirrorStatus.from_status(st) is None


class TestLeadTime:
    @pytest.mark.parametrize("extra, mirror_s", [
        ({}, 0.0),                                                            # no mirror
        (mirror_extra(last={"step": 1, "at": NOW, "duration_s": 40.0}), 40.0),  # measured copy
        (mirror_extra(), 20.0),                       # nothing measured yet: as long as a save
        (mirror_extra(state="refused", problem="same_filesystem"), 0.0),     # refused: no copy
    ])
    def test_mirror_time_adds_to_both_leads(self, extra, mirror_s):
        """lead = margin + k x checkpoint + step + mirror time (commit -> verified on the mirror)."""
        st = status(heartbeat=NOW, step_time_s=0.5, ckpt_at=NOW, ckpt_duration_s=20.0, extra=extra)
        got = lead_time(cfg(), sample(now=NOW, trainer_status=st))
        assert (got.lead_s, got.stop_lead_s, got.mirror_s) == (
            300 + 2 * 20 + 0.5 + mirror_s, 60 + 20 + 0.5 + mirror_s, mirror_s)

    def test_a_slow_mirror_moves_the_stop_request_earlier(self):
        """With 100 s of mirror time the stop goes out at 180.5 s left instead of 80.5 s."""
        extra = mirror_extra(last={"step": 1, "at": NOW, "duration_s": 100.0})
        decisions = []
        for left in (181.0, 180.0):
            elapsed = 3600.0 - left
            st = status(heartbeat=NOW + elapsed, step_time_s=0.5, ckpt_at=NOW + elapsed - 1,
                        ckpt_duration_s=20.0, extra=extra)
            _, got = decide(cfg(), PolicyState(done=frozenset({"session_checkpoint"})),
                            sample(now=NOW + elapsed, elapsed=elapsed, trainer_status=st))
            decisions.append([(d.kind, d.action) for d in got if d.kind == "request"])
        assert decisions == [[], [("request", "stop")]]


class TestWarnings:
    def test_a_failing_mirror_is_warned_once_per_problem(self):
        """A mirror problem is one warning while it lasts; a different problem warns again."""
        state = PolicyState()
        seen: List[List[str]] = []
        for problem in ("unreachable", "unreachable", "full", None, "full"):
            extra = mirror_extra(state="failing" if problem else "ok", problem=problem)
            st = status(heartbeat=NOW, extra=extra)
            state, got = decide(cfg(max_session=OFF), state, sample(now=NOW, trainer_status=st))
            seen.append([d.data["problem"] for d in got if d.reason == MIRROR_FAILING])
        assert seen == [["unreachable"], [], ["full"], [], ["full"]]


def _checkpoint(directory: Path, payload: bytes, step: int) -> channel.CheckpointInfo:
    """A committed checkpoint under the name CheckpointManager gives its first save."""
    return write_checkpoint(directory, payload, step, NOW, name=f"ckpt-00000001-step{step}.pt")


class TestEnd:
    def _transaction(self, tmp_path: Path, extra: Dict[str, Any], ckpt: channel.CheckpointInfo,
                     calls: List[str], flushed: List[List[str]]) -> EndTransaction:
        st = channel.TrainerStatus(pid=4242, start_time=1.0, state="completed", step=ckpt.step, epoch=0,
                                   step_time_s=0.1, acked_seq=0, last_checkpoint=ckpt,
                                   heartbeat=NOW, extra=extra)

        def flush(paths: List[str], unmount: bool = True) -> str:
            flushed.append(list(paths))
            return "not-on-drive"

        return EndTransaction(run_dir=channel.RunDir(tmp_path / "run"), reason="training_complete",
                              status=st, grace_s=0.0, dry_run=False,
                              end_action=("recorder", lambda: calls.append("end") or "ok"),
                              sleep=lambda s: None, confirm_after_s=0.0, alive=lambda: False,
                              flush=flush)

    def test_the_runtime_ends_once_the_final_checkpoint_verifies_on_the_mirror(self, tmp_path):
        """The final checkpoint, re-hashed on a local mirror, lets the end go ahead."""
        payload = b"weights" * 999
        ckpt = _checkpoint(tmp_path / "ckpt", payload, 40)
        mirrored = _checkpoint(tmp_path / "mirror", payload, 40)
        extra = mirror_extra(target=str(tmp_path / "mirror"), last={
            "path": mirrored.path, "step": 40, "sha256": ckpt.sha256, "bytes": len(payload),
            "at": time.time(), "duration_s": 2.0})
        calls: List[str] = []
        flushed: List[List[str]] = []
        tx = self._transaction(tmp_path, extra, ckpt, calls, flushed)
        assert tx.run() == "ended"
        assert calls == ["end"]
        assert flushed == [[mirrored.path, mirrored.path + ".sha256"]]  # the final flush only

    @pytest.mark.parametrize("case", ["older_on_mirror", "nothing_yet", "failing", "torn_on_mirror"])
    def test_the_end_refuses_while_the_final_checkpoint_is_not_verified_on_the_mirror(self, tmp_path, case):
        """Not yet copied, an older step there, a failing mirror or a torn mirror file: no end action."""
        payload = b"weights" * 999
        ckpt = _checkpoint(tmp_path / "ckpt", payload, 40)
        mirrored = _checkpoint(tmp_path / "mirror", payload, 40)
        last: Optional[Dict[str, Any]] = {"path": mirrored.path, "step": 40, "sha256": ckpt.sha256,
                                          "bytes": len(payload), "at": NOW, "duration_s": 2.0}
        state, problem = "ok", None
        if case == "older_on_mirror":
            last = dict(last, step=30, sha256="cd" * 32)
        elif case == "nothing_yet":
            last = None
        elif case == "failing":
            last, state, problem = dict(last, step=30, sha256="cd" * 32), "failing", "unreachable"
        else:
            Path(mirrored.path).write_bytes(payload[:-7])
        calls: List[str] = []
        tx = self._transaction(tmp_path, mirror_extra(state=state, problem=problem,
                                                      target=str(tmp_path / "mirror"), last=last),
                               ckpt, calls, [])
        assert tx.run() == "aborted"
        assert calls == []


class TestStatus:
    def test_status_shows_the_local_and_the_mirrored_step(self):
        """`session-watchdog status` has a "mirrored" row with the mirror's step and its problem."""
        trainer = dataclasses.asdict(status(heartbeat=NOW, step=50, ckpt_at=NOW - 10, extra=mirror_extra(
            state="failing", problem="unreachable",
            last={"path": "/mnt/mirror/ckpt-00000003-step30.pt", "step": 30, "at": NOW - 60})))
        info = {"run_dir": "/run", "daemon_running": False, "daemon": {}, "elapsed_s": 100.0,
                "budget_s": None, "remaining_s": None, "trainer": trainer, "trainer_alive": True,
                "trainer_saving": False, "outstanding": None, "errors": [], "now": NOW}
        text = render_status(info)
        assert "last checkpoint  step 50" in text
        assert ("mirrored         step 30, 1m00s ago: /mnt/mirror/ckpt-00000003-step30.pt; "
                "failing: unreachable ([Errno] unreachable)") in text
