"""Python stacks of every trainer thread on demand, for the daemon's hang report (issue 13).

``faulthandler`` dumps the stacks from its C-level signal handler, without the GIL, so it works
while a thread sleeps holding the step or a collective never returns. The dump goes to
``<run_dir>/stacks-<pid>.txt``; the daemon sends :data:`STACKS_SIGNAL` and logs what was added.
Nothing to install: faulthandler is in the standard library.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from pathlib import Path
from typing import IO, Any, Dict, Optional

STACKS_SIGNAL = signal.SIGUSR2  # SIGUSR1 is the wake-up; SLURM and Lightning use SIGUSR1 too


class StackDump:
    """faulthandler on :data:`STACKS_SIGNAL`, writing to ``<run_dir>/stacks-<pid>.txt``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / f"stacks-{os.getpid()}.txt"
        self._file: Optional[IO[str]] = None

    def register(self) -> Optional[Dict[str, Any]]:
        """Register; what trainer.json says about it (``extra["stacks"]``), None when skipped.

        Skipped when someone else handles the signal already: their handler wins.
        """
        current = signal.getsignal(STACKS_SIGNAL)
        if current not in (signal.SIG_DFL, None):
            return None
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        self._file = os.fdopen(fd, "a")
        faulthandler.register(STACKS_SIGNAL, file=self._file, all_threads=True, chain=False)
        return {"signal": STACKS_SIGNAL.name, "file": str(self.path)}

    def unregister(self) -> None:
        if self._file is None:
            return
        faulthandler.unregister(STACKS_SIGNAL)
        self._file.close()
        self._file = None
        try:
            if self.path.stat().st_size == 0:
                self.path.unlink()  # never needed: leave no litter
        except OSError:
            pass
