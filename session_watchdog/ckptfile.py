"""Checkpoint file names and commit markers, torch-free (issue 13).

Shared by the trainer's :mod:`session_watchdog.trainer.checkpoint` (which writes checkpoints with
torch) and the daemon's :mod:`session_watchdog.supervise.snapshots` (which commits a dead
trainer's snapshot bytes as a checkpoint and must never import torch). One definition, so a
checkpoint the daemon writes is one the trainer resumes from.

A checkpoint is ``<prefix>-<seq:08d>-step<step>.pt``; it counts once its marker
``<name>.sha256`` (JSON ``{v, file, checksum, bytes, step, epoch, at, duration_s}``; markers of
older versions hold ``sha256`` instead of ``checksum``) exists and agrees with the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional, Pattern, Tuple

from session_watchdog import channel
from session_watchdog import checksum as checksums

MARKER_SUFFIX = ".sha256"
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def final_name(prefix: str, seq: int, step: int) -> str:
    return f"{prefix}-{seq:08d}-step{step}.pt"


def final_re(prefix: str) -> Pattern[str]:
    """Matches a committed checkpoint's file name; groups: seq, step."""
    return re.compile(rf"^{re.escape(prefix)}-(\d{{8,}})-step(\d+)\.pt$")


def owned_re(prefix: str) -> Pattern[str]:
    """Any name that uses a sequence number (files, markers, temps, broken): group seq."""
    return re.compile(rf"^\.?{re.escape(prefix)}-(\d{{8,}})-step\d+\.pt")


def marker_json(*, file: str, size: int, step: int, epoch: int, at: float, duration_s: float,
                sha256: str = "", checksum: str = "") -> Dict[str, Any]:
    """A commit marker recording ``checksum`` (``"crc32c:<hex>"``, session_watchdog/checksum.py)
    or, as markers did before checksums, a bare ``sha256`` hex."""
    return {"v": channel.SCHEMA_VERSION, "file": file,
            **checksums.record_fields(checksum or sha256), "bytes": size,
            "step": step, "epoch": epoch, "at": at, "duration_s": duration_s}


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def max_owned_seq(names: Any, prefix: str) -> int:
    pattern = owned_re(prefix)
    best = 0
    for name in names:
        match = pattern.match(name)
        if match is not None:
            best = max(best, int(match.group(1)))
    return best


def newest_committed(directory: Path, prefix: str) -> Optional[Tuple[int, int, Path]]:
    """(seq, step, path) of the newest checkpoint whose marker names it with its size; no hash."""
    pattern = final_re(prefix)
    found = []
    try:
        names = list(Path(directory).iterdir())
    except OSError:
        return None
    for path in names:
        match = pattern.match(path.name)
        if match is not None:
            found.append((int(match.group(1)), int(match.group(2)), path))
    for seq, step, path in sorted(found, reverse=True):
        try:
            marker = channel.read_json(marker_path(path))
            size = path.stat().st_size
        except (channel.ChannelError, OSError):
            continue
        if marker is not None and marker.get("file") == path.name and marker.get("bytes") == size \
                and marker.get("step") == step:
            return seq, step, path
    return None
