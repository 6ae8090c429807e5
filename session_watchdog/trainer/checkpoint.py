"""Crash-safe checkpoints: save, verify, keep-last-K, resume.

Trainer side: imports torch at import time, as do its buffer, data and snapshot siblings; the
daemon never imports it (DESIGN.md, "Layout").

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

The manager is here; its parts live next to it, and every public name is importable from here
as before: errors and results (checkpoint_types.py), what may be saved (state_check.py), the
write pass (checkpoint_write.py), async snapshot buffers (buffers.py), markers and the
directory's files (checkpoint_files.py), training state <-> dict (training_state.py).
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import pickle
import re
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Set, Tuple, Union, cast

import torch

from session_watchdog import channel, checksum, ckptfile, mounts
from session_watchdog.channel import fsync_dir, open_exclusive, temp_path_for, write_json

# Names imported `X as X` are re-exported: defined in the modules this one is split into, and
# importable from here as before.
from session_watchdog.trainer.buffers import (
    Work,
    _copy_into,
    _new_buffer,
    _tensor_leaves,
    copy_all,
    is_plain,
    page_in,
)
from session_watchdog.trainer.checkpoint_files import (
    MARKER_SUFFIX,
    _close_and_unlink,
    _Entry,
    _is_regular_or_missing,
    _open_directory,
    _regular_size,
    _remove_any,
    _rename_quietly,
    _unlink_quietly,
)
from session_watchdog.trainer.checkpoint_files import checkpoint_from_marker as checkpoint_from_marker
from session_watchdog.trainer.checkpoint_types import CheckpointDirError as CheckpointDirError
from session_watchdog.trainer.checkpoint_types import CheckpointError as CheckpointError
from session_watchdog.trainer.checkpoint_types import CheckpointStateError as CheckpointStateError
from session_watchdog.trainer.checkpoint_types import CheckpointWriteError as CheckpointWriteError
from session_watchdog.trainer.checkpoint_types import PendingSave as PendingSave
from session_watchdog.trainer.checkpoint_types import SavedCheckpoint as SavedCheckpoint
from session_watchdog.trainer.checkpoint_types import _find_oserror
from session_watchdog.trainer.checkpoint_write import (
    _HashingWriter,
    _hurry_at_exit,
    _skip_torch_crc32,
)
from session_watchdog.trainer.state_check import _inspect_state
from session_watchdog.trainer.state_check import check_state as check_state
from session_watchdog.trainer.training_state import STATE_FORMAT as STATE_FORMAT
from session_watchdog.trainer.training_state import capture_state as capture_state
from session_watchdog.trainer.training_state import restore_state as restore_state

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

BROKEN_SUFFIX = ".broken"
# channel owns the temp-name format; learn its suffix from it instead of copying a private name.
_TEMP_SUFFIX = temp_path_for(Path("x")).suffix
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
# The manager


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
        The first save allocates them during the call: pinned host memory for CUDA state costs
        ~0.4-0.7 s per GiB to allocate, CPU memory ~0.3 s per GiB to page in, against ~0.02-0.06 s
        for the copy itself. Call :meth:`prepare_async` once the state exists (after the first
        optimizer step) to move that cost out of the first save; a ``Session`` does.

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
        """Allocate the snapshot buffers for ``state`` now and page them in in a background
        thread (pinned buffers, for CUDA state, are allocated resident on this thread).

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
