"""``doctor`` under NVML faults (issue 18): every failure is a reported state, never a traceback.

The fake NVML module object is injected through ``probes.Nvml(module=...)`` (our boundary), as in
test_probes.py; nothing is put into sys.modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pynvml
import pytest
from test_probes import FakeGpu, FakeNvmlModule, nvml_error, three_gpus

from session_watchdog import probes
from session_watchdog.cli import doctor_checks
from session_watchdog.config import Config
from session_watchdog.probes import Nvml


class LostWhileCounting(FakeNvmlModule):
    """nvmlDeviceGetCount fails with "GPU is lost" (a GPU fell off the bus)."""

    def nvmlDeviceGetCount(self) -> int:
        raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)


class GarbageUtilization(FakeNvmlModule):
    """A driver/binding mismatch: the utilisation call returns an object without ``.gpu``."""

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        return object()


def config(tmp_path: Path, **kw: Any) -> Config:
    return Config.build(platform="colab", run_dir=str(tmp_path / "run"),
                        log_file=str(tmp_path / "log.jsonl"), **kw)


def checks_by_name(checks: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {c["name"]: c for c in checks}


LOST = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)


class TestDoctorUnderNvmlFaults:
    def test_gpu_lost_while_counting_devices_is_a_state(self, tmp_path: Path) -> None:
        """"GPU is lost" from nvmlDeviceGetCount: the nvml check says so, JSON output works."""
        checks = doctor_checks(config(tmp_path), nvml=Nvml(module=LostWhileCounting([])))
        nvml = checks_by_name(checks)["nvml"]
        assert nvml["ok"] is False and nvml["detail"] == f"error: {LOST}"
        json.dumps({"checks": checks})

    @pytest.mark.parametrize("gpu, shown", [
        (FakeGpu(handle_error=LOST), f"GPU 0 ({LOST})"),
        (FakeGpu(field_errors={"name": LOST}), "GPU 0 (name unknown)"),
        (FakeGpu(name=b"\xff\xfe bad bytes"), "\ufffd\ufffd bad bytes"),
    ], ids=["handle", "name", "undecodable-name"])
    def test_a_failing_handle_or_name_call_is_shown_per_gpu(self, tmp_path: Path, gpu: FakeGpu,
                                                            shown: str) -> None:
        """One unreadable GPU is described, next to the readable ones, without a TypeError."""
        module = FakeNvmlModule([gpu, three_gpus()[2]])
        checks = doctor_checks(config(tmp_path), nvml=Nvml(module=module))
        nvml = checks_by_name(checks)["nvml"]
        assert nvml["ok"] is True
        assert nvml["detail"] == f"driver 550.54.15, GPUs: {shown}, Tesla T4"
        json.dumps({"checks": checks})

    def test_a_malformed_value_is_an_unknown_reading_not_an_exception(self) -> None:
        """A utilisation result of the wrong shape: that GPU is unknown, the probe goes on."""
        readings = Nvml(module=GarbageUtilization(three_gpus()[:1])).read()
        assert len(readings) == 1 and readings[0].utilization_pct is None
        assert readings[0].error is not None

    def test_idle_end_that_can_never_fire_is_a_doctor_line(self, tmp_path: Path) -> None:
        """No utilisation for some GPU and the idle end on: doctor says the idle end never fires;
        with every GPU readable it says when it fires."""
        blind = FakeNvmlModule([FakeGpu(field_errors={"utilization": LOST})])
        line = checks_by_name(doctor_checks(config(tmp_path, idle_end_after="30m"),
                                            nvml=Nvml(module=blind)))["idle end"]
        assert line["ok"] is None and line["detail"].startswith("can never fire")
        absent = Nvml(module=FakeNvmlModule([], init_error=nvml_error(
            pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)))
        line = checks_by_name(doctor_checks(config(tmp_path, idle_end_after="30m"),
                                            nvml=absent))["idle end"]
        assert line["detail"].startswith("can never fire")
        seen = checks_by_name(doctor_checks(config(tmp_path, idle_end_after="30m"),
                                            nvml=Nvml(module=FakeNvmlModule(three_gpus()))))
        assert seen["idle end"] == {"name": "idle end", "ok": True, "fix": "",
                                    "detail": "after 30m00s of idle GPUs with no trainer, "
                                              "command or notebook cell running"}

    def test_summary_lists_gpus_with_unknown_utilisation(self) -> None:
        """The summary names the GPUs whose utilisation cannot be read."""
        gpus = three_gpus()
        gpus[1].field_errors["utilization"] = LOST
        summary = probes.nvml_driver_summary(Nvml(module=FakeNvmlModule(gpus)))
        assert summary["unknown"] == [1]
