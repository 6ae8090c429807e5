"""The daemon loop, driven by a scripted probe and a fake clock; real processes for signals."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import structlog
from fakes import FakeClock, ScriptedProbe, sample, status

from session_watchdog import channel, platforms
from session_watchdog.actions import signal_trainer
from session_watchdog.config import Config
from session_watchdog.daemon import DaemonBusyError, SessionClock, Watchdog

GENERIC = platforms.Platform("generic", ("test",))
START = 1_800_000_000.0


def make(tmp_path: Path, script, clock=None, **config) -> Watchdog:
    config.setdefault("max_session", "1h")
    cfg = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"), **config)
    return Watchdog(cfg, platform=GENERIC, probe=ScriptedProbe(script), clock=clock or FakeClock(START),
                    session_start=START)


def trainer_sample(acked: int = 0, **kw):
    return sample(trainer_status=status(heartbeat=START + 1e6, acked_seq=acked), **kw)


class TestSessionClock:
    def test_elapsed_follows_the_monotonic_clock_not_wall_jumps(self):
        """A wall-clock jump (NTP, resumed VM) does not move the session clock."""
        clock = FakeClock(wall=START + 100.0, mono=50.0)
        session = SessionClock(START, clock)
        clock._wall += 10_000.0  # wall jumps forward; monotonic does not
        clock._mono += 5.0
        times = session.times()
        assert (times.elapsed_s, times.now) == (105.0, START + 105.0)


class TestCarriedOverSessionClock:
    """Without a platform clock, the session runs from the first watchdog since boot; a later
    run says so at start and --new-session restarts it (issue 11)."""

    def _dog(self, tmp_path, clock, platform=GENERIC, **kw) -> Watchdog:
        cfg = Config.build(run_dir=str(tmp_path / "run"), max_session="30m",
                           log_file=str(tmp_path / "l"))
        return Watchdog(cfg, platform=platform, probe=ScriptedProbe([sample()]), clock=clock, **kw)

    def test_a_later_run_says_the_clock_was_carried_over(self, tmp_path):
        """The second watchdog since boot logs session_clock_carried_over and has a console line
        naming the age, the start time and both ways to restart it."""
        clock = FakeClock(START)
        assert self._dog(tmp_path, clock).session_notice() is None
        clock.advance(1212.0)
        dog = self._dog(tmp_path, clock)
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(START))
        assert dog.session_notice() == (
            f"session clock: started 20m12s ago at {at} (carried over from an earlier run since "
            f"boot; pass --new-session or delete {tmp_path / 'run' / 'session.json'} to restart it)")
        with structlog.testing.capture_logs() as events:
            dog.acquire()
        dog.release()
        carried = [e for e in events if e["event"] == "session_clock_carried_over"]
        assert len(carried) == 1
        assert (carried[0]["session_start"], carried[0]["elapsed_s"]) == (START, 1212.0)

    def test_new_session_restarts_the_clock(self, tmp_path):
        """new_session=True starts the clock now: elapsed 0, nothing to announce, and stored."""
        clock = FakeClock(START)
        self._dog(tmp_path, clock)
        clock.advance(1212.0)
        dog = self._dog(tmp_path, clock, new_session=True)
        assert (dog.session.times().elapsed_s, dog.session_notice()) == (0.0, None)
        assert self._dog(tmp_path, clock).session.start_wall == START + 1212.0

    def test_a_platform_clock_is_not_announced(self, tmp_path):
        """On Colab the session is the runtime's (boot / PID 1): a second watchdog keeps it
        silently."""
        colab = platforms.Platform("colab", ("test",))
        clock = FakeClock(START)
        self._dog(tmp_path, clock, platform=colab)
        clock.advance(60.0)
        dog = self._dog(tmp_path, clock, platform=colab)
        assert dog.session_notice() is None and dog.session_source != platforms.FIRST_START

    def test_run_prints_the_notice_on_the_console(self, tmp_path):
        """A second `run` prints the carried-over line on stderr; `run --new-session` does not."""
        argv = [sys.executable, "-m", "session_watchdog", "run", "--platform", "generic",
                "--interval", "0.2s", "--for", "0.5s", "--run-dir", str(tmp_path / "run"),
                "--log-file", str(tmp_path / "log.jsonl")]
        outputs = []
        for extra in ([], [], ["--new-session"]):
            proc = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            outputs.append(proc.stderr)
        assert "session clock:" not in outputs[0]
        assert "session_clock_carried_over - session clock: started " in outputs[1]
        assert "(carried over from an earlier run since boot; pass --new-session" in outputs[1]
        assert "session clock:" not in outputs[2]


class TestNoTrainerWrapped:
    """`run -- python train.py` with a script that never builds a Session is said early; a script
    that does is not (issue 11). Real child processes; the session clock is faked."""

    @pytest.fixture
    def children(self):
        """Every wrapped child a test starts; its process group is killed afterwards, pass or fail."""
        started = []
        yield started
        for child in started:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.proc.wait(timeout=60)

    def _watch(self, tmp_path, children, code):
        from session_watchdog import wrap

        run = tmp_path / "run"
        cfg = Config.build(run_dir=str(run), max_session="1h", log_file=str(tmp_path / "l"),
                           watch_paths=str(tmp_path))
        channel.ensure_run_dir(run)
        child = wrap.Child([sys.executable, "-c", code, str(tmp_path / "ckpt")], run, kill_after_s=5.0)
        children.append(child)
        clock = FakeClock(START)
        dog = Watchdog(cfg, platform=GENERIC, clock=clock, session_start=START,
                       child_exit=child.exit_status,
                       child_running=lambda: child.exit_status() is None)
        return child, clock, dog

    def test_a_command_without_a_session_is_named_after_two_minutes(self, tmp_path, children):
        """No trainer on the run dir 2 minutes after the command started: one warning."""
        child, clock, dog = self._watch(tmp_path, children, "import time; time.sleep(600)")
        first = dog.tick()
        clock.advance(121.0)
        second = dog.tick()
        clock.advance(60.0)
        third = dog.tick()
        assert [d.reason for d in first + third if d.reason == "no_trainer"] == []
        assert [(d.kind, d.reason) for d in second if d.reason == "no_trainer"] == [("warn", "no_trainer")]

    def test_a_command_with_a_session_is_not_named(self, tmp_path, children):
        """A script that builds a Session (run.lock held) gets no such warning."""
        code = ("import sys, time\n"
                "from session_watchdog.trainer import Session\n"
                "session = Session(sys.argv[1], handle_signals=False, checkpoint_every=None)\n"
                "time.sleep(600)\n")
        child, clock, dog = self._watch(tmp_path, children, code)
        deadline = time.monotonic() + 120.0  # torch's import is slow on a busy machine
        while not channel.lock_held(tmp_path / "run" / channel.RUN_LOCK):
            assert child.exit_status() is None, "the trainer child died"
            assert time.monotonic() < deadline, "the trainer never took run.lock"
            time.sleep(0.05)
        decisions = dog.tick()
        clock.advance(121.0)
        decisions += dog.tick()
        assert [d for d in decisions if d.reason == "no_trainer"] == []


class TestTick:
    def test_a_due_request_is_written_and_logged(self, tmp_path):
        """At deadline - lead the tick writes request.json and logs sample, decision, action."""
        clock = FakeClock(START + 3300.0)
        dog = make(tmp_path, [trainer_sample()], clock)
        with structlog.testing.capture_logs() as events:
            dog.tick()
        request = dog.run_dir.read_request()
        assert (request.seq, request.action, request.reason) == (1, "checkpoint", "session_limit")
        assert [e["event"] for e in events] == ["sample", "decision", "decision", "action"]
        assert events[2]["reason"] == "session_limit" and events[3]["step"] == "request_written"
        assert events[3]["signal"] == "no-handler"  # no SIGUSR1 handler advertised: not signalled

    def test_a_failing_tick_is_logged_and_the_next_one_runs(self, tmp_path):
        """A probe that raises once costs one tick, never the daemon."""
        dog = make(tmp_path, [RuntimeError("probe broke"), trainer_sample()])
        with structlog.testing.capture_logs() as events:
            dog.safe_tick()
            dog.safe_tick()
        failed = [e for e in events if e["event"] == "tick_failed"]
        assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: probe broke"
        assert dog.ticks == 1 and "RuntimeError" in failed[0]["traceback"]

    def test_restart_keeps_the_session_clock_and_does_not_reissue(self, tmp_path):
        """A restarted daemon resumes the persisted session start and its request state."""
        clock = FakeClock(START)
        cfg = Config.build(run_dir=str(tmp_path / "run"), max_session="1h", log_file=str(tmp_path / "l"))
        first = Watchdog(cfg, platform=GENERIC, probe=ScriptedProbe([trainer_sample()]), clock=clock)
        clock.advance(3300.0)
        first.tick()
        assert first.run_dir.read_request().seq == 1
        clock.advance(10.0)
        second = Watchdog(cfg, platform=GENERIC, probe=ScriptedProbe([trainer_sample(acked=1)]), clock=clock)
        assert second.session.times().elapsed_s == 3310.0
        with structlog.testing.capture_logs() as events:
            second.tick()
        decisions = [(e["kind"], e["reason"]) for e in events if e["event"] == "decision"]
        assert decisions == [("ack", "request_acked")]
        assert second.run_dir.read_request().seq == 1

    def test_corrupted_state_is_quarantined(self, tmp_path):
        """An unreadable state.json is moved aside and the daemon starts fresh."""
        run = tmp_path / "run"
        channel.ensure_run_dir(run)
        (run / "state.json").write_text("{not json")
        with structlog.testing.capture_logs() as events:
            dog = make(tmp_path, [trainer_sample()])
        assert dog.state.seq == 0
        assert (run / "state.json.bad").read_text() == "{not json"
        assert events[0]["event"] == "state_quarantined"

    def test_corrupted_trainer_status_does_not_stop_the_daemon(self, tmp_path):
        """A garbage trainer.json is reported in the sample; the tick completes."""
        run = tmp_path / "run"
        channel.ensure_run_dir(run)
        (run / "trainer.json").write_text('{"v": 1, "state": "dancing"}')
        cfg = Config.build(run_dir=str(run), max_session="1h", log_file=str(tmp_path / "l"))
        from session_watchdog.probes import SystemProbe

        dog = Watchdog(cfg, platform=GENERIC, clock=FakeClock(START), session_start=START,
                       probe=SystemProbe(channel.RunDir(run), ()))
        dog.tick()
        assert "not one of" in dog.last_sample.trainer.status_error


class TestStateWrites:
    """state.json is rewritten (two fsyncs) when the policy state changes; the hang detector's
    progress, which changes at every tick while training, is written at most once a minute and
    when the daemon stops (issue 17)."""

    @staticmethod
    def saved(dog: Watchdog) -> dict:
        return json.loads((Path(dog.run_dir.path) / "state.json").read_text())["policy"]

    def progressing(self, tmp_path, clock, ticks: int) -> Watchdog:
        """A daemon whose trainer advances one step per 5 s tick, ``ticks`` times."""
        script = [sample(trainer_status=status(step=100 + i, heartbeat=START + 1e6))
                  for i in range(ticks)]
        dog = make(tmp_path, script, clock, max_session="12h")
        for i in range(ticks):
            if i:
                clock.advance(5.0)
            dog.tick()
        return dog

    def test_progress_alone_is_written_at_most_once_a_minute(self, tmp_path):
        """The first tick writes the state; the next eleven (55 s) change only the progress and
        leave the file as it was; the tick 60 s after the write writes it again."""
        clock = FakeClock(START)
        dog = self.progressing(tmp_path, clock, 12)
        assert (dog.state.progress_step, self.saved(dog)["progress_step"]) == (111, 100)
        clock.advance(5.0)  # 60 s after the first write
        dog.probe.script.append(sample(trainer_status=status(step=112, heartbeat=START + 1e6)))
        dog.tick()
        assert self.saved(dog)["progress_step"] == 112
        assert self.saved(dog)["step_intervals"] == [5.0] * len(dog.state.step_intervals)

    def test_any_other_change_is_written_at_once(self, tmp_path):
        """A request due between two progress writes is in state.json after its own tick."""
        clock = FakeClock(START)
        dog = make(tmp_path, [sample(trainer_status=status(step=100 + i, heartbeat=START + 1e6))
                              for i in range(3)], clock, max_session="1h")
        dog.tick()
        clock.advance(3300.0)  # the session limit's checkpoint falls due (lead 5 min)
        dog.tick()
        assert self.saved(dog)["seq"] == 1 and self.saved(dog)["outstanding"]["seq"] == 1

    def test_progress_that_stopped_changing_is_written_a_minute_after_the_last_write(
            self, tmp_path):
        """Steps 100, 101, 102, then the step stands still (the state no longer changes): the
        progress of step 102 is in state.json by the tick 60 s after the first write."""
        clock = FakeClock(START)
        steps = [100, 101, 102] + [102] * 10
        dog = make(tmp_path, [sample(trainer_status=status(step=n, heartbeat=START + 1e6))
                              for n in steps], clock, max_session="12h")
        for i in range(len(steps)):
            if i:
                clock.advance(5.0)
            dog.tick()
            assert self.saved(dog)["progress_step"] == (102 if i >= 12 else 100), i

    def test_a_write_that_failed_is_tried_again_by_the_next_tick(self, tmp_path, monkeypatch):
        """The session limit's request goes out but its state.json write fails (disk full): the
        next tick, which changes nothing, writes it."""
        clock = FakeClock(START)
        dog = make(tmp_path, [sample(trainer_status=status(step=100, heartbeat=START + 1e6))],
                   clock, max_session="1h")
        dog.tick()
        write, failed = dog.run_dir.write, []

        def disk_full_once(name, obj):
            if name == channel.STATE_FILE and not failed:
                failed.append(name)
                raise OSError(errno.ENOSPC, "No space left on device")
            write(name, obj)

        monkeypatch.setattr(dog.run_dir, "write", disk_full_once)
        clock.advance(3300.0)  # the limit's checkpoint falls due
        dog.safe_tick()
        assert failed and dog.state.seq == 1 and self.saved(dog)["seq"] == 0
        clock.advance(5.0)
        dog.safe_tick()
        assert self.saved(dog)["seq"] == 1 and self.saved(dog)["outstanding"]["seq"] == 1

    def test_a_full_disk_under_the_state_does_not_cost_the_ticks(self, tmp_path, monkeypatch):
        """state.json cannot be written for three ticks (disk full): each tick still publishes
        its sample and hands its decisions on (the notebook shows them), the failure is logged
        once, and the first tick after space comes back writes the state."""
        clock = FakeClock(START)
        dog = make(tmp_path, [sample(trainer_status=status(step=100 + i, heartbeat=START + 1e6))
                              for i in range(5)], clock, max_session="1h")
        handed: list = []
        dog.on_decisions = lambda decisions, s: handed.append([d.reason for d in decisions])
        dog.tick()
        write, full = dog.run_dir.write, [True]

        def disk_full(name, obj):
            if name == channel.STATE_FILE and full[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            write(name, obj)

        monkeypatch.setattr(dog.run_dir, "write", disk_full)
        clock.advance(3300.0)  # the session limit's checkpoint falls due: the state changes
        with structlog.testing.capture_logs() as events:
            for _ in range(3):
                dog.safe_tick()
                clock.advance(5.0)
        assert [e["event"] for e in events].count("tick_failed") == 0
        assert [e["event"] for e in events].count("state_not_saved") == 1
        assert dog.ticks == 4 and dog.last_sample.trainer.status.step == 103
        assert "session_limit" in handed[1] and dog.state.seq == 1
        assert self.saved(dog)["seq"] == 0
        full[0] = False
        dog.safe_tick()
        assert self.saved(dog)["seq"] == 1 and self.saved(dog)["outstanding"]["seq"] == 1

    def test_no_state_write_after_release(self, tmp_path):
        """After release() (the next daemon may own state.json now), a late write - an end
        thread that outlived its daemon - leaves the file as release() left it; acquiring the
        run dir again makes the state this daemon's again."""
        clock = FakeClock(START)
        dog = make(tmp_path, [sample(trainer_status=status(step=100, heartbeat=START + 1e6))],
                   clock, max_session="1h")
        dog.acquire()
        dog.tick()
        dog.release()
        left = self.saved(dog)
        dog.state = dataclasses.replace(dog.state, seq=7)
        dog._save_state_or_say()
        assert self.saved(dog) == left
        dog.acquire()
        dog._save_state_or_say()
        assert self.saved(dog)["seq"] == 7
        dog.release()

    def test_stopping_writes_the_progress_not_yet_written(self, tmp_path):
        """release() writes the state the last ticks changed; a daemon that starts from it does
        not learn from the interval that spans the restart."""
        clock = FakeClock(START)
        dog = self.progressing(tmp_path, clock, 4)
        dog.acquire()
        assert self.saved(dog)["progress_step"] == 100
        dog.release()
        assert self.saved(dog)["progress_step"] == 103
        assert self.saved(dog)["progress_skip"] is False
        again = make(tmp_path, [sample(trainer_status=status(step=150, heartbeat=START + 1e6))],
                     clock, max_session="12h")
        assert (again.state.progress_step, again.state.progress_skip) == (103, True)
        clock.advance(40.0)
        again.tick()
        assert again.state.step_intervals == dog.state.step_intervals  # the gap was not learned


class TestCommandEndsDuringASample:
    def test_a_stop_whose_exit_lands_mid_sample_is_not_a_failure(self, tmp_path):
        """The wrapped command writes its final ``stopped`` status and exits 75 while a tick's
        sample is taken (the sample holds the status from before the stop beside exit 75): that
        tick judges no outcome, the next says training_stopped, and no failure is recorded."""
        ended: list = []

        class EndsDuringTheFirstSample(ScriptedProbe):
            def sample(self, times):
                reading = super().sample(times)
                ended.append(True)  # the command is gone by the time the sample is returned
                return reading

        before = status(state="running", step=197, heartbeat=START + 1e6)
        final = status(state="stopped", step=198, heartbeat=START + 1e6, ckpt_at=START)
        probe = EndsDuringTheFirstSample([sample(trainer_status=before, alive=False, child_exit=75),
                                          sample(trainer_status=final, alive=False, child_exit=75)])
        cfg = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"),
                           max_session="1h")
        dog = Watchdog(cfg, platform=GENERIC, probe=probe, clock=FakeClock(START),
                       session_start=START, child_running=lambda: not ended)
        with structlog.testing.capture_logs() as events:
            dog.tick()
            dog.tick()
        outcomes = [e["reason"] for e in events
                    if e["event"] == "decision" and e["reason"].startswith("training_")]
        assert outcomes == ["training_stopped"]
        assert dog.state.failed is False


class TestStartupSweep:
    def test_temps_of_a_writer_killed_mid_write_are_swept_when_the_daemon_starts(self, tmp_path):
        """A .sw-tmp left by a dead writer in the run dir is removed when the daemon takes it."""
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        run = channel.RunDir(tmp_path / "run")
        litter = run.path / f".request.json.{dead.pid}.0badc0de.sw-tmp"
        litter.write_text("{half")
        dog = make(tmp_path, [sample()])
        dog.acquire()
        dog.release()
        assert not litter.exists()


class TestOneDaemonPerRunDir:
    def test_second_daemon_is_refused(self, tmp_path):
        """Two watchdogs on one run dir: the second gets a clear DaemonBusyError."""
        first = make(tmp_path, [sample()])
        first.acquire()
        second = make(tmp_path, [sample()])
        with pytest.raises(DaemonBusyError, match=f"pid {os.getpid()}.*already watching"):
            second.acquire()
        first.release()
        second.acquire()
        second.release()

    def test_a_lock_probe_at_start_up_is_not_another_daemon(self, tmp_path):
        """A status/trainer probe holding daemon.lock for a moment while a watchdog starts does not
        make the start fail with "already watching" (the start waits out the probe)."""
        from session_watchdog import channel

        watchdog = make(tmp_path, [sample()])
        probe = channel.FileLock(watchdog.run_dir.file(channel.DAEMON_LOCK))
        assert probe.acquire(blocking=False)
        releaser = threading.Timer(0.2, probe.release)
        releaser.start()
        try:
            watchdog.acquire()  # would raise DaemonBusyError without the wait
            assert watchdog._lock.held
        finally:
            releaser.join()
            watchdog.release()


class TestScheduler:
    def test_background_start_ticks_and_stop_leaves_no_thread(self, tmp_path):
        """start() ticks in a background thread; stop() leaves no scheduler thread behind."""
        before = set(threading.enumerate())
        dog = make(tmp_path, [sample()], clock=None, interval="0.2s")
        dog.start()
        deadline = time.monotonic() + 120
        while dog.ticks < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        dog.stop()
        assert dog.ticks >= 3
        assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []

    def test_sigterm_stops_the_cli_daemon_cleanly(self, tmp_path):
        """A real `session-watchdog run` exits 0 on SIGTERM and logs daemon_stopped."""
        log_file = tmp_path / "log.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_watchdog", "run", "--interval", "0.2s",
             "--run-dir", str(tmp_path / "run"), "--log-file", str(log_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120  # start-up on a loaded machine
        while time.monotonic() < deadline:
            if log_file.exists() and log_file.read_text().count('"event":"sample"') >= 2:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
        assert proc.returncode == 0, err
        assert events[0] == "daemon_started" and events[-1] == "daemon_stopped"
        assert "signal_received" in events
        assert not channel.lock_held(tmp_path / "run" / channel.DAEMON_LOCK)

    def test_a_run_that_ends_before_its_caller_looks_at_the_scheduler_ends_cleanly(self, tmp_path):
        """run(run_for=...) whose scheduler has already stopped, and dropped its thread, by the
        time start() returns (a busy machine gave the scheduler's threads the CPU first)
        returns 0 instead of failing on the missing thread."""
        dog = make(tmp_path, [trainer_sample()])
        make_scheduler = dog._make_scheduler

        def scheduler_that_outruns_its_caller():
            scheduler = make_scheduler()
            start = scheduler.start

            def start_then_lose_the_cpu(*args, **kwargs):
                start(*args, **kwargs)
                deadline = time.monotonic() + 120
                while getattr(scheduler, "_thread", None) is not None:  # stopped and joined
                    assert time.monotonic() < deadline, "the --for deadline never stopped it"
                    time.sleep(0.01)

            scheduler.start = start_then_lose_the_cpu
            return scheduler

        dog._make_scheduler = scheduler_that_outruns_its_caller
        assert dog.run(run_for=0.001, handle_signals=False) == 0
        assert dog.ticks >= 1 and not dog._lock.held

    def test_run_for_stops_by_itself(self, tmp_path):
        """`run --for 1s` ends on its own with exit code 0."""
        proc = subprocess.run(
            [sys.executable, "-m", "session_watchdog", "run", "--interval", "0.2s", "--for", "1s",
             "--run-dir", str(tmp_path / "run"), "--log-file", str(tmp_path / "log.jsonl")],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


SIGUSR1_CHILD = textwrap.dedent("""
    import fcntl, os, signal, sys, time
    lock = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)  # run.lock: the trainer's proof
    fcntl.flock(lock, fcntl.LOCK_SH)
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    print("ready", flush=True)
    deadline = time.time() + 120
    while not got and time.time() < deadline:
        time.sleep(0.01)
    print("got" if got else "none", flush=True)
""")


class TestSignalTrainer:
    @pytest.fixture(autouse=True)
    def _run_dir(self, tmp_path):
        self.rd = channel.RunDir(tmp_path / "run")

    def _child(self):
        proc = subprocess.Popen([sys.executable, "-c", SIGUSR1_CHILD, str(self.rd.file(channel.RUN_LOCK))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        import psutil

        return proc, psutil.Process(proc.pid).create_time()

    def test_signal_reaches_the_trainer_that_wrote_the_status(self):
        """pid + create time match and a handler is advertised: SIGUSR1 is sent."""
        proc, created = self._child()
        st = status(pid=proc.pid, start_time=created, extra={"sigusr1": True})
        assert signal_trainer(st, self.rd) == "sent"
        assert proc.stdout.readline().strip() == "got"
        proc.wait(timeout=120)

    def test_reused_pid_is_not_signalled(self):
        """A pid whose create time differs from the status is another process: no signal."""
        proc, created = self._child()
        st = status(pid=proc.pid, start_time=created - 100.0, extra={"sigusr1": True})
        assert signal_trainer(st, self.rd) == "reused"
        proc.kill()
        proc.wait()

    def test_no_handler_no_signal(self):
        """A trainer that did not advertise a SIGUSR1 handler is never signalled (it would die)."""
        proc, created = self._child()
        assert signal_trainer(status(pid=proc.pid, start_time=created), self.rd) == "no-handler"
        proc.kill()
        proc.wait()

    def test_gone_process(self):
        """A trainer that exited is reported gone."""
        proc, created = self._child()
        proc.kill()
        proc.wait()
        assert signal_trainer(status(pid=proc.pid, start_time=created, extra={"sigusr1": True}), self.rd) == "gone"
