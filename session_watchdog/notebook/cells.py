"""The kernel's cells: the activity they show (Colab's idle reclaim looks at it) and the notices
queued by the watchdog's thread and printed by the main thread, into the next cell.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple

_NOTICE_KINDS = ("warn", "request", "resend", "end", "info")  # decisions worth showing the user
_MAX_NOTICES = 100


# --------------------------------------------------------------------------------------------
# Cell activity


class ActivityTracker:
    """Seconds since the kernel last executed something: a cell, or ``wait()``.

    IPython calls :meth:`pre_run_cell` / :meth:`post_run_cell` around every cell; ``wait()``
    holds :meth:`busy`. While either runs, ``idle_s()`` is 0.0; afterwards it counts from the end.
    Cells nest (a cell that calls ``get_ipython().run_cell()``): the outer one runs until its own
    post_run_cell, so the running cells are counted, not flagged.

    Args:
        monotonic: the clock (tests inject a fake one).
        attached: whether cell events reach this tracker. A detached tracker (a plain Python
            script, no IPython shell) reports ``None``: "not a notebook", never a fake idle time.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic, *,
                 attached: bool = True) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cells = 0  # cells running: pre_run_cell seen, post_run_cell not yet
        self._waits = 0
        self._last_activity = monotonic()
        self._idle_before_cell = 0.0
        self.attached = attached

    def pre_run_cell(self, info: Any = None) -> None:
        """IPython ``pre_run_cell``: a cell starts executing."""
        with self._lock:
            now = self._monotonic()
            if not self._cells:  # a nested cell: the idle time before the outer one stays
                self._idle_before_cell = max(0.0, now - self._last_activity)
            self._cells += 1
            self._last_activity = now

    def post_run_cell(self, result: Any = None) -> None:
        """IPython ``post_run_cell``: the cell finished (successfully or not)."""
        with self._lock:
            self._cells = max(0, self._cells - 1)  # an end without a start (hooks moved): none
            self._last_activity = self._monotonic()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count as executing for the duration of the block (``wait()`` uses it)."""
        with self._lock:
            self._waits += 1
        try:
            yield
        finally:
            with self._lock:
                self._waits -= 1
                self._last_activity = self._monotonic()

    @property
    def executing(self) -> bool:
        """True while a cell or ``wait()`` runs."""
        with self._lock:
            return self._cells > 0 or self._waits > 0

    @property
    def waiting(self) -> bool:
        """True while ``wait()`` runs."""
        with self._lock:
            return self._waits > 0

    def idle_before_cell_s(self) -> Optional[float]:
        """While a cell runs: how long nothing ran before it started; else None."""
        with self._lock:
            return self._idle_before_cell if self._cells else None

    def idle_s(self) -> Optional[float]:
        """Seconds with nothing executing (0.0 while something does); None when detached."""
        if not self.attached:
            return None
        with self._lock:
            if self._cells or self._waits > 0:
                return 0.0
            return max(0.0, self._monotonic() - self._last_activity)


# --------------------------------------------------------------------------------------------
# Notices: decisions queued by the background thread, printed by the main thread


@dataclass(frozen=True)
class Notice:
    """One decision shown to the user. ``at`` is wall-clock epoch seconds (the sample's ``now``)."""

    at: float
    kind: str  # warn | request | resend | end | info
    reason: str
    message: str
    action: Optional[str] = None

    def text(self) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(self.at))
        if self.kind == "warn":
            what = "warning"
        elif self.kind == "request":
            what = f"{self.action} requested"
        elif self.kind == "end":
            what = "ending the runtime"
        elif self.kind == "info":
            what = "note"
        else:
            what = f"{self.action} request sent again"
        return f"[session-watchdog {clock}] {what} ({self.reason}): {self.message}"


class _Notices:
    """A bounded, thread-safe queue that remembers which notices were shown already."""

    def __init__(self, maxlen: int = _MAX_NOTICES) -> None:
        self._lock = threading.Lock()
        self._items: Deque[Tuple[int, Notice]] = deque(maxlen=maxlen)
        self._next = 0
        self._shown = 0  # notices numbered below this were shown

    def add(self, notice: Notice) -> None:
        with self._lock:
            self._items.append((self._next, notice))
            self._next += 1

    def on_decisions(self, decisions: List[Any], sample: Any) -> None:
        """The Watchdog's ``on_decisions`` callback. Runs in the scheduler's worker thread:
        queue, never print (the text would land in whatever cell is running)."""
        for d in decisions:
            if d.kind in _NOTICE_KINDS:
                self.add(Notice(sample.now, d.kind, d.reason, d.message, d.action))

    def take_unseen(self) -> List[Notice]:
        with self._lock:
            out = [n for i, n in self._items if i >= self._shown]
            self._shown = self._next
            return out

    def recent(self, count: int) -> List[Notice]:
        with self._lock:
            return [n for _, n in list(self._items)[-count:]]
