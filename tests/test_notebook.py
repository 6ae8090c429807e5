"""Notebook mode (issue 8): a real IPython shell, real threads, a real trainer Session."""

from __future__ import annotations

import importlib
import io
import json
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from fakes import FakeClock
from fakes import status as fake_status
from integration_helpers import wait_for

import session_watchdog as sw
from session_watchdog import channel, notebook
from session_watchdog.config import ConfigError
from session_watchdog.daemon import DaemonBusyError

POLL = 0.05  # trainer poll interval and wait() poll, seconds
WATCHDOG_THREADS = ("session-watchdog", "APScheduler")
PROBE_THREADS = ("session-watchdog-gpu", "session-watchdog-disk")  # SystemProbe's workers


def watchdog_threads() -> List[str]:
    return sorted(t.name for t in threading.enumerate()
                  if t.name in WATCHDOG_THREADS or t.name.startswith(PROBE_THREADS))


@pytest.fixture(autouse=True)
def _no_watchdog_left():
    yield
    notebook.stop()


@pytest.fixture
def cfg(tmp_path) -> Dict[str, Any]:
    """Config keys every test passes: its own run dir and log, a fast tick."""
    return {"run_dir": str(tmp_path / "run"), "log_file": str(tmp_path / "log.jsonl"),
            "interval": "0.1s", "platform": "generic"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=time.time(), mono=1000.0)


def log_events(path: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# A real trainer: a tiny torch model driven by the trainer Session


class TinyTraining:
    """A linear model and SGD; ``step()`` is one optimizer step followed by ``session.step()``."""

    def __init__(self, tmp_path: Path, run_dir: str, **session_kwargs: Any) -> None:
        import torch

        from session_watchdog.trainer import Session

        torch.manual_seed(0)
        torch.set_num_threads(1)
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.x = torch.randn(8, 4)
        options: Dict[str, Any] = {"exit_on_stop": False, "poll_interval": POLL,
                                   "heartbeat_interval": 0.1, "checkpoint_every": None}
        options.update(session_kwargs)
        self.session = Session(tmp_path / "ckpt", model=self.model, optimizer=self.optimizer,
                               run_dir=run_dir, **options)

    def step(self) -> None:
        loss = self.model(self.x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.session.step()
        time.sleep(0.005)


class TrainerThread(threading.Thread):
    """Trains in a background thread (the notebook pattern) until ``done()`` is true, then
    ``complete()``s; ``at_step`` runs after each step (for synchronisation)."""

    def __init__(self, training: TinyTraining, done: Callable[[], bool],
                 at_step: Optional[Callable[[TinyTraining], None]] = None) -> None:
        super().__init__(name="test-trainer", daemon=True)
        self.training = training
        self.done = done
        self.at_step = at_step
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            while not self.done():
                self.training.step()
                if self.at_step is not None:
                    self.at_step(self.training)
            self.training.session.complete()
        except BaseException as err:  # reported by the test
            self.error = err
            self.training.session.close()


# --------------------------------------------------------------------------------------------


# A cell's code: train 5 steps, complete() the Session, then go on working (an evaluation, an
# upload) until two ticks of the watchdog have seen the completed training.
TRAIN_COMPLETE_THEN_WATCH_TWO_TICKS = (
    "for _ in range(5):\n"
    "    training.step()\n"
    "training.session.complete()\n"
    "ticks = set()\n"
    "def completed_seen():\n"
    "    s = handle.watchdog.last_sample\n"
    "    if s is not None and s.trainer.status is not None and "
    "s.trainer.status.state == 'completed':\n"
    "        ticks.add(handle.watchdog.ticks)\n"
    "    return len(ticks) >= 2\n"
    "wait_for(completed_seen)\n")


class TestActivityTracker:
    def test_idle_counts_from_the_end_of_the_last_cell(self, clock):
        """While a cell runs idle is 0.0; after it ends idle grows with the clock."""
        tracker = notebook.ActivityTracker(clock.monotonic)
        tracker.pre_run_cell()
        clock.advance(100)
        assert tracker.idle_s() == 0.0
        tracker.post_run_cell()
        clock.advance(90)
        assert tracker.idle_s() == 90.0

    def test_a_busy_block_counts_as_executing_and_restarts_the_clock(self, clock):
        """Inside busy() (what wait() holds) idle is 0.0; afterwards it counts from its end."""
        tracker = notebook.ActivityTracker(clock.monotonic)
        clock.advance(600)
        assert tracker.idle_s() == 600.0
        with tracker.busy():
            clock.advance(50)
            assert tracker.idle_s() == 0.0
            assert tracker.executing is True
        clock.advance(5)
        assert tracker.idle_s() == 5.0

    def test_a_detached_tracker_reports_none(self, clock):
        """Outside a notebook (no shell, no cell events) the idle time is unknown: None."""
        tracker = notebook.ActivityTracker(clock.monotonic, attached=False)
        clock.advance(600)
        assert tracker.idle_s() is None


class TestStart:
    def test_start_returns_at_once_with_the_scheduler_in_a_named_daemon_thread(self, shell, cfg):
        """start() returns within a second; the scheduler runs in a daemon thread 'session-watchdog'."""
        began = time.monotonic()
        handle = sw.start(**cfg)
        assert time.monotonic() - began < 10  # no tick in this thread (a loaded machine is slow)
        assert handle.running is True
        threads = [t for t in threading.enumerate() if t.name == "session-watchdog"]
        assert len(threads) == 1 and threads[0].daemon is True
        wait_for(lambda: handle.watchdog.ticks >= 2)

    def test_rerunning_the_cell_returns_the_running_watchdog(self, shell, cfg, recwarn):
        """Running the start() cell three times gives one watchdog, one thread, no warning."""
        shell.user_ns["cfg"] = cfg
        for _ in range(3):
            assert shell.run_cell("import session_watchdog as sw\nh = sw.start(**cfg)").success
            shell.user_ns.setdefault("first", shell.user_ns["h"])
        assert shell.user_ns["h"] is shell.user_ns["first"]
        assert [t.name for t in threading.enumerate()].count("session-watchdog") == 1
        assert [w for w in recwarn if issubclass(w.category, notebook.ConfigMismatchWarning)] == []

    def test_a_changed_config_is_reported_by_name_and_not_applied(self, shell, cfg):
        """A second start() with another budget warns naming the key; the running one is kept."""
        handle = sw.start(**cfg)
        with pytest.warns(notebook.ConfigMismatchWarning) as caught:
            again = sw.start(**cfg, max_session="2h")
        assert again is handle
        assert handle.config.max_session == 0.0  # generic: no budget, as first started
        assert str(caught[0].message) == (
            "session_watchdog.start(): a watchdog is already running in this kernel; these "
            "settings differ and were NOT applied: max_session: running None, asked 7200.0. To "
            "apply them, call session_watchdog.stop() and then start(...) again.")

    def test_reloading_the_module_keeps_the_running_watchdog(self, shell, cfg):
        """importlib.reload (what %autoreload does) finds the watchdog again instead of a second."""
        handle = sw.start(**cfg)
        importlib.reload(notebook)
        assert notebook.start(**cfg) is handle
        assert sw.start(**cfg) is handle
        assert [t.name for t in threading.enumerate()].count("session-watchdog") == 1

    def test_a_run_dir_watched_by_another_daemon_is_refused(self, shell, cfg):
        """When another holder has the run dir's daemon.lock, start() raises and starts no thread."""
        other = channel.FileLock(channel.RunDir(Path(cfg["run_dir"])).file(channel.DAEMON_LOCK))
        assert other.acquire(blocking=False)
        try:
            with pytest.raises(DaemonBusyError, match="is already watching"):
                sw.start(**cfg)
            assert watchdog_threads() == []
        finally:
            other.release()

    def test_a_bad_key_raises_config_error_naming_it(self, shell, cfg):
        """A misspelled key is a ConfigError that suggests the right spelling."""
        with pytest.raises(ConfigError) as caught:
            sw.start(**cfg, max_sesion="1h")
        assert str(caught.value) == "unknown config key 'max_sesion'; did you mean max_session?"

    def test_environment_variables_apply_under_keyword_arguments(self, shell, cfg, monkeypatch):
        """SESSION_WATCHDOG_* variables configure start(); a keyword argument wins over them."""
        monkeypatch.setenv("SESSION_WATCHDOG_MAX_SESSION", "3h")
        monkeypatch.setenv("SESSION_WATCHDOG_MARGIN", "10m")
        handle = sw.start(**cfg, margin="7m")
        assert (handle.config.max_session, handle.config.margin) == (10800.0, 420.0)


class TestStop:
    def test_no_thread_outlives_stop(self, shell, cfg):
        """After stop() every thread the watchdog started is gone and daemon.lock is free."""
        before = set(threading.enumerate())
        handle = sw.start(**cfg)
        assert shell.run_cell("x = 1").success
        wait_for(lambda: handle.watchdog.ticks >= 3)
        sw.stop()
        assert set(threading.enumerate()) - before == set()
        assert handle.running is False
        assert channel.lock_held(Path(cfg["run_dir"]) / channel.DAEMON_LOCK) is False

    def test_stop_without_a_watchdog_does_nothing(self, capsys):
        """stop() when none runs returns quietly."""
        sw.stop()
        assert capsys.readouterr() == ("", "")

    def test_start_after_stop_starts_a_fresh_watchdog(self, shell, cfg):
        """A stopped watchdog is not returned again: start() after stop() makes a new one."""
        first = sw.start(**cfg)
        sw.stop()
        second = sw.start(**cfg)
        assert second is not first and second.running is True
        assert watchdog_threads().count("session-watchdog") == 1

    def test_stop_removes_the_cell_hooks(self, shell, cfg):
        """After stop() no watchdog callback is left on the shell's cell events."""
        handle = sw.start(**cfg)
        sw.stop()
        for event, hook in (("pre_run_cell", handle._on_pre_run_cell),
                            ("post_run_cell", handle._on_post_run_cell)):
            assert hook not in shell.events.callbacks[event]


class TestExtension:
    @pytest.fixture
    def env_cfg(self, cfg, monkeypatch):
        for key, value in cfg.items():
            monkeypatch.setenv(f"SESSION_WATCHDOG_{key.upper()}", value)
        return cfg

    def test_load_ext_starts_with_defaults_and_registers_the_magic(self, shell, env_cfg):
        """%load_ext session_watchdog starts a watchdog (env config) and defines %watchdog."""
        assert shell.run_cell("%load_ext session_watchdog").success
        handle = notebook._running_handle()
        assert handle is not None and handle.run_dir == Path(env_cfg["run_dir"])
        assert "watchdog" in shell.magics_manager.magics["line"]

    def test_watchdog_status_returns_the_status_table(self, shell, env_cfg):
        """%watchdog status evaluates to a Status (shown as an HTML table by a notebook)."""
        shell.run_cell("%load_ext session_watchdog")
        result = shell.run_cell("%watchdog status").result
        assert isinstance(result, notebook.Status)
        assert result.value("watchdog").startswith("running in this kernel (generic, every 0.1s, ")

    def test_watchdog_stop_stops_it(self, shell, env_cfg):
        """%watchdog stop stops the watchdog and its threads."""
        shell.run_cell("%load_ext session_watchdog")
        assert shell.run_cell("%watchdog stop").success
        assert notebook._running_handle() is None
        assert watchdog_threads() == []

    def test_load_ext_keeps_a_watchdog_started_with_start(self, shell, cfg, recwarn):
        """After sw.start(max_session=...), %load_ext attaches to it without a config warning."""
        handle = sw.start(**cfg, max_session="2h")
        shell.run_cell("%load_ext session_watchdog")
        assert notebook._running_handle() is handle
        assert [w for w in recwarn if issubclass(w.category, notebook.ConfigMismatchWarning)] == []

    def test_unload_ext_stops_and_removes_the_magic(self, shell, env_cfg):
        """%unload_ext session_watchdog stops the watchdog and removes %watchdog."""
        shell.run_cell("%load_ext session_watchdog")
        shell.run_cell("%unload_ext session_watchdog")
        assert notebook._running_handle() is None
        assert "watchdog" not in shell.magics_manager.magics["line"]


class TestActivityHooks:
    def test_a_running_cell_resets_the_idle_clock(self, shell, cfg, clock):
        """Idle is 0.0 inside a cell and counts from the end of the last cell."""
        handle = sw.start(**cfg, _clock=clock)
        shell.user_ns.update(clock=clock, tracker=handle.tracker)
        shell.run_cell("x = 1")
        clock.advance(600)
        assert handle.tracker.idle_s() == 600.0
        assert shell.run_cell("clock.advance(5)\ninside = tracker.idle_s()").success
        assert shell.user_ns["inside"] == 0.0
        clock.advance(7)
        assert handle.tracker.idle_s() == 7.0

    def test_a_cell_run_from_inside_a_cell_leaves_the_outer_cell_running(
            self, shell, cfg, clock):
        """A nested ``get_ipython().run_cell()`` fires its own pre/post_run_cell: the outer
        cell still counts as running after the inner one ended, and idle counts from the end
        of the outer cell."""
        handle = sw.start(**cfg, _clock=clock)
        shell.user_ns.update(clock=clock, tracker=handle.tracker)
        clock.advance(600)
        result = shell.run_cell("get_ipython().run_cell('y = 1')\n"
                                "clock.advance(5)\n"
                                "after_inner = (tracker.executing, tracker.idle_s(), "
                                "tracker.idle_before_cell_s())\n")
        assert result.success, result.error_in_exec
        assert shell.user_ns["after_inner"] == (True, 0.0, 600.0)
        clock.advance(7)
        assert (handle.tracker.executing, handle.tracker.idle_s()) == (False, 7.0)

    def test_start_in_a_cell_run_from_inside_a_cell_counts_both_cells(self, shell, cfg):
        """start() inside a nested non-silent run_cell(): the outer cell still runs after the
        inner one (with start() in it) ended."""
        shell.user_ns.update(sw=sw, cfg=cfg)
        result = shell.run_cell("get_ipython().run_cell('handle = sw.start(**cfg)')\n"
                                "after_inner = handle.tracker.executing\n")
        assert result.success, result.error_in_exec
        assert shell.user_ns["after_inner"] is True
        assert shell.user_ns["handle"].tracker.executing is False

    def test_the_idle_warning_names_wait_and_prints_in_the_next_cell(
            self, shell, cfg, clock, capsys):
        """31 min without a cell: an idle_reclaim warning, logged, printed once by the next cell."""
        handle = sw.start(**cfg, idle_warn="30m", idle_limit="90m", _clock=clock)
        shell.run_cell("x = 1")
        capsys.readouterr()
        clock.advance(31 * 60)
        wait_for(handle.notices)
        shell.run_cell("y = 2")
        err = capsys.readouterr().err
        assert "warning (idle_reclaim): no cell has run for 31m00s; Colab may reclaim an idle " \
            "runtime - keep a cell running with session_watchdog.wait()" in err
        shell.run_cell("z = 3")
        assert "idle_reclaim" not in capsys.readouterr().err
        decisions = [e for e in log_events(cfg["log_file"]) if e["event"] == "decision"]
        assert [(e["kind"], e["reason"], e["idle_s"]) for e in decisions] == [
            ("warn", "idle_reclaim", 1860.0)]


    def test_the_idle_checkpoint_request_goes_out_at_idle_limit_minus_lead(self, shell, cfg, clock):
        """With a live trainer, idle 84 min asks nothing; 85 min (> 90m - 5m40s lead) asks a checkpoint."""
        run_dir = channel.RunDir(Path(cfg["run_dir"]))
        run_lock = channel.FileLock(run_dir.file(channel.RUN_LOCK), shared=True)
        run_lock.acquire()
        try:
            run_dir.write_status(fake_status(heartbeat=clock.wall(), ckpt_at=clock.wall()))
            handle = sw.start(**cfg, idle_warn="30m", idle_limit="90m", checkpoint_every="off",
                              trainer_stall_after="2h", _clock=clock)
            shell.run_cell("x = 1")
            clock.advance(84 * 60)
            ticks = handle.watchdog.ticks
            wait_for(lambda: handle.watchdog.ticks >= ticks + 2)
            assert run_dir.read_request() is None
            clock.advance(60)
            wait_for(lambda: len(handle.notices()) == 2)
            request = run_dir.read_request()
        finally:
            run_lock.release()
        assert (request.seq, request.action, request.reason) == (1, "checkpoint", "idle_reclaim")
        assert [n.text().split("] ", 1)[1] for n in handle.notices()] == [
            "warning (idle_reclaim): no cell has run for 1h24m; Colab may reclaim an idle "
            "runtime - keep a cell running with session_watchdog.wait()",
            "checkpoint requested (idle_reclaim): idle for 1h25m: checkpoint before an idle "
            "reclaim",
        ]

class TestBackgroundOutput:
    def test_background_output_is_written_by_the_main_thread_only(self, shell, cfg, clock,
                                                                  monkeypatch):
        """A warning raised during a cell is not appended to that (unrelated) cell's output: it
        prints before the next cell, from the main thread (issue 16)."""
        writes: List[str] = []

        class Recording(io.StringIO):
            def write(self, text: str) -> int:
                writes.append(threading.current_thread().name)
                return super().write(text)

        stream = Recording()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(sys, "stdout", stream)
        handle = sw.start(**cfg, max_session="2h", _clock=clock)
        shell.user_ns.update(clock=clock, handle=handle, wait_for=wait_for)
        # The cell moves the session clock 90 min on and waits while the daemon warns.
        assert shell.run_cell("clock.advance(90 * 60)\nwait_for(handle.notices)").success
        text = "warning (session_limit): session ends in about 30m00s (budget 2h00m)"
        assert text not in stream.getvalue()
        assert shell.run_cell("pass").success
        assert stream.getvalue().count(text) == 1
        assert set(writes) == {"MainThread"}

    def test_scheduler_log_records_go_to_the_log_file_not_the_console(self, shell, cfg, caplog,
                                                                       capsys):
        """APScheduler's warnings (a late tick) land in the JSONL log, not on stderr or root."""
        caplog.set_level(logging.INFO)
        sw.start(**cfg)
        late = threading.Thread(target=lambda: logging.getLogger(
            "apscheduler.executors.default").warning('Run time of job "%s" was missed by %s',
                                                     "tick", "0:00:03"))
        late.start()
        late.join()
        sw.stop()
        assert capsys.readouterr().err == ""
        assert [r for r in caplog.records if r.name.startswith("apscheduler")] == []
        events = [e for e in log_events(cfg["log_file"]) if e["event"] == "scheduler_log"]
        assert [(e["logger"], e["level"], e["message"]) for e in events] == [
            ("apscheduler.executors.default", "warning",
             'Run time of job "tick" was missed by 0:00:03')]
        assert logging.getLogger("apscheduler").propagate is True


class TestStatus:
    def test_text_shows_the_session_clock_budget_deadline_and_source(self, shell, cfg, clock,
                                                                     tmp_path):
        """One hour into a 12 h budget: elapsed, budget, time left, the deadline and its sources."""
        handle = sw.start(**cfg, max_session="12h", watch_paths=str(tmp_path), _clock=clock,
                          _session_start=clock.wall() - 3600)
        wait_for(lambda: handle.watchdog.last_sample)
        text = str(sw.status())
        status = sw.status()
        assert status.value("session") == "1h00m elapsed of 12h00m, 11h00m left"
        deadline = time.strftime("%H:%M", time.localtime(clock.wall() + 11 * 3600))
        assert status.value("deadline") == \
            f"~{deadline} (in 11h00m); session start: given; budget: configured"
        assert status.value("notebook") == "executing" or status.value("notebook").startswith("idle")
        assert status.value("GPU").startswith("unavailable") or status.value("GPU") == "none"
        assert status.value("RAM").endswith(")")
        assert re.fullmatch(rf"{tmp_path}: \d+\.\d [KMGT]iB free of \d+\.\d [KMGT]iB",
                            status.value("disk"))
        assert text.splitlines()[0].startswith(
            "watchdog         running in this kernel (generic, every 0.1s, ")

    def test_trainer_step_last_checkpoint_and_pending_request(self, shell, cfg, clock):
        """A live trainer near the deadline: its step, its checkpoint, the request and warnings."""
        run_dir = channel.RunDir(Path(cfg["run_dir"]))
        run_lock = channel.FileLock(run_dir.file(channel.RUN_LOCK), shared=True)
        run_lock.acquire()  # a trainer holds run.lock for its whole life
        try:
            run_dir.write_status(fake_status(heartbeat=clock.wall(), ckpt_at=clock.wall() - 120))
            handle = sw.start(**cfg, max_session="2h", _clock=clock,
                              _session_start=clock.wall() - 7000)
            wait_for(lambda: len(handle.notices()) == 2)  # queued at the end of the tick
            status = sw.status()
        finally:
            run_lock.release()
        assert status.value("trainer") == "running, step 100, epoch 1, 0.5 s/step, alive"
        assert status.value("last checkpoint") == "step 100, 2m00s ago, 2.0 GiB: /ckpt/ckpt-1.pt"
        assert status.value("pending request") == \
            "checkpoint #1 (session_limit), sent 0s ago, not acknowledged yet"
        notices = [value.split("] ", 1)[1] for key, value, _ in status.rows if key == "notice"]
        assert notices == [
            "warning (session_limit): session ends in about 3m20s (budget 2h00m)",
            "checkpoint requested (session_limit): session ends in 3m20s: checkpoint now "
            "(lead 5m40s)",
        ]

    def test_html_is_a_table_with_escaped_values(self, shell, cfg, tmp_path):
        """_repr_html_ is one <table> whose cells are HTML-escaped."""
        cfg["run_dir"] = str(tmp_path / "run&<1>")
        sw.start(**cfg)
        markup = sw.status()._repr_html_()
        assert markup.startswith('<table class="session-watchdog-status"><caption>')
        assert markup.endswith("</table>")
        assert '<tr><th style="text-align:left">run dir</th><td style="text-align:left">' \
            f'{tmp_path}/run&amp;&lt;1&gt;</td></tr>' in markup

    def test_without_a_watchdog_status_reads_the_run_dir(self, tmp_path):
        """status(run_dir=...) with no watchdog says so and still shows the trainer."""
        run_dir = channel.RunDir(tmp_path / "run")
        run_dir.write_status(fake_status(state="completed", step=7, heartbeat=time.time()))
        status = sw.status(run_dir=tmp_path / "run")
        assert status.value("watchdog") == "not running (session_watchdog.start())"
        assert status.value("trainer") == "completed, step 7, epoch 1, 0.5 s/step, no live process"


class TestWait:
    def test_wait_returns_when_a_real_trainer_thread_completes(self, shell, cfg, clock, tmp_path):
        """wait() blocks while a trainer thread trains, counts as a running cell, returns on completion."""
        handle = sw.start(**cfg, _clock=clock)
        shell.run_cell("x = 1")
        clock.advance(600)
        assert handle.tracker.idle_s() == 600.0
        seen: List[Optional[float]] = []

        def at_step(training: TinyTraining) -> None:
            if training.session.global_step == 20:  # train on only once wait() runs
                wait_for(lambda: handle.tracker.executing)
                seen.append(handle.tracker.idle_s())

        trainer = TrainerThread(TinyTraining(tmp_path, cfg["run_dir"]),
                                done=lambda: trainer.training.session.global_step >= 40,
                                at_step=at_step)
        trainer.start()
        out = io.StringIO()
        result = sw.wait(poll=POLL, view="text", file=out)
        trainer.join(120)
        assert trainer.error is None
        assert (result.reason, result.state, result.step) == ("completed", "completed", 40)
        assert seen == [0.0]
        assert handle.tracker.idle_s() == 0.0
        assert out.getvalue().splitlines()[-1] == "session-watchdog: training completed at step 40"

    def test_keyboard_interrupt_returns_without_stopping_training_or_the_watchdog(
            self, shell, cfg, tmp_path, sigint_raises):
        """SIGINT (interrupt the kernel) ends wait() only: the trainer and the watchdog run on."""
        handle = sw.start(**cfg)
        finish = threading.Event()
        trainer = TrainerThread(TinyTraining(tmp_path, cfg["run_dir"]), done=finish.is_set)
        trainer.start()
        main = threading.main_thread().ident
        out = io.StringIO()

        def interrupt() -> None:
            wait_for(lambda: handle.tracker.executing and out.getvalue())  # in wait()'s loop
            signal.pthread_kill(main, signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        result = sw.wait(poll=POLL, view="text", file=out, timeout=300)
        assert result.reason == "interrupted"
        assert trainer.is_alive() and trainer.training.session.state in ("starting", "running")
        assert handle.running is True
        assert out.getvalue().splitlines()[-1] == (
            "session-watchdog: wait() interrupted; training and the watchdog keep running "
            "(session_watchdog.status() shows them)")
        finish.set()
        trainer.join(120)
        assert trainer.error is None and trainer.training.session.state == "completed"

    def test_wait_returns_when_the_session_is_about_to_end(self, shell, cfg, clock):
        """With 60 s left (inside the 130 s stop lead) wait() returns at once."""
        sw.start(**cfg, max_session="2h", _clock=clock, _session_start=clock.wall() - 7140)
        result = sw.wait(poll=POLL, view="text", file=io.StringIO())
        assert (result.reason, result.state) == ("session_ending", None)

    def test_wait_returns_when_the_trainer_goes_away_without_completing(
            self, shell, cfg, tmp_path):
        """A trainer that closes its session mid-run (state still running) ends wait()."""
        handle = sw.start(**cfg)
        training = TinyTraining(tmp_path, cfg["run_dir"], handle_signals=False)
        for _ in range(3):
            training.step()

        out = io.StringIO()
        run_dir = channel.RunDir(Path(cfg["run_dir"]))

        def close_when_waited_on() -> None:
            wait_for(lambda: run_dir.read_status().step == 3)  # the heartbeat has the last step
            wait_for(lambda: handle.tracker.executing and "step 3" in out.getvalue())  # seen alive
            training.session.close()

        threading.Thread(target=close_when_waited_on, daemon=True).start()
        result = sw.wait(poll=POLL, view="text", file=out, timeout=300)
        assert (result.reason, result.step) == ("trainer_gone", 3)

    def test_wait_uses_tqdm_when_available(self, shell, cfg):
        """The auto view is a tqdm progress bar (tqdm is installed here)."""
        sw.start(**cfg)
        out = io.StringIO()
        result = sw.wait(poll=POLL, timeout=0.2, file=out)
        assert result.reason == "timeout"
        text = out.getvalue()
        assert "\rtraining: 0step [00:00, ?step/s, waiting for the trainer | session: no budget]" \
            in text
        assert text.endswith("\nsession-watchdog: stopped waiting (timeout 0.2s)\n")

    def test_wait_without_a_watchdog_raises(self):
        """wait() before start() says what to do."""
        with pytest.raises(RuntimeError, match=r"call session_watchdog.start\(\) first"):
            sw.wait()


class TestTrainingInTheSameKernel:
    def test_a_stop_request_reaches_a_loop_running_in_a_cell(self, shell, cfg, tmp_path, capsys):
        """The loop in a cell, the watchdog in a thread: the stop arrives within the poll interval,
        without signal handlers; the cell ends cleanly and the next cell shows the request."""
        handle = sw.start(**cfg, max_session="2h", _session_start=time.time() - 7200 + 60)
        shell.user_ns.update(TinyTraining=TinyTraining, tmp_path=tmp_path, run_dir=cfg["run_dir"])
        cell = ("training = TinyTraining(tmp_path, run_dir, handle_signals=False)\n"
                "with training.session:\n"
                "    for _ in range(100_000):\n"
                "        training.step()\n")
        assert shell.run_cell(cell).success
        session = shell.user_ns["training"].session
        assert session.stopped is True and session.state == "stopped"
        assert session.global_step < 100_000
        # The request the trainer answered (the daemon may have written a newer one meanwhile:
        # a trainer seen alive before its first status is re-addressed once its pid appears).
        written = {e["seq"]: e for e in log_events(cfg["log_file"])
                   if e["event"] == "action" and e.get("step") == "request_written"}
        answered = written[session.acked_seq]
        assert (answered["action"], answered["reason"]) == ("stop", "session_limit")
        assert 0 <= session.last_checkpoint.at - answered["ts"] < 30  # a poll, not a periodic save
        wait_for(lambda: any(n.kind == "request" for n in handle.notices()))
        shell.run_cell("pass")  # the next cell run
        assert "stop requested (session_limit): session ends in" in capsys.readouterr().err

    def test_a_checkpoint_request_reaches_a_trainer_thread(self, shell, cfg, tmp_path):
        """A trainer thread (which cannot install signal handlers) acknowledges a periodic request."""
        handle = sw.start(**cfg, checkpoint_every="1s")
        run_dir = channel.RunDir(Path(cfg["run_dir"]))
        trainer = TrainerThread(TinyTraining(tmp_path, cfg["run_dir"]),
                                done=lambda: trainer.training.session.acked_seq >= 1)
        trainer.start()
        trainer.join(300)
        assert not trainer.is_alive() and trainer.error is None
        # The first request, as written (a second periodic one may follow it by now).
        written = [e for e in log_events(cfg["log_file"])
                   if e["event"] == "action" and e.get("step") == "request_written"]
        assert (written[0]["seq"], written[0]["action"], written[0]["reason"]) == (
            1, "checkpoint", "periodic")
        assert run_dir.read_status().acked_seq >= 1
        wait_for(lambda: handle.watchdog.state.outstanding is None)


class TestStartInsideACell:
    def test_the_cell_that_starts_the_watchdog_counts_as_running(self, shell, cfg):
        """start() at the top of a cell (the README's pattern): that cell counts as running
        until it finishes (its pre_run_cell came before the hooks), then idle counts from its
        end; a start() outside any cell (an extension loaded at start-up) counts nothing."""
        shell.user_ns.update(sw=sw, cfg=cfg)
        result = shell.run_cell("handle = sw.start(**cfg)\n"
                                "inside = (handle.tracker.executing, handle.tracker.idle_s())\n")
        assert result.success, result.error_in_exec
        handle = shell.user_ns["handle"]
        assert shell.user_ns["inside"] == (True, 0.0)
        assert handle.tracker.executing is False
        sw.stop()
        handle = sw.start(**cfg)
        assert handle.tracker.executing is False
        sw.stop()
        # a silent execution (a front end's start-up commands) reports no end: not counted
        shell.run_cell("handle = sw.start(**cfg)", silent=True)
        assert shell.user_ns["handle"].tracker.executing is False

    def test_start_in_a_file_run_with_percent_run_counts_the_users_cell_as_running(
            self, shell, cfg, tmp_path):
        """``%run train.ipy`` executes the file as silent cells inside the user's cell: start()
        there counts that cell as running until it finishes."""
        script = tmp_path / "train.ipy"
        script.write_text("handle = sw.start(**cfg)\n"
                          "inside = (handle.tracker.executing, handle.tracker.idle_s())\n")
        shell.user_ns.update(sw=sw, cfg=cfg)
        result = shell.run_cell(f"%run {script}\n")
        assert result.success, result.error_in_exec
        assert shell.user_ns["inside"] == (True, 0.0)
        assert shell.user_ns["handle"].tracker.executing is False


class TestEndAfterTraining:
    @pytest.mark.parametrize("via", ["cell", "%run train.ipy"])
    def test_work_after_complete_in_the_cell_that_started_the_watchdog_is_kept(
            self, shell, cfg, tmp_path, via):
        """start(), training, complete() and an upload in one cell, typed in or run from a file
        with ``%run train.ipy`` (silent cells inside the user's cell): no end while it runs."""
        shell.user_ns.update(sw=sw, cfg=cfg, tmp_path=tmp_path, TinyTraining=TinyTraining,
                             wait_for=wait_for)
        code = ("handle = sw.start(**cfg, grace='0.1s', end_when_done=True, "
                "end_command='/bin/false')\n"
                "calls = []\n"
                "handle.watchdog.end_action = ('recorder', lambda: calls.append(1) or 'ok')\n"
                "handle.watchdog.confirm_after_s = 0.0\n"
                "training = TinyTraining(tmp_path, cfg['run_dir'])\n"
                + TRAIN_COMPLETE_THEN_WATCH_TWO_TICKS +
                "busy_end, calls_then = handle.watchdog.end, list(calls)\n")
        if via != "cell":
            (tmp_path / "train.ipy").write_text(code)
            code = f"%run {tmp_path / 'train.ipy'}\n"
        result = shell.run_cell(code)
        assert result.success, result.error_in_exec
        handle = shell.user_ns["handle"]
        assert shell.user_ns["busy_end"] is None and shell.user_ns["calls_then"] == []
        assert wait_for(lambda: handle.watchdog.end is not None)
        assert handle.watchdog.wait_end(120) == "ended" and shell.user_ns["calls"]

    def test_a_cell_that_goes_on_after_the_training_is_not_cut_off(self, shell, cfg, tmp_path):
        """A Session completes in a cell that then goes on working (an evaluation, an upload):
        ticks that see the completed training while the cell runs end nothing; once the cell
        has finished, the end runs."""
        handle = sw.start(**cfg, grace="0.1s", end_when_done=True, end_command="/bin/false")
        calls: List[int] = []
        handle.watchdog.end_action = ("recorder", lambda: calls.append(1) or "ok")
        handle.watchdog.confirm_after_s = 0.0
        shell.user_ns.update(training=TinyTraining(tmp_path, cfg["run_dir"]), handle=handle,
                             wait_for=wait_for)
        result = shell.run_cell(
            TRAIN_COMPLETE_THEN_WATCH_TWO_TICKS +
            "seen, busy_end = handle.watchdog.last_sample, handle.watchdog.end\n")
        assert result.success, result.error_in_exec
        seen = shell.user_ns["seen"]
        assert (seen.trainer.status.state, seen.trainer.alive, seen.notebook_idle_s) == \
            ("completed", False, 0.0)
        assert shell.user_ns["busy_end"] is None and calls == []
        said = [n.text().split("] ", 1)[1] for n in handle.notices() if n.kind == "info"]
        assert said == ["note (training_complete): training completed; the runtime is ended "
                        "once the running notebook cell or command has finished"]
        assert wait_for(lambda: handle.watchdog.end is not None)
        assert handle.watchdog.wait_end(120) == "ended" and calls


class TestCancel:
    def test_cancel_stops_a_pending_end_in_this_kernel(self, cfg, tmp_path):
        """sw.cancel() during the grace period: the end transaction is cancelled, nothing is ended."""
        from fakes import sample as fake_sample

        from session_watchdog.policy import Decision

        handle = sw.start(**cfg, grace="60s", end_when_done=True, end_command="/bin/false")
        calls = []
        handle.watchdog.end_action = ("recorder", lambda: calls.append(1) or "ok")
        s = fake_sample(alive=False, trainer_status=fake_status(state="completed"))
        handle.watchdog._start_end(Decision("end", "training_complete", "done"), s)
        assert wait_for(lambda: any(e.get("step") == "end_grace" for e in log_events(cfg["log_file"])))
        assert sw.cancel() is True
        assert handle.watchdog.wait_end(10) == "cancelled" and calls == []
        assert channel.read_json(tmp_path / "run" / channel.CANCEL_FILE)["v"] == 1

    def test_cancel_without_a_pending_end(self, cfg):
        """With nothing pending, cancel() says so and returns False."""
        sw.start(**cfg)
        assert sw.cancel() is False
