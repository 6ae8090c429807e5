"""session-watchdog: keep GPU training safe on Colab, AutoDL and rented GPU hosts.

The notebook API (``start``, ``stop``, ``status``, ``wait``, ``cancel``, ``launch``) is imported
lazily so that ``import session_watchdog`` stays cheap and does no I/O.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_NOTEBOOK_API = ("start", "stop", "status", "wait", "cancel", "launch", "load_ipython_extension",
                 "unload_ipython_extension")

__all__ = ["__version__", *_NOTEBOOK_API]


def __getattr__(name: str) -> Any:
    if name in _NOTEBOOK_API:
        from session_watchdog import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'session_watchdog' has no attribute {name!r}")
