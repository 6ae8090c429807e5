"""Writing a checkpoint file: one pass that writes, counts and hashes (:class:`_HashingWriter`),
starts writeback as it goes (sync_file_range) and turns torch.save's own crc32 off meanwhile;
the shared hasher thread (started over in a forked child); async saves in flight, hurried at
interpreter exit.

Used by ``CheckpointManager._write`` (checkpoint.py, whose docstring has the save protocol).
"""

from __future__ import annotations

import bisect
import ctypes
import os
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Tuple

from session_watchdog import checksum
from session_watchdog.trainer.checkpoint_types import PendingSave
from session_watchdog.trainer.training_state import _numpy

_TORCH_SAVE_CONFIG: Any
try:  # torch >= 2.6
    import torch.utils.serialization as _torch_serialization

    _TORCH_SAVE_CONFIG = _torch_serialization.config.save
except (ImportError, AttributeError):  # pragma: no cover - older torch always writes crc32
    _TORCH_SAVE_CONFIG = None

_COALESCE = 1 << 20  # torch.save emits many tiny zip headers: batch them into one write()
_WRITEBACK_EVERY = 32 << 20  # start the disk on what is written so far, every this many bytes


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
        if pending._settle is not None:  # the script is over: nothing changes its state now
            pending._settle.release()


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
