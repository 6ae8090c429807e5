"""Crash-safe checkpoints: save, verify, keep-last-K, resume.

The only module of the package that imports torch at import time (DESIGN.md, "Layout").

On-disk protocol, per save (all files in the checkpoint directory itself, never ``$TMPDIR``: a
rename is only atomic within one filesystem):

1. ``torch.save`` into a fresh temp file next to the target (``channel.temp_path_for`` +
   ``channel.open_exclusive``: O_EXCL|O_NOFOLLOW, mode 0600), checksumming every byte on its way
   out so the checksum (CRC32C, ``session_watchdog.checksum``) costs no second read; every 32 MiB
   written, writeback of what is written is started (sync_file_range), so the disk works while
   torch serializes the rest;
2. fsync the temp file, ``os.replace`` it to its final, never-reused name
   ``<prefix>-<seq:08d>-step<step>.pt`` and fsync the directory;
3. commit: write the marker ``<name>.sha256`` (JSON ``{v, file, checksum, bytes, step, epoch,
   at, duration_s}``; the name predates checksums, and older markers with a ``sha256`` field
   instead of ``checksum`` still verify) with ``channel.write_json`` (temp -> fsync -> replace);
4. only then delete checkpoints beyond the newest ``keep``: marker first, so that a deletion cut
   short leaves an *unmarked* file (ignored), never a marker whose file is gone or half-deleted.

A checkpoint exists for resuming only once its marker does and the marker's size and checksum
match the file. Anything else (torn, unmarked, empty, bad marker) is set aside as ``.broken``
(one kept, for a post-mortem) by :meth:`CheckpointManager.latest`. A failed save removes its temp
file and leaves every committed checkpoint as it was; a failed fsync is never retried on the same
file (its dirty pages may already be dropped: "fsyncgate", https://lwn.net/Articles/752063/),
the next save starts over with a fresh temp file.

Loading always uses ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import bisect
import collections
import copy
import ctypes
import errno
import logging
import os
import pickle
import random
import re
import shutil
import stat
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union, cast

import torch

from session_watchdog import channel, checksum, ckptfile, mounts
from session_watchdog.channel import fsync_dir, open_exclusive, temp_path_for, write_json
from session_watchdog.trainer.buffers import Work, copy_all, is_plain, page_in
from session_watchdog.trainer.priority import Yielding

__all__ = [
    "CheckpointDirError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointStateError",
    "CheckpointWriteError",
    "PendingSave",
    "SavedCheckpoint",
    "capture_state",
    "check_state",
    "restore_state",
]

_log = logging.getLogger(__name__)

_TORCH_SAVE_CONFIG: Any
try:  # torch >= 2.6
    import torch.utils.serialization as _torch_serialization

    _TORCH_SAVE_CONFIG = _torch_serialization.config.save
except (ImportError, AttributeError):  # pragma: no cover - older torch always writes crc32
    _TORCH_SAVE_CONFIG = None

STATE_FORMAT = 1  # version of the dict built by capture_state
MARKER_SUFFIX = ckptfile.MARKER_SUFFIX
BROKEN_SUFFIX = ".broken"
# channel owns the temp-name format; learn its suffix from it instead of copying a private name.
_TEMP_SUFFIX = temp_path_for(Path("x")).suffix
_COALESCE = 1 << 20  # torch.save emits many tiny zip headers: batch them into one write()
_WRITEBACK_EVERY = 32 << 20  # start the disk on what is written so far, every this many bytes
_UNLINK_AHEAD_BYTES = 64 << 20  # pruned files this large are unlinked by a helper thread
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _event(level: int, event: str, **fields: Any) -> None:
    """Log an event with fields, as trainer/session.py does: stdlib logging, since the trainer
    process should not pay for importing structlog; ``record.event``/``record.fields`` carry data.
    """
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


# --------------------------------------------------------------------------------------------
# Errors


class CheckpointError(Exception):
    """Base class of every checkpoint error."""


class CheckpointStateError(CheckpointError):
    """The state holds an object that cannot be pickled or would not load with weights_only."""


class CheckpointDirError(CheckpointError):
    """The checkpoint directory cannot be used: not creatable or writable, or on storage that is
    not mounted (Drive, AutoDL file storage). The message is one line naming the fix."""


class CheckpointWriteError(CheckpointError):
    """A save failed; the temp file is gone and every committed checkpoint is intact.

    Attributes:
        path: the checkpoint file that was being written.
        errno: the OS error number (ENOSPC, EFBIG, EIO, EROFS, ...) when the cause is an OSError.
        cause: the underlying exception (the real OSError, dug out of torch's RuntimeError).
        needed_bytes: the size the checkpoint needs (exact when serialization finished, else an
            estimate from the tensor payload or the previous checkpoint), when known.
        free_bytes: free space on the checkpoint filesystem after the failure, when known.
        previous: the newest committed checkpoint, untouched by the failed save, if any.
    """

    def __init__(
        self,
        path: Path,
        cause: BaseException,
        *,
        errno: Optional[int] = None,
        needed_bytes: Optional[int] = None,
        free_bytes: Optional[int] = None,
        previous: Optional[Path] = None,
    ) -> None:
        self.path = path
        self.cause = cause
        self.errno = errno
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        self.previous = previous
        super().__init__(_describe_write_error(path, cause, errno, needed_bytes, free_bytes,
                                               previous))


def _describe_write_error(
    path: Path,
    cause: BaseException,
    err_no: Optional[int],
    needed: Optional[int],
    free: Optional[int],
    previous: Optional[Path],
) -> str:
    if err_no is not None:
        name = errno.errorcode.get(err_no, str(err_no))
        reason = f"{name} ({os.strerror(err_no)})"
    else:
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    parts = [f"cannot save checkpoint {path}: {reason}"]
    space = []
    if err_no not in (errno.ENOSPC, errno.EDQUOT):
        # Bytes needed vs free explain a full disk only; after EINTR (a signal) or EIO they
        # would send the user looking for space that is there (issue 18).
        needed = free = None
    if needed is not None:
        space.append(f"needs {_human(needed)}")
    if free is not None:
        space.append(f"{_human(free)} free")
    if space:
        parts.append(", ".join(space))
    if previous is not None:
        parts.append(f"previous checkpoint {previous} is intact")
    return "; ".join(parts)


def _human(n: int) -> str:
    """``1048576 bytes (1.0 MiB)``: exact for scripts, readable for people."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} bytes ({size:.1f} {unit})" if unit != "B" else f"{n} bytes"
        size /= 1024
    raise AssertionError("unreachable")


def _find_oserror(exc: BaseException) -> Optional[OSError]:
    """The first OSError with an errno in ``exc``'s cause/context chain (torch hides it there)."""
    seen: Set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SavedCheckpoint:
    """A committed checkpoint, as described by its marker.

    ``at`` is wall-clock time (``time.time()``) of the commit; ``duration_s`` is how long the
    save took (for an async save: the background write, not the snapshot).
    """

    path: Path
    step: int
    epoch: int
    bytes: int
    sha256: str  # the sha256 of checkpoints written before checksums; "" for newer ones
    duration_s: float
    at: float
    checksum: str = ""  # "<algorithm>:<hex>" (session_watchdog/checksum.py): what verifies

    def __post_init__(self) -> None:
        if not self.checksum and self.sha256:
            object.__setattr__(self, "checksum", f"sha256:{self.sha256}")


class PendingSave:
    """An async save in flight: ``done()`` polls, ``result()`` waits (and raises its error)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._future: Future[SavedCheckpoint] = Future()
        self._reported = False  # its error was raised to someone: the next save must not repeat it
        self._yielding = Yielding()  # the writer runs at idle priority until someone waits

    def hurry(self) -> None:
        """Let the write run at normal priority from now on (someone waits for it)."""
        self._yielding.hurry()

    def done(self) -> bool:
        """Whether the background write has finished (committed or failed)."""
        return self._future.done()

    def result(self, timeout: Optional[float] = None, *, hurry: bool = True) -> SavedCheckpoint:
        """Wait for the write; return its checkpoint or raise its ``CheckpointWriteError``.

        The write runs at idle CPU priority so that it does not slow training down; waiting for
        it with ``hurry`` (the default) restores its normal priority first, so a busy machine
        cannot starve it. A watcher thread that waits while training goes on passes False.

        Raises:
            TimeoutError: (``concurrent.futures.TimeoutError``) when ``timeout`` passes first.
        """
        if hurry:
            self.hurry()
        try:
            return self._future.result(timeout)
        except CheckpointError:
            self._reported = True
            raise


# --------------------------------------------------------------------------------------------
# What may go into a checkpoint


def _exact_allowed_types() -> Tuple[type, ...]:
    # Mirrors torch's weights-only allow-list (torch/_weights_only_unpickler.py) for the types a
    # state can hold; checked up front so a save cannot succeed and then fail at resume time.
    return (
        dict, collections.OrderedDict, collections.Counter, list, tuple, set,
        str, bytes, bytearray, int, float, complex, bool, type(None),
        torch.Size, torch.device, torch.dtype, torch.Tensor, torch.nn.Parameter,
    )


def _safe_globals() -> Set[Any]:
    # Classes the user registered with torch.serialization.add_safe_globals() load fine too.
    getter = getattr(torch.serialization, "get_safe_globals", None)
    if getter is None:
        return set()
    found: Set[Any] = set()
    for entry in getter():
        found.add(entry[0] if isinstance(entry, tuple) else entry)
    return found


def _render(path: Tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{key!r}]" for key in path)


def check_state(state: Any) -> int:
    """Check that ``state`` would load with ``torch.load(weights_only=True)``.

    Returns the tensor payload in bytes (each storage counted once), the bulk of the file size.

    Raises:
        CheckpointStateError: naming the first offending object and where it sits.
    """
    return _inspect_state(state)[0]


def _inspect_state(state: Any) -> Tuple[int, List[Tuple[int, int]]]:
    """:func:`check_state`, plus the address ranges of the state's CPU tensor storages."""
    allowed = _exact_allowed_types()
    registered = _safe_globals()
    storages: Dict[Tuple[str, int], int] = {}
    on_path: Set[int] = set()

    def visit(obj: Any, path: Tuple[Any, ...]) -> None:
        kind = type(obj)
        if kind in (torch.Tensor, torch.nn.Parameter):
            try:
                storage = obj.untyped_storage()
                storages[(obj.device.type, storage.data_ptr())] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse / exotic layouts: no estimate
                pass
            return
        if kind not in allowed and kind not in registered:
            raise CheckpointStateError(
                f"{_render(path)} is a {kind.__module__}.{kind.__qualname__}, which "
                "torch.load(weights_only=True) would refuse; store plain tensors, numbers, "
                "strings, lists and dicts (or register the class with "
                "torch.serialization.add_safe_globals)"
            )
        if kind in (dict, collections.OrderedDict, collections.Counter, list, tuple, set):
            if id(obj) in on_path:
                raise CheckpointStateError(f"{_render(path)} contains itself (a reference cycle)")
            on_path.add(id(obj))
            if isinstance(obj, dict):
                for key, value in obj.items():
                    visit(key, (*path, key))
                    visit(value, (*path, key))
            else:
                for index, value in enumerate(obj):
                    visit(value, (*path, index))
            on_path.discard(id(obj))

    if not isinstance(state, dict):
        raise CheckpointStateError(f"a checkpoint state must be a dict, not {type(state).__name__}")
    visit(state, ())
    cpu = [(ptr, ptr + size) for (device, ptr), size in storages.items()
           if device == "cpu" and ptr != 0]
    return sum(storages.values()), cpu


# --------------------------------------------------------------------------------------------
# Writing: one pass that writes, counts and hashes


_hash_pool: Optional[ThreadPoolExecutor] = None
_hash_pool_lock = threading.Lock()
_crc32_lock = threading.Lock()  # our saves take turns on torch's process-wide crc32 setting


def _reset_after_fork() -> None:
    # A forked child (DataLoader worker, a test's child) inherits the pool object but not its
    # thread: submitting to it would wait forever. Locks held by a parent thread at fork time
    # would never be released in the child. Start over in the child.
    global _hash_pool, _hash_pool_lock, _crc32_lock
    _hash_pool = None
    _hash_pool_lock = threading.Lock()
    _crc32_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


_in_flight: weakref.WeakSet[PendingSave] = weakref.WeakSet()
_exit_hook_registered = False


def _hurry_at_exit(pending: PendingSave) -> None:
    """At interpreter exit, run ``pending``'s write at normal priority while it is joined.

    The writer is not a daemon thread: the interpreter joins it before exiting, and a write at
    idle priority on a busy machine would keep the process alive that much longer. Hooks from
    ``threading._register_atexit`` run before that join (``atexit`` ones only after it).
    """
    global _exit_hook_registered
    _in_flight.add(pending)
    if not _exit_hook_registered:
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(_hurry_all)
            except RuntimeError:  # already shutting down: nothing left to hurry for
                return
        _exit_hook_registered = True


def _hurry_all() -> None:
    for pending in list(_in_flight):
        pending.hurry()


def _hasher_thread() -> ThreadPoolExecutor:
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sw-ckpt-hash")
        return _hash_pool


def _address_of(view: memoryview) -> Optional[int]:
    """Where a (read-only) buffer's bytes live, or None when that cannot be told cheaply."""
    np = _numpy()
    if np is None:
        return None
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_sync_file_range: Any = None  # resolved once: the libc function, or False where there is none


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+nbytes)`` of ``fd`` to disk now.

    Without it the disk idles while torch serializes and the final fsync writes the whole file;
    with it the fsync waits only for the tail. Linux only (sync_file_range(2), not in ``os``);
    elsewhere, and on any error, it does nothing: the fsync that follows is what reports errors
    and what makes the file durable (a writeback error stays recorded for it, errseq).
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).sync_file_range
                function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                function.restype = ctypes.c_int
                _sync_file_range = function
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _skip_torch_crc32() -> Callable[[], None]:
    """Turn off torch.save's per-record crc32 until the returned callable is called.

    The checksum of the whole file already covers every byte, and zip crc32 (miniz, one core)
    costs about 0.3 s per GB on the critical path. torch documents that files saved without it
    still load with torch.load (``torch.serialization.set_crc32_options``). The setting is
    process-wide and read when torch.save opens its writer, so it is restored at our writer's
    first write (or when torch.save ends), and our own saves take turns on it.
    """
    save_config = _TORCH_SAVE_CONFIG
    if save_config is None or not hasattr(save_config, "compute_crc32"):
        return lambda: None
    lock = _crc32_lock
    lock.acquire()
    previous = save_config.compute_crc32
    save_config.compute_crc32 = False
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            restored = True
            save_config.compute_crc32 = previous
            lock.release()

    return restore


class _HashingWriter:
    """A write-only file object over a raw fd that hashes and counts what passes through.

    Every byte is hashed by one helper thread, in order (a FIFO queue), while this thread goes
    on writing: ``os.write`` and the checksum functions release the GIL. torch.save hands each tensor
    storage to ``write`` as one memoryview of the storage's own memory. When that memory is a CPU
    storage of the state being saved (``stable``: alive and unchanged until the save returns), the
    hash may lag behind and finishes while torch serializes the next record and while the file
    is fsynced; any other memory (torch's temporary copies of GPU storages) is hashed before
    ``write`` returns, since torch may free it right after. Small writes (zip headers) are
    batched into a private buffer first.

    :meth:`settle` must run before the save returns or raises: the helper reads caller memory.
    """

    def __init__(
        self,
        fd: int,
        stable: Sequence[Tuple[int, int]] = (),
        on_first_write: Optional[Callable[[], None]] = None,
        inline_hash: bool = False,
    ) -> None:
        # Deliberately not an io.RawIOBase: its finalizer would flush() into an fd we closed.
        self._fd = fd
        # An async save's writer runs at idle priority (priority.py): the shared helper thread
        # would hash its bytes at normal priority, taking the CPU from training. Hash here.
        self._inline_hash = inline_hash
        self._on_first_write = on_first_write
        self.algorithm = checksum.preferred()
        self._sha = checksum.new(self.algorithm)
        self._pending = bytearray()
        self._stable = sorted(stable)
        self._starts = [start for start, _ in self._stable]
        self._last: Optional[Future[None]] = None  # FIFO: when it is done, all before it are
        self._written = 0  # bytes on their way to the file (count lags for big writes)
        self._writeback_from = 0  # first byte not yet handed to _start_writeback
        self.count = 0
        self.error: Optional[OSError] = None  # the OSError we raised, if torch wraps it

    def write(self, data: Any) -> int:
        callback = self._on_first_write
        if callback is not None:
            self._on_first_write = None
            callback()
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size < _COALESCE:
            self._pending += view
            if len(self._pending) >= _COALESCE:
                self._drain()
        else:
            self._drain()
            hashed = self._hash(view)
            try:
                self._write_all(view)
            finally:
                if not self._is_stable(view, size):
                    hashed.result()
        self.count += size
        return size

    def flush(self) -> None:
        self._drain()

    def settle(self) -> None:
        """Wait until every byte written so far has been hashed."""
        if self._last is not None:
            self._last.result()

    def hexdigest(self) -> str:
        self.settle()
        return f"{self.algorithm}:{self._sha.hexdigest()}"

    def _hash(self, view: memoryview) -> Future[None]:
        if self._inline_hash:
            self._sha.update(view)
            done: Future[None] = Future()
            done.set_result(None)
            return done
        self._last = _hasher_thread().submit(self._sha.update, view)
        return self._last

    def _is_stable(self, view: memoryview, size: int) -> bool:
        if not self._stable:
            return False
        address = _address_of(view)
        if address is None:
            return False
        index = bisect.bisect_right(self._starts, address) - 1
        return index >= 0 and address + size <= self._stable[index][1]

    def _drain(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, bytearray()  # ours alone: hash may lag
            self._hash(memoryview(pending))
            self._write_all(memoryview(pending))

    def _write_all(self, view: memoryview) -> None:
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._written += written
        except OSError as err:
            self.error = err
            raise
        if self._written - self._writeback_from >= _WRITEBACK_EVERY:
            _start_writeback(self._fd, self._writeback_from, self._written - self._writeback_from)
            self._writeback_from = self._written


# --------------------------------------------------------------------------------------------
# Snapshot buffers for async saves


def _tensor_leaves(obj: Any, path: Tuple[Any, ...]) -> List[Tuple[Tuple[Any, ...], torch.Tensor]]:
    """``(path, tensor)`` for every tensor in ``obj``, keyed as ``_snapshot`` keys its buffers."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    found: List[Tuple[Tuple[Any, ...], torch.Tensor]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found.extend(_tensor_leaves(value, (*path, key)))
    elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            found.extend(_tensor_leaves(value, (*path, index)))
    return found


def _new_buffer(data: torch.Tensor) -> torch.Tensor:
    pin = data.is_cuda  # pinned host memory makes the device-to-host copy async
    return torch.empty(data.shape, dtype=data.dtype, device="cpu", pin_memory=pin)


def _copy_into(buf: torch.Tensor, data: torch.Tensor) -> None:
    """Copy ``data`` into the CPU buffer ``buf`` (same shape and dtype).

    Contiguous CPU memory is one ``memmove`` on this thread: torch's ``copy_`` splits large
    copies over its intra-op thread pool, whose barrier waits for the slowest thread, and on a
    busy machine (the training loop, DataLoader workers) that made a 256 MiB copy take 0.3-1.5 s
    instead of 20 ms (benchmarks/bench_checkpoint.py, issue 17).
    """
    if data.device.type == "cpu" and data.is_contiguous() and buf.is_contiguous() \
            and data.dtype == buf.dtype and data.numel() == buf.numel():
        nbytes = data.numel() * data.element_size()
        if nbytes:
            ctypes.memmove(buf.data_ptr(), data.data_ptr(), nbytes)
        return
    buf.copy_(data, non_blocking=data.is_cuda)


# --------------------------------------------------------------------------------------------
# The manager


@dataclass(frozen=True)
class _Entry:
    """A file in the checkpoint directory that has a checkpoint's final name."""

    seq: int
    step: int
    path: Path

    @property
    def marker(self) -> Path:
        return self.path.with_name(self.path.name + MARKER_SUFFIX)


class CheckpointManager:
    """Writes, verifies, prunes and finds checkpoints in one directory.

    One saver per directory: ``latest()`` is meant for resume time, when no other process is
    saving into the directory (a checkpoint between rename and marker looks unmarked).
    """

    def __init__(self, directory: Union[Path, str], keep: int = 2, prefix: str = "ckpt",
                 mount_roots: Sequence[mounts.MountRoot] = mounts.MOUNT_ROOTS) -> None:
        """Open (or create, mode 0700) ``directory`` and sweep our own stale temp files.

        Raises:
            ValueError: ``keep`` below 1 or a ``prefix`` that is not a plain file-name stem.
            CheckpointDirError: ``directory`` is under a mount root of ``mount_roots`` that is
                not mounted, or it cannot be created or written.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is not valid: keep at least 1 checkpoint")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix={prefix!r} is not valid: use letters, digits, '_.+-'")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.prefix = prefix
        self._final_re = ckptfile.final_re(prefix)
        self._owned_re = ckptfile.owned_re(prefix)
        self._temp_re = re.compile(
            rf"^\.{re.escape(prefix)}-\d{{8,}}-step\d+\.pt(?:{re.escape(MARKER_SUFFIX)})?\..*"
            rf"{re.escape(_TEMP_SUFFIX)}$"
        )
        self._lock = threading.Lock()  # held while a checkpoint is written (sync or background)
        self._last_seq = 0
        self._pending: Optional[PendingSave] = None
        self._spare: Dict[Tuple[Any, ...], torch.Tensor] = {}  # snapshot buffers to reuse
        self._prepare_thread: Optional[threading.Thread] = None  # prepare_async's page-in
        self._prepare_work = Work([])  # what that thread pages in (buffers.page_in)
        self._pruner: Optional[threading.Thread] = None  # unlinks large pruned files (_prune)
        self._kept_ahead: Set[int] = set()  # seqs exempt from pruning (keep_ahead_of)
        self._verified: Dict[Path, Tuple[float, int]] = {}  # verify() passes: (at, mtime_ns)
        self._verified_lock = threading.Lock()
        _open_directory(self.directory, mount_roots)
        self._sweep_temps()

    # ---- saving --------------------------------------------------------------------------

    def save(self, state: Dict[str, Any], *, step: int, epoch: int = 0) -> SavedCheckpoint:
        """Write ``state`` and commit it; durable when this returns.

        Waits for an async save still in flight first.

        Raises:
            CheckpointWriteError: the write failed (also an unreported failure of the previous
                async save, raised before this save starts); committed checkpoints are intact.
            CheckpointStateError: the state holds something that cannot be saved and loaded.
        """
        self._drain_pending()
        payload, stable = _inspect_state(state)
        with self._lock:
            return self._write(state, step=step, epoch=epoch, payload=payload, stable=stable)

    def save_async(self, state: Dict[str, Any], *, step: int, epoch: int = 0) -> PendingSave:
        """Copy ``state``'s tensors to CPU memory now and write them in a background thread.

        Training may mutate the model as soon as this returns. The snapshot buffers are kept
        and reused by the next async save (first-touch page faults cost more than the copy).

        Raises:
            CheckpointWriteError: an unreported failure of the previous async save.
            CheckpointStateError: as for :meth:`save`, raised here, before anything is written.
        """
        self._drain_pending()
        payload = check_state(state)
        snapshot, buffers = self._snapshot(state)
        pending = PendingSave(step)
        self._pending = pending
        # Not a daemon thread: the interpreter waits for it at exit, so the checkpoint the
        # training loop asked for still lands when the script ends right after asking.
        worker = threading.Thread(
            target=self._write_in_background,
            args=(snapshot, buffers, step, epoch, payload, pending),
            name=f"sw-checkpoint-save-{step}",
        )
        try:
            worker.start()
        except RuntimeError as err:  # "can't start new thread": nothing is in flight then
            self._pending = None
            self._spare = buffers
            raise CheckpointWriteError(self.directory, err) from err
        _hurry_at_exit(pending)
        return pending

    def hurry(self) -> None:
        """Let the async save in flight, if any, run at normal CPU priority from now on."""
        pending = self._pending
        if pending is not None:
            pending.hurry()

    def wait(self) -> Optional[SavedCheckpoint]:
        """Wait for the most recent async save; None when there was none (or its error was raised).

        Raises:
            CheckpointWriteError: that save failed (raised once).
        """
        pending = self._pending
        if pending is None:
            return None
        try:
            return pending.result()
        except CheckpointError:
            self._pending = None
            raise

    def _drain_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        pending.hurry()  # the caller is blocked on it: let it have the CPU
        try:
            pending._future.result()
        except CheckpointError:
            if not pending._reported:
                pending._reported = True
                self._pending = None
                raise

    def _write_in_background(
        self,
        snapshot: Dict[str, Any],
        buffers: Dict[Tuple[Any, ...], torch.Tensor],
        step: int,
        epoch: int,
        payload: int,
        pending: PendingSave,
    ) -> None:
        pending._yielding.lower()  # training has the CPU first (priority.py)
        try:
            stable = _inspect_state(snapshot)[1]  # the snapshot is ours: its memory stays put
            with self._lock:
                saved = self._write(snapshot, step=step, epoch=epoch, payload=payload,
                                    stable=stable, inline_hash=True)
        except BaseException as err:  # the thread's only way out: hand everything to the caller
            pending._yielding.finished()
            self._spare = buffers
            if not isinstance(err, CheckpointError):
                err = CheckpointWriteError(self.directory, err, errno=getattr(err, "errno", None))
            pending._future.set_exception(err)
            return
        pending._yielding.finished()
        self._spare = buffers  # before set_result: the next snapshot happens after it
        pending._future.set_result(saved)

    def prepare_async(self, state: Dict[str, Any]) -> None:
        """Allocate and page in the snapshot buffers for ``state`` now, in a background thread.

        The first :meth:`save_async` then only copies into memory that is already mapped, as
        every later one does: first-touch page faults (the kernel zero-fills each page) cost
        several times the copy itself. Idempotent; a save that comes before the page-in is done
        pages in what is left alongside the background thread, then copies.
        """
        self._join_prepare()
        if self._spare:
            return
        buffers: Dict[Tuple[Any, ...], torch.Tensor] = {}
        seen: Set[int] = set()  # a tensor twice (tied weights) gets one buffer, as in _snapshot
        for path, tensor in _tensor_leaves(state, ()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            data = tensor.detach()
            if data.layout == torch.strided and not data.is_quantized:
                buffers[path] = _new_buffer(data)
        # Pinned buffers (for CUDA state) are resident from the start: nothing to fault in.
        work = page_in([buf for buf in buffers.values() if not buf.is_pinned()])
        worker = threading.Thread(target=work.run, name="sw-checkpoint-prepare", daemon=True)
        self._spare = buffers
        self._prepare_work = work
        worker.start()
        self._prepare_thread = worker  # only once started: _join_prepare joins it

    def _join_prepare(self) -> None:
        worker, self._prepare_thread = self._prepare_thread, None
        if worker is not None:
            self._prepare_work.run()  # a save that comes early pages in the rest alongside it
            worker.join()  # its memset must not race our copy into the same buffers

    def _snapshot(
        self, state: Dict[str, Any]
    ) -> Tuple[Dict[str, Any], Dict[Tuple[Any, ...], torch.Tensor]]:
        """Deep-copy ``state`` with every tensor copied into CPU memory (reusing old buffers)."""
        self._join_prepare()
        spare, self._spare = self._spare, {}
        used: Dict[Tuple[Any, ...], torch.Tensor] = {}
        memo: Dict[int, torch.Tensor] = {}  # the same tensor twice (tied weights) stays shared
        cuda_devices: Set[torch.device] = set()
        # Plain memmoves, copied after the walk: into fresh buffers on several threads (their
        # page faults are most of a first save's stall), into reused ones on this thread alone
        # (memory bandwidth bounds that copy; a helper gained nothing there). buffers.py.
        fresh: List[Tuple[torch.Tensor, torch.Tensor]] = []
        reused: List[Tuple[torch.Tensor, torch.Tensor]] = []

        def tensor_copy(src: torch.Tensor, path: Tuple[Any, ...]) -> torch.Tensor:
            if id(src) in memo:
                return memo[id(src)]
            data = src.detach()
            if data.layout != torch.strided or data.is_quantized:
                out = data.to("cpu", copy=True)  # exotic layouts: plain copy, no reuse
            else:
                buf = spare.get(path)
                plain = reused
                if buf is None or buf.shape != data.shape or buf.dtype != data.dtype:
                    buf = _new_buffer(data)
                    plain = fresh
                if is_plain(buf, data):
                    plain.append((buf, data))
                else:
                    _copy_into(buf, data)
                if data.is_cuda:
                    cuda_devices.add(data.device)
                used[path] = buf
                out = buf
            if type(src) is torch.nn.Parameter:
                out = torch.nn.Parameter(out, requires_grad=src.requires_grad)
            memo[id(src)] = out
            return out

        def walk(obj: Any, path: Tuple[Any, ...]) -> Any:
            if isinstance(obj, torch.Tensor):
                return tensor_copy(obj, path)
            if isinstance(obj, dict):
                items = [(key, walk(value, (*path, key))) for key, value in obj.items()]
                if type(obj) is collections.Counter:
                    return collections.Counter(dict(items))
                return type(obj)(items)
            if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
                return type(obj)(walk(value, (*path, i)) for i, value in enumerate(obj))
            return copy.deepcopy(obj)

        snapshot = walk(state, ())
        copy_all(reused, threads=1)
        copy_all(fresh)
        for device in cuda_devices:
            torch.cuda.synchronize(device)
        return snapshot, used

    def _write(
        self,
        state: Dict[str, Any],
        *,
        step: int,
        epoch: int,
        payload: int,
        stable: Sequence[Tuple[int, int]],
        inline_hash: bool = False,
    ) -> SavedCheckpoint:
        """The save protocol (module docstring); the caller holds ``self._lock``."""
        self._join_pruner()  # the space of the files pruned last time is free before we write
        started = time.monotonic()
        seq = max(self._last_seq, self._max_owned_seq()) + 1  # names are never reused
        self._last_seq = seq
        final = self._final_path(seq, step)
        marker = final.with_name(final.name + MARKER_SUFFIX)
        previous = self._newest_marked()
        writer: Optional[_HashingWriter] = None  # set once the temp file is open
        serialized = False

        def fail(err: BaseException) -> CheckpointWriteError:
            needed: Optional[int]
            if serialized and writer is not None:
                needed = writer.count  # exact
            elif payload > 0:
                needed = max(payload, writer.count if writer is not None else 0)
            else:
                needed = previous.bytes if previous is not None else None
            os_err = (writer.error if writer is not None else None) or _find_oserror(err)
            return CheckpointWriteError(
                final,
                os_err if os_err is not None else err,
                errno=os_err.errno if os_err is not None else None,
                needed_bytes=needed,
                free_bytes=self._free_bytes(),  # measured after our temp file is gone
                previous=previous.path if previous is not None else None,
            )

        tmp = temp_path_for(final)
        try:
            fd = open_exclusive(tmp)
        except OSError as err:
            raise fail(err) from err
        restore_crc32 = _skip_torch_crc32()
        writer = _HashingWriter(fd, stable, on_first_write=restore_crc32, inline_hash=inline_hash)
        try:
            try:
                try:
                    try:
                        torch.save(state, cast(IO[bytes], writer))  # calls write/flush only
                    finally:
                        restore_crc32()
                    writer.flush()
                except (pickle.PicklingError, TypeError, AttributeError) as err:
                    if writer.error is None and _find_oserror(err) is None:
                        raise CheckpointStateError(
                            f"cannot serialize the checkpoint state: {err}"
                        ) from err
                    raise
                serialized = True
                os.fsync(fd)  # the hash helper finishes meanwhile
                digest = writer.hexdigest()
            finally:
                writer.settle()  # the helper reads the caller's tensors: never outlive the call
        except CheckpointStateError:
            _close_and_unlink(fd, tmp)
            raise
        except Exception as err:
            # Never fsync this file again after a failure: discard it, the next save starts fresh.
            _close_and_unlink(fd, tmp)
            raise fail(err) from err
        except BaseException:  # KeyboardInterrupt, SystemExit: clean up, do not disguise
            _close_and_unlink(fd, tmp)
            raise
        os.close(fd)

        try:
            os.replace(tmp, final)
        except BaseException as err:
            _unlink_quietly(tmp)
            if isinstance(err, Exception):
                raise fail(err) from err
            raise
        try:
            fsync_dir(self.directory)
            saved = SavedCheckpoint(
                path=final, step=step, epoch=epoch, bytes=writer.count, sha256="",
                duration_s=time.monotonic() - started, at=time.time(), checksum=digest,
            )
            write_json(marker, self._marker_json(saved))  # the commit point
        except BaseException as err:
            # Not committed: remove the marker (in case its rename landed) before the file.
            _unlink_quietly(marker)
            _unlink_quietly(final)
            if isinstance(err, Exception):
                raise fail(err) from err
            raise
        self._prune(seq)
        return saved

    def _marker_json(self, saved: SavedCheckpoint) -> Dict[str, Any]:
        return ckptfile.marker_json(file=saved.path.name, checksum=saved.checksum,
                                    size=saved.bytes, step=saved.step, epoch=saved.epoch,
                                    at=saved.at, duration_s=saved.duration_s)

    def _free_bytes(self) -> Optional[int]:
        try:
            return shutil.disk_usage(self.directory).free
        except OSError:
            return None

    def _final_path(self, seq: int, step: int) -> Path:
        return self.directory / ckptfile.final_name(self.prefix, seq, step)

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


# --------------------------------------------------------------------------------------------
# Training state <-> checkpoint dict


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for the trainer
        return None
    return numpy


def capture_state(
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int,
    step: int,
    elapsed_s: float,
    extras: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Everything needed to resume training bit-identically, as weights-only-loadable data.

    State dicts of the given objects (None ones omitted) and the RNG states of Python, numpy
    (when importable), torch CPU and every CUDA device (when available). Python's and numpy's
    RNG states are tuples with numpy arrays, which ``weights_only`` loading refuses, so they are
    stored as plain ints and lists and converted back by :func:`restore_state`.
    """
    state: Dict[str, Any] = {"format": STATE_FORMAT}
    for key, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                     ("scaler", scaler)):
        if obj is not None:
            state[key] = obj.state_dict()
    version, internal, gauss = random.getstate()
    rng: Dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        rng["numpy"] = {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    # Only when this process has used CUDA: querying the states would otherwise create a CUDA
    # context (hundreds of MB per GPU) in a run that trains on the CPU.
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state["rng"] = rng
    state["epoch"] = int(epoch)
    state["step"] = int(step)
    state["elapsed_s"] = float(elapsed_s)
    state["extras"] = dict(extras) if extras else {}
    return state


def restore_state(
    state: Dict[str, Any],
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> Dict[str, Any]:
    """Load the given objects' state dicts and every RNG state from a :func:`capture_state` dict.

    Returns:
        ``{"epoch", "step", "elapsed_s", "extras"}`` from the checkpoint.

    Raises:
        CheckpointError: the dict is not from capture_state, or lacks a requested part.
    """
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"checkpoint state format {state.get('format')!r} is not {STATE_FORMAT}; "
            "it was not written by capture_state()"
        )
    for key, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                     ("scaler", scaler)):
        if obj is None:
            continue
        if key not in state:
            raise CheckpointError(f"the checkpoint has no {key} state to restore")
        obj.load_state_dict(state[key])
    rng = state.get("rng", {})
    if "python" in rng:
        py = rng["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    np = _numpy()
    if np is not None and "numpy" in rng:
        nps = rng["numpy"]
        np.random.set_state((nps["kind"], np.array(nps["keys"], dtype=np.uint32), nps["pos"],
                             nps["has_gauss"], nps["cached_gaussian"]))
    if "cuda" in rng and torch.cuda.is_available():
        states = [s.cpu() for s in rng["cuda"]][: torch.cuda.device_count()]
        for index, cuda_state in enumerate(states):
            torch.cuda.set_rng_state(cuda_state, index)
    return {
        "epoch": state["epoch"],
        "step": state["step"],
        "elapsed_s": state["elapsed_s"],
        "extras": state.get("extras", {}),
    }

