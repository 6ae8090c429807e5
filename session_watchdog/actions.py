"""Carry out the policy's decisions: write requests, wake the trainer, report warnings.

Thin and replaceable: the daemon takes an ``Actions`` object in its constructor, tests pass their
own. Nothing here decides anything.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Collection, List, Mapping, Optional, Sequence, Set, Tuple

import psutil

from session_watchdog import channel, identity
from session_watchdog.log import get_logger
from session_watchdog.policy import TRAINER_HUNG, Decision
from session_watchdog.probes import Sample

log = get_logger()


def signal_trainer(status: channel.TrainerStatus, run_dir: channel.RunDir,
                   sig: int = signal.SIGUSR1, child_pgid: Optional[int] = None,
                   handler: str = "sigusr1") -> str:
    """Send ``sig`` to the trainer only if the kernel proves ``status.pid`` is the trainer.

    ``trainer.json`` is a claim: the pid must hold ``run.lock`` (or be in ``child_pgid``, the
    group of the command we wrapped), be above 1, not ourselves, of our uid
    (:mod:`session_watchdog.identity`), and its create time must match the status (a reused
    pid is another process); ``status.extra[handler]`` must say that the trainer handles ``sig``.
    Returns what happened: sent | gone | reused | refused | no-handler. A refusal is logged once
    per reason.
    """
    if not status.extra.get(handler):
        # SIGUSR1's default action kills the process: only signal a trainer that said it
        # installed a handler (notebook threads cannot; they rely on the poller).
        return "no-handler"
    if 1 < status.pid <= identity.PID_MAX and not psutil.pid_exists(status.pid):
        return "gone"
    refusal = identity.trainer_pid_proven(run_dir, status.pid, child_pgid)
    if refusal is None:
        try:
            if abs(psutil.Process(status.pid).create_time() - status.start_time) > 0.05:
                return "reused"
            refusal = identity.send_proven(
                status.pid, sig, lambda: identity.trainer_pid_proven(run_dir, status.pid, child_pgid))
        except (psutil.NoSuchProcess, ProcessLookupError):
            return "gone"
        except (psutil.AccessDenied, PermissionError) as err:
            refusal = f"pid {status.pid} cannot be signalled ({err})"
    if refusal is None:
        return "sent"
    if refusal not in _refusals_logged and len(_refusals_logged) < 1000:
        _refusals_logged.add(refusal)
        log.warning("signal_refused", signal=signal.Signals(sig).name, pid=status.pid,
                    reason=refusal, message="trainer.json names a process that is not provably "
                    "the trainer; no signal sent (the trainer still reads the request)")
    return "refused"


_refusals_logged: Set[str] = set()  # one warning per distinct refusal (reason names the pid)


class Actions:
    """The daemon's hands for issue-2 decisions (requests and warnings)."""

    def __init__(self, run_dir: channel.RunDir, dry_run: bool = False) -> None:
        self.run_dir = run_dir
        self.dry_run = dry_run

    def apply(self, decisions: List[Decision], sample: Sample) -> None:
        for decision in decisions:
            self._log_decision(decision)
            if decision.kind in ("request", "resend"):
                self.send_request(decision, sample)
            elif decision.reason == TRAINER_HUNG and sample.trainer.status is not None:
                from session_watchdog.supervise.hang import log_stacks

                log_stacks(sample.trainer.status, self.run_dir)

    @staticmethod
    def _log_decision(d: Decision) -> None:
        fields: dict[str, Any] = {"kind": d.kind, "reason": d.reason, "message": d.message}
        if d.action is not None:
            fields.update(action=d.action, seq=d.seq, deadline=d.deadline)
        fields.update(d.data)
        log.info("decision", **fields)

    def send_request(self, d: Decision, sample: Sample) -> None:
        assert d.seq is not None and d.action is not None  # requests always carry both
        request = channel.Request(d.seq, d.action, d.reason, d.deadline, sample.now, rid=d.rid)
        try:
            self.run_dir.write_request(request)
        except OSError as err:
            log.error("action", step="request_write_failed", reason=d.reason, seq=d.seq,
                      error=f"{err.strerror or err} ({self.run_dir.file(channel.REQUEST_FILE)})")
            return
        woke: Optional[str] = None
        status = sample.trainer.status
        if status is not None and sample.trainer.alive:
            woke = signal_trainer(status, self.run_dir)
        log.info("action", step="request_written", reason=d.reason, action=d.action, seq=d.seq,
                 deadline=d.deadline, signal=woke)


# --------------------------------------------------------------------------------------------
# Ending the runtime (DESIGN.md "Ending the runtime (only when it is safe)")


class EndAborted(Exception):
    """The end transaction stopped before the end action; the message says why."""


def verify_checkpoint(path: str, checksum: str, size: int,
                      verified_mtime_ns: Optional[int] = None) -> Optional[str]:
    """None when the file at ``path`` has ``size`` bytes and ``checksum``; else what is wrong.

    ``checksum`` is ``"<algorithm>:<hex>"`` (session_watchdog/checksum.py) or, as reported before
    checksums, a bare sha256 hex. The checkpoint's commit marker (``<path>.sha256``), when
    present, must agree as well. ``verified_mtime_ns``: the file's mtime when its trainer read it
    back from disk and found it whole (``trainer.json``); while the file still has that mtime
    (and ``size``), it is not read again.
    """
    import stat

    from session_watchdog import checksum as checksums

    try:
        expected = checksums.normalize(checksum)
    except checksums.ChecksumError as err:
        return f"checkpoint {path}: {err}"

    # Never follow a symlink put in the checkpoint's place, never wait on a FIFO, never read a
    # device without end (issue 18): a regular file, read up to the reported size.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as err:
        return f"checkpoint {path} cannot be read: {getattr(err, 'strerror', None) or err}"
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return f"checkpoint {path} is not a regular file"
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if st.st_size != size:
            return f"checkpoint {path} has {st.st_size} bytes, the trainer reported {size}"
        try:
            marker = channel.read_json(Path(path + ".sha256"))
        except (channel.ChannelError, RecursionError) as err:
            return f"checkpoint marker is unreadable: {err}"
        if marker is not None and (checksums.for_record(marker) != expected
                                   or marker.get("bytes") != size):
            return f"checkpoint marker {path}.sha256 does not match the trainer's report"
        if verified_mtime_ns is not None and st.st_mtime_ns == verified_mtime_ns:
            # Its trainer read it back from disk after the commit (CheckpointManager.verify) and
            # it has not changed since: no cold re-read of many GB at the end (issue 17).
            return None
        algorithm = checksums.parse(expected)[0]
        os.set_blocking(fd, True)
        try:
            actual, read = checksums.of_stream(fh, algorithm, size)
        except OSError as err:
            return f"checkpoint {path} cannot be read: {err.strerror or err}"
        except checksums.ChecksumError as err:
            return f"checkpoint {path}: {err}"
    if read != size or actual != expected:
        return f"checkpoint {path} does not match its {algorithm} (torn or changed)"
    return None


DRIVE_ROOT = "/content/drive"


def _on_drive(paths: List[str]) -> List[str]:
    return [p for p in paths if p and (p == DRIVE_ROOT or p.startswith(DRIVE_ROOT + "/"))]


def flush_drive(paths: List[str], *, import_drive: Optional[Callable[[], Any]] = None,
                sleep: Callable[[float], None] = time.sleep, stable_checks: int = 3,
                poll_s: float = 2.0, max_wait_s: float = 300.0, unmount: bool = True) -> str:
    """Make files under a Google Drive mount durable before the runtime goes away.

    Drive uploads asynchronously; a runtime ended early loses the copy. The sizes of ``paths``
    must stay the same for ``stable_checks`` polls; then, with ``unmount`` and google.colab
    importable, ``drive.flush_and_unmount()`` pushes the rest (only right before the end action:
    after an unmount, later saves to Drive would land on the local disk).
    Returns "not-on-drive" | "flushed" | "stable" | "unstable".
    """
    on_drive = _on_drive(paths)
    if not on_drive:
        return "not-on-drive"
    if unmount:
        try:
            drive = import_drive() if import_drive else __import__("google.colab.drive",
                                                                   fromlist=["drive"])
            drive.flush_and_unmount()
            return "flushed"
        except Exception:  # not importable, or no kernel to talk to: watch the sizes instead
            pass
    last: Optional[List[int]] = None
    same = 0
    waited = 0.0
    while waited <= max_wait_s:
        sizes = []
        for p in on_drive:
            try:
                sizes.append(os.stat(p).st_size)
            except OSError:
                sizes.append(-1)
        same = same + 1 if sizes == last else 0
        if same >= stable_checks:
            return "stable"
        last = sizes
        sleep(poll_s)
        waited += poll_s
    return "unstable"


def colab_unassign(addr: str, *, timeout_s: float = 10.0, retries: int = 3,
                   sleep: Callable[[float], None] = time.sleep) -> str:
    """POST http://$TBE_RUNTIME_ADDR/unassign (what Colab's runtime.unassign() asks for)."""
    import urllib.error
    import urllib.request

    url = f"http://{addr}/unassign"
    last = ""
    for attempt in range(1, retries + 1):
        try:
            req = urllib.request.Request(url, data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - fixed host
                return f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        log.warning("action", step="end_action_retry", attempt=attempt, error=last, url=url)
        if attempt < retries:
            sleep(2.0 * attempt)
    raise EndAborted(f"POST {url} failed {retries} times ({last})")


def run_argv(argv: Sequence[str], *, timeout_s: float = 60.0) -> str:
    """Run an end command as an argv list: never through a shell."""
    import subprocess

    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.SubprocessError) as err:
        raise EndAborted(f"end command {list(argv)} could not run: {err}") from err
    if proc.returncode != 0:
        raise EndAborted(f"end command {list(argv)} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[:200]}")
    return "exit 0"


AUTODL_SHUTDOWN = ("/usr/bin/shutdown",)


def end_action_for(platform: Any, config: Any, env: Optional[Mapping[str, str]] = None
                   ) -> Tuple[str, Optional[Callable[[], str]]]:
    """(description, callable) of this platform's end action; callable None when there is none."""
    env = os.environ if env is None else env
    if platform.name == "colab":
        if platform.enterprise or env.get("VERTEX_PRODUCT") == "COLAB_ENTERPRISE":
            return "none (Colab Enterprise runtimes are never unassigned)", None
        addr = env.get("TBE_RUNTIME_ADDR")
        if not addr:
            return "none (TBE_RUNTIME_ADDR is not set)", None
        return f"POST http://{addr}/unassign", lambda: colab_unassign(addr)
    argv: Sequence[str] = config.end_command
    if not argv and platform.name == "autodl":
        argv = AUTODL_SHUTDOWN
    if not argv:
        return "none (set end_command, e.g. [\"sudo\", \"shutdown\", \"-h\", \"now\"])", None
    return " ".join(argv), lambda: run_argv(argv)


class EndTransaction:
    """verify -> persist (Drive) -> locks -> grace (cancellable) -> end action -> confirm.

    Each step is logged as an ``action`` event (``step=end_*``). Runs on its own thread in the
    daemon; tests run it directly with a fake sleep and a recording end action.
    """

    def __init__(self, *, run_dir: channel.RunDir, reason: str, status: Optional[channel.TrainerStatus],
                 grace_s: float, dry_run: bool, end_action: Tuple[str, Optional[Callable[[], str]]],
                 check_checkpoint: bool = True, extra_paths: Sequence[str] = (),
                 safe_now: Optional[Callable[[], Optional[str]]] = None,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic,
                 flush: Callable[..., str] = flush_drive,
                 confirm_after_s: float = 60.0, alive: Callable[[], bool] = lambda: True,
                 cancel_since: Optional[float] = None,
                 drive_flushed: Collection[Tuple[str, str]] = (),
                 drive_mounted: Callable[[], bool] = lambda: os.path.ismount(DRIVE_ROOT)) -> None:
        self.run_dir = run_dir
        self.reason = reason
        self.status = status
        self.grace_s = grace_s
        self.dry_run = dry_run
        self.description, self.action = end_action
        self.check_checkpoint = check_checkpoint
        self.extra_paths = list(extra_paths)
        self.safe_now = safe_now
        self.sleep = sleep
        self.monotonic = monotonic
        self.flush = flush
        self.confirm_after_s = confirm_after_s
        self.alive = alive
        self.cancelled = threading.Event()
        self.cancelled_by = "the user"
        # A `session-watchdog cancel` at or after this wall time counts (the daemon's start: a
        # cancel before the grace keeps the runtime); None: only one during this transaction.
        self.cancel_since = cancel_since
        # (path, checksum) of checkpoint files that an earlier try verified, flushed to Drive
        # and unmounted (see _flushed_earlier); this try adds its own to ``flushed``.
        self.drive_flushed = frozenset(drive_flushed)
        self.drive_mounted = drive_mounted
        self.flushed: Set[Tuple[str, str]] = set()
        self._verified: List[Tuple[str, str]] = []  # (path, checksum) verified by this try
        self.outcome: Optional[str] = None
        self._locks = [run_dir.lock(channel.RUN_LOCK), run_dir.lock(channel.SAVE_LOCK)]
        # Set (under _cancel_lock) right before the end action: from then on a cancel cannot
        # stop it, only its retry; cancel() says so.
        self.acted = False
        self._cancel_lock = threading.Lock()

    def cancel(self, by: str = "the user") -> bool:
        """Cancel the end; True when that keeps the runtime, False when the end action already
        ran (the cancel then only stops its retry)."""
        with self._cancel_lock:
            if not self.cancelled.is_set():  # the first cancel says who
                self.cancelled_by = by
            self.cancelled.set()
            return not self.acted

    def _point_of_no_return(self, since: float) -> bool:
        """Mark the end action as started, unless a cancel came first (False then): this
        process's, or a ``session-watchdog cancel`` (cancel.json) written since ``since``."""
        self._cancel_requested(since)  # the file, read just before: it cancels through cancel()
        with self._cancel_lock:
            self.acted = not self.cancelled.is_set()
            return self.acted

    def holds_locks(self) -> bool:
        """Whether this transaction holds run.lock (and so nobody else does)."""
        return self._locks[0].held

    def _step(self, step: str, **fields: Any) -> None:
        log.info("action", step=step, reason=self.reason, **fields)

    def _cancelled(self, after: str = "; the runtime stays") -> str:
        self._step("end_cancelled", by=self.cancelled_by,
                   message=f"cancelled ({self.cancelled_by}){after}")
        return "cancelled"

    def _flushed_earlier(self, path: str, checksum: str) -> bool:
        """Whether ``path`` is missing because an earlier try of this end unmounted Drive.

        That try verified the file, flushed it to Drive and unmounted Drive
        (``flush_and_unmount``), then stopped (a cell started during the flush, say). Drive holds
        that copy and nothing on this runtime can change it while Drive is unmounted, so it still
        counts as verified: reading it again would need ``drive.mount()``, which asks the user to
        authorise in the notebook's browser tab and cannot be done from the watchdog. Without
        this, every later try failed on our own unmount and the runtime was never released. A
        file that is there again, or missing while Drive is mounted again (deleted or moved
        since), is verified as usual.
        """
        return ((path, checksum) in self.drive_flushed and not os.path.lexists(path)
                and not self.drive_mounted())

    def _cancel_requested(self, since: float) -> bool:
        if self.cancelled.is_set():
            return True
        if cancel_requested(self.run_dir, since if self.cancel_since is None else self.cancel_since):
            self.cancel("session-watchdog cancel")
        return self.cancelled.is_set()

    def run(self) -> str:
        """Carry the transaction out; return the outcome (also in ``self.outcome``)."""
        try:
            self.outcome = self._run()
        except EndAborted as err:
            self._step("end_aborted", message=str(err))
            self.outcome = "aborted"
        except Exception as err:  # fail safe: no end, and say why (this runs on its own thread)
            self._step("end_failed", message=f"{type(err).__name__}: {err}")
            self.outcome = "failed"
        finally:
            for lock in self._locks:
                lock.release()
        return self.outcome

    def _verified_on_mirror(self, ckpt: Optional[channel.CheckpointInfo]) -> Optional[List[str]]:
        """None without a mirror; else the mirror's files of the final checkpoint (issue 14).

        The trainer copies every checkpoint to its mirror and reads it back there; the runtime
        ends only once the final one verified on it. A local mirror path is hashed again here.

        Raises:
            EndAborted: the final checkpoint is not (or no longer) verified on the mirror.
        """
        mirror = channel.MirrorStatus.from_status(self.status)
        if mirror is None or ckpt is None or not self.check_checkpoint:
            return None
        if mirror.last_checksum != ckpt.checksum or mirror.last_step != ckpt.step \
                or mirror.last_path is None:
            raise EndAborted(_mirror_not_verified(ckpt, mirror))
        if mirror.local and not self._flushed_earlier(mirror.last_path, ckpt.checksum):
            problem = verify_checkpoint(mirror.last_path, ckpt.checksum, ckpt.bytes)
            if problem is None and os.path.basename(mirror.last_path) == DIR_MARKER:
                problem = _verify_dir_files(mirror.last_path)  # a committed directory's files
            if problem is not None:
                raise EndAborted(f"on the mirror: {problem}")
            self._verified.append((mirror.last_path, ckpt.checksum))
        self._step("end_mirror", ok=True, path=mirror.last_path, checkpoint_step=ckpt.step,
                   rehashed=mirror.local)
        return _checkpoint_files(mirror.last_path) if mirror.local else []

    def _run(self) -> str:
        started_wall = time.time()
        # 1-2. the last checkpoint verifies (size + checksum, marker agrees)
        ckpt = self.status.last_checkpoint if self.status is not None else None
        verified: Optional[Tuple[int, int, int]] = None
        if self.check_checkpoint:
            if ckpt is None:
                self._step("end_verify", ok=None, message="no checkpoint was reported (plain command)")
            elif self._flushed_earlier(ckpt.path, ckpt.checksum):
                self._step("end_verify", ok=True, path=ckpt.path, bytes=ckpt.bytes, trusted=True,
                           message="verified and flushed to Drive by an earlier try, which "
                                   "unmounted Drive")
            else:
                read_back = ckpt.mtime_ns if ckpt.verified_at else None
                problem = verify_checkpoint(ckpt.path, ckpt.checksum, ckpt.bytes, read_back)
                if problem is not None:
                    raise EndAborted(problem)
                verified = _identity(ckpt.path)
                self._verified.append((ckpt.path, ckpt.checksum))
                # trusted: the trainer's read-back stands (file unchanged), so no re-read here
                self._step("end_verify", ok=True, path=ckpt.path, bytes=ckpt.bytes,
                           trusted=read_back is not None and verified is not None
                           and verified[2] == read_back)
        # 3. the persistent copy is safe: Drive uploads asynchronously, so the checkpoint's size
        # must have settled (no unmount yet: the user may still cancel and go on training)
        paths = _checkpoint_files(ckpt.path) if ckpt is not None else []
        paths += self.extra_paths
        on_mirror = self._verified_on_mirror(ckpt)  # with a mirror: replaces the size heuristic
        if on_mirror is not None:
            paths = on_mirror + self.extra_paths
        settled = self.flush(paths, unmount=False) if on_mirror is None else "mirror-verified"
        if settled == "unstable":
            raise EndAborted("files on Google Drive kept changing; not ending the runtime")
        self._step("end_persist", result=settled)
        # 4. nobody trains or saves; we keep both locks through the end action
        names = ("run.lock (a trainer is alive)", "save.lock (a checkpoint is being written)")
        for lock, name in zip(self._locks, names):
            if not lock.acquire(blocking=False):
                raise EndAborted(f"{name}; not ending the runtime")
        self._step("end_locks", message="run.lock and save.lock held by the watchdog")
        # 5. grace period, announced and cancellable
        self._step("end_grace", grace_s=self.grace_s,
                   message=f"ending the runtime in {self.grace_s:g}s ({self.description}); cancel "
                           "with `session-watchdog cancel` or session_watchdog.cancel()")
        deadline = self.monotonic() + self.grace_s
        while True:
            if self._cancel_requested(started_wall):
                return self._cancelled()
            left = deadline - self.monotonic()
            if left <= 0:
                break
            self.sleep(min(1.0, left))
        if self.safe_now is not None:
            problem = self.safe_now()
            if problem is not None:
                raise EndAborted(problem)
        if ckpt is not None and verified is not None and _identity(ckpt.path) != verified:
            # The file changed since it was verified (we hold save.lock, so not by our trainer):
            # verify it again right before the point of no return.
            problem = verify_checkpoint(ckpt.path, ckpt.checksum, ckpt.bytes)
            if problem is not None:
                raise EndAborted(f"{problem} (changed during the grace period)")
        # 6. the end action
        if self.action is None:
            self._step("end_unavailable", message=f"no end action on this platform: {self.description}")
            return "unavailable"
        if self.dry_run:
            self._step("end_dry_run", message=f"dry run: would now run {self.description}")
            return "dry-run"
        # A cancel (or a stop of the watchdog) that came during the last check still counts.
        if self._cancel_requested(started_wall):
            return self._cancelled()
        if settled != "not-on-drive":
            # the last moment to push Drive's cache (flush_and_unmount where google.colab is there)
            flushed = self.flush(paths, unmount=True)
            self._step("end_flush", result=flushed)
            if flushed == "flushed":  # Drive is unmounted now: a later try trusts these files
                self.flushed.update(f for f in self._verified if _on_drive([f[0]]))
            again = "mount Drive again (drive.mount) before saving to it"
            if self._cancel_requested(started_wall):
                return self._cancelled(f" after Drive was flushed and unmounted; the runtime "
                                       f"stays: {again}")
            # The flush can take minutes (uploads): look once more at what it may have missed.
            problem = self.safe_now() if self.safe_now is not None else None
            if problem is not None:
                raise EndAborted(f"{problem}; Drive was flushed and unmounted: {again}")
        if not self._point_of_no_return(started_wall):  # a cancel during the last check
            return self._cancelled() if settled == "not-on-drive" else self._cancelled(
                " after Drive was flushed and unmounted; the runtime stays: mount Drive again "
                "(drive.mount) before saving to it")
        result = self.action()
        self._step("end_action", message=self.description, result=result)
        # 7. confirm: still alive well after the action -> say so and try once more
        self.sleep(self.confirm_after_s)
        if self.alive():
            # A cancel during the wait could not stop the action that ran; it stops its retry.
            if self._cancel_requested(started_wall):
                return self._cancelled(f" after the end action ran ({result}); it is not tried "
                                       "again and the runtime stays while it still runs")
            self._step("end_action_unconfirmed", message=f"still running {self.confirm_after_s:g}s "
                       "after the end action; trying once more")
            if self.safe_now is not None:  # the retry is an end action too: check it afresh
                problem = self.safe_now()
                if problem is not None:
                    raise EndAborted(f"not retrying: {problem}")
            try:
                result = self.action()
            except EndAborted as err:
                raise EndAborted(f"retry failed: {err}") from err
            self._step("end_action", message=self.description, result=result, retry=True)
        return "ended"


def _mirror_not_verified(ckpt: channel.CheckpointInfo, mirror: channel.MirrorStatus) -> str:
    why = f"{mirror.state}: {mirror.problem} ({mirror.error})" if mirror.problem else mirror.state
    newest = f"step {mirror.last_step}" if mirror.last_step is not None else "nothing yet"
    return (f"the final checkpoint (step {ckpt.step}) is not verified on the mirror {mirror.target} "
            f"(mirror {why}; newest there: {newest}); not ending the runtime")


DIR_MARKER = "WATCHDOG_COMMITTED.json"  # integrations/_core.py's COMMIT_MARKER (no torch here)


def _verify_dir_files(marker: str) -> Optional[str]:
    """None when every file a committed directory's marker lists has its size and sha256."""
    directory = os.path.dirname(marker)
    try:
        files = channel.read_json(Path(marker))["files"]  # type: ignore[index]
        entries = [(str(rel), str(e["sha256"]), int(e["bytes"])) for rel, e in files.items()]
    except (channel.ChannelError, TypeError, KeyError, AttributeError, ValueError) as err:
        return f"checkpoint marker {marker} is unreadable: {err}"
    for rel, sha256, size in entries:
        if ".." in rel.split("/") or rel.startswith("/"):
            return f"checkpoint marker {marker} lists {rel!r} outside its directory"
        problem = verify_checkpoint(os.path.join(directory, rel), sha256, size)
        if problem is not None:
            return problem
    return None


def _checkpoint_files(path: str) -> List[str]:
    """The files of a checkpoint: a file and its marker, or a sharded step directory's files."""
    if os.path.basename(path) in ("COMMITTED", DIR_MARKER):  # the marker of a whole directory
        directory = os.path.dirname(path)
        try:
            return sorted(os.path.join(directory, n) for n in os.listdir(directory))
        except OSError:
            return [path]
    return [path, path + ".sha256"]


def _identity(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def request_cancel(run_dir: channel.RunDir) -> None:
    """Ask the watchdog of ``run_dir`` (any process) to keep this runtime: a pending end stands
    down, and a later one is not started. The next watchdog of the run dir removes the request."""
    channel.write_json(run_dir.file(channel.CANCEL_FILE), {"v": channel.SCHEMA_VERSION, "at": time.time()})


def cancel_requested(run_dir: channel.RunDir, since: float) -> Optional[float]:
    """The time of a `cancel` made at or after ``since`` (wall clock), else None."""
    try:
        obj = channel.read_json(run_dir.file(channel.CANCEL_FILE))
    except channel.ChannelError:
        return None
    at = obj.get("at") if obj is not None else None
    if isinstance(at, (int, float)) and not isinstance(at, bool) and at >= since:
        return float(at)
    return None
