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

# The parts of notebook mode, one module each; every name stays importable from here.
from session_watchdog.notebook.cells import ActivityTracker as ActivityTracker
from session_watchdog.notebook.cells import Notice as Notice
from session_watchdog.notebook.cells import _Notices as _Notices
from session_watchdog.notebook.handle import THREAD_NAME as THREAD_NAME
from session_watchdog.notebook.handle import ConfigMismatchWarning as ConfigMismatchWarning
from session_watchdog.notebook.handle import WatchdogHandle as WatchdogHandle
from session_watchdog.notebook.handle import _bridge_scheduler_logs as _bridge_scheduler_logs
from session_watchdog.notebook.handle import _report_differences as _report_differences
from session_watchdog.notebook.handle import _start as _start
from session_watchdog.notebook.handle import cancel as cancel
from session_watchdog.notebook.handle import start as start
from session_watchdog.notebook.handle import stop as stop
from session_watchdog.notebook.kernel import _current_shell as _current_shell
from session_watchdog.notebook.kernel import _running_handle as _running_handle
from session_watchdog.notebook.kernel import _state as _state
from session_watchdog.notebook.launch import launch as launch
from session_watchdog.notebook.magic import _watchdog_magic as _watchdog_magic
from session_watchdog.notebook.magic import load_ipython_extension as load_ipython_extension
from session_watchdog.notebook.magic import unload_ipython_extension as unload_ipython_extension
from session_watchdog.notebook.status import Status as Status
from session_watchdog.notebook.status import _build_status as _build_status
from session_watchdog.notebook.status import status as status
from session_watchdog.notebook.wait import START_TIMEOUT_S as START_TIMEOUT_S
from session_watchdog.notebook.wait import WaitResult as WaitResult
from session_watchdog.notebook.wait import _wait as _wait
from session_watchdog.notebook.wait import wait as wait

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
