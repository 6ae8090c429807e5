"""Readings: NVML GPUs, host RAM (cgroup-aware), disks and the trainer -> one immutable Sample.

Unknown is ``None``, never a fake 0: an unknown GPU reading must not look idle (STYLE.md #2).
Every call that can hang (NVML on a wedged driver, ``statvfs`` on a stale Drive FUSE mount) runs
on one worker thread and is bounded by a timeout; a call still pending is reported, not waited on.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import psutil

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


def trim_heap() -> bool:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim``); False where the C
    library has no such call (musl, macOS). For after a one-off burst of allocations."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None  # glibc's malloc_trim once looked up; False: this C library has none


# --------------------------------------------------------------------------------------------
# NVML: one entry point (nvitop's libnvml.nvmlQuery is the model)


class Nvml:
    """Lazy NVML: initialised on first use, errors mapped, each unsupported call reported once.

    ``module`` is ``pynvml`` (from nvidia-ml-py) by default; tests inject a fake object with the
    same few functions.
    """

    RETRY_S = 60.0  # a missing driver is not looked for again on every tick

    def __init__(self, module: Any = None, on_unsupported: Optional[Callable[[str], None]] = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self._module = module
        self._ready = False
        self._failed_at: Optional[float] = None
        self._monotonic = monotonic
        self.state = "not started"
        self._unsupported: Set[str] = set()
        self._on_unsupported = on_unsupported
        # index -> (name, uuid): fixed while NVML stays initialised, so read once, not per tick
        # (issue 17); a field that could not be read is asked again at the next read
        self._static: Dict[int, Tuple[Optional[str], Optional[str]]] = {}

    @property
    def ready(self) -> bool:
        return self._ready

    def retry_due(self) -> bool:
        """Whether start() would call nvmlInit now (never tried, or the last failure is old)."""
        return not self._ready and (
            self._failed_at is None or self._monotonic() - self._failed_at >= self.RETRY_S)

    def start(self) -> bool:
        if self._ready:
            return True
        if not self.retry_due():
            return False
        self._failed_at = self._monotonic()
        if self._module is None:
            try:
                import pynvml  # nvidia-ml-py; never the deprecated 'pynvml' shim package

                self._module = pynvml
            except ImportError:
                self.state = "unavailable: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
                return False
        try:
            self._module.nvmlInit()
        except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.state = f"unavailable: {_nvml_error_text(err)}"
            return False
        self._ready = True
        self._failed_at = None
        self.state = "ok"
        # Importing nvidia-ml-py and nvmlInit leave ~10 MiB freed but still held by the C heap
        # (measured on an H200 machine: 50 -> 40 MiB): give it back once, not on every tick.
        trim_heap()
        return True

    def shutdown(self) -> None:
        self._static.clear()
        if self._ready:
            self._ready = False
            try:
                self._module.nvmlShutdown()
            except Exception:
                pass

    def _query(self, what: str, function: str, *args: Any) -> Any:
        try:
            return getattr(self._module, function)(*args)
        except Exception as err:
            text = _nvml_error_text(err)
            if "Not Supported" in text and what not in self._unsupported:
                self._unsupported.add(what)
                if self._on_unsupported:
                    self._on_unsupported(what)
            return None

    def read(self, with_processes: bool = False) -> Tuple[GpuReading, ...]:
        """Per-GPU readings; one failing GPU never hides the others (gpustat's InvalidGPU).

        ``with_processes`` also lists each GPU's compute processes
        (``nvidia-smi --query-compute-apps=pid``): milliseconds, so not on every tick.
        """
        return tuple(self._read_one(index, with_processes)
                     for index in range(self._module.nvmlDeviceGetCount()))

    def _read_one(self, index: int, with_processes: bool = False) -> GpuReading:
        try:
            return self._read_one_unguarded(index, with_processes)
        except Exception as err:  # a value of an unexpected shape: this GPU is unknown, no more
            return GpuReading(index, error=_nvml_error_text(err))

    def _read_one_unguarded(self, index: int, with_processes: bool) -> GpuReading:
        try:
            handle = self._module.nvmlDeviceGetHandleByIndex(index)
        except Exception as err:
            return GpuReading(index, error=_nvml_error_text(err))
        util = self._query("utilization", "nvmlDeviceGetUtilizationRates", handle)
        mem = self._query("memory", "nvmlDeviceGetMemoryInfo", handle)
        power_mw = self._query("power", "nvmlDeviceGetPowerUsage", handle)
        temp = self._query("temperature", "nvmlDeviceGetTemperature", handle, 0)  # NVML_TEMPERATURE_GPU
        name, uuid = self._static.get(index, (None, None))
        if name is None or uuid is None:
            name = name or _text(self._query("name", "nvmlDeviceGetName", handle))
            uuid = uuid or _text(self._query("uuid", "nvmlDeviceGetUUID", handle))
            self._static[index] = (name, uuid)
        return GpuReading(
            index=index,
            name=name,
            uuid=uuid,
            utilization_pct=None if util is None else float(util.gpu),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            temperature_c=None if temp is None else float(temp),
            power_w=None if power_mw is None else power_mw / 1000.0,
            process_pids=self._pids(handle) if with_processes else None,
        )

    def _pids(self, handle: Any) -> Optional[Tuple[int, ...]]:
        procs = self._query("processes", "nvmlDeviceGetComputeRunningProcesses", handle)
        if procs is None:
            return None
        return tuple(sorted({int(p.pid) for p in procs if getattr(p, "pid", None) is not None}))


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_error_text(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if "LibraryNotFound" in type(err).__name__ or "NVML Shared Library Not Found" in text:
        return "NVML library not found (no NVIDIA driver on this machine)"
    return text


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


def read_trainer(run_dir: Optional[channel.RunDir]) -> TrainerReading:
    """Liveness from the kernel's locks; status from trainer.json. No process scan."""
    if run_dir is None:
        return TrainerReading(False, False)
    try:
        alive = run_dir.trainer_alive()
        saving = run_dir.trainer_saving()
    except (channel.ChannelError, OSError) as err:
        # A planted symlink at a lock name: liveness unknown, so assume the worst (alive and
        # saving) - that blocks ending the runtime, which is the safe side.
        return TrainerReading(True, True, None, str(err))
    try:
        return TrainerReading(alive, saving, run_dir.read_status())
    except (channel.ChannelError, OSError) as err:
        return TrainerReading(alive, saving, None, str(err))


# --------------------------------------------------------------------------------------------
# The probe


@dataclass(frozen=True)
class Times:
    now: float
    elapsed_s: float


class _Call:
    """One call handed to a :class:`_Worker`; ``wait`` returns whether it finished in time."""

    __slots__ = ("fn", "finished", "value", "error", "_done")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn: Optional[Callable[[], Any]] = fn
        self.finished = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self._done = threading.Lock()
        self._done.acquire()  # released by the worker when the call returns

    def run(self) -> None:
        fn, self.fn = self.fn, None  # the probe is not kept alive by a finished call
        try:
            self.value = fn() if fn is not None else None
        except BaseException as err:  # handed to the waiter, as a Future would
            self.error = err
        self.finished = True
        self._done.release()

    def wait(self, timeout_s: float) -> bool:
        if self.finished:
            return True
        if not self._done.acquire(timeout=timeout_s):
            return False
        self._done.release()  # a later waiter (the next tick) finds it done too
        return True

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _run_calls(calls: queue.SimpleQueue[Optional[_Call]]) -> None:
    while True:
        call = calls.get()
        if call is None:
            return
        call.run()
        del call  # not held while waiting for the next one


class _Worker:
    """One daemon thread running calls in order: the lightest hand-off between two threads (a
    queue and a lock; a ThreadPoolExecutor's Future and work item cost twice the CPU per tick,
    issue 17). A daemon thread, so a call hung in the driver never holds up the exit. The
    thread holds only the queue: a worker (and its probe) never closed still ends its thread
    once it is garbage, as a ThreadPoolExecutor's does."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Optional[_Call]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=_run_calls, args=(self._calls,), name=name,
                                       daemon=True)
        self.thread.start()
        weakref.finalize(self, self._calls.put, None)

    def submit(self, fn: Callable[[], Any]) -> _Call:
        call = _Call(fn)
        self._calls.put(call)
        return call

    def stop(self) -> None:
        self._calls.put(None)  # after the calls already queued


class SystemProbe:
    """Reads the real machine. ``sample(times)`` never raises for a missing GPU or a bad file."""

    def __init__(
        self,
        run_dir: Optional[channel.RunDir] = None,
        watch_paths: Sequence[Path] = (),
        nvml: Optional[Nvml] = None,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        proc_self_cgroup: Path = Path("/proc/self/cgroup"),
        timeout_s: float = 2.0,
        notebook_idle: Optional[Callable[[], Optional[float]]] = None,
        child_exit: Optional[Callable[[], Optional[int]]] = None,
        processes_every: int = 12,
    ) -> None:
        self.run_dir = run_dir
        self.watch_paths = tuple(watch_paths)
        self.nvml = nvml if nvml is not None else Nvml()
        self.cgroup_root = cgroup_root
        self.proc_self_cgroup = proc_self_cgroup
        self.timeout_s = timeout_s
        self.notebook_idle = notebook_idle
        self.child_exit = child_exit
        self.processes_every = processes_every  # GPU process lists: every Nth sample (slow call)
        self._samples = 0
        self._workers: Dict[str, _Worker] = {}
        self._pending: Dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._cgroup_files = locate_cgroup(cgroup_root, proc_self_cgroup)  # found once
        self._kernel_files = KernelFiles()
        self._cpu = CpuPercent(self._kernel_files, every_s=CPU_EVERY_S)
        self._remote = bool(remote_paths(self.watch_paths))

    def _submit(self, name: str, fn: Callable[[], Any]) -> _Call:
        """Start ``fn`` on worker ``name``, unless that worker's previous call still runs.

        One worker per kind (gpu, disk): a hung NVML call must not blind the disk readings.
        """
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                worker = self._workers[name] = _Worker(f"session-watchdog-{name}")
            pending = self._pending.get(name)
            if pending is None or pending.finished:
                pending = self._pending[name] = worker.submit(fn)
            return pending

    def _result(self, call: Optional[_Call], inline: Callable[[], Any],
                timed_out: Callable[[], Any]) -> Any:
        if call is None:
            return inline()
        if not call.wait(self.timeout_s):
            return timed_out()
        return call.result()

    def _read_disks(self) -> Tuple[DiskReading, ...]:
        return read_disks(self.watch_paths)

    def _read_gpus(self) -> Tuple[str, Tuple[GpuReading, ...]]:
        if not self.nvml.start():
            return self.nvml.state, ()
        self._samples += 1
        try:
            return "ok", self.nvml.read(with_processes=self._samples % self.processes_every == 1
                                        or self.processes_every == 1)
        except Exception as err:
            return f"unavailable: {_nvml_error_text(err)}", ()

    def sample(self, times: Times) -> Sample:
        # Calls that can hang (a live NVML, statvfs on a network/FUSE mount) run on workers,
        # bounded by timeout_s. Without them (no driver, local disks) a hand-off would cost more
        # than the reads. The fast reads come first and the GPU worker runs while this thread
        # waits: run side by side, the two threads passed the GIL back and forth at every
        # syscall, which cost more CPU than the overlap saved time (issue 17).
        host = read_host(cgroup_files=self._cgroup_files, locate=False, read=self._kernel_files,
                         cpu=self._cpu)
        trainer = read_trainer(self.run_dir)
        nvml_live = self.nvml.ready or self.nvml.retry_due()
        gpu_job = self._submit("gpu", self._read_gpus) if nvml_live else None
        disk_job = self._submit("disk", self._read_disks) if self._remote else None
        nvml_state, gpus = self._result(gpu_job, self._read_gpus, lambda: ("timeout", ()))
        disks = self._result(disk_job, self._read_disks, lambda: tuple(
            DiskReading(str(p), None, None, "timeout") for p in self.watch_paths))
        return Sample(
            now=times.now,
            elapsed_s=times.elapsed_s,
            gpus=gpus,
            nvml=nvml_state,
            host=host,
            disks=disks,
            trainer=trainer,
            notebook_idle_s=self.notebook_idle() if self.notebook_idle else None,
            child_exit=self.child_exit() if self.child_exit else None,
        )

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the workers; wait up to ``wait_s`` for them (a hung NVML call keeps its thread)."""
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
            self._pending.clear()
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + wait_s
        for worker in workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        self.nvml.shutdown()
        self._kernel_files.close()


def gpus_all_idle(gpus: Sequence[GpuReading], idle_pct: float) -> Optional[bool]:
    """True only when every GPU is known and below ``idle_pct``; None when any is unknown."""
    if not gpus:
        return None
    if any(g.utilization_pct is None for g in gpus):
        return None
    return all(g.utilization_pct is not None and g.utilization_pct < idle_pct for g in gpus)


def ranks_on_gpus(gpu_pids: Mapping[int, Optional[Sequence[int]]],
                  rank_by_pid: Mapping[int, int]) -> Dict[int, Optional[List[int]]]:
    """Which ranks run on each GPU (PURE), from NVML's process list per GPU index.

    Args:
        gpu_pids: GPU index -> pids NVML lists as using it (``nvmlDeviceGetComputeRunningProcesses``;
            ``nvidia-smi --query-compute-apps=pid``), None when NVML could not say.
        rank_by_pid: pid -> global rank, as the trainer reports it (``trainer.json``
            ``extra["distributed"]["ranks"]``).

    Returns:
        GPU index -> sorted ranks found on it, or None for "unknown". An empty or unmatched list
        is unknown, never "training finished": inside a container NVML reports host pids (another
        pid namespace) or nothing at all, so the absence of our pids proves nothing.
    """
    found: Dict[int, Optional[List[int]]] = {}
    for gpu, pids in gpu_pids.items():
        ranks = sorted({rank_by_pid[pid] for pid in (pids or ()) if pid in rank_by_pid})
        found[gpu] = ranks or None
    return found


def rank_by_pid(extra: Mapping[str, Any]) -> Dict[int, int]:
    """pid -> rank from a trainer's ``extra["distributed"]["ranks"]`` (malformed entries skipped)."""
    dist = extra.get("distributed")
    members = dist.get("ranks") if isinstance(dist, dict) else None
    out: Dict[int, int] = {}
    for member in members if isinstance(members, list) else ():
        pid, rank = (member.get("pid"), member.get("rank")) if isinstance(member, dict) else (None, None)
        if isinstance(pid, int) and isinstance(rank, int):
            out[pid] = rank
    return out


def process_create_time(pid: int) -> Optional[float]:
    """psutil's create_time (identity of a pid), or None when the process is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


# Exposed for the doctor command.
def nvml_driver_summary(nvml: Optional[Nvml] = None) -> Dict[str, Any]:
    """Driver and GPUs for ``doctor`` (``nvidia-smi -L``); every NVML failure is a state, never
    an exception: ``{"state", "driver", "gpus": [description], "unknown": [index]}`` where
    ``unknown`` lists the GPUs whose utilisation cannot be read.
    """
    nvml = nvml or Nvml()
    if not nvml.start():
        return {"state": nvml.state, "driver": None, "gpus": [], "unknown": []}
    module = nvml._module
    driver = None
    try:
        driver = _text(module.nvmlSystemGetDriverVersion())
    except Exception:
        pass
    try:
        readings = nvml.read()
    except Exception as err:  # "GPU is lost" while counting devices, ...
        return {"state": f"error: {_nvml_error_text(err)}", "driver": driver, "gpus": [],
                "unknown": []}
    gpus = [g.name if g.name and g.error is None
            else f"GPU {g.index} ({g.error or 'name unknown'})" for g in readings]
    return {"state": "ok", "driver": driver, "gpus": gpus,
            "unknown": [g.index for g in readings if g.utilization_pct is None]}


__all__ = [
    "GpuReading", "HostReading", "DiskReading", "TrainerReading", "Sample", "Times", "Nvml",
    "SystemProbe", "read_cgroup_memory", "read_host", "read_disks", "read_trainer",
    "gpus_all_idle", "process_create_time", "ranks_on_gpus", "rank_by_pid",
]
