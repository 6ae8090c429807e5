"""Checkpoints in and out of a Session: capture, write, acknowledge, mirror, snapshot, load.

A save runs synchronously under ``save.lock`` or in the background (``async_save``: the ack goes
out once the file is durable); a single process writes alone, rank 0 writes for all under DDP,
every rank its shards with ``sharded=True``. Every committed checkpoint is reported in
``trainer.json`` and handed to the mirror; shared-memory snapshots (trainer/snapshot.py) and
``resume()``'s loading (DDP, sharded) are here too. A part of ``Session`` (session.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Union, cast

from session_watchdog.channel import ChannelError
from session_watchdog.trainer.session_types import _NEVER, _SESSION_EXTRAS_KEY, SessionError, _event
from session_watchdog.trainer.status import _info, _StatusMixin

if TYPE_CHECKING:  # torch is imported with the checkpoint module, only when a Session is built
    from session_watchdog.trainer.checkpoint import PendingSave, SavedCheckpoint
    from session_watchdog.trainer.mirror import Mirror
    from session_watchdog.trainer.sharded import ShardedCheckpoint
    from session_watchdog.trainer.snapshot import Snapshotter


class _SavingMixin(_StatusMixin):
    """Write checkpoints (sync, async, DDP, sharded), acknowledge them, mirror and snapshot."""

    # ------------------------------------------------------------------------------------------
    # Saving

    def _capture(self, rank_rng: Optional[List[Dict[str, Any]]] = None,
                 rank_loaders: Optional[List[Any]] = None) -> Dict[str, Any]:
        state: Dict[str, Any] = self._ckpt.capture_state(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, epoch=self._epoch, step=self._step, elapsed_s=self.elapsed_s,
            extras=self._extras_to_save(rank_rng, rank_loaders))
        return state

    def _extras_to_save(self, rank_rng: Optional[List[Dict[str, Any]]] = None,
                        rank_loaders: Optional[List[Any]] = None) -> Dict[str, Any]:
        extras = dict(self.extras)
        ours: Dict[str, Any] = {"epoch_start_step": self._epoch_start_step}
        if self._tracked:
            ours["loaders"] = self._loader_states()
        if rank_rng is not None:
            # DDP: rank 0 writes the file; every rank gets its own RNG states back on resume
            # (ranks seeded differently - per-rank augmentation - resume bit for bit too).
            ours["rank_rng"] = rank_rng
        if rank_loaders is not None and any(states is not None for states in rank_loaders):
            # Likewise every rank's own loader positions: per-rank seeds shuffle differently.
            ours["rank_loaders"] = rank_loaders
        extras[_SESSION_EXTRAS_KEY] = ours
        return extras

    def _loader_states(self) -> Optional[List[Dict[str, Any]]]:
        """This process's tracked loaders' positions (data.py), or None: none tracked."""
        return [entry.state_dict() for entry in self._tracked] if self._tracked else None

    def _rng_state(self) -> Dict[str, Any]:
        rng: Dict[str, Any] = self._ckpt.capture_state(epoch=0, step=0, elapsed_s=0.0)["rng"]
        return rng

    def _write(self, *, final: bool) -> Union[SavedCheckpoint, ShardedCheckpoint]:
        """Write one checkpoint: this process alone, rank 0 for all (DDP), or sharded (DCP)."""
        if self._sharded_ckpt is not None:
            # Rank 0's meta is the one stored: it carries every rank's loader positions.
            rank_loaders = (None if self._dist is None
                            else self._dist.all_gather(self._loader_states()))
            state = self._distmod.session_state(
                model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, rank=self._rank, rng=self._rng_state(),
                meta={"epoch": self._epoch, "step": self._step, "elapsed_s": self.elapsed_s,
                      "extras": self._extras_to_save(rank_loaders=rank_loaders)})
            self._keep_checkpoints_ahead()
            return self._sharded_ckpt.save(state, step=self._step, epoch=self._epoch)
        agreement = self._dist
        if agreement is None:
            self._keep_checkpoints_ahead()
            return self.manager.save(self._capture(), step=self._step, epoch=self._epoch)
        gathered = agreement.all_gather((self._rng_state(), self._loader_states()))
        outcome: Any = None
        error: Optional[BaseException] = None
        if agreement.rank == 0:
            try:
                self._keep_checkpoints_ahead()
                saved = self.manager.save(self._capture(rank_rng=[g[0] for g in gathered],
                                                        rank_loaders=[g[1] for g in gathered]),
                                          step=self._step, epoch=self._epoch)
                if final and not self.manager.verify(saved.path):
                    raise self._ckpt.CheckpointError(
                        f"final checkpoint {saved.path} failed verification (size or checksum)")
                outcome = ("ok", saved)
            except Exception as err:  # every rank must hear of it, or the others wait forever
                error = err
                outcome = ("error", f"{type(err).__name__}: {err}")
        # The other ranks wait here (up to the process group's timeout) while rank 0 writes.
        outcome = agreement.broadcast(outcome)
        if outcome[0] == "error":
            if error is not None:
                raise error
            raise self._ckpt.CheckpointError(f"rank 0 could not save the checkpoint: {outcome[1]}")
        result: SavedCheckpoint = outcome[1]
        return result

    def _save(self, *, seq: Optional[int], reason: str, during: str,
              after: Optional[str] = None, record: bool = True,
              final: bool = False) -> SavedCheckpoint:
        """Save synchronously under ``save.lock``; acknowledge ``seq`` once it is durable.

        Args:
            seq: the request this checkpoint answers, or None.
            reason: for the log.
            during: the state reported while saving ("saving" or "stopping").
            after: the state reported with the ack (None: the state before the save).
            record: report the checkpoint in ``trainer.json`` (``complete()`` verifies first).
            final: distributed: rank 0 verifies the file before the ranks hear the outcome.

        On failure the error is logged, reported in ``trainer.json`` (``extra.last_error``) and
        re-raised.
        """
        self._join_async()
        previous = self._state
        self._last_save_mono = time.monotonic()  # any checkpoint restarts the period
        self._set_state(during)
        # Every reporter holds its run dir's save.lock while the (collective) save runs.
        lock: Any = self._save_lock_held() if self._reporter else contextlib.nullcontext()
        try:
            with lock:
                # A ShardedCheckpoint has SavedCheckpoint's fields (path: its commit marker).
                saved = cast("SavedCheckpoint", self._write(final=final))
        except BaseException as err:
            self._save_failed(err, seq, reason, previous)
            raise
        self._rate_anchor = (time.monotonic(), self._step)  # save time is not step time
        self._sync_anchor = self._rate_anchor
        if record:
            self._record(saved, seq=seq, state=previous if after is None else after)
        _event(logging.INFO, "checkpoint_saved", reason=reason, seq=seq, step=saved.step,
               path=str(saved.path), duration_s=round(saved.duration_s, 3), bytes=saved.bytes)
        return saved

    def _keep_checkpoints_ahead(self) -> None:
        """At the first save of a run that never called resume(): keep checkpoints of later steps.

        Forgetting ``resume()`` once let saves at steps 2 and 3 prune the step-100 checkpoint
        of the run before (issue 11). They are kept for this session's life, with one warning.
        """
        if self._resume_called or self._ahead_checked:
            return
        self._ahead_checked = True
        # Sharded: step directories (rank 0's list; the other ranks get [] and say nothing).
        saver = self._sharded_ckpt if self._sharded_ckpt is not None else self.manager
        ahead: List[Union[SavedCheckpoint, ShardedCheckpoint]] = []
        ahead.extend(saver.keep_ahead_of(self._step))
        if ahead:
            newest = max(ahead, key=lambda saved: saved.step)
            _event(logging.WARNING, "checkpoints_ahead_kept", count=len(ahead),
                   newest_step=newest.step, newest_path=str(newest.path), step=self._step,
                   message=f"{len(ahead)} checkpoint(s) of later steps (newest: step "
                           f"{newest.step}) are in {self.manager.directory} but resume() was not "
                           "called: they are kept, never pruned by this run; call "
                           "session.resume() before the first step to continue from the newest")

    def _save_async(self, *, seq: Optional[int], reason: str) -> None:
        """Snapshot now, write in the background; the ack goes out when the file is durable."""
        self._join_async()
        try:
            self._take_save_lock()  # held until the write is durable (released by the waiter)
        except (ChannelError, OSError) as err:
            self._save_failed(err, seq, reason, None)
            return
        self._last_save_mono = time.monotonic()
        try:
            self._keep_checkpoints_ahead()
            pending = self.manager.save_async(self._capture(), step=self._step, epoch=self._epoch,
                                              copy_later=self._copied_later())
        except BaseException as err:
            self._save_lock.release()
            self._save_failed(err, seq, reason, None)
            if isinstance(err, (self._ckpt.CheckpointError, OSError)):
                return
            raise
        self._rate_anchor = (time.monotonic(), self._step)
        self._inflight_seq = seq
        self._async_thread = threading.Thread(target=self._await_async,
                                              args=(pending, seq, reason),
                                              name="session-watchdog-ack", daemon=True)
        self._async_thread.start()

    def _copied_later(self) -> List[Any]:
        """The tensors an async save leaves to its writer to copy (``overlap_copy``): the
        optimizer's state (and with ``overlap_copy=True`` its parameters) of the optimizer
        whose step pre-hook waits for that copy, and only while it is on."""
        if self._copy_hook is None or not self._overlap_copy:
            return []
        import torch  # loaded already: the checkpoint module imports it

        optimizer = self.optimizer
        tensors = ([p for group in optimizer.param_groups for p in group["params"]]
                   if self._copy_params_later else [])
        tensors.extend(value for per_param in optimizer.state.values()
                       if isinstance(per_param, dict) for value in per_param.values()
                       if isinstance(value, torch.Tensor))
        return tensors  # save_async leaves to its writer only those a memmove may copy

    def _wait_for_copy(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The optimizer's step pre-hook (``overlap_copy``): its step changes the tensors an
        async save's writer may still be copying."""
        self.manager.wait_copied()

    def _await_async(self, pending: PendingSave, seq: Optional[int], reason: str) -> None:
        """Background: wait for the write to be durable, then acknowledge (or report failure).

        The training thread joins this thread (``_join_async``) before it saves again,
        completes or closes, so a failure is reported exactly once, here.
        """
        try:
            # hurry=False: training goes on meanwhile; the write keeps its idle priority
            saved: Optional[SavedCheckpoint] = pending.result(hurry=False)
        except BaseException as err:
            cause = getattr(err, "cause", None)
            changed = isinstance(cause, self._ckpt.StateChangedError)
            if changed:
                self._overlap_copy = False  # this loop changes them outside optimizer.step()
                _event(logging.WARNING, "overlap_copy_off", step=pending.step, error=str(cause),
                       message="the optimizer's tensors changed outside optimizer.step() while "
                               "an async save copied them: later async saves copy every tensor "
                               "at once")
            self._save_lock.release()
            self._save_failed(err, seq, reason, None, step=pending.step)
            if changed:
                self._failed = (0, 0.0)  # no back-off: the next step boundary saves it again
            self._inflight_seq = None
            return
        self._save_lock.release()
        if saved is not None:
            self._record(saved, seq=seq, state=None)
            _event(logging.INFO, "checkpoint_saved", reason=reason, seq=seq, step=saved.step,
                   path=str(saved.path), duration_s=round(saved.duration_s, 3),
                   bytes=saved.bytes, mode="async")
        self._inflight_seq = None

    def _join_async(self) -> None:
        thread = self._async_thread
        if thread is not None and thread is not threading.current_thread():
            # The training thread's word that the optimizer's tensors stayed put while the
            # writer copied them (overlap_copy), given only on the thread that asked for the
            # save: the write commits after it (or 5 s after its copy).
            self.manager._settle_own_save()
            self.manager.hurry()  # training waits for the write now: normal CPU priority
            thread.join()
            self._async_thread = None

    def _save_failed(self, err: BaseException, seq: Optional[int], reason: str,
                     state: Optional[str], step: Optional[int] = None) -> None:
        if seq is not None:
            self._failed = (seq, time.monotonic())
        error = f"{type(err).__name__}: {err}"
        _event(logging.ERROR, "checkpoint_failed", reason=reason, seq=seq,
               step=self._step if step is None else step, error=error)
        with self._status_lock:
            self._extra["last_error"] = error
            if state is not None:
                self._state = state
        self._write_status()

    def _record(self, saved: SavedCheckpoint, *, seq: Optional[int],
                state: Optional[str]) -> None:
        """Report a durable checkpoint (and the ack of ``seq``) in one ``trainer.json`` write."""
        with self._status_lock:
            verification = getattr(self.manager, "verification", None)
            self._last_checkpoint = _info(
                saved, seq=seq, verified=verification(saved.path) if verification else None)
            self._extra["checkpoint_duration_s"] = round(float(saved.duration_s), 6)
            total = getattr(saved, "total_bytes", None)
            if total is not None:
                # Sharded: last_checkpoint describes the commit marker; this is the data's size.
                self._extra["checkpoint_total_bytes"] = int(total)
            self._extra.pop("last_error", None)
            if seq is not None:
                rid = self._rids.get(seq)
                self._handled_seq = max(self._handled_seq, seq)
                self._acked_seq = max(self._acked_seq, seq) if rid is None else seq
                if rid is not None:
                    self._handled_rid = self._acked_rid = rid
            if state is not None:
                self._state = state
        self._write_status()
        if self._mirror is not None and self._mirror.accepts(saved) \
                and not self._mirror.has(saved):  # finish() records the final one again
            self._mirror.submit(saved)

    def _open_mirror(self, mirror: Union[str, os.PathLike[str], Mirror]) -> Optional[Mirror]:
        """Build (for a path or URL), attach and start the mirror of this session's checkpoints."""
        from session_watchdog.trainer import mirror as mirror_mod

        return mirror_mod.open_mirror(mirror, self.manager, self._mirror_changed)

    def _mirror_changed(self, report: Dict[str, Any]) -> None:
        """The mirror's worker: report its state and newest verified copy in trainer.json."""
        mirror = self._mirror
        last = mirror.last if mirror is not None else None
        with self._status_lock:
            self._extra["mirror"] = report
            if last is not None:
                self._extra["last_mirrored"] = last.to_json()
        self._write_status()

    def _wait_mirror(self, saved: SavedCheckpoint, why: str, timeout: float) -> None:
        """Wait (bounded) for ``saved`` to verify on the mirror; say how it went."""
        mirror = self._mirror
        if mirror is None or not mirror.accepts(saved):
            return
        started = time.monotonic()
        _event(logging.INFO, "mirror_wait", why=why, step=saved.step, target=mirror.location,
               timeout_s=round(max(0.0, timeout), 1))
        done = mirror.wait(saved, max(0.0, timeout))
        waited = round(time.monotonic() - started, 3)
        if done is not None:
            _event(logging.INFO, "mirror_wait_done", why=why, step=saved.step, waited_s=waited,
                   path=done.location)
        else:
            _event(logging.WARNING, "mirror_wait_timeout", why=why, step=saved.step,
                   waited_s=waited, target=mirror.location, problem=mirror.problem,
                   message="the checkpoint is safe locally but not verified on the mirror; "
                           "the watchdog will not end the runtime for it")

    # ------------------------------------------------------------------------------------------
    # save.lock

    def _check_save_lock(self) -> None:
        """Refuse to start when ``save.lock`` is a symlink or not a regular file (issue 18).

        Saying so once, here, beats a crash at the first checkpoint hours later.
        """
        path = self._save_lock.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise SessionError(f"{path} is {kind}; remove it (rm {path}) and start again")

    def _take_save_lock(self) -> None:
        """Take ``save.lock``; if it was replaced during the run, recreate it and take it.

        A symlink (or FIFO, socket) put in its place after the start is unlinked, never
        followed, and a fresh lock file is created with O_NOFOLLOW; the run dir is ours (0700),
        so nobody else should have been able to do that. Losing the run over it would be worse
        than the replacement itself (issue 18). A second failure is a failed save.
        """
        try:
            self._save_lock.acquire()
            return
        except (ChannelError, OSError) as err:
            path = self._save_lock.path
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise  # not a replacement we can safely undo
            _event(logging.WARNING, "save_lock_recreated", path=str(path), error=str(err))
            if st is not None:
                os.unlink(path)
        self._save_lock.acquire()

    @contextlib.contextmanager
    def _save_lock_held(self) -> Iterator[None]:
        self._take_save_lock()
        try:
            yield
        finally:
            self._save_lock.release()

    # ------------------------------------------------------------------------------------------
    # Shared-memory snapshots (trainer/snapshot.py)

    def _take_snapshot(self) -> None:
        """Copy the state into the shared-memory snapshot (the stall is a memory copy)."""
        snapshots = self._snapshots
        assert snapshots is not None
        self._snap_due = False
        if snapshots.every_steps is not None:
            self._snap_at = (self._step // snapshots.every_steps + 1) * snapshots.every_steps
        elif self._dist is not None:
            self._snap_at = _NEVER  # the next agreement schedules the next one (_agree)
        if self._dist is not None:
            self._take_rank_snapshot(snapshots)  # a failed collective must not be swallowed
            return
        try:
            snapshots.take(self._capture(), step=self._step, epoch=self._epoch)
        except Exception as err:  # a snapshot is a bonus: never let it stop training
            _event(logging.WARNING, "snapshot_failed", error=f"{type(err).__name__}: {err}")

    def _take_rank_snapshot(self, snapshots: Snapshotter) -> None:
        """Distributed: every rank snapshots this step, after one all-gather (a collective).

        The gather brings rank 0 every rank's RNG states (its payload is then the checkpoint it
        would write: ``_write``) and tells every rank whether all have room, so they stay or
        stop together. Each rank first waits for its previous write: once any rank passes the
        gather, every rank's previous generation is complete, so the daemon always finds one
        generation complete on every rank (supervise/snapshots.py).
        """
        agreement = self._dist
        assert agreement is not None
        rank = agreement.rank
        snapshots.wait(None)
        state: Dict[str, Any] = {}
        rng: Optional[Dict[str, Any]] = None
        loaders: Optional[List[Dict[str, Any]]] = None
        try:  # never raise before the gather: the other ranks would wait in it forever
            rng = self._rng_state()
            loaders = self._loader_states()
            state = self._capture() if rank == 0 else {"rank": rank, "rng": rng}
            problem = snapshots.check_room(state)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        gathered = agreement.all_gather((rng, problem, snapshots.token if rank == 0 else None,
                                         loaders))
        problems = [(r, why) for r, (_, why, _, _) in enumerate(gathered) if why is not None]
        if problems:
            self._snap_at = _NEVER  # on every rank alike: no more snapshot collectives
            snapshots.disable(f"rank {problems[0][0]}: {problems[0][1]}", self._step)
            return
        if rank == 0:
            state["extras"] = self._extras_to_save(rank_rng=[g[0] for g in gathered],
                                                   rank_loaders=[g[3] for g in gathered])
        else:
            state.update(step=self._step, epoch=self._epoch)
        try:
            snapshots.take(state, step=self._step, epoch=self._epoch, room_checked=True,
                           header={"rank": rank, "world_size": agreement.world_size,
                                   "job": gathered[0][2]})
        except Exception as err:  # this rank's copy failed: the daemon finds no equal generation
            _event(logging.WARNING, "snapshot_failed", error=f"{type(err).__name__}: {err}")

    def _snapshot_changed(self, report: Dict[str, Any]) -> None:
        with self._status_lock:
            self._extra["snapshot"] = report
