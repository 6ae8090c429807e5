"""``session-watchdog tail``: one compact line per new sample of a growing log."""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Deque, Dict, List, Optional

from session_watchdog.report.reading import (  # noqa: F401
    EXIT_OK,
    HANDLED_EVENTS,
    QUIET_EVENTS,
    ReportError,
    _dict,
    _int,
    _list,
    _num,
    _str,
)
from session_watchdog.report.summary import (  # noqa: F401
    _clock,
)

# --------------------------------------------------------------------------------------------
# tail


def format_sample(event: Dict[str, Any]) -> str:
    """One compact line for a ``sample`` event: elapsed, left, GPU util/mem, RAM, trainer."""
    parts = [_clock(_num(event.get("elapsed_s")), sign=True).rjust(10)]
    remaining = _num(event.get("remaining_s"))
    if remaining is not None:
        parts.append(f"left {_clock(remaining)}" if remaining >= 0 else f"over {_clock(-remaining)}")
    gpus = _list(event.get("gpus"))
    for position, raw in enumerate(gpus):
        gpu = _dict(raw)
        index = _int(gpu.get("index"))
        util = _num(gpu.get("util_pct"))
        used, total = _int(gpu.get("mem_used_bytes")), _int(gpu.get("mem_total_bytes"))
        mem = "?" if used is None else f"{used / 2**30:.1f}"
        if total is not None:
            mem += f"/{total / 2**30:.0f}G"
        parts.append(f"GPU{position if index is None else index} "
                     f"{'?' if util is None else f'{util:.0f}'}% {mem}")
    if not gpus:
        parts.append("GPU -")
    ram = _dict(event.get("ram"))
    available = _int(ram.get("available_bytes"))
    parts.append("RAM " + ("?" if available is None else f"{available / 2**30:.1f}G") + " avail")
    trainer = _dict(event.get("trainer"))
    if trainer.get("alive") is True or trainer.get("state") is not None:
        state = _str(trainer.get("state")) or "alive"
        step = _int(trainer.get("step"))
        parts.append(f"trainer {state}" + ("" if step is None else f" step {step}")
                     + ("" if trainer.get("alive") is not False else " (exited)"))
    else:
        parts.append("no trainer")
    return "  ".join(parts)


def _format_marker(event: Dict[str, Any], at_s: Optional[float]) -> Optional[str]:
    name = event.get("event")
    kind = _str(event.get("kind") if name == "decision" else event.get("step"))
    if kind is None:
        return None
    bits = [_clock(at_s, sign=True).rjust(10), f"{name} {kind}"]
    if _str(event.get("action")):
        bits.append(str(event["action"]))
    if _str(event.get("reason")):
        bits.append(f"({event['reason']})")
    message = _str(event.get("message")) or _str(event.get("error"))
    if message:
        bits.append(message)
    return "  ".join(bits)


class _Follower:
    """Reads complete new lines of a growing file; follows it across rotation (a new inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: Optional[IO[bytes]] = None
        self.inode: Optional[int] = None
        self.partial = b""

    def _open(self) -> bool:
        try:
            self.fh = open(self.path, "rb")
        except FileNotFoundError:
            return False
        self.inode = os.fstat(self.fh.fileno()).st_ino
        self.partial = b""
        return True

    def read(self) -> List[bytes]:
        if self.fh is None and not self._open():
            return []
        assert self.fh is not None
        lines = self._drain()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return lines  # rotated away, the new file not there yet: keep the old one open
        if st.st_ino != self.inode or st.st_size < self.fh.tell():
            self.fh.close()  # the old file was read to its end above
            if self._open():
                lines += self._drain()
        return lines

    def _drain(self) -> List[bytes]:
        assert self.fh is not None
        data = self.fh.read()
        if not data:
            return []
        *complete, self.partial = (self.partial + data).split(b"\n")
        return complete

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def tail(path: Path, *, follow: bool = False, for_s: Optional[float] = None, lines: int = 10,
         out: Optional[IO[str]] = None, err: Optional[IO[str]] = None, poll_s: float = 0.5,
         clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the last ``lines`` samples (and decisions/actions); with ``follow``, every new one.

    ``follow`` stops on Ctrl-C or after ``for_s`` seconds. Bad lines are counted, never raised.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    follower = _Follower(Path(path))
    if not follow and not Path(path).exists():
        raise ReportError(f"no such log file: {path}")
    skipped = {"invalid": 0, "unknown": 0}
    last_elapsed: List[Optional[float]] = [None]

    def render(raw: bytes) -> Optional[str]:
        if not raw.strip(b" \t\r\x00"):
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            skipped["invalid"] += 1
            return None
        name = obj.get("event")
        if name == "sample":
            last_elapsed[0] = _num(obj.get("elapsed_s"))
            return format_sample(obj)
        if name in ("decision", "action"):
            return _format_marker(obj, last_elapsed[0])
        if name not in HANDLED_EVENTS and name not in QUIET_EVENTS:
            skipped["unknown"] += 1
        return None

    deadline = None if for_s is None else clock() + for_s
    try:
        backlog: Deque[str] = collections.deque(maxlen=max(0, lines))
        for raw in follower.read():
            text = render(raw)
            if text is not None:
                backlog.append(text)
        for text in backlog:
            print(text, file=out, flush=True)
        while follow and (deadline is None or clock() < deadline):
            sleep(poll_s)
            for raw in follower.read():
                text = render(raw)
                if text is not None:
                    print(text, file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
    torn = 1 if follower.partial.strip(b" \t\r\x00") else 0
    notes = [f"{n} {what}" for n, what in ((torn, "torn line"),
                                           (skipped["invalid"], "invalid lines"),
                                           (skipped["unknown"], "unknown events")) if n]
    if notes:
        print(f"session-watchdog tail: skipped {', '.join(notes)}", file=err)
    return EXIT_OK


