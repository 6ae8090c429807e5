"""The shared-memory snapshot slots, torch-free: written by the trainer (trainer/snapshot.py),
read by the daemon (supervise/snapshots.py) after the trainer died (issue 13).

A slot file is a :data:`HEADER_BYTES` JSON header (space-padded) followed by the payload: the
bytes of a ``torch.save`` stream, which the daemon commits as a checkpoint file unchanged. The
header is written twice per snapshot: ``complete: false`` before the payload, the full header
(generation, step, sha256 and size of the payload) after it. A reader takes only a complete
header whose payload hashes to its sha256, so a writer killed at any point leaves either the
previous snapshot of that slot invalid or the other slot's older one intact - never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

SHM_ROOT = Path("/dev/shm")
HEADER_BYTES = 4096
SLOTS = ("slot0", "slot1")
FORMAT = 1


def snapshot_dir(run_dir: Path, shm_root: Path = SHM_ROOT) -> Path:
    """``<shm>/session-watchdog-<uid>/<key of the run dir>``: one per run dir and user."""
    key = hashlib.sha256(str(Path(run_dir).absolute()).encode()).hexdigest()[:16]
    return shm_root / f"session-watchdog-{os.getuid()}" / key


def ranks_root(checkpoint_dir: Path, shm_root: Path = SHM_ROOT) -> Path:
    """``<shm>/session-watchdog-<uid>/ddp-<key of the checkpoint dir>``: the ranks' slot dirs.

    Keyed by the checkpoint directory, which every rank shares (``resume()`` needs it), not by
    the run dir: ranks may have one run dir each (``--run-dir-per-rank``), and the daemon must
    still find every rank of its node in one place.
    """
    key = hashlib.sha256(str(Path(checkpoint_dir).absolute()).encode()).hexdigest()[:16]
    return shm_root / f"session-watchdog-{os.getuid()}" / f"ddp-{key}"


def rank_dir(root: Path, rank: int) -> Path:
    """One rank's two slots under :func:`ranks_root`."""
    return root / f"rank{rank}"


def slot_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _header_bytes(header: Dict[str, Any]) -> bytes:
    raw = json.dumps({"format": FORMAT, **header}, sort_keys=True).encode()
    if len(raw) > HEADER_BYTES:
        raise ValueError("snapshot header too large")
    return raw.ljust(HEADER_BYTES, b" ")


def write_slot(path: Path, payload: Any, header: Dict[str, Any]) -> None:
    """Header ``complete: false`` -> payload -> full header (the commit). No fsync: tmpfs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.pwrite(fd, _header_bytes({"gen": header.get("gen"), "complete": False}), 0)
        view = memoryview(payload)
        os.ftruncate(fd, HEADER_BYTES + len(view))
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:offset + (64 << 20)], HEADER_BYTES + offset)
        os.pwrite(fd, _header_bytes({**header, "bytes": len(view), "complete": True}), 0)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Snapshot:
    """A complete, verified snapshot: its header and the payload bytes."""

    path: Path
    gen: int
    step: int
    epoch: int
    sha256: str
    payload: bytes
    header: Dict[str, Any]


def _read_header(fh: Any) -> Optional[Dict[str, Any]]:
    raw = fh.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        return None
    try:
        header = json.loads(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("complete") is not True:
        return None
    for key in ("gen", "step", "epoch", "bytes"):
        if not isinstance(header.get(key), int) or isinstance(header.get(key), bool):
            return None
    return header if isinstance(header.get("sha256"), str) else None


def read_header(path: Path) -> Optional[Dict[str, Any]]:
    """The slot's header when it says complete (the payload is not read nor checked)."""
    try:
        with open(path, "rb") as fh:
            return _read_header(fh)
    except OSError:
        return None


def read_slot(path: Path) -> Optional[Snapshot]:
    """The slot's snapshot when complete and intact, else None (torn, being written, absent)."""
    try:
        with open(path, "rb") as fh:
            header = _read_header(fh)
            if header is None:
                return None
            payload = fh.read(header["bytes"])
            fh.seek(0)
            again = _read_header(fh)  # a writer that started over meanwhile changed the header
    except OSError:
        return None
    if again != header or len(payload) != header["bytes"]:
        return None
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        return None
    return Snapshot(path, header["gen"], header["step"], header["epoch"], header["sha256"],
                    payload, header)


def newest(directory: Path) -> Optional[Snapshot]:
    """The complete snapshot of the highest generation in ``directory``, or None."""
    found: List[Snapshot] = []
    for name in SLOTS:
        snap = read_slot(directory / name)
        if snap is not None:
            found.append(snap)
    return max(found, key=lambda s: s.gen) if found else None


def shm_summary(shm_root: Path = SHM_ROOT) -> str:
    """For ``doctor``: the size of /dev/shm, which bounds the snapshots (two slots each)."""
    import shutil

    try:
        usage = shutil.disk_usage(shm_root)
    except OSError as err:
        return f"{shm_root} is not usable ({err.strerror or err}): Session(snapshot_every=...) is off"
    return (f"{shm_root}: {usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB "
            "(snapshots need twice the training state)")
