"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), one directory per step.

:class:`ShardedCheckpointer`: DCP saves into a fresh ``step-<step:010d>.tmp-<random>``
directory, rank 0 writes the ``COMMITTED`` marker last and renames the directory to
``step-<step:010d>``; a new save of a step that has a committed directory replaces it (the old
one stays until the new one is committed), and :meth:`ShardedCheckpointer.latest` returns the
newest committed *and complete* one. It works
inside a process group (every method a collective) and in a single process alike.

The ranks' agreement on *when* to save is distributed.py's; the dict a Session saves and loads
here is built there as well (``session_state``). Every public name is importable from
``session_watchdog.trainer.distributed`` as before; this module imports nothing from there.

This module imports torch lazily, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Type, Union

from session_watchdog import channel
from session_watchdog.channel import fsync_dir

__all__ = [
    "COMMIT_MARKER",
    "ShardedCheckpoint",
    "ShardedCheckpointer",
    "ShardedCheckpointError",
    "is_initialized",
]

COMMIT_MARKER = "COMMITTED"
_STEP_DIR_RE = re.compile(r"^step-(\d{10,})$")
_TMP_INFIX = ".tmp-"
_BROKEN_SUFFIX = ".broken"
_REPLACED_INFIX = ".old-"  # a committed directory being replaced by a new save of its step
_MARKER_MAX_BYTES = 8 << 20  # one line per shard file: large jobs have thousands

# The logger these events have always used (distributed.py): a logging config may name it.
_log = logging.getLogger("session_watchdog.trainer.distributed")


def _event(level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with fields, the way session.py does (record.event / record.fields)."""
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


class ShardedCheckpointError(Exception):
    """A sharded checkpoint could not be saved, found or loaded (committed ones are intact)."""


def _dcp_errors() -> Tuple[Type[BaseException], ...]:
    # DCP gathers the ranks' failures into a CheckpointException, a BaseException subclass.
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover - moved in some future torch
        return (Exception,)
    return (Exception, CheckpointException)


# --------------------------------------------------------------------------------------------
# torch.distributed access (here, beside the checkpointer that needs it with and without a
# process group: distributed.py imports from this module and re-exports it, never the reverse)


def is_initialized() -> bool:
    """Whether torch.distributed is available and a default process group exists."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)


@dataclass(frozen=True)
class ShardedCheckpoint:
    """A committed, complete sharded checkpoint directory.

    ``path``, ``bytes`` and ``sha256`` describe the commit marker (``<directory>/COMMITTED``):
    that is what ``trainer.json`` reports as ``last_checkpoint``, so the daemon's size + sha256
    check verifies the commit record (which lists every shard file with its size).
    """

    directory: Path
    step: int
    epoch: int
    world_size: int
    total_bytes: int  # all shard files and DCP's .metadata
    at: float
    duration_s: float
    path: Path
    bytes: int
    sha256: str


def _dcp_save(state_dict: Dict[str, Any], directory: Path, process_group: Any,
              no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    writer = FileSystemWriter(str(directory), sync_files=True)
    # dcp.save since torch 2.2; save_state_dict (same arguments) in 2.1.
    save = getattr(dcp, "save", None) or getattr(dcp, "save_state_dict")  # noqa: B009
    with _single_process_quiet(no_dist):
        save(state_dict, storage_writer=writer, process_group=process_group, no_dist=no_dist)


@contextlib.contextmanager
def _single_process_quiet(no_dist: bool) -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process: we know."""
    if not no_dist:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def _weights_only_planner() -> Any:
    """A DCP load planner that refuses non-tensor entries holding anything but plain data.

    DCP restores non-tensor values with an unrestricted torch load (any pickle); we first load the
    same bytes with ``weights_only=True``, which refuses any global outside torch's allow-list (the rule
    ``CheckpointManager.load`` follows for single-file checkpoints).
    """
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except Exception as err:
                raise ShardedCheckpointError(
                    f"refusing entry {read_item.dest_index.fqn!r}: it holds objects that "
                    f"torch.load(weights_only=True) does not allow ({err})") from err
            value.seek(0)
            super().load_bytes(read_item, value)

    return WeightsOnlyLoadPlanner()


def _dcp_load(state_dict: Dict[str, Any], directory: Path, process_group: Any,
              no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    reader = FileSystemReader(str(directory))
    # dcp.load since torch 2.2; load_state_dict (same arguments) in 2.1.
    load = getattr(dcp, "load", None) or getattr(dcp, "load_state_dict")  # noqa: B009
    with _single_process_quiet(no_dist):
        load(state_dict, storage_reader=reader, planner=_weights_only_planner(),
             process_group=process_group, no_dist=no_dist)


def _sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardedCheckpointer:
    """Save and find DCP checkpoints, one fresh directory per step, committed by a marker.

    On-disk protocol, per :meth:`save` (a collective: every rank calls it with its own shards):

    1. rank 0 creates ``step-<step:010d>.tmp-<random>`` (mode 0700) and broadcasts its name;
    2. every rank writes its shards with DCP (``FileSystemWriter(sync_files=True)``: fsync per
       file); DCP's coordinator writes ``.metadata`` after all ranks reported their writes;
    3. rank 0 fsyncs ``.metadata`` and the directory, then writes ``COMMITTED`` (JSON: step,
       epoch, world size, every file with its size, sha256 of ``.metadata``) with
       ``channel.write_json`` (temp -> fsync -> rename -> fsync dir): the commit, written last;
    4. rank 0 renames the directory to ``step-<step:010d>`` (a committed one of that step is
       first renamed to ``step-<step:010d>.old-<random>``, removed once the new one is in
       place) and fsyncs the parent, then removes committed directories beyond the newest
       ``keep``, never those :meth:`keep_ahead_of` exempted (renamed to ``*.tmp-*`` first, so
       a removal cut short is swept, never mistaken for a checkpoint);
    5. rank 0 broadcasts the outcome: every rank returns the same checkpoint or raises.

    A rank killed anywhere in 1-3 leaves a ``.tmp-`` directory (no marker, or a marker in a
    directory that was never renamed): never committed, swept by rank 0 when the next
    checkpointer starts. A directory counts only with a valid marker whose files all exist with
    their recorded sizes and whose ``.metadata`` matches its sha256. Saving step N again
    writes and commits a new ``step-N`` (the state may differ: a run that did not resume, or
    restarted from scratch in the same directory); a crash between the two renames of step 4
    leaves the old one as ``step-N.old-*``, renamed back when the next checkpointer starts.

    Single process (no process group): the same protocol without collectives.

    DCP reads ``.metadata`` with pickle: load only directories you (or your job) wrote.
    """

    def __init__(self, directory: Union[str, os.PathLike[str]], *, keep: int = 2,
                 process_group: Any = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is not valid: keep at least 1 checkpoint")
        self.directory = Path(os.path.abspath(directory))
        self.keep = keep
        self.process_group = process_group
        self._kept_ahead: Set[int] = set()  # steps exempt from pruning (keep_ahead_of)
        self._distributed = is_initialized()
        self._rank = self._world_size = 0
        if self._distributed:
            import torch.distributed as dist

            self._rank = dist.get_rank(process_group)
            self._world_size = dist.get_world_size(process_group)
        else:
            self._world_size = 1
        if self._rank == 0:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.directory.mkdir(mode=0o700)
            except FileExistsError:
                pass
            self._sweep()

    # ---- collectives (identity without a process group) ------------------------------------

    def _broadcast(self, obj: Any) -> Any:
        if not self._distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self._rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.process_group)
        return box[0]

    def _all_ok(self, ok: bool) -> bool:
        if not self._distributed:
            return ok
        import torch.distributed as dist

        everyone: List[Any] = [None] * self._world_size
        dist.all_gather_object(everyone, bool(ok), group=self.process_group)
        return all(everyone)

    # ---- saving --------------------------------------------------------------------------

    def save(self, state_dict: Dict[str, Any], *, step: int, epoch: int = 0) -> ShardedCheckpoint:
        """Write this rank's part of ``state_dict`` and commit the step directory (collective).

        Returns:
            The committed checkpoint (the same on every rank).

        Raises:
            ShardedCheckpointError: on every rank, when any rank failed to write or rank 0
                failed to commit; committed directories are intact and the temp one is left
                for the next sweep.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} is not valid: a non-negative int")
        began = time.monotonic()
        final = self.directory / f"step-{step:010d}"
        plan: Any = None
        if self._rank == 0:
            # Always a new directory, even when step N is committed already: that one may hold
            # another run's state (no resume(), or a restart from scratch), and returning it
            # reported a checkpoint of this run that was never written.
            try:
                tmp = final.with_name(f"{final.name}{_TMP_INFIX}{secrets.token_hex(4)}")
                os.mkdir(tmp, 0o700)
                plan = ("write", str(tmp))
            except OSError as err:
                plan = ("error", f"cannot create a directory in {self.directory}: {err}")
        plan = self._broadcast(plan)
        if plan[0] == "error":
            raise ShardedCheckpointError(plan[1])
        tmp = Path(plan[1])
        try:
            _dcp_save(state_dict, tmp, self.process_group, no_dist=not self._distributed)
        except _dcp_errors() as err:
            # DCP gathers every rank's failure and raises on all ranks alike.
            raise ShardedCheckpointError(f"sharded save of step {step} failed: {err}") from err
        outcome: Any = None
        if self._rank == 0:
            try:
                saved = self._commit(tmp, final, step=step, epoch=epoch,
                                     duration_s=time.monotonic() - began)
                outcome = ("ok", saved)
            except Exception as err:
                outcome = ("error", f"cannot commit {final}: {type(err).__name__}: {err}")
        outcome = self._broadcast(outcome)
        if outcome[0] == "error":
            raise ShardedCheckpointError(outcome[1])
        saved = outcome[1]
        if self._rank == 0:
            self._kept_ahead.discard(step)  # replaced by this save: ours now, pruned as usual
            self._prune(saved)
        return saved  # type: ignore[no-any-return]

    def _commit(self, tmp: Path, final: Path, *, step: int, epoch: int,
                duration_s: float) -> ShardedCheckpoint:
        """Rank 0, after every rank's DCP write: marker last, then the rename to the final name."""
        metadata = tmp / ".metadata"
        _fsync_file(metadata)  # DCP fsyncs the shards (sync_files) but not always .metadata
        files: Dict[str, int] = {}
        for name in sorted(os.listdir(tmp)):
            if name.startswith(".") and name != ".metadata":
                continue  # a temp of DCP's own
            st = os.lstat(tmp / name)
            if not os.path.isfile(tmp / name) or os.path.islink(tmp / name):
                raise ShardedCheckpointError(f"{tmp / name} is not a regular file")
            files[name] = st.st_size
        fsync_dir(tmp)
        at = time.time()
        marker = {
            "v": channel.SCHEMA_VERSION, "step": step, "epoch": epoch,
            "world_size": self._world_size, "at": at, "duration_s": round(duration_s, 6),
            "files": files, "metadata_sha256": _sha256_file(metadata),
            "total_bytes": sum(files.values()),
        }
        channel.write_json(tmp / COMMIT_MARKER, marker)  # the commit: written last
        replaced: Optional[Path] = None
        if os.path.lexists(final):
            if self.verify(final) is not None:
                # A committed directory of this step: the new one replaces it. Renamed, not
                # removed, until the new one is in place (_sweep renames it back after a crash
                # in between); not a .tmp- name, so no sweep removes it first.
                replaced = final.with_name(
                    f"{final.name}{_REPLACED_INFIX}{secrets.token_hex(4)}")
                os.rename(final, replaced)
            else:
                # Damaged from outside: keep it aside for a post-mortem.
                aside = final.with_name(final.name + _BROKEN_SUFFIX)
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(self.directory)
        if replaced is not None:
            _event(logging.INFO, "sharded_checkpoint_replaced", step=step, path=str(final))
            shutil.rmtree(replaced, ignore_errors=True)
        saved = self.verify(final)
        if saved is None:
            raise ShardedCheckpointError(f"{final} does not verify right after its commit")
        _event(logging.INFO, "sharded_checkpoint_committed", step=step, path=str(final),
               files=len(files), bytes=saved.total_bytes)
        return saved

    def _prune(self, newest: ShardedCheckpoint) -> None:
        committed = [c for c in self.list()
                     if c.directory != newest.directory and c.step not in self._kept_ahead]
        excess = len(committed) + 1 - self.keep
        for old in committed[:max(0, excess)]:
            doomed = old.directory.with_name(
                f"{old.directory.name}{_TMP_INFIX}del-{secrets.token_hex(4)}")
            try:
                os.rename(old.directory, doomed)  # uncommitted at once: a cut-short rmtree is swept
            except FileNotFoundError:
                continue
            fsync_dir(self.directory)
            shutil.rmtree(doomed, ignore_errors=True)

    def keep_ahead_of(self, step: int) -> List[ShardedCheckpoint]:
        """Exempt committed checkpoints of a step beyond ``step`` from pruning; return them.

        Directories are named by step, so keep-last-K would delete the step-100 checkpoint of
        the run before at the first save of a run that did not resume (issue 11, as
        ``CheckpointManager.keep_ahead_of``). They stay until this checkpointer is gone, or until
        a save of their step replaces them. Rank 0 prunes, so only rank 0 looks: others get [].
        """
        if self._rank != 0:
            return []
        ahead = [saved for saved in self.list() if saved.step > step]
        self._kept_ahead.update(saved.step for saved in ahead)
        return ahead

    def _sweep(self) -> int:
        """Remove ``step-*.tmp-*`` directories a save or a pruning that died left behind.

        A ``step-N.old-*`` directory is a committed one a save of step N was replacing: removed
        when ``step-N`` is there, else renamed back (the save died between its two renames and
        was never reported).
        """
        removed = 0
        for name in self._names():
            if name.startswith("step-") and _REPLACED_INFIX in name:
                final = self.directory / name.split(_REPLACED_INFIX, 1)[0]
                if os.path.lexists(final):
                    shutil.rmtree(self.directory / name, ignore_errors=True)
                    removed += 1
                else:
                    os.rename(self.directory / name, final)
                    fsync_dir(self.directory)
                    _event(logging.WARNING, "sharded_checkpoint_restored", path=str(final),
                           why="a save replacing it did not finish")
        for name in self._names():
            if name.startswith("step-") and _TMP_INFIX in name:
                shutil.rmtree(self.directory / name, ignore_errors=True)
                removed += 1
        if removed:
            _event(logging.INFO, "sharded_temps_swept", directory=str(self.directory),
                   removed=removed)
        return removed

    # ---- finding -------------------------------------------------------------------------

    def _names(self) -> List[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []

    def verify(self, directory: Union[str, os.PathLike[str]]) -> Optional[ShardedCheckpoint]:
        """The checkpoint in ``directory`` if it is committed and complete, else None.

        Committed and complete: a ``step-<step:010d>`` name, a valid ``COMMITTED`` marker of that
        step, every file it lists present with its recorded size, ``.metadata`` matching its
        sha256. Reads only the marker and ``.metadata``, never the shards.
        """
        directory = Path(directory)
        match = _STEP_DIR_RE.match(directory.name)
        if match is None:
            return None
        marker = directory / COMMIT_MARKER
        try:
            obj = channel.read_json(marker, max_bytes=_MARKER_MAX_BYTES)
            if obj is None:
                return None
            files = obj["files"]
            step = obj["step"]
            if type(step) is not int or step != int(match.group(1)) or not isinstance(files, dict) \
                    or ".metadata" not in files:
                return None
            for name, size in files.items():
                if "/" in name or name in ("", ".", ".."):
                    return None
                st = os.lstat(directory / name)
                if not os.path.isfile(directory / name) or os.path.islink(directory / name) \
                        or st.st_size != size:
                    return None
            if _sha256_file(directory / ".metadata") != obj["metadata_sha256"]:
                return None
            raw = marker.read_bytes()
            import hashlib

            return ShardedCheckpoint(
                directory=directory, step=step, epoch=int(obj.get("epoch", 0)),
                world_size=int(obj.get("world_size", 0)),
                total_bytes=int(obj.get("total_bytes", sum(files.values()))),
                at=float(obj["at"]), duration_s=float(obj.get("duration_s", 0.0)),
                path=marker, bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
        except (channel.ChannelError, OSError, KeyError, TypeError, ValueError, RecursionError):
            return None  # RecursionError: a marker nested thousands of levels deep (issue 18)

    def list(self) -> List[ShardedCheckpoint]:
        """Committed, complete checkpoints, oldest first (any rank may call it; read-only)."""
        found = []
        for name in sorted(self._names()):
            if _STEP_DIR_RE.match(name):
                saved = self.verify(self.directory / name)
                if saved is not None:
                    found.append(saved)
                else:
                    _event(logging.WARNING, "sharded_checkpoint_ignored",
                           path=str(self.directory / name), why="uncommitted or incomplete")
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Optional[ShardedCheckpoint]:
        """The newest committed, complete checkpoint, or None (read-only)."""
        found = self.list()
        return found[-1] if found else None

    # ---- loading -------------------------------------------------------------------------

    def choose(self) -> Optional[ShardedCheckpoint]:
        """Collective: rank 0's :meth:`latest`, the same on every rank."""
        return self._broadcast(self.latest() if self._rank == 0 else None)  # type: ignore[no-any-return]

    def load(self, state_dict: Dict[str, Any],
             checkpoint: Optional[ShardedCheckpoint] = None) -> ShardedCheckpoint:
        """Load ``checkpoint`` (default: :meth:`choose`) into ``state_dict`` in place (collective).

        Tensors are read into the tensors ``state_dict`` holds (DCP's rule: allocate first);
        other entries are replaced by the stored values (plain data only, see
        ``_weights_only_planner``).

        Raises:
            ShardedCheckpointError: on every rank: no checkpoint, or one that some rank cannot
                verify (a checkpoint directory that is not on a filesystem every rank shares).
        """
        if checkpoint is None:
            checkpoint = self.choose()
            if checkpoint is None:
                raise ShardedCheckpointError(f"no committed checkpoint in {self.directory}")
        ok = self.verify(checkpoint.directory) is not None
        if not self._all_ok(ok):
            raise ShardedCheckpointError(
                f"{checkpoint.directory} is not committed and complete on every rank "
                f"(this rank: {'ok' if ok else 'missing or incomplete'}); the checkpoint "
                "directory must be on a filesystem all ranks share")
        try:
            _dcp_load(state_dict, checkpoint.directory, self.process_group,
                      no_dist=not self._distributed)
        except ShardedCheckpointError:
            raise
        except _dcp_errors() as err:
            raise ShardedCheckpointError(f"cannot load {checkpoint.directory}: {err}") from err
        return checkpoint

