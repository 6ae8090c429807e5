"""Persist a dead trainer's newest shared-memory snapshot as an ordinary checkpoint (issue 13).

The trainer (trainer/snapshot.py) keeps its newest state as the bytes of a ``torch.save`` stream
in ``/dev/shm`` and names the place in ``trainer.json`` (``extra["snapshot"]``). When it died
without saving, this copies the newest *complete* slot (header last, sha256 checked:
snapshot_slots.py) into the checkpoint directory with the trainer's own protocol: temp file ->
fsync -> rename to ``<prefix>-<seq>-step<step>.pt`` -> fsync dir -> marker (ckptfile.py). The
restarted trainer's ``resume()`` then finds it like any checkpoint. Never while a trainer holds
run.lock (it may be writing); only a snapshot newer than the newest committed checkpoint.
No torch here: the bytes are copied, never unpickled.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Optional

from session_watchdog import channel, ckptfile, snapshot_slots
from session_watchdog.log import get_logger

log = get_logger()


def persist_after_death(run_dir: channel.RunDir) -> Optional[int]:
    """The step of the snapshot committed as a checkpoint now, or None (nothing newer to keep)."""
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
    return persist_newest(Path(info["dir"]))


def persist_newest(directory: Path) -> Optional[int]:
    """Commit the newest complete snapshot in ``directory`` as a checkpoint; its step or None."""
    started = time.monotonic()
    snap = snapshot_slots.newest(directory)
    if snap is None:
        log.info("snapshot_not_persisted", reason="no complete snapshot", dir=str(directory))
        return None
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
