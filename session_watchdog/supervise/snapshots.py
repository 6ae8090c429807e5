"""Persist a dead trainer's newest shared-memory snapshot as an ordinary checkpoint (issue 13).

The trainer (trainer/snapshot.py) keeps its newest state as the bytes of a ``torch.save`` stream
in ``/dev/shm`` and names the place in ``trainer.json`` (``extra["snapshot"]``). When it died
without saving, this copies the newest *complete* slot (header last, sha256 checked:
snapshot_slots.py) into the checkpoint directory with the trainer's own protocol: temp file ->
fsync -> rename to ``<prefix>-<seq>-step<step>.pt`` -> fsync dir -> marker (ckptfile.py). The
restarted trainer's ``resume()`` then finds it like any checkpoint. Never while a trainer holds
run.lock (it may be writing); only a snapshot newer than the newest committed checkpoint.
No torch here: the bytes are copied, never unpickled.

Distributed (DDP): each rank has its own two slots under ``ranks_dir/rank<N>`` and the reporter
names the ranks of this node in ``extra["snapshot"]["ranks"]``. Rank 0's payload is the whole
checkpoint; it is committed only for a generation (job token, generation, step) that every one
of those ranks has complete and intact - the newest such one - never a mix of ranks at different
steps, never a slot an earlier run left behind (another job token), or nothing at all.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple

from session_watchdog import channel, ckptfile, snapshot_slots
from session_watchdog.log import get_logger

if TYPE_CHECKING:
    from session_watchdog.probes import Sample

log = get_logger()


def persist_after_death(run_dir: channel.RunDir, *, record: bool = False) -> Optional[int]:
    """The step of the snapshot committed as a checkpoint now, or None (nothing newer to keep).

    ``record``: trainer.json's ``last_checkpoint`` then names the committed checkpoint, so an end
    of the runtime verifies (and flushes to Drive) that one, the newest. Only for a trainer that
    no other will replace meanwhile (``run``'s own command), never one with a mirror: the end
    checks the final checkpoint on the mirror, and this one is not there.
    """
    try:
        status = run_dir.read_status()
        alive = run_dir.trainer_alive()
    except (channel.ChannelError, OSError):
        return None
    info = status.extra.get("snapshot") if status is not None else None
    if not isinstance(info, dict) or not isinstance(info.get("dir"), str):
        return None
    if alive:
        log.info("snapshot_not_persisted", reason="a trainer holds run.lock (it may be writing)")
        return None
    on_commit: Optional[Callable[[channel.CheckpointInfo], None]] = None
    if record and status is not None and channel.MirrorStatus.from_status(status) is None:
        on_commit = functools.partial(_record, run_dir, status)
    ranks = info.get("ranks")
    if isinstance(ranks, list) and isinstance(info.get("ranks_dir"), str):
        world_size = info.get("world_size")
        if not all(isinstance(r, int) for r in ranks) or not isinstance(world_size, int):
            log.warning("snapshot_not_persisted", reason="trainer.json names no valid ranks")
            return None
        return persist_ranks(Path(info["ranks_dir"]), ranks, world_size,
                             on_commit=on_commit)
    return persist_newest(Path(info["dir"]), on_commit=on_commit)


def _record(run_dir: channel.RunDir, dead: channel.TrainerStatus,
            ckpt: channel.CheckpointInfo) -> None:
    """trainer.json of the dead trainer ``dead``, its last checkpoint now ``ckpt``."""
    try:
        status = run_dir.read_status()
        if status is None or (status.pid, status.start_time) != (dead.pid, dead.start_time) \
                or run_dir.trainer_alive():
            return  # another trainer's by now: its own report stands
        run_dir.write_status(dataclasses.replace(status, last_checkpoint=ckpt))
    except (channel.ChannelError, OSError) as err:
        log.warning("snapshot_not_recorded", error=str(err), path=ckpt.path,
                    message="trainer.json still names the older checkpoint")


class PersistOnExit:
    """``run`` without ``--restarts``: the command's exit code as the daemon sees it, reported
    only once a failed command's snapshot is persisted.

    The exit is what lets the daemon end the runtime (``--end-on-failure``); a real end kills
    this process and empties /dev/shm, so the snapshot must be a checkpoint before the end can
    start, not after the daemon's loop (the supervisor of ``--restarts`` does the same). Like it,
    it waits (at most ``linger_s``) for run.lock to be free: forked DataLoader workers share the
    trainer's lock for a moment after it died.
    """

    def __init__(self, run_dir: channel.RunDir, exit_status: Callable[[], Optional[int]], *,
                 linger_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.run_dir = run_dir
        self._exit_status = exit_status
        self._linger_s = linger_s
        self._monotonic = monotonic
        self._lock = threading.Lock()  # the tick and the end's fresh sample both ask
        self._code: Optional[int] = None
        self._seen: Optional[float] = None  # monotonic: the exit was first seen

    def __call__(self) -> Optional[int]:
        """The exit code once the command ended and its snapshot (if any) is persisted."""
        with self._lock:
            if self._code is not None:
                return self._code
            code = self._exit_status()
            if code is None:
                return None
            if code not in (0, 75):  # 0: completed, 75: stopped after a durable checkpoint
                now = self._monotonic()
                if self._seen is None:
                    self._seen = now
                try:
                    alive = self.run_dir.trainer_alive()
                except (channel.ChannelError, OSError):
                    alive = False
                if alive and now - self._seen < self._linger_s:
                    return None
                persist_after_death(self.run_dir, record=True)
            self._code = code
            return code

    def wait(self) -> int:
        """The exit code of a command that has ended, once its snapshot is persisted."""
        while True:
            code = self()
            if code is not None:
                return code
            time.sleep(0.1)


class AfterDeath:
    """For a trainer the watchdog did not start (``attach``, notebook ``launch()`` or a Session in
    the kernel): persist its snapshot once it is gone without having saved, as ``run`` does when
    its child exits. Called with every tick's sample (``Watchdog.after_tick``).

    Once per trainer (pid + start time): when no process holds run.lock any more and its last
    state is neither ``completed`` nor ``stopped`` (those saved a checkpoint of their end).
    """

    def __init__(self, run_dir: channel.RunDir) -> None:
        self.run_dir = run_dir
        self._done: Set[Tuple[int, float]] = set()
        self.persisted: List[int] = []  # steps committed (for status and tests)

    def observe(self, sample: Sample) -> None:
        reading = sample.trainer
        status = reading.status
        if reading.alive or status is None or status.state in ("completed", "stopped"):
            return
        identity = (status.pid, status.start_time)
        if identity in self._done or not isinstance(status.extra.get("snapshot"), dict):
            return
        self._done.add(identity)
        try:
            step = persist_after_death(self.run_dir)
        except Exception as err:  # never let it fail the tick: the next tick must still run
            log.error("snapshot_persist_failed", error=f"{type(err).__name__}: {err}")
            return
        if step is not None:
            self.persisted.append(step)


def persist_newest(directory: Path, *, on_commit: Optional[Callable[[channel.CheckpointInfo], None]]
                   = None) -> Optional[int]:
    """Commit the newest complete snapshot in ``directory`` as a checkpoint; its step or None.

    ``on_commit`` is called with the committed checkpoint (the one of persist_ranks too)."""
    started = time.monotonic()
    snap = snapshot_slots.newest(directory)
    if snap is None:
        log.info("snapshot_not_persisted", reason="no complete snapshot", dir=str(directory))
        return None
    return _persist(snap, directory, started, on_commit)


_Key = Tuple[Any, int, int]  # (job token, generation, step): one snapshot of the whole job


def persist_ranks(root: Path, ranks: List[int], world_size: int, *,
                  on_commit: Optional[Callable[[channel.CheckpointInfo], None]] = None
                  ) -> Optional[int]:
    """Commit rank 0's snapshot of the newest generation complete on every rank in ``ranks``.

    Headers are read first (small); only the candidate generation's payloads are read and
    checked, one rank at a time, so the daemon never holds more than two payloads.
    """
    started = time.monotonic()
    if 0 not in ranks:
        log.info("snapshot_not_persisted", reason="rank 0's snapshot is on another node "
                 "(its watchdog persists it)", ranks=sorted(ranks))
        return None
    slots: Dict[int, Dict[_Key, Path]] = {}
    for rank in ranks:
        found: Dict[_Key, Path] = {}
        for name in snapshot_slots.SLOTS:
            path = snapshot_slots.rank_dir(root, rank) / name
            header = snapshot_slots.read_header(path)
            if header is not None and header.get("rank") == rank \
                    and header.get("world_size") == world_size:
                found[(header.get("job"), header["gen"], header["step"])] = path
        slots[rank] = found
    newest = {rank: max((k[2] for k in found), default=None) for rank, found in slots.items()}
    common = sorted(set.intersection(*(set(found) for found in slots.values())),
                    key=lambda k: (k[2], k[1]), reverse=True)
    for key in common:
        # every other rank's slot must still verify (sha256), then rank 0's payload is the one
        if all(_verified(slots[rank][key], key) is not None for rank in ranks if rank != 0):
            snap = _verified(slots[0][key], key)
            if snap is not None:
                if any(step != key[2] for step in newest.values()):
                    log.info("snapshot_generation_chosen", step=key[2], gen=key[1],
                             newest_per_rank={str(r): s for r, s in sorted(newest.items())},
                             reason="the newest generation every rank has complete")
                return _persist(snap, snapshot_slots.rank_dir(root, 0), started, on_commit)
    log.warning("snapshot_not_persisted", reason="no generation is complete on every rank",
                newest_per_rank={str(r): s for r, s in sorted(newest.items())}, dir=str(root))
    return None


def _verified(path: Path, key: _Key) -> Optional[snapshot_slots.Snapshot]:
    snap = snapshot_slots.read_slot(path)  # rewritten since the header was read: not the same
    if snap is None or (snap.header.get("job"), snap.gen, snap.step) != key:
        return None
    return snap


def _persist(snap: snapshot_slots.Snapshot, directory: Path, started: float,
             on_commit: Optional[Callable[[channel.CheckpointInfo], None]] = None
             ) -> Optional[int]:
    ckpt_dir = Path(str(snap.header.get("checkpoint_dir", "")))
    prefix = str(snap.header.get("prefix", "ckpt"))
    if not ckpt_dir.is_absolute() or not ckptfile.PREFIX_RE.match(prefix):
        log.warning("snapshot_not_persisted", reason="the snapshot names no valid checkpoint dir",
                    dir=str(directory))
        return None
    newest = ckptfile.newest_committed(ckpt_dir, prefix)
    if newest is not None and newest[1] >= snap.step:
        log.info("snapshot_not_persisted", step=snap.step, checkpoint_step=newest[1],
                 reason="a committed checkpoint is as new as the snapshot")
        return None
    try:
        path = _commit(ckpt_dir, prefix, snap)
    except OSError as err:
        log.error("snapshot_persist_failed", step=snap.step, error=f"{err.strerror or err}",
                  checkpoint_dir=str(ckpt_dir))
        return None
    log.warning("snapshot_persisted", step=snap.step, epoch=snap.epoch, path=str(path),
                bytes=len(snap.payload), sha256=snap.sha256,
                duration_s=round(time.monotonic() - started, 3),
                previous_checkpoint_step=None if newest is None else newest[1],
                message=f"the trainer died without saving; its snapshot of step {snap.step} is "
                        f"now the checkpoint {path.name}")
    if on_commit is not None:
        on_commit(channel.CheckpointInfo(
            path=str(path), seq=None, step=snap.step, at=time.time(),
            duration_s=round(time.monotonic() - started, 3), bytes=len(snap.payload),
            sha256=hashlib.sha256(snap.payload).hexdigest()))
    return snap.step


def _commit(ckpt_dir: Path, prefix: str, snap: snapshot_slots.Snapshot) -> Path:
    started = time.monotonic()
    seq = ckptfile.max_owned_seq(os.listdir(ckpt_dir), prefix) + 1
    final = ckpt_dir / ckptfile.final_name(prefix, seq, snap.step)
    tmp = channel.temp_path_for(final)
    fd = channel.open_exclusive(tmp)
    try:
        view = memoryview(snap.payload)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, final)
    channel.fsync_dir(ckpt_dir)
    digest = hashlib.sha256(snap.payload).hexdigest()  # checked by newest(); the marker's own
    channel.write_json(ckptfile.marker_path(final), ckptfile.marker_json(
        file=final.name, sha256=digest, size=len(snap.payload), step=snap.step, epoch=snap.epoch,
        at=time.time(), duration_s=time.monotonic() - started))
    return final
