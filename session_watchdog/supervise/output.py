"""The wrapped command's stderr: passed through unchanged, its tail kept for the failure message.

``session-watchdog run -- python train.py`` used to let the command inherit our stderr, so a
plain script's traceback never reached the "training failed" notification (issue 15). Now:

- our stderr is a terminal: the command gets a pseudo-terminal for its stderr (it still sees a
  tty: tqdm's bars, colours, the terminal's width), and a thread copies the bytes to our stderr;
- our stderr is a regular file (``run --detach`` writes to ``<log>.out``; ``nohup``; ``2> f``):
  the command writes to that file itself, and its tail is read back from the file;
- anything else (a pipe, /dev/null): a pipe, copied by the same thread.

Bytes are copied as they come (``\\r`` progress lines keep working) on one thread, never in a
tick; the last :data:`TAIL_BYTES` are kept in memory. :meth:`Tee.drain` reads what the pipe
still holds, so nothing the command wrote before it exited is missing from our stderr or from
the tail. The command's stdin and stdout are not touched.

The trade-off of a pipe: a watchdog killed with SIGKILL takes the pipe's reader with it, and the
command's later writes to stderr fail (EPIPE/EIO), like writes to a closed terminal's stdout.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import stat
import struct
import termios
import threading
import time
from typing import List, Optional

TAIL_BYTES = 64 * 1024  # what is kept of the command's stderr
TRACEBACK_LINES = 15  # the failure message's traceback tail, at most
TRACEBACK_CHARS = 2000
LAST_LINES = 5  # without a traceback: this many last non-empty lines
DRAIN_S = 2.0  # at most this long reading what the pipe still holds (a grandchild may keep writing)
READ_BYTES = 64 * 1024
HEADER = "Traceback (most recent call last):"
OWN_LINES = ("[session-watchdog ", "session-watchdog: ")  # what the watchdog itself prints
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


class Tee:
    """A pipe or pseudo-terminal for the command's stderr; a thread copies it to ``dest_fd``."""

    def __init__(self, dest_fd: int = 2, *, tty: Optional[bool] = None) -> None:
        self.dest_fd = dest_fd
        self.tty = os.isatty(dest_fd) if tty is None else tty
        if self.tty:
            self.read_fd, self.child_fd = os.openpty()
            _same_size(dest_fd, self.child_fd)
            # Bytes pass unchanged: the pseudo-terminal does no output processing ("\n" stays
            # "\n"); our own terminal turns it into "\r\n" once, as if the command wrote to it.
            attrs = termios.tcgetattr(self.child_fd)
            attrs[1] &= ~termios.OPOST
            termios.tcsetattr(self.child_fd, termios.TCSANOW, attrs)
        else:
            self.read_fd, self.child_fd = os.pipe()
        os.set_inheritable(self.read_fd, False)
        os.set_blocking(self.read_fd, False)
        self._tail = bytearray()
        self._lock = threading.Lock()  # one reader at a time: the thread or drain()
        self._eof = False
        self._closed = False
        self._forwarding = True
        self._child_open = True  # the command's end, until started()
        self._thread = threading.Thread(target=self._run, name="session-watchdog-stderr", daemon=True)

    def started(self) -> None:
        """The command has its end of the pipe: close ours (EOF comes when the command's
        processes are gone) and start copying."""
        os.close(self.child_fd)
        self._child_open = False
        self._thread.start()

    def _run(self) -> None:
        size = _size(self.dest_fd) if self.tty else None
        while not self._eof and not self._closed:
            try:
                ready, _, _ = select.select([self.read_fd], [], [], 0.2)
            except (OSError, ValueError):  # closed under us by close()
                return
            if self.tty and _size(self.dest_fd) != size:
                # our terminal was resized: so is the command's (polled here rather than a
                # SIGWINCH handler: the signal handlers belong to the stop logic, issue 18)
                size = _size(self.dest_fd)
                with self._lock:
                    if not self._closed:
                        _same_size(self.dest_fd, self.read_fd)
            if ready:
                with self._lock:
                    if not self._closed:
                        self._pump(time.monotonic() + DRAIN_S)

    def _pump(self, deadline: float) -> None:
        """Read and copy what the pipe holds now (under ``_lock``), until empty or ``deadline``."""
        while not self._eof and time.monotonic() < deadline:
            try:
                data = os.read(self.read_fd, READ_BYTES)
            except BlockingIOError:
                return
            except OSError:  # EIO: a pseudo-terminal whose other side is closed (Linux's EOF)
                data = b""
            if not data:
                self._eof = True
                return
            self._tail += data  # kept before it is copied: a stuck destination loses no tail
            if len(self._tail) > TAIL_BYTES:
                del self._tail[:len(self._tail) - TAIL_BYTES]
            self._forward(data)

    def _forward(self, data: bytes) -> None:
        view = memoryview(data)
        while self._forwarding and view:
            try:
                view = view[os.write(self.dest_fd, view):]
            except BlockingIOError:
                select.select([], [self.dest_fd], [], 1.0)
            except OSError:
                # our stderr is gone (a closed terminal, a reader that left): keep reading, or
                # the command would block on a full pipe; keep the tail
                self._forwarding = False

    def drain(self, timeout_s: float = DRAIN_S) -> None:
        """Copy everything the pipe holds now; after the command exited, that is all it wrote.

        Bounded by ``timeout_s`` even when our stderr blocks (a terminal paused with Ctrl-S
        holds the copying thread in a write): a tick calls this.
        """
        # The copying thread does every read and write: a drain that wrote itself could block in
        # that write for as long as our stderr does. It waits until the pipe is empty; the tail
        # takes each chunk before the chunk is forwarded, under the lock.
        deadline = time.monotonic() + timeout_s
        while (self._thread.is_alive() and not self._eof and not self._closed
               and self._unread() > 0 and time.monotonic() < deadline):
            time.sleep(0.01)
        if self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._lock.release()  # a chunk the thread had just read is in the tail now

    def _unread(self) -> int:
        """Bytes the pipe or pseudo-terminal holds (0 once it is closed or at its end)."""
        try:
            return int(struct.unpack("i", fcntl.ioctl(self.read_fd, termios.FIONREAD, b"\0" * 4))[0])
        except OSError:
            return 0

    def text(self) -> str:
        """The kept tail, decoded."""
        return bytes(self._tail).decode("utf-8", "replace")  # bytes(): one copy, GIL-atomic

    def close(self) -> None:
        """Drain, stop the thread, close our end (the command's later writes fail).

        A copying thread stuck on a blocked stderr is left to the interpreter's exit.
        """
        self.drain()
        if not self._lock.acquire(timeout=DRAIN_S):
            return
        try:
            if self._closed:
                return
            self._closed = True
            os.close(self.read_fd)
            if self._child_open:  # the command never started
                os.close(self.child_fd)
                self._child_open = False
        finally:
            self._lock.release()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(1.0)


class FileTail:
    """Our stderr is a regular file: the command writes there itself; its part is read back."""

    def __init__(self, dest_fd: int = 2) -> None:
        self.dest_fd = dest_fd
        self.child_fd: Optional[int] = None  # inherit ours
        self.start = os.fstat(dest_fd).st_size  # what was there before the command is not its

    def started(self) -> None:
        pass

    def drain(self, timeout_s: float = DRAIN_S) -> None:
        pass  # the file holds every byte already

    def text(self) -> str:
        try:
            # fd 2 is open for writing only: open the same file again to read it (Linux)
            fd = os.open(f"/proc/self/fd/{self.dest_fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return ""
        try:
            size = os.fstat(fd).st_size
            begin = max(self.start, size - TAIL_BYTES)
            text = os.pread(fd, max(0, size - begin), begin).decode("utf-8", "replace")
        finally:
            os.close(fd)
        # the file is ours too: our own console lines (log.console_line) are not the command's
        return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(OWN_LINES))

    def close(self) -> None:
        pass


def capture(dest_fd: int = 2) -> Tee | FileTail:
    """How to keep the command's stderr: read back from our file, or through a :class:`Tee`."""
    try:
        if stat.S_ISREG(os.fstat(dest_fd).st_mode) and os.access(f"/proc/self/fd/{dest_fd}", os.R_OK):
            return FileTail(dest_fd)
    except OSError:
        pass
    return Tee(dest_fd)


def _size(tty_fd: int) -> Optional[bytes]:
    try:
        return fcntl.ioctl(tty_fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    except OSError:
        return None


def _same_size(tty_fd: int, pty_fd: int) -> None:
    """The pseudo-terminal gets our terminal's size (tqdm fits its bar to it)."""
    size = _size(tty_fd)
    if size is not None:
        try:
            fcntl.ioctl(pty_fd, termios.TIOCSWINSZ, size)
        except OSError:
            pass


# ---- the tail for a person: PURE ------------------------------------------------------------


def screen_lines(text: str) -> List[str]:
    """Lines as a terminal would show them: colours removed, a ``\\r`` overwrites its line."""
    out = []
    for raw in _ANSI.sub("", text).split("\n"):
        shown = [part for part in raw.split("\r") if part.strip()]
        out.append(shown[-1].rstrip() if shown else "")
    return out


def redact(text: str) -> str:
    """Credentials in URLs (``https://user:token@host``) never reach a message."""
    return _URL_USERINFO.sub(r"\1***@", text)


def traceback_tail(text: str, max_lines: int = TRACEBACK_LINES, max_chars: int = TRACEBACK_CHARS,
                   last_lines: int = LAST_LINES) -> Optional[str]:
    """The last Python traceback in ``text`` (header to end, at most ``max_lines``/``max_chars``),
    else its last ``last_lines`` non-empty lines; None when there is nothing to show.

    A traceback longer than ``max_lines`` keeps its header, "...", and the lines that end with
    the exception (``ValueError: ...``): the innermost frames and the error are what matter.
    """
    lines = screen_lines(text)
    starts = [i for i, line in enumerate(lines) if HEADER in line]
    if not starts:
        shown = [line for line in lines if line.strip()][-last_lines:]
        return _clip(shown, max_chars) if shown else None
    begin = starts[-1]
    body = lines[begin + 1:]
    while body and not body[-1].strip():
        body.pop()
    indent = len(lines[begin]) - len(lines[begin].lstrip())
    # the exception line: the first one after the frames at the header's indentation
    error = next((i for i, line in enumerate(body)
                  if line.strip() and len(line) - len(line.lstrip()) <= indent), len(body) - 1)
    if len(body) + 1 > max_lines:
        budget = max_lines - 2  # the header and one "..." line
        first = max(0, error + 1 - budget)
        kept = body[first:error + 1]
        kept += body[error + 1:][:budget - len(kept)]
        body = ["  ...", *kept] if first else [*kept, "  ..."]
    return _clip([lines[begin], *body], max_chars)


def _clip(lines: List[str], max_chars: int) -> str:
    text = redact("\n".join(lines))
    if len(text) <= max_chars:
        return text
    head = lines[0] if HEADER in lines[0] else ""
    keep = text[-(max_chars - len(head) - 5):]
    keep = keep.split("\n", 1)[-1] if "\n" in keep else keep
    return f"{head}\n...\n{keep}" if head else f"...\n{keep}"
