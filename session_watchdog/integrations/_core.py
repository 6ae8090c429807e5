"""What the framework callbacks share: committed checkpoint directories and a framework session.

A framework (Hugging Face Trainer, Lightning) writes its own checkpoint directory, with its own
files and without fsync. We make such a directory *committed* afterwards, the way
``CheckpointManager`` commits a single file and ``ShardedCheckpointer`` a DCP directory:

1. every file under the directory is read once (sha256) and fsynced, then every directory;
2. the marker :data:`COMMIT_MARKER` (JSON: step, epoch, every file with its size and sha256) is
   written with ``channel.write_json`` (temp -> fsync -> rename -> fsync dir): the commit,
   written last.

A directory counts for resuming only when its marker is valid and every file it lists has its
recorded size and sha256 (:func:`verify_dir`): one the process was killed in while the framework
was still writing has no marker and is never chosen (:func:`newest_committed`). The marker is what
``trainer.json`` reports as ``last_checkpoint`` (path, bytes, sha256 of the marker itself, like a
sharded checkpoint), so the daemon's size + sha256 check verifies the commit record; the data's
size goes to ``extra["checkpoint_total_bytes"]``.

:class:`FrameworkSession` is a :class:`~session_watchdog.trainer.Session` whose step counter is the
framework's global step and whose checkpoints the framework writes: the callback asks it what to
do at a step end (:meth:`FrameworkSession.at_step_end`: the same flags, poller, signals, periodic
timer and rank agreement as ``Session.step()``), lets the framework save, then commits and
acknowledges (:meth:`FrameworkSession.commit`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Dict, Optional, Type, Union

from session_watchdog import channel
from session_watchdog.trainer.session import Session, _event, _Flags

__all__ = ["COMMIT_MARKER", "CommittedDir", "FrameworkSession", "commit_dir", "newest_committed",
           "verify_dir"]

COMMIT_MARKER = "WATCHDOG_COMMITTED.json"
_HASH_CHUNK = 8 << 20
_MARKER_MAX_BYTES = 8 << 20

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommittedDir:
    """A committed checkpoint directory (``path``/``bytes``/``sha256``: its marker, as reported)."""

    directory: Path
    step: int
    epoch: int
    total_bytes: int  # every file of the checkpoint, the marker aside
    at: float
    duration_s: float
    path: Path
    bytes: int
    sha256: str


def _sha256_and_fsync(path: Path, fsync: bool = True) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        while True:
            chunk = os.read(fd, _HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
        if fsync:  # frameworks write without fsync: make the data durable before the commit
            os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _files(directory: Path) -> Dict[str, Path]:
    """Regular files under ``directory`` by relative path (the marker and its temps aside)."""
    found: Dict[str, Path] = {}
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            if rel == COMMIT_MARKER or (rel.startswith("." + COMMIT_MARKER)):
                continue
            if path.is_symlink() or not path.is_file():
                raise OSError(f"{path} is not a regular file; a checkpoint holds plain files only")
            found[rel] = path
    return found


def _describe(directory: Path, marker: Path, obj: Dict[str, Any]) -> CommittedDir:
    raw = marker.read_bytes()
    return CommittedDir(directory=directory, step=int(obj["step"]), epoch=int(obj.get("epoch", 0)),
                        total_bytes=int(obj["total_bytes"]), at=float(obj["at"]),
                        duration_s=float(obj.get("duration_s", 0.0)), path=marker,
                        bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())


def commit_dir(directory: Union[str, os.PathLike[str]], *, step: int, epoch: int = 0,
               duration_s: Optional[float] = None,
               began: Optional[float] = None) -> CommittedDir:
    """Hash and fsync every file of ``directory``, then write its commit marker (last).

    Args:
        directory: a checkpoint directory the framework has finished writing.
        step, epoch: recorded in the marker.
        duration_s: the save's duration; default: since ``began`` (``time.monotonic()``), or
            the hashing alone.

    Raises:
        OSError: a file cannot be read, or the marker cannot be written (nothing is committed).
    """
    directory = Path(os.path.abspath(directory))
    started = time.monotonic() if began is None else began
    files: Dict[str, Dict[str, Any]] = {}
    for rel, path in _files(directory).items():
        size = os.lstat(path).st_size
        files[rel] = {"bytes": size, "sha256": _sha256_and_fsync(path)}
    for root, _dirs, _names in os.walk(directory, topdown=False):
        channel.fsync_dir(Path(root))
    marker = {
        "v": channel.SCHEMA_VERSION, "step": int(step), "epoch": int(epoch), "at": time.time(),
        "duration_s": round(time.monotonic() - started if duration_s is None else duration_s, 6),
        "files": files, "total_bytes": sum(f["bytes"] for f in files.values()),
    }
    channel.write_json(directory / COMMIT_MARKER, marker)  # the commit: written last
    return _describe(directory, directory / COMMIT_MARKER, marker)


def verify_dir(directory: Union[str, os.PathLike[str]]) -> Optional[CommittedDir]:
    """The committed checkpoint in ``directory``, or None (no marker, a file missing or changed).

    Reads every file the marker lists (sha256): call it at resume time.
    """
    directory = Path(os.path.abspath(directory))
    marker = directory / COMMIT_MARKER
    try:
        obj = channel.read_json(marker, max_bytes=_MARKER_MAX_BYTES)
        if obj is None or not isinstance(obj.get("files"), dict) or type(obj.get("step")) is not int:
            return None
        for rel, entry in obj["files"].items():
            path = directory / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute() or path.is_symlink():
                return None
            if os.lstat(path).st_size != entry["bytes"]:
                return None
        for rel, entry in obj["files"].items():
            if _sha256_and_fsync(directory / rel, fsync=False) != entry["sha256"]:
                return None
        return _describe(directory, marker, obj)
    except (channel.ChannelError, OSError, KeyError, TypeError, ValueError):
        return None


def newest_committed(parent: Union[str, os.PathLike[str], None],
                     pattern: str = r"^checkpoint-(\d+)$") -> Optional[CommittedDir]:
    """The committed directory under ``parent`` with the highest step in its name, or None.

    Directories without a valid marker (a save cut short, a framework checkpoint written before
    the watchdog was used) are skipped, newest first, until one verifies.
    """
    if parent is None:
        return None
    regex = re.compile(pattern)
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    candidates = sorted(((int(m.group(1)), name) for name in names
                         if (m := regex.match(name)) is not None), reverse=True)
    for _step, name in candidates:
        found = verify_dir(Path(parent) / name)
        if found is not None:
            return found
        _event(logging.WARNING, "checkpoint_not_committed", path=str(Path(parent) / name),
               why="no valid commit marker (a save cut short?): skipped")
    return None


class FrameworkSession(Session):
    """A Session driven by a framework's step hooks; the framework writes the checkpoints.

    Built by the callbacks (exit_on_stop False: a stop ends the framework's loop normally).
    """

    def __init__(self, checkpoint_dir: Union[str, os.PathLike[str]], **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_stop", False)
        super().__init__(checkpoint_dir, **kwargs)
        self._save_began: Optional[float] = None
        self._saving_flags: Optional[_Flags] = None
        self._lock_held = False
        self._restore_hook: Optional[Callable[[], None]] = None

    def _open_mirror(self, mirror: Any) -> Any:
        """``mirror=``: the committed directories are copied (integrations/_mirror.py)."""
        from session_watchdog.integrations._mirror import open_dir_mirror

        return open_dir_mirror(mirror, self.checkpoint_dir, self.manager.keep,
                               self._mirror_changed)

    # ---- step boundary -------------------------------------------------------------------

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at the framework's global ``step``."""
        now = time.monotonic()
        self._step = self._start_step = int(step)
        self._rate_anchor = self._sync_anchor = (now, self._step)
        self._last_save_mono = now
        if self._dist is not None:
            self._schedule_sync()
        self._write_status()

    def at_step_end(self, step: int) -> Optional[_Flags]:
        """The framework finished optimizer step ``step``: what to do now, or None (the usual)."""
        self._step = step
        if self._pending or step >= self._sync_at:
            return self._decide()
        return None

    def stop_for_sigterm(self) -> Optional[_Flags]:
        """The framework ends training at this step for SIGTERM, on every rank at once.

        Lightning broadcasts rank 0's SIGTERM and raises ``SIGTERMException`` on every rank at
        the same batch: the stop is decided now (collectively) rather than at the next agreed
        step, which never comes.
        """
        self._sigterm = True
        if self._dist is not None:
            self._sync_at = self._step
        return self._decide()

    @property
    def save_pending(self) -> bool:
        """Whether :meth:`saving` announced a save that was neither committed nor failed yet."""
        return self._save_began is not None

    def saving(self, flags: Optional[_Flags]) -> None:
        """The framework is about to save (for ``flags``, or on its own schedule)."""
        if self._save_began is not None:
            return
        self._save_began = time.monotonic()
        self._last_save_mono = self._save_began  # any checkpoint restarts the period
        self._saving_flags = flags
        self._set_state("stopping" if flags is not None and flags.stop else "saving")
        if self._reporter and not self._lock_held:
            self._save_lock.acquire()
            self._lock_held = True

    def commit(self, directory: Union[str, os.PathLike[str]], *, step: int, epoch: int,
               final: bool = False) -> Optional[CommittedDir]:
        """Commit the directory the framework just wrote and acknowledge what it answers.

        Distributed: a collective (every rank, after its own files are written); rank 0 hashes
        and commits, every rank gets the same outcome. Returns None when it failed (logged and
        reported in ``trainer.json``; a stop then reports ``state=failed``).
        """
        if self._save_began is None:
            self.saving(None)  # a save the framework scheduled itself: take save.lock now
        flags, began = self._saving_flags, self._save_began
        self._saving_flags = self._save_began = None
        seq = None if flags is None else flags.ack_seq
        reason = "framework" if flags is None else flags.reason
        previous = "running"
        saved: Optional[CommittedDir] = None
        error: Optional[BaseException] = None
        try:
            saved = self._commit_collective(Path(directory), step=step, epoch=epoch, began=began)
        except Exception as err:
            error = err
        finally:
            if self._lock_held:
                self._lock_held = False
                self._save_lock.release()
        stop = flags is not None and flags.stop and not final
        if saved is None:
            assert error is not None
            self._save_failed(error, seq, reason, previous)
            if stop or final:
                self._fail(error)
                self.close()
            return None
        self._rate_anchor = self._sync_anchor = (time.monotonic(), self._step)
        self._epoch = int(epoch)  # reported in trainer.json
        self._record(saved, seq=seq, state="stopped" if stop else previous)  # type: ignore[arg-type]
        _event(logging.INFO, "checkpoint_saved", reason=reason, seq=seq, step=saved.step,
               path=str(saved.directory), duration_s=round(saved.duration_s, 3),
               bytes=saved.total_bytes)
        if stop:
            self._stopped = True
            deadline = flags.request.deadline if flags is not None and flags.request is not None else None
            self._wait_mirror(saved, "stop", self.mirror_wait_s if deadline is None else  # type: ignore[arg-type]
                              min(self.mirror_wait_s, deadline - time.time()))
            if self._dist is not None:
                self._dist.barrier()  # every reporter acked before any rank leaves
            _event(logging.WARNING, "stopped", reason=reason, step=saved.step,
                   path=str(saved.directory))
            self.close()
        return saved

    def save_failed(self, error: BaseException, *, final: bool = False) -> None:
        """The framework's own save raised: report it (a stop or final save fails the run)."""
        flags = self._saving_flags
        self._saving_flags = self._save_began = None
        if self._lock_held:
            self._lock_held = False
            self._save_lock.release()
        self._save_failed(error, None if flags is None else flags.ack_seq,
                          "framework" if flags is None else flags.reason, "running")
        if final or (flags is not None and flags.stop):
            self._fail(error)
            self.close()

    def _commit_collective(self, directory: Path, *, step: int, epoch: int,
                           began: Optional[float]) -> CommittedDir:
        agreement = self._dist
        if agreement is None:
            return commit_dir(directory, step=step, epoch=epoch, began=began)
        agreement.barrier()  # every rank's files (per-rank RNG states...) are written
        outcome: Any = None
        if agreement.rank == 0:
            try:
                outcome = ("ok", commit_dir(directory, step=step, epoch=epoch, began=began))
            except Exception as err:  # every rank must hear of it
                outcome = ("error", f"{type(err).__name__}: {err}")
        outcome = agreement.broadcast(outcome)
        if outcome[0] == "error":
            raise OSError(f"rank 0 could not commit {directory}: {outcome[1]}")
        result: CommittedDir = outcome[1]
        return result

    def finish(self, saved: CommittedDir) -> None:
        """Training completed with ``saved`` as its final committed checkpoint: report and close."""
        request = self._request
        seq = request.seq if request is not None and request.seq > self._handled_seq else None
        self._record(saved, seq=seq, state="completed")  # type: ignore[arg-type]
        _event(logging.INFO, "completed", path=str(saved.directory), step=saved.step,
               sha256=saved.sha256)
        self._wait_mirror(saved, "complete", self.mirror_wait_s)  # type: ignore[arg-type]
        self.close()

    # ---- failures that never reach a callback --------------------------------------------

    def watch_for_crash(self) -> None:
        """Report ``state=failed`` when an exception ends the script (or a notebook cell) first.

        The Hugging Face Trainer has no exception hook: an error inside ``train()`` would leave
        the session "running" until the process exits. Chains ``sys.excepthook`` (scripts) and
        IPython's ``post_run_cell`` (notebooks); :meth:`close` undoes both.
        """
        previous = sys.excepthook

        def hook(kind: Type[BaseException], value: BaseException,
                 tb: Optional[TracebackType]) -> None:
            if not self._closed:
                self.fail(value)
            previous(kind, value, tb)

        sys.excepthook = hook
        shell = _ipython()

        def after_cell(result: Any) -> None:
            error = getattr(result, "error_in_exec", None)
            if error is not None and not self._closed:
                self.fail(error)

        if shell is not None:
            shell.events.register("post_run_cell", after_cell)

        def restore() -> None:
            if sys.excepthook is hook:
                sys.excepthook = previous
            if shell is not None:
                try:
                    shell.events.unregister("post_run_cell", after_cell)
                except ValueError:
                    pass

        self._restore_hook = restore

    def close(self) -> None:
        restore, self._restore_hook = self._restore_hook, None
        if restore is not None and threading.current_thread() is threading.main_thread():
            restore()
        if self._lock_held:
            self._lock_held = False
            self._save_lock.release()
        super().close()


def _ipython() -> Any:
    module = sys.modules.get("IPython")
    if module is None:
        return None
    try:
        return module.get_ipython()
    except Exception:  # an IPython that is imported but not running
        return None
