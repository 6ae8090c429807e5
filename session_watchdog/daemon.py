"""The watchdog: probes -> policy -> actions -> log, once per tick, on an APScheduler job.

``Watchdog.tick()`` is the whole loop body and can be driven directly by tests with a scripted
probe and a fake clock. ``run()`` blocks (CLI); ``start()`` runs in a background thread (notebook).
A tick that raises is logged and the next tick runs as usual (STYLE.md #5).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import signal
import stat
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple

from session_watchdog import channel, platforms, sdnotify
from session_watchdog.actions import Actions, EndTransaction, cancel_requested, end_action_for
from session_watchdog.channel import DaemonBusyError  # defined there: the CLI catches it unloaded
from session_watchdog.config import Config, format_duration
from session_watchdog.log import get_logger, sample_event
from session_watchdog.policy import (
    END_CANCELLED,
    END_KEPT,
    EXIT_STOPPED,
    IDLE_END,
    TRAINER_SCOPED,
    Decision,
    Outstanding,
    PolicyState,
    decide,
    end_blocker,
    remaining_s,
    trainer_change,
)
from session_watchdog.preemption import PreemptionWatch, build_pollers
from session_watchdog.probes import Sample, SystemProbe, Times, gpus_all_idle, process_create_time

log = get_logger()
DAEMON_FILE = "daemon.json"
THREAD_NAME = "session-watchdog"  # the background scheduler thread (APScheduler calls it "APScheduler")


class Clock(Protocol):
    def wall(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class Probe(Protocol):
    def sample(self, times: Times) -> Sample: ...


class SessionClock:
    """Session elapsed time on the monotonic clock, anchored once to the wall-clock start.

    Wall time jumps (NTP, a VM resumed); the monotonic clock does not. We read the wall clock
    once, at construction, to place the session start, then count monotonic seconds.
    """

    def __init__(self, start_wall: float, clock: Clock) -> None:
        self.start_wall = start_wall
        self.clock = clock
        self._mono0 = clock.monotonic()
        self._elapsed0 = max(0.0, clock.wall() - start_wall)

    def times(self) -> Times:
        elapsed = self._elapsed0 + (self.clock.monotonic() - self._mono0)
        return Times(now=self.start_wall + elapsed, elapsed_s=elapsed)


class Watchdog:
    """One watchdog for one run directory."""

    def __init__(
        self,
        config: Config,
        *,
        platform: Optional[platforms.Platform] = None,
        probe: Optional[Probe] = None,
        actions: Optional[Actions] = None,
        clock: Optional[Clock] = None,
        session_start: Optional[float] = None,
        on_decisions: Optional[Callable[[List[Decision], Sample], None]] = None,
        end_action: Optional[Any] = None,
        confirm_after_s: float = 60.0,
        on_end: Optional[Callable[[str], None]] = None,
        child_exit: Optional[Callable[[], Optional[int]]] = None,
        child_running: Optional[Callable[[], bool]] = None,
        notebook_idle: Optional[Callable[[], Optional[float]]] = None,
        pollers: Optional[List[Any]] = None,
        notifier: Optional[sdnotify.Notifier] = None,
        new_session: bool = False,
    ) -> None:
        detected = platform or platforms.detect()
        self.platform = platforms.forced(config.platform, detected)
        run_dir_path = config.run_dir or channel.default_run_dir(config.run_name)
        self.run_dir = channel.RunDir(run_dir_path)
        _check_daemon_file(self.run_dir)
        slurm_limit = None
        slurm_start = None
        if self.platform.slurm_job_id:
            # the job's own start, whatever the budget: a run dir on a shared home outlives jobs
            times = platforms.slurm_job_times(self.platform.slurm_job_id)
            slurm_limit = times.get("limit_s")
            slurm_start = times.get("start")
        self.config = platforms.resolve(
            dataclasses.replace(config, run_dir=run_dir_path), self.platform, slurm_limit)
        self.clock = clock or SystemClock()
        if session_start is None and slurm_start is not None:
            session_start = slurm_start
        # True when the clock is ours (no platform clock) and an earlier run since boot started it
        self.session_carried_over = False
        if session_start is None:
            started = platforms.session_start(self.run_dir.path, self.platform, self.clock.wall(),
                                              restart=new_session)
            session_start, self.session_source = started.start, started.source
            self.session_carried_over = started.persisted and started.source == platforms.FIRST_START
        else:
            self.session_source = "given"
        self.session = SessionClock(session_start, self.clock)
        self.probe: Probe = probe or SystemProbe(self.run_dir, self.config.watch_paths,
                                                 child_exit=child_exit, notebook_idle=notebook_idle)
        if pollers is None:
            try:
                pollers = build_pollers(self.config.preemption, slurm_job_id=self.platform.slurm_job_id)
            except ValueError as err:
                log.warning("preemption_unavailable", error=str(err))
                pollers = []
        self.preemption = PreemptionWatch(pollers)
        self.notifier = notifier or sdnotify.Notifier.from_env()
        self.heartbeat = sdnotify.Heartbeat.from_env(self.notifier)
        self._ready_sent = False
        # STOPPING=1 is the last message: a tick still finishing never pings after it
        self._sd_lock = threading.Lock()
        self._sd_stopping = False
        self.actions = actions or Actions(self.run_dir, dry_run=self.config.dry_run)
        self.on_decisions = on_decisions
        # Called with each tick's sample before it is published (supervise/snapshots.AfterDeath).
        self.after_tick: List[Callable[[Sample], None]] = []
        self.end_action = end_action or end_action_for(self.platform, self.config)
        self.confirm_after_s = confirm_after_s
        self.on_end = on_end
        self.child_running = child_running
        # run -- CMD: the failed command's traceback from its stderr (supervise.output); set by
        # the front-end once the command started
        self.child_stderr_tail: Optional[Callable[[], Optional[str]]] = None
        self.started_wall = self.clock.wall()
        self.end: Optional[EndTransaction] = None
        self._end_thread: Optional[threading.Thread] = None
        self._end_lock = threading.Lock()  # self.end and self._end_thread change together
        self._kept_by: Optional[str] = None  # keep this runtime: a stop signal (or cancel) said so
        self._keep_logged = False
        # A `session-watchdog cancel` (cancel.json) at or after this wall time keeps the runtime:
        # the daemon's start, then the start of each new run (a keep is for the run it was
        # given in: README, "a new run or trainer undoes it")
        self._keep_since = self.started_wall
        self._end_retry: Optional[EndRetry] = None  # an aborted end waits for this (issue 18)
        self.budget_extension_s = 0.0  # remote `extend` (issue 15), kept in the state file
        # (path, checksum) of checkpoint files an end transaction verified, flushed to Drive and
        # unmounted: a later try trusts them (EndTransaction._flushed_earlier); in the state file
        self._drive_flushed: Set[Tuple[str, str]] = set()
        self.state = self._load_state()
        # state.json is rewritten (two fsyncs) when the state changes; a change of the hang
        # detector's progress fields alone - every tick while training - waits until
        # PROGRESS_SAVE_EVERY_S passed since the last write, or the daemon stops (issue 17).
        self._state_saved_at = -math.inf
        self._state_unsaved = False  # self.state differs from state.json
        self._state_write_failed = False  # state_not_saved said; quiet until a write succeeds
        self._released = False  # release() ran: state.json belongs to the next daemon now
        self._state_urgent = False  # ... in more than the progress fields: write at the next tick
        if not self.state.rid_prefix:  # request ids unique to this daemon state (#18)
            self.state = dataclasses.replace(self.state, rid_prefix=channel.new_rid_prefix())
        if child_exit is not None:  # a new wrapped/attached process: a new run to judge
            self._judge_new_child()
        self.last_sample: Optional[Sample] = None
        self.last_decisions: List[Decision] = []
        self.ticks = 0
        self._lock = self.run_dir.lock(channel.DAEMON_LOCK)
        self._tick_lock = threading.Lock()
        self._scheduler: Any = None
        self.notify: Any = None  # issue 15; the package (and Apprise) are imported only when set
        if self.config.notify or self.config.remote:
            from session_watchdog.notify import Hub

            self.notify = Hub(self)
        self._stop_check: Optional[Callable[[], None]] = None  # run()'s stop_when/run_for test

    # ---- state ------------------------------------------------------------------------------

    def _judge_new_child(self) -> None:
        """A new wrapped/attached process (``run``, a notebook's ``launch()``): a new run to
        judge, not failed, its one-shot decisions due again. The caller holds ``_tick_lock``
        (or is ``__init__``)."""
        self.state = dataclasses.replace(
            self.state, failed=False, done=frozenset(self.state.done - TRAINER_SCOPED),
            child_since=None)
        self._new_run()

    def _new_run(self) -> None:
        """A new trainer or command: a keep given during an earlier run no longer holds."""
        if self._kept_by is not None or self.kept_by() is not None:
            log.info("keep_undone", by=self.kept_by(),
                     message="a new run: its end of the runtime is decided afresh (the earlier "
                             "run's keep no longer applies)")
        self._kept_by = None
        self._keep_logged = False
        self._keep_since = self.clock.wall()

    def _load_state(self) -> PolicyState:
        path = self.run_dir.file(channel.STATE_FILE)
        try:
            obj = self.run_dir.read(channel.STATE_FILE)
            if obj is None:
                return PolicyState()
            started = obj.get("session_start")
            if not isinstance(started, (int, float)) or not math.isfinite(started) \
                    or abs(started - self.session.start_wall) > 1.0:
                # A state from another session (a new runtime that kept its disk): its clock
                # values mean nothing here.
                log.info("state_reset", path=str(path), message="daemon state was from another session")
                return PolicyState()
            extension = obj.get("budget_extension_s")
            if isinstance(extension, (int, float)) and math.isfinite(extension) \
                    and 0 < extension <= MAX_EXTENSION_S and self.config.max_session:
                # an `extend 2h` from the phone outlives a restart of the watchdog
                self.budget_extension_s = float(extension)
                self.config = dataclasses.replace(
                    self.config, max_session=self.config.max_session + self.budget_extension_s)
            flushed = obj.get("drive_flushed")
            self._drive_flushed = {(pair[0], pair[1]) for pair in flushed if isinstance(pair, list)
                                   and len(pair) == 2 and all(isinstance(x, str) for x in pair)
                                   } if isinstance(flushed, list) else set()
            # The interval that spans the restart (and the up to PROGRESS_SAVE_EVERY_S the saved
            # progress may lag) is not a step interval: not learned from, as after a save. Nor
            # is it idle time: nobody watched the GPUs and the cells meanwhile, so the idle
            # clocks start again with this daemon (an idle end never comes from a gap).
            state = PolicyState.from_json(obj["policy"])
            if "end" in state.done and END_KEPT not in state.done:
                # An end that did not happen (aborted, or cut off by the stop of the daemon)
                # and that the user did not refuse: its retry was in the old daemon's memory,
                # so try it again from here (a kept runtime stays kept: END_KEPT).
                state = dataclasses.replace(state, done=state.done - {"end"})
                log.info("end_rearmed", reason="restart",
                         message="the end of the runtime decided before the restart is tried again")
            return dataclasses.replace(state, progress_skip=True,
                                       gpu_idle_since=None, unused_since=None)
        except (channel.ChannelError, KeyError, TypeError, ValueError) as err:
            moved = self.run_dir.quarantine(channel.STATE_FILE)
            log.warning("state_quarantined", path=str(path), moved_to=str(moved), error=str(err),
                        message="daemon state was unreadable; starting with a fresh state")
            return PolicyState()

    def _save_state(self) -> None:
        """Write state.json now; until a write succeeds, the next tick (or release) tries again.

        Not after :meth:`release`: an end thread that outlived its daemon (a notebook's stop()
        and start() in one kernel) must not overwrite the state of the daemon started since.
        """
        if self._released:
            return
        self._state_unsaved = self._state_urgent = True
        self.run_dir.write(channel.STATE_FILE,
                           {"v": channel.SCHEMA_VERSION, "session_start": self.session.start_wall,
                            "policy": self.state.to_json(),
                            **({"budget_extension_s": self.budget_extension_s}
                               if self.budget_extension_s else {}),
                            **({"drive_flushed": sorted(map(list, self._drive_flushed))}
                               if self._drive_flushed else {})})
        self._state_saved_at = self.clock.monotonic()
        self._state_unsaved = self._state_urgent = False
        self._state_write_failed = False

    def _save_state_or_say(self) -> None:
        """:meth:`_save_state` where its failure (a full disk) must not cost the tick: the
        sample is still published, the decisions still reach the notebook, and the next tick
        tries again. Said once until a write succeeds (a full disk fails every tick)."""
        try:
            self._save_state()
        except (channel.ChannelError, OSError) as err:
            if not self._state_write_failed:
                self._state_write_failed = True
                log.warning("state_not_saved", error=str(err),
                            message="cannot write the daemon state (state.json); trying again "
                                    "at every tick")

    # ---- the loop body ----------------------------------------------------------------------

    def tick(self) -> List[Decision]:
        """Probe, decide, act, log. Never overlaps itself."""
        with self._tick_lock:
            sample = self._judged_sample()
            if self.end is not None and self.end.holds_locks():
                # The locks are ours (the end transaction took them), so no one else holds
                # them: the trainer is not alive and not saving, whatever the probe saw.
                sample = dataclasses.replace(sample, trainer=dataclasses.replace(
                    sample.trainer, alive=False, saving=False))
            notice = self.preemption.latest
            if notice is not None:
                sample = dataclasses.replace(
                    sample, notice_deadline=notice.deadline if notice.deadline is not None else sample.now,
                    notice_source=notice.source)
            self._maybe_rearm_end(sample)
            if trainer_change(self.state, sample) == "new":
                self._new_run()
            state, decisions = decide(self.config, self.state, sample)
            log.info("sample", **sample_event(sample, remaining_s(self.config, sample),
                                              self.config.max_session))
            if self.ticks == 0:
                _say_if_idle_end_is_blind(self.config, sample)
            self.actions.apply(decisions, sample)
            for decision in decisions:
                if decision.kind == "end" and self._start_end(decision, sample):
                    state = dataclasses.replace(state, done=state.done | {END_KEPT})
            if state != self.state:
                self._state_urgent |= not _only_progress_changed(self.state, state)
                self._state_unsaved = True
                self.state = state
            if self._state_unsaved and (self._state_urgent or self.clock.monotonic()
                                        - self._state_saved_at >= PROGRESS_SAVE_EVERY_S):
                self._save_state_or_say()
            for hook in self.after_tick:
                hook(sample)
            self.last_sample = sample
            self.last_decisions = decisions
            self.ticks += 1
            if self.on_decisions is not None:
                self.on_decisions(decisions, sample)
            return decisions

    def _judged_sample(self) -> Sample:
        """One reading of the probe, judged (the caller holds ``_tick_lock``).

        Whether our command runs is asked before the probe reads trainer.json: a command that
        ends during the sample counts as running for this reading, so an outcome is judged only
        from a sample taken wholly after it ended - one that holds the final status it wrote
        before exiting. (Asked after, a stop's exit 75 beside the status written before the stop
        read as a failure, and a failure is sticky.)
        """
        running = self.child_running is not None and self.child_running()
        return self._judge(self.probe.sample(self.session.times()), running)

    def _judge(self, sample: Sample, child_running: bool) -> Sample:
        """What the probe cannot know: is our child still running (``child_running``: asked
        before the sample was taken), and is trainer.json stale?

        A trainer.json that no live process holds and whose heartbeat predates this daemon is
        evidence from an earlier run (the default run dir is shared by every run): it must not
        end this runtime, so it is dropped from the sample.
        """
        changes: Dict[str, Any] = {}
        if child_running:
            changes["child_running"] = True
        if self.child_stderr_tail is not None and sample.child_exit not in (None, 0, EXIT_STOPPED):
            changes["child_traceback"] = self.child_stderr_tail()
        status = sample.trainer.status
        # A trainer this session's state already knows (a watchdog of this session saw it, e.g.
        # before a quick stop() and start() in a notebook) is not an earlier run's (issue 16).
        if (status is not None and not sample.trainer.alive
                and status.heartbeat < self.started_wall - 1.0
                and status.pid != self.state.trainer_pid):
            changes["trainer"] = dataclasses.replace(
                sample.trainer, status=None, status_error="stale trainer.json from an earlier run")
        return dataclasses.replace(sample, **changes) if changes else sample

    # ---- ending the runtime ---------------------------------------------------------------

    def _start_end(self, decision: Decision, sample: Sample) -> bool:
        """Run the end transaction on its own thread (its grace period must not block ticks).

        True when the user kept the runtime (no transaction; the caller records END_KEPT).
        """
        if self._end_thread is not None and self._end_thread.is_alive():
            return False
        kept_by = self.kept_by()
        if kept_by is not None:
            if not self._keep_logged:  # once: the policy marked the end done, so it stays quiet
                self._keep_logged = True
                log.info("action", step="end_cancelled", reason=decision.reason, by=kept_by,
                         message=f"not ending the runtime: kept ({kept_by}); a new run undoes this")
            return True
        idle_path = decision.reason == IDLE_END

        def safe_now() -> Optional[str]:
            # A reading taken now, after the grace period: the last tick's may be older than a
            # GPU that turned unknown or busy since (issue 18).
            # with what the end was decided on and the state now: use since the decision
            return end_blocker(self.config, decision.reason, self._fresh_sample(), sample,
                               self.state)

        transaction = EndTransaction(
            run_dir=self.run_dir, reason=decision.reason, status=sample.trainer.status,
            grace_s=self.config.grace or 0.0, dry_run=self.config.dry_run, end_action=self.end_action,
            check_checkpoint=not idle_path, safe_now=safe_now, confirm_after_s=self.confirm_after_s,
            cancel_since=self._keep_since, drive_flushed=self._drive_flushed)

        def run() -> None:
            outcome = transaction.run()
            if transaction.flushed:
                with self._tick_lock:
                    self._drive_flushed |= transaction.flushed
                    self._save_state_or_say()
            self._after_end(decision.reason, outcome, transaction.cancelled_by)
            if self.on_end is not None:
                self.on_end(outcome)

        thread = threading.Thread(target=run, name="session-watchdog-end", daemon=True)
        with self._end_lock:  # published started: wait_end() and cancel_end() never see it unstarted
            self.end, self._end_thread = transaction, thread
            thread.start()
        return False

    def _fresh_sample(self) -> Optional[Sample]:
        """Probe now, judged as a tick would; None when the probe fails (the end then stops)."""
        with self._tick_lock:
            try:
                sample = self._judged_sample()
            except Exception as err:  # a failing probe blocks the end; it never kills the thread
                log.warning("end_probe_failed", error=f"{type(err).__name__}: {err}")
                return None
        if self.end is not None and self.end.holds_locks():
            sample = dataclasses.replace(sample, trainer=dataclasses.replace(
                sample.trainer, alive=False, saving=False))
        return sample

    def _after_end(self, reason: str, outcome: str, cancelled_by: str = "the user") -> None:
        """An aborted end may be tried again later; a cancelled one only after a new idle spell.

        Either way the idle-GPU timer starts over, so the next try needs a full new idle period.
        A runtime the user kept (``session-watchdog cancel``, ``cancel()``, a stop signal) is
        never ended by this watchdog, nor by a restarted one of the session (END_KEPT). A cancel
        of a training's end alone (the remote ``cancel``) leaves the idle end (END_CANCELLED):
        a runtime then left unused is still released. A stop of the watchdog cancels without
        refusing: the next watchdog tries again.
        """
        if outcome not in ("aborted", "failed"):
            # The retry of an earlier abort is spent: left armed, it brought the end back at
            # every tick after one that ended (a dry run, an end action that left us running).
            self._end_retry = None
        if outcome not in ("aborted", "cancelled", "failed"):
            return
        if outcome == "cancelled" and self.kept_by() is not None:
            # the user chose to keep this runtime, also for a restarted daemon of this session
            with self._tick_lock:
                self.state = dataclasses.replace(self.state, done=self.state.done | {END_KEPT})
                self._save_state_or_say()
            return
        if outcome == "cancelled" and cancelled_by == STOPPING:
            return  # "end" is dropped when the next daemon loads the state: it tries again
        if outcome == "cancelled" and reason != IDLE_END:
            with self._tick_lock:
                self.state = dataclasses.replace(
                    self.state, done=(self.state.done - {"end"}) | {END_CANCELLED},
                    gpu_idle_since=None)
                self._save_state_or_say()
            log.info("end_rearmed", reason=reason, outcome=outcome, idle_end_only=True,
                     message="this run's end was cancelled; the runtime is still ended once it "
                             "is left unused for idle_end_after")
            return
        if outcome in ("aborted", "failed"):
            # The same problem would abort the next try too (a vanished checkpoint aborted every
            # tick, ~200 log lines a minute): try again when what the end checks has changed, or
            # after a delay that doubles up to END_RETRY_MAX_S (issue 18).
            delay = END_RETRY_FIRST_S if self._end_retry is None else min(
                END_RETRY_MAX_S, 2 * self._end_retry.delay_s)
            with self._tick_lock:
                sample = self.last_sample
                self._end_retry = EndRetry(self.clock.monotonic() + delay, delay,
                                           _end_fingerprint(sample) if sample is not None else None)
                self.state = dataclasses.replace(self.state, gpu_idle_since=None)
                self._save_state_or_say()
            log.info("end_rearmed", reason=reason, outcome=outcome, retry_in_s=delay,
                     message=f"trying again in {delay:g}s, or sooner when the trainer's checkpoint "
                             "or lock changes")
            return
        with self._tick_lock:
            self.state = dataclasses.replace(
                self.state, done=frozenset(self.state.done - {"end"}), gpu_idle_since=None)
            self._save_state_or_say()
        log.info("end_rearmed", reason=reason, outcome=outcome)

    def _maybe_rearm_end(self, sample: Sample) -> None:
        """Allow the end again once its retry is due or what it checks has changed."""
        retry = self._end_retry
        if retry is None or "end" not in self.state.done or self.end_running():
            return
        changed = _end_fingerprint(sample) != retry.fingerprint
        if not changed and self.clock.monotonic() < retry.not_before:
            return
        if changed:
            self._end_retry = None  # a new situation: the next abort waits the first delay again
        self.state = dataclasses.replace(self.state, done=frozenset(self.state.done - {"end"}))
        self._save_state_or_say()

    def keep_runtime(self, by: str) -> bool:
        """Never end the runtime from now on in this watchdog (a stop signal, the notebook's
        cancel()); cancel a pending end: :meth:`cancel_end`'s answer."""
        if self._kept_by is None:
            self._kept_by = by
        return self.cancel_end(by)

    def kept_by(self) -> Optional[str]:
        """Who asked to keep this runtime (a signal, or `session-watchdog cancel` since we started)."""
        if self._kept_by is not None:
            return self._kept_by
        return "session-watchdog cancel" if cancel_requested(self.run_dir, self._keep_since) else None

    def end_running(self) -> bool:
        return self._end_thread is not None and self._end_thread.is_alive()

    def cancel_end(self, by: str = "the user") -> bool:
        """Cancel a running end transaction in this process; True when that keeps the runtime.

        False when none runs, and when its end action already ran (:meth:`end_acted`): the
        cancel then only stops the action's retry.
        """
        with self._end_lock:
            end, thread = self.end, self._end_thread
        if end is not None and thread is not None and thread.is_alive():
            return end.cancel(by)
        return False

    def end_acted(self) -> bool:
        """Whether a running end transaction has already run its end action (too late to cancel)."""
        return self.end_running() and self.end is not None and self.end.acted

    def extend_budget(self, seconds: float) -> Optional[float]:
        """Move the session budget by ``seconds`` (remote ``extend 2h``); the new budget, None without one.

        The session warnings and the limit's checkpoint are armed again for the new deadline.
        """
        with self._tick_lock:
            if not self.config.max_session:
                return None
            budget = self.config.max_session + seconds
            self.config = dataclasses.replace(self.config, max_session=budget)
            self.budget_extension_s += seconds
            self.state = dataclasses.replace(self.state, done=frozenset(
                k for k in self.state.done
                if not k.startswith("session_warn_") and k != "session_checkpoint"))
            self._save_state()
            info = read_daemon_info(self.run_dir.path)
            if info is not None and info.get("pid") == os.getpid():
                channel.write_json(self.run_dir.file(DAEMON_FILE), {**info, "budget_s": budget})
        log.info("budget_extended", by_s=seconds, budget_s=budget)
        return budget

    def user_request(self, action: str, reason: str = "remote_command") -> Optional[int]:
        """Ask the trainer to ``checkpoint`` or ``stop`` now, through the policy's request path
        (seq, outstanding, re-sends); the request's seq, None when no trainer is alive."""
        with self._tick_lock:
            sample = self.last_sample
            if sample is None or not sample.trainer.alive:
                return None
            seq = self.state.seq + 1
            self.state = dataclasses.replace(self.state, seq=seq, outstanding=Outstanding(
                seq, action, reason, sample.elapsed_s))
            self._save_state()
            self.actions.apply([Decision("request", reason, f"{action} requested by the user",
                                         action=action, seq=seq)], sample)
        return seq

    def wait_end(self, timeout: Optional[float] = None) -> Optional[str]:
        """Wait for a running end transaction; its outcome (None when none ran)."""
        with self._end_lock:
            end, thread = self.end, self._end_thread
        if thread is not None:
            thread.join(timeout)
        return None if end is None else end.outcome

    def safe_tick(self) -> None:
        """The scheduled job: a failing tick is logged, never fatal."""
        try:
            self.tick()
        except Exception as err:  # the one place we catch broadly (STYLE.md #5)
            log.error("tick_failed", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc(limit=8))
        finally:
            self._notify_systemd()
            self.check_stop()

    def check_stop(self) -> None:
        """Stop :meth:`run` now if its ``stop_when``/``run_for`` says so (no-op otherwise)."""
        check = self._stop_check
        if check is not None:
            check()

    def _notify_systemd(self) -> None:
        """READY after the first tick, then WATCHDOG=1 at half the unit's WatchdogSec.

        Pinging after a tick means a hung tick stops the pings and systemd restarts us.
        """
        if not self.notifier.enabled:
            return
        with self._sd_lock:
            if self._sd_stopping:
                return
            if not self._ready_sent:
                self._ready_sent = self.notifier.ready(f"watching {self.platform.name} session")
            if self.heartbeat.maybe_ping(self.clock.monotonic()):
                self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """One line for systemd's STATUS= and the console: time left, trainer step."""
        sample = self.last_sample
        if sample is None:
            return "starting"
        left = remaining_s(self.config, sample)
        status = sample.trainer.status
        parts = [f"{int(left // 60)}m left" if left is not None else "no session budget"]
        if status is not None:
            parts.append(f"trainer {status.state} at step {status.step}")
        elif not sample.trainer.alive:
            parts.append("no trainer")
        return "; ".join(parts)

    def poll_preemption(self) -> None:
        """The preemption job (slower cadence than the tick: a metadata request can take 1 s)."""
        try:
            self.preemption.poll(self.clock.wall())
        except Exception as err:  # a broken poller must not stop the daemon
            log.error("preemption_poll_failed", error=f"{type(err).__name__}: {err}")

    # ---- lifecycle --------------------------------------------------------------------------

    def _acquire_lock(self) -> bool:
        """Take daemon.lock; a holder of a moment is a probe, not a daemon.

        ``status``, the trainer and other watchdogs test the lock by taking it for a few
        microseconds (channel.lock_held): a start that coincides with such a probe retries for
        up to a second instead of reporting "already watching".
        """
        deadline = time.monotonic() + LOCK_PROBE_WAIT_S
        while not self._lock.acquire(blocking=False):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def acquire(self) -> None:
        """Become the one daemon of this run directory (flock; released by the kernel on death).

        Idempotent: ``run()`` acquires too, after a caller took the run dir before starting work.
        """
        if self._lock.held:
            return
        if not self._acquire_lock():
            other = None
            try:
                other = self.run_dir.read(DAEMON_FILE)
            except channel.ChannelError:
                pass
            pid = other.get("pid") if other and type(other.get("pid")) is int else "unknown"
            raise DaemonBusyError(
                f"another session-watchdog (pid {pid}) is already watching {self.run_dir.path}; "
                "stop it first or choose another --run-dir")
        self._released = False  # the state is ours again
        channel.sweep_temps(self.run_dir.path)  # litter of writers killed mid-write
        try:  # a `cancel` told the previous watchdog to keep its runtime; a new run undoes it
            os.unlink(self.run_dir.file(channel.CANCEL_FILE))
        except FileNotFoundError:
            pass
        try:
            self._write_daemon_file()
        except OSError as err:  # daemon.json is a directory, say: a hostile run dir (#18)
            self._lock.release()
            raise channel.ChannelError(
                f"cannot write {self.run_dir.file(DAEMON_FILE)}: {err.strerror or err}; remove "
                "it or choose another --run-dir") from None
        log.info("daemon_started", platform=self.platform.name,
                 evidence=list(self.platform.evidence), run_dir=str(self.run_dir.path),
                 session_start=self.session.start_wall, session_source=self.session_source,
                 budget_s=self.config.max_session or None, interval_s=self.config.interval,
                 log_file=str(self.config.log_file or ""), dry_run=self.config.dry_run,
                 tier=self.config.tier if self.platform.name == "colab" else None,
                 price_per_hour=self.config.price_per_hour)
        if self.session_carried_over:
            log.info("session_clock_carried_over", session_start=self.session.start_wall,
                     elapsed_s=round(self.clock.wall() - self.session.start_wall, 3),
                     file=str(self.run_dir.file(channel.SESSION_FILE)),
                     message=self.session_notice())
        if self.notify is not None:
            self.notify.start()

    def session_notice(self) -> Optional[str]:
        """One line for the console when the session clock was carried over, else None.

        On a host without a platform clock the session starts at the watchdog's first start
        since boot and survives restarts of the watchdog (so a crash or a systemd restart does
        not grant a fresh budget); a new run inherits it too, which surprised users (issue 11).
        """
        if not self.session_carried_over:
            return None
        ago = format_duration(self.clock.wall() - self.session.start_wall)
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.session.start_wall))
        return (f"session clock: started {ago} ago at {at} (carried over from an earlier run "
                f"since boot; pass --new-session or delete "
                f"{self.run_dir.file(channel.SESSION_FILE)} to restart it)")

    def _write_daemon_file(self) -> None:
        self.run_dir.write(DAEMON_FILE, {
            "v": channel.SCHEMA_VERSION, "pid": os.getpid(), "started": self.clock.wall(),
            "pid_create_time": process_create_time(os.getpid()),
            "platform": self.platform.name, "log_file": str(self.config.log_file or ""),
            "session_start": self.session.start_wall, "budget_s": self.config.max_session or None,
            "interval_s": self.config.interval, "dry_run": self.config.dry_run,
        })

    def release(self) -> None:
        # The hang detector's latest progress, for the next daemon of this session; not behind a
        # tick that hangs (its thread is a daemon thread that the exit leaves behind).
        if self._state_unsaved and self._lock.held and self._tick_lock.acquire(timeout=5.0):
            try:
                self._save_state_or_say()
            finally:
                self._tick_lock.release()
        if self.notify is not None:
            self.notify.close()  # bounded: the last messages (training completed) go out first
        if self.notifier.enabled:
            with self._sd_lock:
                self._sd_stopping = True
                self.notifier.stopping()
        if self._lock.held:
            # No state write after this one (an end thread writes under the tick lock): the next
            # daemon may start as soon as the lock is free. Not behind a tick that hangs.
            locked = self._tick_lock.acquire(timeout=5.0)
            self._released = True
            if locked:
                self._tick_lock.release()
            # daemon.json stays (status shows the last budget); the released lock says "stopped".
            self._lock.release()
            log.info("daemon_stopped", ticks=self.ticks)
        close = getattr(self.probe, "close", None)
        if callable(close):
            # wait (bounded) for the probe's workers, so no thread outlives stop()
            close(wait_s=2 * float(getattr(self.probe, "timeout_s", 2.0)))

    def _make_scheduler(self) -> Any:
        """APScheduler's background scheduler: its own daemon thread runs the ticks (``run``
        waits for it to stop, ``start`` returns at once)."""
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED
        from apscheduler.executors.debug import DebugExecutor
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        interval = self.config.interval
        # APScheduler 3.x drops a run that starts > 1 s late by default; a busy training process
        # makes ticks late, so the grace is at least one interval (DESIGN.md, Scheduler notes).
        # The tick (and the stop check) run in the scheduler's own thread ("debug": APScheduler's
        # inline executor): handing each tick to a pool thread cost more CPU than the tick itself
        # (issue 17), and an inline tick can never overlap the next - a slow one delays it, and
        # coalesce folds the missed runs into one. The preemption poll (a metadata request can
        # take a second) keeps a thread of its own so it never delays a tick.
        scheduler = BackgroundScheduler(timezone=timezone.utc, executors={
            "default": DebugExecutor(), "poll": ThreadPoolExecutor(max_workers=1)}, job_defaults={
            "coalesce": True, "max_instances": 1,
            "misfire_grace_time": max(1, int(interval) + 1)})
        scheduler._daemon = True  # a notebook's kernel must be able to exit with it running

        def on_event(event: Any) -> None:
            if getattr(event, "exception", None) is not None:
                log.error("tick_failed", error=repr(event.exception),
                          traceback=getattr(event, "traceback", None))
            else:
                log.warning("tick_missed", job=getattr(event, "job_id", None),
                            scheduled=str(event.scheduled_run_time))

        scheduler.add_listener(on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        scheduler.add_job(self.safe_tick, "interval", seconds=interval, id="tick",
                          next_run_time=datetime.now(timezone.utc))
        if self.preemption.pollers:
            # its own grace: a poll that falls due during a slow tick (the scheduler's thread
            # hands it out only after the tick) is late, not missed
            every = self.config.preemption_poll_every
            scheduler.add_job(self.poll_preemption, "interval", id="preemption", executor="poll",
                              seconds=every, misfire_grace_time=max(1, int(every) + 1),
                              next_run_time=datetime.now(timezone.utc))
        return scheduler

    def run(self, stop_when: Optional[Callable[[], bool]] = None, handle_signals: bool = True,
            run_for: Optional[float] = None) -> int:
        """Block until SIGTERM/SIGINT, ``stop_when()`` is true, or ``run_for`` seconds passed; return 0.

        ``handle_signals=False`` leaves SIGINT/SIGTERM to the caller (a wrapped command forwards
        them to its child and ends when the child does).
        """
        self.acquire()
        # The ticks run in the scheduler's own thread, never in this one: this thread only waits,
        # so a signal handler (ours, or a caller's that forwards to a child) always runs between
        # ticks, never inside one - in the middle of a log write it would wait forever for the
        # log's lock, which its own thread holds (issue 17 review).
        scheduler = self._make_scheduler()
        self._scheduler = scheduler
        previous = {}
        shutting = threading.Lock()

        def shutdown() -> None:
            """Stop the scheduler once, from a thread of its own (it joins the scheduler's
            thread, which may be running a tick): a signal and --for may both ask."""
            with shutting:
                if scheduler.running:
                    scheduler.shutdown(wait=False)

        def handle(signum: int, frame: Any) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self.keep_runtime(f"signal {signal.Signals(signum).name}")  # Ctrl-C in the grace
            threading.Thread(target=shutdown).start()

        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handle)
        if run_for is not None:
            deadline = time.monotonic() + run_for
            given = stop_when
            stop_when = lambda: time.monotonic() >= deadline or bool(given and given())  # noqa: E731
        if stop_when is not None:
            condition = stop_when
            stopping = threading.Event()  # after each tick and at the deadline: stop only once

            def check() -> None:
                if not stopping.is_set() and condition():
                    stopping.set()
                    threading.Thread(target=shutdown).start()
            # Checked right after each tick (what it waits for - the child's exit - is seen by a
            # tick), not by a job of its own every second: that job was 60 % of an idle daemon's
            # CPU (issue 17). `--for` gets a job that first runs at its deadline: `--for 1s` must not wait
            # a 30 s tick. check_stop() lets a caller ask between ticks (a signal after the end).
            self._stop_check = check
            if run_for is not None:
                # an interval job whose first run is the deadline: a one-off "date" job would be
                # removed by the scheduler after it ran, racing the shutdown it starts
                scheduler.add_job(check, "interval", id="stop_for", seconds=max(run_for, 0.001))
        try:
            scheduler.start()
            # APScheduler 3.x keeps its thread private (see start()). A short --for can stop the
            # scheduler before this line runs (on a busy machine): its shutdown joins the thread
            # and deletes the attribute, and then there is nothing left to wait for.
            thread = getattr(scheduler, "_thread", None)
            if thread is not None:
                thread.name = THREAD_NAME
                # Until the scheduler's thread ends (after a shutdown, a tick under way
                # included): a signal's handler runs here, between two ticks (joins are
                # interruptible).
                thread.join()
        except BaseException:  # KeyboardInterrupt with handle_signals=False: stop, then re-raise
            shutdown()  # joins the scheduler's thread: a tick under way finishes first
            raise
        finally:
            self._stop_check = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.end_running():
                # Leaving during the grace period: the end is cancelled (and says so), never
                # cut off silently with the process.
                self.cancel_end(STOPPING)
                if self._end_thread is not None:
                    self._end_thread.join(10)
            self.release()
        return 0

    def start(self) -> None:
        """Run in a background daemon thread (notebooks); returns at once."""
        self.acquire()
        self._scheduler = self._make_scheduler()
        self._scheduler.start()
        thread = getattr(self._scheduler, "_thread", None)  # APScheduler 3.x keeps it private
        if isinstance(thread, threading.Thread):
            thread.name = THREAD_NAME

    @property
    def running(self) -> bool:
        """True while the scheduler runs (background or blocking)."""
        return self._scheduler is not None and bool(self._scheduler.running)

    def stop(self) -> None:
        self.cancel_end(STOPPING)
        if self._end_thread is not None:
            self._end_thread.join(10)
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None and scheduler.running:
            scheduler.shutdown(wait=True)
        self.release()


# A remote `extend` read back from state.json is bounded like any protocol number (#18).
MAX_EXTENSION_S = 365 * 86400.0
# How stale state.json's hang-detection progress may be (a restart does not learn from it).
PROGRESS_SAVE_EVERY_S = 60.0
_PROGRESS_FIELDS = ("progress_step", "progress_since", "progress_skip", "step_intervals")


# PolicyState's other fields as one tuple: read by one C call, not a dataclasses.replace() (a
# new state, every field read in Python) on every tick while training (issue 17)
_OTHER_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(PolicyState)
                                      if f.name not in _PROGRESS_FIELDS))


def _only_progress_changed(old: PolicyState, new: PolicyState) -> bool:
    """Whether ``new`` differs from ``old`` in the hang detector's progress fields alone."""
    return bool(_OTHER_FIELDS(old) == _OTHER_FIELDS(new))

LOCK_PROBE_WAIT_S = 1.0  # how long another process's lock_held() probe may hold daemon.lock

# Who cancels an end when the watchdog stops: not a refusal, the next watchdog tries again.
STOPPING = "the watchdog is stopping"
END_RETRY_FIRST_S = 60.0
END_RETRY_MAX_S = 900.0


@dataclasses.dataclass(frozen=True)
class EndRetry:
    """When an aborted end may be tried again: at ``not_before`` (monotonic), or on a change."""

    not_before: float
    delay_s: float
    fingerprint: Any


def _end_fingerprint(sample: Sample) -> Any:
    """What an end transaction checks: the reported checkpoint, its file, the trainer's locks."""
    status = sample.trainer.status
    ckpt = status.last_checkpoint if status is not None else None
    identity = None
    if ckpt is not None:
        try:
            st = os.stat(ckpt.path)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    return (ckpt, identity, sample.trainer.alive, sample.trainer.saving,
            status.state if status is not None else None)


def _check_daemon_file(run_dir: channel.RunDir) -> None:
    """Refuse, before starting anything, a daemon.json we could never replace (a directory)."""
    try:
        st = os.lstat(DAEMON_FILE, dir_fd=run_dir.fd) if run_dir.fd is not None \
            else os.lstat(run_dir.file(DAEMON_FILE))
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise channel.ChannelError(f"cannot write {run_dir.file(DAEMON_FILE)}: it is a directory; "
                                   "remove it or choose another --run-dir")


def _say_if_idle_end_is_blind(config: Config, sample: Sample) -> None:
    """Once, at the first tick: the idle end is on but no GPU can be read, so it never fires."""
    if not config.idle_end_after or gpus_all_idle(sample.gpus, config.gpu_idle_pct) is not None:
        return
    if sample.nvml != "ok":
        why = f"NVML {sample.nvml}"
    else:
        why = "NVML lists no GPU" if not sample.gpus else "every GPU reading is unknown"
    log.warning("idle_end_unavailable", reason="no_gpu_reading", nvml=sample.nvml,
                message=f"the idle end (idle_end_after) can never end this runtime: {why}; an "
                        "unknown GPU reading is never taken for idle")


def read_daemon_info(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return channel.read_json(Path(run_dir) / DAEMON_FILE)
    except channel.ChannelError:
        return None
