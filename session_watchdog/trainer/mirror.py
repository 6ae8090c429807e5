"""Verified copies of committed checkpoints on a second tier: Drive, autodl-fs, NFS, object stores.

The runtime's own disk dies with the runtime; writing checkpoints straight into a FUSE mount
(Colab's ``/content/drive``) stalls the training loop for the whole write and loses the file when
the runtime is reclaimed mid-upload (googlecolab/colabtools#2161, #4314). A :class:`Mirror` lets
the trainer save at local-disk speed and copies each committed checkpoint in a background thread:

1. stream the file into the target (local: a temp file next to the final name, written through
   :meth:`LocalTarget.write_chunk`, fsynced where the filesystem supports it, renamed; object
   stores: one upload to the final key, which appears only when complete);
2. read it back *from the target* and compare size and sha256 with the local commit marker;
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

import errno
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from session_watchdog import channel
from session_watchdog.channel import fsync_dir, open_exclusive, temp_path_for

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
CHUNK = 8 << 20
MAX_MARKER_BYTES = channel.MAX_FILE_BYTES
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0

# Problem codes, in trainer.json and the log.
UNREACHABLE = "unreachable"  # ENOTCONN & co: the mount or the network went away
FULL = "full"  # ENOSPC, EDQUOT (Drive quota), EFBIG
READ_ONLY = "read_only"  # EROFS, EACCES, EPERM
MISSING = "missing"  # the mirror directory is gone (unmounted, deleted)
SAME_FILESYSTEM = "same_filesystem"  # not a second copy: refused
MISMATCH = "mismatch"  # the copy read back from the target does not match the marker
ERROR = "error"  # anything else (an object store's error, ...)

_HINTS = {
    UNREACHABLE: "the mirror is not reachable (a Drive mount that expired: remount it)",
    FULL: "the mirror is full or over its quota: free space there",
    READ_ONLY: "the mirror is read-only or not writable for this user",
    MISSING: "the mirror directory is gone (unmounted or deleted); it is not recreated, so "
             "that nothing lands on the local disk under its name",
    SAME_FILESYSTEM: "the mirror is on the same filesystem as the checkpoint directory, so it is "
                     "not a second copy (on Colab: is Drive mounted?); mirroring is off",
    MISMATCH: "the copy read back from the mirror does not match the checkpoint",
    ERROR: "the mirror failed",
}
_ERRNO_PROBLEMS = {
    errno.ENOTCONN: UNREACHABLE, errno.ESHUTDOWN: UNREACHABLE, errno.EHOSTDOWN: UNREACHABLE,
    errno.EHOSTUNREACH: UNREACHABLE, errno.ENETUNREACH: UNREACHABLE, errno.ETIMEDOUT: UNREACHABLE,
    errno.ECONNREFUSED: UNREACHABLE, errno.ECONNRESET: UNREACHABLE, errno.ESTALE: UNREACHABLE,
    errno.EIO: UNREACHABLE,
    errno.ENOSPC: FULL, errno.EDQUOT: FULL, errno.EFBIG: FULL,
    errno.EROFS: READ_ONLY, errno.EACCES: READ_ONLY, errno.EPERM: READ_ONLY,
    errno.ENOENT: MISSING,
}
# fsync on a FUSE or network filesystem may be unsupported: the copy is then verified by reading.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF, errno.EISDIR}


def _event(level: int, event: str, **fields: Any) -> None:
    """Log an event with fields, as the other trainer modules do (stdlib logging)."""
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


class MirrorError(Exception):
    """A copy to the mirror failed; ``problem`` is one of the codes above."""

    def __init__(self, problem: str, message: str) -> None:
        super().__init__(message)
        self.problem = problem


def classify(err: BaseException) -> str:
    """The problem code of an exception raised while talking to the mirror."""
    if isinstance(err, MirrorError):
        return err.problem
    seen = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:  # fsspec wraps; so does torch
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _ERRNO_PROBLEMS:
            return _ERRNO_PROBLEMS[current.errno]
        if isinstance(current, PermissionError):
            return READ_ONLY
        if isinstance(current, (ConnectionError, TimeoutError)) or \
                "connect" in type(current).__name__.lower():
            return UNREACHABLE  # botocore's EndpointConnectionError, aiohttp's errors
        current = current.__cause__ or current.__context__
    return ERROR


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
    sha256: str
    bytes: int
    at: float
    duration_s: float
    copy_s: float

    def to_json(self) -> Dict[str, Any]:
        """The ``last_mirrored`` object of ``trainer.json``."""
        obj = asdict(self)
        obj["path"] = obj.pop("location")
        obj["duration_s"] = round(self.duration_s, 6)
        obj["copy_s"] = round(self.copy_s, 6)
        return obj


# --------------------------------------------------------------------------------------------
# Targets: the boundary to the second tier (tests and benchmarks subclass them)


class Target:
    """Where mirrored files go. Names are plain file names inside one directory or prefix."""

    location: str = ""
    #: whether ``location`` is a path on this machine (the daemon may re-verify it there)
    local: bool = False

    def prepare(self, local_dir: Path, *, allow_same_filesystem: bool) -> None:
        """Check the target once, before the first copy (raises MirrorError)."""

    def check(self) -> None:
        """Cheap check before each copy (raises MirrorError)."""

    def join(self, name: str) -> str:
        raise NotImplementedError

    def names(self) -> List[str]:
        raise NotImplementedError

    def write(self, name: str, source_fd: int) -> int:
        """Stream ``source_fd`` (from its start) into ``name``; return the bytes written."""
        raise NotImplementedError

    def read_chunks(self, name: str) -> Iterator[bytes]:
        raise NotImplementedError

    def read_small(self, name: str) -> bytes:
        raise NotImplementedError

    def write_marker(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def sweep(self) -> None:
        """Remove what killed copies left behind (temp files of dead writers)."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class LocalTarget(Target):
    """A directory on this machine: a Drive or autodl-fs mount, NFS, another disk.

    Args:
        path: the mirror directory. Created (with its parents) only if it is on another
            filesystem than the checkpoint directory; never re-created after it vanished.
    """

    local = True

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self.path = Path(os.path.abspath(path))
        self.location = str(self.path)
        self._dev: Optional[int] = None

    def prepare(self, local_dir: Path, *, allow_same_filesystem: bool) -> None:
        local_dev = os.stat(_nearest_existing(Path(local_dir))).st_dev
        try:
            existing = _nearest_existing(self.path)
            dev = os.stat(existing).st_dev
        except OSError as err:
            raise MirrorError(classify(err), f"cannot use mirror {self.path}: {err}") from err
        if dev == local_dev and not allow_same_filesystem:
            raise MirrorError(SAME_FILESYSTEM, f"mirror {self.path} is on the same filesystem as "
                              f"{local_dir} (st_dev {dev}): {_HINTS[SAME_FILESYSTEM]}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._dev = os.stat(self.path).st_dev
        except OSError as err:
            raise MirrorError(classify(err), f"cannot create mirror {self.path}: {err}") from err
        if self._dev == local_dev and not allow_same_filesystem:  # a mount point in between
            raise MirrorError(SAME_FILESYSTEM, f"mirror {self.path} is on the same filesystem as "
                              f"{local_dir}: {_HINTS[SAME_FILESYSTEM]}")

    def check(self) -> None:
        try:
            dev = os.stat(self.path).st_dev
        except OSError as err:
            raise MirrorError(classify(err), f"mirror {self.path}: {err.strerror or err}") from err
        if self._dev is not None and dev != self._dev:
            # Unmounted: the name now points into the filesystem underneath (the local disk).
            raise MirrorError(MISSING, f"mirror {self.path} is no longer the filesystem it was "
                              f"(st_dev {self._dev} -> {dev}): {_HINTS[MISSING]}")

    def join(self, name: str) -> str:
        return str(self.path / name)

    def names(self) -> List[str]:
        return os.listdir(self.path)

    def open_temp(self, path: Path) -> int:
        return open_exclusive(path)

    def write_chunk(self, fd: int, data: memoryview) -> int:
        """Write some of ``data`` to ``fd``; return how much (the boundary tests fake)."""
        return os.write(fd, data)

    def write(self, name: str, source_fd: int) -> int:
        final = self.path / name
        tmp = temp_path_for(final)
        fd = self.open_temp(tmp)
        try:
            try:
                written = self._kernel_copy(source_fd, fd)
                if written is None:
                    written = self._chunk_copy(source_fd, fd)
                _fsync_if_supported(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir_if_supported(self.path)
        return written

    def _chunk_copy(self, source_fd: int, fd: int) -> int:
        """Read and write through :meth:`write_chunk`, one chunk at a time."""
        written = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            got = os.readv(source_fd, [buf])
            if got == 0:
                return written
            chunk = view[:got]
            while chunk:
                chunk = chunk[self.write_chunk(fd, chunk):]
            written += got

    def _kernel_copy(self, source_fd: int, fd: int) -> Optional[int]:
        """Copy inside the kernel (sendfile) when no subclass intercepts ``write_chunk``;
        None when it does or the filesystems do not support it (then: read and write)."""
        if type(self).write_chunk is not LocalTarget.write_chunk or not hasattr(os, "sendfile"):
            return None
        written = 0
        while True:
            try:
                sent = os.sendfile(fd, source_fd, None, CHUNK)
            except OSError as err:
                if written == 0 and err.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                    return None  # nothing written yet: the plain loop starts from the beginning
                raise
            if sent == 0:
                return written
            written += sent

    def read_chunks(self, name: str) -> Iterator[bytes]:
        with open(self.path / name, "rb", buffering=0) as fh:
            while True:
                block = fh.read(CHUNK)
                if not block:
                    return
                yield block

    def read_small(self, name: str) -> bytes:
        obj = channel.read_json(self.path / name)
        if obj is None:
            raise FileNotFoundError(errno.ENOENT, "no such marker", str(self.path / name))
        return json.dumps(obj).encode()

    def write_marker(self, name: str, data: bytes) -> None:
        channel.atomic_write(self.path / name, data)

    def delete(self, name: str) -> None:
        _unlink_quietly(self.path / name)

    def sweep(self) -> None:
        channel.sweep_temps(self.path)


class FsspecTarget(Target):
    """An fsspec URL (``s3://bucket/run1``, ``gs://...``): one object per file, no rename.

    An upload becomes visible only once complete, so there is no temp name; the marker object,
    written after the upload verified, is the commit. ``storage_options`` go to fsspec (e.g.
    ``{"client_kwargs": {"endpoint_url": ...}}`` for an S3-compatible store).
    """

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]] = None) -> None:
        try:
            import fsspec
        except ImportError as err:
            raise MirrorError(ERROR, f"mirror {url} needs fsspec and the filesystem's package: "
                              "pip install 'session-watchdog[mirror]' (s3fs for s3://: "
                              "'session-watchdog[s3]')") from err
        try:
            fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except ImportError as err:
            raise MirrorError(ERROR, f"mirror {url}: {err} (s3:// needs "
                              "pip install 'session-watchdog[s3]')") from err
        self.fs = fs
        self.root = root.rstrip("/")
        self.location = url.rstrip("/")

    def prepare(self, local_dir: Path, *, allow_same_filesystem: bool) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)  # a no-op on object stores with a bucket
        except Exception as err:
            raise MirrorError(classify(err), f"cannot use mirror {self.location}: {err}") from err

    def join(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _key(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def names(self) -> List[str]:
        self.fs.invalidate_cache(self.root)  # listings are cached: another runtime wrote here
        try:
            found = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(str(p).rstrip("/")) for p in found]

    def write(self, name: str, source_fd: int) -> int:
        written = 0
        with self.fs.open(self._key(name), "wb") as out:
            while True:
                block = os.read(source_fd, CHUNK)
                if not block:
                    break
                out.write(block)
                written += len(block)
        return written

    def read_chunks(self, name: str) -> Iterator[bytes]:
        self.fs.invalidate_cache(self._key(name))
        with self.fs.open(self._key(name), "rb", block_size=CHUNK, cache_type="none") as fh:
            while True:
                block = fh.read(CHUNK)
                if not block:
                    return
                yield block

    def read_small(self, name: str) -> bytes:
        data: bytes = self.fs.cat_file(self._key(name))
        if len(data) > MAX_MARKER_BYTES:
            raise MirrorError(MISMATCH, f"{self.join(name)} is too large for a marker")
        return data

    def write_marker(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(name), data)

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._key(name))
        except FileNotFoundError:
            pass


def _fsync_if_supported(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise


def _fsync_dir_if_supported(path: Path) -> None:
    try:
        fsync_dir(path)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def make_target(target: Union[str, os.PathLike[str], Target],
                storage_options: Optional[Mapping[str, Any]] = None) -> Target:
    """A Target for a path, a ``file://`` URL or any other fsspec URL."""
    if isinstance(target, Target):
        return target
    text = os.fspath(target)
    if "://" in text and not text.startswith("file://"):
        return FsspecTarget(text, storage_options)
    return LocalTarget(text[len("file://"):] if text.startswith("file://") else text)


# --------------------------------------------------------------------------------------------
# The mirror


@dataclass(frozen=True)
class _Candidate:
    seq: int
    step: int
    name: str
    marker: Dict[str, Any]


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

    def wait(self, saved: SavedCheckpoint, timeout: float) -> Optional[MirroredCheckpoint]:
        """Wait up to ``timeout`` s until ``saved`` (or a newer one) verified on the mirror."""
        seq = self._seq_of(saved)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                last = self._reported
                if last is not None and last.seq >= seq:
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
        local = [manager.parse_name(s.path.name) for s in manager.list()]
        local_top = max((p[0] for p in local if p is not None), default=0)
        try:
            candidates = self._committed()
        except Exception as err:
            self._failed(err, step=None)
            return None
        for cand in sorted(candidates, key=lambda c: c.seq, reverse=True):
            if cand.seq <= local_top:
                break
            try:
                self._copy_down(manager, cand)
            except Exception as err:
                _event(logging.WARNING, "mirror_restore_skipped", target=self.location,
                       name=cand.name, problem=classify(err), error=str(err))
                continue
            with self._cond:
                self._last = MirroredCheckpoint(
                    location=self.target.join(cand.name), name=cand.name, seq=cand.seq,
                    step=cand.step, sha256=str(cand.marker["sha256"]),
                    bytes=int(cand.marker["bytes"]), at=time.time(),
                    duration_s=0.0, copy_s=0.0)
                self._reported = self._last
                manager._last_seq = max(manager._last_seq, cand.seq)
            _event(logging.INFO, "mirror_restored", target=self.location, name=cand.name,
                   step=cand.step)
            self._report()
            return cand.name
        return None

    def _copy_down(self, manager: CheckpointManager, cand: _Candidate) -> None:
        final = manager.directory / cand.name
        tmp = temp_path_for(final)
        fd = open_exclusive(tmp)
        digest = hashlib.sha256()
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
            if size != cand.marker["bytes"] or digest.hexdigest() != cand.marker["sha256"]:
                raise MirrorError(MISMATCH, f"{self.target.join(cand.name)} does not match its "
                                  "marker (torn or changed on the mirror)")
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(manager.directory)
        channel.write_json(final.with_name(final.name + MARKER_SUFFIX), cand.marker)

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
            self._report()
            try:
                result = self._copy(saved, committed)
            except Exception as err:
                with self._cond:
                    self._busy = None
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
        """Copy one checkpoint; the module docstring's steps 1-4."""
        started = time.monotonic()
        target = self.target
        name = saved.path.name
        seq = self._seq_of(saved)
        marker_path = saved.path.with_name(name + MARKER_SUFFIX)
        marker = channel.read_json(marker_path)
        if marker is None:
            raise MirrorError(ERROR, f"{marker_path} is gone (pruned locally before it could "
                              "be mirrored)")
        target.check()
        try:
            fd = os.open(saved.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as err:  # not the mirror's fault: say so
            raise MirrorError(ERROR, f"{saved.path} is gone (pruned locally before it could "
                              "be mirrored)") from err
        written = False
        try:
            try:
                size = target.write(name, fd)
                written = True
            finally:
                os.close(fd)
            digest = hashlib.sha256()
            read = 0
            for block in target.read_chunks(name):  # from the target, never from the source
                digest.update(block)
                read += len(block)
            if size != marker["bytes"] or read != marker["bytes"] \
                    or digest.hexdigest() != marker["sha256"]:
                raise MirrorError(MISMATCH, f"{target.join(name)} read back {read} bytes that do "
                                  f"not match {marker_path}: {_HINTS[MISMATCH]}")
            target.write_marker(name + MARKER_SUFFIX,
                                json.dumps(marker, separators=(",", ":"), sort_keys=True).encode())
        except BaseException:
            if written:  # uncommitted data must not linger under a final name
                try:
                    target.delete(name)
                except Exception:  # the mirror is failing anyway; the next prune retries
                    pass
            raise
        now = time.monotonic()
        result = MirroredCheckpoint(
            location=target.join(name), name=name, seq=seq, step=saved.step,
            sha256=saved.sha256, bytes=saved.bytes, at=time.time(),
            duration_s=now - committed, copy_s=now - started)
        self._prune(seq)
        return result

    def _committed(self) -> List[_Candidate]:
        """Checkpoints on the mirror whose marker is present and well-formed (files unread)."""
        manager = self._manager
        assert manager is not None
        from session_watchdog.trainer.checkpoint import checkpoint_from_marker

        names = set(self.target.names())
        found = []
        for name in names:
            parsed = manager.parse_name(name)
            if parsed is None or name + MARKER_SUFFIX not in names:
                continue
            try:
                obj = json.loads(self.target.read_small(name + MARKER_SUFFIX))
            except (ValueError, OSError, MirrorError, channel.ChannelError):
                continue  # unreadable, not ours, or not JSON: never a resume candidate
            if not isinstance(obj, dict) or obj.get("v") != channel.SCHEMA_VERSION:
                continue
            if checkpoint_from_marker(obj, Path(name), parsed[1]) is None:
                continue
            found.append(_Candidate(parsed[0], parsed[1], name, obj))
        return found

    def _prune(self, newest_seq: int) -> None:
        """Keep the newest ``keep`` committed checkpoints; remove older ones and litter."""
        manager = self._manager
        assert manager is not None and self.keep is not None
        try:
            names = set(self.target.names())
            committed = sorted((manager.parse_name(n) or (0, 0))[0] for n in names
                               if manager.parse_name(n) and n + MARKER_SUFFIX in names)
            keep_from = committed[-self.keep] if len(committed) >= self.keep else 0
            doomed = []
            for name in names:
                parsed = manager.parse_name(name)
                if parsed is None or parsed[0] > newest_seq:
                    continue
                if parsed[0] < keep_from or (name + MARKER_SUFFIX not in names
                                             and parsed[0] < newest_seq):
                    doomed.append(name)
            for name in doomed:  # markers first: a cut-short prune leaves unmarked files only
                if name + MARKER_SUFFIX in names:
                    self.target.delete(name + MARKER_SUFFIX)
            for name in doomed:
                self.target.delete(name)
            for name in names:  # markers whose file is gone (a prune cut short elsewhere)
                stem = name[: -len(MARKER_SUFFIX)]
                parsed = manager.parse_name(stem) if name.endswith(MARKER_SUFFIX) else None
                if parsed is not None and stem not in names and parsed[0] < newest_seq:
                    self.target.delete(name)
            self.target.sweep()
        except Exception as err:  # committed already; a failed prune is retried next time
            _event(logging.WARNING, "mirror_prune_failed", target=self.location, error=str(err),
                   problem=classify(err))

    # ---- reporting ------------------------------------------------------------------------

    def _seq_of(self, saved: SavedCheckpoint) -> int:
        assert self._manager is not None
        parsed = self._manager.parse_name(saved.path.name)
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
               error=text, hint=_HINTS.get(problem, ""), training="continues")
        self._report()

    def _report(self) -> None:
        try:
            self._on_change(self.report())
        except Exception as err:  # reporting must never break the copy
            _event(logging.WARNING, "mirror_report_failed", error=str(err))


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
            _event(logging.WARNING, "mirror_failed", target=where,
                   problem=err.problem, error=str(err), training="continues")
            return None
    mirror.attach(manager, on_change)
    return mirror
