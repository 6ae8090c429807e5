"""The readings of one tick: immutable data only, shared by the probes, the policy and the log.

Unknown is ``None``, never a fake 0: an unknown GPU reading must not look idle (STYLE.md #2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from session_watchdog import channel

# --------------------------------------------------------------------------------------------
# Readings


@dataclass(frozen=True)
class GpuReading:
    """One GPU; ``nvidia-smi --query-gpu=index,name,uuid,utilization.gpu,memory.used,...``."""

    index: int
    name: Optional[str] = None
    uuid: Optional[str] = None
    utilization_pct: Optional[float] = None
    memory_used_bytes: Optional[int] = None
    memory_total_bytes: Optional[int] = None
    temperature_c: Optional[float] = None
    power_w: Optional[float] = None
    error: Optional[str] = None  # why this GPU could not be read at all
    process_pids: Optional[Tuple[int, ...]] = None  # compute processes; None: not read this tick


@dataclass(frozen=True)
class HostReading:
    """RAM as the kernel will enforce it (cgroup limit when there is one; ``free -b`` otherwise)."""

    ram_total_bytes: int
    ram_available_bytes: int
    ram_source: str  # "cgroup2" | "cgroup1" | "host"
    swap_used_bytes: Optional[int] = None
    swap_total_bytes: Optional[int] = None
    cpu_pct: Optional[float] = None
    oom_kills: Optional[int] = None  # cgroup memory.events oom_kill counter


@dataclass(frozen=True)
class DiskReading:
    """``df -B1 PATH``: free bytes for an unprivileged writer, and the total."""

    path: str
    free_bytes: Optional[int]
    total_bytes: Optional[int]
    error: Optional[str] = None


@dataclass(frozen=True)
class TrainerReading:
    alive: bool  # some process holds run.lock
    saving: bool  # some process holds save.lock
    status: Optional[channel.TrainerStatus] = None
    status_error: Optional[str] = None


@dataclass(frozen=True)
class Sample:
    """Everything the policy sees in one tick, ``now`` included (policy reads no clock)."""

    now: float  # wall clock, epoch seconds (for logs and request deadlines)
    elapsed_s: float  # session clock: seconds since the session started (monotonic-based)
    gpus: Tuple[GpuReading, ...] = ()
    nvml: str = "unavailable"  # "ok" | "unavailable: <why>" | "timeout"
    host: Optional[HostReading] = None
    disks: Tuple[DiskReading, ...] = ()
    trainer: TrainerReading = field(default_factory=lambda: TrainerReading(False, False))
    notebook_idle_s: Optional[float] = None  # seconds with no cell running; None outside notebooks
    child_exit: Optional[int] = None  # wrapped/attached process exit code once it ended
    child_running: bool = False  # a wrapped/attached process is still running
    child_traceback: Optional[str] = None  # a failed wrapped command's stderr tail (issue 15)
    notice_deadline: Optional[float] = None  # a preemption notice's deadline (wall clock)
    notice_source: Optional[str] = None  # aws-spot | gcp | slurm | slurm-signal


@dataclass(frozen=True)
class Times:
    now: float
    elapsed_s: float
