"""Async saves: the snapshot of the state into reusable buffers, the background write, the
save in flight (wait, hurry, its failure reported once) and the first save's buffers made ahead.
The tensors a caller leaves unchanged until the copy is over (``copy_later``: a Session's
optimizer tensors) are copied by the writer thread, before it writes, instead of in the stall.

A part of :class:`~session_watchdog.trainer.checkpoint.CheckpointManager` (checkpoint.py), which
writes each snapshot with the same save protocol as a sync save. Trainer side: imports torch.
"""

from __future__ import annotations

import collections
import copy
import threading
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch

from session_watchdog.trainer import buffers
from session_watchdog.trainer.buffers import (
    Work,
    _copy_into,
    _new_buffer,
    _tensor_leaves,
    copy_all,
    is_plain,
    memory_key,
    page_in,
    view_key,
)
from session_watchdog.trainer.checkpoint_dir import _DirectoryMixin
from session_watchdog.trainer.checkpoint_types import (
    CheckpointError,
    CheckpointWriteError,
    PendingSave,
    SavedCheckpoint,
    StateChangedError,
    _Settle,
    changed_message,
)
from session_watchdog.trainer.checkpoint_write import _hurry_at_exit
from session_watchdog.trainer.state_check import _inspect_state, check_state

# A tensor save_async leaves to the writer: (buffer, tensor, its version counter then, whether the
# buffer is fresh, its path in the state).
_Later = Tuple[torch.Tensor, torch.Tensor, int, bool, Tuple[Any, ...]]


class _AsyncSaveMixin(_DirectoryMixin):
    """Snapshot the state, write it in a background thread, and track the save in flight."""

    # Set by CheckpointManager.__init__ (checkpoint.py); _write is its save protocol.
    _pending: Optional[PendingSave]
    _spare: Dict[Tuple[Any, ...], torch.Tensor]  # snapshot buffers to reuse
    _prepare_thread: Optional[threading.Thread]  # prepare_async's allocation and page-in
    _prepare: _Prepare  # what that thread does
    _write: Callable[..., SavedCheckpoint]

    def save_async(self, state: Dict[str, Any], *, step: int, epoch: int = 0,
                   copy_later: Iterable[torch.Tensor] = ()) -> PendingSave:
        """Copy ``state``'s tensors to CPU memory now and write them in a background thread.

        Training may mutate the model as soon as this returns. The snapshot buffers are kept
        and reused by the next async save (first-touch page faults cost more than the copy).
        The first save allocates them during the call: pinned host memory for CUDA state costs
        ~0.4-0.7 s per GiB to allocate, CPU memory ~0.3 s per GiB to page in, against ~0.02-0.06 s
        for the copy itself. Call :meth:`prepare_async` once the state exists (after the first
        optimizer step) to move that cost out of the first save; a ``Session`` does.

        ``copy_later``: CPU tensors of ``state`` that the caller leaves unchanged until
        :meth:`wait_copied` (or the returned save's ``wait_copied()``) returns - the parameters
        and optimizer state, which only the next ``optimizer.step()`` changes. The writer thread
        copies them before it writes, at normal priority, while training runs its next forward
        and backward pass; this call copies only the rest. A tensor of ``copy_later`` that
        changes before its copy is over (one whose version counter moved: in-place operations
        count, writes through ``.data`` or a fused kernel do not) fails the save with a
        :class:`CheckpointWriteError` caused by :class:`StateChangedError`; nothing is written.
        The counters are compared when ``wait_copied`` is called (call it on the thread that
        changes the state: an in-place operation moves its counter only once it is over) or,
        without that call, 5 s after the copy; the write commits only after that comparison.
        A ``Session`` with ``async_save`` passes its optimizer's tensors and waits in a step
        pre-hook of that optimizer.

        Raises:
            CheckpointWriteError: an unreported failure of the previous async save.
            CheckpointStateError: as for :meth:`save`, raised here, before anything is written.
        """
        self._drain_pending()
        payload = check_state(state)
        snapshot, buffers, later = self._snapshot(state, copy_later)
        pending = PendingSave(step)
        if later:
            pending._settle = _Settle([(data, version, path) for _, data, version, _, path in later])
        else:
            pending._copied.set()
        # Not a daemon thread: the interpreter waits for it at exit, so the checkpoint the
        # training loop asked for still lands when the script ends right after asking.
        gate = _Gate()

        def write() -> None:
            if gate.enter():
                self._write_in_background(snapshot, buffers, step, epoch, payload, pending, later)
        worker = threading.Thread(target=write, name=f"sw-checkpoint-save-{step}")
        # Published before its thread starts, so that wait() and the next save always know a
        # write that runs; taken back when start() fails (a Ctrl-C inside it included) before
        # the thread ran: a result nobody fills made every later save wait forever.
        self._pending = pending
        try:
            worker.start()
        except BaseException as err:
            if gate.give_up():  # it never ran, and now never will: nothing is in flight
                self._pending = None
                self._spare = buffers
                pending._copied.set()  # nothing will copy: no one may wait for it
            if isinstance(err, RuntimeError):  # "can't start new thread"
                raise CheckpointWriteError(self.directory, err) from err
            raise
        _hurry_at_exit(pending)
        return pending

    def wait_copied(self) -> None:
        """Return once the async save in flight, if any, has copied every tensor of its state
        (see ``copy_later`` in :meth:`save_async`); from then on the state may change."""
        pending = self._pending
        if pending is not None:
            pending.wait_copied()

    def _settle_own_save(self) -> None:
        pending = self._pending
        if pending is not None:
            pending._wait_copied_here()  # the word it commits on, when this thread asked for it

    @staticmethod
    def _copy_later(later: List[_Later], pending: PendingSave) -> None:
        """In the writer thread, before it writes: copy ``save_async``'s ``copy_later`` tensors.
        Whether they stayed unchanged is settled before the commit (``_Settle``); a change
        seen already (the caller changed one too early) fails the save here, unwritten."""
        assert pending._settle is not None
        try:
            copy_all([(buf, data) for buf, data, _, fresh, _ in later if not fresh], threads=1)
            copy_all([(buf, data) for buf, data, _, fresh, _ in later if fresh])
            # Only a change seen before _copied is set is surely too early (one not seen yet
            # may be an operation still running: the check before the commit sees it).
            changed = [path for _, data, version, _, path in later if data._version != version]
        finally:
            pending._settle.copied()
            pending._copied.set()
            later.clear()
        if changed:
            raise StateChangedError(changed_message(changed))

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
        pending._wait_copied_here()
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
        pending._wait_copied_here()
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
        later: Optional[List[_Later]] = None,
    ) -> None:
        try:
            if later:
                self._copy_later(later, pending)  # at normal priority: training may wait for it
            pending._yielding.lower()  # training has the CPU first (priority.py)
            stable = _inspect_state(snapshot)[1]  # the snapshot is ours: its memory stays put
            settle = pending._settle
            with self._lock:
                saved = self._write(snapshot, step=step, epoch=epoch, payload=payload,
                                    stable=stable, inline_hash=True,
                                    before_commit=None if settle is None else settle.before_commit)
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
        """Allocate the snapshot buffers for ``state`` and page them in, in a background thread.

        The first :meth:`save_async` then only copies into memory that is already mapped, as
        every later one does: first-touch page faults (the kernel zero-fills each page) cost
        several times the copy itself, and pinned host memory for CUDA state costs ~0.4-0.8 s
        per GiB to allocate. This call only reads the tensors' shapes and dtypes; allocating
        (pinned included) and paging in happen on the background thread, so the training loop
        does not wait for them at the step where a ``Session`` calls this. Idempotent; a save
        that comes before the thread is done waits for the allocation, pages in what is left
        alongside it, then copies.
        """
        self._join_prepare()
        if self._spare:
            return
        wanted: List[Tuple[Tuple[Any, ...], torch.Size, torch.dtype, bool]] = []
        seen: Set[Any] = set()  # a tensor twice (tied weights) gets one buffer, as in _snapshot
        for path, tensor in _tensor_leaves(state, ()):
            data = tensor.detach()
            key = view_key(data) or id(tensor)
            if key in seen:
                continue
            seen.add(key)
            if data.layout == torch.strided and not data.is_quantized \
                    and data.device.type != "meta":
                # what _new_buffer reads, not the tensor: the thread must not keep the state alive
                wanted.append((path, data.shape, data.dtype, data.is_cuda))
        spare: Dict[Tuple[Any, ...], torch.Tensor] = {}  # filled by the thread
        prepare = _Prepare(wanted, spare)
        # Not a daemon thread: the interpreter waits for it at exit (~1 s per GiB at most), so a
        # script that ends soon after its first step never shuts down while this thread is
        # inside torch.empty (CPU buffers too: that aborted the process, SIGABRT, rc 134) or
        # tears CUDA down while it is inside a pinned allocation.
        worker = threading.Thread(target=prepare.run, name="sw-checkpoint-prepare")
        self._spare = spare  # read by _snapshot only after _join_prepare
        self._prepare = prepare
        # Known before it starts: a Ctrl-C inside start() (waiting for the new thread to run)
        # must not leave a thread that writes into self._spare unknown to _join_prepare.
        self._prepare_thread = worker
        try:
            worker.start()
        except BaseException:
            # "can't start new thread", or a Ctrl-C inside start(): a thread that never ran is
            # forgotten (the save allocates, as without this; waiting for it hung every later
            # save and the Session's close), one that runs is joined by the next save.
            if prepare.gate.give_up():
                self._prepare_thread = None
                self._spare = {}
                self._prepare = _Prepare([], {})
            raise

    def _join_prepare(self) -> None:
        worker = self._prepare_thread
        if worker is None:
            return
        try:
            self._prepare.allocated.wait()
            self._prepare.work.run()  # a save that comes early pages in the rest alongside it
        finally:
            # Even when interrupted (Ctrl-C in the wait): its memset must not race a later copy
            # into the same buffers, which then committed zeros that verify() passes.
            worker.join()
            self._prepare_thread = None  # only once joined: an interrupted join runs again
            # Its buffers are self._spare's now: the next save keeps those it uses, no more.
            self._prepare = _Prepare([], {})

    def release_buffers(self) -> None:
        """Drop the snapshot buffers kept for the next async save (a copy of every tensor of
        the state); the next async save allocates again. Waits for :meth:`prepare_async`'s
        thread and for the async save in flight (its buffers come back when it is done); its
        failure, if any, is still raised by the next :meth:`wait` or save."""
        self._join_prepare()
        pending = self._pending
        if pending is not None:
            pending._wait_copied_here()
            futures.wait([pending._future])
        self._spare = {}

    def _snapshot(
        self, state: Dict[str, Any], copy_later: Iterable[torch.Tensor] = ()
    ) -> Tuple[Dict[str, Any], Dict[Tuple[Any, ...], torch.Tensor], List[_Later]]:
        """Deep-copy ``state`` with every tensor copied into CPU memory (reusing old buffers),
        except the plain CPU tensors of ``copy_later``: those are returned, to be copied by
        the writer (``_copy_later``)."""
        later_keys = {memory_key(t) for t in copy_later  # only those a memmove may copy
                      if t.layout == torch.strided and t.device.type == "cpu"
                      and not t.is_quantized}
        later: List[_Later] = []
        self._join_prepare()
        spare, self._spare = self._spare, {}
        used: Dict[Tuple[Any, ...], torch.Tensor] = {}
        memo: Dict[int, torch.Tensor] = {}  # the same tensor twice (tied weights) stays shared
        views: Dict[Tuple[Any, ...], torch.Tensor] = {}  # two tensors, one view: so does that
        cuda_devices: Set[torch.device] = set()
        # Plain memmoves, copied after the walk on this thread and helpers (buffers.py): into
        # fresh buffers their page faults are most of a first save's stall; into reused ones a
        # second thread still copies ~15 % faster while the training loop waits.
        plain: List[Tuple[torch.Tensor, torch.Tensor]] = []

        def tensor_copy(src: torch.Tensor, path: Tuple[Any, ...]) -> torch.Tensor:
            if id(src) in memo:
                return memo[id(src)]
            data = src.detach()
            view = view_key(data)
            if view is not None and view in views:
                out = views[view]  # tied weights as state_dict() gives them: written once
            elif data.device.type == "meta":
                out = data.clone()  # no data to copy: saved as a sync save saves it, a meta tensor
            elif data.layout != torch.strided or data.is_quantized:
                out = data.to("cpu", copy=True)  # exotic layouts: plain copy, no reuse
            else:
                kept = spare.get(path)
                fresh = kept is None or kept.shape != data.shape or kept.dtype != data.dtype
                buf = _new_buffer(data) if kept is None or fresh else kept
                if is_plain(buf, data):
                    if later_keys and memory_key(data) in later_keys:
                        later.append((buf, data, data._version, fresh, path))
                    else:
                        plain.append((buf, data))
                else:
                    _copy_into(buf, data)
                if data.is_cuda:
                    cuda_devices.add(data.device)
                used[path] = buf
                out = buf
                if view is not None:
                    views[view] = buf
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
                copied: Any = type(obj)(items)
                if hasattr(obj, "_metadata"):  # state_dict()'s versions, read by load_state_dict
                    copied._metadata = copy.deepcopy(obj._metadata)
                return copied
            if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
                return type(obj)(walk(value, (*path, i)) for i, value in enumerate(obj))
            return copy.deepcopy(obj)

        snapshot = walk(state, ())
        copy_all(plain)
        for device in cuda_devices:
            torch.cuda.synchronize(device)
        return snapshot, used, later


class _Gate:
    """Lets a thread's work begin unless it was given up on first: a ``start()`` cut short (a
    Ctrl-C while it waits for the new thread, or "can't start new thread") leaves a thread that
    may never run, or may be just about to. After :meth:`give_up` answered True the work never
    begins; after it answered False it has begun and must be waited for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._began = False
        self._dropped = False

    def enter(self) -> bool:
        """In the thread, first: whether to do the work."""
        with self._lock:
            self._began = not self._dropped
            return self._began

    def give_up(self) -> bool:
        """Whether the work had not begun (it never will now)."""
        with self._lock:
            self._dropped = not self._began
            return self._dropped


class _Prepare:
    """``prepare_async``'s background work: allocate the buffers, then page in the pageable ones.

    ``allocated`` is set once every buffer exists (or the allocation failed: a save then
    allocates what is missing itself, as without a prepare), and ``work`` is the page-in that
    any thread may then help with (buffers.Work).
    """

    def __init__(self, wanted: List[Tuple[Tuple[Any, ...], torch.Size, torch.dtype, bool]],
                 into: Dict[Tuple[Any, ...], torch.Tensor]) -> None:
        self._wanted = wanted
        self._buffers = into
        self.allocated = threading.Event()
        self.work: Work = page_in([])
        self.gate = _Gate()

    def run(self) -> None:
        if not self.gate.enter():
            self.allocated.set()
            return
        try:
            for path, shape, dtype, pin in self._wanted:
                self._buffers[path] = buffers._allocate(shape, dtype, pin)
        except Exception:  # out of (pinned) memory: an optimization only, the save allocates
            pass
        finally:
            # Pinned buffers are resident from the start: nothing to fault in.
            self.work = page_in([buf for buf in self._buffers.values() if not buf.is_pinned()])
            self.allocated.set()
        self.work.run()
