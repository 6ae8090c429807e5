"""Remote commands without inbound connections: poll an ntfy topic or a Telegram bot.

Colab and AutoDL accept no inbound connection, so the watchdog asks: ``GET
<server>/<topic>/json?poll=1&since=<id>`` (ntfy) or ``<api>/bot<token>/getUpdates`` (Telegram),
every ``remote_poll_every``, on its own thread. A command is obeyed only when it comes from the
configured topic or chat AND carries the configured ``remote_token`` as one of its words:
``<token> status`` / ``cancel`` / ``keep`` / ``extend 2h`` / ``checkpoint`` / ``stop``. Anything else is
logged (``remote_ignored``, without its text) and ignored. Messages sent before the watchdog
started are never obeyed (a stale ``stop`` from yesterday must not end today's run).
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, List, Optional, Protocol

from session_watchdog.config import ConfigError, format_duration, parse_duration
from session_watchdog.log import get_logger

log = get_logger()
COMMANDS = ("status", "cancel", "keep", "extend", "checkpoint", "stop")
HTTP_TIMEOUT_S = 10.0
# Our own notifications and replies on an ntfy topic come back when we poll it: they all carry a
# title, a command typed into the ntfy app or `curl -d` has none, so a titled message is not a command.
OWN_TITLE = "session-watchdog"
HELP = "commands: status, cancel, keep, extend 2h, checkpoint, stop (each with your token)"


@dataclass(frozen=True)
class Incoming:
    id: str
    text: str
    at: float  # when the service received it (epoch seconds)
    sender_ok: bool  # from the configured chat/topic
    own: bool = False  # one of the watchdog's own messages


@dataclass(frozen=True)
class Command:
    name: str
    seconds: Optional[float] = None  # extend: by how much


class CommandRejected(ValueError):
    """Not a command to obey; the message is what the log says (never the text itself)."""


def parse_command(text: str, token: str) -> Command:
    """``"<token> extend 2h"`` (the token may be any word) -> Command; CommandRejected otherwise."""
    words = text.strip().split()
    if token not in words:
        raise CommandRejected("no valid token")
    words = [w for w in words if w != token]
    if not words:
        raise CommandRejected("token but no command")
    name = words[0].lower().lstrip("/")
    if name not in COMMANDS:
        raise CommandRejected(f"unknown command {name[:20]!r}")
    if name == "extend":
        if len(words) != 2:
            raise CommandRejected("extend needs a duration, e.g. extend 2h")
        try:
            return Command(name, parse_duration(words[1]))
        except ValueError as err:
            raise CommandRejected(f"extend: {err}") from None
    if len(words) != 1:
        raise CommandRejected(f"{name} takes no argument")
    return Command(name)


class Source(Protocol):
    description: str

    def poll(self) -> List[Incoming]: ...

    def reply(self, text: str) -> None: ...


def _get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - configured host
        return resp.read()


def _post(url: str, data: bytes, headers: dict[str, str], timeout_s: float) -> None:
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s):  # noqa: S310 - configured host
        pass


class NtfySource:
    """An ntfy topic: ``ntfys://ntfy.sh/TOPIC`` (https) or ``ntfy://HOST:PORT/TOPIC`` (http)."""

    def __init__(self, url: str, *, since: float, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        scheme = "https" if parts.scheme == "ntfys" else "http"
        self.base = f"{scheme}://{parts.netloc}"
        self.topic = parts.path.strip("/")
        self.since = str(int(since))  # first poll: only what arrived after we started
        self.timeout_s = timeout_s
        self.description = f"ntfy topic on {parts.hostname}"

    def poll(self) -> List[Incoming]:
        query = urllib.parse.urlencode({"poll": "1", "since": self.since})
        raw = _get_json(f"{self.base}/{urllib.parse.quote(self.topic)}/json?{query}", self.timeout_s)
        out = []
        for line in raw.decode("utf-8", "replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if not isinstance(obj, dict) or obj.get("event", "message") != "message":
                continue
            self.since = str(obj.get("id") or self.since)
            out.append(Incoming(id=str(obj.get("id")), text=str(obj.get("message") or ""),
                                at=float(obj.get("time") or 0),
                                sender_ok=obj.get("topic") in (None, self.topic),
                                own=bool(obj.get("title"))))
        return out

    def reply(self, text: str) -> None:
        _post(f"{self.base}/{urllib.parse.quote(self.topic)}", text.encode("utf-8"),
              {"Title": OWN_TITLE}, self.timeout_s)


class TelegramSource:
    """A Telegram bot's ``getUpdates``; only messages of the configured chat are commands."""

    def __init__(self, url: str, *, api: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        match = re.match(r"^tgram://([^/]+)/(-?\d+)/?$", url)
        if match is None:
            raise ConfigError("remote: expected tgram://BOT_TOKEN/CHAT_ID")
        self.bot = f"{api.rstrip('/')}/bot{match.group(1)}"
        self.chat_id = int(match.group(2))
        self.offset: Optional[int] = None
        self.timeout_s = timeout_s
        self.description = "Telegram chat"

    def poll(self) -> List[Incoming]:
        query = {"timeout": "0", "allowed_updates": '["message"]'}
        if self.offset is not None:
            query["offset"] = str(self.offset)
        obj = json.loads(_get_json(f"{self.bot}/getUpdates?{urllib.parse.urlencode(query)}",
                                   self.timeout_s))
        out = []
        for update in obj.get("result") or []:
            update_id = int(update.get("update_id", 0))
            self.offset = max(self.offset or 0, update_id + 1)  # confirms it: not delivered again
            message = update.get("message") or {}
            chat = (message.get("chat") or {}).get("id")
            out.append(Incoming(id=str(update_id), text=str(message.get("text") or ""),
                                at=float(message.get("date") or 0), sender_ok=chat == self.chat_id))
        return out

    def reply(self, text: str) -> None:
        body = json.dumps({"chat_id": self.chat_id, "text": text}).encode("utf-8")
        _post(f"{self.bot}/sendMessage", body, {"Content-Type": "application/json"}, self.timeout_s)


def make_source(config: Any, started: float) -> Source:
    if str(config.remote).startswith("tgram://"):
        return TelegramSource(config.remote, api=config.remote_api)
    return NtfySource(config.remote, since=started)


class Remote:
    """The polling thread: obeys commands on ``watchdog`` (cancel_end, extend_budget, user_request)."""

    def __init__(self, watchdog: Any, source: Source, token: str, poll_every_s: float,
                 started: float) -> None:
        self.watchdog = watchdog
        self.source = source
        self.token = token
        self.poll_every_s = poll_every_s
        self.started = started
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failing = False
        self._poll_lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="session-watchdog-remote", daemon=True)
            self._thread.start()
            log.info("remote_started", source=self.source.description, poll_every_s=self.poll_every_s)

    def close(self, wait_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll_every_s)

    def poll_once(self) -> None:
        """One poll; a failing service is logged once per outage, never raised.

        Serialised: two polls at once would both see (and obey) the same new message.
        """
        with self._poll_lock:
            self._poll()

    def _poll(self) -> None:
        try:
            incoming = self.source.poll()
        except (OSError, ValueError, urllib.error.URLError) as err:
            if not self._failing:
                log.warning("remote_poll_failed", source=self.source.description,
                            error=f"{type(err).__name__}: {err}")
            self._failing = True
            return
        if self._failing:
            log.info("remote_poll_recovered", source=self.source.description)
        self._failing = False
        for message in incoming:
            if not message.own:
                self.handle(message)

    def handle(self, message: Incoming) -> None:
        if not message.sender_ok:
            log.warning("remote_ignored", id=message.id, why="not from the configured chat/topic")
            return
        if message.at and message.at < self.started - 1.0:
            log.info("remote_ignored", id=message.id, why="sent before the watchdog started")
            return
        try:
            command = parse_command(message.text, self.token)
        except CommandRejected as err:
            log.warning("remote_ignored", id=message.id, why=str(err))
            if str(err) != "no valid token":  # a user with the token deserves an answer
                self._reply(f"{err}; {HELP}")
            return
        log.info("remote_command", id=message.id, command=command.name, seconds=command.seconds)
        self._reply(self.execute(command))

    def execute(self, command: Command) -> str:
        """Carry a command out on the watchdog; the reply text."""
        wd = self.watchdog
        if command.name == "status":
            return f"{wd.platform.name}: {wd.status_line()}" + ("; end pending" if wd.end_running() else "")
        if command.name == "cancel":
            if wd.cancel_end():
                return "cancelled: the runtime stays"
            if wd.end_acted():
                return "too late: the end action already ran (it is not tried again)"
            return "nothing to cancel: no end of the runtime is pending"
        if command.name == "keep":
            # what `session-watchdog cancel` does on the machine: no end, now or later (a
            # `cancel` stops the pending end only; the idle end may still come)
            from session_watchdog.actions import request_cancel

            request_cancel(wd.run_dir)
            if wd.keep_runtime("remote keep"):
                return "kept: the pending end is cancelled and this runtime is not ended later"
            if wd.end_acted():
                return "too late: the end action already ran (it is not tried again)"
            return "kept: this runtime is not ended later (a new run undoes this)"
        if command.name == "extend":
            assert command.seconds is not None  # parse_command sets it for extend
            budget = wd.extend_budget(command.seconds)
            if budget is None:
                return "no session budget to extend"
            return f"budget extended by {format_duration(command.seconds)} to {format_duration(budget)}"
        seq = wd.user_request(command.name)
        if seq is None:
            return f"no live trainer to {command.name}"
        return f"{command.name} requested (request {seq})"

    def _reply(self, text: str) -> None:
        try:
            self.source.reply(text)
            log.info("remote_replied", source=self.source.description)
        except (OSError, ValueError, urllib.error.URLError) as err:
            log.warning("remote_reply_failed", source=self.source.description,
                        error=f"{type(err).__name__}: {err}")
