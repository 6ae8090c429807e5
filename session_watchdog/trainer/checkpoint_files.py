"""The checkpoint directory's files, without torch: opening the directory (refused on storage
that is not mounted), a marker's JSON back to a :class:`SavedCheckpoint`
(:func:`checkpoint_from_marker`, the mirror's too), and removing, renaming and sizing whatever
sits at a name without following links (issue 18).

``checkpoint_from_marker`` is importable from ``session_watchdog.trainer.checkpoint`` as before.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from session_watchdog import checksum, ckptfile, mounts
from session_watchdog.trainer.checkpoint_types import CheckpointDirError, SavedCheckpoint

__all__ = ["MARKER_SUFFIX", "checkpoint_from_marker"]

MARKER_SUFFIX = ckptfile.MARKER_SUFFIX


@dataclass(frozen=True)
class _Entry:
    """A file in the checkpoint directory that has a checkpoint's final name."""

    seq: int
    step: int
    path: Path

    @property
    def marker(self) -> Path:
        return self.path.with_name(self.path.name + MARKER_SUFFIX)


def _open_directory(directory: Path, mount_roots: Sequence[mounts.MountRoot]) -> None:
    """Create ``directory`` (0700) unless it is on unmounted storage; errors are one line."""
    root = mounts.unmounted_root(directory, mount_roots)
    if root is not None:
        raise CheckpointDirError(mounts.unmounted_message(directory, root))
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:  # EACCES, EROFS, ENOTDIR, ENOSPC: say which and what to do
        raise CheckpointDirError(f"cannot create {directory}: {err.strerror or err}; choose a "
                                 "directory you can write") from None
    if not directory.is_dir():
        raise CheckpointDirError(f"{directory} is not a directory; choose a directory for the "
                                 "checkpoints")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointDirError(f"cannot write to {directory}: Permission denied; choose a "
                                 "directory you can write")


def checkpoint_from_marker(obj: Dict[str, Any], path: Path, step: int) -> Optional[SavedCheckpoint]:
    """The checkpoint a marker's JSON describes for the file ``path`` (named for ``step``).

    None when the marker is malformed or names another file or step. The file itself is not
    looked at (the mirror reads markers of files on other tiers with this, trainer/mirror.py).
    """
    recorded = checksum.for_record(obj)  # "checksum", or "sha256" of older markers
    if recorded is None or ("checksum" in obj and "sha256" in obj):
        return None  # none, malformed, or two that could disagree
    try:
        saved = SavedCheckpoint(
            path=path,
            step=_field(obj, "step", int),
            epoch=_field(obj, "epoch", int),
            bytes=_field(obj, "bytes", int),
            sha256=recorded[len("sha256:"):] if recorded.startswith("sha256:") else "",
            duration_s=float(_field(obj, "duration_s", (int, float), default=0.0)),
            at=float(_field(obj, "at", (int, float))),
            checksum=recorded,
        )
    except (KeyError, TypeError):
        return None
    if obj.get("file", path.name) != path.name or saved.step != step or saved.bytes <= 0:
        return None
    return saved


def _field(obj: Dict[str, Any], key: str, kind: Any, default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(key)
    return value


def _regular_size(path: Path) -> int:
    """The size of a regular file at ``path`` (never followed); 0 for anything else or nothing."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _is_regular_or_missing(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def _remove_any(path: Path) -> None:
    """Remove a file, symlink, FIFO or directory tree at ``path`` (never following links)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        # rmtree works on directory fds here (shutil.rmtree.avoids_symlink_attacks): a symlink
        # planted inside is removed, never followed.
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def _rename_quietly(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _close_and_unlink(fd: int, path: Path) -> None:
    try:
        os.close(fd)
    finally:
        _unlink_quietly(path)
