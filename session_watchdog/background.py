"""A background trainer started from a notebook that survives Ctrl-C and kernel restarts.

Jupyter interrupts the kernel's whole process group (``jupyter_client`` sends SIGINT with
``killpg``), and a restart kills that group: a trainer started with a plain ``subprocess.Popen``
from a cell is in it and dies with the interrupt, losing the work since its last checkpoint
(issue 16). ``!nohup python train.py &`` is refused by IPython ("Background processes not
supported"). :func:`start_process` starts the command in its own session (``setsid``), with no
terminal input and its output in a log file, like ``session-watchdog run`` starts its child.

The notebook wires the process into the watchdog (see :func:`session_watchdog.notebook.launch`);
this module only starts and describes it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

from session_watchdog import wrap

__all__ = ["Launched", "start_process", "default_output_path"]


class Launched:
    """A command started by :func:`start_process`.

    Attributes:
        argv: the command.
        pid: its process id (the leader of its own session and process group).
        output: the file its stdout and stderr go to.
        started_wall: wall-clock epoch seconds just before it started (a trainer.json written by
            it has a later heartbeat; an older one is from an earlier run).
    """

    def __init__(self, proc: subprocess.Popen[bytes], argv: Sequence[str], output: Path,
                 started_wall: float) -> None:
        self.proc = proc
        self.argv = list(argv)
        self.pid = proc.pid
        self.output = output
        self.started_wall = started_wall

    @property
    def running(self) -> bool:
        """True until the process has exited (it is reaped here, so no zombie stays)."""
        return self.proc.poll() is None

    def exit_code(self) -> Optional[int]:
        """None while it runs; then its exit status as a shell reports it (signal N -> 128 + N)."""
        code = self.proc.poll()
        return None if code is None else wrap.exit_code(code)

    def tail(self, lines: int = 10) -> List[str]:
        """The last ``lines`` lines of its output file (empty when unreadable)."""
        try:
            with open(self.output, "rb") as fh:
                last = deque(fh, maxlen=max(0, lines))
        except OSError:
            return []
        return [raw.decode("utf-8", "replace").rstrip("\r\n") for raw in last]

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.exit_code()}"
        return f"<launched pid {self.pid} {state}: {' '.join(self.argv)}; output {self.output}>"


def default_output_path(log_file: Optional[Path], run_dir: Path, now: float) -> Path:
    """``train-YYYYmmdd-HHMMSS.log`` next to the watchdog's log (persistent storage when the log
    is there), else in the run directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    folder = log_file.parent if log_file is not None else run_dir
    return folder / f"train-{stamp}.log"


def start_process(argv: Sequence[str], *, run_dir: Path, output: Path,
                  cwd: Optional[Union[str, Path]] = None,
                  env: Optional[Mapping[str, str]] = None) -> Launched:
    """Start ``argv`` in its own session, output appended to ``output``, run dir in its env.

    Raises:
        ValueError: an empty command or one that is a single string (pass a list).
        OSError: the command or the output file cannot be opened.
    """
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError(f"launch({argv!r}): expected the command as a non-empty list of "
                         "arguments, e.g. ['python', 'train.py']")
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(output, "ab") as out:
        proc = subprocess.Popen(
            [os.fspath(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, cwd=cwd, env=wrap.child_env(run_dir, env),
            start_new_session=True, close_fds=True)
    return Launched(proc, argv, output, started)
