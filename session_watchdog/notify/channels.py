"""Notification channels: Apprise URLs, redacted for people, sent one channel at a time.

Apprise (``pip install 'session-watchdog[notify]'``) is imported here only, and only when a
channel is built: the daemon without ``notify`` never loads it (its import costs ~15 MB).
Apprise URLs carry secrets (a bot token is the "host" of ``tgram://``); :func:`display_url` is the
only form that reaches the log, ``status`` or ``doctor``, and :func:`secret_parts` feeds the log's
redactor, so an error text from Apprise that quotes a URL is cleaned too.
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

from session_watchdog.config import ConfigError

# Schemes whose "host" is a token or an account, not a machine, and the machine they reach.
SERVICE_HOSTS = {
    "tgram": ("api.telegram.org", 443),
    "discord": ("discord.com", 443),
    "slack": ("hooks.slack.com", 443),
    "pover": ("api.pushover.net", 443),
    "gotify": None, "gotifys": None,  # a real host
}
_HOSTNAME = re.compile(r"^(localhost|[0-9.]+|\[[0-9a-f:]+\]|[a-z0-9-]+(\.[a-z0-9-]+)+)$", re.IGNORECASE)
SEND_TIMEOUT_S = 10.0  # per HTTP request (connect and read): a dead network costs the worker this


class NotifyUnavailable(ConfigError):
    """Apprise is not installed, or a URL is not one it knows; the message says what to do."""


def _split(url: str) -> Tuple[str, str, Optional[int], Any]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # a token with a colon in the host part (tgram://123:ABC/...)
        port = None
    return parts.scheme.lower(), host, port, parts


def shows_host(scheme: str, host: str) -> bool:
    """Whether the host part names a machine (shown) rather than a token (hidden)."""
    return scheme not in SERVICE_HOSTS and bool(_HOSTNAME.match(host))


def display_url(url: str) -> str:
    """``scheme://host[:port]/***``: what a person may see of a channel (no user, token, path)."""
    scheme, host, port, parts = _split(url)
    if shows_host(scheme, host) and "@" not in parts.netloc.rsplit("@", 1)[-1]:
        shown = host + (f":{port}" if port else "")
        return f"{scheme}://{shown}/***"
    return f"{scheme}://***"


def secret_parts(url: str) -> List[str]:
    """Every part of ``url`` that could be a secret (for the log's redactor).

    The whole URL, user and password, a netloc that is not a machine name, and each path
    segment or query value of 6+ characters (tokens, chat ids, topics). Shorter pieces would
    redact ordinary words all over the log.
    """
    scheme, host, _, parts = _split(url)
    found = {url, unquote(url)}
    if parts.username:
        found.add(unquote(parts.username))
    if parts.password:
        found.add(unquote(parts.password))
    if not shows_host(scheme, host):
        found.add(parts.netloc.rsplit("@", 1)[-1])
    for segment in parts.path.split("/"):
        found.add(unquote(segment))
    for _, value in parse_qsl(parts.query):
        found.add(value)
    return sorted((s for s in found if len(s) >= 6), key=len, reverse=True)


def service_address(url: str) -> Optional[Tuple[str, int]]:
    """(host, port) a channel talks to, for doctor's reachability check; None when unknown."""
    scheme, host, port, _ = _split(url)
    if scheme in SERVICE_HOSTS:
        return SERVICE_HOSTS[scheme] or ((host, port or 443) if host else None)
    if scheme in ("ntfy", "ntfys") and not host:
        return ("ntfy.sh", 443)
    if not host or not _HOSTNAME.match(host):
        return None
    secure = scheme.endswith("s")
    return host, port or (443 if secure else 80)


def reachable(url: str, timeout_s: float = 3.0) -> Tuple[Optional[bool], str]:
    """(True/False/None, detail): a TCP connection to the channel's service (not a message)."""
    address = service_address(url)
    if address is None:
        return None, "reachability not checked for this kind of URL"
    try:
        with socket.create_connection(address, timeout=timeout_s):
            return True, f"{address[0]}:{address[1]} reachable"
    except OSError as err:
        return False, f"{address[0]}:{address[1]} unreachable ({err.strerror or err})"


def import_apprise() -> Any:
    try:
        import apprise
    except ImportError:
        raise NotifyUnavailable("notify is set but Apprise is not installed: "
                                "pip install 'session-watchdog[notify]'") from None
    return apprise


class _Capture(logging.Handler):
    """Keeps Apprise's last warning during a send: its reason for a failure."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.last = record.getMessage()
        except Exception:  # a malformed record: keep the previous reason
            pass


@dataclass
class Channel:
    url: str
    display: str
    plugin: Any  # Apprise's plugin instance for this URL


class Channels:
    """One Apprise plugin per URL, so each channel's success is known on its own."""

    def __init__(self, urls: Sequence[str], timeout_s: float = SEND_TIMEOUT_S) -> None:
        apprise = import_apprise()
        self._notify_type = apprise.NotifyType
        # Apprise logs through the logging module, with URLs in its messages: keep them out of
        # stderr (Python's last-resort handler) and read the reason of a failure ourselves.
        self._capture = _Capture()
        logger = logging.getLogger("apprise")
        logger.propagate = False
        if not any(isinstance(h, _Capture) for h in logger.handlers):
            logger.addHandler(self._capture)
        else:
            self._capture = next(h for h in logger.handlers if isinstance(h, _Capture))
        logger.setLevel(logging.WARNING)
        self.channels: List[Channel] = []
        for url in urls:
            plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
            if plugin is None:
                raise NotifyUnavailable(f"notify: {display_url(url)} is not a URL Apprise knows "
                                        "(see https://github.com/caronc/apprise/wiki)")
            for name in ("socket_connect_timeout", "socket_read_timeout"):
                setattr(plugin, name, timeout_s)
            self.channels.append(Channel(url, display_url(url), plugin))

    def send(self, channel: Channel, title: str, body: str, urgent: bool = False) -> Tuple[bool, str]:
        """Send once on one channel: (ok, why it failed)."""
        self._capture.last = ""
        kind = self._notify_type.WARNING if urgent else self._notify_type.INFO
        try:
            ok = bool(channel.plugin.notify(body=body, title=title, notify_type=kind))
        except Exception as err:  # a plugin bug must not kill the worker
            return False, f"{type(err).__name__}: {err}"
        return ok, "" if ok else (self._capture.last or "the service refused the message")
