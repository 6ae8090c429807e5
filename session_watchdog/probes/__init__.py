"""Readings: NVML GPUs, host RAM (cgroup-aware), disks and the trainer -> one immutable Sample.

Unknown is ``None``, never a fake 0: an unknown GPU reading must not look idle (STYLE.md #2).
Every call that can hang (NVML on a wedged driver, ``statvfs`` on a stale Drive FUSE mount) runs
on one worker thread and is bounded by a timeout; a call still pending is reported, not waited on.

The package: :mod:`.readings` (GpuReading, HostReading, DiskReading, TrainerReading, Sample,
Times: data only), :mod:`.nvml` (Nvml, the heap trim after it starts, ``doctor``'s driver
summary, the pure GPU facts: all idle, ranks per GPU), :mod:`.host` (cgroup and /proc RAM, CPU %,
disks, a process's create time), :mod:`.system` (the trainer's reading, the bounded-call worker,
SystemProbe); this module re-exports the public names.
"""

from __future__ import annotations

from session_watchdog.probes.host import (
    CPU_EVERY_S,
    CgroupFiles,
    CgroupMemory,
    CpuPercent,
    KernelFiles,
    Reader,
    locate_cgroup,
    process_create_time,
    read_cgroup_files,
    read_cgroup_memory,
    read_disks,
    read_host,
    read_meminfo,
    read_text,
    remote_paths,
)
from session_watchdog.probes.nvml import (
    Nvml,
    gpus_all_idle,
    nvml_driver_summary,
    rank_by_pid,
    ranks_on_gpus,
    trim_heap,
)
from session_watchdog.probes.readings import (
    DiskReading,
    GpuReading,
    HostReading,
    Sample,
    Times,
    TrainerReading,
)
from session_watchdog.probes.system import SystemProbe, read_trainer

__all__ = [
    "GpuReading", "HostReading", "DiskReading", "TrainerReading", "Sample", "Times", "Nvml",
    "SystemProbe", "read_cgroup_memory", "read_host", "read_disks", "read_trainer",
    "gpus_all_idle", "process_create_time", "ranks_on_gpus", "rank_by_pid",
    # also imported by the daemon, the doctor command, tests and benchmarks
    "CPU_EVERY_S", "CgroupFiles", "CgroupMemory", "CpuPercent", "KernelFiles", "Reader",
    "locate_cgroup", "nvml_driver_summary", "read_cgroup_files", "read_meminfo", "read_text",
    "remote_paths", "trim_heap",
]
