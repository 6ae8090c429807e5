"""The watchdog in this kernel: ``start()``, the :class:`WatchdogHandle` it returns, ``stop()``
and ``cancel()``.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

from session_watchdog import channel, log, platforms
from session_watchdog.background import Launched
from session_watchdog.config import Config, ConfigError, load_config
from session_watchdog.log import get_logger
from session_watchdog.notebook.cells import ActivityTracker, Notice, _Notices
from session_watchdog.notebook.kernel import _current_shell, _running_handle, _state
from session_watchdog.notebook.status import Status, _build_status
from session_watchdog.notebook.wait import WaitResult, _wait

_log = get_logger()


THREAD_NAME = "session-watchdog"  # the scheduler thread (APScheduler names it "APScheduler")
# probes.SystemProbe's bounded-call workers (one per kind of call that can hang). Not the
# trainer's threads ("session-watchdog-poller", "-ack"), which stop() must never wait for.


class ConfigMismatchWarning(UserWarning):
    """``start()`` found a running watchdog whose settings differ from the ones asked for."""


# --------------------------------------------------------------------------------------------
# The handle of the running watchdog


def _cells_around(shell: Any) -> int:
    """How many cells that ``shell`` is executing this call comes from, each with a
    post_run_cell still to come: the frames of non-silent ``run_cell_async`` calls of ``shell``
    (the method that fires pre_run_cell) on this thread's stack. An extension loaded at start-up is
    in no cell, nor a silent execution (a front end's start-up commands) alone; but the silent
    cells that ``%run train.ipy`` / ``%run train.ipynb`` execute run inside the user's own cell,
    which still runs, and a cell may run another (``get_ipython().run_cell()``)."""
    cells = 0
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "run_cell_async" and frame.f_locals.get("self") is shell
                and not frame.f_locals.get("silent", False)):
            cells += 1
        frame = frame.f_back
    return cells


class WatchdogHandle:
    """The watchdog running in this kernel; returned by :func:`start`.

    Attributes:
        watchdog: the :class:`session_watchdog.daemon.Watchdog` (its ``config`` is resolved).
        requested: the configuration as asked for (before platform defaults), for comparisons.
        tracker: the cell-activity tracker feeding ``Sample.notebook_idle_s``.
        run_dir: the run directory shared with the trainer.
        log_file: the JSONL log (all background output goes there).
    """

    def __init__(self, watchdog: Any, requested: Config, tracker: ActivityTracker,
                 notices: _Notices, structlog_before: Dict[str, Any],
                 undo_log_bridge: Callable[[], None]) -> None:
        self.watchdog = watchdog
        self.requested = requested
        self.tracker = tracker
        self.run_dir: Path = watchdog.run_dir.path
        self.log_file: Optional[Path] = watchdog.config.log_file
        self._notices = notices
        self._structlog_before = structlog_before
        self._undo_log_bridge = undo_log_bridge
        self._shell: Any = None
        self._hooks: Tuple[Callable[[Any], None], Callable[[Any], None]] = (
            self._on_pre_run_cell, self._on_post_run_cell)
        self._stopped = False
        self.launched: Optional[Launched] = None  # the trainer started with launch(), if any

    # ---- state ---------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The resolved configuration the watchdog runs with."""
        return self.watchdog.config  # type: ignore[no-any-return]

    @property
    def running(self) -> bool:
        """True while the scheduler thread runs."""
        if self._stopped:
            return False
        return bool(self.watchdog.running)

    def remaining_s(self) -> Optional[float]:
        """Seconds left in the session budget now (live session clock), or None without one."""
        budget = self.config.max_session
        if not budget:
            return None
        return float(budget - self.watchdog.session.times().elapsed_s)

    def stop_lead_s(self) -> float:
        """How long before the deadline the final stop request goes out (policy.lead_time)."""
        from session_watchdog.policy import lead_time

        sample = self.watchdog.last_sample
        if sample is not None:
            return lead_time(self.config, sample).stop_lead_s
        config = self.config
        return config.stop_margin + config.default_checkpoint_time + config.default_step_time

    # ---- notices -------------------------------------------------------------------------------

    def notices(self, count: int = 10) -> List[Notice]:
        """The most recent notices (shown or not), oldest first."""
        return self._notices.recent(count)

    def print_notices(self, file: Optional[IO[str]] = None) -> int:
        """Print the notices not shown yet (to stderr by default); return how many."""
        pending = self._notices.take_unseen()
        out = sys.stderr if file is None else file
        for notice in pending:
            print(notice.text(), file=out, flush=True)
        return len(pending)

    # ---- IPython cell hooks --------------------------------------------------------------------

    def _on_pre_run_cell(self, info: Any) -> None:
        try:
            self.tracker.pre_run_cell(info)
            self.print_notices()
        except Exception as err:  # a failing hook would print a traceback into every cell
            _log.error("notebook_hook_failed", hook="pre_run_cell", error=repr(err))

    def _on_post_run_cell(self, result: Any) -> None:
        # No notices here: post_run_cell runs at the end of whatever cell was executing, which
        # would append them to an unrelated cell's output (issue 16). They print before the
        # next cell runs, in status() and in wait().
        try:
            self.tracker.post_run_cell(result)
        except Exception as err:
            _log.error("notebook_hook_failed", hook="post_run_cell", error=repr(err))

    def attach(self, shell: Any) -> None:
        """Register the cell hooks on ``shell`` (once; moves them from another shell)."""
        if shell is self._shell:
            return
        self.detach()
        pre, post = self._hooks
        shell.events.register("pre_run_cell", pre)
        shell.events.register("post_run_cell", post)
        self._shell = shell
        self.tracker.attached = True
        for _ in range(_cells_around(shell)):
            # This cell's pre_run_cell came before the hook: it runs (`start()` at the top of a
            # training cell). Its post_run_cell, registered now, ends it.
            self.tracker.pre_run_cell()

    def detach(self) -> None:
        """Unregister the cell hooks (idempotent)."""
        shell, self._shell = self._shell, None
        if shell is None:
            return
        for event, hook in zip(("pre_run_cell", "post_run_cell"), self._hooks):
            try:
                shell.events.unregister(event, hook)
            except ValueError:
                pass  # the user (or a reset of the shell) removed it already

    # ---- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the scheduler, join its threads, release the run directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.detach()
        _state()["last_run_dir"] = self.run_dir  # status() after stop() reads this run dir
        try:
            self._final_reading()
        except Exception as err:  # stopping must not fail on a reading
            _log.error("final_reading_failed", error=repr(err))
        try:
            self.watchdog.stop()  # joins the probe's worker threads (bounded)
        finally:
            self._undo_log_bridge()
            log.close()
            if self._structlog_before:
                import structlog

                # Give back the process's structlog configuration: the user's own logs must not
                # keep flowing into our JSONL file after the watchdog stopped.
                structlog.configure(**self._structlog_before)
            state = _state()
            if state.get("handle") is self:
                state["handle"] = None

    def _final_reading(self) -> None:
        """Log one last ``sample`` (no decisions): the trainer may have finished since the last
        tick, and the report must not depend on how soon the user stopped (issue 16)."""
        from session_watchdog.log import sample_event
        from session_watchdog.policy import remaining_s

        wd = self.watchdog
        if not wd.running:
            return
        with wd._tick_lock:  # never beside a tick: one reading at a time
            sample = wd._judged_sample()
            _log.info("sample", final=True,
                      **sample_event(sample, remaining_s(wd.config, sample), wd.config.max_session))

    def _track(self, launched: Launched) -> None:
        """Watch ``launched`` like ``run`` watches its child: the end of the runtime waits for it,
        its exit code counts, and a command that never builds a Session is named. A new
        command is a new run to judge, as under ``run``: an earlier launch's failure does not
        keep the runtime."""
        wd = self.watchdog
        with wd._tick_lock:  # no tick between the new child and its fresh state
            self.launched = launched
            wd.child_running = lambda: launched.running
            if hasattr(wd.probe, "child_exit"):
                wd.probe.child_exit = launched.exit_code
            wd._judge_new_child()
            wd._save_state_or_say()

    def status(self) -> Status:
        """See :func:`status`."""
        return _build_status(self.run_dir, self)

    def wait(self, poll: float = 1.0, until: Optional[Callable[[], bool]] = None, *,
             timeout: Optional[float] = None, view: str = "auto",
             file: Optional[IO[str]] = None) -> WaitResult:
        """See :func:`wait`."""
        return _wait(self, poll=poll, until=until, timeout=timeout, view=view, file=file)

    def __repr__(self) -> str:
        what = "running" if self.running else "stopped"
        return (f"<session-watchdog {what}: {self.watchdog.platform.name}, "
                f"run dir {self.run_dir}, log {self.log_file}>")


def _bridge_scheduler_logs() -> Callable[[], None]:
    """Route the ``apscheduler`` logger to the JSONL log; return the function that undoes it."""
    return log.bridge_stdlib("apscheduler")


_PRIVATE_START_ARGS = ("_clock", "_platform", "_session_start", "_shell")


def start(**kwargs: Any) -> WatchdogHandle:
    """Start the watchdog in a daemon thread of this kernel and return at once.

    Keyword arguments are config keys (``max_session="11h"``, ``run_dir=...``, ``tier=...``;
    ``session-watchdog run --help`` lists them), on top of ``SESSION_WATCHDOG_*`` environment
    variables. A second call never starts a second watchdog: it returns the running one, and
    warns (:class:`ConfigMismatchWarning`) naming the keys whose values differ, which are not
    applied (``stop()`` first to change them).

    Raises:
        ConfigError: a bad key or value.
        DaemonBusyError: another process watches the same run directory.
    """
    private = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("_")}
    unknown = sorted(set(private) - set(_PRIVATE_START_ARGS))
    if unknown:
        raise TypeError(f"start() got unexpected keyword arguments {', '.join(unknown)}")
    return _start(kwargs, clock=private.get("_clock"), platform=private.get("_platform"),
                  session_start=private.get("_session_start"), shell=private.get("_shell"),
                  compare=True, stacklevel=3)


def _start(overrides: Dict[str, Any], *, clock: Any = None, platform: Any = None,
           session_start: Optional[float] = None, shell: Any = None, compare: bool = True,
           stacklevel: int = 2) -> WatchdogHandle:
    import structlog

    from session_watchdog import daemon

    requested = load_config(overrides=overrides, overrides_spelling="argument")
    shell = shell if shell is not None else _current_shell()
    state = _state()
    with state["lock"]:
        running = _running_handle()
        if running is not None:
            if compare:
                _report_differences(running, requested, stacklevel + 1)
            if shell is not None:
                running.attach(shell)
            return running
        strays = [t.name for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]
        if strays:
            raise RuntimeError(
                "a session-watchdog thread is already running in this kernel but its handle is "
                "lost (was the package reinstalled while it ran?); restart the kernel")

        detected = platform or platforms.detect()
        plat = platforms.forced(requested.platform, detected)
        run_dir_path = requested.run_dir or channel.default_run_dir(requested.run_name)
        resolved = platforms.resolve(dataclasses.replace(requested, run_dir=run_dir_path), plat)
        tracker = ActivityTracker(clock.monotonic if clock is not None else time.monotonic,
                                  attached=shell is not None)
        structlog_before = structlog.get_config()
        # console=None: a background thread must never print into whatever cell is running.
        try:
            log.configure(resolved.log_file, console=None, max_bytes=resolved.log_max_bytes,
                          backups=resolved.log_backups, compress=True)
        except OSError as err:
            structlog.configure(**structlog_before)
            raise ConfigError(f"cannot write the log file {resolved.log_file}: "
                              f"{err.strerror or err}; pass log_file=...") from None
        notices = _Notices()
        undo_log_bridge = _bridge_scheduler_logs()
        watchdog = None
        try:
            watchdog = daemon.Watchdog(
                dataclasses.replace(requested, run_dir=run_dir_path), platform=plat, clock=clock,
                session_start=session_start, notebook_idle=tracker.idle_s,
                on_decisions=notices.on_decisions)
            from session_watchdog.supervise.snapshots import AfterDeath

            # a trainer (launch() or a Session in this kernel) that died without saving: its
            # newest snapshot becomes a checkpoint, as under `session-watchdog run` (issue 13)
            watchdog.after_tick.append(AfterDeath(watchdog.run_dir).observe)
            watchdog.start()
        except BaseException:
            if watchdog is not None:
                watchdog.stop()  # releases daemon.lock if it was taken, closes the probe
            undo_log_bridge()
            log.close()
            structlog.configure(**structlog_before)
            raise
        handle = WatchdogHandle(watchdog, requested, tracker, notices, structlog_before,
                                undo_log_bridge)
        if shell is not None:
            handle.attach(shell)
        state["handle"] = handle
        return handle


def _report_differences(running: WatchdogHandle, requested: Config, stacklevel: int) -> None:
    old, new = running.requested.as_dict(), requested.as_dict()
    differ = [k for k in new if new[k] != old.get(k)]
    if not differ:
        return
    from session_watchdog.config import KEYS_BY_NAME

    def shown(key: str, value: Any) -> str:  # notify URLs and tokens are secrets (issue 15)
        return "[redacted]" if key in KEYS_BY_NAME and KEYS_BY_NAME[key].secret else repr(value)

    details = "; ".join(f"{k}: running {shown(k, old.get(k))}, asked {shown(k, new[k])}" for k in differ)
    message = (f"session_watchdog.start(): a watchdog is already running in this kernel; "
               f"these settings differ and were NOT applied: {details}. To apply them, call "
               "session_watchdog.stop() and then start(...) again.")
    _log.warning("config_not_applied", keys=differ, message=message)
    warnings.warn(message, ConfigMismatchWarning, stacklevel=stacklevel)


def cancel(run_dir: Optional[str] = None) -> bool:
    """Keep this runtime: cancel a pending end (its grace period) and any later one. Training is
    not touched.

    Cancels the end transaction of this kernel's watchdog, and also asks any watchdog process
    watching the same run directory (``session-watchdog cancel`` does the same from a shell).
    A cancel before the grace period keeps the runtime too; the next watchdog started on the
    run directory undoes it. Returns True when this kernel's watchdog had an end under way
    whose end action had not run yet.
    """
    from session_watchdog.actions import request_cancel

    handle = _state().get("handle")
    # a keep, not only a cancel of this end: the idle end does not come later either
    cancelled = bool(handle is not None and handle.watchdog.keep_runtime("the user"))
    target = Path(run_dir) if run_dir else (handle.run_dir if handle is not None else None)
    if target is None:
        target = channel.default_run_dir()
    if target.is_dir():
        request_cancel(channel.RunDir(target))
    if cancelled:
        print("session-watchdog: the runtime will not be ended")
    elif handle is not None and handle.watchdog.end_acted():
        print("session-watchdog: too late: the end action already ran (it is not tried again)")
    else:
        print("session-watchdog: no end of the runtime was under way in this kernel; "
              f"asked any watchdog of {target} to keep this runtime")
    return cancelled


def stop() -> None:
    """Stop the watchdog of this kernel (no-op when none runs). Training is not touched."""
    state = _state()
    with state["lock"]:
        handle = state.get("handle")
        if handle is None:
            return
        handle.stop()
        state["handle"] = None
    print(f"session-watchdog: stopped; log {handle.log_file}")
