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
directory's files (checkpoint_files.py), training state <-> dict (training_state.py). The
manager's own methods are split the same way, into base classes, each built on the one before:
``_DirectoryMixin`` (checkpoint_dir.py: list, latest, verify, load, pruning; the fields they
share) <- ``_AsyncSaveMixin`` (checkpoint_async.py: snapshot, background write, wait) <-
``CheckpointManager`` (here: construction and the save protocol).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Optional, Sequence, Set, Tuple, Union, cast

import torch

from session_watchdog import ckptfile, mounts
from session_watchdog.channel import fsync_dir, open_exclusive, temp_path_for, write_json

# Names imported `X as X` are re-exported: defined in the modules this one is split into, and
# importable from here as before. Tests that patch a module-level name patch it where it is
# looked up: the pruning's _UNLINK_AHEAD_BYTES and _remove_any in checkpoint_dir, say.
from session_watchdog.trainer.buffers import _copy_into as _copy_into
from session_watchdog.trainer.buffers import _new_buffer as _new_buffer
from session_watchdog.trainer.buffers import _tensor_leaves as _tensor_leaves
from session_watchdog.trainer.buffers import copy_all as copy_all
from session_watchdog.trainer.buffers import is_plain as is_plain
from session_watchdog.trainer.buffers import page_in as page_in
from session_watchdog.trainer.checkpoint_async import _AsyncSaveMixin, _Prepare
from session_watchdog.trainer.checkpoint_dir import _UNLINK_AHEAD_BYTES as _UNLINK_AHEAD_BYTES
from session_watchdog.trainer.checkpoint_dir import BROKEN_SUFFIX as BROKEN_SUFFIX
from session_watchdog.trainer.checkpoint_dir import _event as _event
from session_watchdog.trainer.checkpoint_dir import _log as _log
from session_watchdog.trainer.checkpoint_files import (
    MARKER_SUFFIX,
    _close_and_unlink,
    _open_directory,
    _unlink_quietly,
)
from session_watchdog.trainer.checkpoint_files import _Entry as _Entry
from session_watchdog.trainer.checkpoint_files import _is_regular_or_missing as _is_regular_or_missing
from session_watchdog.trainer.checkpoint_files import _regular_size as _regular_size
from session_watchdog.trainer.checkpoint_files import _remove_any as _remove_any
from session_watchdog.trainer.checkpoint_files import _rename_quietly as _rename_quietly
from session_watchdog.trainer.checkpoint_files import checkpoint_from_marker as checkpoint_from_marker
from session_watchdog.trainer.checkpoint_types import CheckpointDirError as CheckpointDirError
from session_watchdog.trainer.checkpoint_types import CheckpointError as CheckpointError
from session_watchdog.trainer.checkpoint_types import CheckpointStateError as CheckpointStateError
from session_watchdog.trainer.checkpoint_types import CheckpointWriteError as CheckpointWriteError
from session_watchdog.trainer.checkpoint_types import PendingSave as PendingSave
from session_watchdog.trainer.checkpoint_types import SavedCheckpoint as SavedCheckpoint
from session_watchdog.trainer.checkpoint_types import StateChangedError as StateChangedError
from session_watchdog.trainer.checkpoint_types import _find_oserror
from session_watchdog.trainer.checkpoint_write import (
    _HashingWriter,
    _skip_torch_crc32,
)
from session_watchdog.trainer.checkpoint_write import _hurry_at_exit as _hurry_at_exit
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
    "StateChangedError",
    "capture_state",
    "check_state",
    "restore_state",
]

# channel owns the temp-name format; learn its suffix from it instead of copying a private name.
_TEMP_SUFFIX = temp_path_for(Path("x")).suffix
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# --------------------------------------------------------------------------------------------
# The manager


class CheckpointManager(_AsyncSaveMixin):
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
        self._prepare_thread: Optional[threading.Thread] = None  # prepare_async's thread
        self._prepare = _Prepare([], {})  # what that thread does
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

    def _write(
        self,
        state: Dict[str, Any],
        *,
        step: int,
        epoch: int,
        payload: int,
        stable: Sequence[Tuple[int, int]],
        inline_hash: bool = False,
        before_commit: Optional[Callable[[], None]] = None,
    ) -> SavedCheckpoint:
        """The save protocol (module docstring); the caller holds ``self._lock``.

        ``before_commit``: called once the temp file is durable, before its rename; an error it
        raises fails the save (the temp file removed, nothing committed).
        """
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
        if before_commit is not None:
            try:
                before_commit()
            except BaseException as err:
                _unlink_quietly(tmp)
                if isinstance(err, Exception):
                    raise fail(err) from err
                raise

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
