"""The systemd notify protocol (``sd_notify(3)``), without libsystemd or any other dependency.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (an AF_UNIX datagram socket: a path, or an
abstract-namespace name written with a leading ``@``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``
and ``WATCHDOG_PID``. The service sends newline-separated ``KEY=VALUE`` lines in one datagram:
``READY=1`` once started, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` as a keep-alive,
``STOPPING=1`` on shutdown. See https://www.freedesktop.org/software/systemd/man/sd_notify.html.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op that returns False. Sending never
raises: a watchdog must not die because its supervisor's socket went away.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Mapping, Optional, Tuple

from session_watchdog.log import get_logger

log = get_logger()

# What systemd passes to a Type=notify service; a child we start (``run -- python train.py``)
# should not inherit them, or it could speak for us (sd_notify(3): unset_environment).
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def parse_address(value: str) -> Optional[str]:
    """``NOTIFY_SOCKET`` -> a socket address for ``sendto``, or None when unusable.

    ``/run/systemd/notify`` is a filesystem path; ``@name`` is the abstract namespace (a leading
    NUL byte on Linux). Other forms (relative paths, ``vsock:``, systemd >= 253) are not supported.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages to one socket; disabled (every call a no-op) without one."""

    def __init__(self, address: Optional[str] = None) -> None:
        self.address = address
        self._failing = False  # log the first failure of a streak, not every tick's

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Notifier:
        """The notifier systemd asked for through ``NOTIFY_SOCKET``; a disabled one otherwise."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        address = parse_address(raw)
        if raw and address is None:
            log.warning("sd_notify_unsupported", notify_socket=raw,
                        message="NOTIFY_SOCKET is not an absolute path or @abstract name; "
                                "systemd notifications are off")
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram (``"READY=1\\nSTATUS=..."``); True when it was sent.

        Never raises. The first failure of a streak is logged (``sd_notify_failed``); later ones
        are silent until a send succeeds again.
        """
        if self.address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(1.0)  # a full receive queue must not block a tick for long
                sock.sendto(data, self.address)
        except (OSError, ValueError) as err:  # ValueError: embedded NUL in a path address
            if not self._failing:
                self._failing = True
                log.warning("sd_notify_failed", address=self.address.replace("\0", "@", 1),
                            error=f"{type(err).__name__}: {err}")
            return False
        self._failing = False
        return True

    def ready(self, status: Optional[str] = None) -> bool:
        """``READY=1``: start-up is finished (systemctl start returns)."""
        return self.notify("READY=1", *_status_line(status))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.notify(*_status_line(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ``WatchdogSec=`` waits for."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: Optional[str] = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify("STOPPING=1", *_status_line(status))


def _status_line(text: Optional[str]) -> Tuple[str, ...]:
    if text is None:
        return ()
    # One datagram is a list of lines: a newline inside the status would start a new assignment.
    return ("STATUS=" + " ".join(text.splitlines()),)


def watchdog_interval_s(env: Optional[Mapping[str, str]] = None,
                        pid: Optional[int] = None) -> Optional[float]:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC`` (sd_watchdog_enabled(3)).

    None when the watchdog is off: ``WATCHDOG_USEC`` unset, not a positive integer, or
    ``WATCHDOG_PID`` set to a process other than ``pid`` (default: ours), which happens when a
    child inherited the variables of its supervised parent.
    """
    env = os.environ if env is None else env
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000  # "call sd_notify WATCHDOG=1 ... at half the time" (sd_notify(3))


class Heartbeat:
    """``WATCHDOG=1`` no more often than every ``interval_s`` seconds of a monotonic clock.

    Call :meth:`maybe_ping` after every tick (a hung tick then stops the pings and systemd
    restarts us, which is the point of ``WatchdogSec=``), or from a job of its own every
    ``interval_s``. Thread-safe.
    """

    def __init__(self, notifier: Notifier, interval_s: Optional[float]) -> None:
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"Heartbeat(interval_s={interval_s!r}) is invalid: expected > 0 or None")
        self.notifier = notifier
        self.interval_s = interval_s
        self._last: Optional[float] = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, notifier: Optional[Notifier] = None, env: Optional[Mapping[str, str]] = None,
                 pid: Optional[int] = None) -> Heartbeat:
        """The heartbeat systemd asked for (``WATCHDOG_USEC``); a disabled one otherwise."""
        env = os.environ if env is None else env
        return cls(notifier or Notifier.from_env(env), watchdog_interval_s(env, pid))

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.interval_s is not None

    def maybe_ping(self, now_mono: float) -> bool:
        """Send ``WATCHDOG=1`` when the last ping is ``interval_s`` old (or none was sent yet).

        Returns True when a ping went out. A failed send is retried at the next call.
        """
        interval = self.interval_s
        if interval is None or not self.notifier.enabled:
            return False
        with self._lock:
            if self._last is not None and now_mono - self._last < interval:
                return False
            if not self.notifier.watchdog():
                return False
            self._last = now_mono
            return True
