"""The checkpoint directory: what is in it (committed, broken, temp), reading it (list, latest,
verify, load), and keep-last-K pruning.

A part of :class:`~session_watchdog.trainer.checkpoint.CheckpointManager` (checkpoint.py), the
first of its base classes, which declares the fields they share. Trainer side: imports torch.
"""

from __future__ import annotations

import logging
import os
import pickle
import stat
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Pattern, Set, Tuple, Union

import torch

from session_watchdog import channel, checksum
from session_watchdog.channel import fsync_dir
from session_watchdog.trainer.checkpoint_files import (
    MARKER_SUFFIX,
    _Entry,
    _is_regular_or_missing,
    _regular_size,
    _remove_any,
    _rename_quietly,
    _unlink_quietly,
    checkpoint_from_marker,
)
from session_watchdog.trainer.checkpoint_types import CheckpointError, SavedCheckpoint

# The manager's events keep the logger they had before the split (checkpoint.py's).
_log = logging.getLogger("session_watchdog.trainer.checkpoint")

BROKEN_SUFFIX = ".broken"
_UNLINK_AHEAD_BYTES = 64 << 20  # pruned files this large are unlinked by a helper thread


def _event(level: int, event: str, **fields: Any) -> None:
    """Log an event with fields, as trainer/session.py does: stdlib logging, since the trainer
    process should not pay for importing structlog; ``record.event``/``record.fields`` carry data.
    """
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


class _DirectoryMixin:
    """Find, read, verify, load and prune the checkpoints in one directory."""

    # The fields the parts share; CheckpointManager.__init__ (checkpoint.py) sets them all.
    directory: Path
    keep: int
    prefix: str
    _final_re: Pattern[str]
    _owned_re: Pattern[str]
    _temp_re: Pattern[str]
    _lock: threading.Lock  # held while a checkpoint is written (sync or background)
    _pruner: Optional[threading.Thread]  # unlinks large pruned files (_prune)
    _kept_ahead: Set[int]  # seqs exempt from pruning (keep_ahead_of)
    _verified: Dict[Path, Tuple[float, int]]  # verify() passes: (at, mtime_ns)
    _verified_lock: threading.Lock

    # ---- pruning -------------------------------------------------------------------------

    def _prune(self, newest_seq: int) -> None:
        """Keep the newest ``keep`` committed checkpoints; drop older ones and older litter."""
        kept = 0
        doomed: List[_Entry] = []
        for entry in sorted(self._scan(), key=lambda e: e.seq, reverse=True):
            if entry.seq > newest_seq or entry.seq in self._kept_ahead:
                continue  # not ours to judge (another manager's newer save, or kept ahead)
            if kept < self.keep and self._read_marker(entry, check_size=True) is not None:
                kept += 1
            else:
                doomed.append(entry)
        if not doomed:
            return
        # Markers first: a cut-short prune leaves unmarked files only. Each name on its own, and
        # whatever kind of file it is (a marker made a directory stopped every later prune:
        # issue 18); the new checkpoint is committed, so failing the save now would misreport it.
        self._remove_all([entry.marker for entry in doomed])
        # Freeing a large file's blocks takes the filesystem a while (0.2 s per GiB on ext4): on
        # the caller's time that was a fifth of a 1 GiB save (issue 17). Unmarked now, those
        # files are litter that a later prune would remove anyway, so a helper thread unlinks
        # them; the next save (and list/latest) waits for it, so space and listings are as before.
        large = [entry.path for entry in doomed if _regular_size(entry.path) >= _UNLINK_AHEAD_BYTES]
        self._remove_all([entry.path for entry in doomed if entry.path not in large])
        if large:
            worker = threading.Thread(target=self._remove_all, args=(large,),
                                      name="sw-checkpoint-prune")
            try:
                worker.start()
            except RuntimeError:  # "can't start new thread": do it here
                self._remove_all(large)
            else:
                self._pruner = worker

    def _remove_all(self, paths: List[Path]) -> None:
        """Remove each of ``paths`` (see _remove_any), then fsync the directory; errors are logged."""
        if not paths:
            return
        for path in paths:
            try:
                _remove_any(path)
            except OSError as err:
                _event(logging.WARNING, "checkpoint_prune_failed", path=str(path),
                       error=str(err), errno=err.errno)
        try:
            fsync_dir(self.directory)
        except OSError as err:
            _event(logging.WARNING, "checkpoint_prune_failed", directory=str(self.directory),
                   error=str(err), errno=err.errno)

    def _settle_own_save(self) -> None:
        """Before waiting for ``_lock``, held by an async save until it commits: the async
        part (checkpoint_async.py) gives that save the word it waits for, on its thread."""

    def _join_pruner(self) -> None:
        worker, self._pruner = self._pruner, None
        if worker is not None:
            worker.join()

    def keep_ahead_of(self, step: int) -> List[SavedCheckpoint]:
        """Exempt committed checkpoints of a step beyond ``step`` from pruning; return them.

        A run that did not resume writes steps 1, 2, ... next to the step-100 checkpoint of the
        run before; keep-last-K by sequence would delete step 100 at the second save (issue 11).
        They stay until this manager is gone (a later run that resumes prunes them as usual).
        """
        ahead = [saved for saved in self.list() if saved.step > step]
        for saved in ahead:
            match = self._final_re.match(saved.path.name)
            if match is not None:
                self._kept_ahead.add(int(match.group(1)))
        return ahead

    # ---- reading -------------------------------------------------------------------------

    def list(self) -> List[SavedCheckpoint]:
        """Committed checkpoints (marker present, size matching), oldest first.

        Cheap: it does not hash the files; :meth:`verify` and :meth:`latest` do. Like
        :meth:`latest`, it first waits for this manager's own save in flight, if any.
        """
        self._settle_own_save()
        with self._lock:
            self._join_pruner()
            found = []
            for entry in sorted(self._scan(), key=lambda e: e.seq):
                saved = self._read_marker(entry, check_size=True)
                if saved is not None:
                    found.append(saved)
            return found

    def latest(self) -> Optional[SavedCheckpoint]:
        """The newest checkpoint whose marker verifies (size and checksum), or None.

        Newer files that fail (torn, unmarked, empty, bad marker) are set aside as
        ``<name>.broken``; only the most recent ``.broken`` file is kept. Call it at resume
        time: a save running in another process would look unmarked.
        """
        self._settle_own_save()
        with self._lock:
            self._join_pruner()
            found: Optional[SavedCheckpoint] = None
            for entry in sorted(self._scan(), key=lambda e: e.seq, reverse=True):
                saved = self._read_marker(entry, check_size=True)
                try:
                    if saved is not None and checksum.matches(entry.path, saved.checksum,
                                                              saved.bytes):
                        found = saved
                        break
                    self._set_aside(entry)
                except (OSError, checksum.ChecksumError) as err:
                    # unreadable (EIO), or a checksum this install cannot compute (crc32c without
                    # its package): fall back to an older one, never set aside a file that may
                    # well be intact
                    _event(logging.WARNING, "checkpoint_unreadable", path=str(entry.path),
                           error=str(err))
            self._drop_orphan_markers()
            return found

    def verify(self, path: Union[Path, str], *, cold: bool = True) -> bool:
        """Whether ``path`` is a committed checkpoint whose size and checksum match its marker.

        ``cold`` (default): read the file back from the disk, its cached pages dropped first;
        when it matches and did not change meanwhile, :meth:`verification` tells when and at
        which mtime. ``cold=False`` reads through the page cache and records nothing.
        """
        path = Path(path)
        match = self._final_re.match(path.name)
        if match is None:
            return False
        entry = _Entry(int(match.group(1)), int(match.group(2)), path)
        saved = self._read_marker(entry, check_size=True)
        if saved is None:
            return False
        try:
            before = os.stat(path)
            if not checksum.matches(path, saved.checksum, saved.bytes, cold=cold):
                return False
            after = os.stat(path)
        except (OSError, checksum.ChecksumError):
            return False
        if cold and (after.st_ino, after.st_size, after.st_mtime_ns) \
                == (before.st_ino, before.st_size, before.st_mtime_ns):
            with self._verified_lock:
                self._verified = {p: v for p, v in self._verified.items() if p.exists()}
                self._verified[path] = (time.time(), after.st_mtime_ns)
        return True

    def verification(self, path: Union[Path, str]) -> Optional[Tuple[float, int]]:
        """``(verified_at, mtime_ns)`` of the last :meth:`verify` of ``path`` that passed, if any.

        The Session reports it in ``trainer.json``, so the end of the runtime checks the file's
        size and mtime instead of re-reading it whole (actions.verify_checkpoint, issue 17).
        """
        with self._verified_lock:
            return self._verified.get(Path(path))

    def load(
        self, saved: Optional[SavedCheckpoint] = None, map_location: Any = "cpu"
    ) -> Dict[str, Any]:
        """Load ``saved`` (default: :meth:`latest`) with ``torch.load(weights_only=True)``.

        Raises:
            CheckpointError: no checkpoint, a file that fails verification, or one that holds
                anything but weights-only data (a crafted pickle is refused, never run).
        """
        if saved is None:
            saved = self.latest()
            if saved is None:
                raise CheckpointError(f"no committed checkpoint in {self.directory}")
        elif not self.verify(saved.path, cold=False):  # torch.load reads it next: keep it cached
            raise CheckpointError(
                f"checkpoint {saved.path} does not match its marker (torn, changed or uncommitted)"
            )
        try:
            with checksum.open_regular(saved.path) as fh:
                state = torch.load(fh, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"refusing to load {saved.path}: it holds objects that "
                f"torch.load(weights_only=True) does not allow ({first})"
            ) from err
        except Exception as err:
            raise CheckpointError(f"cannot load {saved.path}: {err}") from err
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{saved.path} holds a {type(state).__name__}, expected a checkpoint dict"
            )
        return state

    # ---- directory bookkeeping -----------------------------------------------------------

    def _names(self) -> List[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []

    def _scan(self) -> List[_Entry]:
        entries = []
        for name in self._names():
            match = self._final_re.match(name)
            if match is not None:
                entries.append(_Entry(int(match.group(1)), int(match.group(2)),
                                      self.directory / name))
        return entries

    def _max_owned_seq(self) -> int:
        """The highest sequence number any of our names uses (broken files, temps, markers)."""
        best = 0
        for name in self._names():
            match = self._owned_re.match(name)
            if match is not None:
                best = max(best, int(match.group(1)))
        return best

    def parse_name(self, name: str) -> Optional[Tuple[int, int]]:
        """``(seq, step)`` of a committed checkpoint's file name of this manager, else None."""
        match = self._final_re.match(name)
        return None if match is None else (int(match.group(1)), int(match.group(2)))

    def _read_marker(self, entry: _Entry, *, check_size: bool) -> Optional[SavedCheckpoint]:
        """The checkpoint the marker describes, or None when the marker is missing or wrong."""
        try:
            # read_json opens with O_NOFOLLOW|O_NONBLOCK and reads regular files only, at most
            # MAX_FILE_BYTES: a marker that is a symlink (to /dev/zero, a FIFO), a FIFO or a
            # directory is refused without blocking. A marker nested thousands of levels deep
            # makes json raise RecursionError (issue 18): a bad marker too.
            obj = channel.read_json(entry.marker)
        except (channel.ChannelError, OSError, RecursionError):
            return None
        if obj is None:
            return None
        saved = checkpoint_from_marker(obj, entry.path, entry.step)
        if saved is None:
            return None
        if check_size:
            try:
                st = os.lstat(entry.path)
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode) or st.st_size != saved.bytes:
                return None
        return saved

    def _newest_marked(self) -> Optional[SavedCheckpoint]:
        for entry in sorted(self._scan(), key=lambda e: e.seq, reverse=True):
            saved = self._read_marker(entry, check_size=True)
            if saved is not None:
                return saved
        return None

    def _set_aside(self, entry: _Entry) -> None:
        """Rename a checkpoint that fails verification to ``.broken``; keep only this one.

        Whatever sits at the names (a directory, a FIFO, a symlink: issue 18) is renamed, never
        opened or followed; a marker that is not a regular file is set aside next to it.
        """
        target = entry.path.with_name(entry.path.name + BROKEN_SUFFIX)
        kept = {target.name}
        if _is_regular_or_missing(entry.marker):
            _unlink_quietly(entry.marker)
        else:
            marker_target = entry.marker.with_name(entry.marker.name + BROKEN_SUFFIX)
            _remove_any(marker_target)
            _rename_quietly(entry.marker, marker_target)
            kept.add(marker_target.name)
        if os.path.lexists(entry.path):
            _remove_any(target)
            _rename_quietly(entry.path, target)
        for name in self._names():
            if name.endswith(BROKEN_SUFFIX) and name not in kept \
                    and self._owned_re.match(name) and not name.startswith("."):
                _remove_any(self.directory / name)
        fsync_dir(self.directory)

    def _drop_orphan_markers(self) -> None:
        names = set(self._names())
        for name in names:
            if name.endswith(MARKER_SUFFIX) and self._final_re.match(name[: -len(MARKER_SUFFIX)]) \
                    and name[: -len(MARKER_SUFFIX)] not in names:
                _remove_any(self.directory / name)

    def _sweep_temps(self) -> int:
        """Remove temp files our prefix left behind when a writer died (channel.sweep_temps would
        also take temps of other writers sharing the directory)."""
        removed = 0
        for name in self._names():
            if self._temp_re.match(name):
                _remove_any(self.directory / name)
                removed += 1
        return removed
