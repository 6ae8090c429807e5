"""Who may receive our signals: a process the kernel proves to be the trainer (or the daemon).

A file in the run dir is a claim, not a proof (#18): a forged or stale ``trainer.json`` or
``daemon.json`` can name PID 1, an unrelated process, or the daemon itself. A pid is signalled
only when

- it is a plain process number above 1, not our own, and owned by our effective uid, and
- the kernel says it holds the protocol's lock: one of its open files is ``run.lock`` (for the
  trainer) or ``daemon.lock`` (for the daemon) and ``/proc/<pid>/fdinfo/<fd>`` lists an flock on
  it. An flock belongs to an open file description, so a process that inherited the descriptor
  across fork holds it as well (``/proc/locks`` would name only the process that took it), or
- (trainer only) it is in the process group of the command we wrapped ourselves.

The signal goes through a pidfd opened *before* the proof, so a pid reused after the proof
receives nothing. Standard library only; Linux ``/proc`` (elsewhere every pid is refused).
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from typing import Any, Callable, Optional

from session_watchdog import channel

PID_MAX = 4_194_304  # the kernel's PID_MAX_LIMIT: no pid is larger


def _proc_pid(pid: Any) -> Optional[str]:
    """A refusal for a pid that is never ours to signal, whoever holds what; None when it may be."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        return f"pid {str(pid)[:40]!r} is not a process id"
    if pid <= 1:
        return f"pid {pid} is never signalled (init or a process group)"
    if pid > PID_MAX:
        return f"pid {str(pid)[:20]}{'...' if pid >= 10**20 else ''} is above the kernel's pid limit"
    if pid == os.getpid():
        return f"pid {pid} is this watchdog itself"
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return f"pid {pid} does not exist"
    except OSError as err:
        return f"pid {pid} cannot be inspected ({err.strerror})"
    if owner != os.geteuid():
        return f"pid {pid} belongs to uid {owner}, not to us (uid {os.geteuid()})"
    return None


def _lock_identity(lock: Path, dir_fd: Optional[int]) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(lock.name if dir_fd is not None else lock, dir_fd=dir_fd,
                     follow_symlinks=False)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def holds_flock(pid: int, lock: Path, dir_fd: Optional[int] = None) -> Optional[str]:
    """None when process ``pid`` has ``lock`` open with an flock on it; else why not.

    ``dir_fd``: the run directory held open (``RunDir.fd``); ``lock``'s name is looked up there.
    """
    target = _lock_identity(lock, dir_fd)
    if target is None:
        return f"{lock} is missing or not a regular file"
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError as err:
        return f"pid {pid}'s open files cannot be read ({err.strerror})"
    for fd in fds:
        try:
            st = os.stat(f"{fd_dir}/{fd}")  # follows the magic link to the open file itself
        except OSError:
            continue  # closed meanwhile
        if (st.st_dev, st.st_ino) != target:
            continue
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:
                info = fh.read(64 * 1024)
        except OSError:
            continue
        if any(line.startswith("lock:") and " FLOCK " in line for line in info.splitlines()):
            return None
    return f"pid {pid} does not hold {lock.name}"


def trainer_pid_proven(run_dir: channel.RunDir, pid: Any,
                       child_pgid: Optional[int] = None) -> Optional[str]:
    """None when ``pid`` is provably the trainer of ``run_dir``; else the refusal reason.

    Proof: ``pid`` holds ``run.lock`` (kernel flock, see module doc), or ``pid`` is in
    ``child_pgid``, the process group of the command this watchdog started itself.
    """
    refusal = _proc_pid(pid)
    if refusal is not None:
        return refusal
    if child_pgid is not None and child_pgid > 1:
        try:
            if os.getpgid(pid) == child_pgid:
                return None
        except OSError:
            pass
    return holds_flock(pid, run_dir.file(channel.RUN_LOCK), run_dir.fd)


def daemon_pid_proven(run_dir: Path, pid: Any, dir_fd: Optional[int] = None) -> Optional[str]:
    """None when ``pid`` is provably the watchdog of ``run_dir`` (it holds ``daemon.lock``)."""
    refusal = _proc_pid(pid)
    if refusal is not None:
        return refusal
    return holds_flock(pid, Path(run_dir) / channel.DAEMON_LOCK, dir_fd)


def send_proven(pid: Any, sig: int, prove: Callable[[], Optional[str]]) -> Optional[str]:
    """Send ``sig`` to ``pid`` only if ``prove()`` returns None; return the refusal otherwise.

    The pid is pinned with a pidfd before the proof: if the process exits and its number is
    reused between the proof and the signal, the signal fails (ProcessLookupError) instead of
    reaching the newcomer. Raises ProcessLookupError when the process is gone.
    """
    refusal = _proc_pid(pid)
    if refusal is not None:
        return refusal
    pidfd: Optional[int] = None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (AttributeError, OSError):
        pidfd = None  # kernel < 5.3: the proof and the kill are as close as we can make them
    try:
        refusal = prove()
        if refusal is not None:
            return refusal
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
        return None
    finally:
        if pidfd is not None:
            os.close(pidfd)
