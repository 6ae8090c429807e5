"""The names a Session and its parts share: exit status, exceptions, ``Start``, the step-boundary
flags, the defaults, duration arguments and the event log (stdlib logging).

Importable from ``session_watchdog.trainer.session`` as before; this module imports no torch.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Union

from session_watchdog.channel import Request, RunDir
from session_watchdog.config import parse_duration

if TYPE_CHECKING:  # torch is imported with the checkpoint module, only when a Session is built
    from session_watchdog.trainer.checkpoint import SavedCheckpoint

__all__ = [
    "EXIT_STOPPED",
    "SessionError",
    "SessionExit",
    "Start",
    "StopTraining",
]

EXIT_STOPPED = 75
"""Exit status of a script stopped on request after a durable checkpoint (EX_TEMPFAIL: resumable)."""

DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_CHECKPOINT_EVERY_S = 30 * 60.0
DEFAULT_RETRY_AFTER_S = 30.0
DEFAULT_MIRROR_WAIT_S = 300.0  # complete() / a stop wait this long at most for the mirror
_STEP_TIME_EMA_ALPHA = 0.3  # weight of the newest step-time sample (one per poll with progress)
_RUN_LOCK_WAIT_S = 30.0  # the daemon holds run.lock exclusively only briefly, before ending
_SESSION_EXTRAS_KEY = "session_watchdog"  # our bookkeeping inside the checkpoint's extras
DEFAULT_SYNC_EVERY = 50  # steps between two agreements of the ranks (distributed.py)
DEFAULT_SYNC_INTERVAL_S = 10.0  # ... or fewer steps, when 50 would take longer than this
_NEVER = sys.maxsize  # _sync_at of a single process: step() never reaches it

# The name the Session has always logged under (session.py): users and tests filter on it.
_log = logging.getLogger("session_watchdog.trainer.session")

RunDirLike = Union[str, "os.PathLike[str]", RunDir]
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


def _event(level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with fields: stdlib logging (structlog costs ~0.1 s to import in a trainer).

    The record carries ``record.event`` and ``record.fields`` so tests assert on data, not text.
    """
    if _log.isEnabledFor(level):
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        _log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


class SessionError(Exception):
    """The session cannot start (run directory locked, bad arguments)."""


class StopTraining(Exception):
    """Raised by ``step()`` on a stop when ``exit_on_stop=False`` (notebooks): leave the loop.

    Attributes:
        reason: why training stopped ("request:<daemon reason>", "SIGTERM", "SIGUSR1").
        checkpoint: the durable checkpoint written for the stop.
    """

    def __init__(self, reason: str, checkpoint: SavedCheckpoint) -> None:
        super().__init__(f"training stopped ({reason}) at step {checkpoint.step}; "
                         f"checkpoint {checkpoint.path}")
        self.reason = reason
        self.checkpoint = checkpoint


class SessionExit(SystemExit):
    """Raised by ``step()`` on a stop when ``exit_on_stop=True``: exits with :data:`EXIT_STOPPED`."""

    def __init__(self, reason: str, checkpoint: SavedCheckpoint) -> None:
        super().__init__(EXIT_STOPPED)
        self.reason = reason
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Start:
    """Where training starts: from scratch or from the newest verified checkpoint.

    Attributes:
        epoch: the epoch to start in.
        step: the global step counter (steps already done in all epochs).
        elapsed_s: training time accumulated before this start, in seconds.
        resumed: whether a checkpoint was loaded.
        path: the checkpoint loaded, or None.
        batch: steps already done inside ``epoch``; skip that many batches of it.
        extras: what the loop stored in ``session.extras`` before the checkpoint.
    """

    epoch: int
    step: int
    elapsed_s: float
    resumed: bool
    path: Optional[Path]
    batch: int = 0
    extras: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Flags:
    """What to do at this step boundary (the unit that ranks agree on, see ``_agree``).

    ``code`` ranks the reason (distributed.NOTHING .. SIGTERM_STOP); ``ack_seq`` is the request
    the checkpoint answers (after an agreement: the newest one any rank of this run dir saw).
    """

    save: bool
    stop: bool
    request: Optional[Request]
    reason: str
    code: int = 0
    ack_seq: Optional[int] = None


def _seconds(name: str, value: Any, *, off: Optional[str] = None) -> Any:
    """A Session duration: seconds (a number) or a string like ``"30m"``; None/``"off"`` when
    ``off`` says what that means. Parsed by the daemon's own parser (issue 11: ``"30m"`` was a
    TypeError here while the daemon took it)."""
    if off is not None and (value is None or (isinstance(value, str)
                                              and value.strip().lower() == "off")):
        return None
    try:
        return parse_duration(value)
    except ValueError as err:
        text = str(err)
        if "has no unit" not in text:
            text = "expected a positive number of seconds or a duration like '30m'"
        if off is not None:
            text += f" (None or 'off' to {off})"
        raise ValueError(f"Session({name}={value!r}): {text}") from None


def _snapshot_every(value: Any) -> Tuple[Optional[int], Optional[float]]:
    """``snapshot_every``: an int is steps, a string (or float) a duration; None/"off": off."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None, None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"Session(snapshot_every={value!r}): expected at least 1 step, or a "
                             "duration like '1m'")
        return value, None
    return None, float(_seconds("snapshot_every", value, off="turn snapshots off"))
