"""``session-watchdog run --restarts N -- cmd``: restart a command that crashed, hung or was
OOM-killed, so a week-long job does not sit dead until someone looks (issue 13).

The :class:`Supervisor` stands where a single :class:`wrap.Child` stands in ``cmd_run`` (same
methods), and restarts the command behind it:

- a crash (exit code not 0 and not 75), a hang (the policy's ``trainer_hung``; we end the child:
  SIGTERM to the trainer, the group after ``kill_after``) or an OOM kill (SIGKILL, or the cgroup's
  ``oom_kill`` counter moved) is restarted after an exponential backoff, once the dead command's
  GPU memory is released (NVML's process list, bounded by ``restart_gpu_wait``; without NVML no
  wait). The trainer resumes from its newest verified checkpoint as usual;
- exit 0 (done), exit 75 (a stop we asked for), a trainer of this attempt that reported
  ``stopped`` (torchrun exits 1 when its workers exit 75; the run then exits 75) and a stop by
  the user are never restarted; a command we ended for hanging is, even when it saved and
  exited 75 (the training did not complete);
- the no-progress guard gives up with :data:`EXIT_GAVE_UP` when the newest checkpoint step has
  not advanced across ``restart_no_progress`` restarts, or when ``restart_storm`` restarts came
  within ``restart_storm_window``: never a loop that burns GPU hours.

Each failure, restart and give-up is a logged event (``child_failed``, with the traceback of the
command's stderr when it printed one, ``child_restarted``, ``restarts_given_up``,
``restarts_exhausted``); ``session-watchdog report`` lists them. Nothing
here blocks: :meth:`Supervisor.exit_status` advances the state on every call (the daemon's
``stop_when`` polls it every second).
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Set

import psutil

from session_watchdog import channel, wrap
from session_watchdog.config import Config, format_duration
from session_watchdog.log import get_logger

log = get_logger()

EXIT_GAVE_UP = 76
"""``run --restarts``: the no-progress guard stopped restarting (no newer checkpoint across K
restarts, or a restart storm). Distinct from the command's own codes and from 75 (resumable)."""

EXIT_STOPPED = 75  # the trainer stopped on request after a durable checkpoint: never restarted
SIGKILL_EXIT = 128 + signal.SIGKILL
LOCK_LINGER_S = 30.0  # after the command's exit, wait at most this long for run.lock to be free


@dataclasses.dataclass(frozen=True)
class Failure:
    """One end of the command that may be restarted."""

    exit_code: int
    cause: str  # crash | hang | oom | killed
    newest_step: Optional[int]  # newest checkpoint step known when it ended


@dataclasses.dataclass
class _Pending:
    failure: Failure
    at: float  # monotonic: not before
    gpu_deadline: float  # monotonic: stop waiting for the GPU memory then
    pids: Set[int]


def classify(exit_code: int, *, hung: bool, oom_kills_rose: bool,
             stopped: bool = False) -> Optional[str]:
    """The cause of an ending worth a restart, or None (0 = done, 75 = a stop we asked for).

    ``stopped``: the trainer of this attempt reported ``stopped`` (written only once the stop's
    checkpoint is durable), a planned stop whatever the code: torchrun exits 1 when its workers
    exit 75.
    """
    if exit_code == 0:
        return None
    if hung:
        # We ended it for hanging: a trainer that then saved and stopped (75) was not hung after
        # all, but its training did not complete, and the stop was ours: it is restarted.
        return "hang"
    if exit_code == EXIT_STOPPED or stopped:
        return None
    if oom_kills_rose:
        return "oom"
    if exit_code == SIGKILL_EXIT:
        return "killed"  # SIGKILL from outside: the OOM killer of a host without cgroup counters
    return "crash"


def backoff_s(config: Config, restarts_done: int) -> float:
    """restart_backoff x 2^restarts_done, at most restart_backoff_max."""
    return float(min(config.restart_backoff_max, config.restart_backoff * (2 ** min(restarts_done, 30))))


def gpu_holders(pids: Set[int], read_gpu_pids: Optional[Callable[[], Optional[Set[int]]]]) -> Set[int]:
    """Which of ``pids`` still hold GPU memory (NVML compute processes); empty without NVML."""
    if read_gpu_pids is None or not pids:
        return set()
    on_gpu = read_gpu_pids()
    return set() if on_gpu is None else pids & on_gpu


def nvml_gpu_pids() -> Optional[Callable[[], Optional[Set[int]]]]:
    """A reader of every GPU's compute pids through probes.Nvml, or None without NVML."""
    from session_watchdog.probes import Nvml

    nvml = Nvml()
    if not nvml.start():
        return None

    def read() -> Optional[Set[int]]:
        try:
            gpus = nvml.read(with_processes=True)
        except Exception:  # a GPU fell off the bus: do not wait on it
            return None
        out: Set[int] = set()
        for g in gpus:
            out.update(g.process_pids or ())
        return out

    return read


class Supervisor:
    """The wrapped command, restarted on failure; duck-types :class:`wrap.Child` for ``cmd_run``."""

    def __init__(self, argv: Sequence[str], run_dir: Path, config: Config, *,
                 newest_step: Callable[[], Optional[int]] = lambda: None,
                 oom_kills: Callable[[], Optional[int]] = lambda: None,
                 persist_snapshot: Callable[[], Optional[int]] = lambda: None,
                 trainer_alive: Callable[[], bool] = lambda: False,
                 trainer_stopped: Callable[[float], bool] = lambda since: False,
                 read_gpu_pids: Optional[Callable[[], Optional[Set[int]]]] = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 start: Callable[..., wrap.Child] = wrap.Child) -> None:
        self.argv = list(argv)
        self.run_dir = run_dir
        self.config = config
        self._newest_step = newest_step
        self._oom_kills = oom_kills
        self._persist_snapshot = persist_snapshot
        self._trainer_alive = trainer_alive
        self._trainer_stopped = trainer_stopped  # (wall time of the launch) -> a planned stop?
        self._launched_wall = 0.0
        self._exit_seen: Optional[float] = None  # monotonic: the command's exit was first seen
        self._read_gpu_pids = read_gpu_pids
        self._monotonic = monotonic
        self._start = start
        self._lock = threading.RLock()
        self.restarts = 0
        self.restart_times: List[float] = []
        self.failures: List[Failure] = []
        self.no_progress = 0  # failures in a row without a newer checkpoint
        self._progress_step: Optional[int] = None  # newest checkpoint step at the last failure
        self._best_step: Optional[int] = None
        self.user_stopped = False
        self.gave_up: Optional[str] = None
        self._final: Optional[int] = None
        self._pending: Optional[_Pending] = None
        self._hung = False
        self._pids: Set[int] = set()
        self.on_late_signal: Optional[Callable[[int], None]] = None
        self._relay: Optional[wrap.SignalRelay] = None
        self.child = self._launch()

    # ---- wrap.Child's interface -----------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def interrupted(self) -> bool:
        return self.child.interrupted

    def exit_status(self) -> Optional[int]:
        """The final exit code once nothing more will be restarted, else None. Never blocks."""
        with self._lock:
            self._advance()
            return self._final

    def forward(self, sig: int) -> None:
        """A stop from the user: no more restarts; the current child stops as in wrap.Child."""
        with self._lock:
            if self._final is not None:
                if self.on_late_signal is not None:
                    self.on_late_signal(sig)
                return
            self.user_stopped = True
            if self._pending is not None:
                log.info("restart_cancelled", signal=signal.Signals(sig).name,
                         message="a stop signal came during the restart backoff; not restarting")
                self._finish(self._pending.failure.exit_code)
                return
        self.child.forward(sig)

    def install_forwarding(self, early: Optional[wrap.EarlySignals] = None) -> None:
        """SIGINT/SIGTERM go to :meth:`forward` (the current child, whichever it is)."""
        if threading.current_thread() is threading.main_thread():  # never in the handler itself
            self._relay = wrap.SignalRelay(self.forward, early)

    def restore(self) -> None:
        if self._relay is not None:
            self._relay.restore()
            self._relay = None
        self.child.restore()

    def wait(self, timeout: Optional[float] = None) -> int:
        """The final exit code (the daemon ran until there was one)."""
        deadline = None if timeout is None else self._monotonic() + timeout
        while True:
            code = self.exit_status()
            if code is not None:
                return code
            if deadline is not None and self._monotonic() >= deadline:
                raise TimeoutError("the supervised command is still running")
            time.sleep(0.1)

    def wait_group(self) -> None:
        self.child.wait_group()

    def stderr_tail(self) -> Optional[str]:
        """The traceback (or last lines) of the current command's stderr once it ended."""
        tail: Optional[str] = getattr(self.child, "stderr_tail", lambda: None)()
        return tail

    def close_output(self) -> None:
        getattr(self.child, "close_output", lambda: None)()

    # ---- hangs -------------------------------------------------------------------------------

    def on_decisions(self, decisions: Sequence[Any], sample: Any) -> None:
        """The daemon's decisions: ``trainer_hung`` ends the child (then restarted)."""
        for decision in decisions:
            if decision.reason == "trainer_hung":
                self.end_hung(decision.message)

    def end_hung(self, why: str) -> None:
        with self._lock:
            if self._final is not None or self._pending is not None or self.user_stopped:
                return
            if self.child.exit_status() is not None or self._hung:
                return
            self._hung = True
        log.warning("child_hung", pid=self.child.pid, message=f"{why}; ending the command "
                    f"(SIGTERM to the trainer, its group after {format_duration(self.config.kill_after)})"
                    " to restart it")
        self.child.forward(signal.SIGTERM)

    # ---- the state machine -------------------------------------------------------------------

    def _launch(self) -> wrap.Child:
        self._launched_wall = time.time()
        child = self._start(self.argv, self.run_dir, kill_after_s=self.config.kill_after)
        self._oom_at_start = self._oom_kills()
        self._hung = False
        self._exit_seen = None
        self._pids = {child.pid}
        return child

    def _note_step(self) -> None:
        step = self._newest_step()
        if step is not None and (self._best_step is None or step > self._best_step):
            self._best_step = step

    def _finish(self, code: int) -> None:
        self._final = code
        self._pending = None

    def _advance(self) -> None:
        if self._final is not None:
            return
        self._note_step()
        if self._pending is not None:
            self._maybe_restart()
            return
        code = self.child.exit_status()
        if code is None:
            if self._oom_at_start is None:  # launched before the first sample
                self._oom_at_start = self._oom_kills()
            self._remember_pids()
            return
        # Forked DataLoader workers share the trainer's run.lock for a moment after it died: the
        # snapshot is persisted only once no trainer holds it (bounded wait).
        now = self._monotonic()
        if self._exit_seen is None:
            self._exit_seen = now
        if self._trainer_alive() and now - self._exit_seen < LOCK_LINGER_S:
            return
        oom_now = self._oom_kills()
        rose = oom_now is not None and self._oom_at_start is not None and oom_now > self._oom_at_start
        stopped = code not in (0, EXIT_STOPPED) and self._trainer_stopped(self._launched_wall)
        cause = classify(code, hung=self._hung, oom_kills_rose=rose, stopped=stopped)
        if stopped and cause is None:
            log.info("child_stopped", pid=self.child.pid, exit_code=code,
                     message=f"the trainer stopped after a durable checkpoint (its command "
                             f"exited {code}); a planned stop is not restarted")
            self._finish(EXIT_STOPPED)
            return
        if cause is None or self.user_stopped:
            if code not in (0, EXIT_STOPPED):
                # a stop whose save outlasted kill_after (SIGKILL), a crash during it: its
                # snapshot is kept as without --restarts (cmd_run persists nothing after us)
                self._persist_snapshot()
            self._finish(code)
            return
        persisted = self._persist_snapshot()
        if persisted is not None and (self._best_step is None or persisted > self._best_step):
            self._best_step = persisted
        failure = Failure(code, cause, self._best_step)
        self.failures.append(failure)
        progressed = failure.newest_step is not None and (
            self._progress_step is None or failure.newest_step > self._progress_step)
        self.no_progress = 0 if progressed else self.no_progress + 1
        self._progress_step = failure.newest_step
        tail = self.stderr_tail()
        log.warning("child_failed", pid=self.child.pid, exit_code=code, cause=cause,
                    newest_checkpoint_step=failure.newest_step, snapshot_step=persisted,
                    restarts=self.restarts, message=f"the command ended ({cause}, exit {code})",
                    **({"traceback": tail} if tail else {}))
        now = self._monotonic()
        window = [t for t in self.restart_times if now - t < self.config.restart_storm_window]
        if self.restarts >= self.config.restarts:
            log.warning("restarts_exhausted", restarts=self.restarts, exit_code=code,
                        message=f"the command failed ({cause}) after {self.restarts} restart(s); "
                                "no restarts left (--restarts)")
            self._finish(code)
        elif self.no_progress > self.config.restart_no_progress:
            self._give_up(f"no newer checkpoint than step {failure.newest_step} across "
                          f"{self.no_progress - 1} restart(s) (restart_no_progress = "
                          f"{self.config.restart_no_progress})", failure)
        elif len(window) >= self.config.restart_storm:
            self._give_up(f"{len(window)} restarts within "
                          f"{format_duration(self.config.restart_storm_window)} (restart_storm = "
                          f"{self.config.restart_storm})", failure)
        else:
            wait = backoff_s(self.config, self.restarts)
            self._pending = _Pending(failure, now + wait, now + wait + self.config.restart_gpu_wait,
                                     set(self._pids))
            log.info("restart_scheduled", cause=cause, backoff_s=wait, restart=self.restarts + 1,
                     message=f"restarting in {format_duration(wait)} ({cause})")

    def _give_up(self, reason: str, failure: Failure) -> None:
        self.gave_up = reason
        log.error("restarts_given_up", reason=reason, cause=failure.cause,
                  exit_code=EXIT_GAVE_UP, child_exit=failure.exit_code,
                  message=f"not restarting: {reason}")
        self._finish(EXIT_GAVE_UP)

    def _remember_pids(self) -> None:
        """The command's processes while it runs: after it died, their GPU memory is awaited."""
        try:
            self._pids.update(p.pid for p in psutil.Process(self.child.pid).children(recursive=True))
        except psutil.Error:
            pass

    def _maybe_restart(self) -> None:
        pending = self._pending
        assert pending is not None
        now = self._monotonic()
        if now < pending.at:
            return
        holders = gpu_holders(pending.pids, self._read_gpu_pids)
        if holders and now < pending.gpu_deadline:
            return
        if holders:
            log.warning("restart_gpu_busy", pids=sorted(holders),
                        message=f"GPU memory of the dead command still held after "
                                f"{format_duration(self.config.restart_gpu_wait)}; restarting anyway")
        self.restarts += 1
        self.restart_times.append(now)
        self._pending = None
        old = self.child
        self.close_output()  # the dead command's stderr: copied to the end, our pipe closed
        try:
            self.child = self._launch()
        except wrap.WrapError as err:  # the command vanished since (a deleted venv, say)
            log.error("restart_failed", error=str(err), message=f"cannot restart: {err}")
            self._finish(pending.failure.exit_code)
            return
        log.warning("child_restarted", restart=self.restarts, of=self.config.restarts,
                    cause=pending.failure.cause, exit_code=pending.failure.exit_code,
                    previous_pid=old.pid, pid=self.child.pid,
                    resume_from_step=pending.failure.newest_step,
                    message=f"restart {self.restarts}/{self.config.restarts} after a "
                            f"{pending.failure.cause}; resuming from "
                            + (f"step {pending.failure.newest_step}"
                               if pending.failure.newest_step is not None else "the start"))


def supervisor_for(argv: Sequence[str], watchdog: Any) -> Supervisor:
    """A supervisor wired to a running :class:`daemon.Watchdog` (its samples, its run dir)."""
    from session_watchdog.supervise import snapshots

    started = time.time()

    def newest_step() -> Optional[int]:
        # trainer.json itself, not the last tick's sample: a checkpoint written moments before
        # a crash may not have been sampled yet, and the guard must count it.
        try:
            status = watchdog.run_dir.read_status()
        except (channel.ChannelError, OSError):
            return None
        if status is None or status.heartbeat < started - 1.0:
            return None  # an earlier run's trainer.json (the default run dir is shared)
        ckpt = status.last_checkpoint
        return None if ckpt is None else ckpt.step

    def oom_kills() -> Optional[int]:
        sample = watchdog.last_sample
        return None if sample is None or sample.host is None else sample.host.oom_kills

    def persist() -> Optional[int]:
        return snapshots.persist_after_death(watchdog.run_dir, record=True)

    def trainer_alive() -> bool:
        try:
            return bool(watchdog.run_dir.trainer_alive())
        except (channel.ChannelError, OSError):
            return False

    def trainer_stopped(since: float) -> bool:
        # trainer.json written during this attempt (an earlier attempt's final status predates
        # its launch) by a trainer started in it
        try:
            status = watchdog.run_dir.read_status()
        except (channel.ChannelError, OSError):
            return False
        return (status is not None and status.state == "stopped" and status.heartbeat >= since
                and status.start_time >= since - 1.0)  # create_time: clock ticks, not exact

    return Supervisor(argv, watchdog.run_dir.path, watchdog.config, newest_step=newest_step,
                      oom_kills=oom_kills, persist_snapshot=persist, read_gpu_pids=nvml_gpu_pids(),
                      trainer_alive=trainer_alive, trainer_stopped=trainer_stopped,
                      start=functools.partial(wrap.Child, capture_stderr=True))
