"""Carry out the policy's decisions: write requests, wake the trainer, report warnings.

Thin and replaceable: the daemon takes an ``Actions`` object in its constructor, tests pass their
own. Nothing here decides anything.
"""

from __future__ import annotations

import os
import signal
from typing import Any, List, Optional

import psutil

from session_watchdog import channel
from session_watchdog.log import get_logger
from session_watchdog.policy import Decision
from session_watchdog.probes import Sample

log = get_logger()


def signal_trainer(status: channel.TrainerStatus, sig: int = signal.SIGUSR1) -> str:
    """Send ``sig`` to the trainer only if it is the same process that wrote its status.

    Identity = pid + create time (psutil's rule: a reused pid is a different process), and the
    same user. Returns what happened: sent | gone | reused | foreign | no-handler.
    """
    if not status.extra.get("sigusr1"):
        # SIGUSR1's default action kills the process: only signal a trainer that said it
        # installed a handler (notebook threads cannot; they rely on the poller).
        return "no-handler"
    try:
        proc = psutil.Process(status.pid)
        if abs(proc.create_time() - status.start_time) > 0.05:
            return "reused"
        if proc.uids().real != os.getuid():
            return "foreign"
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.AccessDenied:
        return "foreign"
    return "sent"


class Actions:
    """The daemon's hands for issue-2 decisions (requests and warnings)."""

    def __init__(self, run_dir: channel.RunDir, dry_run: bool = False) -> None:
        self.run_dir = run_dir
        self.dry_run = dry_run

    def apply(self, decisions: List[Decision], sample: Sample) -> None:
        for decision in decisions:
            self._log_decision(decision)
            if decision.kind in ("request", "resend"):
                self.send_request(decision, sample)

    @staticmethod
    def _log_decision(d: Decision) -> None:
        fields: dict[str, Any] = {"kind": d.kind, "reason": d.reason, "message": d.message}
        if d.action is not None:
            fields.update(action=d.action, seq=d.seq, deadline=d.deadline)
        fields.update(d.data)
        log.info("decision", **fields)

    def send_request(self, d: Decision, sample: Sample) -> None:
        assert d.seq is not None and d.action is not None  # requests always carry both
        request = channel.Request(d.seq, d.action, d.reason, d.deadline, sample.now)
        try:
            self.run_dir.write_request(request)
        except OSError as err:
            log.error("action", step="request_write_failed", reason=d.reason, seq=d.seq,
                      error=f"{err.strerror or err} ({self.run_dir.file(channel.REQUEST_FILE)})")
            return
        woke: Optional[str] = None
        status = sample.trainer.status
        if status is not None and sample.trainer.alive:
            woke = signal_trainer(status)
        log.info("action", step="request_written", reason=d.reason, action=d.action, seq=d.seq,
                 deadline=d.deadline, signal=woke)
