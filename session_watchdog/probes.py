"""Readings: NVML GPUs, host RAM (cgroup-aware), disks and the trainer -> one immutable Sample.

Unknown is ``None``, never a fake 0: an unknown GPU reading must not look idle (STYLE.md #2).
Every call that can hang (NVML on a wedged driver, ``statvfs`` on a stale Drive FUSE mount) runs
on one worker thread and is bounded by a timeout; a call still pending is reported, not waited on.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

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


# --------------------------------------------------------------------------------------------
# NVML: one entry point (nvitop's libnvml.nvmlQuery is the model)


class Nvml:
    """Lazy NVML: initialised on first use, errors mapped, each unsupported call reported once.

    ``module`` is ``pynvml`` (from nvidia-ml-py) by default; tests inject a fake object with the
    same few functions.
    """

    def __init__(self, module: Any = None, on_unsupported: Optional[Callable[[str], None]] = None):
        self._module = module
        self._ready = False
        self.state = "not started"
        self._unsupported: Set[str] = set()
        self._on_unsupported = on_unsupported

    def start(self) -> bool:
        if self._ready:
            return True
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
        self.state = "ok"
        return True

    def shutdown(self) -> None:
        if self._ready:
            self._ready = False
            try:
                self._module.nvmlShutdown()
            except Exception:
                pass

    def _query(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:
            text = _nvml_error_text(err)
            if "Not Supported" in text and what not in self._unsupported:
                self._unsupported.add(what)
                if self._on_unsupported:
                    self._on_unsupported(what)
            return None

    def read(self) -> Tuple[GpuReading, ...]:
        """Per-GPU readings; one failing GPU never hides the others (gpustat's InvalidGPU)."""
        return tuple(self._read_one(index) for index in range(self._module.nvmlDeviceGetCount()))

    def _read_one(self, index: int) -> GpuReading:
        m = self._module
        try:
            handle = m.nvmlDeviceGetHandleByIndex(index)
        except Exception as err:
            return GpuReading(index, error=_nvml_error_text(err))
        util = self._query("utilization", lambda: m.nvmlDeviceGetUtilizationRates(handle))
        mem = self._query("memory", lambda: m.nvmlDeviceGetMemoryInfo(handle))
        power_mw = self._query("power", lambda: m.nvmlDeviceGetPowerUsage(handle))
        temp = self._query(
            "temperature", lambda: m.nvmlDeviceGetTemperature(handle, 0)  # NVML_TEMPERATURE_GPU
        )
        return GpuReading(
            index=index,
            name=_text(self._query("name", lambda: m.nvmlDeviceGetName(handle))),
            uuid=_text(self._query("uuid", lambda: m.nvmlDeviceGetUUID(handle))),
            utilization_pct=None if util is None else float(util.gpu),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            temperature_c=None if temp is None else float(temp),
            power_w=None if power_mw is None else power_mw / 1000.0,
        )


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_error_text(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if "LibraryNotFound" in type(err).__name__ or "NVML Shared Library Not Found" in text:
        return "NVML library not found (no NVIDIA driver on this machine)"
    return text


# --------------------------------------------------------------------------------------------
# RAM: cgroup v2, then v1, then the host (psutil reports the host's RAM inside containers)


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    return int(text)


def _read_keyed(path: Path) -> Dict[str, int]:
    out: Dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
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


def read_cgroup_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> Optional[CgroupMemory]:
    """The memory limit of our cgroup, or None when there is none (unlimited or no cgroup)."""
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
        limit = _read_int(directory / "memory.max")
        current = _read_int(directory / "memory.current")
        if limit is not None and current is not None:
            stat = _read_keyed(directory / "memory.stat")
            events = _read_keyed(directory / "memory.events")
            used = max(0, current - stat.get("inactive_file", 0))
            return CgroupMemory(limit, used, events.get("oom_kill"), "cgroup2")
    v1 = cgroup_root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    usage = _read_int(v1 / "memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < _V1_UNLIMITED:
        stat = _read_keyed(v1 / "memory.stat")
        used = max(0, usage - stat.get("total_inactive_file", stat.get("inactive_file", 0)))
        oom = _read_keyed(v1 / "memory.oom_control").get("oom_kill")
        return CgroupMemory(limit, used, oom, "cgroup1")
    return None


def read_host(cgroup_root: Path = Path("/sys/fs/cgroup"),
              proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> HostReading:
    """``free -b`` honouring the container's cgroup limit."""
    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    cpu = psutil.cpu_percent(interval=None)
    cg = read_cgroup_memory(cgroup_root, proc_self_cgroup)
    if cg is not None and cg.limit_bytes < vm.total:
        available = max(0, min(cg.limit_bytes - cg.used_bytes, vm.available))
        return HostReading(cg.limit_bytes, available, cg.version, swap.used, swap.total, cpu,
                           cg.oom_kills)
    oom = cg.oom_kills if cg is not None else None
    return HostReading(vm.total, vm.available, "host", swap.used, swap.total, cpu, oom)


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
    alive = run_dir.trainer_alive()
    saving = run_dir.trainer_saving()
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
    ) -> None:
        self.run_dir = run_dir
        self.watch_paths = tuple(watch_paths)
        self.nvml = nvml if nvml is not None else Nvml()
        self.cgroup_root = cgroup_root
        self.proc_self_cgroup = proc_self_cgroup
        self.timeout_s = timeout_s
        self.notebook_idle = notebook_idle
        self.child_exit = child_exit
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: Dict[str, concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()

    def _bounded(self, name: str, fn: Callable[[], Any]) -> Tuple[bool, Any]:
        """Run ``fn`` on the worker thread; (False, None) if it does not finish in time."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="session-watchdog-probe")
            future = self._pending.get(name)
            if future is None or future.done():
                future = self._pool.submit(fn)
                self._pending[name] = future
        try:
            result = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            return False, None
        with self._lock:
            self._pending.pop(name, None)
        return True, result

    def _read_gpus(self) -> Tuple[str, Tuple[GpuReading, ...]]:
        if not self.nvml.start():
            return self.nvml.state, ()
        try:
            return "ok", self.nvml.read()
        except Exception as err:
            return f"unavailable: {_nvml_error_text(err)}", ()

    def sample(self, times: Times) -> Sample:
        done, gpu_result = self._bounded("gpu", self._read_gpus)
        nvml_state, gpus = gpu_result if done else ("timeout", ())
        done, disks = self._bounded("disk", lambda: read_disks(self.watch_paths))
        if not done:
            disks = tuple(DiskReading(str(p), None, None, "timeout") for p in self.watch_paths)
        return Sample(
            now=times.now,
            elapsed_s=times.elapsed_s,
            gpus=gpus,
            nvml=nvml_state,
            host=read_host(self.cgroup_root, self.proc_self_cgroup),
            disks=disks,
            trainer=read_trainer(self.run_dir),
            notebook_idle_s=self.notebook_idle() if self.notebook_idle else None,
            child_exit=self.child_exit() if self.child_exit else None,
        )

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
        self.nvml.shutdown()


def gpus_all_idle(gpus: Sequence[GpuReading], idle_pct: float) -> Optional[bool]:
    """True only when every GPU is known and below ``idle_pct``; None when any is unknown."""
    if not gpus:
        return None
    if any(g.utilization_pct is None for g in gpus):
        return None
    return all(g.utilization_pct is not None and g.utilization_pct < idle_pct for g in gpus)


def process_create_time(pid: int) -> Optional[float]:
    """psutil's create_time (identity of a pid), or None when the process is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


# Exposed for the doctor command.
def nvml_driver_summary(nvml: Optional[Nvml] = None) -> Dict[str, Any]:
    nvml = nvml or Nvml()
    if not nvml.start():
        return {"state": nvml.state, "gpus": []}
    module = nvml._module
    driver = None
    try:
        driver = _text(module.nvmlSystemGetDriverVersion())
    except Exception:
        pass
    return {"state": "ok", "driver": driver, "gpus": [g.name for g in nvml.read()]}


__all__ = [
    "GpuReading", "HostReading", "DiskReading", "TrainerReading", "Sample", "Times", "Nvml",
    "SystemProbe", "read_cgroup_memory", "read_host", "read_disks", "read_trainer",
    "gpus_all_idle", "process_create_time",
]
