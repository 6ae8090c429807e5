"""Fakes at our own boundaries: a scripted probe, a fake clock, sample builders (STYLE.md #4)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from session_watchdog import channel
from session_watchdog.probes import (
    DiskReading,
    GpuReading,
    HostReading,
    Sample,
    Times,
    TrainerReading,
)

GiB = 2**30


class FakeClock:
    """Wall and monotonic time that move only when told."""

    def __init__(self, wall: float = 1_800_000_000.0, mono: float = 1000.0) -> None:
        self._wall = wall
        self._mono = mono

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds


class ScriptedProbe:
    """Returns scripted samples in order (the last one repeats), stamped with the daemon's times.

    An entry may be an Exception instance: that tick's probe raises it.
    """

    def __init__(self, script: Iterable[object]) -> None:
        self.script: List[object] = list(script)
        self.calls = 0

    def sample(self, times: Times) -> Sample:
        entry = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(entry, BaseException):
            raise entry
        assert isinstance(entry, Sample)
        return dataclasses.replace(entry, now=times.now, elapsed_s=times.elapsed_s)


def gpu(index: int = 0, util: Optional[float] = 90.0, used: Optional[int] = 10 * GiB,
        total: Optional[int] = 80 * GiB) -> GpuReading:
    return GpuReading(index=index, name="NVIDIA Test", uuid=f"GPU-{index}", utilization_pct=util,
                      memory_used_bytes=used, memory_total_bytes=total, temperature_c=60.0,
                      power_w=300.0)


def host(total: int = 16 * GiB, available: int = 8 * GiB, oom: Optional[int] = 0) -> HostReading:
    return HostReading(total, available, "cgroup2", 0, 0, 50.0, oom)


def status(*, pid: int = 4242, start_time: float = 1.0, state: str = "running", step: int = 100,
           epoch: int = 1, step_time_s: Optional[float] = 0.5, acked_seq: int = 0,
           heartbeat: float = 0.0, ckpt_at: Optional[float] = None, ckpt_duration_s: float = 20.0,
           ckpt_bytes: int = 2 * GiB, ckpt_seq: Optional[int] = None,
           extra: Optional[dict] = None) -> channel.TrainerStatus:
    ckpt = None
    if ckpt_at is not None:
        ckpt = channel.CheckpointInfo(path="/ckpt/ckpt-1.pt", seq=ckpt_seq, step=step, at=ckpt_at,
                                      duration_s=ckpt_duration_s, bytes=ckpt_bytes, sha256="ab" * 32)
    return channel.TrainerStatus(pid=pid, start_time=start_time, state=state, step=step, epoch=epoch,
                                 step_time_s=step_time_s, acked_seq=acked_seq, last_checkpoint=ckpt,
                                 heartbeat=heartbeat, extra=extra or {})


def sample(*, now: float = 1_800_000_000.0, elapsed: float = 0.0,
           gpus: Sequence[GpuReading] = (), nvml: str = "ok", host_reading: Optional[HostReading] = None,
           disks: Sequence[DiskReading] = (), alive: bool = True, saving: bool = False,
           trainer_status: Optional[channel.TrainerStatus] = None,
           notebook_idle_s: Optional[float] = None, child_exit: Optional[int] = None) -> Sample:
    return Sample(now=now, elapsed_s=elapsed, gpus=tuple(gpus), nvml=nvml,
                  host=host_reading if host_reading is not None else host(),
                  disks=tuple(disks), trainer=TrainerReading(alive, saving, trainer_status),
                  notebook_idle_s=notebook_idle_s, child_exit=child_exit)


def write_checkpoint(directory: Path, payload: bytes = b"weights" * 1000, step: int = 500,
                     at: float = 1_800_000_000.0,
                     name: Optional[str] = None) -> channel.CheckpointInfo:
    """A checkpoint file (``name``, default ``ckpt-<step>.pt``) and its commit marker, as the
    trainer side writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"ckpt-{step:010d}.pt")
    path.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    channel.write_json(Path(str(path) + ".sha256"), {"v": 1, "file": path.name, "sha256": digest,
                                                     "bytes": len(payload), "step": step})
    return channel.CheckpointInfo(str(path), None, step, at, 1.0, len(payload), digest)
