"""Shared-memory snapshots the daemon can persist after a crash (issue 13).

``Session(snapshot_every=...)`` copies the training state at a step boundary every N steps (an
int) or every duration (a string: ``"1m"``) into CPU buffers (the stall: a memory copy), then a
background thread writes the bytes of ``torch.save`` of that copy into a slot in ``/dev/shm``.
When the trainer dies without saving, the daemon (a separate process, torch-free) copies the
newest complete slot into the checkpoint directory as an ordinary committed checkpoint
(supervise/snapshots.py), so the restart resumes from it instead of the last periodic checkpoint.

Layout: ``/dev/shm/session-watchdog-<uid>/<run key>/slot0`` and ``slot1`` (double-buffered: the
newest complete snapshot is never the slot being written). Each slot is a :data:`HEADER_BYTES`
header (JSON, space-padded) followed by the payload. A write goes: header ``complete: false``
-> payload -> header ``{complete: true, gen, step, epoch, bytes, sha256}``, the header last; a
reader takes a slot only when the header is complete and the payload's sha256 matches, so a
trainer killed mid-write never yields half a snapshot.

Under torch.distributed (DDP, not ``sharded=True``) every rank writes its own two slots in
``/dev/shm/session-watchdog-<uid>/ddp-<checkpoint dir key>/rank<N>`` at the same steps, after
one small all-gather (each rank's RNG states; whether each has room): rank 0's payload is the
checkpoint rank 0 would write (model, optimizer, every rank's RNG states), the others' hold their
own RNG states and step. Each header names the rank, the world size and a job token from rank 0,
so the daemon commits rank 0's payload only for a generation every rank of the node has complete
(supervise/snapshots.py), never a mix, never a slot left by an earlier run.

Memory: a snapshot occupies RAM twice over at most (two slots) plus the CPU copy. It is skipped
with a logged reason when ``/dev/shm`` has not room for both slots, or when it would leave less
than the snapshot's size of available RAM. tmpfs pages are charged to the cgroup like any memory,
so the daemon's RAM rule sees them.
"""

from __future__ import annotations

import atexit
import copy
import ctypes
import hashlib
import io
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

import torch

from session_watchdog import snapshot_slots as fmt
from session_watchdog.trainer.buffers import view_key

_log = logging.getLogger("session_watchdog.trainer")


def _event(level: int, event: str, **fields: Any) -> None:
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


EXIT_WAIT_S = 120.0
"""How long the interpreter's exit waits for a snapshot write still in progress (all of them
together). The write goes to ``/dev/shm`` (memory): torch.save, sha256 and a copy, a few seconds
per GiB; the bound only keeps a stuck writer from holding the exit forever."""

_writers: Set[threading.Thread] = set()  # snapshot writes in progress, any Snapshotter
_writers_lock = threading.Lock()
_exit_hook = False  # _finish_writes_at_exit registered


def _finish_writes_at_exit() -> None:
    """At exit, wait up to :data:`EXIT_WAIT_S` for the snapshot writes in progress.

    The writer is a daemon thread (a stuck write must not hold the exit forever), but one the
    interpreter tears down inside torch.save aborted the process (SIGABRT, rc 134) and lost the
    snapshot of a script that raised right after taking it: the one a crash needs most. atexit
    runs this once the non-daemon threads are joined, before the interpreter finalizes.
    """
    deadline = time.monotonic() + EXIT_WAIT_S
    with _writers_lock:
        writers = list(_writers)
    for writer in writers:
        writer.join(max(0.0, deadline - time.monotonic()))
        if writer.is_alive():
            _event(logging.WARNING, "snapshot_unfinished_at_exit", thread=writer.name,
                   waited_s=EXIT_WAIT_S)


def _copy_state(state: Any, spare: Dict[Tuple[Any, ...], torch.Tensor],
                used: Dict[Tuple[Any, ...], torch.Tensor]) -> Any:
    """``state`` with every tensor copied into a CPU buffer (reused from ``spare``)."""
    memo: Dict[int, torch.Tensor] = {}
    views: Dict[Tuple[Any, ...], torch.Tensor] = {}  # tied weights as state_dict() gives them

    def walk(obj: Any, path: Tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) in memo:
                return memo[id(obj)]
            data = obj.detach()
            buf = spare.get(path)
            view = view_key(data)
            if view is not None and view in views:
                out = views[view]  # one copy, saved once, loaded tied: as torch.save does
            elif data.device.type == "meta":
                out = data.clone()  # no data to copy: saved as torch.save saves it
            elif data.layout != torch.strided or data.is_quantized:
                out = data.to("cpu", copy=True)
            else:
                if buf is None or buf.shape != data.shape or buf.dtype != data.dtype:
                    buf = torch.empty(data.shape, dtype=data.dtype, device="cpu",
                                      pin_memory=data.is_cuda)
                if data.device.type == "cpu" and data.is_contiguous() \
                        and not (data.is_conj() or data.is_neg()):  # lazy views: copy_ resolves
                    # One plain memcpy: copy_ splits a large CPU copy over OpenMP threads, which
                    # on a busy 2-core runtime took 40x longer than the copy itself (measured:
                    # 64 MiB, 16 ms single-threaded vs 660 ms; benchmarks/bench_supervise.py).
                    ctypes.memmove(buf.data_ptr(), data.data_ptr(), data.numel() * data.element_size())
                else:
                    buf.copy_(data)
                used[path] = buf
                out = buf
                if view is not None:
                    views[view] = buf
            memo[id(obj)] = out
            return out
        if isinstance(obj, dict):
            copied: Any = type(obj)((key, walk(value, (*path, key))) for key, value in obj.items())
            if hasattr(obj, "_metadata"):  # state_dict()'s versions, read by load_state_dict
                copied._metadata = copy.deepcopy(obj._metadata)
            return copied
        if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            return type(obj)(walk(value, (*path, i)) for i, value in enumerate(obj))
        return copy.deepcopy(obj)

    return walk(state, ())


def _tensor_bytes(state: Any) -> int:
    total = 0
    if isinstance(state, torch.Tensor):
        return int(state.numel() * state.element_size())
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return total


class Snapshotter:
    """Takes snapshots for one Session; ``due(step)`` is cheap, ``take()`` runs at a boundary."""

    def __init__(self, run_dir: Path, checkpoint_dir: Path, prefix: str,
                 every_steps: Optional[int], every_s: Optional[float],
                 on_report: Callable[[Dict[str, Any]], None],
                 shm_root: Path = fmt.SHM_ROOT, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None, local_ranks: Sequence[int] = ()) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_ranks = sorted(local_ranks)
        if rank is None:
            self.directory = fmt.snapshot_dir(run_dir, shm_root)
        else:  # distributed: one slot dir per rank, all of them where the daemon looks
            self.directory = fmt.rank_dir(fmt.ranks_root(Path(checkpoint_dir), shm_root), rank)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.prefix = prefix
        self.every_steps = every_steps
        self.every_s = every_s
        self.shm_root = shm_root
        self._on_report = on_report
        # Numbering goes on from the slots an earlier attempt left (a restart after a crash): a
        # new snapshot always outranks theirs, so the daemon never prefers the older one.
        self._gen = 0 if rank is not None else max(
            (int(h["gen"]) for h in (fmt.read_header(self.directory / n) for n in fmt.SLOTS)
             if h is not None and isinstance(h.get("gen"), int)), default=0)
        self._last_mono = time.monotonic()
        self._last_step = -1
        self._thread: Optional[threading.Thread] = None
        self._spare: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self._disabled: Optional[str] = None
        self._waited = 0  # snapshots that waited for the previous write
        self.token = secrets.token_hex(8)  # distributed: rank 0's names the job in every header
        self.last_stall_s: Optional[float] = None
        self.last_error: Optional[str] = None

    def due(self, step: int, now: float) -> bool:
        if self._disabled is not None or step == self._last_step:
            return False
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_s is not None and now - self._last_mono >= self.every_s

    def take(self, state: Dict[str, Any], *, step: int, epoch: int,
             header: Optional[Dict[str, Any]] = None, room_checked: bool = False) -> Optional[float]:
        """Copy ``state`` now and write it in the background; the stall in seconds, or None.

        ``header``: more fields for the slot header (distributed: rank, world size, job).
        ``room_checked``: the caller ran :meth:`check_room` (the ranks agreed on its answer).
        """
        self._last_mono = time.monotonic()
        self._last_step = step
        started = time.perf_counter()
        if self._thread is not None and self._thread.is_alive():
            # The previous one is still being written. Skipping would let the newest complete
            # snapshot fall behind by more than the interval (what a crash may cost); waiting
            # keeps that bound and says once that the interval is shorter than a write.
            self._thread.join()
            self._waited += 1
            if self._waited == 1:
                _event(logging.WARNING, "snapshot_slow", step=step,
                       waited_s=round(time.perf_counter() - started, 6),
                       reason="writing a snapshot takes longer than snapshot_every; the loop "
                              "waits for it (choose a longer snapshot_every)")
        problem = None if room_checked else self.check_room(state)
        if problem is not None:
            self.disable(problem, step)
            return None
        used: Dict[Tuple[Any, ...], torch.Tensor] = {}
        copied = _copy_state(state, self._spare, used)
        for device in {t.device for t in used.values() if t.is_cuda}:
            torch.cuda.synchronize(device)
        stall = time.perf_counter() - started
        self.last_stall_s = stall
        self._gen += 1
        global _exit_hook
        # A daemon thread that the exit waits for, boundedly: _finish_writes_at_exit.
        writer = threading.Thread(target=self._write_once,
                                  args=(copied, used, self._gen, step, epoch, header or {}),
                                  name=f"sw-snapshot-{step}", daemon=True)
        with _writers_lock:
            if not _exit_hook:
                atexit.register(_finish_writes_at_exit)
                _exit_hook = True
            _writers.add(writer)
        self._thread = writer
        try:
            writer.start()
        except BaseException:
            with _writers_lock:
                _writers.discard(writer)
            raise
        return stall

    def disable(self, reason: str, step: int) -> None:
        """No more snapshots from this Session (said once, in the log and in trainer.json)."""
        self._disabled = reason
        _event(logging.WARNING, "snapshot_skipped", reason=reason, directory=str(self.directory))
        self._report(step)

    @property
    def disabled(self) -> Optional[str]:
        return self._disabled

    def check_room(self, state: Dict[str, Any]) -> Optional[str]:
        """Why a snapshot must not be taken (no /dev/shm, too small, RAM too tight), or None."""
        need = _tensor_bytes(state) + fmt.HEADER_BYTES
        # every directory from <shm>/session-watchdog-<uid> down to ours
        parts = self.directory.relative_to(self.shm_root).parts
        chain = [self.shm_root.joinpath(*parts[:n]) for n in range(1, len(parts) + 1)]
        try:
            for path in chain:
                path.mkdir(exist_ok=True, mode=0o700)
            for path in chain:
                # /dev/shm is world-writable: a directory planted there by someone else (or a
                # symlink) must not receive our training state.
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
                        or stat.S_IMODE(st.st_mode) & 0o077:
                    return f"{path} is not a private directory of ours; snapshots are off"
            free = shutil.disk_usage(self.directory).free
        except OSError as err:
            return f"{self.shm_root} is not usable ({err.strerror or err})"
        have = sum(fmt.slot_size(self.directory / name) for name in fmt.SLOTS)
        if free + have < 2 * need:
            return (f"{self.shm_root} has {free} bytes free, two snapshot slots need {2 * need}; "
                    "snapshots are off (enlarge /dev/shm, e.g. docker --shm-size)")
        try:
            import psutil

            available = psutil.virtual_memory().available
        except Exception:  # psutil is a dependency; an odd /proc must not stop training
            return None
        if available - 2 * need < need:
            return (f"only {available} bytes of RAM available; a snapshot of {need} bytes could "
                    "push the host into OOM; snapshots are off")
        return None

    def _write_once(self, *args: Any) -> None:
        try:
            self._write(*args)
        finally:
            with _writers_lock:
                _writers.discard(threading.current_thread())

    def _write(self, copied: Dict[str, Any], used: Dict[Tuple[Any, ...], torch.Tensor],
               gen: int, step: int, epoch: int, header: Dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            buffer = io.BytesIO()
            torch.save(copied, buffer)
            payload = buffer.getbuffer()
            digest = hashlib.sha256(payload).hexdigest()
            slot = self.directory / fmt.SLOTS[gen % 2]
            fmt.write_slot(slot, payload, {
                **header, "gen": gen, "step": step, "epoch": epoch, "sha256": digest,
                "checkpoint_dir": str(self.checkpoint_dir), "prefix": self.prefix, "at": time.time()})
            self.last_error = None
        except Exception as err:  # a background thread: report, never raise into training
            self.last_error = f"{type(err).__name__}: {err}"
            _event(logging.WARNING, "snapshot_failed", error=self.last_error, step=step)
            return
        finally:
            self._spare = used
        # the first one at INFO: the user sees once what a snapshot costs the loop
        _event(logging.INFO if gen == 1 else logging.DEBUG, "snapshot_written", step=step, gen=gen,
               bytes=len(payload),
               write_s=round(time.perf_counter() - started, 6),
               stall_s=None if self.last_stall_s is None else round(self.last_stall_s, 6))
        self._report(step, gen=gen, size=len(payload))

    def _report(self, step: int, gen: Optional[int] = None, size: Optional[int] = None) -> None:
        report: Dict[str, Any] = {"dir": str(self.directory), "checkpoint_dir": str(self.checkpoint_dir),
                                  "prefix": self.prefix, "disabled": self._disabled}
        if self.rank is not None:
            # the daemon persists only a generation every rank of this node has complete
            report.update(rank=self.rank, world_size=self.world_size, ranks=self.local_ranks,
                          ranks_dir=str(self.directory.parent))
        if gen is not None:
            report.update(gen=gen, step=step, bytes=size,
                          stall_s=None if self.last_stall_s is None else round(self.last_stall_s, 6),
                          waited_for_previous=self._waited)
        self._on_report(report)

    def wait(self, timeout: Optional[float] = 60.0) -> None:
        """Wait up to ``timeout`` s for the write in progress; one that is not done by then goes
        on (said in the log): the process exit still waits for it (:data:`EXIT_WAIT_S`)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                _event(logging.INFO, "snapshot_still_writing", thread=self._thread.name,
                       waited_s=timeout, exit_waits_s=EXIT_WAIT_S)

    def remove(self) -> None:
        """Training ended with its own checkpoint: the slots are no longer needed (RAM back)."""
        self.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.rank is not None:
            try:
                self.directory.parent.rmdir()  # the last rank to finish removes the ranks' dir
            except OSError:
                pass
