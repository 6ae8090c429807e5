"""Child-process helpers for the checkpoint tests: fork a real process, hear from it, kill it.

The children are forked from the test process (which has torch imported already) instead of
started with a fresh interpreter: importing torch costs ~2 s, and the kill loops start dozens of
children. A forked child is still a separate process that the kernel kills with SIGKILL mid-write.
The children never run parallel (OpenMP) torch kernels, which are unsafe after fork.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

# One report = (kind, value), two little-endian int64: 16 bytes, far below PIPE_BUF, so a write
# is atomic and a killed child never leaves half a report in the pipe.
_REPORT = struct.Struct("<qq")
RESUMED = 0  # value: the generation the child resumed from (0: nothing to resume)
COMMITTED = 1  # value: the generation whose save() just returned


@dataclass
class Child:
    """A forked child and the read end of its report pipe."""

    pid: int
    fd: int
    _buffer: bytes = b""

    def wait_report(self, timeout: float) -> Optional[Tuple[int, int]]:
        """Block until one report arrives (None on timeout or EOF); the report is consumed."""
        deadline = time.monotonic() + timeout
        while len(self._buffer) < _REPORT.size:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        head, self._buffer = self._buffer[: _REPORT.size], self._buffer[_REPORT.size :]
        kind, value = _REPORT.unpack(head)
        return kind, value

    def kill_and_collect(self) -> List[Tuple[int, int]]:
        """SIGKILL the child, reap it, and return every report it left in the pipe."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.reap()

    def reap(self) -> List[Tuple[int, int]]:
        """Wait for the child to end and return the reports not yet consumed."""
        os.waitpid(self.pid, 0)
        data = self._buffer
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            data += chunk
        os.close(self.fd)
        whole = len(data) - len(data) % _REPORT.size
        return [_REPORT.unpack_from(data, i) for i in range(0, whole, _REPORT.size)]


def send(fd: int, kind: int, value: int) -> None:
    """Child side: write one report."""
    os.write(fd, _REPORT.pack(kind, value))


def fork_child(body: Callable[[int], None]) -> Child:
    """Fork; the child runs ``body(report_fd)`` and exits (1 on an exception, traceback on stderr)."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that fork() in a multi-threaded process may deadlock; the children
        # here only do file I/O and single-threaded torch work.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(read_fd)
            body(write_fd)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    return Child(pid, read_fd)


def run_child(body: Callable[[int], None], timeout: float = 60.0) -> Tuple[int, bytes]:
    """Fork ``body(fd)``, let it finish, return (exit code, everything it wrote to fd)."""
    child = fork_child(body)
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([child.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(child.pid, signal.SIGKILL)
            break
        chunk = os.read(child.fd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(child.fd)
    _, status = os.waitpid(child.pid, 0)
    return os.waitstatus_to_exitcode(status), data
