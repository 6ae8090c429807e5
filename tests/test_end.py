"""Ending the runtime: only when it is safe, in order, cancellable, never through a shell."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest
import structlog
from fakes import FakeClock, ScriptedProbe, gpu, sample, status, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_watchdog import channel, platforms
from session_watchdog.actions import (
    EndTransaction,
    colab_unassign,
    end_action_for,
    flush_drive,
    request_cancel,
    verify_checkpoint,
)
from session_watchdog.config import OFF, Config
from session_watchdog.daemon import Watchdog
from session_watchdog.policy import PolicyState, decide, end_blocker

NOW = 1_800_000_000.0


def cfg(**kw) -> Config:
    base = dict(platform="colab", max_session=OFF, end_when_done=True, end_on_failure=False,
                grace=120.0, idle_end_after=1800.0, gpu_idle_after=600.0, idle_limit=OFF, idle_warn=OFF,
                checkpoint_every=OFF)
    base.update(kw)
    return Config(**base)


def done_status(ckpt: Optional[channel.CheckpointInfo], state: str = "completed") -> channel.TrainerStatus:
    return channel.TrainerStatus(pid=4242, start_time=1.0, state=state, step=500, epoch=3, step_time_s=0.1,
                                 acked_seq=0, last_checkpoint=ckpt, heartbeat=NOW)


class Recorder:
    """An end action that records its calls (stands in for unassign/shutdown)."""

    def __init__(self) -> None:
        self.calls: List[float] = []

    def __call__(self) -> str:
        self.calls.append(time.monotonic())
        return "recorded"


def transaction(tmp_path: Path, *, ckpt=None, action=None, **kw) -> EndTransaction:
    run_dir = channel.RunDir(tmp_path / "run")
    kw.setdefault("grace_s", 0.0)
    kw.setdefault("dry_run", False)
    kw.setdefault("sleep", lambda s: None)
    kw.setdefault("confirm_after_s", 0.0)
    kw.setdefault("alive", lambda: False)
    return EndTransaction(run_dir=run_dir, reason="training_complete",
                          status=done_status(ckpt), end_action=("recorder", action), **kw)


def idle_colab_watchdog(tmp_path: Path, probe: ScriptedProbe, clock: FakeClock,
                        action: Optional[Recorder] = None, grace: str = "1ms",
                        dry_run: bool = False, **kw) -> Watchdog:
    """A Colab watchdog whose idle end comes after 10 min, with a recorded end action."""
    config = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "l"),
                          platform="colab", idle_end_after="10m", grace=grace, dry_run=dry_run)
    return Watchdog(config, platform=platforms.Platform("colab", ("t",)), clock=clock,
                    session_start=NOW, probe=probe,
                    end_action=("recorder", action if action is not None else Recorder()),
                    confirm_after_s=0.0, **kw)


def tick_minutes(dog: Watchdog, clock: FakeClock, minutes: range) -> List[int]:
    """Tick once a minute; the minutes whose tick decided an end."""
    ends = []
    for minute in minutes:
        dog.tick()
        ends += [minute for d in dog.last_decisions if d.kind == "end"]
        clock.advance(60.0)
    return ends


class TestEndDecisions:
    @pytest.mark.parametrize("alive, saving, state, child_exit, kw, expected", [
        (False, False, "completed", None, {}, [("end", "training_complete")]),
        (True, False, "completed", None, {}, []),                        # trainer still holds run.lock
        (False, True, "completed", None, {}, []),                        # a save runs
        (False, False, "running", None, {}, []),                         # not finished
        (False, False, "completed", None, {"end_when_done": False}, []),  # switched off
        (False, False, "failed", None, {}, [("warn", "training_failed")]),
        (False, False, "failed", None, {"end_on_failure": True}, [("end", "training_failed")]),
        (False, False, None, 0, {}, [("end", "training_complete")]),     # wrapped command exited 0
        (False, False, None, 1, {}, [("warn", "training_failed")]),      # exited 1: no end, a log line
        (False, False, "stopped", 0, {}, [("info", "training_stopped")]),  # stopped for the session: not done
        (False, False, "stopped", 75, {}, [("info", "training_stopped")]),  # exit 75: the planned stop
        (False, False, "running", 75, {}, [("warn", "training_failed")]),   # 75 without a stop: failed
    ])
    def test_when_the_end_is_decided(self, alive, saving, state, child_exit, kw, expected):
        """The end needs completed training, no live trainer, no save, and end_when_done."""
        st_ = None if state is None else done_status(None, state)
        s = sample(now=NOW, elapsed=10.0, alive=alive, saving=saving, trainer_status=st_, child_exit=child_exit)
        _, decisions = decide(cfg(**kw), PolicyState(), s)
        assert [(d.kind, d.reason) for d in decisions if d.reason.startswith("training_")] == expected

    def test_the_end_is_decided_once(self):
        """A completed run yields one end decision, not one per tick."""
        s = sample(now=NOW, elapsed=10.0, alive=False, trainer_status=done_status(None))
        state, first = decide(cfg(), PolicyState(), s)
        _, second = decide(cfg(), state, s)
        assert [d.kind for d in first] == ["end"] and second == []

    def test_failure_blocks_later_idle_end(self):
        """After a failed run, the idle rule does not end the runtime either (unless asked)."""
        failed = sample(now=NOW, elapsed=0.0, alive=False, trainer_status=done_status(None, "failed"),
                        gpus=[gpu(util=0.0)])
        state, _ = decide(cfg(), PolicyState(), failed)
        idle = sample(now=NOW + 4000, elapsed=4000.0, alive=False, gpus=[gpu(util=0.0)])
        state, decisions = decide(cfg(), state, idle)
        _, decisions = decide(cfg(), state, sample(now=NOW + 5000, elapsed=5000.0, alive=False,
                                                   gpus=[gpu(util=0.0)]))
        assert [d.kind for d in decisions] == []

    def test_idle_runtime_with_no_trainer_is_ended_after_idle_end_after(self):
        """No trainer and every GPU under 5 % for 30 min: the idle end is decided at 1800 s."""
        out = []
        state = PolicyState()
        for elapsed, util in [(0.0, 1.0), (1799.0, 1.0), (1800.0, 1.0)]:
            state, decisions = decide(cfg(), state, sample(now=NOW + elapsed, elapsed=elapsed, alive=False,
                                                           gpus=[gpu(0, util), gpu(1, 0.0)]))
            out.append([d.reason for d in decisions if d.kind == "end"])
        assert out == [[], [], ["idle_end"]]

    def test_unknown_gpu_reading_resets_the_idle_end_timer(self):
        """A None reading at 900 s moves the idle end to 900 + 1800 s."""
        state = PolicyState()
        ends = []
        for elapsed, util in [(0.0, 0.0), (900.0, None), (1000.0, 0.0), (2699.0, 0.0), (2800.0, 0.0)]:
            state, decisions = decide(cfg(), state, sample(now=NOW + elapsed, elapsed=elapsed, alive=False,
                                                           gpus=[gpu(0, util)]))
            ends.append(elapsed) if any(d.kind == "end" for d in decisions) else None
        assert ends == [2800.0]


    def test_a_running_command_keeps_an_idle_runtime(self):
        """A wrapped command on the CPU with every GPU idle for 4000 s is not a forgotten runtime:
        the idle end comes idle_end_after (1800 s) after the tick that saw it end."""
        state, ends = PolicyState(), []
        for elapsed, running, child_exit in [(0.0, True, None), (1800.0, True, None),
                                             (4000.0, True, None), (4001.0, False, 0),
                                             (5800.0, False, 0), (5801.0, False, 0)]:
            s = dataclasses.replace(sample(now=NOW + elapsed, elapsed=elapsed, alive=False,
                                           gpus=[gpu(0, 0.0)], child_exit=child_exit),
                                    child_running=running)
            state, decisions = decide(cfg(end_when_done=False), state, s)
            ends += [(elapsed, d.reason, d.data["idle_s"]) for d in decisions if d.kind == "end"]
        assert ends == [(5801.0, "idle_end", 1800.0)]

    def test_a_running_notebook_cell_keeps_an_idle_runtime(self):
        """A cell preprocessing on the CPU for 3000 s (notebook idle 0) with idle GPUs: the idle
        end comes 1800 s after the cell finished, counted from the tick that saw it finished."""
        state, ends = PolicyState(), []
        for elapsed, notebook_idle in [(0.0, 0.0), (3000.0, 0.0), (3005.0, 4.0),
                                       (4804.0, 1803.0), (4805.0, 1804.0)]:
            s = sample(now=NOW + elapsed, elapsed=elapsed, alive=False, gpus=[gpu(0, 0.0)],
                       notebook_idle_s=notebook_idle)
            state, decisions = decide(cfg(), state, s)
            ends += [(elapsed, d.data["idle_s"]) for d in decisions if d.kind == "end"]
        assert ends == [(4805.0, 1800.0)]

    @pytest.mark.parametrize("state, kw, reason", [
        ("completed", {}, "training_complete"),
        ("failed", {"end_on_failure": True}, "training_failed")])
    def test_a_cell_still_running_after_the_training_delays_its_end(self, state, kw, reason):
        """A notebook Session completed (or failed, with end_on_failure) while a cell still runs
        (an evaluation, an upload): no end until a tick sees no cell running; the wait is said
        once, when the outcome is seen."""
        ends, said = [], []
        state_, done = PolicyState(), done_status(None, state)
        for elapsed, notebook_idle in [(10.0, 0.0), (600.0, 0.0), (605.0, 3.0)]:
            s = sample(now=NOW + elapsed, elapsed=elapsed, alive=False, trainer_status=done,
                       notebook_idle_s=notebook_idle)
            state_, decisions = decide(cfg(**kw), state_, s)
            ends += [(elapsed, d.reason) for d in decisions if d.kind == "end"]
            said += [(elapsed, d.message) for d in decisions if d.kind == "info"]
        assert ends == [(605.0, reason)]
        assert said == ([(10.0, "training completed; the runtime is ended once the running "
                                "notebook cell or command has finished")]
                        if state == "completed" else
                        [(10.0, "training failed; the runtime is ended (end_on_failure) once the "
                                "running notebook cell or command has finished")])

    def test_a_failed_trainer_still_alive_is_not_told_to_set_end_on_failure(self):
        """A failed Session that still holds run.lock, with end_on_failure set: the failure is
        warned at once, saying the end waits for the trainer, and the end follows its exit."""
        failed = done_status(None, "failed")
        state, said = PolicyState(), []
        for elapsed, alive in [(10.0, True), (20.0, True), (30.0, False)]:
            s = sample(now=NOW + elapsed, elapsed=elapsed, alive=alive, trainer_status=failed)
            state, decisions = decide(cfg(end_on_failure=True), state, s)
            said += [(elapsed, d.kind, d.message) for d in decisions if d.reason == "training_failed"]
        assert said == [(10.0, "warn", "training failed: the runtime is ended (end_on_failure) "
                                       "once the trainer has exited"),
                        (30.0, "end", "training failed; ending the runtime (end_on_failure)")]

    def test_a_short_cell_between_two_ticks_restarts_the_idle_clock(self):
        """Cells shorter than a tick (never seen running): the idle end counts from the end of
        the last one, as the notebook's idle time tells it."""
        state, ends = PolicyState(), []
        for elapsed, notebook_idle in [(0.0, 10.0), (1800.0, 60.0), (3539.0, 1799.0),
                                       (3540.0, 1800.0)]:
            s = sample(now=NOW + elapsed, elapsed=elapsed, alive=False, gpus=[gpu(0, 0.0)],
                       notebook_idle_s=notebook_idle)
            state, decisions = decide(cfg(), state, s)
            ends += [(elapsed, d.data["idle_s"]) for d in decisions if d.kind == "end"]
        assert ends == [(3540.0, 1800.0)]

    def test_an_idle_end_counts_from_when_the_trainer_left(self):
        """A live trainer with idle GPUs for 3000 s, then gone after a planned stop: the idle
        end waits a full idle_end_after from the first tick without it."""
        stopped = done_status(None, "stopped")
        state, ends = PolicyState(), []
        for elapsed, alive in [(0.0, True), (3000.0, True), (3001.0, False), (4800.0, False),
                               (4801.0, False)]:
            s = sample(now=NOW + elapsed, elapsed=elapsed, alive=alive, gpus=[gpu(0, 0.0)],
                       trainer_status=done_status(None, "running") if alive else stopped)
            state, decisions = decide(cfg(), state, s)
            ends += [(elapsed, d.data["idle_s"]) for d in decisions if d.kind == "end"]
        assert ends == [(4801.0, 1800.0)]
        assert state.unused_since == 3001.0

    def test_unused_since_is_kept_in_the_saved_state(self):
        """A restarted daemon goes on counting from the saved moment; a state saved before the
        field existed starts counting at its first tick."""
        state, _ = decide(cfg(), PolicyState(), sample(now=NOW + 50.0, elapsed=50.0, alive=False,
                                                       gpus=[gpu(0, 0.0)]))
        assert PolicyState.from_json(state.to_json()).unused_since == 50.0
        old = {k: v for k, v in state.to_json().items() if k != "unused_since"}
        assert PolicyState.from_json(old).unused_since is None


class TestEndBlocker:
    @pytest.mark.parametrize("reason, kw, config_kw, expected", [
        ("training_complete", dict(trainer_status=done_status(None)), {}, None),
        ("training_complete", dict(child_exit=1), {}, "training failed during the grace period"),
        ("training_complete", dict(child_exit=1), {"end_on_failure": True}, None),
        ("idle_end", dict(gpus=[gpu(0, 0.0)]), {}, None),
        ("idle_end", dict(gpus=[gpu(0, None)]), {}, "a GPU is busy or its reading is unknown"),
        ("idle_end", dict(gpus=[gpu(0, 40.0)]), {}, "a GPU is busy or its reading is unknown"),
    ])
    def test_last_moment_check(self, reason, kw, config_kw, expected):
        """Right before the action: a new failure or a woken/unknown GPU (idle path) stops the end."""
        got = end_blocker(cfg(**config_kw), reason, sample(now=NOW, alive=False, **kw))
        assert (got is None) if expected is None else got.startswith(expected)

    @pytest.mark.parametrize("reason", ["idle_end", "training_complete"])
    def test_work_started_during_the_grace_stops_the_end(self, reason):
        """The last check refuses while a watched command or a notebook cell runs (a command
        launched from the notebook, an upload cell started in the grace period), on either path."""
        running = dataclasses.replace(sample(now=NOW, alive=False, gpus=[gpu(0, 0.0)],
                                             trainer_status=done_status(None)), child_running=True)
        refused = "a watched command or a notebook cell is running; not ending the runtime"
        assert end_blocker(cfg(), reason, running) == refused
        cell = dataclasses.replace(running, child_running=False, notebook_idle_s=0.0)
        assert end_blocker(cfg(), reason, cell) == refused
        idle_kernel = dataclasses.replace(cell, notebook_idle_s=30.0)
        assert end_blocker(cfg(), reason, idle_kernel) is None

    USED = "during the grace period; not ending an idle runtime"

    @pytest.mark.parametrize("reason, fresh_kw, unused_since, expected", [
        ("idle_end", {"notebook_idle_s": 720.0}, 0.0, None),                  # no cell since 0
        ("idle_end", {"notebook_idle_s": 5.0}, 0.0, "a notebook cell ran " + USED),
        ("idle_end", {"notebook_idle_s": 720.0, "child_exit": 0}, 0.0,
         "a watched command ran " + USED),                                     # ran and exited
        ("idle_end", {"notebook_idle_s": 720.0}, None,                         # a tick saw use
         "a trainer, a command or a notebook cell ran " + USED),
        ("idle_end", {"notebook_idle_s": 720.0}, 700.0,
         "a trainer, a command or a notebook cell ran " + USED),
        ("training_complete", {"notebook_idle_s": 5.0}, None, None),           # makes no idle claim
    ])
    def test_use_since_the_idle_end_was_decided_stops_it(self, reason, fresh_kw, unused_since,
                                                          expected):
        """Decided at 600 s with no cell since 0 s, checked at 720 s: a cell that ran and
        finished in the grace period, a command that exited since, or a tick that saw the
        runtime in use stops the idle end, though nothing runs at the check."""
        decided = sample(now=NOW, elapsed=600.0, alive=False, gpus=[gpu(0, 0.0)],
                         notebook_idle_s=600.0)
        fresh = sample(now=NOW + 120, elapsed=720.0, alive=False, gpus=[gpu(0, 0.0)], **fresh_kw)
        state = PolicyState(unused_since=unused_since, gpu_idle_since=0.0)
        assert end_blocker(cfg(), reason, fresh, decided, state) == expected


class TestTransaction:
    def test_steps_run_in_order_and_the_action_once(self, tmp_path):
        """verify -> persist -> locks -> grace -> action, each logged; the action runs once."""
        rec = Recorder()
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec, grace_s=3.0)
        with structlog.testing.capture_logs() as events:
            assert tx.run() == "ended"
        steps = [e["step"] for e in events if e["event"] == "action"]
        assert steps == ["end_verify", "end_persist", "end_locks", "end_grace", "end_action"]
        assert len(rec.calls) == 1

    def test_a_torn_checkpoint_aborts(self, tmp_path):
        """A checkpoint whose bytes no longer match its sha256 stops the end before any action."""
        ckpt = write_checkpoint(tmp_path / "ckpt")
        with open(ckpt.path, "r+b") as fh:
            fh.write(b"X")
        rec = Recorder()
        with structlog.testing.capture_logs() as events:
            assert transaction(tmp_path, ckpt=ckpt, action=rec).run() == "aborted"
        assert rec.calls == []
        assert "does not match its sha256" in [e for e in events if e.get("step") == "end_aborted"][0]["message"]

    @pytest.mark.parametrize("read_back", [True, False])
    def test_the_trainers_read_back_is_trusted_while_the_file_is_unchanged(self, tmp_path, read_back):
        """A checkpoint the trainer read back from disk (verified_at + mtime_ns) ends without a
        re-read, logged as trusted; without that report the file is re-read (trusted False)."""
        ckpt = write_checkpoint(tmp_path / "ckpt")
        if read_back:
            ckpt = dataclasses.replace(ckpt, verified_at=NOW,
                                       mtime_ns=os.stat(ckpt.path).st_mtime_ns)
        rec = Recorder()
        with structlog.testing.capture_logs() as events:
            assert transaction(tmp_path, ckpt=ckpt, action=rec).run() == "ended"
        verify = [e for e in events if e.get("step") == "end_verify"]
        assert [(e["ok"], e["trusted"]) for e in verify] == [(True, read_back)]
        assert len(rec.calls) == 1

    def test_a_marker_that_disagrees_aborts(self, tmp_path):
        """The commit marker must agree with the trainer's report."""
        ckpt = write_checkpoint(tmp_path / "ckpt")
        channel.write_json(Path(ckpt.path + ".sha256"), {"v": 1, "sha256": "0" * 64, "bytes": ckpt.bytes})
        assert verify_checkpoint(ckpt.path, ckpt.sha256, ckpt.bytes).endswith("does not match the trainer's report")

    @pytest.mark.parametrize("held, word", [(channel.RUN_LOCK, "run.lock"), (channel.SAVE_LOCK, "save.lock")])
    def test_a_live_trainer_or_a_running_save_aborts(self, tmp_path, held, word):
        """Someone holding run.lock or save.lock stops the end: no action."""
        rec = Recorder()
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec)
        holder = channel.FileLock(tx.run_dir.file(held), shared=True)
        holder.acquire()
        try:
            assert tx.run() == "aborted"
        finally:
            holder.release()
        assert rec.calls == []

    def test_cancel_during_grace(self, tmp_path):
        """`session-watchdog cancel` during the grace period stops the end; the locks are let go."""
        from session_watchdog.cli import main

        rec = Recorder()
        run_dir = tmp_path / "run"

        def sleep(seconds):
            assert main(["cancel", "--run-dir", str(run_dir)]) == 0
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec, grace_s=120.0,
                         sleep=sleep)
        with channel.FileLock(run_dir / channel.DAEMON_LOCK):  # a watchdog runs (cancel checks)
            assert tx.run() == "cancelled"
        assert rec.calls == [] and not channel.lock_held(run_dir / channel.RUN_LOCK)

    def test_dry_run_never_calls_the_end_action(self, tmp_path):
        """dry_run does every step but the action and says what it would have done."""
        rec = Recorder()
        with structlog.testing.capture_logs() as events:
            outcome = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec,
                                  dry_run=True).run()
        assert outcome == "dry-run" and rec.calls == []
        assert events[-1]["message"] == "dry run: would now run recorder"

    def test_unconfirmed_end_is_retried_once(self, tmp_path):
        """Still alive after the action: end_action_unconfirmed is logged and the action retried once."""
        rec = Recorder()
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec, alive=lambda: True)
        with structlog.testing.capture_logs() as events:
            tx.run()
        assert len(rec.calls) == 2
        assert [e["step"] for e in events][-2:] == ["end_action_unconfirmed", "end_action"]

    def test_a_cancel_after_the_end_action_stops_its_retry_and_says_it_came_too_late(self, tmp_path):
        """A cancel during the confirm wait cannot undo the end action that ran: it answers
        False (too late) and the action is not tried again; one during the grace answers True."""
        rec, answers = Recorder(), []

        def sleep(seconds):
            if seconds == 60.0:  # the confirm wait after the end action
                answers.append(tx.cancel("the user"))
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec,
                         sleep=sleep, confirm_after_s=60.0, alive=lambda: True)
        with structlog.testing.capture_logs() as events:
            assert tx.run() == "cancelled"
        assert answers == [False] and len(rec.calls) == 1 and tx.acted
        assert [e["step"] for e in events][-2:] == ["end_action", "end_cancelled"]
        assert events[-1]["message"] == ("cancelled (the user) after the end action ran (recorded); "
                                         "it is not tried again and the runtime stays while it still runs")
        early = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec,
                            grace_s=5.0, sleep=lambda s: answers.append(early.cancel("the user")))
        assert early.run() == "cancelled" and answers == [False, True] and len(rec.calls) == 1

    def test_a_cli_cancel_during_the_check_after_the_drive_flush_stops_the_end(self, tmp_path):
        """A `session-watchdog cancel` (cancel.json) written while the last check after the
        Drive flush runs keeps the runtime: the end action never runs."""
        rec, looks = Recorder(), []

        def safe_now():
            looks.append(1)
            if len(looks) == 2:  # the look after the final Drive flush
                request_cancel(tx.run_dir)
            return None
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=rec,
                         safe_now=safe_now, extra_paths=["/content/drive/MyDrive/out"],
                         flush=lambda paths, unmount=True: "flushed" if unmount else "stable")
        assert tx.run() == "cancelled"
        assert len(looks) == 2 and rec.calls == [] and not tx.acted

    def test_save_starting_during_grace_waits_and_stays_whole(self, tmp_path):
        """A save that starts during the grace period waits for save.lock; it is written whole after."""
        order: List[str] = []
        ckpt_dir = tmp_path / "ckpt"
        first = write_checkpoint(ckpt_dir, b"A" * 4096, step=1)
        run_dir = tmp_path / "run"
        saver_done = threading.Event()

        def saver():
            with channel.FileLock(run_dir / channel.SAVE_LOCK):  # blocking, as the trainer does
                order.append("save")
                write_checkpoint(ckpt_dir, b"B" * 4096, step=2)
            saver_done.set()

        def sleep(seconds):
            if not any(t.name == "saver" for t in threading.enumerate()) and "started" not in order:
                order.append("started")
                threading.Thread(target=saver, name="saver").start()
            time.sleep(0.05)

        tx = transaction(tmp_path, ckpt=first, action=lambda: order.append("end") or "ok", grace_s=0.3,
                         sleep=sleep)
        tx.run()
        assert saver_done.wait(120)
        assert order == ["started", "end", "save"]
        assert verify_checkpoint(str(ckpt_dir / "ckpt-0000000002.pt"),
                                 hashlib.sha256(b"B" * 4096).hexdigest(), 4096) is None


class _UnassignHandler(http.server.BaseHTTPRequestHandler):
    posts: List[str] = []
    status_code = 200

    def do_POST(self):  # noqa: N802 - http.server's naming
        type(self).posts.append(self.path)
        self.send_response(type(self).status_code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def unassign_server():
    handler = type("Handler", (_UnassignHandler,), {"posts": [], "status_code": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


class TestColab:
    def test_one_post_to_unassign_only_after_the_checkpoint_verified(self, tmp_path, unassign_server, monkeypatch):
        """Through the real daemon: POST /unassign only after end_verify; still alive after it: one retry."""
        server, handler = unassign_server
        addr = f"127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("TBE_RUNTIME_ADDR", addr)
        colab = platforms.Platform("colab", ("test",), end_action="colab-unassign")
        ckpt = write_checkpoint(tmp_path / "ckpt")
        config = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "l.jsonl"), grace="1s",
                              platform="colab")
        outcomes = []
        dog = Watchdog(config, platform=colab, clock=FakeClock(NOW), session_start=NOW,
                       probe=ScriptedProbe([sample(alive=False, trainer_status=done_status(ckpt))]),
                       on_end=outcomes.append, confirm_after_s=0.0)
        with structlog.testing.capture_logs() as events:
            dog.tick()
            dog.wait_end(30)
        assert handler.posts == ["/unassign", "/unassign"]  # default confirm: process still alive -> retried once
        steps = [e["step"] for e in events if e["event"] == "action" and e["step"].startswith("end_")]
        assert steps.index("end_verify") < steps.index("end_action")

    def test_exactly_one_post_when_the_runtime_goes_away(self, tmp_path, unassign_server, monkeypatch):
        """When the runtime is gone after the POST (as on Colab), exactly one POST is made."""
        server, handler = unassign_server
        addr = f"127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("TBE_RUNTIME_ADDR", addr)
        desc, action = end_action_for(platforms.Platform("colab", ("t",)), cfg())
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=action)
        assert tx.run() == "ended" and handler.posts == ["/unassign"] and desc == f"POST http://{addr}/unassign"

    def test_server_errors_are_retried_then_reported(self, tmp_path, unassign_server):
        """HTTP 500 three times: three POSTs, then one clear end_aborted line; no exception escapes."""
        server, handler = unassign_server
        handler.status_code = 500
        addr = f"127.0.0.1:{server.server_address[1]}"
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"),
                         action=lambda: colab_unassign(addr, sleep=lambda s: None, timeout_s=5))
        with structlog.testing.capture_logs() as events:
            assert tx.run() == "aborted"
        assert handler.posts == ["/unassign"] * 3
        assert events[-1]["message"] == f"POST http://{addr}/unassign failed 3 times (HTTP 500)"

    def test_never_on_colab_enterprise(self, monkeypatch):
        """Colab Enterprise has no end action at all."""
        monkeypatch.setenv("TBE_RUNTIME_ADDR", "127.0.0.1:9")
        desc, action = end_action_for(platforms.Platform("colab", ("t",), enterprise=True), cfg())
        assert action is None and "Enterprise" in desc


RECORDER = """#!{python}
import json, sys
with open({out!r}, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
"""


class TestCommandEndActions:
    def _recorder(self, tmp_path) -> tuple:
        out = tmp_path / "argv.jsonl"
        exe = tmp_path / "record-argv"
        exe.write_text(RECORDER.format(python=sys.executable, out=str(out)))
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        return exe, out

    def test_generic_end_command_runs_without_a_shell(self, tmp_path):
        """A configured argv with '; touch' in it is passed literally; no shell ever sees it."""
        exe, out = self._recorder(tmp_path)
        canary = tmp_path / "x"
        config = cfg(platform="generic", end_command=(str(exe), "now", f"; touch {canary}"))
        desc, action = end_action_for(platforms.Platform("generic", ("t",)), config)
        assert transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=action).run() == "ended"
        assert [json.loads(line) for line in out.read_text().splitlines()] == [["now", f"; touch {canary}"]]
        assert not canary.exists()

    def test_autodl_uses_shutdown_and_honours_an_override(self, tmp_path):
        """AutoDL ends with /usr/bin/shutdown; a configured end_command replaces it."""
        autodl = platforms.Platform("autodl", ("t",))
        desc, _ = end_action_for(autodl, cfg(platform="autodl"))
        assert desc == "/usr/bin/shutdown"
        exe, out = self._recorder(tmp_path)
        desc, action = end_action_for(autodl, cfg(platform="autodl", end_command=(str(exe), "-h", "now")))
        action()
        assert json.loads(out.read_text()) == ["-h", "now"]

    def test_generic_without_a_command_has_no_end_action(self, tmp_path):
        """A workstation with no end_command is never ended: the transaction says so."""
        desc, action = end_action_for(platforms.Platform("generic", ("t",)), cfg(platform="generic"))
        tx = transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=action)
        assert action is None and tx.run() == "unavailable"

    def test_failing_command_is_reported(self, tmp_path):
        """An end command that exits non-zero aborts with its exit code in the log."""
        desc, action = end_action_for(platforms.Platform("generic", ("t",)), cfg(end_command=("false",)))
        with structlog.testing.capture_logs() as events:
            assert transaction(tmp_path, ckpt=write_checkpoint(tmp_path / "ckpt"), action=action).run() == "aborted"
        assert "exited 1" in events[-1]["message"]


class TestDrive:
    def test_files_not_on_drive_need_nothing(self):
        """Checkpoints outside /content/drive are not flushed."""
        assert flush_drive(["/tmp/a.pt"]) == "not-on-drive"

    def test_flush_and_unmount_when_importable(self):
        """With google.colab importable, drive.flush_and_unmount() is called."""
        calls = []

        class Drive:
            def flush_and_unmount(self):
                calls.append(1)
        assert flush_drive(["/content/drive/MyDrive/c.pt"], import_drive=Drive) == "flushed" and calls == [1]

    def test_waits_for_stable_sizes_otherwise(self, tmp_path, monkeypatch):
        """Without google.colab, the sizes must stay the same for three checks."""
        import session_watchdog.actions as actions

        monkeypatch.setattr(actions, "DRIVE_ROOT", str(tmp_path))
        f = tmp_path / "c.pt"
        f.write_bytes(b"x")
        sizes = iter([b"xx", b"xxx"])
        sleeps = []

        def sleep(s):
            sleeps.append(s)
            chunk = next(sizes, None)
            if chunk is not None:
                f.write_bytes(chunk)

        def no_colab():
            raise ImportError("no google.colab")
        assert flush_drive([str(f)], import_drive=no_colab, sleep=sleep) == "stable"
        assert len(sleeps) == 5  # two changes, then three equal readings


# ------------------------------------------------------------------------------------------------
# The interlock matrix: random worlds, the real policy and the real transaction; count unsafe ends.

WORLD = st.fixed_dictionaries({
    "alive": st.booleans(), "saving": st.booleans(),
    "state": st.sampled_from(["running", "completed", "failed", "stopped", None]),
    "child_exit": st.sampled_from([None, None, 0, 1]),
    "util": st.sampled_from([0.0, 2.0, 50.0, None]),
    "torn": st.booleans(), "cancel": st.booleans(),
})


def heavy_examples(default: int) -> int:
    return int(os.environ.get("SW_INTERLOCK_N", default))


class TestInterlockMatrix:
    @settings(max_examples=heavy_examples(150), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(worlds=st.lists(WORLD, min_size=2, max_size=6), end_on_failure=st.booleans(), dry_run=st.booleans())
    def test_no_end_action_is_ever_unsafe(self, tmp_path_factory, worlds, end_on_failure, dry_run):
        """For random sequences of trainer states, saves, GPU readings, torn files and cancels,
        every end action taken was safe at the moment it ran."""
        tmp = tmp_path_factory.mktemp("w")
        ckpt = write_checkpoint(tmp / "ckpt")
        run_dir = channel.RunDir(tmp / "run")
        config = cfg(end_on_failure=end_on_failure, dry_run=dry_run, idle_end_after=600.0)
        holders = {"run": channel.FileLock(run_dir.file(channel.RUN_LOCK), shared=True),
                   "save": channel.FileLock(run_dir.file(channel.SAVE_LOCK), shared=True)}
        world = {}
        unsafe = []
        cancelled = []
        state = PolicyState()
        elapsed = 0.0

        def apply(w):
            """Make the world real: hold locks for a live trainer / a save, tear the file."""
            world.clear()
            world.update(w)
            for key, lock in (("alive", holders["run"]), ("saving", holders["save"])):
                if w[key]:
                    world[key] = lock.acquire(blocking=False)  # fails while the watchdog holds it
                else:
                    lock.release()
            with open(ckpt.path, "r+b") as fh:
                fh.write(b"X" if w["torn"] else b"w")
            if w["cancel"]:
                request_cancel(run_dir)
                cancelled.append(True)

        def end_action():
            """The end action checks that the world is safe right now."""
            failed = world["state"] == "failed" or world["child_exit"] not in (None, 0)
            problems = [name for name, bad in [
                ("trainer alive", world["alive"]), ("saving", world["saving"]),
                ("torn checkpoint", world["torn"] and tx.check_checkpoint and tx.status is not None
                 and tx.status.last_checkpoint is not None),
                ("failed", failed and not end_on_failure), ("cancelled", bool(cancelled)),
                ("unknown gpu", tx.reason == "idle_end" and world["util"] is None)] if bad]
            if problems:
                unsafe.append(problems)
            return "ok"

        pending = list(worlds)
        tx = None
        try:
            while pending:
                w = pending.pop(0)
                apply(w)
                elapsed += 700.0
                st_ = None if w["state"] is None else done_status(ckpt, w["state"])
                s = sample(now=NOW + elapsed, elapsed=elapsed, alive=world["alive"], saving=world["saving"],
                           trainer_status=st_, child_exit=w["child_exit"], gpus=[gpu(0, w["util"])])
                state, decisions = decide(config, state, s)
                for d in (d for d in decisions if d.kind == "end"):
                    def next_world(_seconds):
                        if pending:
                            apply(pending.pop(0))

                    def safe_now(reason=d.reason):
                        # the daemon's own last-moment check, fed the world as it is now
                        st_now = None if world["state"] is None else done_status(ckpt, world["state"])
                        return end_blocker(config, reason, sample(
                            now=NOW + elapsed, elapsed=elapsed, alive=False, trainer_status=st_now,
                            child_exit=world["child_exit"], gpus=[gpu(0, world["util"])]))
                    cancelled.clear()  # a cancel counts for the end transaction it falls into
                    tx = EndTransaction(run_dir=run_dir, reason=d.reason, status=s.trainer.status,
                                        grace_s=2.0, dry_run=dry_run, end_action=("check", end_action),
                                        check_checkpoint=d.reason != "idle_end", safe_now=safe_now,
                                        sleep=next_world, monotonic=_ticker(), confirm_after_s=0.0,
                                        alive=lambda: False)
                    tx.run()
        finally:
            for lock in holders.values():
                lock.release()
        assert unsafe == []


def _ticker():
    """A monotonic clock that advances one second per reading."""
    t = [0.0]

    def now():
        t[0] += 1.0
        return t[0]
    return now


class TestDaemonEnd:
    def test_one_end_only_while_the_watchdog_holds_the_locks(self, tmp_path):
        """During and after the end transaction the watchdog's own locks never look like a live
        trainer: no second end, no new-trainer reset."""
        from session_watchdog.probes import SystemProbe

        run = channel.RunDir(tmp_path / "run")
        ckpt = write_checkpoint(tmp_path / "ckpt")
        run.write_status(done_status(ckpt))
        rec = Recorder()
        clock = FakeClock(NOW)
        config = Config.build(run_dir=str(run.path), log_file=str(tmp_path / "l"), grace="1s",
                              platform="generic", end_when_done=True)
        dog = Watchdog(config, platform=platforms.Platform("generic", ("t",)), clock=clock, session_start=NOW,
                       probe=SystemProbe(run, ()), end_action=("recorder", rec), confirm_after_s=0.0)
        with structlog.testing.capture_logs() as events:
            dog.tick()
            assert dog.end_running()
            for _ in range(3):
                clock.advance(5.0)
                dog.tick()
            dog.wait_end(30)
            clock.advance(5.0)
            dog.tick()
        assert [e["kind"] for e in events if e["event"] == "decision"] == ["end"]
        # the process is still alive after the (recorded) end action: one confirm retry, no more
        assert len(rec.calls) == 2


    def test_a_cancel_once_the_end_action_runs_is_answered_too_late(self, tmp_path):
        """Watchdog.cancel_end() during the end action answers False (end_acted: too late, so
        the notebook and the remote reply say so) and the action is not retried."""
        started, go, calls = threading.Event(), threading.Event(), []

        def action() -> str:
            calls.append(1)
            started.set()
            assert go.wait(120)
            return "recorded"
        clock = FakeClock(NOW)
        dog = idle_colab_watchdog(tmp_path, ScriptedProbe([sample(alive=False, gpus=[gpu(0, 0.0)])]),
                                  clock, action=action)
        assert tick_minutes(dog, clock, range(0, 11)) == [10]
        try:
            assert started.wait(120)
            assert dog.cancel_end() is False and dog.end_acted()
        finally:
            go.set()
        assert dog.wait_end(120) == "cancelled" and calls == [1] and not dog.end_acted()


    def test_wait_end_as_the_end_starts_waits_for_it(self, tmp_path, monkeypatch):
        """wait_end() called while the end's thread is being started (from another thread, as a
        notebook's wait does) waits for that end and returns its outcome, never raising that the
        thread is not started yet."""
        import session_watchdog.daemon as daemon_module

        starting, may_start = threading.Event(), threading.Event()

        class SlowToStart(threading.Thread):
            def start(self) -> None:
                if self.name == "session-watchdog-end":
                    starting.set()
                    assert may_start.wait(120)
                super().start()

        monkeypatch.setattr(daemon_module.threading, "Thread", SlowToStart)
        clock = FakeClock(NOW)
        dog = idle_colab_watchdog(tmp_path, ScriptedProbe([sample(alive=False, gpus=[gpu(0, 0.0)])]),
                                  clock)
        ticking = threading.Thread(target=tick_minutes, args=(dog, clock, range(0, 11)))
        ticking.start()
        outcome: List[object] = []
        try:
            assert starting.wait(120)
            waiter = threading.Thread(target=lambda: outcome.append(_outcome_or_error(dog)))
            waiter.start()
            waiter.join(0.5)  # it must be waiting for the start, not done
            assert outcome == []
        finally:
            may_start.set()
            ticking.join(120)
        waiter.join(120)
        assert outcome == ["ended"]


def _outcome_or_error(dog: Watchdog) -> object:
    try:
        return dog.wait_end(120)
    except RuntimeError as err:
        return err


class TestEndReviewRegressions:
    def test_a_stale_completed_status_never_ends_while_the_wrapped_command_runs(self, tmp_path):
        """A completed trainer.json from an earlier run in a shared run dir: while the new wrapped
        command runs, and after it fails, nothing is ended."""
        import subprocess
        run = channel.RunDir(tmp_path / "run")
        ckpt = write_checkpoint(tmp_path / "ckpt")
        run.write_status(channel.TrainerStatus(pid=1, start_time=1.0, state="completed", step=500, epoch=3,
                                               step_time_s=0.1, acked_seq=0, last_checkpoint=ckpt,
                                               heartbeat=time.time() - 3600))
        proc = subprocess.run(
            [sys.executable, "-m", "session_watchdog", "run", "--platform", "generic", "--end-when-done",
             "--dry-run", "--grace", "0.5s", "--interval", "0.3s", "--end-command", "/bin/true",
             "--run-dir", str(run.path), "--log-file", str(tmp_path / "log.jsonl"),
             "--", sys.executable, "-c", "import time; time.sleep(2); raise SystemExit(1)"],
            capture_output=True, text=True, timeout=180)
        evs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert proc.returncode == 1
        assert [e for e in evs if e["event"] == "decision" and e["kind"] == "end"] == []

    def test_state_of_another_session_is_not_reused(self, tmp_path):
        """state.json written in another session (another start) is replaced by a fresh state."""
        run = channel.RunDir(tmp_path / "run")
        channel.write_json(run.file(channel.STATE_FILE), {"v": 1, "session_start": NOW - 86400.0,
                                                          "policy": PolicyState(seq=7, done=frozenset({"session_warn_3600"})).to_json()})
        dog = Watchdog(Config.build(run_dir=str(run.path), log_file=str(tmp_path / "l")),
                       platform=platforms.Platform("generic", ("t",)), clock=FakeClock(NOW), session_start=NOW,
                       probe=ScriptedProbe([sample()]))
        # fresh, with a request-id prefix of its own (a new session's requests are its own)
        assert dog.state == PolicyState(rid_prefix=dog.state.rid_prefix) and len(dog.state.rid_prefix) == 16

    def test_drive_is_not_unmounted_before_a_cancelled_grace(self, tmp_path, monkeypatch):
        """A cancel during the grace period leaves Drive mounted (the user goes on training)."""
        import session_watchdog.actions as actions

        monkeypatch.setattr(actions, "DRIVE_ROOT", str(tmp_path / "drive"))
        calls = []

        class Drive:
            def flush_and_unmount(self):
                calls.append("unmount")

        ckpt = write_checkpoint(tmp_path / "drive" / "ckpt")

        def flush(paths, unmount=True):
            return actions.flush_drive(paths, import_drive=Drive, sleep=lambda s: None, unmount=unmount)

        tx = transaction(tmp_path, ckpt=ckpt, action=Recorder(), grace_s=5.0, flush=flush,
                         sleep=lambda s: tx.cancel())
        assert tx.run() == "cancelled" and calls == []
        tx2 = transaction(tmp_path, ckpt=ckpt, action=Recorder(), flush=flush)
        with structlog.testing.capture_logs() as events:
            assert tx2.run() == "ended"
        assert calls == ["unmount"]
        assert [e["step"] for e in events][-2:] == ["end_flush", "end_action"]

    def test_a_cancel_during_the_last_check_or_the_drive_flush_still_counts(
            self, tmp_path, monkeypatch):
        """A cancel that arrives while the last check runs stops the end before Drive is touched;
        one that arrives while Drive flushes stops it before the end action and says how to get
        Drive back."""
        import session_watchdog.actions as actions

        monkeypatch.setattr(actions, "DRIVE_ROOT", str(tmp_path / "drive"))
        ckpt = write_checkpoint(tmp_path / "drive" / "ckpt")
        unmounted, rec = [], Recorder()

        def cancel_then_ok():
            tx.cancel("a stop of the watchdog")
            return None
        tx = transaction(tmp_path, ckpt=ckpt, action=rec, grace_s=0.0, safe_now=cancel_then_ok,
                         flush=lambda paths, unmount=True: unmounted.append(unmount) or "flushed")
        assert tx.run() == "cancelled" and rec.calls == []
        assert unmounted == [False]  # the upload wait of step 3 only, never the unmount
        unmounted.clear()

        def flush_while_cancelled(paths, unmount=True):
            unmounted.append(unmount)
            if unmount:  # the final flush, after the last check
                tx2.cancel("a stop of the watchdog")
            return "flushed"
        tx2 = transaction(tmp_path, ckpt=ckpt, action=rec, grace_s=0.0, flush=flush_while_cancelled)
        with structlog.testing.capture_logs() as events:
            assert tx2.run() == "cancelled"
        assert unmounted == [False, True] and rec.calls == []
        assert events[-1]["message"] == (
            "cancelled (a stop of the watchdog) after Drive was flushed and unmounted; the "
            "runtime stays: mount Drive again (drive.mount) before saving to it")

    def test_work_that_started_during_the_drive_flush_stops_the_end(self, tmp_path, monkeypatch):
        """The final Drive flush can take minutes: a cell started meanwhile is seen by one more
        check after it, and the end is aborted with how to get Drive back."""
        import session_watchdog.actions as actions

        monkeypatch.setattr(actions, "DRIVE_ROOT", str(tmp_path / "drive"))
        ckpt = write_checkpoint(tmp_path / "drive" / "ckpt")
        checks, rec = [], Recorder()

        def safe_now():
            checks.append(1)
            return None if len(checks) == 1 else "a watched command or a notebook cell is " \
                "running; not ending the runtime"
        tx = transaction(tmp_path, ckpt=ckpt, action=rec, grace_s=0.0, safe_now=safe_now,
                         flush=lambda paths, unmount=True: "flushed")
        with structlog.testing.capture_logs() as events:
            assert tx.run() == "aborted"
        assert rec.calls == [] and len(checks) == 2
        assert events[-1]["message"] == (
            "a watched command or a notebook cell is running; not ending the runtime; Drive was "
            "flushed and unmounted: mount Drive again (drive.mount) before saving to it")

    def test_a_retry_after_our_own_drive_unmount_trusts_the_flushed_checkpoint(self, tmp_path, monkeypatch):
        """A cell that starts during the final Drive flush aborts the end after the unmount; the
        next try trusts the checkpoint it verified and flushed (it is on Drive, unmounted) and
        ends, while a checkpoint it never flushed still aborts."""
        import shutil

        import session_watchdog.actions as actions

        drive = tmp_path / "drive"
        monkeypatch.setattr(actions, "DRIVE_ROOT", str(drive))
        ckpt = write_checkpoint(drive / "MyDrive" / "ckpt")

        def flush(paths, unmount=True):
            if unmount and drive.exists():  # flush_and_unmount: the files leave the local view
                shutil.move(str(drive), str(tmp_path / "unmounted"))
            return "flushed" if unmount else "stable"
        checks = iter([None, "a watched command or a notebook cell is running; not ending the runtime"])
        first = transaction(tmp_path, ckpt=ckpt, action=Recorder(), flush=flush,
                            safe_now=lambda: next(checks))
        assert first.run() == "aborted" and not drive.exists()
        assert first.flushed == {(ckpt.path, ckpt.checksum)}
        rec = Recorder()
        with structlog.testing.capture_logs() as events:
            assert transaction(tmp_path, ckpt=ckpt, action=rec, flush=flush,
                               drive_flushed=first.flushed).run() == "ended"
        assert len(rec.calls) == 1
        assert [(e["ok"], e["message"]) for e in events if e.get("step") == "end_verify"] == [
            (True, "verified and flushed to Drive by an earlier try, which unmounted Drive")]
        with structlog.testing.capture_logs() as events:
            assert transaction(tmp_path, ckpt=ckpt, action=rec, flush=flush).run() == "aborted"
        assert "cannot be read" in events[-1]["message"] and len(rec.calls) == 1
        # Drive mounted again and the file gone from it (deleted, moved): not trusted any more
        with structlog.testing.capture_logs() as events:
            assert transaction(tmp_path, ckpt=ckpt, action=rec, flush=flush,
                               drive_flushed=first.flushed,
                               drive_mounted=lambda: True).run() == "aborted"
        assert "cannot be read" in events[-1]["message"] and len(rec.calls) == 1

    def test_the_flushed_checkpoints_are_kept_in_the_state_file(self, tmp_path):
        """A restarted watchdog of the session still knows which files it flushed and unmounted."""
        def dog() -> Watchdog:
            return idle_colab_watchdog(tmp_path, ScriptedProbe([sample()]), FakeClock(NOW))
        first = dog()
        first._drive_flushed.add(("/content/drive/MyDrive/ckpt-1.pt", "sha256:ab"))
        first._save_state()
        assert dog()._drive_flushed == {("/content/drive/MyDrive/ckpt-1.pt", "sha256:ab")}

    def test_an_aborted_idle_end_is_tried_again_after_a_new_idle_spell(self, tmp_path):
        """A GPU job during the grace aborts the idle end; a new full idle period ends it later."""
        idle, busy = sample(alive=False, gpus=[gpu(0, 0.0)]), sample(alive=False, gpus=[gpu(0, 90.0)])
        probe = ScriptedProbe([idle])
        clock = FakeClock(NOW)
        rec = Recorder()
        dog = idle_colab_watchdog(tmp_path, probe, clock, rec, grace="1s")
        ends = tick_minutes(dog, clock, range(0, 11))
        assert ends == [10]
        probe.script = [busy]  # a GPU job starts during the grace period
        dog.tick()
        assert dog.wait_end(10) == "aborted" and rec.calls == []
        probe.script = [idle]
        ends += tick_minutes(dog, clock, range(11, 23))
        assert ends == [10, 21]
        assert dog.wait_end(120) == "ended"  # inside the test: no end thread outlives it

    def test_an_end_that_ran_after_an_aborted_try_is_not_decided_again(self, tmp_path):
        """The retry of an aborted end is spent once an end ran: the runtime still idle after it
        (here: a recorded end action) gets no end decision at every later tick."""
        idle, busy = sample(alive=False, gpus=[gpu(0, 0.0)]), sample(alive=False, gpus=[gpu(0, 90.0)])
        probe, clock, rec = ScriptedProbe([idle] * 11 + [busy, idle]), FakeClock(NOW), Recorder()
        dog = idle_colab_watchdog(tmp_path, probe, clock, rec)
        ends = tick_minutes(dog, clock, range(0, 11))
        assert dog.wait_end(120) == "aborted"
        ends += tick_minutes(dog, clock, range(11, 23))
        assert ends == [10, 21] and dog.wait_end(120) == "ended"
        assert tick_minutes(dog, clock, range(23, 60)) == [] and len(rec.calls) == 2

    def test_a_wrapped_command_on_the_cpu_keeps_its_idle_runtime(self, tmp_path):
        """A real command running with every GPU idle for 15 min keeps the runtime; once it has
        exited, the idle end comes 10 min (idle_end_after) later and the end action runs."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 start_new_session=True)
        try:
            clock, rec = FakeClock(NOW), Recorder()
            dog = idle_colab_watchdog(tmp_path, ScriptedProbe([sample(alive=False, gpus=[gpu(0, 0.0)])]),
                                      clock, rec, child_running=lambda: child.poll() is None)
            ends = tick_minutes(dog, clock, range(0, 15))
            assert ends == [] and dog.last_sample.child_running
            child.kill()
            child.wait(60)
            ends += tick_minutes(dog, clock, range(15, 27))
            assert ends == [25]
            # the action, and its one retry: the fake end action leaves this process alive
            assert dog.wait_end(120) == "ended" and len(rec.calls) == 2
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(60)

    def test_a_restarted_daemon_does_not_count_the_gap_as_idle(self, tmp_path):
        """A daemon that stopped after 5 idle minutes and starts again 40 min later (same
        session): nobody watched the runtime meanwhile, so its idle end comes 10 min
        (idle_end_after) after its own first tick, not at once."""
        probe = ScriptedProbe([sample(alive=False, gpus=[gpu(0, 0.0)])])
        clock = FakeClock(NOW)

        def daemon() -> Watchdog:
            return idle_colab_watchdog(tmp_path, probe, clock, dry_run=True)
        first = daemon()
        first.acquire()
        for _ in range(6):
            first.tick()
            clock.advance(60.0)
        first.release()
        assert first.state.gpu_idle_since == 0.0
        clock.advance(2400.0)
        again = daemon()
        again.acquire()
        try:
            assert tick_minutes(again, clock, range(0, 11)) == [10]
            assert again.wait_end(120) == "dry-run"
        finally:
            again.release()

    def test_an_end_aborted_before_a_restart_is_tried_again_by_the_next_daemon(self, tmp_path):
        """An idle end aborted in its last check (a GPU woke up), then a restart of the watchdog
        (its retry was in memory): the next daemon of the session ends the runtime after a new
        full idle period."""
        idle, busy = sample(alive=False, gpus=[gpu(0, 0.0)]), sample(alive=False, gpus=[gpu(0, 90.0)])
        probe, clock, rec = ScriptedProbe([idle] * 11 + [busy]), FakeClock(NOW), Recorder()
        first = idle_colab_watchdog(tmp_path, probe, clock, rec)
        first.acquire()
        assert tick_minutes(first, clock, range(0, 11)) == [10]
        assert first.wait_end(120) == "aborted"
        first.stop()
        assert "end" in channel.read_json(first.run_dir.file(channel.STATE_FILE))["policy"]["done"]
        probe.script = [idle]
        again = idle_colab_watchdog(tmp_path, probe, clock, rec)
        again.acquire()
        try:
            assert tick_minutes(again, clock, range(0, 11)) == [10]
            assert again.wait_end(120) == "ended" and len(rec.calls) == 2  # the action and its retry
        finally:
            again.stop()

    def test_a_runtime_kept_by_the_user_stays_kept_after_a_restart(self, tmp_path):
        """`session-watchdog cancel` keeps the runtime when training completes; a restarted
        watchdog of the session (which removes cancel.json) does not end it either."""
        ckpt = write_checkpoint(tmp_path / "ckpt")
        done = sample(alive=False, gpus=[gpu(0, 0.0)], trainer_status=done_status(ckpt))
        probe, clock, rec = ScriptedProbe([done]), FakeClock(NOW), Recorder()
        first = idle_colab_watchdog(tmp_path, probe, clock, rec)
        first.acquire()
        # what `session-watchdog cancel` writes, at this test's (fake) wall time
        channel.write_json(first.run_dir.file(channel.CANCEL_FILE), {"v": 1, "at": clock.wall()})
        assert tick_minutes(first, clock, range(0, 2)) == [0] and not first.end_running()
        first.stop()
        again = idle_colab_watchdog(tmp_path, probe, clock, rec)
        again.acquire()
        try:
            assert not os.path.exists(again.run_dir.file(channel.CANCEL_FILE))
            assert tick_minutes(again, clock, range(0, 60)) == [] and rec.calls == []
        finally:
            again.stop()

    def _cancelled_completion_end(self, tmp_path, clock: FakeClock, rec: Recorder, *,
                                  keep: bool, outcome: str = "completed") -> Watchdog:
        """A watchdog whose training-complete end (``outcome="failed"``: its end_on_failure end)
        was cancelled in its grace period: by the remote `cancel` (cancel_end), or kept by
        `session-watchdog cancel` (keep)."""
        ckpt = write_checkpoint(tmp_path / "ckpt")
        training = sample(alive=True, gpus=[gpu(0, 90.0)], trainer_status=done_status(ckpt, "running"))
        done = sample(alive=False, gpus=[gpu(0, 0.0)], trainer_status=done_status(ckpt, outcome))
        dog = idle_colab_watchdog(tmp_path, ScriptedProbe([training, done]), clock, rec, grace="10m")
        dog.config = dataclasses.replace(dog.config, end_on_failure=True)
        dog.acquire()
        dog.tick()  # this session's trainer (its trainer.json is never taken for an earlier run's)
        dog.tick()
        assert [d.reason for d in dog.last_decisions if d.kind == "end"] == [
            "training_complete" if outcome == "completed" else "training_failed"]
        if keep:  # what `session-watchdog cancel` writes, at this test's (fake) wall time
            channel.write_json(dog.run_dir.file(channel.CANCEL_FILE), {"v": 1, "at": clock.wall()})
        else:
            assert dog.cancel_end("the user") is True
        assert dog.wait_end(120) == "cancelled" and rec.calls == []
        dog.config = dataclasses.replace(dog.config, grace=0.001)
        return dog

    def test_after_a_remote_cancel_of_the_training_end_a_forgotten_runtime_is_still_ended(self, tmp_path):
        """The remote `cancel` of a training-complete end cancels that end only: the runtime left
        unused afterwards is released by the idle end after idle_end_after (10 min)."""
        clock, rec = FakeClock(NOW), Recorder()
        dog = self._cancelled_completion_end(tmp_path, clock, rec, keep=False)
        try:
            assert tick_minutes(dog, clock, range(0, 11)) == [10] and dog.end.reason == "idle_end"
            assert dog.wait_end(120) == "ended" and len(rec.calls) == 2  # the action and its retry
        finally:
            dog.stop()

    def test_after_a_remote_cancel_of_a_failed_runs_end_a_forgotten_runtime_is_still_ended(
            self, tmp_path):
        """With end_on_failure, the remote `cancel` of a failed run's end cancels that end only,
        as after a completed run: the runtime left unused is released by the idle end."""
        clock, rec = FakeClock(NOW), Recorder()
        dog = self._cancelled_completion_end(tmp_path, clock, rec, keep=False, outcome="failed")
        try:
            assert tick_minutes(dog, clock, range(0, 11)) == [10] and dog.end.reason == "idle_end"
            assert dog.wait_end(120) == "ended"
        finally:
            dog.stop()

    def test_a_remote_cancel_of_the_training_end_holds_across_a_restart(self, tmp_path):
        """A restarted watchdog does not bring back the training end that was cancelled; only the
        idle end, a full idle period after its start."""
        clock, rec = FakeClock(NOW), Recorder()
        first = self._cancelled_completion_end(tmp_path, clock, rec, keep=False)
        assert tick_minutes(first, clock, range(0, 5)) == []
        first.stop()
        again = idle_colab_watchdog(tmp_path, first.probe, clock, rec)
        again.acquire()
        try:
            assert tick_minutes(again, clock, range(0, 11)) == [10] and again.end.reason == "idle_end"
            assert again.wait_end(120) == "ended"
        finally:
            again.stop()

    @pytest.mark.parametrize("how", ["cancel.json", "keep_runtime"])
    def test_a_keep_is_undone_by_a_new_trainer_whose_completion_ends_the_runtime(self, tmp_path, how):
        """A keep (`session-watchdog cancel`, or the notebook's cancel() / the remote keep) holds
        for the run it was given in: a new trainer that then completes ends the runtime."""
        clock, rec = FakeClock(NOW), Recorder()
        dog = self._cancelled_completion_end(tmp_path, clock, rec, keep=how == "cancel.json")
        if how == "keep_runtime":
            dog.keep_runtime("remote keep")
        clock.advance(60.0)
        ckpt = write_checkpoint(tmp_path / "ckpt2")
        second = dataclasses.replace(done_status(ckpt, "running"), pid=5555, start_time=NOW + 30)
        running = sample(alive=True, gpus=[gpu(0, 90.0)], trainer_status=second)
        completed = sample(alive=False, gpus=[gpu(0, 0.0)],
                           trainer_status=dataclasses.replace(second, state="completed"))
        dog.probe.script, dog.probe.calls = [running, completed], 0
        try:
            assert dog.kept_by() is not None
            assert tick_minutes(dog, clock, range(0, 3)) == [1]
            assert dog.kept_by() is None and dog.end.reason == "training_complete"
            assert dog.wait_end(120) == "ended" and len(rec.calls) == 2
        finally:
            dog.stop()

    def test_a_runtime_kept_in_the_grace_is_never_ended_by_the_idle_end(self, tmp_path):
        """`session-watchdog cancel` (or the notebook's cancel()) in the grace keeps the runtime:
        no idle end comes later, however long every GPU idles."""
        clock, rec = FakeClock(NOW), Recorder()
        dog = self._cancelled_completion_end(tmp_path, clock, rec, keep=True)
        try:
            assert tick_minutes(dog, clock, range(0, 120)) == [] and rec.calls == []
        finally:
            dog.stop()

    def test_keep_from_the_phone_keeps_the_runtime_from_every_later_end(self, tmp_path):
        """The remote `keep` in the grace of a training end cancels it, and no idle end comes
        later, as with `session-watchdog cancel` on the machine."""
        from session_watchdog.notify.remote import Command, Remote, parse_command

        clock, rec = FakeClock(NOW), Recorder()
        ckpt = write_checkpoint(tmp_path / "ckpt")
        done = sample(alive=False, gpus=[gpu(0, 0.0)], trainer_status=done_status(ckpt))
        dog = idle_colab_watchdog(tmp_path, ScriptedProbe([done]), clock, rec, grace="10m")
        dog.acquire()
        try:
            assert tick_minutes(dog, clock, range(0, 1)) == [0] and dog.end_running()
            assert parse_command("tok keep", "tok") == Command("keep")
            remote = Remote(dog, source=None, token="tok", poll_every_s=60.0, started=NOW)
            assert remote.execute(Command("keep")) == (
                "kept: the pending end is cancelled and this runtime is not ended later")
            assert dog.wait_end(120) == "cancelled"
            dog.config = dataclasses.replace(dog.config, grace=0.001)
            assert tick_minutes(dog, clock, range(1, 120)) == [] and rec.calls == []
            assert channel.read_json(dog.run_dir.file(channel.CANCEL_FILE))["v"] == 1  # `status` shows it
        finally:
            dog.stop()

    def test_a_command_launched_during_the_grace_aborts_the_idle_end(self, tmp_path):
        """A command that starts after the idle end was decided (a notebook launch in the grace
        period) is seen by the last check: the end is aborted and no action runs."""
        probe = ScriptedProbe([sample(alive=False, gpus=[gpu(0, 0.0)])])
        clock = FakeClock(NOW)
        rec = Recorder()
        asked: List[int] = []

        def running() -> bool:  # not running for the 11 ticks, running from the last check on
            asked.append(1)
            return len(asked) > 11
        dog = idle_colab_watchdog(tmp_path, probe, clock, rec, child_running=running)
        assert tick_minutes(dog, clock, range(0, 11)) == [10]
        assert dog.wait_end(120) == "aborted" and rec.calls == []

    @pytest.mark.parametrize("cell_ago, outcome", [(None, "ended"), (5.0, "aborted")])
    def test_a_cell_that_ran_during_the_grace_aborts_the_idle_end(self, tmp_path, cell_ago,
                                                                   outcome):
        """A notebook cell that started and finished in the grace period (never seen running)
        is seen by the last check: the idle end is aborted; without it the end goes ahead."""
        class GraceProbe:
            """Idle GPUs, no cell since the session began; the 12th reading (the end's last
            check) comes 120 s after the decision (the fake clock stands still while the end
            thread waits)."""

            calls = 0

            def sample(self, times):
                self.calls += 1
                grace = 120.0 if self.calls > 11 else 0.0
                elapsed = times.elapsed_s + grace
                idle = elapsed + 30.0 if cell_ago is None or not grace else cell_ago
                return dataclasses.replace(
                    sample(alive=False, gpus=[gpu(0, 0.0)], notebook_idle_s=idle),
                    now=times.now + grace, elapsed_s=elapsed)
        clock, rec = FakeClock(NOW), Recorder()
        dog = idle_colab_watchdog(tmp_path, GraceProbe(), clock, rec)  # type: ignore[arg-type]
        ends = []
        for minute in range(11):  # the end thread's reading comes after the 11th tick's
            dog.tick()
            ends += [minute for d in dog.last_decisions if d.kind == "end"]
            if minute < 10:
                clock.advance(60.0)
        assert ends == [10]
        assert dog.wait_end(120) == outcome and bool(rec.calls) == (outcome == "ended")

    def test_an_aborted_end_on_a_full_disk_is_still_reported(self, tmp_path, monkeypatch):
        """The idle end aborts (a GPU woke up in the grace period) while state.json cannot be
        written: the outcome still reaches on_end (the caller that waits for it), and the end is
        armed again for later."""
        idle, busy = sample(alive=False, gpus=[gpu(0, 0.0)]), sample(alive=False, gpus=[gpu(0, 90.0)])
        probe = ScriptedProbe([idle] * 11 + [busy])
        clock = FakeClock(NOW)
        rec, outcomes = Recorder(), []
        dog = idle_colab_watchdog(tmp_path, probe, clock, rec, on_end=outcomes.append)
        write = dog.run_dir.write

        def disk_full(name, obj):
            if name == channel.STATE_FILE:
                raise OSError(28, "No space left on device")
            write(name, obj)
        monkeypatch.setattr(dog.run_dir, "write", disk_full)
        for _ in range(11):
            dog.safe_tick()
            clock.advance(60.0)
        assert dog.wait_end(120) == "aborted" and rec.calls == []
        assert outcomes == ["aborted"] and dog._end_retry is not None

    def test_a_failing_log_never_stops_a_tick(self, tmp_path, monkeypatch):
        """A full disk under the log: the request is still written, the loss said once."""
        import io

        from session_watchdog import log as swlog

        console = io.StringIO()
        jsonl = swlog.configure(tmp_path / "log.jsonl", console=console)

        def full(line):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(jsonl, "write", full)
        clock = FakeClock(NOW + 3300.0)
        dog = Watchdog(Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"),
                                    max_session="1h"),
                       platform=platforms.Platform("generic", ("t",)), clock=clock, session_start=NOW,
                       probe=ScriptedProbe([sample(trainer_status=status(heartbeat=NOW + 3300))]))
        dog.safe_tick()
        assert dog.run_dir.read_request().seq == 1
        assert console.getvalue().count("cannot write the log") == 1
