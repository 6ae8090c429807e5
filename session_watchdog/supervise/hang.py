"""What a hung trainer is doing: every thread's Python stack (and native frames with py-spy).

The trainer registers ``faulthandler`` on SIGUSR2 (trainer/stacks.py) and says so in
``trainer.json`` (``extra["stacks"] = {signal, file}``). We signal only that very process
(actions.signal_trainer: pid + create time + same user) and log what it appended to the file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Optional

from session_watchdog import channel
from session_watchdog.log import get_logger

log = get_logger()
STACKS_WAIT_S = 3.0  # faulthandler writes at once; a loaded machine may take a moment
STACKS_MAX_BYTES = 256 * 1024  # a trainer with hundreds of threads: keep the log readable
PY_SPY_TIMEOUT_S = 20.0


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def collect_stacks(status: channel.TrainerStatus, run_dir: channel.RunDir, *,
                   wait_s: float = STACKS_WAIT_S,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[str, Optional[str]]:
    """Ask the trainer for its stacks: (what happened, the text it wrote or None)."""
    from session_watchdog.actions import signal_trainer

    info = status.extra.get("stacks")
    if not isinstance(info, dict) or not isinstance(info.get("file"), str):
        return "no-handler", None
    path = info["file"]
    if os.path.realpath(os.path.dirname(path)) != os.path.realpath(run_dir.path):
        # trainer.json is a claim: read nothing outside the run dir on its word (#18)
        return "refused", None
    before = _size(path)
    sent = signal_trainer(status, run_dir, signal.SIGUSR2, handler="stacks")
    if sent != "sent":
        return sent, None
    deadline = time.monotonic() + wait_s
    last = -1
    while time.monotonic() < deadline:
        now = _size(path)
        if now > before and now == last:  # grown, and settled since the last look
            break
        last = now
        sleep(0.1)
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as fh:
            fh.seek(before)
            text = fh.read(STACKS_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError as err:
        return f"unreadable: {err.strerror or err}", None
    return sent, text or None


def py_spy_dump(pid: int) -> Optional[str]:
    """``py-spy dump --native --pid PID`` when py-spy is installed (native frames too), else None."""
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "dump", "--native", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=PY_SPY_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return f"py-spy failed: {err}"
    return (proc.stdout or proc.stderr)[:STACKS_MAX_BYTES]


def log_stacks(status: channel.TrainerStatus, run_dir: channel.RunDir) -> Optional[str]:
    """Log the hung trainer's stacks as a ``trainer_stacks`` event; return the text."""
    sent, text = collect_stacks(status, run_dir)
    native = py_spy_dump(status.pid) if sent == "sent" else None
    log.warning("trainer_stacks", pid=status.pid, step=status.step, signal=sent,
                file=(status.extra.get("stacks") or {}).get("file"), stacks=text,
                native=native,
                message="Python stacks of every trainer thread" if text else
                        f"no stacks from the trainer ({sent})")
    return text
