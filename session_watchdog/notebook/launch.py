"""``launch()``: a background trainer that survives Ctrl-C and kernel restarts, tracked by the
watchdog of this kernel (the process itself: session_watchdog/background.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from session_watchdog.background import Launched, default_output_path, start_process
from session_watchdog.log import get_logger
from session_watchdog.notebook.handle import _start
from session_watchdog.notebook.kernel import _running_handle

_log = get_logger()


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
