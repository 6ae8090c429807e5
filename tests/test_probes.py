"""Probes: NVML through a fake module object, cgroup RAM from fixture trees, trainer, bounded calls."""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import psutil
import pynvml  # only its exception classes and plain ctypes structs; no call into the library
import pytest

from session_watchdog import channel, probes
from session_watchdog.probes import (
    CgroupMemory,
    GpuReading,
    Nvml,
    SystemProbe,
    Times,
    TrainerReading,
)
from session_watchdog.probes import nvml as probes_nvml
from session_watchdog.probes import system as probes_system

GiB = 2**30
FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
NO_DRIVER = "NVML library not found (no NVIDIA driver on this machine)"


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


NVML_PRESENT = _nvml_works()


def nvml_error(code: int) -> pynvml.NVMLError:
    """The exception nvidia-ml-py raises for ``code`` (its message table needs no driver)."""
    return pynvml.NVMLError(code)


# --------------------------------------------------------------------------------------------
# A fake NVML module object: the few nvidia-ml-py functions probes.Nvml calls (STYLE.md #4:
# a fake at our boundary, injected with Nvml(module=...); nothing is put into sys.modules).


@dataclass
class FakeGpu:
    name: Union[bytes, str] = b"NVIDIA A100-SXM4-80GB"
    uuid: Union[bytes, str] = b"GPU-00000000-0000-0000-0000-000000000000"
    util_pct: int = 0
    mem_used: int = 0
    mem_total: int = 80 * GiB
    temp_c: int = 40
    power_mw: int = 60_000
    handle_error: Optional[Exception] = None
    field_errors: Dict[str, Exception] = field(default_factory=dict)


class FakeNvmlModule:
    """Scripted GPUs; ``block_count`` makes the first nvmlDeviceGetCount wait (a wedged driver)."""

    def __init__(self, gpus: Sequence[FakeGpu], init_error: Optional[Exception] = None,
                 block_count: bool = False) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        self.count_calls = 0
        self.release = threading.Event()  # lets a blocked call return
        self.blocked_call_done = threading.Event()
        self._block = block_count

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        self.count_calls += 1
        if self._block:
            self._block = False
            self.release.wait(timeout=30)
            self.blocked_call_done.set()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        gpu = self.gpus[index]
        if gpu.handle_error is not None:
            raise gpu.handle_error
        return gpu

    @staticmethod
    def _check(gpu: FakeGpu, what: str) -> None:
        if what in gpu.field_errors:
            raise gpu.field_errors[what]

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        self._check(gpu, "utilization")
        return pynvml.c_nvmlUtilization_t(gpu=gpu.util_pct, memory=0)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        self._check(gpu, "memory")
        return pynvml.c_nvmlMemory_t(total=gpu.mem_total, free=gpu.mem_total - gpu.mem_used,
                                     used=gpu.mem_used)

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._check(gpu, "power")
        return gpu.power_mw

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        self._check(gpu, "temperature")
        return gpu.temp_c

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> Union[bytes, str]:
        self._check(gpu, "name")
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> Union[bytes, str]:
        self._check(gpu, "uuid")
        return gpu.uuid


def three_gpus() -> List[FakeGpu]:
    return [
        FakeGpu(name=b"NVIDIA H100 80GB HBM3", uuid=b"GPU-aaaa", util_pct=87,
                mem_used=12 * GiB, mem_total=80 * GiB, temp_c=64, power_mw=312_456),
        FakeGpu(name="NVIDIA H100 80GB HBM3", uuid="GPU-bbbb", util_pct=0,
                mem_used=512 * 2**20, mem_total=80 * GiB, temp_c=31, power_mw=69_000),
        FakeGpu(name=b"Tesla T4", uuid=b"GPU-cccc", util_pct=100, mem_used=15_000_000_000,
                mem_total=16_106_127_360, temp_c=83, power_mw=70_001),
    ]


EXPECTED_THREE = (
    GpuReading(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 87.0, 12 * GiB, 80 * GiB, 64.0, 312.456),
    GpuReading(1, "NVIDIA H100 80GB HBM3", "GPU-bbbb", 0.0, 512 * 2**20, 80 * GiB, 31.0, 69.0),
    GpuReading(2, "Tesla T4", "GPU-cccc", 100.0, 15_000_000_000, 16_106_127_360, 83.0, 70.001),
)


def no_cgroup(tmp_path: Path) -> Dict[str, Path]:
    """SystemProbe arguments for a machine without cgroup memory files."""
    return {"cgroup_root": tmp_path / "no-cgroup", "proc_self_cgroup": tmp_path / "no-proc"}


# --------------------------------------------------------------------------------------------
# NVML


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


class CountingInitNvml(FakeNvmlModule):
    """Counts every nvmlInit call, the failing ones included."""

    attempts = 0

    def nvmlInit(self) -> None:
        self.attempts += 1
        super().nvmlInit()


class TestTrimHeap:
    def test_freed_heap_pages_go_back_to_the_kernel(self) -> None:
        """64 MiB of small blocks freed below one still in use stay resident (the heap cannot
        shrink past the live block) until trim_heap gives their pages back."""
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "malloc_trim"):
            pytest.skip("this C library has no malloc_trim (not glibc): trim_heap is a no-op")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        blocks = []
        for _ in range(64 * 1024):  # 1 KiB each: from the heap, not mmap
            block = libc.malloc(1024)
            libc.memset(block, 1, 1024)
            blocks.append(block)
        live = blocks.pop()  # the newest block pins the top of the heap
        for block in blocks:
            libc.free(block)
        try:
            before = rss_anon_bytes()
            assert probes.trim_heap() is True
            after = rss_anon_bytes()
        finally:
            libc.free(live)
        assert before - after >= 32 << 20, (before, after)

    def test_nvml_trims_once_per_successful_start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A start that initialises NVML trims the heap once; a start of a ready NVML or one
        that fails does not."""
        trims: List[int] = []
        monkeypatch.setattr(probes_nvml, "trim_heap", lambda: trims.append(1) or True)
        fake = FakeNvmlModule(three_gpus())
        nvml = Nvml(module=fake)
        assert (nvml.start(), nvml.start(), len(trims)) == (True, True, 1)
        nvml.shutdown()
        assert (nvml.start(), len(trims)) == (True, 2)
        failing = Nvml(module=FakeNvmlModule(three_gpus(), init_error=nvml_error(
            pynvml.NVML_ERROR_DRIVER_NOT_LOADED)))
        assert (failing.start(), len(trims)) == (False, 2)


class TestNvml:
    def test_reads_exact_values_of_every_gpu(self) -> None:
        """Each GPU's util, memory bytes, temperature, power (mW / 1000) and name/uuid are exact."""
        nvml = Nvml(module=FakeNvmlModule(three_gpus()))
        assert nvml.start() is True
        assert nvml.state == "ok"
        assert nvml.read() == EXPECTED_THREE

    def test_gpu_without_handle_does_not_hide_the_others(self) -> None:
        """A GPU whose handle cannot be had carries the error; the other GPUs are complete."""
        gpus = three_gpus()
        gpus[1].handle_error = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        nvml = Nvml(module=FakeNvmlModule(gpus))
        nvml.start()
        assert nvml.read() == (EXPECTED_THREE[0], GpuReading(1, error="GPU is lost"),
                               EXPECTED_THREE[2])

    def test_unsupported_field_is_none_and_reported_once_per_kind(self) -> None:
        """'Not Supported' fields read as None; on_unsupported hears of each kind once, ever."""
        gpus = three_gpus()
        for gpu in gpus[:2]:
            gpu.field_errors = {"power": nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED),
                                "temperature": nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)}
        reported: List[str] = []
        nvml = Nvml(module=FakeNvmlModule(gpus), on_unsupported=reported.append)
        nvml.start()
        for _ in range(3):  # three ticks
            readings = nvml.read()
        assert reported == ["power", "temperature"]
        assert readings[0] == GpuReading(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 87.0, 12 * GiB,
                                         80 * GiB, temperature_c=None, power_w=None)
        assert readings[2] == EXPECTED_THREE[2]

    def test_other_field_error_is_none_and_not_reported_as_unsupported(self) -> None:
        """A field failing for another reason is None (never 0) and is not called unsupported."""
        gpus = three_gpus()[:1]
        gpus[0].field_errors = {"utilization": nvml_error(pynvml.NVML_ERROR_UNKNOWN)}
        reported: List[str] = []
        nvml = Nvml(module=FakeNvmlModule(gpus), on_unsupported=reported.append)
        nvml.start()
        [reading] = nvml.read()
        assert reading.utilization_pct is None
        assert reading.memory_used_bytes == 12 * GiB
        assert reported == []

    def test_library_not_found_makes_start_false_with_state(self) -> None:
        """nvmlInit raising LibraryNotFound: start() is False and the state says why."""
        fake = FakeNvmlModule([], init_error=nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
        nvml = Nvml(module=fake)
        assert nvml.start() is False
        assert nvml.state == f"unavailable: {NO_DRIVER}"

    def test_driver_not_loaded_state_carries_nvml_text(self) -> None:
        """Other init errors keep NVML's own text in the state."""
        nvml = Nvml(module=FakeNvmlModule([], init_error=nvml_error(
            pynvml.NVML_ERROR_DRIVER_NOT_LOADED)))
        assert nvml.start() is False
        assert nvml.state == "unavailable: Driver Not Loaded"

    def test_missing_library_is_looked_for_again_less_and_less_often(self) -> None:
        """With no NVML library, a tick every 5 s tries to load it at 0, 1, 3, 7, 15 and 31 min,
        then every 30 min (the wait doubles from RETRY_S up to RETRY_MAX_S)."""
        fake = CountingInitNvml([], init_error=nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
        clock = [1000.0]
        nvml = Nvml(module=fake, monotonic=lambda: clock[0])
        tried_at = []
        for tick in range(2 * 3600 // 5 + 1):  # two hours of ticks
            clock[0] = 1000.0 + 5 * tick
            before = fake.attempts
            assert nvml.start() is False
            if fake.attempts > before:
                tried_at.append(5 * tick)
        assert tried_at == [0, 60, 180, 420, 900, 1860, 3660, 5460]
        assert nvml.state == f"unavailable: {NO_DRIVER}"

    def test_failing_driver_is_tried_again_every_retry_interval(self) -> None:
        """A driver that is there but fails (Driver Not Loaded) is tried every RETRY_S, no backoff."""
        fake = CountingInitNvml([], init_error=nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
        clock = [0.0]
        nvml = Nvml(module=fake, monotonic=lambda: clock[0])
        for tick in range(600 // 5 + 1):  # ten minutes of ticks
            clock[0] = 5.0 * tick
            nvml.start()
        assert fake.attempts == 11  # at 0, 60, ..., 600 s

    def test_library_found_after_a_backoff_starts_and_a_later_failure_waits_retry_s(self) -> None:
        """Once the library loads, NVML is ready; a later failure starts over at RETRY_S."""
        fake = CountingInitNvml([FakeGpu()], init_error=nvml_error(
            pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
        clock = [0.0]
        nvml = Nvml(module=fake, monotonic=lambda: clock[0])
        for at in (0.0, 60.0, 180.0):
            clock[0] = at
            assert nvml.start() is False
        fake.init_error = None  # the driver was installed
        clock[0] = 180.0 + 239.0
        assert nvml.start() is False  # still inside the 240 s wait
        clock[0] = 180.0 + 240.0
        assert nvml.start() is True
        nvml.shutdown()
        fake.init_error = nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        clock[0] = 1000.0
        assert nvml.start() is False
        clock[0] = 1000.0 + Nvml.RETRY_S
        assert nvml.start() is False
        assert fake.attempts == 6

    def test_start_initialises_once(self) -> None:
        """A successful start is not repeated: nvmlInit runs once however often start() is called."""
        fake = FakeNvmlModule([FakeGpu()])
        nvml = Nvml(module=fake)
        assert [nvml.start(), nvml.start(), nvml.start()] == [True, True, True]
        assert fake.inits == 1

    def test_shutdown_only_after_start(self) -> None:
        """shutdown() calls nvmlShutdown once, and only when NVML was started."""
        fake = FakeNvmlModule([FakeGpu()])
        nvml = Nvml(module=fake)
        nvml.shutdown()
        assert fake.shutdowns == 0
        nvml.start()
        nvml.shutdown()
        nvml.shutdown()
        assert fake.shutdowns == 1

    def test_driver_summary(self) -> None:
        """The doctor summary names the driver version and each GPU."""
        summary = probes.nvml_driver_summary(Nvml(module=FakeNvmlModule(three_gpus())))
        assert summary == {"state": "ok", "driver": "550.54.15",
                           "gpus": ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "Tesla T4"],
                           "unknown": []}

    @pytest.mark.skipif(NVML_PRESENT, reason="this machine has an NVIDIA driver; the no-NVML "
                                             "path needs a machine without one")
    def test_real_library_absent_on_this_machine(self) -> None:
        """With nvidia-ml-py but no driver, start() is False with the 'not found' state."""
        nvml = Nvml()
        assert nvml.start() is False
        assert nvml.state == f"unavailable: {NO_DRIVER}"


class TestGpusAllIdle:
    @pytest.mark.parametrize(
        ("utils", "expected"),
        [
            ((), None),
            ((None,), None),
            ((1.0, None), None),
            ((0.0, 4.9), True),
            ((0.0, 5.0), False),
            ((1.0, 99.0), False),
            ((None, 99.0), None),
        ],
    )
    def test_table(self, utils: Sequence[Optional[float]], expected: Optional[bool]) -> None:
        """True only when every GPU is known and below the threshold; unknown or none is None."""
        gpus = [GpuReading(i, utilization_pct=u) for i, u in enumerate(utils)]
        assert probes.gpus_all_idle(gpus, idle_pct=5.0) is expected

    def test_unreadable_gpu_is_never_idle(self) -> None:
        """A GPU with an error and no reading makes the answer None, never True."""
        gpus = [GpuReading(0, utilization_pct=0.0), GpuReading(1, error="GPU is lost")]
        assert probes.gpus_all_idle(gpus, idle_pct=5.0) is None


# --------------------------------------------------------------------------------------------
# RAM from cgroup fixture trees


class TestReadCgroupMemory:
    @pytest.mark.parametrize(
        ("layout", "expected"),
        [
            # used = usage - inactive_file (docker stats' figure)
            ("v2-limited", CgroupMemory(2 * GiB, 1_610_612_736 - 536_870_912, 3, "cgroup2")),
            ("v2-unlimited", None),
            ("v1-limited", CgroupMemory(4 * GiB, 3_221_225_472 - 805_306_368, 2, "cgroup1")),
            ("v1-unlimited", None),
        ],
    )
    def test_fixture_layouts(self, layout: str, expected: Optional[CgroupMemory]) -> None:
        """Limit, used (minus inactive page cache) and oom_kill count are read exactly."""
        root = FIXTURES / layout
        got = probes.read_cgroup_memory(root / "fs", proc_self_cgroup=root / "proc_self_cgroup")
        assert got == expected

    def test_v2_at_root_without_proc_file(self, tmp_path: Path) -> None:
        """With /proc/self/cgroup unreadable the cgroup root itself is read."""
        (tmp_path / "memory.max").write_text("1000\n")
        (tmp_path / "memory.current").write_text("600\n")
        got = probes.read_cgroup_memory(tmp_path, proc_self_cgroup=tmp_path / "missing")
        assert got == CgroupMemory(1000, 600, None, "cgroup2")

    def test_no_cgroup_files(self, tmp_path: Path) -> None:
        """No memory files anywhere means no limit."""
        assert probes.read_cgroup_memory(tmp_path, tmp_path / "missing") is None


class TestReadHost:
    def test_cgroup_limit_below_host_ram_is_the_total(self) -> None:
        """total = the cgroup limit and available = limit - used when the limit is below RAM."""
        root = FIXTURES / "v2-limited"
        if psutil.virtual_memory().available < 2 * GiB:
            pytest.skip("needs 2 GiB of free RAM so psutil's cap does not apply")
        host = probes.read_host(root / "fs", root / "proc_self_cgroup")
        assert (host.ram_total_bytes, host.ram_available_bytes, host.ram_source,
                host.oom_kills) == (2 * GiB, GiB, "cgroup2", 3)
        assert host.swap_total_bytes == psutil.swap_memory().total

    def test_available_is_capped_by_host_available(self, tmp_path: Path) -> None:
        """A cgroup allowing more than the host has free reports the host's available instead."""
        total = psutil.virtual_memory().total
        (tmp_path / "memory.max").write_text(f"{total - 4096}\n")
        (tmp_path / "memory.current").write_text("0\n")
        host = probes.read_host(tmp_path, tmp_path / "missing")
        assert host.ram_source == "cgroup2"
        assert host.ram_total_bytes == total - 4096
        assert 0 < host.ram_available_bytes < total - 4096  # min(limit - used, psutil's)

    def test_limit_above_host_ram_reports_host(self, tmp_path: Path) -> None:
        """A limit at or above the host's RAM is no limit: host figures, cgroup oom count kept."""
        total = psutil.virtual_memory().total
        (tmp_path / "memory.max").write_text(f"{total * 2}\n")
        (tmp_path / "memory.current").write_text("0\n")
        (tmp_path / "memory.events").write_text("oom 1\noom_kill 1\n")
        host = probes.read_host(tmp_path, tmp_path / "missing")
        assert (host.ram_total_bytes, host.ram_source, host.oom_kills) == (total, "host", 1)

    def test_unlimited_v1_reports_host(self) -> None:
        """cgroup v1's 'no limit' value gives the host's RAM and no oom count."""
        root = FIXTURES / "v1-unlimited"
        host = probes.read_host(root / "fs", root / "proc_self_cgroup")
        assert (host.ram_total_bytes, host.ram_source, host.oom_kills) == (
            psutil.virtual_memory().total, "host", None)

    def test_meminfo_fields_parsed_from_the_kernel_text(self) -> None:
        """The four lines free(1) needs are read, in KiB, wherever they sit in /proc/meminfo."""
        text = ("MemTotal:       24684092 kB\nMemFree:         9000000 kB\n"
                "MemAvailable:   22620756 kB\nBuffers:  1 kB\nSwapCached: 0 kB\n"
                "SwapTotal:       2097148 kB\nSwapFree:        1048576 kB\nHugePages_Total: 0")
        assert probes.read_meminfo(read=lambda _: text) == {
            "total": 24684092 * 1024, "available": 22620756 * 1024,
            "swap_total": 2097148 * 1024, "swap_free": 1048576 * 1024}

    @pytest.mark.parametrize("text", [
        "", "MemTotal: 100 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",  # no MemAvailable (old kernel)
        "MemTotal: x kB\nMemAvailable: 5 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB",
        "XMemTotal: 1 kB\nMemAvailable: 5 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB",
    ])
    def test_meminfo_missing_or_malformed_line_is_none(self, text: str) -> None:
        """A missing or malformed line gives None (read_host then asks psutil), never a guess."""
        assert probes.read_meminfo(read=lambda _: text) is None


# --------------------------------------------------------------------------------------------
# Disks and the trainer


class TestReadDisks:
    def test_existing_and_missing_paths(self, tmp_path: Path) -> None:
        """A readable path has its disk's total; a missing one has an error and no figures."""
        existing, missing = probes.read_disks([tmp_path, tmp_path / "missing"])
        assert existing.path == str(tmp_path)
        assert existing.total_bytes == shutil.disk_usage(tmp_path).total
        assert existing.free_bytes is not None and existing.error is None
        assert missing == probes.DiskReading(str(tmp_path / "missing"), None, None,
                                             "No such file or directory")


class TestReadTrainer:
    def test_no_run_dir(self) -> None:
        """Without a run dir there is no trainer."""
        assert probes.read_trainer(None) == TrainerReading(False, False)

    def test_malformed_status_is_reported_not_raised(self, tmp_path: Path) -> None:
        """A malformed trainer.json gives status_error naming the file, and no exception."""
        run = channel.RunDir(tmp_path / "run")
        run.file(channel.TRAINER_FILE).write_text("{not json")
        reading = probes.read_trainer(run)
        assert (reading.alive, reading.saving, reading.status) == (False, False, None)
        assert reading.status_error is not None
        assert reading.status_error.startswith(f"{run.file(channel.TRAINER_FILE)} is not valid JSON")

    def test_status_with_a_bad_field_is_reported(self, tmp_path: Path) -> None:
        """A trainer.json with an unknown state gives that message as status_error."""
        run = channel.RunDir(tmp_path / "run")
        channel.write_json(run.file(channel.TRAINER_FILE), {"v": 1, "state": "dancing"})
        reading = probes.read_trainer(run)
        assert reading.status_error is not None
        assert reading.status_error.startswith("trainer state 'dancing' is not one of")

    def test_alive_and_status_from_run_dir(self, tmp_path: Path) -> None:
        """A held run.lock means alive; trainer.json is parsed into the status."""
        run = channel.RunDir(tmp_path / "run")
        status = channel.TrainerStatus(pid=os.getpid(), start_time=1.0, state="running", step=7,
                                       epoch=0, step_time_s=0.25, acked_seq=0,
                                       last_checkpoint=None, heartbeat=2.0)
        run.write_status(status)
        with channel.FileLock(run.file(channel.RUN_LOCK), shared=True):
            reading = probes.read_trainer(run)
        assert reading == TrainerReading(True, False, status, None)


# --------------------------------------------------------------------------------------------
# The probe


class TestSystemProbe:
    @pytest.mark.skipif(NVML_PRESENT, reason="this machine has an NVIDIA driver; the no-NVML "
                                             "path needs a machine without one")
    def test_real_machine_without_nvml(self, tmp_path: Path) -> None:
        """On this GPU-less machine sample() has no GPUs, says why, and does not raise."""
        probe = SystemProbe(watch_paths=[tmp_path])
        try:
            sample = probe.sample(Times(now=1_800_000_000.0, elapsed_s=12.5))
        finally:
            probe.close()
        assert (sample.now, sample.elapsed_s, sample.gpus) == (1_800_000_000.0, 12.5, ())
        assert sample.nvml == f"unavailable: {NO_DRIVER}"
        assert sample.host is not None and sample.host.ram_total_bytes > 0
        assert sample.disks[0].total_bytes == shutil.disk_usage(tmp_path).total
        assert sample.trainer == TrainerReading(False, False)

    @pytest.mark.gpu
    @pytest.mark.skipif(not NVML_PRESENT, reason="needs an NVIDIA GPU with a driver")
    def test_real_gpus(self) -> None:
        """On a GPU machine every GPU is read completely through the real nvidia-ml-py."""
        probe = SystemProbe()
        try:
            sample = probe.sample(Times(now=1.0, elapsed_s=0.0))
        finally:
            probe.close()
        assert sample.nvml == "ok"
        assert len(sample.gpus) >= 1
        for index, gpu in enumerate(sample.gpus):
            assert gpu.index == index and gpu.error is None
            assert isinstance(gpu.name, str) and gpu.uuid is not None and gpu.uuid.startswith("GPU-")
            assert gpu.memory_total_bytes is not None and gpu.memory_total_bytes > 0
            assert gpu.utilization_pct is not None and 0.0 <= gpu.utilization_pct <= 100.0

    def test_sample_with_fake_nvml_and_fixture_cgroup(self, tmp_path: Path) -> None:
        """Every part of the sample comes from its injected source, times included."""
        root = FIXTURES / "v1-limited"
        run = channel.RunDir(tmp_path / "run")
        probe = SystemProbe(run_dir=run, watch_paths=[tmp_path],
                            nvml=Nvml(module=FakeNvmlModule(three_gpus())),
                            cgroup_root=root / "fs", proc_self_cgroup=root / "proc_self_cgroup",
                            notebook_idle=lambda: 42.0, child_exit=lambda: 3)
        try:
            sample = probe.sample(Times(now=100.0, elapsed_s=7.0))
        finally:
            probe.close()
        assert (sample.now, sample.elapsed_s, sample.nvml, sample.gpus) == (
            100.0, 7.0, "ok", EXPECTED_THREE)
        assert sample.host is not None
        assert (sample.host.ram_total_bytes, sample.host.ram_source) == (4 * GiB, "cgroup1")
        assert [d.path for d in sample.disks] == [str(tmp_path)]
        assert (sample.notebook_idle_s, sample.child_exit) == (42.0, 3)
        assert sample.trainer == TrainerReading(False, False)

    def test_gpu_count_failure_is_reported_in_nvml_state(self, tmp_path: Path) -> None:
        """An NVML error while listing GPUs gives no GPUs and 'unavailable: <why>', no exception."""
        fake = FakeNvmlModule(three_gpus())

        def failing_count() -> int:
            raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)

        fake.nvmlDeviceGetCount = failing_count  # type: ignore[method-assign]
        probe = SystemProbe(nvml=Nvml(module=fake), **no_cgroup(tmp_path))
        try:
            sample = probe.sample(Times(now=1.0, elapsed_s=1.0))
        finally:
            probe.close()
        assert (sample.nvml, sample.gpus) == ("unavailable: Unknown Error", ())

    def test_a_probe_dropped_without_close_leaves_no_worker_thread(self, tmp_path: Path) -> None:
        """The GPU worker thread ends once its probe is garbage, closed or not (a Watchdog driven
        by tick() alone never closes its probe)."""
        before = set(threading.enumerate())
        probe = SystemProbe(nvml=Nvml(module=FakeNvmlModule(three_gpus())), **no_cgroup(tmp_path))
        assert probe.sample(Times(now=1.0, elapsed_s=1.0)).gpus == EXPECTED_THREE
        [worker] = [t for t in threading.enumerate() if t not in before]
        assert worker.name == "session-watchdog-gpu"
        del probe
        deadline = time.monotonic() + 60
        while worker.is_alive() and time.monotonic() < deadline:
            gc.collect()
            worker.join(0.05)
        assert not worker.is_alive()

    def test_hung_nvml_call_times_out_then_recovers(self, tmp_path: Path) -> None:
        """A call slower than timeout_s gives nvml 'timeout' quickly, is not piled up while it
        hangs, and the first sample after it finished reads the GPUs again."""
        fake = FakeNvmlModule(three_gpus(), block_count=True)
        probe = SystemProbe(nvml=Nvml(module=fake), timeout_s=0.2, **no_cgroup(tmp_path))
        try:
            for _ in range(2):
                started = time.monotonic()
                sample = probe.sample(Times(now=1.0, elapsed_s=1.0))
                assert time.monotonic() - started < 10  # the hung call lasts 30 s
                assert (sample.nvml, sample.gpus) == ("timeout", ())
            assert fake.count_calls == 1  # the second tick waited on the same hung call
            fake.release.set()
            assert fake.blocked_call_done.wait(timeout=60)
            sample = probe.sample(Times(now=2.0, elapsed_s=2.0))
        finally:
            fake.release.set()
            probe.close()
        assert (sample.nvml, sample.gpus) == ("ok", EXPECTED_THREE)

    def test_hung_disk_reports_timeout_per_path(self, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """A statvfs that hangs (stale FUSE mount) gives 'timeout' for each path, in time."""
        release = threading.Event()

        def hanging_read_disks(paths: Sequence[Path]) -> Any:
            release.wait(timeout=30)
            return ()

        monkeypatch.setattr(probes_system, "read_disks", hanging_read_disks)  # SystemProbe's lookup
        # Only network/FUSE mounts are read on the bounded worker (local ones inline, cheaper):
        # these two paths stand for a stale Drive mount.
        monkeypatch.setattr(probes_system, "remote_paths", lambda paths: tuple(paths))
        probe = SystemProbe(nvml=Nvml(module=FakeNvmlModule([])), watch_paths=[tmp_path, Path("/")],
                            timeout_s=0.2, **no_cgroup(tmp_path))
        try:
            started = time.monotonic()
            sample = probe.sample(Times(now=1.0, elapsed_s=1.0))
            assert time.monotonic() - started < 10  # the hung read lasts 30 s
        finally:
            release.set()
            probe.close()
        assert sample.disks == (probes.DiskReading(str(tmp_path), None, None, "timeout"),
                                probes.DiskReading("/", None, None, "timeout"))


class FakeNvmlWithProcesses(FakeNvmlModule):
    """The fake NVML plus nvmlDeviceGetComputeRunningProcesses (pids per GPU index)."""

    def __init__(self, gpus: Sequence[FakeGpu], pids: Dict[int, List[int]]) -> None:
        super().__init__(gpus)
        self.pids = pids
        self.process_calls = 0

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> List[Any]:
        from types import SimpleNamespace

        self.process_calls += 1
        return [SimpleNamespace(pid=p, usedGpuMemory=0) for p in self.pids[self.gpus.index(gpu)]]


class TestGpuProcesses:
    def test_process_lists_are_read_on_a_slower_cadence(self, tmp_path: Path) -> None:
        """With processes_every=3, samples 1 and 4 list each GPU's pids; the others do not."""
        fake = FakeNvmlWithProcesses(three_gpus(), {0: [4242, 17], 1: [], 2: [4243]})
        probe = SystemProbe(nvml=Nvml(module=fake), processes_every=3, **no_cgroup(tmp_path))
        try:
            pids = [[g.process_pids for g in probe.sample(Times(float(i), float(i))).gpus] for i in range(4)]
        finally:
            probe.close()
        assert pids[0] == [(17, 4242), (), (4243,)] and pids[3] == pids[0]
        assert pids[1] == pids[2] == [None, None, None]
        assert fake.process_calls == 6

    def test_ranks_per_gpu_in_the_sample_event(self) -> None:
        """The sample event maps pids to the ranks the trainer reported; an empty list is unknown."""
        from fakes import sample as fake_sample
        from fakes import status as fake_status

        from session_watchdog.log import sample_event

        ranks = {"distributed": {"ranks": [{"rank": 0, "pid": 4242}, {"rank": 1, "pid": 4243},
                                           {"rank": "x", "pid": 9}]}}
        gpus = [dataclasses.replace(g, process_pids=p) for g, p in
                zip(EXPECTED_THREE, [(17, 4242), (), (4243,)])]
        event = sample_event(fake_sample(gpus=gpus, trainer_status=fake_status(extra=ranks)), None, None)
        assert [(g["pids"], g["ranks"]) for g in event["gpus"]] == [([17, 4242], [0]), ([], None), ([4243], [1])]

    @pytest.mark.parametrize("gpu_pids, expected", [
        ({0: [1, 2], 1: [3]}, {0: [0, 1], 1: None}),   # pid 3 is nobody's rank (host pid namespace)
        ({0: None}, {0: None}),                          # NVML could not say
        ({0: []}, {0: None}),                            # empty never means "finished"
    ])
    def test_ranks_on_gpus(self, gpu_pids, expected) -> None:
        """Unknown, empty or unmatched process lists are None, never an empty 'finished' list."""
        assert probes.ranks_on_gpus(gpu_pids, {1: 0, 2: 1}) == expected
