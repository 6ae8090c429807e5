"""NVML: the one entry point to the GPUs (nvidia-ml-py), ``doctor``'s driver summary, and the
pure facts drawn from GPU readings (all idle; which ranks run on which GPU).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from session_watchdog.probes.readings import GpuReading


def trim_heap() -> bool:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim``); False where the C
    library has no such call (musl, macOS). For after a one-off burst of allocations."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            function = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) off POSIX
            _malloc_trim = False
        else:
            function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
            _malloc_trim = function
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

    RETRY_S = 60.0  # a failing driver is not looked for again on every tick
    # No NVML library at all (no NVIDIA driver installed, or no nvidia-ml-py): a driver rarely
    # appears later, and each try searches the library path again (~2 % of an idle daemon's CPU
    # at one try a minute, issue 17), so the wait doubles after each such failure, up to this.
    RETRY_MAX_S = 1800.0

    def __init__(self, module: Any = None, on_unsupported: Optional[Callable[[str], None]] = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self._module = module
        self._ready = False
        self._failed_at: Optional[float] = None
        self._library_missing = False  # the last failure was a missing library (or nvidia-ml-py)
        self._retry_s = self.RETRY_S  # the wait after the last failure
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
            self._failed_at is None or self._monotonic() - self._failed_at >= self._retry_s)

    def start(self) -> bool:
        if self._ready:
            return True
        if not self.retry_due():
            return False
        # the first failure waits RETRY_S; a missing library again and again waits longer
        missing_before = self._failed_at is not None and self._library_missing
        self._failed_at = self._monotonic()
        self._library_missing = True
        self._retry_s = min(self.RETRY_MAX_S, 2 * self._retry_s) if missing_before else self.RETRY_S
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
            if not _library_not_found(err):  # a driver that fails: tried again every RETRY_S
                self._library_missing = False
                self._retry_s = self.RETRY_S
            return False
        self._ready = True
        self._failed_at = None
        self._retry_s = self.RETRY_S
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


def _library_not_found(err: BaseException) -> bool:
    return "LibraryNotFound" in type(err).__name__ or "NVML Shared Library Not Found" in str(err)


def _nvml_error_text(err: BaseException) -> str:
    if _library_not_found(err):
        return "NVML library not found (no NVIDIA driver on this machine)"
    return str(err) or type(err).__name__


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


# --------------------------------------------------------------------------------------------
# What the GPU readings say (PURE)


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
