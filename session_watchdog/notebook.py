"""Notebook mode: the watchdog in a daemon thread of the kernel, cell-activity hooks, ``wait()``.

Usage in a Colab or Jupyter notebook::

    import session_watchdog as sw
    sw.start()            # returns at once; re-running the cell never starts a second watchdog
    ...                   # train in a cell (Session in the loop), or in a background process
    sw.status()           # HTML table: session clock, GPU, RAM, disk, trainer, pending requests
    sw.wait()             # keep the kernel busy (Colab's idle reclaim) with a live progress view
    sw.stop()

or ``%load_ext session_watchdog`` (defaults and ``SESSION_WATCHDOG_*`` variables), then
``%watchdog status`` / ``%watchdog wait`` / ``%watchdog stop`` / ``%watchdog start key=value ...``.

Why cell activity matters: Colab reclaims a runtime whose kernel runs no cell (about 90 min on the
free tier, often sooner), even while a background process trains. IPython's ``pre_run_cell`` /
``post_run_cell`` events feed an :class:`ActivityTracker`; its ``idle_s()`` becomes
``Sample.notebook_idle_s`` and the policy warns and requests a checkpoint (``idle_reclaim``).

Output rules: the background thread never prints (the log goes to the JSONL file, console off),
because whatever cell happens to be running would receive it. Warnings and requests are queued by
the ``on_decisions`` callback and printed by the main thread: in the cell hooks (before and after
the next cell), in ``status()`` and in ``wait()``.

One watchdog per kernel: the live handle is kept on the ``sys`` module under a private name, so
re-running a cell, ``%autoreload`` or ``importlib.reload(session_watchdog.notebook)`` find it
again; the scheduler thread is named ``session-watchdog`` and the run directory's ``daemon.lock``
(flock) keeps out a watchdog of another process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from session_watchdog import channel, log, platforms
from session_watchdog.background import Launched, default_output_path, start_process
from session_watchdog.config import Config, ConfigError, format_duration, load_config
from session_watchdog.log import get_logger

_log = get_logger()

__all__ = [
    "ActivityTracker",
    "ConfigMismatchWarning",
    "Notice",
    "Status",
    "WaitResult",
    "WatchdogHandle",
    "launch",
    "load_ipython_extension",
    "start",
    "status",
    "stop",
    "unload_ipython_extension",
    "wait",
]

THREAD_NAME = "session-watchdog"  # the scheduler thread (APScheduler names it "APScheduler")
# probes.SystemProbe's bounded-call workers (one per kind of call that can hang). Not the
# trainer's threads ("session-watchdog-poller", "-ack"), which stop() must never wait for.
_STATE_ATTR = "_session_watchdog_notebook_state"  # on ``sys``: survives reloads of this module
_NOTICE_KINDS = ("warn", "request", "resend", "end")  # decisions worth showing to the user
_TERMINAL_STATES = ("completed", "failed", "stopped")
_ACTIVE_STATES = ("starting", "running", "saving", "stopping")
_MAX_NOTICES = 100
_TEXT_VIEW_EVERY_S = 30.0


class ConfigMismatchWarning(UserWarning):
    """``start()`` found a running watchdog whose settings differ from the ones asked for."""


# --------------------------------------------------------------------------------------------
# Cell activity


class ActivityTracker:
    """Seconds since the kernel last executed something: a cell, or ``wait()``.

    IPython calls :meth:`pre_run_cell` / :meth:`post_run_cell` around every cell; ``wait()``
    holds :meth:`busy`. While either runs, ``idle_s()`` is 0.0; afterwards it counts from the end.

    Args:
        monotonic: the clock (tests inject a fake one).
        attached: whether cell events reach this tracker. A detached tracker (a plain Python
            script, no IPython shell) reports ``None``: "not a notebook", never a fake idle time.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic, *,
                 attached: bool = True) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cell_running = False
        self._waits = 0
        self._last_activity = monotonic()
        self._idle_before_cell = 0.0
        self.attached = attached

    def pre_run_cell(self, info: Any = None) -> None:
        """IPython ``pre_run_cell``: a cell starts executing."""
        with self._lock:
            now = self._monotonic()
            self._idle_before_cell = max(0.0, now - self._last_activity)
            self._cell_running = True
            self._last_activity = now

    def post_run_cell(self, result: Any = None) -> None:
        """IPython ``post_run_cell``: the cell finished (successfully or not)."""
        with self._lock:
            self._cell_running = False
            self._last_activity = self._monotonic()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count as executing for the duration of the block (``wait()`` uses it)."""
        with self._lock:
            self._waits += 1
        try:
            yield
        finally:
            with self._lock:
                self._waits -= 1
                self._last_activity = self._monotonic()

    @property
    def executing(self) -> bool:
        """True while a cell or ``wait()`` runs."""
        with self._lock:
            return self._cell_running or self._waits > 0

    @property
    def waiting(self) -> bool:
        """True while ``wait()`` runs."""
        with self._lock:
            return self._waits > 0

    def idle_before_cell_s(self) -> Optional[float]:
        """While a cell runs: how long nothing ran before it started; else None."""
        with self._lock:
            return self._idle_before_cell if self._cell_running else None

    def idle_s(self) -> Optional[float]:
        """Seconds with nothing executing (0.0 while something does); None when detached."""
        if not self.attached:
            return None
        with self._lock:
            if self._cell_running or self._waits > 0:
                return 0.0
            return max(0.0, self._monotonic() - self._last_activity)


# --------------------------------------------------------------------------------------------
# Notices: decisions queued by the background thread, printed by the main thread


@dataclass(frozen=True)
class Notice:
    """One decision shown to the user. ``at`` is wall-clock epoch seconds (the sample's ``now``)."""

    at: float
    kind: str  # warn | request | resend | end
    reason: str
    message: str
    action: Optional[str] = None

    def text(self) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(self.at))
        if self.kind == "warn":
            what = "warning"
        elif self.kind == "request":
            what = f"{self.action} requested"
        elif self.kind == "end":
            what = "ending the runtime"
        else:
            what = f"{self.action} request sent again"
        return f"[session-watchdog {clock}] {what} ({self.reason}): {self.message}"


class _Notices:
    """A bounded, thread-safe queue that remembers which notices were shown already."""

    def __init__(self, maxlen: int = _MAX_NOTICES) -> None:
        self._lock = threading.Lock()
        self._items: Deque[Tuple[int, Notice]] = deque(maxlen=maxlen)
        self._next = 0
        self._shown = 0  # notices numbered below this were shown

    def add(self, notice: Notice) -> None:
        with self._lock:
            self._items.append((self._next, notice))
            self._next += 1

    def on_decisions(self, decisions: List[Any], sample: Any) -> None:
        """The Watchdog's ``on_decisions`` callback. Runs in the scheduler's worker thread:
        queue, never print (the text would land in whatever cell is running)."""
        for d in decisions:
            if d.kind in _NOTICE_KINDS:
                self.add(Notice(sample.now, d.kind, d.reason, d.message, d.action))

    def take_unseen(self) -> List[Notice]:
        with self._lock:
            out = [n for i, n in self._items if i >= self._shown]
            self._shown = self._next
            return out

    def recent(self, count: int) -> List[Notice]:
        with self._lock:
            return [n for _, n in list(self._items)[-count:]]


# --------------------------------------------------------------------------------------------
# The handle of the running watchdog


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
            sample = wd._judge(wd.probe.sample(wd.session.times()))
            _log.info("sample", final=True,
                      **sample_event(sample, remaining_s(wd.config, sample), wd.config.max_session))

    def _track(self, launched: Launched) -> None:
        """Watch ``launched`` like ``run`` watches its child: the end of the runtime waits for it,
        its exit code counts, and a command that never builds a Session is named."""
        self.launched = launched
        self.watchdog.child_running = lambda: launched.running
        if hasattr(self.watchdog.probe, "child_exit"):
            self.watchdog.probe.child_exit = launched.exit_code

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


# --------------------------------------------------------------------------------------------
# The module singleton (kept on ``sys`` so that reloading this module keeps it)


def _state() -> Dict[str, Any]:
    # dict.setdefault on the module's namespace is atomic under the GIL: one state per process.
    state: Dict[str, Any] = vars(sys).setdefault(
        _STATE_ATTR, {"lock": threading.RLock(), "handle": None})
    return state


def _running_handle() -> Optional[WatchdogHandle]:
    handle = _state().get("handle")
    if handle is not None and handle.running:
        return handle  # type: ignore[no-any-return]
    return None


def _current_shell() -> Any:
    """The IPython shell of this kernel, or None (importing IPython only if it is loaded)."""
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    return get_ipython() if callable(get_ipython) else None


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
    run directory undoes it. Returns True when this kernel's watchdog had an end under way.
    """
    from session_watchdog.actions import request_cancel

    handle = _state().get("handle")
    cancelled = bool(handle is not None and handle.watchdog.cancel_end())
    target = Path(run_dir) if run_dir else (handle.run_dir if handle is not None else None)
    if target is None:
        target = channel.default_run_dir()
    if target.is_dir():
        request_cancel(channel.RunDir(target))
    print("session-watchdog: the runtime will not be ended" if cancelled
          else "session-watchdog: no end of the runtime was under way in this kernel; "
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


# --------------------------------------------------------------------------------------------
# status()


def _fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "?"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


@dataclass(frozen=True)
class Status:
    """What ``status()`` returns: an HTML table in a notebook, aligned text in a terminal.

    Attributes:
        rows: (label, value, level) with level "" or "warn" (highlighted).
    """

    rows: Tuple[Tuple[str, str, str], ...]

    def value(self, label: str) -> Optional[str]:
        """The value of the first row called ``label``, or None."""
        for key, value, _ in self.rows:
            if key == label:
                return value
        return None

    def __str__(self) -> str:
        width = max((len(key) for key, _, _ in self.rows), default=0)
        return "\n".join(f"{key:<{width}}  {value}" for key, value, _ in self.rows)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        cells = []
        for key, value, level in self.rows:
            style = ' style="color:#b00020;text-align:left"' if level == "warn" else \
                ' style="text-align:left"'
            cells.append(f'<tr><th style="text-align:left">{html.escape(key)}</th>'
                         f"<td{style}>{html.escape(value)}</td></tr>")
        return ('<table class="session-watchdog-status">'
                "<caption>session-watchdog</caption>" + "".join(cells) + "</table>")


def status(run_dir: Optional[Path] = None) -> Status:
    """The session clock, GPU, RAM, disk, trainer step, last checkpoint and pending decisions.

    Without a running watchdog it shows what the run directory says (``run_dir`` or the one the
    configuration names).
    """
    handle = _running_handle()
    if handle is not None and (run_dir is None or Path(run_dir) == handle.run_dir):
        return handle.status()
    if run_dir is None and _state().get("last_run_dir") is not None:
        run_dir = _state()["last_run_dir"]  # the run dir of the watchdog stop() just stopped
    if run_dir is None:
        try:
            config = load_config()
        except ConfigError as err:
            return Status((("watchdog", "not running", ""), ("problem", str(err), "warn")))
        run_dir = config.run_dir or channel.default_run_dir(config.run_name)
    return _build_status(Path(run_dir), None)


def _build_status(run_dir: Path, handle: Optional[WatchdogHandle]) -> Status:
    from session_watchdog.cli import collect_status

    rows: List[Tuple[str, str, str]] = []

    def add(key: str, value: str, level: str = "") -> None:
        rows.append((key, value, level))

    running = handle is not None and handle.running
    now = handle.watchdog.session.times().now if running and handle else time.time()
    info: Optional[Dict[str, Any]] = collect_status(run_dir, now) if run_dir.is_dir() else None

    if handle is not None and running:
        wd = handle.watchdog
        add("watchdog", f"running in this kernel ({wd.platform.name}, every "
            f"{wd.config.interval:g}s, {wd.ticks} ticks)")
        _session_rows(add, handle)
    else:
        daemon = (info or {}).get("daemon") or {}
        if info and info.get("daemon_running"):
            add("watchdog", f"running in pid {daemon.get('pid')} ({daemon.get('platform')})")
        else:
            add("watchdog", "not running (session_watchdog.start())", "warn")
        if info and info.get("elapsed_s") is not None:
            budget = info.get("budget_s")
            add("session", f"{format_duration(info['elapsed_s'])} elapsed"
                + (f" of {format_duration(budget)}, {format_duration(info['remaining_s'])} left"
                   if budget else ", no budget"))
    if handle is not None and running:
        _machine_rows(add, handle)
    if info is None:
        add("run dir", f"{run_dir} (does not exist yet)")
        return Status(tuple(rows))
    _trainer_rows(add, info, now)
    if handle is not None and running:
        out = handle.watchdog.state.outstanding
        if out is not None and _request_settled(info, out.seq):
            add("pending request", "none")
        elif out is not None:
            elapsed = handle.watchdog.session.times().elapsed_s
            add("pending request", f"{out.action} #{out.seq} ({out.reason}), sent "
                f"{format_duration(elapsed - out.sent_elapsed)} ago, not acknowledged yet", "warn")
        else:
            add("pending request", "none")
        if handle.watchdog.end_running():
            add("runtime end", "in progress (grace period, then the end action); cancel: "
                "session-watchdog cancel", "warn")
        notices = handle.notices(5)
        handle._notices.take_unseen()  # shown here: the next cell does not print them again
        for notice in notices:
            add("notice", notice.text(), "warn" if notice.kind == "warn" else "")
    elif info.get("outstanding") and not _request_settled(info, info["outstanding"].get("seq")):
        out = info["outstanding"]
        add("pending request", f"{out.get('action')} #{out.get('seq')} ({out.get('reason')})",
            "warn")
    add("run dir", str(run_dir))
    log_file = handle.log_file if handle is not None else ((info.get("daemon") or {})
                                                           .get("log_file"))
    add("log", str(log_file or "-"))
    for problem in info.get("errors", []):
        add("problem", str(problem), "warn")
    return Status(tuple(rows))


def _request_settled(info: Dict[str, Any], seq: Any) -> bool:
    """A request the trainer acknowledged already (the watchdog notices at its next tick), or
    one no trainer will answer: it ended in a final state and holds no run.lock."""
    trainer = info.get("trainer") or {}
    acked = trainer.get("acked_seq")
    if isinstance(acked, int) and isinstance(seq, int) and acked >= seq:
        return True
    return not info.get("trainer_alive") and trainer.get("state") in _TERMINAL_STATES


def _session_rows(add: Callable[..., None], handle: WatchdogHandle) -> None:
    wd = handle.watchdog
    times = wd.session.times()
    budget = wd.config.max_session
    if budget:
        left = budget - times.elapsed_s
        add("session", f"{format_duration(times.elapsed_s)} elapsed of {format_duration(budget)}, "
            f"{format_duration(left)} left", "warn" if left <= handle.stop_lead_s() else "")
        deadline = wd.session.start_wall + budget
        clock = time.strftime("%H:%M", time.localtime(deadline))
        budget_source = ("configured" if handle.requested.max_session is not None
                         else f"{wd.platform.name} default, an upper bound")
        add("deadline", f"~{clock} (in {format_duration(left)}); session start: "
            f"{wd.session_source}; budget: {budget_source}")
    else:
        add("session", f"{format_duration(times.elapsed_s)} elapsed, no budget "
            f"(session start: {wd.session_source})")
    idle = handle.tracker.idle_s()
    if idle is not None:
        config = wd.config
        limits = []
        if config.idle_warn:
            limits.append(f"warning at {format_duration(config.idle_warn)}")
        if config.idle_limit:
            limits.append(f"reclaim ~{format_duration(config.idle_limit)}")
        before = handle.tracker.idle_before_cell_s()
        if handle.tracker.waiting:
            text = "busy (wait() runs)"
        elif before is not None:
            # status() always runs in a cell: the idle time that matters is the one before it.
            text = f"this cell runs; idle {format_duration(before)} before it"
        else:
            text = f"idle {format_duration(idle)}"
        level = "warn" if config.idle_warn and idle >= config.idle_warn else ""
        add("notebook", text + (f" ({', '.join(limits)})" if limits else ""), level)


def _machine_rows(add: Callable[..., None], handle: WatchdogHandle) -> None:
    sample = handle.watchdog.last_sample
    if sample is None:
        add("machine", "waiting for the first reading")
        return
    if sample.gpus:
        for g in sample.gpus:
            if g.error:
                add(f"GPU {g.index}", f"unreadable: {g.error}", "warn")
                continue
            util = "?" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%"
            parts = [f"{g.name or 'GPU'}: {util} util",
                     f"{_fmt_bytes(g.memory_used_bytes)} / {_fmt_bytes(g.memory_total_bytes)}"]
            if g.temperature_c is not None:
                parts.append(f"{g.temperature_c:.0f} C")
            if g.power_w is not None:
                parts.append(f"{g.power_w:.0f} W")
            add(f"GPU {g.index}", ", ".join(parts))
    else:
        add("GPU", "none" if sample.nvml == "ok" else sample.nvml)
    host = sample.host
    if host is not None:
        add("RAM", f"{_fmt_bytes(host.ram_available_bytes)} available of "
            f"{_fmt_bytes(host.ram_total_bytes)} ({host.ram_source})")
    for disk in sample.disks:
        if disk.free_bytes is None:
            add("disk", f"{disk.path}: unreadable ({disk.error})", "warn")
        else:
            add("disk", f"{disk.path}: {_fmt_bytes(disk.free_bytes)} free of "
                f"{_fmt_bytes(disk.total_bytes)}")


def _trainer_rows(add: Callable[..., None], info: Dict[str, Any], now: float) -> None:
    trainer = info.get("trainer") or {}
    if trainer:
        parts = [str(trainer.get("state")), f"step {trainer.get('step')}",
                 f"epoch {trainer.get('epoch')}"]
        if trainer.get("step_time_s"):
            parts.append(f"{trainer['step_time_s']:.3g} s/step")
        parts.append("alive" if info.get("trainer_alive") else "no live process")
        if info.get("trainer_saving"):
            parts.append("saving")
        add("trainer", ", ".join(parts), "warn" if trainer.get("state") == "failed" else "")
    else:
        add("trainer", "none yet (no trainer.json)")
    ckpt = trainer.get("last_checkpoint") or {}
    if ckpt.get("at"):
        add("last checkpoint", f"step {ckpt.get('step')}, {format_duration(now - ckpt['at'])} ago, "
            f"{_fmt_bytes(ckpt.get('bytes'))}: {ckpt.get('path')}")
    else:
        add("last checkpoint", "none")
    from session_watchdog.cli import mirror_rows

    for key, text in mirror_rows(trainer, now):
        add(key, text, "warn" if "failing" in text or "refused" in text else "")


# --------------------------------------------------------------------------------------------
# wait()


@dataclass(frozen=True)
class WaitResult:
    """Why ``wait()`` returned.

    ``reason``: completed | failed | stopped (the trainer's final state), trainer_gone (it ended
    without saying so), session_ending (the budget is within the stop lead), interrupted
    (KeyboardInterrupt), until, timeout.
    """

    reason: str
    state: Optional[str]
    step: Optional[int]
    waited_s: float


class _TextView:
    """Plain text: a line when something notable changed, else at most every ``every_s``."""

    def __init__(self, file: Optional[IO[str]], every_s: float = _TEXT_VIEW_EVERY_S) -> None:
        self.file = file
        self.every_s = every_s
        self._last_key: Any = None
        self._last_print = 0.0

    def _print(self, text: str) -> None:
        print(text, file=self.file if self.file is not None else sys.stdout, flush=True)

    def update(self, step: Optional[int], line: str, key: Any) -> None:
        now = time.monotonic()
        if key != self._last_key or now - self._last_print >= self.every_s:
            self._print(f"session-watchdog: {line}")
            self._last_key = key
            self._last_print = now

    def note(self, text: str) -> None:
        self._print(text)

    def close(self, text: str) -> None:
        self._print(text)


class _TqdmView:
    """tqdm.auto: a widget in a notebook, a bar in a terminal; the step counter with a postfix."""

    def __init__(self, tqdm_cls: Any, file: Optional[IO[str]]) -> None:
        self._tqdm = tqdm_cls
        self.file = file
        self.bar = tqdm_cls(total=None, unit="step", desc="training", file=file,
                            dynamic_ncols=True, leave=True)

    def update(self, step: Optional[int], line: str, key: Any) -> None:
        if step is not None:
            if step >= self.bar.n:
                self.bar.update(step - self.bar.n)
            else:  # a resumed trainer counts from its checkpoint
                self.bar.n = step
        self.bar.set_postfix_str(line, refresh=True)

    def note(self, text: str) -> None:
        self._tqdm.write(text, file=self.file)

    def close(self, text: str) -> None:
        self.bar.close()
        print(text, file=self.file if self.file is not None else sys.stdout, flush=True)


def _make_view(view: str, file: Optional[IO[str]]) -> Any:
    if view not in ("auto", "tqdm", "text"):
        raise ValueError(f"wait(view={view!r}): expected 'auto', 'tqdm' or 'text'")
    if view in ("auto", "tqdm"):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if view == "tqdm":
                raise
        else:
            return _TqdmView(tqdm, file)
    return _TextView(file)


def _progress_line(status: Optional[channel.TrainerStatus], left: Optional[float],
                   now: float, alive: bool = True) -> Tuple[str, Any]:
    parts = []
    key: Tuple[Any, ...] = ()
    if status is None:
        parts.append("waiting for the trainer")
    else:
        if alive or status.state not in _ACTIVE_STATES:
            parts.append(f"{status.state}, step {status.step}, epoch {status.epoch}")
        else:  # never claim a dead trainer runs (issue 16)
            parts.append(f"no live trainer (last report: {status.state}, step {status.step})")
        ckpt = status.last_checkpoint
        if ckpt is not None:
            parts.append(f"checkpoint step {ckpt.step} ({format_duration(now - ckpt.at)} ago)")
        key = (status.state, status.epoch, ckpt.step if ckpt else None, alive)
    parts.append("session: no budget" if left is None else f"session: {format_duration(left)} left")
    return " | ".join(parts), key


START_TIMEOUT_S = 30.0  # wait() gives a new trainer this long to appear after an ended one


def wait(poll: float = 1.0, until: Optional[Callable[[], bool]] = None, *,
         timeout: Optional[float] = None, view: str = "auto",
         file: Optional[IO[str]] = None, start_timeout: float = START_TIMEOUT_S) -> WaitResult:
    """Block with a live progress view until training ends or the session is about to end.

    This keeps the kernel busy, which is what Colab's idle reclaim looks at, while training
    runs in a background process (:func:`launch`) or thread. Returns when the trainer reports
    completed / failed / stopped (or ends without saying so), when the session budget is within
    the stop lead, when ``until()`` is true, after ``timeout`` seconds, or on KeyboardInterrupt
    ("interrupt the kernel"), which stops neither a launched trainer nor the watchdog.

    Which trainer: the one :func:`launch` started, when there is one (a ``trainer.json`` older
    than the launch is an earlier run's). Otherwise, a final ``trainer.json`` written before
    ``wait()`` was called is an earlier run's: ``wait()`` gives a new trainer ``start_timeout``
    seconds to appear before it reports that one.

    Args:
        poll: seconds between looks at the run directory.
        until: an extra condition, checked every poll.
        timeout: give up after this many seconds.
        view: "auto" (tqdm.auto when installed, else text), "tqdm" or "text".
        file: where the view writes (default: stdout for text, stderr for tqdm).
        start_timeout: see above.

    Raises:
        RuntimeError: no watchdog runs in this kernel (call ``start()`` first).
    """
    handle = _running_handle()
    if handle is None:
        raise RuntimeError("no session-watchdog runs in this kernel; call "
                           "session_watchdog.start() first")
    return _wait(handle, poll=poll, until=until, timeout=timeout, view=view, file=file,
                 start_timeout=start_timeout)


def _wait(handle: WatchdogHandle, *, poll: float, until: Optional[Callable[[], bool]],
          timeout: Optional[float], view: str, file: Optional[IO[str]],
          start_timeout: float = START_TIMEOUT_S) -> WaitResult:
    if not poll > 0:
        raise ValueError(f"wait(poll={poll!r}): expected a positive number of seconds")
    run_dir = channel.RunDir(handle.run_dir, create=False)
    launched = handle.launched
    begun = time.monotonic()
    begun_wall = time.time()
    status: Optional[channel.TrainerStatus] = None  # the trainer this wait() watches
    earlier: Optional[channel.TrainerStatus] = None  # a final state from before, not ours
    seen_alive = False
    gone_polls = 0
    out = _make_view(view, file)

    def finish(reason: str, text: str, shown: Optional[channel.TrainerStatus] = None
               ) -> WaitResult:
        shown = shown if shown is not None else status
        out.close(f"session-watchdog: {text}")
        return WaitResult(reason, shown.state if shown else None,
                          shown.step if shown else None, round(time.monotonic() - begun, 3))

    def ours(found: Optional[channel.TrainerStatus]) -> Optional[channel.TrainerStatus]:
        """``found`` when it describes the trainer this wait() is for (issue 16)."""
        if found is None:
            return None
        if launched is not None:  # 1 s: the trainer's wall clock is ours, writes are not instant
            return found if found.heartbeat >= launched.started_wall - 1.0 else None
        if found.state in _TERMINAL_STATES and found.heartbeat < begun_wall - 1.0:
            # Ended before wait() was called: an earlier run's file, even while run.lock is held
            # (a new trainer takes the lock before it writes its first trainer.json).
            return None
        return found

    with handle.tracker.busy():
        try:
            while True:
                # Liveness first, then the status: a trainer writes its final state before it
                # releases run.lock (and before it exits), so "not alive" read first makes the
                # status read final.
                launched_running = launched is not None and launched.running
                alive = run_dir.trainer_alive()
                try:
                    found: Optional[channel.TrainerStatus] = run_dir.read_status()
                except (channel.ChannelError, OSError):
                    found = status  # keep the last good one; the watchdog logs unreadable files
                mine = ours(found)
                if mine is None and found is not None and found is not status:
                    earlier = found
                status = mine if mine is not None else status
                seen_alive = seen_alive or (alive and status is not None)
                for notice in handle._notices.take_unseen():
                    out.note(notice.text())
                left = handle.remaining_s()
                line, key = _progress_line(status, left, handle.watchdog.session.times().now,
                                           alive or launched_running)
                out.update(status.step if status else None, line, key)

                if status is not None and status.state in _TERMINAL_STATES:
                    return finish(status.state, f"training {status.state} at step {status.step}")
                if launched is not None and not launched_running:
                    code = launched.exit_code()
                    for text in launched.tail(5):
                        out.note(f"  | {text}")
                    where = "" if status is None else f" at step {status.step}"
                    return finish("trainer_gone", f"the launched trainer (pid {launched.pid}) "
                                  f"exited with code {code}{where} without reporting "
                                  f"completion; its output: {launched.output}")
                active = status is not None and status.state in _ACTIVE_STATES
                # A launched trainer's end is its process's exit (its code says more).
                gone_polls = gone_polls + 1 if seen_alive and not alive and active \
                    and launched is None else 0
                if gone_polls >= 2 and status is not None:
                    return finish("trainer_gone", f"the trainer ended at step {status.step} "
                                  "without reporting completion (crashed or closed?)")
                if status is None and earlier is not None and launched is None and not alive \
                        and time.monotonic() - begun >= start_timeout:
                    return finish(earlier.state, f"no new trainer started in "
                                  f"{format_duration(start_timeout)}; the last one "
                                  f"{earlier.state} at step {earlier.step}, "
                                  f"{format_duration(begun_wall - earlier.heartbeat)} before "
                                  "wait() was called", earlier)
                if left is not None and left <= handle.stop_lead_s():
                    return finish("session_ending", f"the session ends in {format_duration(left)}")
                if until is not None and until():
                    return finish("until", "wait condition met")
                if timeout is not None and time.monotonic() - begun >= timeout:
                    return finish("timeout", f"stopped waiting (timeout {timeout:g}s)")
                time.sleep(poll)
        except KeyboardInterrupt:
            # Say only what is true now: is a trainer alive (issue 16)?
            if launched is not None and launched.running:
                text = (f"wait() interrupted; the launched trainer (pid {launched.pid}) and the "
                        "watchdog keep running (session_watchdog.status() shows them)")
            elif run_dir.trainer_alive():
                text = ("wait() interrupted; training and the watchdog keep running "
                        "(session_watchdog.status() shows them)")
            else:
                text = ("wait() interrupted; no trainer is running; the watchdog keeps running "
                        "(session_watchdog.status() shows it)")
            return finish("interrupted", text)


# --------------------------------------------------------------------------------------------
# launch(): a background trainer that survives Ctrl-C and kernel restarts


def launch(argv: List[str], *, output: Optional[str] = None, cwd: Optional[str] = None,
           env: Optional[Dict[str, str]] = None, **start_kwargs: Any) -> Launched:
    """Start a training command in the background, in its own session, watched by the watchdog.

    Use this instead of ``subprocess.Popen`` or ``!nohup ... &`` (IPython refuses background
    processes): Jupyter's "interrupt" and "restart" signal the kernel's whole process group,
    which a plain ``Popen`` child belongs to; this one has its own session and survives both.
    Its stdout and stderr go to ``output`` (default ``train-<time>.log`` next to the watchdog's
    log); the run directory reaches it in ``SESSION_WATCHDOG_RUN_DIR``. The watchdog tracks it like
    ``session-watchdog run`` tracks its command: the runtime is not ended while it runs, and its
    exit code counts. Starts the watchdog first when none runs (``start_kwargs`` as for
    :func:`start`). Then ``wait()`` watches this trainer.

    Raises:
        RuntimeError: a trainer launched earlier in this kernel still runs.
        ValueError: ``argv`` is not a non-empty list.
        OSError: the command or the output file cannot be opened.
    """
    handle = _running_handle()
    if handle is None or start_kwargs:
        handle = _start(start_kwargs, stacklevel=3)
    previous = handle.launched
    if previous is not None and previous.running:
        raise RuntimeError(f"the trainer launched earlier still runs (pid {previous.pid}); "
                           "wait() for it, or end it first")
    path = Path(output) if output else default_output_path(handle.log_file, handle.run_dir,
                                                            time.time())
    launched = start_process(argv, run_dir=handle.run_dir, output=path, cwd=cwd, env=env)
    handle._track(launched)
    _log.info("action", step="launch", pid=launched.pid, output=str(path),
              message=f"started {' '.join(launched.argv)} (pid {launched.pid}) in its own "
                      f"session; output {path}")
    return launched


# --------------------------------------------------------------------------------------------
# IPython extension: %load_ext session_watchdog


_MAGIC_USAGE = ("usage: %watchdog [status | wait | stop | start key=value ...]\n"
                "  status  the session clock, machine, trainer and pending requests\n"
                "  wait    block with a live view until training ends (keeps Colab busy)\n"
                "  stop    stop the watchdog (training is not touched)\n"
                "  start   start it, e.g. %watchdog start max_session=11h30m")


def _watchdog_magic(line: str) -> Any:
    """``%watchdog status|wait|stop|start key=value ...``."""
    words = line.split()
    command, args = (words[0], words[1:]) if words else ("status", [])
    if command == "status" and not args:
        return status()
    if command == "wait" and not args:
        return wait()
    if command == "stop" and not args:
        stop()
        return None
    if command == "start":
        overrides: Dict[str, str] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or not key:
                print(f"%watchdog start: expected key=value, got {arg!r}", file=sys.stderr)
                return None
            overrides[key] = value
        try:
            handle = _start(overrides, stacklevel=2)
        except (ConfigError, RuntimeError, channel.ChannelError) as err:
            print(f"session-watchdog: error: {err}", file=sys.stderr)
            return None
        print(f"session-watchdog: {handle!r}")
        return None
    print(_MAGIC_USAGE, file=sys.stderr)
    return None


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext session_watchdog``: start with defaults, hooks and the ``%watchdog`` magic.

    A watchdog already started with ``start(...)`` is kept as it is (no comparison with the
    defaults: loading the extension is not a request for different settings).
    """
    ip.register_magic_function(_watchdog_magic, magic_kind="line", magic_name="watchdog")
    try:
        handle = _start({}, shell=ip, compare=False)
    except (ConfigError, RuntimeError, channel.ChannelError) as err:  # one line, no traceback
        print(f"session-watchdog: not started: {err}", file=sys.stderr)
        return
    print(f"session-watchdog: {handle!r}; %watchdog status | wait | stop")


def unload_ipython_extension(ip: Any) -> None:
    """``%unload_ext session_watchdog``: stop the watchdog and remove the magic."""
    stop()
    ip.magics_manager.magics["line"].pop("watchdog", None)
