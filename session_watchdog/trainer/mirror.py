"""Verified copies of committed checkpoints on a second tier: Drive, autodl-fs, NFS, object stores.

The runtime's own disk dies with the runtime; writing checkpoints straight into a FUSE mount
(Colab's ``/content/drive``) stalls the training loop for the whole write and loses the file when
the runtime is reclaimed mid-upload (googlecolab/colabtools#2161, #4314). A :class:`Mirror` lets
the trainer save at local-disk speed and copies each committed checkpoint in a background thread:

The unit of copy is a list of files and one marker: a checkpoint file and ``<name>.sha256`` here;
every file of a committed directory and its ``WATCHDOG_COMMITTED.json`` for the framework
callbacks (``integrations/_mirror.py``, :class:`DirMirror`). Steps 1-2 run for each file, 3 once:

1. stream the file into the target (local: a temp file next to the final name, written through
   :meth:`LocalTarget.write_chunk`, fsynced where the filesystem supports it, renamed; object
   stores: one upload to the final key, which appears only when complete);
2. read it back *from the target* and compare size and checksum with the local commit marker;
3. only then write the marker (the same JSON as the local one, checkpoint.py): the commit. On an
   object store, where there is no rename, the marker object is the commit;
4. keep the newest ``keep`` committed checkpoints there (markers deleted first, as locally). The
   newest verified checkpoint is never deleted before a newer one verified: pruning happens only
   right after a commit.

One copy runs at a time and at most one waits: a newer checkpoint replaces the waiting one
(``mirror_skipped``), so a slow mirror skips to the newest and never queues unbounded copies.

Failures (the mount went away: ENOTCONN; quota or space: ENOSPC / EDQUOT / EFBIG; read-only;
the directory vanished; an object store error; a copy that does not verify) are logged as a
``mirror_failed`` warning with a ``problem`` code, reported in ``trainer.json``
(``extra["mirror"]``) and retried with a backoff; training goes on. A mirror directory on the
same filesystem as the checkpoint directory is refused (``same_filesystem``): it is not a second
copy - and on Colab it is what an unmounted ``/content/drive/MyDrive/...`` path turns into.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

from session_watchdog import channel, checksum
from session_watchdog.channel import fsync_dir, open_exclusive, temp_path_for
from session_watchdog.trainer.mirror_targets import (
    ERROR,
    HINTS,
    MAX_MARKER_BYTES,
    MISMATCH,
    SAME_FILESYSTEM,
    FsspecTarget,
    LocalTarget,
    MirrorError,
    Target,
    classify,
    make_target,
    redact,
)

if TYPE_CHECKING:
    from session_watchdog.trainer.checkpoint import CheckpointManager, SavedCheckpoint

__all__ = [
    "FsspecTarget",
    "LocalTarget",
    "Mirror",
    "MirrorError",
    "MirroredCheckpoint",
    "Target",
    "open_mirror",
]

_log = logging.getLogger(__name__)

MARKER_SUFFIX = ".sha256"  # checkpoint.MARKER_SUFFIX (not imported: that module imports torch)
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0

def _event(level: int, event: str, **fields: Any) -> None:
    """Log an event with fields, as the other trainer modules do (stdlib logging)."""
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


@dataclass(frozen=True)
class MirroredCheckpoint:
    """A checkpoint committed and verified on the mirror.

    ``at`` is the wall-clock time it verified there; ``duration_s`` the time from its local
    commit to that moment (queueing included: what a limit's lead time must allow for);
    ``copy_s`` the copy and verification alone.
    """

    location: str
    name: str
    seq: int
    step: int
    sha256: str  # checkpoints written before checksums; "" for newer ones
    bytes: int
    at: float
    duration_s: float
    copy_s: float
    checksum: str = ""  # "<algorithm>:<hex>", as in the commit marker (session_watchdog/checksum.py)

    def __post_init__(self) -> None:
        if not self.checksum and self.sha256:
            object.__setattr__(self, "checksum", f"sha256:{self.sha256}")

    def to_json(self) -> Dict[str, Any]:
        """The ``last_mirrored`` object of ``trainer.json``."""
        obj = asdict(self)
        obj["path"] = obj.pop("location")
        if self.checksum == f"sha256:{self.sha256}":
            del obj["checksum"]  # a sha256 is recorded as before checksums existed
        obj["duration_s"] = round(self.duration_s, 6)
        obj["copy_s"] = round(self.copy_s, 6)
        return obj


# --------------------------------------------------------------------------------------------
# The mirror


@dataclass(frozen=True)
class _Candidate:
    seq: int
    step: int
    name: str
    marker: Dict[str, Any]


@dataclass(frozen=True)
class _File:
    name: str  # on the target
    path: Path  # local
    bytes: int
    checksum: str  # "<algorithm>:<hex>", or a bare sha256 hex (directory commits, older markers)


@dataclass(frozen=True)
class _Unit:
    """What one checkpoint is on the mirror: its files, then its marker (written last)."""

    name: str  # the checkpoint's name (a file, or a directory for DirMirror)
    files: List[_File]
    marker_name: str
    marker_bytes: bytes
    report_name: str  # what trainer.json's last_mirrored points to (the daemon re-hashes it)
    checksum: str  # as _File.checksum
    bytes: int


class Mirror:
    """Copies committed checkpoints to a second tier in one background thread, verified.

    Args:
        target: a path (Drive, autodl-fs, NFS), an fsspec URL (``s3://bucket/run1``) or a
            :class:`Target`.
        keep: committed checkpoints kept on the mirror (default: the local ``keep``).
        storage_options: passed to fsspec for URLs.
        allow_same_filesystem: for tests only: accept a mirror on the checkpoint directory's
            filesystem (it is no second copy).
    """

    _marker_max_bytes = MAX_MARKER_BYTES  # what the markers' writer allows

    def __init__(
        self,
        target: Union[str, os.PathLike[str], Target],
        *,
        keep: Optional[int] = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        allow_same_filesystem: bool = False,
    ) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"Mirror(keep={keep!r}): keep at least 1 checkpoint on the mirror")
        self.target = make_target(target, storage_options)
        self.keep = keep
        self.allow_same_filesystem = allow_same_filesystem
        self._manager: Optional[CheckpointManager] = None
        self._on_change: Callable[[Dict[str, Any]], None] = lambda report: None
        self._cond = threading.Condition()
        self._next: Optional[Tuple[SavedCheckpoint, float]] = None  # (checkpoint, committed mono)
        self._busy: Optional[int] = None  # step being copied
        self._busy_key: Optional[Tuple[int, str]] = None  # and its _key
        self._last: Optional[MirroredCheckpoint] = None
        self._reported: Optional[MirroredCheckpoint] = None  # _last, once in trainer.json
        self._problem: Optional[str] = None
        self._error: Optional[str] = None
        self._refused = False
        self._skipped = 0
        self._closing = False
        self._retry_s = RETRY_FIRST_S
        self._retry_at = 0.0
        self._retrying = False  # _next is a failed copy waiting for its retry
        self._thread: Optional[threading.Thread] = None
        self._top_seq = 0  # the newest committed sequence number seen on the mirror

    # ---- setup ---------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return self.target.location

    def attach(self, manager: CheckpointManager,
               on_change: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        """Check the target, make local names continue after the mirror's, start the worker.

        A refused or unusable mirror is a warning, never an exception: training goes on.
        """
        if self._manager is not None:
            raise ValueError("this Mirror is attached already: give each Session its own")
        self._manager = manager
        if self.keep is None:
            self.keep = manager.keep
        if on_change is not None:
            self._on_change = on_change
        try:
            self.target.prepare(manager.directory,
                                allow_same_filesystem=self.allow_same_filesystem)
        except MirrorError as err:
            if err.problem == SAME_FILESYSTEM:
                self._refused = True
            self._failed(err, step=None)
        else:
            try:
                newest = self._committed()
            except Exception as err:  # unreachable now; later copies retry
                self._failed(err, step=None)
            else:
                if newest:
                    # The mirror's names continue the local sequence: never reuse one of them.
                    self._top_seq = max(c.seq for c in newest)
                    manager._last_seq = max(manager._last_seq, self._top_seq)
        if self._refused:
            return
        self._thread = threading.Thread(target=self._run, name="session-watchdog-mirror",
                                        daemon=True)
        self._thread.start()
        _event(logging.INFO, "mirror_started", target=self.location, keep=self.keep)

    # ---- the trainer's side (never blocks unless asked) ------------------------------------

    def submit(self, saved: SavedCheckpoint) -> None:
        """Queue ``saved`` for copying; replaces a queued, not yet started, older one."""
        if self._refused or self._manager is None:
            return
        with self._cond:
            if self._next is not None and not self._retrying:
                self._skipped += 1
                _event(logging.WARNING, "mirror_skipped", target=self.location,
                       skipped_step=self._next[0].step, newer_step=saved.step,
                       reason="the mirror is slower than the checkpoints: copying the newest only")
            self._next = (saved, time.monotonic())
            self._retry_at = 0.0
            self._retrying = False
            self._cond.notify_all()
        self._report()

    def catch_up(self, saved: SavedCheckpoint) -> None:
        """Queue ``saved`` (resumed from the local disk) unless the mirror has it or newer.

        A runtime killed before its last copy verified, whose local disk survived (AutoDL, a
        kernel restart), resumes locally: that checkpoint still belongs on the mirror.
        """
        seq = self._seq_of(saved) if self._manager is not None else 0
        last = self._last
        if seq > self._top_seq and (last is None or last.seq < seq):
            self.submit(saved)

    def has(self, saved: SavedCheckpoint) -> bool:
        """Whether this very commit of ``saved`` is queued, being copied or verified on the mirror
        already (in this process): submitting it again would only re-read it, maybe after
        ``close()`` with no retry left."""
        with self._cond:
            key = self._key(saved)
            last = self._reported
            queued = self._next is not None and self._key(self._next[0]) == key
            return queued or self._busy_key == key or \
                (last is not None and (last.seq, last.checksum) == key)

    def _key(self, saved: SavedCheckpoint) -> Tuple[int, str]:
        """What tells one commit from another: its sequence number and checksum."""
        return self._seq_of(saved), checksum.normalize(self._checksum_of(saved))

    def wait(self, saved: SavedCheckpoint, timeout: float) -> Optional[MirroredCheckpoint]:
        """Wait up to ``timeout`` s until ``saved`` (or a newer one) verified on the mirror.

        Another commit of the same step (saved again) is not ``saved``: told by its checksum."""
        seq, recorded = self._key(saved)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                last = self._reported
                if last is not None and (last.seq > seq or
                                         (last.seq == seq and last.checksum == recorded)):
                    return last
                left = deadline - time.monotonic()
                if left <= 0 or self._refused or self._thread is None:
                    return None
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        """Let the worker finish what is queued (no more retries), then end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    @property
    def last(self) -> Optional[MirroredCheckpoint]:
        """The newest checkpoint verified on the mirror by this process."""
        return self._last

    @property
    def problem(self) -> Optional[str]:
        """The current problem code (None when the last copy succeeded)."""
        return self._problem

    def report(self) -> Dict[str, Any]:
        """``extra["mirror"]`` of ``trainer.json``."""
        with self._cond:
            if self._refused:
                state = "refused"
            elif self._problem is not None:
                state = "failing"
            elif self._busy is not None or self._next is not None:
                state = "copying"
            else:
                state = "ok"
            out: Dict[str, Any] = {"target": self.location, "local": self.target.local,
                                   "state": state, "skipped": self._skipped}
            if self._problem is not None:
                out["problem"] = self._problem
                out["error"] = self._error
            pending = self._next[0].step if self._next is not None else self._busy
            if pending is not None:
                out["pending_step"] = pending
            return out

    # ---- resume -----------------------------------------------------------------------------

    def restore(self, manager: CheckpointManager) -> Optional[str]:
        """Copy the newest checkpoint that verifies on the mirror into ``manager``'s directory
        when it is newer than every local one; return its name (None: nothing newer there).

        The copy is hashed on its way down and kept only if it matches the mirror's marker: a
        torn or half-copied file on the mirror is skipped (the next older one is tried).
        """
        if self._refused:
            return None
        if self._manager is None:
            self._manager = manager
        local_top = self._local_top(manager)
        try:
            candidates = self._committed()
        except Exception as err:
            self._failed(err, step=None)
            return None
        for cand in sorted(candidates, key=lambda c: c.seq, reverse=True):
            if cand.seq <= local_top:
                break
            try:
                report_name, recorded, size = self._copy_down(manager, cand)
            except Exception as err:
                _event(logging.WARNING, "mirror_restore_skipped", target=self.location,
                       name=cand.name, problem=classify(err), error=str(err))
                continue
            with self._cond:
                self._last = MirroredCheckpoint(
                    location=self.target.join(report_name), name=cand.name, seq=cand.seq, step=cand.step,
                    sha256=_sha256_of(recorded), bytes=size, at=time.time(), duration_s=0.0,
                    copy_s=0.0, checksum=checksum.normalize(recorded))
                self._reported = self._last
                manager._last_seq = max(manager._last_seq, cand.seq)
            _event(logging.INFO, "mirror_restored", target=self.location, name=cand.name,
                   step=cand.step)
            self._report()
            return cand.name
        return None

    def _copy_down(self, manager: CheckpointManager, cand: _Candidate) -> Tuple[str, str, int]:
        """Copy ``cand`` down, verified; return what describes it (name, checksum, bytes)."""
        final = manager.directory / cand.name
        expected = checksum.for_record(cand.marker)
        if expected is None:
            raise MirrorError(MISMATCH, f"{self.target.join(cand.name)}'s marker has no checksum")
        tmp = temp_path_for(final)
        fd = open_exclusive(tmp)
        digest = checksum.new(checksum.parse(expected)[0])
        size = 0
        try:
            try:
                for block in self.target.read_chunks(cand.name):
                    digest.update(block)
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view):]
                    size += len(block)
                os.fsync(fd)
            finally:
                os.close(fd)
            if size != cand.marker["bytes"] or not _same(digest, expected):
                raise MirrorError(MISMATCH, f"{self.target.join(cand.name)} does not match its "
                                  "marker (torn or changed on the mirror)")
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(manager.directory)
        channel.write_json(final.with_name(final.name + MARKER_SUFFIX), cand.marker)
        return cand.name, expected, int(cand.marker["bytes"])

    # ---- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._next is None:
                        if self._closing:
                            return
                        self._cond.wait()
                        continue
                    wait = self._retry_at - time.monotonic()
                    if wait > 0 and not self._closing:
                        self._cond.wait(wait)
                        continue
                    if wait > 0 and self._closing:
                        return  # closing: no more retries
                    break
                saved, committed = self._next
                self._next = None
                self._retrying = False
                self._busy = saved.step
                self._busy_key = self._key(saved)
            self._report()
            try:
                result = self._copy(saved, committed)
            except Exception as err:
                with self._cond:
                    self._busy = None
                    self._busy_key = None
                    if self._next is None and not self._closing:
                        self._next = (saved, committed)  # retry it unless a newer one came
                        self._retrying = True
                        self._retry_at = time.monotonic() + self._retry_s
                        self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)
                    self._cond.notify_all()
                self._failed(err, step=saved.step)
                continue
            with self._cond:
                self._busy = None
                self._busy_key = None
                self._last = result
                recovered = self._problem
                self._problem = self._error = None
                self._retry_s = RETRY_FIRST_S
            if recovered is not None:
                _event(logging.INFO, "mirror_recovered", target=self.location, previous=recovered)
            _event(logging.INFO, "mirror_verified", target=self.location, step=result.step,
                   name=result.name, bytes=result.bytes, copy_s=round(result.copy_s, 3),
                   duration_s=round(result.duration_s, 3))
            self._report()  # before waiters hear of it: trainer.json says so when wait() returns
            with self._cond:
                self._reported = result
                self._cond.notify_all()

    def _copy(self, saved: SavedCheckpoint, committed: float) -> MirroredCheckpoint:
        """Copy one checkpoint; the module docstring's steps 1-4, for each of its files."""
        started = time.monotonic()
        target = self.target
        seq = self._seq_of(saved)
        unit = self._unit(saved)
        target.check()
        fds: List[int] = []
        try:
            for item in unit.files:  # open all first: a local prune meanwhile cannot tear it
                fds.append(os.open(item.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except FileNotFoundError as err:  # not the mirror's fault: say so
            for fd in fds:
                os.close(fd)
            raise MirrorError(ERROR, f"{err.filename} is gone (pruned locally before it could "
                              "be mirrored)") from err
        written = present = False
        try:
            try:
                present = self._before_copy(unit)
                for item, fd in zip(unit.files, fds):
                    if present:
                        break
                    size = target.write(item.name, fd)
                    written = True
                    if size != item.bytes:
                        raise MirrorError(MISMATCH, f"{item.path} has {size} bytes, its marker "
                                          f"says {item.bytes} (changed since its commit)")
            finally:
                for fd in fds:
                    os.close(fd)
            for item in unit.files:
                digest = checksum.new(checksum.parse(item.checksum)[0])
                read = 0
                for block in target.read_chunks(item.name):  # from the target, never the source
                    digest.update(block)
                    read += len(block)
                if read != item.bytes or not _same(digest, item.checksum):
                    raise MirrorError(MISMATCH, f"{target.join(item.name)} read back {read} bytes "
                                      f"that do not match {unit.name}'s marker: {HINTS[MISMATCH]}")
            if not present:
                target.write_marker(unit.marker_name, unit.marker_bytes)
        except BaseException as err:
            damaged = isinstance(err, MirrorError) and err.problem == MISMATCH
            if present and damaged:  # that commit is there, read back whole, and differs:
                # uncommit it, copy again. A read that failed (a transient error) proves
                # nothing: the copy, verified before, stays committed and the error is reported.
                try:
                    target.delete(unit.marker_name)
                except Exception:
                    pass
            if written:  # uncommitted data must not linger under a final name
                try:
                    self._delete_unit(unit.name)
                except Exception:  # the mirror is failing anyway; the next prune retries
                    pass
            raise
        now = time.monotonic()
        result = MirroredCheckpoint(
            location=target.join(unit.report_name), name=unit.name, seq=seq, step=saved.step,
            sha256=_sha256_of(unit.checksum), bytes=unit.bytes, at=time.time(),
            duration_s=now - committed, copy_s=now - started,
            checksum=checksum.normalize(unit.checksum))
        self._prune(seq)
        return result

    # ---- what a checkpoint is on the mirror (DirMirror: a committed directory) -------------

    def accepts(self, saved: Any) -> bool:
        """Whether ``saved`` is the kind of checkpoint this mirror copies."""
        from session_watchdog.trainer.checkpoint import SavedCheckpoint

        return isinstance(saved, SavedCheckpoint)

    def _unit(self, saved: SavedCheckpoint) -> _Unit:
        name = saved.path.name
        marker_path = saved.path.with_name(name + MARKER_SUFFIX)
        marker = channel.read_json(marker_path)
        if marker is None:
            raise MirrorError(ERROR, f"{marker_path} is gone (pruned locally before it could "
                              "be mirrored)")
        data = json.dumps(marker, separators=(",", ":"), sort_keys=True).encode()
        recorded = checksum.for_record(marker)
        if recorded is None:
            raise MirrorError(ERROR, f"{marker_path} records no checksum (changed locally)")
        return _Unit(name, [_File(name, saved.path, int(marker["bytes"]), recorded)],
                     name + MARKER_SUFFIX, data, name, saved.checksum, saved.bytes)

    def _checksum_of(self, saved: SavedCheckpoint) -> str:
        """The checksum ``saved``'s unit is reported with (``_Unit.checksum``)."""
        return saved.checksum

    def _before_copy(self, unit: _Unit) -> bool:
        """Make room on the target for ``unit``; True: that very commit is there already (then
        it is only read back). A file is replaced by its rename: nothing to do."""
        return False

    def _delete_unit(self, name: str) -> None:
        self.target.delete(name)

    def _marker_of(self, name: str) -> str:
        return name + MARKER_SUFFIX

    def _parse(self, name: str) -> Optional[Tuple[int, int]]:
        """(sequence, step) of a checkpoint's name; None: not one of ours."""
        assert self._manager is not None
        return self._manager.parse_name(name)

    def _marked(self, names: Set[str]) -> Set[str]:
        """The checkpoints among ``names`` whose marker is there (not yet read)."""
        return {n for n in names if self._parse(n) is not None and n + MARKER_SUFFIX in names}

    def _valid_marker(self, obj: Dict[str, Any], name: str, step: int) -> bool:
        from session_watchdog.trainer.checkpoint import checkpoint_from_marker

        return checkpoint_from_marker(obj, Path(name), step) is not None

    def _local_top(self, manager: CheckpointManager) -> int:
        """The newest committed sequence number on the local tier."""
        local = [manager.parse_name(s.path.name) for s in manager.list()]
        return max((p[0] for p in local if p is not None), default=0)

    def _committed(self) -> List[_Candidate]:
        """Checkpoints on the mirror whose marker is present and well-formed (files unread)."""
        names = set(self.target.names())
        found = []
        for name in self._marked(names):
            parsed = self._parse(name)
            assert parsed is not None
            try:
                obj = json.loads(self.target.read_small(self._marker_of(name),
                                                        self._marker_max_bytes))
            except (ValueError, OSError, MirrorError, channel.ChannelError):
                continue  # unreadable, not ours, or not JSON: never a resume candidate
            if not isinstance(obj, dict) or obj.get("v") != channel.SCHEMA_VERSION:
                continue
            if not self._valid_marker(obj, name, parsed[1]):
                continue
            found.append(_Candidate(parsed[0], parsed[1], name, obj))
        return found

    def _prune(self, newest_seq: int) -> None:
        """Keep the newest ``keep`` committed checkpoints up to ``newest_seq`` (the one just
        made); remove older ones and litter; never touch those numbered above it."""
        assert self._manager is not None and self.keep is not None
        try:
            names = set(self.target.names())
            marked = self._marked(names)
            # As the local rule (checkpoint_dir._prune): copies numbered above the one just made
            # (a rollback, another run's in a used mirror path) are not ours to judge, and never
            # count against ``keep``: they would get the copy just made deleted.
            committed = sorted(seq for seq in ((self._parse(n) or (0, 0))[0] for n in marked)
                               if seq <= newest_seq)
            keep_from = committed[-self.keep] if len(committed) >= self.keep else 0
            doomed = []
            for name in names:
                parsed = self._parse(name)
                if parsed is None or parsed[0] > newest_seq:
                    continue
                if parsed[0] < keep_from or (name not in marked and parsed[0] < newest_seq):
                    doomed.append(name)
            for name in doomed:  # markers first: a cut-short prune leaves unmarked files only
                if name in marked:
                    self.target.delete(self._marker_of(name))
            for name in doomed:
                self._delete_unit(name)
            for name in names:  # markers whose file is gone (a prune cut short elsewhere)
                stem = name[: -len(MARKER_SUFFIX)]
                parsed = self._parse(stem) if name.endswith(MARKER_SUFFIX) else None
                if parsed is not None and stem not in names and parsed[0] < newest_seq:
                    self.target.delete(name)
            self.target.sweep()
        except Exception as err:  # committed already; a failed prune is retried next time
            _event(logging.WARNING, "mirror_prune_failed", target=self.location, error=str(err),
                   problem=classify(err))

    # ---- reporting ------------------------------------------------------------------------

    def _seq_of(self, saved: SavedCheckpoint) -> int:
        assert self._manager is not None
        parsed = self._parse(saved.path.name)
        return 0 if parsed is None else parsed[0]

    def _failed(self, err: BaseException, step: Optional[int]) -> None:
        problem = classify(err)
        text = str(err) or type(err).__name__
        with self._cond:
            repeated = self._problem == problem
            self._problem = problem
            self._error = text
        level = logging.DEBUG if repeated else logging.WARNING
        _event(level, "mirror_failed", target=self.location, problem=problem, step=step,
               error=text, hint=HINTS.get(problem, ""), training="continues")
        self._report()

    def _report(self) -> None:
        try:
            self._on_change(self.report())
        except Exception as err:  # reporting must never break the copy
            _event(logging.WARNING, "mirror_report_failed", error=str(err))


def _same(digest: Any, expected: str) -> bool:
    """Whether a running checksum of ``checksum.new`` ended at ``expected`` (any spelling)."""
    algorithm = checksum.parse(expected)[0]
    return f"{algorithm}:{digest.hexdigest()}" == checksum.normalize(expected)


def _sha256_of(recorded: str) -> str:
    """``MirroredCheckpoint.sha256`` of a checksum in any spelling: its hex for a sha256, else ""."""
    algorithm, digest = checksum.parse(recorded)
    return digest if algorithm == "sha256" else ""


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def open_mirror(
    mirror: Union[None, str, os.PathLike[str], Mirror],
    manager: CheckpointManager,
    on_change: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Optional[Mirror]:
    """The Session's way in: build (for a path or URL), attach and start a mirror."""
    if mirror is None:
        return None
    if not isinstance(mirror, Mirror):
        where = os.fspath(mirror)
        try:
            mirror = Mirror(where)
        except MirrorError as err:
            _event(logging.WARNING, "mirror_failed", target=redact(where),
                   problem=err.problem, error=str(err), training="continues")
            return None
    mirror.attach(manager, on_change)
    return mirror
