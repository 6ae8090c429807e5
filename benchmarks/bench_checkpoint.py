"""Checkpoint cost, as ratios measured side by side in one run on one disk.

1. Save throughput: ``CheckpointManager.save`` (temp file, hash while writing, fsync, rename,
   marker, prune) against a raw ``write`` + ``fsync`` of the same number of bytes into the same
   directory. Target: ratio >= 0.7. The raw baseline writes each file while its predecessor
   still exists and deletes the predecessor afterwards, as keep-last-K must (the previous
   checkpoint stays until the new one is committed). Writing right after deleting a file of the
   same size is also shown: on some VMs the kernel then recycles the freed page-cache pages and
   the write is several times faster, a shortcut no crash-safe save can take.
2. Training stall: how long ``save_async`` blocks the training loop (the CPU snapshot) against
   a synchronous save of the same state. Target: ratio <= 0.1. The first async save allocates
   its snapshot buffers (page faults); later ones reuse them, which is the steady state a
   training run sees, so the ratio uses the later ones and the first is shown alongside.

Usage: ``python benchmarks/bench_checkpoint.py [--size-mb 1024] [--repeat 3] [--dir DIR]
[--device cpu|cuda]`` (``--device`` places the state for the stall figures; the throughput
figures always write CPU tensors, since they measure the disk path).
Exit status is nonzero only when something crashes; missed targets are printed, not failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from session_watchdog.trainer.checkpoint import CheckpointManager

TENSORS = 4  # "a few large float tensors", like the big layers of a model


def build_state(size_mb: int) -> Dict[str, torch.Tensor]:
    """``TENSORS`` float32 tensors totalling ``size_mb`` MiB of random (incompressible) data."""
    per = max(1, (size_mb << 20) // 4 // TENSORS)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(per, generator=generator) for i in range(TENSORS)}


def raw_write(path: Path, state: Dict[str, torch.Tensor], total: int) -> float:
    """Seconds to write ``total`` bytes (the tensors' memory, then zero padding) and fsync them."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = total
        for tensor in state.values():
            view = memoryview(tensor.numpy()).cast("B")[:left]  # type: ignore[arg-type]
            left -= view.nbytes
            while view:
                view = view[os.write(fd, view):]
        pad = memoryview(bytes(min(left, 1 << 20)))
        while left > 0:
            left -= os.write(fd, pad[:left])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def run(size_mb: int, repeat: int, directory: Path, device: str) -> None:
    state = build_state(size_mb)
    payload = sum(t.nbytes for t in state.values())
    manager = CheckpointManager(directory / "ckpt", keep=1)
    warm = manager.save(state, step=0)  # warm-up; also gives the exact file size
    raw_dir = directory / "raw"
    raw_dir.mkdir()
    raw_write(raw_dir / "raw-0.bin", state, warm.bytes)  # warm-up: a predecessor exists
    raw_s: List[float] = []
    recycled_s: List[float] = []
    save_s: List[float] = []
    for i in range(1, repeat + 1):
        raw_s.append(raw_write(raw_dir / f"raw-{i}.bin", state, warm.bytes))
        os.unlink(raw_dir / f"raw-{i - 1}.bin")  # like a prune: only after the new one is durable
        started = time.perf_counter()
        manager.save(state, step=i)
        save_s.append(time.perf_counter() - started)
        os.unlink(raw_dir / f"raw-{i}.bin")  # delete first, then write the same size
        recycled_s.append(raw_write(raw_dir / f"raw-{i}.bin", state, warm.bytes))

    if device != "cpu":
        state = {name: tensor.to(device) for name, tensor in state.items()}
    sync_s: List[float] = []
    for i in range(repeat):
        started = time.perf_counter()
        manager.save(state, step=50 + i)
        sync_s.append(time.perf_counter() - started)
    stalls: List[float] = []
    background: List[float] = []
    for i in range(repeat + 1):
        started = time.perf_counter()
        pending = manager.save_async(state, step=100 + i)
        stalls.append(time.perf_counter() - started)
        background.append(pending.result().duration_s)

    raw = statistics.median(raw_s)
    recycled = statistics.median(recycled_s)
    save = statistics.median(save_s)
    sync = statistics.median(sync_s)
    stall = statistics.median(stalls[1:])
    mib = warm.bytes / (1 << 20)
    print(f"state: {TENSORS} float32 tensors, {payload / (1 << 20):.0f} MiB payload, "
          f"checkpoint file {warm.bytes} bytes; dir {directory}; median of {repeat}")
    rows = [
        ("raw write+fsync", raw, mib / raw),
        ("raw, right after a delete", recycled, mib / recycled),
        ("CheckpointManager.save", save, mib / save),
        (f"save, {device} state", sync, mib / sync),
        (f"save_async stall, first, {device}", stalls[0], None),
        (f"save_async stall, {device}", stall, None),
        ("save_async background write", statistics.median(background), None),
    ]
    print(f"{'':34} {'seconds':>9} {'MiB/s':>8}")
    for name, seconds, rate in rows:
        print(f"{name:34} {seconds:9.3f} {'' if rate is None else f'{rate:8.0f}'}")
    throughput = raw / save
    stall_ratio = stall / sync
    print(f"save throughput / raw write+fsync: {throughput:.2f}  (target >= 0.7"
          f"{'' if throughput >= 0.7 else ', MISSED'}; against the delete-then-write raw: "
          f"{recycled / save:.2f})")
    print(f"async stall / sync save:           {stall_ratio:.3f} (target <= 0.1"
          f"{'' if stall_ratio <= 0.1 else ', MISSED'}; first async: "
          f"{stalls[0] / sync:.3f})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="state size in MiB (1024)")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per figure (3)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a scratch dir under the current "
                             "directory, so it is the disk checkpoints would use, not /tmp)")
    parser.add_argument("--device", default="cpu", help="device of the state for the stall "
                        "figures: cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1:
        parser.error("--size-mb and --repeat must be at least 1")
    base = args.dir if args.dir is not None else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=base))
    try:
        run(args.size_mb, args.repeat, scratch, args.device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
