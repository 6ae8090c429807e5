"""One watchdog per kernel: its state, kept on ``sys`` so that reloading the notebook modules
keeps it (``%autoreload``, ``importlib.reload``), the kernel's IPython shell, and the trainer
states the notebook's parts look for.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from session_watchdog.notebook.handle import WatchdogHandle


_STATE_ATTR = "_session_watchdog_notebook_state"  # on ``sys``: survives reloads of this module
_TERMINAL_STATES = ("completed", "failed", "stopped")
_ACTIVE_STATES = ("starting", "running", "saving", "stopping")


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
