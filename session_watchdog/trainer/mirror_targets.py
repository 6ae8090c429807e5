"""Where a checkpoint mirror writes (trainer/mirror.py): a local directory or an fsspec URL.

The Target classes are the boundary to the second tier: tests and benchmarks subclass them
(``LocalTarget.write_chunk`` fails, stalls or throttles on purpose). ``classify`` maps what a
target raises to the problem codes reported in ``trainer.json``.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Union

from session_watchdog import channel
from session_watchdog.channel import fsync_dir, open_exclusive, temp_path_for

__all__ = [
    "FsspecTarget",
    "LocalTarget",
    "MirrorError",
    "Target",
    "classify",
    "make_target",
    "redact",
]

CHUNK = 8 << 20
MAX_MARKER_BYTES = channel.MAX_FILE_BYTES

# Problem codes, in trainer.json and the log.
UNREACHABLE = "unreachable"  # ENOTCONN & co: the mount or the network went away
FULL = "full"  # ENOSPC, EDQUOT (Drive quota), EFBIG
READ_ONLY = "read_only"  # EROFS, EACCES, EPERM
MISSING = "missing"  # the mirror directory is gone (unmounted, deleted)
SAME_FILESYSTEM = "same_filesystem"  # not a second copy: refused
MISMATCH = "mismatch"  # the copy read back from the target does not match the marker
ERROR = "error"  # anything else (an object store's error, ...)

HINTS = {
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


# --------------------------------------------------------------------------------------------
# Targets: the boundary to the second tier (tests and benchmarks subclass them)


class Target:
    """Where mirrored files go. Names are file names inside one directory or prefix; a name
    with ``/`` (a committed checkpoint directory's file) is created under its sub-directory."""

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

    def read_small(self, name: str, max_bytes: int = MAX_MARKER_BYTES) -> bytes:
        """A marker's bytes; larger than ``max_bytes``: an error (hostile, never a marker)."""
        raise NotImplementedError

    def write_marker(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def delete_tree(self, name: str) -> None:
        """Remove the directory (prefix) ``name`` and everything under it."""
        raise NotImplementedError

    def rename_tree(self, name: str, new: str) -> None:
        """Move the directory (prefix) ``name`` and everything under it to ``new`` (absent)."""
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
                              f"{local_dir} (st_dev {dev}): {HINTS[SAME_FILESYSTEM]}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._dev = os.stat(self.path).st_dev
        except OSError as err:
            raise MirrorError(classify(err), f"cannot create mirror {self.path}: {err}") from err
        if self._dev == local_dev and not allow_same_filesystem:  # a mount point in between
            raise MirrorError(SAME_FILESYSTEM, f"mirror {self.path} is on the same filesystem as "
                              f"{local_dir}: {HINTS[SAME_FILESYSTEM]}")

    def check(self) -> None:
        try:
            dev = os.stat(self.path).st_dev
        except OSError as err:
            raise MirrorError(classify(err), f"mirror {self.path}: {err.strerror or err}") from err
        if self._dev is not None and dev != self._dev:
            # Unmounted: the name now points into the filesystem underneath (the local disk).
            raise MirrorError(MISSING, f"mirror {self.path} is no longer the filesystem it was "
                              f"(st_dev {self._dev} -> {dev}): {HINTS[MISSING]}")

    def join(self, name: str) -> str:
        return str(self.path / name)

    def names(self) -> List[str]:
        return os.listdir(self.path)

    def open_temp(self, path: Path) -> int:
        return open_exclusive(path)

    def write_chunk(self, fd: int, data: memoryview) -> int:
        """Write some of ``data`` to ``fd``; return how much (the boundary tests fake)."""
        return os.write(fd, data)

    def _make_parents(self, final: Path) -> None:
        """Create the sub-directories of ``final`` below the mirror directory (never the mirror
        directory itself: a vanished one is not re-created), each fsynced into its parent."""
        parent = self.path
        for part in final.relative_to(self.path).parts[:-1]:
            child = parent / part
            try:
                os.mkdir(child, 0o755)
            except FileExistsError:
                pass
            else:
                _fsync_dir_if_supported(parent)
            parent = child

    def write(self, name: str, source_fd: int) -> int:
        final = self.path / name
        self._make_parents(final)
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
        _fsync_dir_if_supported(final.parent)
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

    def read_small(self, name: str, max_bytes: int = MAX_MARKER_BYTES) -> bytes:
        obj = channel.read_json(self.path / name, max_bytes)
        if obj is None:
            raise FileNotFoundError(errno.ENOENT, "no such marker", str(self.path / name))
        return json.dumps(obj).encode()

    def write_marker(self, name: str, data: bytes) -> None:
        channel.atomic_write(self.path / name, data)

    def delete(self, name: str) -> None:
        _unlink_quietly(self.path / name)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path / name)

    def delete_tree(self, name: str) -> None:
        try:
            shutil.rmtree(self.path / name)
        except FileNotFoundError:
            pass

    def rename_tree(self, name: str, new: str) -> None:
        os.rename(self.path / name, self.path / new)
        _fsync_dir_if_supported(self.path)

    def sweep(self) -> None:
        channel.sweep_temps(self.path)


class FsspecTarget(Target):
    """An fsspec URL (``s3://bucket/run1``, ``gs://...``): one object per file, no rename.

    An upload becomes visible only once complete, so there is no temp name; the marker object,
    written after the upload verified, is the commit. ``storage_options`` go to fsspec (e.g.
    ``{"client_kwargs": {"endpoint_url": ...}}`` for an S3-compatible store).
    """

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]] = None) -> None:
        shown = redact(url)  # what logs, trainer.json and notifications show: no password
        try:
            import fsspec
        except ImportError as err:
            raise MirrorError(ERROR, f"mirror {shown} needs fsspec and the filesystem's package: "
                              "pip install 'session-watchdog[mirror]' (s3fs for s3://: "
                              "'session-watchdog[s3]')") from err
        try:
            fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except ImportError as err:
            hint = ("pip install 'session-watchdog[s3]'" if url.startswith("s3://")
                    else "install the package named here")
            raise MirrorError(ERROR, f"mirror {shown}: {err} ({hint})") from err
        self.fs = fs
        self.root = root.rstrip("/")
        self.location = shown.rstrip("/")

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

    def read_small(self, name: str, max_bytes: int = MAX_MARKER_BYTES) -> bytes:
        data: bytes = self.fs.cat_file(self._key(name))
        if len(data) > max_bytes:
            raise MirrorError(MISMATCH, f"{self.join(name)} is too large for a marker")
        return data

    def write_marker(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(name), data)

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._key(name))
        except FileNotFoundError:
            pass

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self._key(name))
        return bool(self.fs.exists(self._key(name)))

    def delete_tree(self, name: str) -> None:
        try:
            self.fs.rm(self._key(name), recursive=True)
        except FileNotFoundError:
            pass

    def rename_tree(self, name: str, new: str) -> None:
        source, dest = self._key(name), self._key(new)
        self.fs.invalidate_cache(self.root)  # listings are cached: deletes just made
        for path in self.fs.find(source):  # server-side copies, then the source goes
            self.fs.copy(path, dest + str(path)[len(source.rstrip("/")):])
        self.delete_tree(name)


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


def redact(location: str) -> str:
    """``location`` as shown anywhere (log, trainer.json, notifier): a URL's user and password
    (``sftp://user:password@host/...``) replaced by ``***``."""
    scheme, sep, rest = location.partition("://")
    if not sep:
        return location
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return location
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"


def make_target(target: Union[str, os.PathLike[str], Target],
                storage_options: Optional[Mapping[str, Any]] = None) -> Target:
    """A Target for a path, a ``file://`` URL or any other fsspec URL."""
    if isinstance(target, Target):
        return target
    text = os.fspath(target)
    if "://" in text and not text.startswith("file://"):
        return FsspecTarget(text, storage_options)
    return LocalTarget(text[len("file://"):] if text.startswith("file://") else text)
