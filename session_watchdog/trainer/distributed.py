"""Distributed training (torch.distributed): every rank takes the same decision at the same step.

A stop that only rank 0 sees deadlocks the other ranks in their next collective, and a checkpoint
that ranks take at different steps is useless. So, when a :class:`~session_watchdog.trainer.Session`
is built inside an initialized process group (torchrun, SLURM, ``torch.multiprocessing``), its
ranks combine their rank-local flags (``request.json`` seen by the poller, SIGTERM, SIGUSR1, the
periodic timer) with one small all-reduce (MAX) and act on the result together.

Pieces, used by ``session.py`` and usable on their own:

- :func:`setup` (collective, once per Session): finds which ranks share a run directory (a
  "group": one per node with the default node-local run dir, one per rank with per-rank run dirs)
  by a probe file each rank creates in its run dir, picks the lowest rank of each group as its
  *reporter* (the only process that writes ``trainer.json`` and acknowledges requests there), and
  checks that every rank was built with the same agreement settings (ranks that disagree about
  when to call a collective deadlock).
- :class:`Agreement`: the all-reduce itself, the object collectives a checkpoint needs, and a count
  of every collective issued (tests and benchmarks read it).
- :func:`next_window`: PURE - how many steps until the next agreement, from ``sync_every``,
  ``sync_interval_s`` and the step time the ranks agreed on at the previous one.
- :func:`session_state`, :func:`apply_session_state`, :func:`rank_rng`: the dict a Session saves
  with DCP and loads back, each rank's RNG states included.
- :class:`~session_watchdog.trainer.sharded.ShardedCheckpointer` (sharded.py): DCP saves into a
  fresh step directory, committed by a marker rank 0 writes last; its names (``COMMIT_MARKER``,
  ``ShardedCheckpoint``, ``ShardedCheckpointer``, ``ShardedCheckpointError``, ``is_initialized``)
  are importable from here as before.
- which ranks run on which GPU is the daemon's (``probes.ranks_on_gpus``, from NVML's per-GPU
  process lists and the ``extra["distributed"]["ranks"]`` this module publishes).

The agreement vector (int64, ``4 + groups`` entries, all-reduced with MAX)::

    [code * world_size + rank, step_time_us, step, -step, seq(group 0), seq(group 1), ...]

``code`` is the strongest local reason to act (:data:`PERIODIC` < :data:`REQUEST_CHECKPOINT` <
:data:`REQUEST_STOP` < :data:`SIGUSR1_STOP` < :data:`SIGTERM_STOP`), so MAX yields the action and
the rank it came from; ``step`` and ``-step`` give the largest and smallest step counter (they
must be equal); each group's slot carries the newest request seq any of its ranks saw, so every
rank of the group marks it handled and the reporter acknowledges it in *its* run dir (request
sequence numbers are per daemon, hence per run dir, never compared across groups).

Cadence: the all-reduce runs only at agreed steps, every ``window`` steps, where ``window`` is
``sync_every`` - or fewer when that many steps would take longer than ``sync_interval_s`` at the
step time agreed at the previous agreement. Triggering on a clock would let ranks call the
collective at different steps (deadlock), so the clock only ever shapes the *step count*, and only
through values all ranks received from the same all-reduce. A request therefore waits up to
``window x step_time`` before every rank acts on it; the reporter publishes that delay as
``extra["agree_delay_s"]`` in ``trainer.json`` for the daemon to add to its lead time.

This module imports torch lazily, inside the functions that need it: ``next_window`` is usable
from a process without torch.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from session_watchdog.channel import open_exclusive

# Names imported `X as X` are re-exported: defined in sharded.py, importable from here as before.
from session_watchdog.trainer.sharded import COMMIT_MARKER as COMMIT_MARKER
from session_watchdog.trainer.sharded import ShardedCheckpoint as ShardedCheckpoint
from session_watchdog.trainer.sharded import ShardedCheckpointer as ShardedCheckpointer
from session_watchdog.trainer.sharded import ShardedCheckpointError as ShardedCheckpointError
from session_watchdog.trainer.sharded import is_initialized as is_initialized

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMMIT_MARKER",
    "DEFAULT_SYNC_EVERY",
    "DEFAULT_SYNC_INTERVAL_S",
    "Agreed",
    "Agreement",
    "DistributedError",
    "RankInfo",
    "ShardedCheckpoint",
    "ShardedCheckpointer",
    "ShardedCheckpointError",
    "is_initialized",
    "next_window",
    "setup",
]

DEFAULT_SYNC_EVERY = 50
DEFAULT_SYNC_INTERVAL_S = 10.0

# Reasons to act at an agreement, weakest first: the all-reduce MAX picks the strongest.
NOTHING = 0
PERIODIC = 1
REQUEST_CHECKPOINT = 2
REQUEST_STOP = 3
SIGUSR1_STOP = 4
SIGTERM_STOP = 5
CODE_NAMES = {NOTHING: "nothing", PERIODIC: "periodic", REQUEST_CHECKPOINT: "request:checkpoint",
              REQUEST_STOP: "request:stop", SIGUSR1_STOP: "SIGUSR1", SIGTERM_STOP: "SIGTERM"}
_FIXED_SLOTS = 4  # code*world+rank, step_time_us, step, -step; then one seq slot per group

_PROBE_SUFFIX = ".probe"

_log = logging.getLogger(__name__)


def _event(level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with fields, the way session.py does (record.event / record.fields)."""
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


class DistributedError(Exception):
    """The ranks cannot agree (different settings on different ranks, an unusable group)."""


# --------------------------------------------------------------------------------------------
# Pure helpers


def next_window(sync_every: int, sync_interval_s: Optional[float],
                step_time_s: Optional[float], previous: int) -> int:
    """Steps from one agreement to the next (PURE; every rank computes it from agreed values).

    Args:
        sync_every: the most steps between two agreements.
        sync_interval_s: the most seconds between two agreements, or None for steps only.
        step_time_s: the step time agreed at the agreement just made (the slowest rank's), or
            None when not measured yet.
        previous: the window that just ended (0 before the first agreement).

    Returns:
        ``sync_every`` without ``sync_interval_s``; otherwise ``floor(sync_interval_s /
        step_time_s)`` clamped to ``[1, sync_every]``; while the step time is unknown the window
        doubles from 1 (1, 2, 4, ...), so a job with slow steps is not blind for ``sync_every``
        steps at its start.
    """
    if sync_interval_s is None:
        return sync_every
    if step_time_s is None or not step_time_s > 0:
        return max(1, min(sync_every, 2 * previous))
    return max(1, min(sync_every, int(math.floor(sync_interval_s / step_time_s))))


# --------------------------------------------------------------------------------------------
# torch.distributed access


def _collective_device(group: Any) -> torch.device:
    """Where the agreement tensor lives: CPU for gloo (and gloo-capable mixes), else the GPU."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    # NCCL reduces CUDA tensors only; the current device is the rank's own (torch.cuda.set_device
    # is part of every NCCL setup, and the object collectives rely on it as well).
    return torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class RankInfo:
    """One rank as the others see it (reported by reporters in ``trainer.json``)."""

    rank: int
    pid: int
    host: str
    group: int  # index of the run-dir group
    device: Optional[int]  # CUDA device index in use, None on CPU


@dataclass(frozen=True)
class Agreed:
    """What all ranks decided at one agreement (identical on every rank)."""

    code: int  # the strongest reason any rank had (NOTHING .. SIGTERM_STOP)
    source_rank: int  # the (highest) rank that had it
    seq: int  # newest request seq seen by any rank of *this* rank's group (0: none)
    step_time_s: Optional[float]  # the slowest rank's step time since the last agreement
    steps_agree: bool  # every rank called it at the same step counter


class Agreement:
    """This rank's link to the others: the agreement all-reduce and the collectives of a save.

    Built by :func:`setup`; every method is a collective that all ranks must call in the same
    order (the training thread only: collectives from another thread would interleave).

    Attributes:
        rank, world_size: this rank and the number of ranks.
        group_index: which run-dir group this rank belongs to; ``group_ranks`` lists its ranks.
        groups: how many groups there are (the length of the seq part of the vector).
        reporter: whether this rank writes ``trainer.json`` and acks in its run dir.
        members: every rank (pid, host, group, device), in rank order.
        collectives: collectives issued so far by this object (all kinds).
        agreements: agreement all-reduces issued so far.
    """

    def __init__(self, *, rank: int, world_size: int, group_index: int, groups: int,
                 group_ranks: Sequence[int], members: Sequence[RankInfo],
                 process_group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group_index = group_index
        self.groups = groups
        self.group_ranks = list(group_ranks)
        self.reporter = rank == min(self.group_ranks)
        self.members = list(members)
        self.process_group = process_group
        self.collectives = 0
        self.agreements = 0
        self._device: Optional[torch.device] = None

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = _collective_device(self.process_group)
        return self._device

    def exchange(self, *, code: int, seq: int, step: int,
                 step_time_s: Optional[float]) -> Agreed:
        """The agreement: one all-reduce (MAX) of this rank's flags with everybody's."""
        import torch
        import torch.distributed as dist

        vector = [0] * (_FIXED_SLOTS + self.groups)
        vector[0] = code * self.world_size + self.rank
        vector[1] = 0 if step_time_s is None else max(0, int(round(step_time_s * 1e6)))
        vector[2] = step
        vector[3] = -step
        vector[_FIXED_SLOTS + self.group_index] = max(0, seq)
        tensor = torch.tensor(vector, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.process_group)
        self.collectives += 1
        self.agreements += 1
        out = tensor.tolist()
        top = int(out[0])
        return Agreed(code=top // self.world_size, source_rank=top % self.world_size,
                      seq=int(out[_FIXED_SLOTS + self.group_index]),
                      step_time_s=(out[1] / 1e6) if out[1] > 0 else None,
                      steps_agree=out[2] == -out[3])

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (pickled; small objects only)."""
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        self.collectives += 1
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (pickled; small objects only)."""
        return _all_gather(obj, self.world_size, self.process_group, self)

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.process_group)
        self.collectives += 1
        return int(tensor.item()) == 0

    def barrier(self) -> None:
        """Wait until every rank got here (an all-reduce: works on every backend)."""
        self.all_ok(True)

    def describe(self) -> Dict[str, Any]:
        """The ``trainer.json`` ``extra["distributed"]`` object a reporter publishes."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "group": self.group_index,
            "groups": self.groups,
            "ranks": [{"rank": m.rank, "pid": m.pid, "host": m.host, "device": m.device}
                      for m in self.members if m.group == self.group_index],
        }


def _all_gather(obj: Any, world_size: int, group: Any, counter: Optional[Agreement]) -> List[Any]:
    import torch.distributed as dist

    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    if counter is not None:
        counter.collectives += 1
    return out


def _current_device_index() -> Optional[int]:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return int(torch.cuda.current_device())
    return None


def setup(run_dir: Path, settings: Mapping[str, Any], process_group: Any = None) -> Agreement:
    """Collective, once per Session on every rank: find the run-dir groups, check the settings.

    Ranks share a run dir when they see each other's probe file in it (``.<token>-<rank>.probe``,
    a token fresh for this call): that works for node-local dirs, per-rank dirs and a dir on a
    filesystem shared between nodes alike, where host names would not tell.

    Raises:
        DistributedError: the ranks were built with different ``settings`` (on every rank).
    """
    import torch.distributed as dist

    rank = dist.get_rank(process_group)
    world_size = dist.get_world_size(process_group)
    box = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=process_group)
    token = str(box[0])
    probe = Path(run_dir) / f".{token}-{rank}{_PROBE_SUFFIX}"
    os.close(open_exclusive(probe))
    try:
        dist.barrier(group=process_group)
        pattern = re.compile(rf"^\.{re.escape(token)}-(\d+){re.escape(_PROBE_SUFFIX)}$")
        sharing = sorted(int(m.group(1)) for m in map(pattern.match, os.listdir(run_dir)) if m)
        if rank not in sharing:  # pragma: no cover - listing our own file cannot miss it
            sharing.append(rank)
        mine = {"sharing": sharing, "pid": os.getpid(), "host": socket.gethostname(),
                "device": _current_device_index(), "settings": dict(settings)}
        everyone = _all_gather(mine, world_size, process_group, None)
    finally:
        # Every rank listed the directory before it contributed to the gather: safe to remove.
        try:
            os.unlink(probe)
        except FileNotFoundError:
            pass
    differing = {r: e["settings"] for r, e in enumerate(everyone) if e["settings"] != settings}
    if differing:
        raise DistributedError(
            f"ranks disagree on the Session settings that decide when they synchronise: rank "
            f"{rank} has {dict(settings)}, others {differing}; build every rank's Session alike")
    leaders = sorted({min(e["sharing"]) for e in everyone})
    index_of = {leader: index for index, leader in enumerate(leaders)}
    members = [RankInfo(rank=r, pid=int(e["pid"]), host=str(e["host"]),
                        group=index_of[min(e["sharing"])], device=e["device"])
               for r, e in enumerate(everyone)]
    me = members[rank]
    agreement = Agreement(rank=rank, world_size=world_size, group_index=me.group,
                          groups=len(leaders), group_ranks=[m.rank for m in members
                                                            if m.group == me.group],
                          members=members, process_group=process_group)
    if agreement.reporter:
        _sweep_probes(Path(run_dir), keep=token)
    _event(logging.INFO, "distributed_setup", rank=rank, world_size=world_size,
           group=me.group, groups=len(leaders), reporter=agreement.reporter,
           group_ranks=agreement.group_ranks)
    return agreement


def _sweep_probes(run_dir: Path, keep: str) -> None:
    """Remove probe files a rank killed during setup left behind (other tokens than ours)."""
    for name in os.listdir(run_dir):
        if name.endswith(_PROBE_SUFFIX) and name.startswith(".") and f".{keep}-" not in name:
            try:
                os.unlink(run_dir / name)
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------------
# The Session's sharded state (used by session.py)


def _opaque(obj: Any) -> Tuple[Any]:
    """One DCP entry for a whole object: DCP walks into dicts and lists, never into a tuple
    (``_traverse._is_terminal``), and stores a non-tensor leaf with torch.save."""
    return (obj,)


_PLACEHOLDER = (None,)  # an entry to load into: DCP replaces non-tensor leaves whole


def _unwrap(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) and len(value) == 1 else None


def session_state(*, model: Any, optimizer: Any, scheduler: Any, scaler: Any, rank: int,
                  meta: Optional[Dict[str, Any]], rng: Optional[Dict[str, Any]],
                  saved_world_size: Optional[int] = None) -> Dict[str, Any]:
    """The dict a Session saves with DCP (``meta`` given) or loads into (``meta`` None).

    Model and optimizer go through ``get_state_dict`` (sharded tensors for FSDP, plain ones -
    written once - for DDP or a bare module). Scheduler, scaler and the session's meta (step,
    epoch, elapsed, extras) are rank 0's, stored as one opaque entry each so a resumed run need
    not know their keys in advance; every rank stores its own RNG states under ``rng.rank<N>``.
    """
    state: Dict[str, Any] = {}
    if model is not None:
        msd, osd = _get_state_dicts(model, optimizer)
        state["model"] = msd
        if osd is not None:
            state["optimizer"] = osd
    loading = meta is None
    if loading or rank == 0:
        for key, obj in (("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None:
                state[key] = _PLACEHOLDER if loading else _opaque(obj.state_dict())
        state["meta"] = _PLACEHOLDER if loading else _opaque(meta)
    if loading:
        if saved_world_size is not None and rank < saved_world_size:
            state[f"rng.rank{rank}"] = _PLACEHOLDER
    elif rng is not None:
        state[f"rng.rank{rank}"] = _opaque(rng)
    return state


def _get_state_dicts(model: Any, optimizer: Any) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    try:  # torch >= 2.2: FSDP-aware, FQN keys (DDP's "module." prefix dropped)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    except ImportError:  # pragma: no cover - torch 2.1
        return model.state_dict(), None if optimizer is None else optimizer.state_dict()
    if optimizer is None:
        return get_model_state_dict(model), None
    msd, osd = get_state_dict(model, optimizer)
    return msd, osd


def apply_session_state(state: Dict[str, Any], *, model: Any, optimizer: Any, scheduler: Any,
                        scaler: Any) -> Dict[str, Any]:
    """Load what :func:`session_state` (loading form) received into the objects; return meta."""
    if model is not None:
        try:
            from torch.distributed.checkpoint.state_dict import (
                set_model_state_dict,
                set_state_dict,
            )
        except ImportError:  # pragma: no cover - torch 2.1
            model.load_state_dict(state["model"])
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
        else:
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"])
            else:
                set_model_state_dict(model, state["model"])
    for key, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            obj.load_state_dict(_unwrap(state[key]))
    meta = _unwrap(state["meta"])
    if not isinstance(meta, dict):
        raise ShardedCheckpointError("the checkpoint holds no session meta (not a Session's)")
    return meta


def rank_rng(state: Dict[str, Any], rank: int) -> Optional[Dict[str, Any]]:
    """This rank's RNG states from a loaded :func:`session_state`, or None."""
    value = _unwrap(state.get(f"rng.rank{rank}"))
    return value if isinstance(value, dict) else None
