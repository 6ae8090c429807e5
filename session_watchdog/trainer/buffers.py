"""The copy of a state into an async save's snapshot buffers: the whole stall (issue 17).

``save_async`` blocks training only while it copies every tensor into CPU memory it owns. Into
buffers a previous save already used, that copy runs at memory speed. Into fresh buffers (the
first save of a :class:`CheckpointManager` nobody prepared) each page is first faulted in, and
the kernel's fault path, which finds a free page, zeroes it and maps it, is the larger part of
the stall: measured on a 2-core VM (benchmarks/bench_checkpoint.py, ``--figures stall``), 1 GiB
in 340 tensors copies in 0.055 s into used buffers and in 0.39 s into fresh ones, of which
0.33 s is the faults.

Measured there too, and left out for that reason:

- faulting the pages in up front, as one large mapping with ``MAP_POPULATE`` or
  ``madvise(MADV_POPULATE_WRITE)``: the same 0.33 s per GiB; the cost is the kernel's per page
  work, not the trap into it;
- transparent huge pages (``MADV_HUGEPAGE``): 0.045 s per GiB only when just-freed huge pages
  are at hand, 2.3-2.5 s per GiB otherwise (with no compaction counted: the VM's free page
  reporting had handed the free huge pages back to its host; on a kernel with
  ``defrag=madvise``, the common default, a fragmented machine also compacts memory for them on
  the caller's thread); where THP is enabled for every mapping, ``torch.empty`` gets them
  anyway, without that stall.

What does help is doing the faults on more than one core, which here is doing the copy on more
than one: :func:`copy_all` splits the bytes into chunks that the caller and up to
``copy_threads() - 1`` helper threads take in turn (``ctypes.memmove`` releases the GIL). The
caller copies too, so a helper the scheduler does not run soon costs at most the one chunk it
holds, never its share. Measured side by side (alternating, machine load 1.8-2.0): 0.24-0.26 s
instead of 0.44 s for the first save, in 3 of 4 runs; in the 4th the helper got no core and the
caller did it all (0.44 s). Into reused buffers the copy is bound by memory bandwidth, and one
helper gains less but still gains: medians of 20 alternating copies of 1 GiB, 0.053 against
0.062 s at load 0.4; a Session's whole stall in a training loop, 0.064 against 0.077 s at load
1.1-1.5 and 0.057 against 0.066 s with four CPU-bound processes beside it (load 3.9). The
stall copies on helpers into both kinds; the writer's own copy (``copy_later``), which runs
beside training, copies into reused buffers on its thread alone.

:func:`page_in` is the same work as zero fills, for ``CheckpointManager.prepare_async``: its
background thread pages the buffers in, and a save that comes before it is done takes pieces
too instead of waiting (measured: 0.27 s instead of 0.47-0.50 s for a save of 1 GiB right
after ``prepare_async``).
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, List, Optional, Sequence, Tuple

import torch

__all__ = ["CHUNK_BYTES", "PARALLEL_FROM_BYTES", "Work", "copy_all", "copy_threads", "is_plain",
           "memory_key", "page_in"]

CHUNK_BYTES = 8 << 20  # a helper that stalls holds up the caller by at most one chunk's copy
PARALLEL_FROM_BYTES = 64 << 20  # below this, waking helpers costs about what they would save
_MAX_THREADS = 8  # memory bandwidth, not cores, bounds a copy long before this

_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child (DataLoader worker, a test's child) inherits the pool object but not its
    # threads: a task submitted to it would never run. Start over in the child.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def memory_key(tensor: torch.Tensor) -> Tuple[str, int, int]:
    """The memory ``tensor`` covers, as (device type, first byte's address, bytes): the same for
    a parameter and the detached alias of it that ``state_dict()`` returns."""
    return tensor.device.type, tensor.data_ptr(), tensor.numel() * tensor.element_size()


def copy_threads() -> int:
    """How many threads copy a snapshot: the CPUs this process may run on, no more than torch's
    intra-op thread count (a user who set ``torch.set_num_threads(1)`` meant it), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, torch.get_num_threads(), _MAX_THREADS))


def view_key(data: torch.Tensor) -> Optional[Tuple[Any, ...]]:
    """What makes two tensor objects the same view of the same memory (``state_dict()`` gives
    tied weights as two), so a snapshot shares one copy as a sync save does; None for a tensor
    with no memory of its own to compare (empty, exotic layouts)."""
    if data.layout != torch.strided or data.is_quantized or data.numel() == 0 \
            or data.device.type == "meta":
        return None
    return (data.data_ptr(), data.dtype, data.shape, data.stride(), data.device,
            data.is_conj(), data.is_neg())


def is_plain(buf: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether ``data`` copies into ``buf`` as one ``memmove``: both contiguous in CPU memory,
    same dtype and element count, and ``data`` no lazy conj or neg view (its bytes are not its
    values: ``copy_`` resolves them)."""
    return (data.device.type == "cpu" and buf.device.type == "cpu" and data.is_contiguous()
            and buf.is_contiguous() and data.dtype == buf.dtype
            and data.numel() == buf.numel() and not (data.is_conj() or data.is_neg()))


def _chunks(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
            chunk_bytes: int) -> List[Tuple[int, int, int]]:
    """``(destination, source, bytes)`` pieces of at most ``chunk_bytes`` covering every pair."""
    pieces: List[Tuple[int, int, int]] = []
    for buf, data in pairs:
        nbytes = data.numel() * data.element_size()
        dst, src = buf.data_ptr(), data.data_ptr()
        for offset in range(0, nbytes, chunk_bytes):
            pieces.append((dst + offset, src + offset, min(chunk_bytes, nbytes - offset)))
    return pieces


class Work:
    """Pieces of memory work handed out one at a time to whichever thread asks next: copies
    (:func:`copy_all`) or zero fills (:func:`page_in`). Any number of threads may :meth:`run`
    the same work; each piece is done exactly once."""

    def __init__(self, pieces: List[Tuple[int, int, int]], zero: bool = False) -> None:
        self._pieces = pieces  # (destination, source, bytes); the source is unused to zero
        self._zero = zero
        self._next = 0
        self._lock = threading.Condition(threading.Lock())
        self._helping = 0  # helper threads inside run()
        self.participants = 0  # threads that did at least one piece

    def __len__(self) -> int:
        return len(self._pieces)

    def abandon(self) -> None:
        """Hand out no more pieces: each thread stops after the piece it holds."""
        with self._lock:
            self._next = len(self._pieces)

    def run(self, helper: bool = False) -> int:
        """Do pieces until none is left (ctypes releases the GIL for each); how many this
        thread did. ``helper``: a thread that :meth:`wait_helpers` waits for (not the one
        that waits: a Ctrl-C on its thread must not leave the count behind)."""
        done = 0
        if helper:
            with self._lock:
                self._helping += 1
        try:
            while True:
                with self._lock:
                    index = self._next
                    self._next += 1
                if index >= len(self._pieces):
                    return done
                dst, src, nbytes = self._pieces[index]
                if self._zero:
                    ctypes.memset(dst, 0, nbytes)
                else:
                    ctypes.memmove(dst, src, nbytes)
                done += 1
        finally:
            with self._lock:
                self.participants += done > 0
                if helper:
                    self._helping -= 1
                    self._lock.notify_all()

    def wait_helpers(self) -> None:
        """Return once no helper thread is inside :meth:`run` (one that comes later finds no
        piece left, after the caller's own run or :meth:`abandon`). A KeyboardInterrupt
        meanwhile is held back and raised after: the memory may be freed once this returns."""
        interrupted: Optional[BaseException] = None
        while True:
            try:
                with self._lock:
                    while self._helping:
                        self._lock.wait()
                break
            except KeyboardInterrupt as err:  # a second Ctrl-C: helpers run no signal handler
                interrupted = err
        if interrupted is not None:
            raise interrupted


def page_in(bufs: Sequence[torch.Tensor]) -> Work:
    """Work that writes zeros over every byte of ``bufs`` (CPU memory), so that every page is
    faulted in before a copy needs it. Run it on a background thread, and on the thread that
    then needs the buffers (it helps with what is left rather than waiting for it)."""
    return Work(_chunks([(buf, buf) for buf in bufs], max(1, CHUNK_BYTES)), zero=True)


def _helpers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # Threads inherit the nice value of the thread that starts them: the training
            # thread, which is the one waiting for this copy (not the idle-priority writer).
            _pool = ThreadPoolExecutor(max_workers=_MAX_THREADS - 1,
                                       thread_name_prefix="sw-ckpt-copy")
        return _pool


def copy_all(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], threads: int = 0) -> int:
    """Copy every ``(buf, data)`` pair, each :func:`is_plain`, and return when all are copied.

    Pieces are :data:`CHUNK_BYTES` long; a copy under :data:`PARALLEL_FROM_BYTES` in all runs on
    the caller's thread alone (both are read at each call).

    Args:
        pairs: destination and source, same dtype and element count, contiguous CPU memory.
        threads: threads to copy with, the caller's included; 0 means :func:`copy_threads`.

    Returns:
        How many threads copied at least one piece.
    """
    work = Work(_chunks(pairs, max(1, CHUNK_BYTES)))
    total = sum(data.numel() * data.element_size() for _, data in pairs)
    threads = min(threads or copy_threads(), _MAX_THREADS, len(work))
    helpers: List[Future[int]] = []
    try:
        if threads > 1 and total >= PARALLEL_FROM_BYTES:
            pool = _helpers()
            for _ in range(threads - 1):
                try:
                    helpers.append(pool.submit(work.run, True))
                except RuntimeError:  # the interpreter is shutting down (an async save's
                    break             # writer copies then too): the caller copies alone
        work.run()
    except BaseException:
        # Interrupted (a Ctrl-C between two pieces, or inside submit while it starts a
        # thread, whose future is then lost): the helpers stop after the piece they hold.
        work.abandon()
        raise
    finally:
        # No helper may still be copying when this returns or raises: the buffers may be
        # freed then. Waited for through a further Ctrl-C (a terminal's and a launcher's come
        # milliseconds apart); one not started yet is cancelled (it would find nothing to do).
        work.wait_helpers()
        for future in helpers:
            future.cancel()
    return work.participants


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
    return _allocate(data.shape, data.dtype, data.is_cuda)


def _allocate(shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A snapshot buffer in CPU memory: pinned for CUDA state (the device-to-host copy into
    pinned memory is async), pageable and not yet touched otherwise."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)


def _copy_into(buf: torch.Tensor, data: torch.Tensor) -> None:
    """Copy ``data`` into the CPU buffer ``buf`` (same shape and dtype).

    Contiguous CPU memory is one ``memmove`` on this thread: torch's ``copy_`` splits large
    copies over its intra-op thread pool, whose barrier waits for the slowest thread, and on a
    busy machine (the training loop, DataLoader workers) that made a 256 MiB copy take 0.3-1.5 s
    instead of 20 ms (benchmarks/bench_checkpoint.py, issue 17).
    """
    if is_plain(buf, data):
        nbytes = data.numel() * data.element_size()
        if nbytes:
            ctypes.memmove(buf.data_ptr(), data.data_ptr(), nbytes)
        return
    buf.copy_(data, non_blocking=data.is_cuda)
