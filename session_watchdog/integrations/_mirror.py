"""Mirrors of committed checkpoint directories (``checkpoint-N/`` with ``WATCHDOG_COMMITTED.json``).

The framework callbacks' checkpoints are directories committed by a marker written last
(``_core.commit_dir``). :class:`DirMirror` is trainer/mirror.py's :class:`Mirror` with a directory
as the unit of copy: every file the marker lists is streamed to ``<mirror>/checkpoint-N/<file>``,
fsynced, read back *from the target* and compared with the marker's size and sha256; then the
marker itself, byte for byte, is written last (on an object store the marker object is the
commit). Everything else is the file mirror's: one copy at a time, skip to the newest, keep-last-K
on the mirror (markers deleted first; the newest verified copy is never deleted before a newer one
verified), failures as warnings with a retry, ``trainer.json``'s ``last_mirrored`` (the marker on
the mirror: the daemon re-hashes it before ending the runtime). A step saved again (another
commit of ``checkpoint-N``) is copied and read back under ``.staging-checkpoint-N`` first and only
then replaces the committed directory of that name.

:func:`restore_dir` is the resume side: when the mirror's newest committed directory is newer than
every committed one in the local directory, it is copied down into a temp directory, checked with
``_core.verify_dir`` and only then renamed to ``checkpoint-N``. A directory on the mirror without
its marker (a copy cut short) is never a candidate.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Set, Tuple, Union

import psutil

from session_watchdog import channel
from session_watchdog.channel import fsync_dir
from session_watchdog.integrations._core import (
    COMMIT_MARKER,
    CommittedDir,
    newest_committed,
    verify_dir,
)
from session_watchdog.trainer.mirror import (
    Mirror,
    MirroredCheckpoint,
    MirrorError,
    Target,
    _Candidate,
    _File,
    _Unit,
)
from session_watchdog.trainer.mirror_targets import MISMATCH, redact
from session_watchdog.trainer.session import _event

__all__ = ["CHECKPOINT_PATTERN", "DirMirror", "restore_dir"]

CHECKPOINT_PATTERN = r"^checkpoint-(\d+)$"
_MARKER_MAX_BYTES = 8 << 20
_RESTORE_INFIX = ".restore-"
_STAGE_PREFIX = ".staging-"  # on the mirror: never a checkpoint name (CHECKPOINT_PATTERN)


@dataclass
class _LocalDirs:
    """The local tier as :class:`Mirror` sees it (``CheckpointManager``'s attributes it uses)."""

    directory: Path
    keep: int
    _last_seq: int = 0
    found: Optional[CommittedDir] = field(default=None)  # the newest committed, once looked up


class DirMirror(Mirror):
    """A :class:`~session_watchdog.trainer.mirror.Mirror` of committed checkpoint directories.

    Args:
        target, keep, storage_options, allow_same_filesystem: as for ``Mirror``.
        pattern: the directories' names, the step in group 1 (``checkpoint-N``).
    """

    _marker_max_bytes = _MARKER_MAX_BYTES  # commit_dir's markers list every file

    def __init__(self, target: Union[str, os.PathLike[str], Target], *,
                 keep: Optional[int] = None, storage_options: Optional[Mapping[str, Any]] = None,
                 allow_same_filesystem: bool = False, pattern: str = CHECKPOINT_PATTERN) -> None:
        super().__init__(target, keep=keep, storage_options=storage_options,
                         allow_same_filesystem=allow_same_filesystem)
        self._regex = re.compile(pattern)
        self._staging: Optional[str] = None  # where _copy puts a directory that replaces one

    def attach_dir(self, directory: Union[str, os.PathLike[str]], keep: int,
                   on_change: Any = None) -> None:
        """Start mirroring the committed directories under ``directory``."""
        self.attach(_LocalDirs(Path(os.path.abspath(directory)), keep),  # type: ignore[arg-type]
                    on_change)

    # ---- the unit of copy: a committed directory ------------------------------------------

    def accepts(self, saved: Any) -> bool:
        return isinstance(saved, CommittedDir)

    def _parse(self, name: str) -> Optional[Tuple[int, int]]:
        match = self._regex.match(name)
        if match is None:
            return None
        step = int(match.group(1))
        return step, step

    def _seq_of(self, saved: Any) -> int:
        return int(saved.step)

    def _marker_of(self, name: str) -> str:
        return f"{name}/{COMMIT_MARKER}"

    def _marked(self, names: Set[str]) -> Set[str]:
        return {n for n in names
                if self._parse(n) is not None and self.target.exists(self._marker_of(n))}

    def _valid_marker(self, obj: Dict[str, Any], name: str, step: int) -> bool:
        files = obj.get("files")
        if type(obj.get("step")) is not int or not isinstance(files, dict):
            return False
        for rel, entry in files.items():
            if not _safe_rel(rel) or not isinstance(entry, dict) \
                    or type(entry.get("bytes")) is not int or not isinstance(entry.get("sha256"), str):
                return False
        return True

    def _copy(self, saved: Any, committed: float) -> MirroredCheckpoint:
        """Another commit of this step, committed on the mirror (the step saved again), stays
        there until the new one verified: the new one is copied and read back under a staging
        name first, then takes its place (its marker written last, as always)."""
        unit = self._unit(saved)
        marker = unit.marker_name
        if not self.target.exists(marker) \
                or b"".join(self.target.read_chunks(marker)) == unit.marker_bytes:
            return super()._copy(saved, committed)  # a failed read raises: retried, kept
        self._staging = _STAGE_PREFIX + unit.name
        try:
            result = super()._copy(saved, committed)
        finally:
            self._staging = None
        stage = _STAGE_PREFIX + unit.name
        self.target.delete(self._marker_of(stage))
        self.target.delete(marker)  # the other commit: uncommitted first, then gone
        self.target.delete_tree(unit.name)
        self.target.rename_tree(stage, unit.name)
        self.target.write_marker(marker, unit.marker_bytes)
        return result

    def _unit(self, saved: Any) -> _Unit:
        directory: Path = saved.directory
        name = directory.name
        marker_path = directory / COMMIT_MARKER
        try:
            raw = marker_path.read_bytes()
        except FileNotFoundError as err:
            raise MirrorError("error", f"{marker_path} is gone (pruned locally before it could "
                              "be mirrored)") from err
        obj = _loads(raw)
        if not self._valid_marker(obj, name, int(saved.step)):
            raise MirrorError(MISMATCH, f"{marker_path} is not a valid commit marker")
        where = self._staging or name  # copied under the staging name, reported under its own
        files = [_File(f"{where}/{rel}", directory / rel, int(entry["bytes"]), str(entry["sha256"]))
                 for rel, entry in sorted(obj["files"].items())]
        return _Unit(where, files, self._marker_of(where), raw, self._marker_of(name),
                     saved.sha256, int(saved.bytes))

    def _checksum_of(self, saved: Any) -> str:
        return str(saved.sha256)

    def _before_copy(self, unit: _Unit) -> bool:
        """This very commit already there (the same marker bytes): True, it is only read back.
        Else a directory of that name on the mirror goes first, its marker before its files:
        what a copy cut short left (another save of that step is staged: ``_copy``)."""
        if unit.name.startswith(_STAGE_PREFIX):  # what an earlier staging cut short left
            self.target.delete_tree(unit.name)
            return False
        if self.target.exists(unit.marker_name):
            # A marker that cannot be read (a transient error) raises: that copy may be the
            # only one, verified before; it is never deleted on a failed read.
            if b"".join(self.target.read_chunks(unit.marker_name)) == unit.marker_bytes:
                return True
            self.target.delete(unit.marker_name)
        self.target.delete_tree(unit.name)
        return False

    def _delete_unit(self, name: str) -> None:
        self.target.delete_tree(name)

    def _prune(self, newest_seq: int) -> None:
        super()._prune(newest_seq)
        try:  # staging directories a killed copy left (never the one being staged now)
            for name in self.target.names():
                if name.startswith(_STAGE_PREFIX) and name != self._staging:
                    self.target.delete_tree(name)
        except Exception as err:  # retried at the next prune
            _event(logging.WARNING, "mirror_prune_failed", target=self.location, error=str(err))

    # ---- resume ---------------------------------------------------------------------------

    def _local_top(self, manager: Any) -> int:
        found = newest_committed(manager.directory, self._regex.pattern)
        manager.found = found
        return 0 if found is None else found.step

    def _copy_down(self, manager: Any, cand: _Candidate) -> Tuple[str, str, int]:
        """Copy ``cand`` into a temp directory, check it with ``verify_dir``, rename it."""
        parent: Path = manager.directory
        parent.mkdir(parents=True, exist_ok=True)
        _sweep_restores(parent)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(cand.name), dir=parent))
        try:
            raw = b"".join(self.target.read_chunks(self._marker_of(cand.name)))
            if len(raw) > _MARKER_MAX_BYTES:
                raise MirrorError(MISMATCH, f"{self.target.join(self._marker_of(cand.name))} is "
                                  "too large for a marker")
            obj = _loads(raw)
            if not self._valid_marker(obj, cand.name, cand.step):
                raise MirrorError(MISMATCH, f"{self.target.join(self._marker_of(cand.name))} "
                                  "is not a valid commit marker")
            for rel in sorted(obj["files"]):
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "xb") as out:
                    for block in self.target.read_chunks(f"{cand.name}/{rel}"):
                        out.write(block)
            channel.atomic_write(tmp / COMMIT_MARKER, raw)
            found = verify_dir(tmp)  # fsyncs nothing; commit_dir's hashing, read back locally
            if found is None:
                raise MirrorError(MISMATCH, f"{self.target.join(cand.name)} does not match its "
                                  "marker (torn or changed on the mirror)")
            for root, _dirs, names in os.walk(tmp, topdown=False):
                for name in names:
                    fd = os.open(Path(root) / name, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(Path(root))
            final = parent / cand.name
            there = _same_commit(final, raw)
            if there is None and final.exists():  # not committed: a save cut short
                aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(cand.name), dir=parent))
                try:
                    os.rename(final, aside / "torn")
                except FileNotFoundError:  # another rank moved it first
                    pass
                shutil.rmtree(aside, ignore_errors=True)
            if there is None:
                try:
                    os.rename(tmp, final)
                except OSError:  # another rank (same shared directory) restored it first
                    there = _same_commit(final, raw)
                    if there is None:
                        raise
            if there is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                found = there
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(parent)
        return self._marker_of(cand.name), found.sha256, found.bytes


def _safe_rel(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and rel != COMMIT_MARKER


def _loads(raw: bytes) -> Dict[str, Any]:
    import json

    try:
        obj = json.loads(raw)
    except ValueError as err:
        raise MirrorError(MISMATCH, f"a commit marker is not JSON: {err}") from err
    if not isinstance(obj, dict):
        raise MirrorError(MISMATCH, "a commit marker is not a JSON object")
    return obj


def _temp_prefix(name: str) -> str:
    return f".{name}{_RESTORE_INFIX}{os.getpid()}-"


def _same_commit(directory: Path, marker: bytes) -> Optional[CommittedDir]:
    """``directory`` when it holds that very commit, verified (another rank restored it)."""
    try:
        if (directory / COMMIT_MARKER).read_bytes() != marker:
            return None
    except OSError:
        return None
    return verify_dir(directory)


def _sweep_restores(parent: Path) -> None:
    """Remove temp directories of copies down whose process is gone (killed mid-copy)."""
    for name in os.listdir(parent):
        if not (name.startswith(".") and _RESTORE_INFIX in name):
            continue
        pid = name.split(_RESTORE_INFIX, 1)[1].split("-", 1)[0]
        if pid.isdigit() and psutil.pid_exists(int(pid)):
            continue  # a copy down in progress (another rank): never touched
        shutil.rmtree(parent / name, ignore_errors=True)


def _as_dir_mirror(mirror: Union[str, os.PathLike[str], Mirror],
                   pattern: str = CHECKPOINT_PATTERN) -> Optional[DirMirror]:
    """A DirMirror for a path, a URL or a file ``Mirror`` (same target and settings); None
    (logged, training continues) when the target cannot be used."""
    if isinstance(mirror, DirMirror):
        return mirror
    where = mirror.location if isinstance(mirror, Mirror) else os.fspath(mirror)
    try:
        if isinstance(mirror, Mirror):
            return DirMirror(mirror.target, keep=mirror.keep, pattern=pattern,
                             allow_same_filesystem=mirror.allow_same_filesystem)
        return DirMirror(mirror, pattern=pattern)
    except MirrorError as err:
        _event(logging.WARNING, "mirror_failed", target=redact(where), problem=err.problem,
               error=str(err), training="continues")
        return None


def restore_dir(mirror: Union[None, str, os.PathLike[str], Mirror],
                directory: Union[str, os.PathLike[str], None],
                pattern: str = CHECKPOINT_PATTERN) -> Optional[CommittedDir]:
    """The newest committed directory of both tiers, in ``directory`` (copied down if needed).

    Without a mirror: the local newest (``newest_committed``). A mirror that cannot be read is a
    warning: the local newest is returned. Every rank may call it on a directory they share: a
    copy down another rank finished first is taken as it is (all get the same checkpoint).
    """
    if directory is None:
        return None
    local = Path(os.path.abspath(directory))
    dir_mirror = None if mirror is None else _as_dir_mirror(mirror, pattern)
    if dir_mirror is None:
        return newest_committed(local, pattern)
    tier = _LocalDirs(local, dir_mirror.keep or 1)
    name = dir_mirror.restore(tier)  # type: ignore[arg-type]
    if name is not None:
        return verify_dir(local / name)
    return tier.found


def open_dir_mirror(mirror: Union[str, os.PathLike[str], Mirror], directory: Path, keep: int,
                    on_change: Any) -> Optional[DirMirror]:
    """A framework session's way in: build, attach and start the mirror of the committed
    directories under ``directory``."""
    dir_mirror = _as_dir_mirror(mirror)
    if dir_mirror is not None:
        dir_mirror.attach_dir(directory, keep, on_change)
    return dir_mirror
