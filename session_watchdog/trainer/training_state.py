"""Training state <-> checkpoint dict: :func:`capture_state` and :func:`restore_state`, the
state dicts of model, optimizer, scheduler and scaler and every RNG state, as data that
``torch.load(weights_only=True)`` loads.

Importable from ``session_watchdog.trainer.checkpoint`` as before.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

import torch

from session_watchdog.trainer.checkpoint_types import CheckpointError

__all__ = ["STATE_FORMAT", "capture_state", "restore_state"]

STATE_FORMAT = 1  # version of the dict built by capture_state


# --------------------------------------------------------------------------------------------
# Training state <-> checkpoint dict


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for the trainer
        return None
    return numpy


def capture_state(
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int,
    step: int,
    elapsed_s: float,
    extras: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Everything needed to resume training bit-identically, as weights-only-loadable data.

    State dicts of the given objects (None ones omitted) and the RNG states of Python, numpy
    (when importable), torch CPU and every CUDA device (when available). Python's and numpy's
    RNG states are tuples with numpy arrays, which ``weights_only`` loading refuses, so they are
    stored as plain ints and lists and converted back by :func:`restore_state`.
    """
    state: Dict[str, Any] = {"format": STATE_FORMAT}
    for key, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                     ("scaler", scaler)):
        if obj is not None:
            state[key] = obj.state_dict()
    version, internal, gauss = random.getstate()
    rng: Dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        rng["numpy"] = {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    # Only when this process has used CUDA: querying the states would otherwise create a CUDA
    # context (hundreds of MB per GPU) in a run that trains on the CPU.
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state["rng"] = rng
    state["epoch"] = int(epoch)
    state["step"] = int(step)
    state["elapsed_s"] = float(elapsed_s)
    state["extras"] = dict(extras) if extras else {}
    return state


def restore_state(
    state: Dict[str, Any],
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> Dict[str, Any]:
    """Load the given objects' state dicts and every RNG state from a :func:`capture_state` dict.

    Returns:
        ``{"epoch", "step", "elapsed_s", "extras"}`` from the checkpoint.

    Raises:
        CheckpointError: the dict is not from capture_state, or lacks a requested part.
    """
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"checkpoint state format {state.get('format')!r} is not {STATE_FORMAT}; "
            "it was not written by capture_state()"
        )
    for key, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                     ("scaler", scaler)):
        if obj is None:
            continue
        if key not in state:
            raise CheckpointError(f"the checkpoint has no {key} state to restore")
        obj.load_state_dict(state[key])
    rng = state.get("rng", {})
    if "python" in rng:
        py = rng["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    np = _numpy()
    if np is not None and "numpy" in rng:
        nps = rng["numpy"]
        np.random.set_state((nps["kind"], np.array(nps["keys"], dtype=np.uint32), nps["pos"],
                             nps["has_gauss"], nps["cached_gaussian"]))
    if "cuda" in rng and torch.cuda.is_available():
        states = [s.cpu() for s in rng["cuda"]][: torch.cuda.device_count()]
        for index, cuda_state in enumerate(states):
            torch.cuda.set_rng_state(cuda_state, index)
    return {
        "epoch": state["epoch"],
        "step": state["step"],
        "elapsed_s": state["elapsed_s"],
        "extras": state.get("extras", {}),
    }

