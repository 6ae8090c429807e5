"""The host: RAM as the kernel enforces it (cgroup v2, v1, then the host), CPU busy %, disks,
and a process's identity; /proc and cgroup files re-read through descriptors kept open.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import psutil

from session_watchdog.probes.readings import DiskReading, HostReading

# --------------------------------------------------------------------------------------------
# RAM: cgroup v2, then v1, then the host (psutil reports the host's RAM inside containers)


def read_text(path: Path) -> Optional[str]:
    """Read a small file; None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("ascii", "replace")
    except OSError:
        return None


class KernelFiles:
    """Re-reads /proc and cgroup files through descriptors kept open (``pread`` at offset 0).

    Opening a procfs/sysfs file costs more than reading it; these files are regenerated on every
    read, so one descriptor per file serves every tick. Not for regular files that get replaced.
    """

    def __init__(self) -> None:
        self._fds: Dict[Path, int] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> Optional[str]:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return None
                self._fds[path] = fd
            try:
                return os.pread(fd, 1 << 16, 0).decode("ascii", "replace")
            except OSError:
                os.close(self._fds.pop(path))
                return read_text(path)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


Reader = Callable[[Path], Optional[str]]


def _read_int(path: Path, read: Reader = read_text) -> Optional[int]:
    text = (read(path) or "").strip()
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    return int(text)


def _read_keyed(path: Path, read: Reader = read_text) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for line in (read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


_V1_UNLIMITED = 1 << 60  # cgroup v1 writes ~2**63 rounded to the page size for "no limit"


@dataclass(frozen=True)
class CgroupMemory:
    limit_bytes: int
    used_bytes: int  # usage minus reclaimable page cache (inactive_file), as docker stats does
    oom_kills: Optional[int]
    version: str


@dataclass(frozen=True)
class CgroupFiles:
    """Where our cgroup's memory files are (found once; reading them is then 3-4 small reads)."""

    version: str  # "cgroup2" | "cgroup1"
    limit: Path
    usage: Path
    stat: Path
    events: Path  # v2 memory.events, v1 memory.oom_control (both have an oom_kill line)
    inactive_keys: Tuple[str, ...]


def locate_cgroup(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> Optional[CgroupFiles]:
    """Find the memory files of our cgroup (v2 first, then v1); None when there are none."""
    v2_dirs = []
    try:
        for line in proc_self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
                if rel:
                    v2_dirs.append(cgroup_root / rel)
    except OSError:
        pass
    v2_dirs.append(cgroup_root)
    for directory in v2_dirs:
        if (directory / "memory.max").exists() and (directory / "memory.current").exists():
            return CgroupFiles("cgroup2", directory / "memory.max", directory / "memory.current",
                               directory / "memory.stat", directory / "memory.events",
                               ("inactive_file",))
    v1 = cgroup_root / "memory"
    if (v1 / "memory.limit_in_bytes").exists() and (v1 / "memory.usage_in_bytes").exists():
        return CgroupFiles("cgroup1", v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes",
                           v1 / "memory.stat", v1 / "memory.oom_control",
                           ("total_inactive_file", "inactive_file"))
    return None


def read_cgroup_files(files: Optional[CgroupFiles], read: Reader = read_text) -> Optional[CgroupMemory]:
    """The limit and usage in ``files``; None when unlimited or unreadable."""
    if files is None:
        return None
    limit = _read_int(files.limit, read)
    if limit is None or limit >= _V1_UNLIMITED:  # no limit: the usage is not read at all
        return None
    usage = _read_int(files.usage, read)
    if usage is None:
        return None
    stat = _read_keyed(files.stat, read)
    inactive = next((stat[k] for k in files.inactive_keys if k in stat), 0)
    oom = _read_keyed(files.events, read).get("oom_kill")
    return CgroupMemory(limit, max(0, usage - inactive), oom, files.version)


def read_cgroup_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> Optional[CgroupMemory]:
    """The memory limit of our cgroup, or None when there is none (unlimited or no cgroup)."""
    return read_cgroup_files(locate_cgroup(cgroup_root, proc_self_cgroup))


_MEMINFO_KEYS = {"MemTotal": "total", "MemAvailable": "available", "SwapTotal": "swap_total",
                 "SwapFree": "swap_free"}
_MEMINFO_NEEDLES = tuple((f"\n{key}:", name) for key, name in _MEMINFO_KEYS.items())


def read_meminfo(path: Path = Path("/proc/meminfo"), read: Reader = read_text) -> Optional[Dict[str, int]]:
    """``free -b`` from one read of /proc/meminfo (psutil reads it and /proc/vmstat twice over).

    Four ``str.find`` calls for the four lines: a regex over the whole file cost more than the
    read itself in a tick that runs every 5 s with cold caches (issue 17).
    """
    text = "\n" + (read(path) or "")
    out: Dict[str, int] = {}
    for needle, name in _MEMINFO_NEEDLES:
        at = text.find(needle)
        if at < 0:
            return None
        at += len(needle)
        end = text.find("\n", at)
        value = text[at:end if end >= 0 else len(text)].split()
        if not value or not value[0].isdecimal():
            return None
        out[name] = int(value[0]) * 1024
    return out


CPU_EVERY_S = 30.0  # host CPU % is logged, not decided on: a 30 s window is as good as 5 s


class CpuPercent:
    """``top``'s CPU busy % since the previous call, from the first line of /proc/stat.

    ``every_s``: read /proc/stat at most this often and repeat the last figure in between (the
    busy % over a longer window). The kernel renders the whole file, interrupt counters and all,
    for every read: ~50 us, a quarter of a tick with 8 GPUs (issue 17).
    """

    def __init__(self, read: Reader = read_text, path: Path = Path("/proc/stat"),
                 every_s: float = 0.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._path = path
        self._last: Optional[Tuple[int, int]] = None
        self._every_s = every_s
        self._monotonic = monotonic
        self._read_at: Optional[float] = None
        self._value: Optional[float] = None

    def __call__(self) -> Optional[float]:
        if self._every_s > 0:
            now = self._monotonic()
            if self._read_at is not None and now - self._read_at < self._every_s:
                return self._value
            self._read_at = now
            self._value = self._measure()
            return self._value
        return self._measure()

    def _measure(self) -> Optional[float]:
        text = self._read(self._path)
        if not text or not text.startswith("cpu "):
            return None
        fields = [int(x) for x in text.split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already inside user/nice
        last, self._last = self._last, (total, idle)
        if last is None or total <= last[0]:
            return None
        return round(100.0 * (1.0 - (idle - last[1]) / (total - last[0])), 1)


def read_host(cgroup_root: Path = Path("/sys/fs/cgroup"),
              proc_self_cgroup: Path = Path("/proc/self/cgroup"),
              cgroup_files: Optional[CgroupFiles] = None, locate: bool = True,
              read: Reader = read_text, cpu: Optional[Callable[[], Optional[float]]] = None) -> HostReading:
    """``free -b`` honouring the container's cgroup limit.

    ``locate=False`` uses ``cgroup_files`` as found earlier (None: no cgroup) instead of searching.
    """
    info = read_meminfo(read=read)
    if info is None:  # not Linux, or an unusual kernel: psutil knows the other ways
        vm, sw = psutil.virtual_memory(), psutil.swap_memory()
        info = {"total": vm.total, "available": vm.available, "swap_total": sw.total,
                "swap_free": sw.free}
    swap_used = info["swap_total"] - info["swap_free"]
    cpu_pct = cpu() if cpu is not None else psutil.cpu_percent(interval=None)
    files = locate_cgroup(cgroup_root, proc_self_cgroup) if locate else cgroup_files
    cg = read_cgroup_files(files, read)
    if cg is not None and cg.limit_bytes < info["total"]:
        available = max(0, min(cg.limit_bytes - cg.used_bytes, info["available"]))
        return HostReading(cg.limit_bytes, available, cg.version, swap_used, info["swap_total"], cpu_pct,
                           cg.oom_kills)
    oom = cg.oom_kills if cg is not None else None
    return HostReading(info["total"], info["available"], "host", swap_used, info["swap_total"], cpu_pct,
                       oom)


# Filesystems whose statvfs can block for a long time (network, FUSE: Colab's Drive is fuse.drive).
_REMOTE_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "sshfs",
              "afs", "davfs")


def remote_paths(paths: Sequence[Path]) -> Tuple[Path, ...]:
    """The paths among ``paths`` that live on a network or FUSE filesystem."""
    try:
        parts = psutil.disk_partitions(all=True)
    except (OSError, psutil.Error):
        return tuple(paths)  # unknown: treat all as able to hang
    out = []
    for path in paths:
        target = str(Path(path).resolve())
        best = max((p for p in parts if target == p.mountpoint
                    or target.startswith(p.mountpoint.rstrip("/") + "/")),
                   key=lambda p: len(p.mountpoint), default=None)
        if best is not None and (best.fstype.startswith("fuse") or best.fstype in _REMOTE_FS):
            out.append(path)
    return tuple(out)


def read_disks(paths: Sequence[Path]) -> Tuple[DiskReading, ...]:
    out = []
    for path in paths:
        try:
            usage = shutil.disk_usage(path)
            out.append(DiskReading(str(path), usage.free, usage.total))
        except OSError as err:
            out.append(DiskReading(str(path), None, None, err.strerror or str(err)))
    return tuple(out)


def process_create_time(pid: int) -> Optional[float]:
    """psutil's create_time (identity of a pid), or None when the process is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None
