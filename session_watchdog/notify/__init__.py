"""Tell the user, wherever they are: notifications and remote commands (issue 15).

Off unless configured (``notify`` and/or ``remote``); the daemon imports this package only then,
and Apprise only when ``notify`` is set. :class:`Hub` hooks into the daemon at one place, the log
stream (:func:`session_watchdog.log.add_listener`): it sees every decision and action event, as
redacted as the log, composes messages (:mod:`.messages`), and hands them to one worker thread
(:mod:`.worker`). Remote commands come from :mod:`.remote`. Under torchrun there is one daemon,
and so one notifier, per node.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

from session_watchdog import log as _log
from session_watchdog.config import NOTIFY_KINDS, ConfigError
from session_watchdog.notify.messages import Context, Limiter, Message, compose, outcome_message
from session_watchdog.policy import training_outcome

log = _log.get_logger()
MAX_PENDING = 64  # events of one tick waiting for its end (a tick logs a handful)

__all__ = ["Hub", "config_secrets", "Context", "Message", "Limiter", "compose"]


def config_secrets(config: Any) -> List[str]:
    """Every secret in the notify/remote configuration, for the log's redactor."""
    from session_watchdog.notify.channels import secret_parts

    found: List[str] = []
    for url in config.notify:
        found += secret_parts(url)
    if config.remote:
        found += secret_parts(config.remote)
    if config.remote_token:
        found.append(config.remote_token)
    return found


class Hub:
    """Notifications and remote commands for one :class:`~session_watchdog.daemon.Watchdog`."""

    def __init__(self, watchdog: Any, *, channels: Any = None, source: Any = None,
                 limiter: Optional[Limiter] = None) -> None:
        config = watchdog.config
        _log.add_secrets(config_secrets(config))
        self.watchdog = watchdog
        self.kinds = frozenset(config.notify_on)
        self.limiter = limiter or Limiter()
        self.worker: Any = None
        if config.notify or channels is not None:
            from session_watchdog.notify.channels import Channels
            from session_watchdog.notify.worker import Worker

            self.worker = Worker(channels if channels is not None else Channels(config.notify))
        self.remote: Any = None
        if config.remote:
            from session_watchdog.notify.remote import Remote, make_source

            started = watchdog.clock.wall()
            self.remote = Remote(watchdog, source or make_source(config, started),
                                 config.remote_token, config.remote_poll_every, started)
        self._oom_kills: Optional[int] = None
        self._outcome_seen: Optional[str] = None
        self._pending: List[Dict[str, Any]] = []
        self._lock = threading.RLock()  # orders messages: a tick's, then the end thread's

    def start(self) -> None:
        _log.add_listener(self.on_event)
        previous = self.watchdog.on_decisions

        def after_tick(decisions: List[Any], sample: Any) -> None:
            self.after_tick(sample)
            if previous is not None:
                previous(decisions, sample)

        self.watchdog.on_decisions = after_tick
        if self.worker is not None:
            self.worker.start()
        if self.remote is not None:
            self.remote.start()

    def close(self, wait_s: float = 10.0) -> None:
        """Stop listening; send what is queued (bounded by ``wait_s``); stop polling."""
        _log.remove_listener(self.on_event)
        if self.remote is not None:
            self.remote.close()
        with self._lock:  # events of a tick that never finished still go out
            self._flush_pending()
        if self.worker is not None:
            self.worker.close(wait_s)

    # ---- the hook: runs in the thread that logged the event; quick, never raises -------------

    def on_event(self, event: Mapping[str, Any]) -> None:
        """A redacted log event. A tick's decisions wait for its end (:meth:`after_tick`): the
        message then carries the tick's own reading (step, exit code). An end step that comes
        while decisions wait queues behind them: "training completed" before "ending in 2m"."""
        name = event.get("event")
        if name not in ("decision", "action"):
            return
        if name == "action" and not str(event.get("step", "")).startswith("end_"):
            return
        with self._lock:
            if name == "decision" or self._pending:
                if len(self._pending) < MAX_PENDING:
                    self._pending.append(dict(event))
                return
            for message in compose(event, self.context()):
                self.offer(message)

    def after_tick(self, sample: Any) -> None:
        """End of a tick (``Watchdog.on_decisions``): its events, and the edges of its reading."""
        with self._lock:
            self._flush_pending()
            host = sample.host
            kills = host.oom_kills if host is not None else None
            if kills is not None:
                if self._oom_kills is not None and kills > self._oom_kills:
                    self.offer(Message("oom", f"oom:{kills}", "out-of-memory kill on this machine",
                                       f"the kernel killed a process for memory ({kills} so far)\n"
                                       + self.context().line()))
                self._oom_kills = kills
            outcome = training_outcome(sample)
            if outcome is not None and outcome != self._outcome_seen:
                self.offer(outcome_message(outcome, self.context()))
            self._outcome_seen = outcome

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        ctx = self.context()
        for event in pending:
            child_exit = event.get("child_exit")
            event_ctx = ctx if child_exit is None else dataclasses.replace(ctx, child_exit=child_exit)
            if event.get("traceback") and not ctx.traceback:  # the trainer's own report wins
                event_ctx = dataclasses.replace(event_ctx, traceback=str(event["traceback"]))
            for message in compose(event, event_ctx):
                self.offer(message)

    def offer(self, message: Message) -> None:
        """Filter (notify_on), dedup and rate-limit, then queue for the worker (under ``_lock``)."""
        if self.worker is None or (message.kind in NOTIFY_KINDS and message.kind not in self.kinds):
            return
        ok, why = self.limiter.allow(message, self.watchdog.clock.monotonic())
        if not ok:
            log.info("notify_suppressed", kind=message.kind, key=message.key, why=why)
            return
        self.worker.submit(message)

    def context(self) -> Context:
        wd = self.watchdog
        sample = wd.last_sample
        fields: Dict[str, Any] = {"platform": wd.platform.name, "budget_s": wd.config.max_session or None,
                                  "remote": self.remote is not None,
                                  "ends_on_failure": bool(wd.config.end_when_done
                                                          and wd.config.end_on_failure
                                                          and not wd.config.dry_run)}
        if sample is not None:
            status = sample.trainer.status
            fields.update(elapsed_s=sample.elapsed_s, now=sample.now, child_exit=sample.child_exit)
            if status is not None:
                ckpt = status.last_checkpoint
                error = status.extra.get("error")
                tb = status.extra.get("traceback")
                fields.update(step=status.step, trainer_pid=status.pid, started=status.start_time,
                              error=str(error)[:300] if error else None,
                              traceback=str(tb)[-1000:] if tb else None,
                              checkpoint=None if ckpt is None else {
                                  "path": ckpt.path, "step": ckpt.step, "bytes": ckpt.bytes})
        return Context(**fields)



# ---- front-ends: `session-watchdog notify --test` and doctor ---------------------------------


def send_test_messages(config: Any) -> List[Tuple[str, bool, str]]:
    """One test message through every configured channel: [(redacted channel, ok, why not)]."""
    from session_watchdog.notify.channels import Channels
    from session_watchdog.notify.worker import send_test

    secrets = config_secrets(config)
    _log.add_secrets(secrets)
    redact = _log.Redactor(sorted(set(secrets), key=len, reverse=True))._clean
    return [(shown, ok, str(redact(error))) for shown, ok, error in send_test(Channels(config.notify))]


def doctor_checks(config: Any) -> List[Dict[str, Any]]:
    """doctor's rows for the channels (redacted) and the remote source: reachable or not."""
    from session_watchdog.notify.channels import display_url, import_apprise, reachable

    checks: List[Dict[str, Any]] = []
    if config.notify:
        try:
            import_apprise()
        except ConfigError as err:
            checks.append({"name": "notify", "ok": False, "detail": str(err).split(":")[0],
                           "fix": "pip install 'session-watchdog[notify]'"})
    for url in config.notify:
        ok, detail = reachable(url)
        checks.append({"name": "notify", "ok": ok, "detail": f"{display_url(url)}: {detail}",
                       "fix": "" if ok is not False else "check the network (on AutoDL set "
                              "HTTPS_PROXY to the academic proxy) or the URL"})
    if config.remote:
        # Telegram commands go to remote_api (the bot token is not a host)
        target = config.remote_api if config.remote.startswith("tgram://") else config.remote
        ok, detail = reachable(target)
        checks.append({"name": "remote commands", "ok": ok,
                       "detail": f"{display_url(config.remote)}: {detail}",
                       "fix": "" if ok is not False else "check the network or the remote URL"})
    return checks
