"""The per-step flag: what sets it and what it means at a step boundary.

Requests in ``request.json`` (read by the poller thread, answered once), the periodic timer, the
SIGTERM / SIGUSR1 handlers (they only set flags and wake the poller) and, under torch.distributed,
the ranks' agreement on the flags at agreed steps. A part of ``Session`` (session.py).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import threading
import time
from types import FrameType
from typing import Optional

from session_watchdog.channel import DAEMON_LOCK, ChannelError, Request
from session_watchdog.trainer.saving import _SavingMixin
from session_watchdog.trainer.session_types import _NEVER, _STEP_TIME_EMA_ALPHA, _event, _Flags
from session_watchdog.trainer.stacks import StackDump


class _FlagsMixin(_SavingMixin):
    """Requests, the poller thread, signals and the ranks' agreement: the flags ``step()`` reads."""

    # ------------------------------------------------------------------------------------------
    # Step boundary (main thread)

    def _decide(self) -> Optional[_Flags]:
        """What to do at this step boundary (after the ranks' agreement), or None: nothing.

        Consumes the flags. The framework integrations call it from their step-end hooks and let
        the framework write the checkpoint (``session_watchdog.integrations``).
        """
        # Clear first, read the reasons after: a flag set meanwhile is then seen now or next step.
        self._pending = False
        if self._closed:
            return None
        if self._prepare_snapshot:
            self._prepare_snapshot = False
            try:
                self.manager.prepare_async(self._capture())
            except Exception as err:  # an optimization only: the first save allocates instead
                _event(logging.WARNING, "snapshot_prepare_failed", error=str(err))
        # Distributed: only the step count decides (the same on every rank: a collective follows).
        if self._snapshots is not None and (self._step >= self._snap_at
                                            or (self._snap_due and self._dist is None)):
            self._take_snapshot()
        if self._dist is not None and self._step < self._sync_at:
            return None  # distributed: flags wait for the agreed step (never act alone)
        stop_reason: Optional[str] = None
        if self._sigterm:
            self._sigterm = False
            stop_reason = "SIGTERM"
        request = self._request
        if self._sigusr1:
            self._sigusr1 = False
            if not self._is_new(request):
                # The daemon writes the request before it signals; the poller may not have read
                # it yet, so read it here rather than wait up to poll_interval.
                request = self._poll_request()
                if not self._is_new(request) and not self._daemon_present():
                    # No daemon: SIGUSR1 is SLURM's `--signal=USR1@...` warning. With a daemon it
                    # is only a wake-up (it may resend for a request we already acknowledged).
                    stop_reason = stop_reason or "SIGUSR1"
        if not self._is_new(request):
            request = None
        periodic = self._periodic_due
        if periodic:
            # Restart the period before clearing the flag: the poller reads the flag first and
            # the time second, so it cannot flag the same period twice.
            self._last_save_mono = time.monotonic()
            self._periodic_due = False
        if stop_reason is not None:
            reason = stop_reason  # a signal's stop also answers a pending request (seq acked)
        elif request is not None:
            reason = f"request:{request.reason}"
        else:
            reason = "periodic"
        stop = stop_reason is not None or (request is not None and request.action == "stop")
        dm = self._distmod
        if stop_reason is not None:
            code = dm.SIGTERM_STOP if stop_reason == "SIGTERM" else dm.SIGUSR1_STOP
        elif request is not None:
            code = dm.REQUEST_STOP if request.action == "stop" else dm.REQUEST_CHECKPOINT
        else:
            code = dm.PERIODIC if periodic else dm.NOTHING
        flags = self._agree(_Flags(save=stop or periodic or request is not None, stop=stop,
                                   request=request, reason=reason, code=code,
                                   ack_seq=None if request is None else request.seq))
        return flags if flags.save else None

    def _agree(self, flags: _Flags) -> _Flags:
        """Make every rank take the same decision at this step. Single process: as is.

        Distributed: one all-reduce (MAX) of (reason code, step time, step, request seq per run
        dir); every rank saves when any rank wants to, stops when any rank must, and schedules
        the next agreement from the agreed step time (so all ranks pick the same step).
        """
        agreement = self._dist
        if agreement is None:
            return flags
        now = time.monotonic()
        anchor_time, anchor_step = self._sync_anchor
        measured = ((now - anchor_time) / (self._step - anchor_step)
                    if self._step > anchor_step else None)
        agreed = agreement.exchange(code=flags.code, seq=flags.ack_seq or 0, step=self._step,
                                    step_time_s=measured)
        if not agreed.steps_agree and not self._out_of_step_logged:
            self._out_of_step_logged = True
            _event(logging.ERROR, "ranks_out_of_step", rank=agreement.rank, step=self._step,
                   hint="every rank must call step() once per optimizer step")
        self._agreed_step_time_s = agreed.step_time_s
        self._schedule_sync()
        snap = self._snapshots
        if snap is not None and snap.every_s is not None and self._snap_at == _NEVER \
                and snap.disabled is None and agreed.step_time_s:
            # A duration as a step count from the agreed step time: the same on every rank.
            self._snap_at = self._step + max(1, int(snap.every_s // agreed.step_time_s))
        dm = self._distmod
        if agreed.code == dm.NOTHING:
            return _Flags(save=False, stop=False, request=None, reason="", code=dm.NOTHING)
        if flags.code == agreed.code:
            reason = flags.reason
        else:
            reason = f"{dm.CODE_NAMES[agreed.code]} from rank {agreed.source_rank}"
        request = flags.request
        if agreed.seq and self._reporter and agreed.seq not in self._rids:
            # Another rank of this run dir read the request first; the agreement carries its
            # seq, not its rid (numbers only). The ack must echo the rid (the daemon matches by
            # it), so the reporter reads request.json now rather than ack the seq alone.
            found = self._poll_request()
            if found is not None and found.seq == agreed.seq:
                request = found
        return _Flags(save=True, stop=agreed.code >= dm.REQUEST_STOP, request=request,
                      reason=reason, code=agreed.code, ack_seq=agreed.seq or None)

    def _schedule_sync(self) -> None:
        """The next agreement, ``window`` steps from now: every rank computes the same step."""
        self._window = self._distmod.next_window(self.sync_every, self.sync_interval_s,
                                                 self._agreed_step_time_s, self._window)
        self._sync_at = self._step + self._window
        self._sync_anchor = (time.monotonic(), self._step)

    # ------------------------------------------------------------------------------------------
    # Requests (request.json): which still need an answer

    def _answered(self, request: Request) -> bool:
        """Whether ``request`` was acknowledged or skipped as stale (by rid when it has one)."""
        if request.rid is not None:
            stale = self._stale_rid
            return request.rid == self._handled_rid or (
                stale is not None and stale[0] == request.rid and request.issued <= stale[1])
        return request.seq <= self._handled_seq

    def _is_new(self, request: Optional[Request]) -> bool:
        """Whether ``request`` still needs an answer (not acked, not in flight, not backing off)."""
        if request is None or self._answered(request) or request.seq == self._inflight_seq:
            return False
        failed_seq, failed_at = self._failed
        return not (request.seq == failed_seq
                    and time.monotonic() - failed_at < self.retry_after)

    def _adopt_previous_status(self) -> None:
        """Continue the ack counter of a previous trainer in this run dir; skip stale requests.

        The daemon's seq grows across trainers; a request issued before this process started was
        addressed to a previous trainer (the daemon drops it when it sees a new pid).
        """
        try:
            previous = self.run_dir.read_status()
        except ChannelError as err:
            _event(logging.WARNING, "previous_status_ignored", error=str(err))
            previous = None
        if previous is not None:
            self._acked_seq = self._handled_seq = previous.acked_seq
            self._acked_rid = previous.acked_rid or ""
            self._handled_rid = previous.acked_rid or None
        request = self._poll_request()
        if request is not None and not self._answered(request) \
                and request.issued < self._create_time:
            if request.rid is not None:
                self._stale_rid = (request.rid, request.issued)
            else:
                self._handled_seq = request.seq
            _event(logging.INFO, "request_stale", seq=request.seq, rid=request.rid,
                   action=request.action, issued=request.issued)

    # ------------------------------------------------------------------------------------------
    # Poller thread

    def _poll_loop(self) -> None:
        while not self._closed:
            timeout = min(self.poll_interval, self.heartbeat_interval)
            try:
                ready, _, _ = select.select([self._wake_r], [], [], timeout)
                if ready:
                    self._drain_wake()
            except (OSError, ValueError):  # fds closed by close() while we waited
                return
            if self._closed:
                return
            try:
                self._poll_once()
            except Exception as err:  # never let the poller die: training depends on it
                _event(logging.ERROR, "poll_failed", error=f"{type(err).__name__}: {err}")

    def _poll_once(self) -> None:
        now = time.monotonic()
        request = self._poll_request()
        if self._is_new(request):
            self._request = request  # data first, flag second: _service clears the flag first
            self._pending = True
        every = self.checkpoint_every
        if every is not None and not self._periodic_due and now - self._last_save_mono >= every:
            self._periodic_due = True
            self._pending = True
        snap = self._snapshots
        if snap is not None and snap.every_s is not None and not self._snap_due \
                and self._dist is None and snap.due(self._step, now):
            self._snap_due = True
            self._pending = True
        self._update_step_time(now)
        if self._state == "starting" and self._step > self._start_step:
            self._set_state("running", only_from="starting")
        elif now - self._last_heartbeat_mono >= self.heartbeat_interval:
            self._write_status()

    def _poll_request(self) -> Optional[Request]:
        """Read ``request.json``; a malformed one is logged (once per distinct error) and ignored."""
        try:
            request = self.run_dir.read_request()
        except (ChannelError, OSError) as err:
            message = str(err)
            if message != self._last_request_error:
                _event(logging.WARNING, "request_ignored", error=message)
            self._last_request_error = message
            return None
        self._last_request_error = None
        if request is not None and self._rids.get(request.seq, "") != request.rid:
            rids = dict(self._rids) if len(self._rids) < 64 else {}
            rids[request.seq] = request.rid
            self._rids = rids  # one assignment: the other thread sees the old or the new map
        return request

    def _update_step_time(self, now: float) -> None:
        """EMA of seconds per step, from step-counter progress between polls (free for step())."""
        anchor_time, anchor_step = self._rate_anchor
        step = self._step
        if step > anchor_step and now > anchor_time:
            sample = (now - anchor_time) / (step - anchor_step)
            previous = self._step_time_s
            self._step_time_s = sample if previous is None else (
                _STEP_TIME_EMA_ALPHA * sample + (1 - _STEP_TIME_EMA_ALPHA) * previous)
            self._rate_anchor = (now, step)
        elif step < anchor_step:  # resume() moved the counter
            self._rate_anchor = (now, step)

    def _daemon_present(self) -> bool:
        try:
            return self.run_dir.lock_held(DAEMON_LOCK)
        except (ChannelError, OSError):
            return False

    # ------------------------------------------------------------------------------------------
    # Signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            # signal.signal works only in the main thread (a notebook's training thread, say);
            # the poller still sees requests within poll_interval.
            _event(logging.INFO, "signals_not_installed", reason="not the main thread")
            return
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._prev_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal_bound)
        # Tell the daemon it may wake us with SIGUSR1 (its default action would kill a process
        # without a handler, so the daemon signals only trainers that say this).
        self._extra["sigusr1"] = True

    def _register_stack_dump(self) -> None:
        """faulthandler on SIGUSR2: the daemon logs every thread's stack of a hung trainer."""
        self._stacks = StackDump(self.run_dir.path)
        try:
            described = self._stacks.register()
        except (OSError, RuntimeError, ValueError) as err:
            self._stacks = None
            _event(logging.WARNING, "stacks_not_registered", reason=str(err))
            return
        if described is None:
            self._stacks = None
            _event(logging.INFO, "stacks_not_registered", reason="SIGUSR2 already has a handler")
            return
        self._extra["stacks"] = described

    def _restore_signal_handlers(self) -> None:
        self._extra.pop("sigusr1", None)
        if not self._prev_handlers:
            return
        if threading.current_thread() is not threading.main_thread():
            _event(logging.WARNING, "signals_not_restored", reason="close() outside main thread")
            return
        for signum, previous in list(self._prev_handlers.items()):
            current = signal.getsignal(signum)
            # Someone installed a handler over ours (and may chain to it): leave theirs.
            if current == self._on_signal_bound and previous is not None:
                signal.signal(signum, previous)
            del self._prev_handlers[signum]

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """Set a flag and wake the poller; nothing else happens inside a handler."""
        previous = self._prev_handlers.get(signum)
        if not self._closed:
            if signum == signal.SIGTERM:
                if self._sigterm and previous == signal.SIG_DFL:
                    # Second SIGTERM before the first was handled: the loop is stuck (or the
                    # notebook idle); give the default action back and let it happen.
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                    return
                self._sigterm = True
            else:
                self._sigusr1 = True
            self._pending = True
            self._wake()
        if callable(previous):
            previous(signum, frame)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError, AttributeError):
            pass  # pipe full (the poller is awake anyway), closed, or not made yet

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
