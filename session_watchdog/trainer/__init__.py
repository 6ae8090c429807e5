"""The trainer side: imported inside the training process.

``from session_watchdog.trainer import Session`` does not import torch: the session module is
standard library (plus psutil) and loads the checkpoint module, which imports torch, only when a
:class:`Session` is built. Names are resolved lazily (PEP 562) so that importing this package
costs nothing until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    from session_watchdog.trainer.checkpoint import (
        CheckpointDirError,
        CheckpointError,
        CheckpointManager,
        SavedCheckpoint,
        capture_state,
        restore_state,
    )
    from session_watchdog.trainer.distributed import DistributedError
    from session_watchdog.trainer.session import (
        EXIT_STOPPED,
        Session,
        SessionError,
        SessionExit,
        Start,
        StopTraining,
    )
    from session_watchdog.trainer.sharded import ShardedCheckpointer

_EXPORTS: Dict[str, str] = {
    "EXIT_STOPPED": "session",
    "Session": "session",
    "SessionError": "session",
    "SessionExit": "session",
    "Start": "session",
    "StopTraining": "session",
    # These import torch.
    "CheckpointDirError": "checkpoint",
    "CheckpointError": "checkpoint",
    "CheckpointManager": "checkpoint",
    "SavedCheckpoint": "checkpoint",
    "capture_state": "checkpoint",
    "restore_state": "checkpoint",
    "ShardedCheckpointer": "sharded",
    "DistributedError": "distributed",
}

__all__ = [
    "EXIT_STOPPED",
    "CheckpointDirError",
    "CheckpointError",
    "CheckpointManager",
    "SavedCheckpoint",
    "Session",
    "SessionError",
    "SessionExit",
    "Start",
    "StopTraining",
    "capture_state",
    "restore_state",
    "ShardedCheckpointer",
    "DistributedError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'session_watchdog.trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"session_watchdog.trainer.{module}"), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
