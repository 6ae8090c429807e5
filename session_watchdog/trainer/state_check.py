"""What may go into a checkpoint: :func:`check_state` refuses, before anything is written, a
state that ``torch.load(weights_only=True)`` would refuse at resume time.

Importable from ``session_watchdog.trainer.checkpoint`` as before.
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Set, Tuple

import torch

from session_watchdog.trainer.checkpoint_types import CheckpointStateError

__all__ = ["check_state"]


# --------------------------------------------------------------------------------------------
# What may go into a checkpoint


def _exact_allowed_types() -> Tuple[type, ...]:
    # Mirrors torch's weights-only allow-list (torch/_weights_only_unpickler.py) for the types a
    # state can hold; checked up front so a save cannot succeed and then fail at resume time.
    return (
        dict, collections.OrderedDict, collections.Counter, list, tuple, set,
        str, bytes, bytearray, int, float, complex, bool, type(None),
        torch.Size, torch.device, torch.dtype, torch.Tensor, torch.nn.Parameter,
    )


def _safe_globals() -> Set[Any]:
    # Classes the user registered with torch.serialization.add_safe_globals() load fine too.
    getter = getattr(torch.serialization, "get_safe_globals", None)
    if getter is None:
        return set()
    found: Set[Any] = set()
    for entry in getter():
        found.add(entry[0] if isinstance(entry, tuple) else entry)
    return found


def _render(path: Tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{key!r}]" for key in path)


def check_state(state: Any) -> int:
    """Check that ``state`` would load with ``torch.load(weights_only=True)``.

    Returns the tensor payload in bytes (each storage counted once), the bulk of the file size.

    Raises:
        CheckpointStateError: naming the first offending object and where it sits.
    """
    return _inspect_state(state)[0]


def _inspect_state(state: Any) -> Tuple[int, List[Tuple[int, int]]]:
    """:func:`check_state`, plus the address ranges of the state's CPU tensor storages."""
    allowed = _exact_allowed_types()
    registered = _safe_globals()
    storages: Dict[Tuple[str, int], int] = {}
    on_path: Set[int] = set()

    def visit(obj: Any, path: Tuple[Any, ...]) -> None:
        kind = type(obj)
        if kind in (torch.Tensor, torch.nn.Parameter):
            try:
                storage = obj.untyped_storage()
                storages[(obj.device.type, storage.data_ptr())] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse / exotic layouts: no estimate
                pass
            return
        if kind not in allowed and kind not in registered:
            raise CheckpointStateError(
                f"{_render(path)} is a {kind.__module__}.{kind.__qualname__}, which "
                "torch.load(weights_only=True) would refuse; store plain tensors, numbers, "
                "strings, lists and dicts (or register the class with "
                "torch.serialization.add_safe_globals)"
            )
        if kind in (dict, collections.OrderedDict, collections.Counter, list, tuple, set):
            if id(obj) in on_path:
                raise CheckpointStateError(f"{_render(path)} contains itself (a reference cycle)")
            on_path.add(id(obj))
            if isinstance(obj, dict):
                for key, value in obj.items():
                    visit(key, (*path, key))
                    visit(value, (*path, key))
            else:
                for index, value in enumerate(obj):
                    visit(value, (*path, index))
            on_path.discard(id(obj))

    if not isinstance(state, dict):
        raise CheckpointStateError(f"a checkpoint state must be a dict, not {type(state).__name__}")
    visit(state, ())
    cpu = [(ptr, ptr + size) for (device, ptr), size in storages.items()
           if device == "cpu" and ptr != 0]
    return sum(storages.values()), cpu
