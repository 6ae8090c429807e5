"""One thread sends every message: a bounded queue, bounded retries, a bounded wait at exit.

The tick only puts a message on the queue (never blocks: a full queue drops the message and
says so). A dead network or a server that hangs costs this thread its timeouts, never a tick.
Every send, failure and drop is a logged event (``notify_sent`` / ``notify_failed`` /
``notify_dropped``), with the channel's redacted form only.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from session_watchdog.log import get_logger
from session_watchdog.notify.messages import Message

log = get_logger()
QUEUE_SIZE = 32
ATTEMPTS = 3  # per channel and message
BACKOFF_S = (2.0, 5.0)  # waits between attempts


class Worker:
    """Sends queued messages through ``channels`` (a :class:`~.channels.Channels` or a fake)."""

    def __init__(self, channels: Any, *, attempts: int = ATTEMPTS,
                 backoff_s: Tuple[float, ...] = BACKOFF_S, queue_size: int = QUEUE_SIZE,
                 on_result: Optional[Callable[[Message, str, bool], None]] = None) -> None:
        self.channels = channels
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.queue: queue.Queue[Optional[Message]] = queue.Queue(maxsize=queue_size)
        self.on_result = on_result
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="session-watchdog-notify", daemon=True)
            self._thread.start()

    def submit(self, message: Message) -> bool:
        """Queue a message; False (and a ``notify_dropped`` event) when the queue is full."""
        try:
            self.queue.put_nowait(message)
            return True
        except queue.Full:
            log.warning("notify_dropped", kind=message.kind, title=message.title,
                        message="notification queue full (the channels do not answer)")
            return False

    def close(self, wait_s: float = 10.0) -> int:
        """Send what is queued for up to ``wait_s``, then stop; the number of messages left unsent."""
        if self._thread is None:
            return self.queue.qsize()
        deadline = time.monotonic() + wait_s
        try:
            self.queue.put(None, timeout=max(0.0, wait_s))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()  # cut retries short if the join timed out
        left = self.queue.qsize()
        if self._thread.is_alive():
            log.warning("notify_unsent", left=left, message=f"stopped with {left} notification(s) unsent")
        return left

    def _run(self) -> None:
        while True:
            message = self.queue.get()
            if message is None or self._stop.is_set():
                return
            for channel in list(self.channels.channels):
                ok = self.send(channel, message)
                if self.on_result is not None:
                    self.on_result(message, channel.display, ok)

    def send(self, channel: Any, message: Message) -> bool:
        """Up to ``attempts`` tries on one channel, with back-off; logs the outcome."""
        error = "the notifier was closed before it could be sent"
        tried = 0
        for attempt in range(1, self.attempts + 1):
            if self._stop.is_set():  # closed while this message waited: stop trying
                break
            tried = attempt
            started = time.monotonic()
            ok, error = self.channels.send(channel, message.title, message.body, message.urgent)
            if ok:
                log.info("notify_sent", kind=message.kind, channel=channel.display, attempt=attempt,
                         title=message.title, duration_s=round(time.monotonic() - started, 3))
                return True
            if attempt < self.attempts:
                wait = self.backoff_s[min(attempt - 1, len(self.backoff_s) - 1)] if self.backoff_s else 0.0
                if self._stop.wait(wait):
                    break
        log.warning("notify_failed", kind=message.kind, channel=channel.display,
                    attempts=tried, error=error, title=message.title)
        return False


def send_test(channels: Any) -> List[Tuple[str, bool, str]]:
    """One test message on every channel, once each: [(channel, ok, why not)]."""
    results = []
    for channel in channels.channels:
        ok, error = channels.send(channel, "session-watchdog: test message",
                                  "If you read this, session-watchdog can reach you here.")
        if ok:
            log.info("notify_sent", kind="test", channel=channel.display, attempt=1)
        else:
            log.warning("notify_failed", kind="test", channel=channel.display, attempts=1, error=error)
        results.append((channel.display, ok, error))
    return results
