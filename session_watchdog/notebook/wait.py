"""``wait()``: a blocking cell with a live progress view (tqdm or text) while training runs, which
keeps Colab's idle reclaim away, until the trainer ends or the session is about to.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Optional, Tuple

from session_watchdog import channel
from session_watchdog.config import format_duration
from session_watchdog.notebook.kernel import _ACTIVE_STATES, _TERMINAL_STATES, _running_handle
from session_watchdog.probes import process_create_time

if TYPE_CHECKING:
    from session_watchdog.notebook.handle import WatchdogHandle


_TEXT_VIEW_EVERY_S = 30.0


# --------------------------------------------------------------------------------------------
# wait()


@dataclass(frozen=True)
class WaitResult:
    """Why ``wait()`` returned.

    ``reason``: completed | failed | stopped (the trainer's final state), trainer_gone (it ended
    without saying so), session_ending (the budget is within the stop lead), interrupted
    (KeyboardInterrupt), until, timeout.
    """

    reason: str
    state: Optional[str]
    step: Optional[int]
    waited_s: float


class _TextView:
    """Plain text: a line when something notable changed, else at most every ``every_s``."""

    def __init__(self, file: Optional[IO[str]], every_s: float = _TEXT_VIEW_EVERY_S) -> None:
        self.file = file
        self.every_s = every_s
        self._last_key: Any = None
        self._last_print = 0.0

    def _print(self, text: str) -> None:
        print(text, file=self.file if self.file is not None else sys.stdout, flush=True)

    def update(self, step: Optional[int], line: str, key: Any) -> None:
        now = time.monotonic()
        if key != self._last_key or now - self._last_print >= self.every_s:
            self._print(f"session-watchdog: {line}")
            self._last_key = key
            self._last_print = now

    def note(self, text: str) -> None:
        self._print(text)

    def close(self, text: str) -> None:
        self._print(text)


class _TqdmView:
    """tqdm.auto: a widget in a notebook, a bar in a terminal; the step counter with a postfix."""

    def __init__(self, tqdm_cls: Any, file: Optional[IO[str]]) -> None:
        self._tqdm = tqdm_cls
        self.file = file
        self.bar = tqdm_cls(total=None, unit="step", desc="training", file=file,
                            dynamic_ncols=True, leave=True)

    def update(self, step: Optional[int], line: str, key: Any) -> None:
        if step is not None:
            if step >= self.bar.n:
                self.bar.update(step - self.bar.n)
            else:  # a resumed trainer counts from its checkpoint
                self.bar.n = step
        self.bar.set_postfix_str(line, refresh=True)

    def note(self, text: str) -> None:
        self._tqdm.write(text, file=self.file)

    def close(self, text: str) -> None:
        self.bar.close()
        print(text, file=self.file if self.file is not None else sys.stdout, flush=True)


def _make_view(view: str, file: Optional[IO[str]]) -> Any:
    if view not in ("auto", "tqdm", "text"):
        raise ValueError(f"wait(view={view!r}): expected 'auto', 'tqdm' or 'text'")
    if view in ("auto", "tqdm"):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if view == "tqdm":
                raise
        else:
            return _TqdmView(tqdm, file)
    return _TextView(file)


def _progress_line(status: Optional[channel.TrainerStatus], left: Optional[float],
                   now: float, alive: bool = True) -> Tuple[str, Any]:
    parts = []
    key: Tuple[Any, ...] = ()
    if status is None:
        parts.append("waiting for the trainer")
    else:
        if alive or status.state not in _ACTIVE_STATES:
            parts.append(f"{status.state}, step {status.step}, epoch {status.epoch}")
        else:  # never claim a dead trainer runs (issue 16)
            parts.append(f"no live trainer (last report: {status.state}, step {status.step})")
        ckpt = status.last_checkpoint
        if ckpt is not None:
            parts.append(f"checkpoint step {ckpt.step} ({format_duration(now - ckpt.at)} ago)")
        key = (status.state, status.epoch, ckpt.step if ckpt else None, alive)
    parts.append("session: no budget" if left is None else f"session: {format_duration(left)} left")
    return " | ".join(parts), key


START_TIMEOUT_S = 30.0  # wait() gives a new trainer this long to appear after an ended one


def _process_gone(status: channel.TrainerStatus) -> bool:
    """Whether the process that wrote ``status`` is gone: its pid runs nothing, or another
    process (a reused pid has another create time; an unknown start time proves nothing)."""
    created = process_create_time(status.pid)
    return created is None or (status.start_time > 0 and abs(created - status.start_time) > 0.05)


def wait(poll: float = 1.0, until: Optional[Callable[[], bool]] = None, *,
         timeout: Optional[float] = None, view: str = "auto",
         file: Optional[IO[str]] = None, start_timeout: float = START_TIMEOUT_S) -> WaitResult:
    """Block with a live progress view until training ends or the session is about to end.

    This keeps the kernel busy, which is what Colab's idle reclaim looks at, while training
    runs in a background process (:func:`launch`) or thread. Returns when the trainer reports
    completed / failed / stopped (or ends without saying so), when the session budget is within
    the stop lead, when ``until()`` is true, after ``timeout`` seconds, or on KeyboardInterrupt
    ("interrupt the kernel"), which stops neither a launched trainer nor the watchdog.

    Which trainer: the one :func:`launch` started, when there is one (a ``trainer.json`` older
    than the launch is an earlier run's). Otherwise, a final ``trainer.json`` written before
    ``wait()`` was called is an earlier run's: ``wait()`` gives a new trainer ``start_timeout``
    seconds to appear before it reports that one. So does a ``trainer.json`` that says training
    runs, written before ``wait()`` was called by a process that is gone (killed, out of memory)
    and holds no ``run.lock``: then ``wait()`` reports that trainer gone. Written since, it is
    this wait's trainer, gone at once. With no ``trainer.json`` at all, ``wait()`` waits for the
    trainer to write one.

    Args:
        poll: seconds between looks at the run directory.
        until: an extra condition, checked every poll.
        timeout: give up after this many seconds.
        view: "auto" (tqdm.auto when installed, else text), "tqdm" or "text".
        file: where the view writes (default: stdout for text, stderr for tqdm).
        start_timeout: see above.

    Raises:
        RuntimeError: no watchdog runs in this kernel (call ``start()`` first).
    """
    handle = _running_handle()
    if handle is None:
        raise RuntimeError("no session-watchdog runs in this kernel; call "
                           "session_watchdog.start() first")
    return _wait(handle, poll=poll, until=until, timeout=timeout, view=view, file=file,
                 start_timeout=start_timeout)


def _wait(handle: WatchdogHandle, *, poll: float, until: Optional[Callable[[], bool]],
          timeout: Optional[float], view: str, file: Optional[IO[str]],
          start_timeout: float = START_TIMEOUT_S) -> WaitResult:
    if not poll > 0:
        raise ValueError(f"wait(poll={poll!r}): expected a positive number of seconds")
    run_dir = channel.RunDir(handle.run_dir, create=False)
    launched = handle.launched
    begun = time.monotonic()
    begun_wall = time.time()
    status: Optional[channel.TrainerStatus] = None  # the trainer this wait() watches
    earlier: Optional[channel.TrainerStatus] = None  # a final state from before, not ours
    seen_alive = False
    gone_polls = 0
    out = _make_view(view, file)

    def finish(reason: str, text: str, shown: Optional[channel.TrainerStatus] = None
               ) -> WaitResult:
        shown = shown if shown is not None else status
        out.close(f"session-watchdog: {text}")
        return WaitResult(reason, shown.state if shown else None,
                          shown.step if shown else None, round(time.monotonic() - begun, 3))

    def ours(found: Optional[channel.TrainerStatus]) -> Optional[channel.TrainerStatus]:
        """``found`` when it describes the trainer this wait() is for (issue 16)."""
        if found is None:
            return None
        if launched is not None:  # 1 s: the trainer's wall clock is ours, writes are not instant
            return found if found.heartbeat >= launched.started_wall - 1.0 else None
        if found.state in _TERMINAL_STATES and found.heartbeat < begun_wall - 1.0:
            # Ended before wait() was called: an earlier run's file, even while run.lock is held
            # (a new trainer takes the lock before it writes its first trainer.json).
            return None
        return found

    with handle.tracker.busy():
        try:
            while True:
                # Liveness first, then the status: a trainer writes its final state before it
                # releases run.lock (and before it exits), so "not alive" read first makes the
                # status read final.
                launched_running = launched is not None and launched.running
                alive = run_dir.trainer_alive()
                try:
                    found: Optional[channel.TrainerStatus] = run_dir.read_status()
                except (channel.ChannelError, OSError):
                    found = status  # keep the last good one; the watchdog logs unreadable files
                mine = ours(found)
                if mine is None and found is not None and found is not status:
                    earlier = found
                status = mine if mine is not None else status
                seen_alive = seen_alive or (alive and status is not None)
                for notice in handle._notices.take_unseen():
                    out.note(notice.text())
                left = handle.remaining_s()
                line, key = _progress_line(status, left, handle.watchdog.session.times().now,
                                           alive or launched_running)
                out.update(status.step if status else None, line, key)

                if status is not None and status.state in _TERMINAL_STATES:
                    return finish(status.state, f"training {status.state} at step {status.step}")
                if launched is not None and not launched_running:
                    code = launched.exit_code()
                    for text in launched.tail(5):
                        out.note(f"  | {text}")
                    where = "" if status is None else f" at step {status.step}"
                    return finish("trainer_gone", f"the launched trainer (pid {launched.pid}) "
                                  f"exited with code {code}{where} without reporting "
                                  f"completion; its output: {launched.output}")
                active = status is not None and status.state in _ACTIVE_STATES
                # A launched trainer's end is its process's exit (its code says more). One that
                # died before this wait() saw it alive is gone too once its process is.
                gone = (active and not alive and launched is None and status is not None
                        and (seen_alive or _process_gone(status)))
                gone_polls = gone_polls + 1 if gone else 0
                if gone_polls >= 2 and status is not None:
                    if seen_alive or status.heartbeat >= begun_wall - 1.0:
                        return finish("trainer_gone", f"the trainer ended at step {status.step} "
                                      "without reporting completion (crashed or closed?)")
                    if time.monotonic() - begun >= start_timeout:  # a new one may be starting
                        return finish("trainer_gone", f"no new trainer started in "
                                      f"{format_duration(start_timeout)}; the last one (pid "
                                      f"{status.pid}) is gone without reporting completion "
                                      f"(killed? out of memory?), last at step {status.step}, "
                                      f"{format_duration(begun_wall - status.heartbeat)} before "
                                      "wait() was called")
                if status is None and earlier is not None and launched is None and not alive \
                        and time.monotonic() - begun >= start_timeout:
                    return finish(earlier.state, f"no new trainer started in "
                                  f"{format_duration(start_timeout)}; the last one "
                                  f"{earlier.state} at step {earlier.step}, "
                                  f"{format_duration(begun_wall - earlier.heartbeat)} before "
                                  "wait() was called", earlier)
                if left is not None and left <= handle.stop_lead_s():
                    return finish("session_ending", f"the session ends in {format_duration(left)}")
                if until is not None and until():
                    return finish("until", "wait condition met")
                if timeout is not None and time.monotonic() - begun >= timeout:
                    return finish("timeout", f"stopped waiting (timeout {timeout:g}s)")
                time.sleep(poll)
        except KeyboardInterrupt:
            # Say only what is true now: is a trainer alive (issue 16)?
            if launched is not None and launched.running:
                text = (f"wait() interrupted; the launched trainer (pid {launched.pid}) and the "
                        "watchdog keep running (session_watchdog.status() shows them)")
            elif run_dir.trainer_alive():
                text = ("wait() interrupted; training and the watchdog keep running "
                        "(session_watchdog.status() shows them)")
            else:
                text = ("wait() interrupted; no trainer is running; the watchdog keeps running "
                        "(session_watchdog.status() shows it)")
            return finish("interrupted", text)
