"""The GPU paths, on a machine with a CUDA GPU and its driver: an async save of CUDA state goes
through pinned host buffers (device->host copies, then one synchronize) and writes what a sync
save writes; a tensor changed on the GPU right after save_async is saved as it was; the NVML probe
reads this machine's GPUs. Without a GPU every test here is skipped (CI has none); they run on a
GPU machine through ``benchmarks/gpu_check.sh``. No test asserts on time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from session_watchdog.probes import SystemProbe, Times
from session_watchdog.trainer.checkpoint import CheckpointManager

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")]


def cuda_state(seed: int = 5) -> Dict[str, Any]:
    """A model + Adam-like state on the GPU: several dtypes, a non-contiguous view, a scalar."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.rand(1024, 515, device="cuda", generator=generator)
    return {
        "model": {"w": weight, "w_t": weight.t(),  # a view of another tensor (not contiguous)
                  "b": torch.rand(515, device="cuda", generator=generator).to(torch.bfloat16),
                  "idx": torch.randint(0, 1 << 40, (4097,), device="cuda", generator=generator)},
        "optimizer": {"exp_avg": torch.rand(1024, 515, device="cuda", generator=generator),
                      "step": torch.tensor(12.0, device="cuda")},
        "epoch": 3,
    }


def assert_same(loaded: Dict[str, Any], expected: Dict[str, Any]) -> None:
    for part in ("model", "optimizer"):
        assert sorted(loaded[part]) == sorted(expected[part])
        for key, tensor in expected[part].items():
            got = loaded[part][key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
            assert torch.equal(got.cpu(), tensor.cpu()), key
    assert loaded["epoch"] == expected["epoch"]


def test_an_async_save_of_cuda_state_holds_what_a_sync_save_holds(tmp_path: Path) -> None:
    """First and later async saves (pinned buffers, reused) load back equal to the GPU state and
    to a sync save of it; the buffers are pinned host memory at the same addresses each time."""
    state = cuda_state()
    manager = CheckpointManager(tmp_path / "async", keep=2)
    reference = CheckpointManager(tmp_path / "sync", keep=2)
    addresses = []
    for step in (1, 2):
        for tensor in (state["model"]["w"], state["optimizer"]["exp_avg"]):
            tensor.add_(1.0)
        saved = manager.save_async(state, step=step).result()
        assert all(buf.device.type == "cpu" and buf.is_pinned() for buf in manager._spare.values())
        addresses.append({path: buf.data_ptr() for path, buf in manager._spare.items()})
        assert_same(manager.load(saved), state)
        assert_same(reference.load(reference.save(state, step=step)), state)
    assert addresses[0] == addresses[1] and len(addresses[0]) == 6
    on_gpu = manager.load(map_location="cuda")
    assert on_gpu["model"]["w"].is_cuda and torch.equal(on_gpu["model"]["w"], state["model"]["w"])


@pytest.mark.parametrize("prepared", [False, True], ids=["bare", "prepared"])
def test_a_cuda_tensor_changed_right_after_save_async_is_saved_as_it_was(tmp_path: Path,
                                                                        prepared: bool) -> None:
    """Kernels queued on the GPU as soon as save_async returns (every tensor overwritten in place)
    do not reach the checkpoint: it holds the values of the moment of the call. The GPU is kept
    busy for ~0.5 s before each save, so the device->host copies land long after save_async's
    own work: a writer that read the pinned buffers without waiting for them (no synchronize)
    would write the previous round's or uninitialised bytes."""
    state = cuda_state(seed=9)
    expected = {part: {k: t.clone() for k, t in state[part].items()}
                for part in ("model", "optimizer")}
    expected["epoch"] = state["epoch"]
    manager = CheckpointManager(tmp_path / "ckpt")
    if prepared:
        manager.prepare_async(state)
    for step in (1, 2):
        torch.cuda._sleep(1_000_000_000)  # type: ignore[no-untyped-call]  # ~0.5-1 s of GPU cycles
        pending = manager.save_async(state, step=step)
        for part in ("model", "optimizer"):
            for tensor in state[part].values():
                tensor.fill_(-7)
        assert_same(manager.load(pending.result()), expected)
        state = cuda_state(seed=9 + step)  # next round: new values in new GPU tensors
        expected = {part: {k: t.clone() for k, t in state[part].items()}
                    for part in ("model", "optimizer")}
        expected["epoch"] = state["epoch"]


def test_the_probe_reads_this_machines_gpus(tmp_path: Path) -> None:
    """A real SystemProbe over NVML reads CUDA device 0 (found by its UUID: NVML lists GPUs in
    PCI order and ignores CUDA_VISIBLE_DEVICES) under its CUDA name, with memory that counts
    1 GiB this process holds on it."""
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    probe = SystemProbe(watch_paths=[tmp_path], timeout_s=60.0)  # a first nvmlInit may be slow
    try:
        sample = probe.sample(Times(now=1_800_000_000.0, elapsed_s=1.0))
    finally:
        probe.close()
        del held
    assert sample.nvml == "ok"
    assert len(sample.gpus) >= torch.cuda.device_count()
    def bare(uuid: object) -> str:  # NVML writes "GPU-<uuid>"; torch's str may leave it out
        text = str(uuid).lower()
        return text[4:] if text.startswith("gpu-") else text

    uuid = bare(torch.cuda.get_device_properties(0).uuid)
    matching = [gpu for gpu in sample.gpus if gpu.uuid is not None and bare(gpu.uuid) == uuid]
    assert len(matching) == 1, (uuid, [gpu.uuid for gpu in sample.gpus])
    first = matching[0]
    assert first.error is None
    assert first.name == torch.cuda.get_device_name(0)
    assert first.memory_total_bytes is not None and first.memory_used_bytes is not None
    assert first.memory_total_bytes >= torch.cuda.get_device_properties(0).total_memory
    assert first.memory_used_bytes >= 1 << 30
    assert first.utilization_pct is not None and 0 <= first.utilization_pct <= 100
