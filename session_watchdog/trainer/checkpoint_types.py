"""What the checkpoint API hands its callers: the errors (with the one-line description of a
failed write) and the results of a save, :class:`SavedCheckpoint` and :class:`PendingSave`.

Importable from ``session_watchdog.trainer.checkpoint`` as before; this module imports no torch.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Set, Tuple

from session_watchdog.trainer.priority import Yielding

__all__ = [
    "CheckpointDirError",
    "CheckpointError",
    "CheckpointStateError",
    "CheckpointWriteError",
    "PendingSave",
    "SavedCheckpoint",
    "StateChangedError",
]


# --------------------------------------------------------------------------------------------
# Errors


class CheckpointError(Exception):
    """Base class of every checkpoint error."""


class CheckpointStateError(CheckpointError):
    """The state holds an object that cannot be pickled or would not load with weights_only."""


class CheckpointDirError(CheckpointError):
    """The checkpoint directory cannot be used: not creatable or writable, or on storage that is
    not mounted (Drive, AutoDL file storage). The message is one line naming the fix."""


class StateChangedError(RuntimeError):
    """The cause of a failed async save whose tensors, left to the writer to copy
    (``save_async(..., copy_later=...)``), were changed before that copy was over: what it
    would have written is no single step's state, so nothing was written."""


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


class _Settle:
    """Whether the tensors an async save's writer copied (``copy_later``) stayed unchanged until
    their copy was over: each one's version counter then against now, checked once.

    An in-place operation moves the counter only when it has finished, so the check is sure only
    where no such operation can still run on the tensors: on the thread that changes them (the
    one that asked for the save), once their copy is over (``PendingSave.wait_copied``, which
    a Session's optimizer pre-hook calls before the step, and the manager's ``wait``, ``list``,
    ``latest`` and next save on that thread), or at interpreter exit. The writer waits for
    that check before it commits; when none comes within ``SETTLE_S`` of the copy (a loop
    that stopped stepping), it checks itself: an operation that overlapped the copy has long
    finished by then.
    """

    SETTLE_S = 5.0

    def __init__(self, watched: List[Tuple[Any, int, Tuple[Any, ...]]]) -> None:
        self._watched = watched  # (tensor, its version counter at the snapshot, its path)
        self._lock = threading.Lock()
        self._checked = threading.Event()
        self._wake = threading.Event()
        self._copied_at = 0.0
        self.changed: List[Tuple[Any, ...]] = []

    def copied(self) -> None:
        """The writer's copy is over (the writer's own check counts from now)."""
        self._copied_at = time.monotonic()

    def check(self) -> None:
        """Compare the counters now, unless already done (the first check decides)."""
        if self._checked.is_set():  # the optimizer's pre-hook asks at every step
            return
        with self._lock:
            if not self._checked.is_set():
                self.changed = [path for tensor, version, path in self._watched
                                if tensor._version != version]
                self._watched = []  # the state's own tensors: not kept alive any longer
                self._checked.set()
        self._wake.set()

    def release(self) -> None:
        """At interpreter exit: nothing will change the tensors; the writer checks at once."""
        self._wake.set()

    def before_commit(self) -> None:
        """In the writer, once the temp file is durable: wait for the word (at most until
        ``SETTLE_S`` after the copy), then raise :class:`StateChangedError` if one changed."""
        self._wake.wait(max(0.0, self._copied_at + self.SETTLE_S - time.monotonic()))
        self.check()
        if self.changed:
            raise StateChangedError(changed_message(self.changed))


def changed_message(paths: List[Tuple[Any, ...]]) -> str:
    where = "/".join(str(key) for key in paths[0])
    return (f"{len(paths)} tensor(s) changed before the writer's copy of them was over (the "
            f"first: {where}): the tensors passed as copy_later must stay unchanged until "
            "wait_copied() returns")


class PendingSave:
    """An async save in flight: ``done()`` polls, ``result()`` waits (and raises its error)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._future: Future[SavedCheckpoint] = Future()
        self._reported = False  # its error was raised to someone: the next save must not repeat it
        self._yielding = Yielding()  # the writer runs at idle priority until someone waits
        # Set once the state's tensors are all copied (at once, or by the writer for the
        # tensors of save_async's copy_later): from then on training may change them.
        self._copied = threading.Event()
        self._settle: Optional[_Settle] = None  # copy_later's check, when there were any
        self._owner = threading.get_ident()  # the thread that asked for it: the training loop's

    def wait_copied(self) -> None:
        """Return once every tensor of the state has been copied (at once for a save without
        ``copy_later``); the copy runs at normal priority, so this waits for memory copies only.

        Call it from the thread that changes the state (a Session's optimizer pre-hook does):
        it also checks, there, that no ``copy_later`` tensor changed before its copy was over,
        and the writer commits on that word (``_Settle``).
        """
        self._copied.wait()
        if self._settle is not None:
            self._settle.check()

    def _wait_copied_here(self, timeout: Optional[float] = None) -> None:
        """:meth:`wait_copied` for the waits of :meth:`result` and the manager (``wait``,
        ``list``, ``latest``, the next save): the check counts only on the thread that asked
        for the save, not on another one (a mirror's, the Session's ack thread) while the
        training loop may be mid-operation."""
        if self._copied.wait(timeout) and self._settle is not None \
                and threading.get_ident() == self._owner:
            self._settle.check()

    def hurry(self) -> None:
        """Let the write run at normal priority from now on (someone waits for it)."""
        self._yielding.hurry()

    def done(self) -> bool:
        """Whether the background write has finished (committed or failed)."""
        self._wait_copied_here(0)  # a loop that polls this from the training thread
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
        if self._settle is not None:
            # on the thread that asked for the save: the word its commit waits for
            self._wait_copied_here(timeout)
        try:
            return self._future.result(timeout)
        except CheckpointError:
            self._reported = True
            raise
