"""Idle CPU priority for the background checkpoint writer (issue 17).

On a machine whose cores the training loop keeps busy, an async save's writer thread (the copy
into the page cache, the checksum, torch's pickling) takes CPU time from training: measured at
0.8-1.15x the time a sync save blocks it (benchmarks/bench_checkpoint.py ``--lost``). The writer
therefore runs at the lowest priority the kernel offers: ``SCHED_IDLE`` (sched(7): it runs only
on CPU time nothing else wants) where this process may later undo it, else nice 19.

A write starved that way must still end promptly once someone waits for it (the end of a run,
the next save): :meth:`Yielding.hurry` restores the thread's policy and nice value. Raising a
priority back needs ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` that allows the old nice value
(sched_setscheduler(2): "Treat SCHED_IDLE as nice 20"), so without either the thread only goes to
nice 19, which still gets a share of a contended core (CFS weight 15 against 1024) and all of a
free one, as when the trainer itself is waiting. Linux only; elsewhere nothing changes.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from typing import Optional, Tuple

__all__ = ["Yielding", "can_restore"]

_CAP_SYS_NICE = 23  # <linux/capability.h>
_LOWEST_NICE = 19
_FAIR_POLICIES = tuple(getattr(os, name) for name in ("SCHED_OTHER", "SCHED_BATCH")
                       if hasattr(os, name))


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def can_restore(nice: int) -> bool:
    """Whether this process may set a thread back to ``nice`` after lowering it."""
    try:
        limit = resource.getrlimit(resource.RLIMIT_NICE)[0]
    except (AttributeError, OSError, ValueError):
        limit = 0
    # RLIMIT_NICE caps the nice value at 20 - limit (setrlimit(2)); RLIM_INFINITY allows all.
    if limit == resource.RLIM_INFINITY or 20 - nice <= limit:
        return True
    return _has_cap_sys_nice()


def _lower(tid: int) -> Optional[Tuple[Optional[int], int]]:
    """Lower thread ``tid``; (policy or None, nice) to restore, or None if nothing to undo."""
    try:
        policy = os.sched_getscheduler(tid)
        nice = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None
    if policy not in _FAIR_POLICIES:  # real-time or already idle: the user chose it, keep it
        return None
    if can_restore(nice):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return (policy, nice)
        except (OSError, AttributeError):
            pass  # a seccomp filter, an old kernel: nice 19 below
    try:
        os.setpriority(os.PRIO_PROCESS, tid, _LOWEST_NICE)
    except OSError:
        return None
    return (None, nice) if can_restore(nice) else None


def _restore(tid: int, saved: Tuple[Optional[int], int]) -> None:
    policy, nice = saved
    try:
        if policy is not None:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass  # the thread is gone, or the permission went away: it runs on as it is


class Yielding:
    """One background thread's lowered priority, which any thread may raise back.

    The worker calls :meth:`lower` when it starts and :meth:`finished` before it ends (after
    that its thread id may belong to someone else); a waiter calls :meth:`hurry`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tid: Optional[int] = None
        self._saved: Optional[Tuple[Optional[int], int]] = None
        self._hurried = False

    def lower(self) -> None:
        """Lower the calling thread's priority, unless someone already hurried it."""
        if not sys.platform.startswith("linux"):
            return
        with self._lock:
            if self._hurried:
                return
            tid = threading.get_native_id()
            self._saved = _lower(tid)
            self._tid = tid

    def hurry(self) -> None:
        """Give the thread its normal priority back (now and for the rest of its work)."""
        with self._lock:
            self._hurried = True
            tid, saved = self._tid, self._saved
            self._saved = None
            if tid is not None and saved is not None:
                _restore(tid, saved)

    def finished(self) -> None:
        """The worker is done: forget its thread id."""
        with self._lock:
            self._tid = None
            self._saved = None

    @property
    def hurried(self) -> bool:
        return self._hurried

    @property
    def thread_id(self) -> Optional[int]:
        """The worker's native thread id once :meth:`lower` ran, until :meth:`finished`."""
        with self._lock:
            return self._tid
