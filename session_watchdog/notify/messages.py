"""What is sent when: log events -> short messages; dedup and rate limit.

PURE: no clock, no network. :func:`compose` turns one (redacted) log event and the context of
the latest reading into zero or more :class:`Message`; :class:`Limiter` decides, with ``now``
passed in, whether a message goes out. Each message is one title line and a short body ending
with where and when: ``colab · session 3h12m of 12h00m · step 1200``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from session_watchdog.config import format_duration

# Reasons of checkpoint requests made because a limit is near (a periodic one is not news).
LIMIT_REASONS = ("session_limit", "idle_reclaim", "ram_pressure", "preemption")
LIMIT_WORDS = {"session_limit": "the session limit", "idle_reclaim": "an idle reclaim",
               "ram_pressure": "RAM runs out", "preemption": "the preemption"}
# Kinds that are never held back by the rate limit (dedup still applies): they are rare by
# nature and each one changes what the user should do.
URGENT = frozenset({"completed", "failed", "preemption", "end_grace", "end_done", "test", "reply"})


@dataclass(frozen=True)
class Message:
    kind: str  # one of config.NOTIFY_KINDS, or "test" / "reply"
    key: str  # the episode: a second message with the same key is a duplicate
    title: str
    body: str

    @property
    def urgent(self) -> bool:
        return self.kind in URGENT


@dataclass(frozen=True)
class Context:
    """Where and when, from the newest reading (all optional: a message never waits for them)."""

    platform: str = "unknown"
    elapsed_s: Optional[float] = None
    budget_s: Optional[float] = None
    step: Optional[int] = None
    trainer_pid: Optional[int] = None
    started: Optional[float] = None  # the trainer process's start (epoch seconds)
    now: Optional[float] = None
    checkpoint: Optional[Mapping[str, Any]] = None  # {path, step, bytes}
    error: Optional[str] = None  # the trainer's own last error ("ValueError: ...")
    traceback: Optional[str] = None  # the last lines of its traceback, when it reported one
    child_exit: Optional[int] = None
    remote: bool = False  # remote commands are configured: say how to answer
    ends_on_failure: bool = False  # end_when_done and end_on_failure: a failed run ends the runtime

    def line(self) -> str:
        parts = [self.platform]
        if self.elapsed_s is not None:
            clock = f"session {format_duration(self.elapsed_s)}"
            if self.budget_s:
                clock += f" of {format_duration(self.budget_s)}"
            parts.append(clock)
        if self.step is not None:
            parts.append(f"step {self.step}")
        return " · ".join(parts)


def _dur(value: Any) -> str:
    return format_duration(value if isinstance(value, (int, float)) else None)


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "?"
    if value >= 2**28:
        return f"{value / 2**30:.1f} GiB"
    return f"{value / 2**20:.0f} MiB" if value >= 2**20 else f"{value / 2**10:.0f} KiB"


def _checkpoint(ctx: Context, none: str = "no checkpoint was reported") -> str:
    ckpt = ctx.checkpoint
    if not ckpt:
        return none
    return f"last checkpoint: step {ckpt.get('step')}, {_size(ckpt.get('bytes'))}, {ckpt.get('path')}"


def _msg(kind: str, key: str, title: str, ctx: Context, *lines: str) -> Message:
    body = "\n".join([*(line for line in lines if line), ctx.line()])
    return Message(kind, key, title, body)


def outcome_message(outcome: str, ctx: Context) -> Message:
    """Training completed / failed: duration, steps, last checkpoint and where it is."""
    who = ctx.trainer_pid if ctx.trainer_pid is not None else "command"
    ran = (f" in {format_duration(ctx.now - ctx.started)}"
           if ctx.now is not None and ctx.started is not None and ctx.now >= ctx.started else "")
    steps = f"{ctx.step} steps" if ctx.step is not None else "steps unknown"
    if outcome == "completed":
        return _msg("completed", f"completed:{who}", f"training completed ({steps}{ran})", ctx,
                    _checkpoint(ctx))
    code = f"exit code {ctx.child_exit}" if ctx.child_exit is not None else "reported failed"
    killed = " (SIGKILL: often an out-of-memory kill)" if ctx.child_exit == 137 else ""
    return _msg("failed", f"failed:{who}", f"training failed ({code}{killed})", ctx,
                f"error: {ctx.error}" if ctx.error else "",
                f"traceback (last lines):\n{ctx.traceback}" if ctx.traceback else "",
                _checkpoint(ctx),
                "the runtime will be ended (end_on_failure) once nothing runs on it"
                if ctx.ends_on_failure else "the runtime is left running")


def compose(event: Mapping[str, Any], ctx: Context) -> List[Message]:
    """The messages one ``decision`` or ``action`` event calls for (most call for none)."""
    name = event.get("event")
    kind = event.get("kind")
    reason = event.get("reason")
    text = str(event.get("message") or "")
    if name == "decision":
        if kind == "warn":
            return _warning(event, reason, text, ctx)
        if kind == "ack" and event.get("request_reason") in LIMIT_REASONS:
            action = "checkpoint and stop" if event.get("action") == "stop" else "checkpoint"
            return [_msg("checkpoint", f"ack:{event.get('seq')}",
                         f"{action} before {LIMIT_WORDS[str(event.get('request_reason'))]}: "
                         f"acknowledged after {_dur(event.get('latency_s'))}",
                         ctx, _checkpoint(ctx, none=""))]
        if kind == "end" and reason == "training_complete":
            return [outcome_message("completed", ctx)]
        if kind == "end" and reason == "training_failed":
            return [outcome_message("failed", ctx)]
        return []
    if name == "action":
        return _end_step(event, ctx)
    return []


def _warning(event: Mapping[str, Any], reason: Any, text: str, ctx: Context) -> List[Message]:
    if reason == "session_limit":
        left = event.get("remaining_s")
        bucket = int(left // 60) if isinstance(left, (int, float)) else 0
        hint = "reply `extend 2h` (with your token) to move the budget" if ctx.remote else ""
        return [_msg("session_warning", f"session_warning:{bucket}",
                     f"session ends in about {_dur(left)}", ctx,
                     "the trainer will be asked to checkpoint and stop in time",
                     _checkpoint(ctx, none=""), hint)]
    if reason == "training_failed":
        return [outcome_message("failed", ctx)]
    if reason == "trainer_stalled":
        if str(text).startswith("request "):  # a request nobody answered after every re-send
            return [_msg("checkpoint", f"unanswered:{event.get('seq')}",
                         "checkpoint request not acknowledged", ctx, text)]
        return [_msg("hang", f"hang:{ctx.trainer_pid}", "training looks hung", ctx, text)]
    if reason == "disk_low":
        level = event.get("level") or "low"
        return [_msg("disk", f"disk:{level}:{event.get('path')}", f"disk {level}: {event.get('path')}",
                     ctx, text)]
    if reason == "ram_pressure":
        return [_msg("ram", "ram", "RAM nearly exhausted: checkpoint requested", ctx, text)]
    if reason == "preemption":
        return [_msg("preemption", f"preemption:{event.get('deadline')}", "preemption notice", ctx, text,
                     "the trainer was asked to checkpoint and stop")]
    return []


def _end_step(event: Mapping[str, Any], ctx: Context) -> List[Message]:
    step = event.get("step")
    text = str(event.get("message") or "")
    if step == "end_grace":
        grace = event.get("grace_s")
        how = "cancel: `session-watchdog cancel` on the machine"
        if ctx.remote:
            how += ", or reply `cancel` with your token"
        described = re.search(r"\((.*)\)", text.split(";")[0])
        return [_msg("end_grace", "end_grace", f"ending the runtime in {_dur(grace)}", ctx,
                     f"end action: {described.group(1)}" if described else text, how)]
    if step == "end_cancelled":
        return [_msg("end_grace", "end_cancelled", "end of the runtime cancelled", ctx, text)]
    if step in ("end_aborted", "end_failed"):
        return [_msg("end_grace", f"{step}", "end of the runtime stopped", ctx, text,
                     "the runtime is left running")]
    if step == "end_action" and not event.get("retry"):
        return [_msg("end_done", "end_done", "runtime end action done", ctx,
                     f"{text}: {event.get('result')}")]
    if step in ("end_dry_run", "end_unavailable"):
        return [_msg("end_done", "end_done", "runtime not ended" if step == "end_unavailable"
                     else "dry run: the runtime would end now", ctx, text)]
    return []


@dataclass
class Limiter:
    """Dedup by episode key, and a token bucket for the non-urgent kinds.

    ``repeat_after_s``: a key already sent is suppressed this long (a condition that flaps
    sends one message, not one per flap). ``burst`` messages at once, then one per ``refill_s``.
    """

    repeat_after_s: float = 3600.0
    burst: int = 6
    refill_s: float = 300.0
    sent: Dict[str, float] = field(default_factory=dict)
    _tokens: float = -1.0
    _at: Optional[float] = None

    def allow(self, message: Message, now: float) -> Tuple[bool, str]:
        """(True, "") to send; (False, why) when suppressed. Counts what it lets through."""
        last = self.sent.get(message.key)
        if last is not None and now - last < self.repeat_after_s:
            return False, "duplicate"
        if self._tokens < 0:
            self._tokens, self._at = float(self.burst), now
        elif self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) / self.refill_s)
            self._at = now
        if not message.urgent:
            if self._tokens < 1.0:
                return False, "rate_limited"
            self._tokens -= 1.0
        self.sent[message.key] = now
        return True, ""
