"""Checkpoint cost as ratios, measured side by side on one disk, on the state users save.

The state is a model + Adam-like optimizer (params, exp_avg, exp_avg_sq): ``--tensors`` tensors
(340 by default) of mixed sizes totalling ``--size-mb`` MiB of random (incompressible) float32.
Before every measurement dirty pages are flushed (``sync``) and the page cache is dropped
(``/proc/sys/vm/drop_caches``; the output says when that is not permitted). The figures run in
alternating blocks (the order rotates each repeat), ``--repeat`` times, and the machine's 1-minute
load average is printed beside each one: on a busy machine the ratios hold better than the times.

Figures:

1. sync save: ``CheckpointManager.save`` (temp file, checksum while writing, fsync, rename,
   commit marker, prune) against (a) a raw ``write`` + ``fsync`` of the same number of bytes to
   a new file, (b) plain ``torch.save`` with torch's crc32 off + ``fsync``, (c) safetensors'
   ``save_file`` + ``fsync`` when safetensors is installed. Goals: >= 0.8x (a), >= 1.0x (b, c).
2. async stall: how long ``save_async`` blocks the caller, on the first save of a fresh process
   (cold: its snapshot buffers are allocated and paged in during the stall; prepared: after
   ``prepare_async`` paged them in, as a ``Session(async_save=True)`` does at its first step) and
   in the steady state (a later save reusing the buffers), against a sync save of the same state.
   Goal: <= 0.1x. ``--device cuda`` places the state on the GPU for this.

Usage: ``python benchmarks/bench_checkpoint.py [--size-mb 1024] [--tensors 340] [--repeat 3]
[--dir DIR] [--device cpu|cuda]``. Exit status is nonzero only when something crashes; missed
goals are printed, not failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from session_watchdog.trainer.checkpoint import CheckpointManager

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
_drop_note: List[str] = []


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache, so each figure starts from the same state."""
    os.sync()
    try:
        DROP_CACHES.write_text("1\n")
    except OSError as err:
        if not _drop_note:
            _drop_note.append(f"page cache NOT dropped ({DROP_CACHES}: {err.strerror}); sync only")
    else:
        if not _drop_note:
            _drop_note.append("page cache dropped before each figure")


def load() -> float:
    return os.getloadavg()[0]


def build_state(size_mb: int, tensors: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """A model + Adam-like optimizer state: ``tensors`` tensors (params, exp_avg, exp_avg_sq).

    Layer sizes follow a transformer's shape: a few big matrices, many small biases and norms.
    """
    layers = max(1, tensors // 3)
    generator = torch.Generator().manual_seed(0)
    # weights of the form: every 4th layer big (embedding/MLP), others medium, some tiny (norms)
    weights = [16.0 if i % 4 == 0 else 4.0 if i % 4 in (1, 2) else 0.01 for i in range(layers)]
    total = (size_mb << 20) // 4 // 3  # floats per third (params / exp_avg / exp_avg_sq)
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[0] += total - sum(sizes)
    model = {f"layer{i}.weight": torch.rand(n, generator=generator) for i, n in enumerate(sizes)}
    exp_avg = {f"{i}.exp_avg": torch.rand(n, generator=generator) for i, n in enumerate(sizes)}
    exp_avg_sq = {f"{i}.exp_avg_sq": torch.rand(n, generator=generator) for i, n in enumerate(sizes)}
    extra = tensors - 3 * layers  # 340 = 3 * 113 + 1: the step counter
    opt: Dict[str, torch.Tensor] = {**exp_avg, **exp_avg_sq}
    for i in range(extra):
        opt[f"step{i}"] = torch.tensor(float(i))
    return {"model": model, "optimizer": opt}


def tensors_of(state: Dict[str, Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
    return [t for part in state.values() for t in part.values()]


def raw_write(path: Path, state: Dict[str, Dict[str, torch.Tensor]], total: int) -> None:
    """Write ``total`` bytes (the tensors' memory, then zero padding) to a new file and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        left = total
        for tensor in tensors_of(state):
            view = memoryview(tensor.numpy()).cast("B")[:left]  # type: ignore[arg-type]
            left -= view.nbytes
            while view:
                view = view[os.write(fd, view):]
        pad = memoryview(bytes(min(max(left, 0), 1 << 20)))
        while left > 0:
            left -= os.write(fd, pad[:left])
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_torch_save(path: Path, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    save_config = getattr(config, "save", None)
    previous = getattr(save_config, "compute_crc32", None)
    if save_config is not None and previous is not None:
        save_config.compute_crc32 = False
    try:
        with open(path, "xb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if save_config is not None and previous is not None:
            save_config.compute_crc32 = previous


def safetensors_save(path: Path, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    flat = {f"{part}.{name}": t for part, tensors in state.items() for name, t in tensors.items()}
    save_file(flat, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object], setup: Callable[[], object] = lambda: None) -> Tuple[float, float]:
    """(seconds, load average) of one call, ``setup()`` run and caches dropped first."""
    setup()
    drop_caches()
    before = load()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started, max(before, load())


def first_save_in_child(size_mb: int, tensors: int, directory: Path, device: str,
                        prepared: bool) -> Tuple[float, float]:
    """(stall, load) of the first save_async of a fresh process: in this one, freed snapshot
    buffers would come back from the allocator already paged in. ``prepared``: after
    prepare_async paged its buffers in (as Session(async_save=True) does at its first step)."""
    import subprocess

    argv = [sys.executable, __file__, "--child-first-save", str(directory), "--size-mb",
            str(size_mb), "--tensors", str(tensors), "--device", device]
    done = subprocess.run(argv + (["--prepared"] if prepared else []), capture_output=True,
                          text=True, check=True)
    shutil.rmtree(directory, ignore_errors=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["stall"]), max(float(result["load"]), load())


def child_first_save(directory: Path, size_mb: int, tensors: int, device: str,
                     prepared: bool) -> None:
    state = build_state(size_mb, tensors)
    if device != "cpu":
        state = {part: {k: t.to(device) for k, t in d.items()} for part, d in state.items()}
    manager = CheckpointManager(directory, keep=1)
    if prepared:
        manager.prepare_async(state)
        manager._join_prepare()  # a training loop runs a while before its first checkpoint
    # A training loop has run (and its garbage collections with it) before its first checkpoint;
    # without this the fresh state just built makes a full collection fall into the stall.
    gc.collect()
    drop_caches()
    before = load()
    started = time.perf_counter()
    pending = manager.save_async(state, step=1)
    stall = time.perf_counter() - started
    pending.result()
    print(json.dumps({"stall": stall, "load": before}))


def has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(size_mb: int, tensors: int, repeat: int, directory: Path, device: str) -> None:
    state = build_state(size_mb, tensors)
    count = len(tensors_of(state))
    payload = sum(t.nbytes for t in tensors_of(state))
    sync_manager = CheckpointManager(directory / "sync", keep=1)
    size = sync_manager.save(state, step=0).bytes  # warm-up; gives the exact file size
    scratch = directory / "scratch"
    scratch.mkdir()
    counter = iter(range(1, 1 << 30))

    def fresh(name: str) -> Path:
        return scratch / f"{name}-{next(counter)}"

    def clear() -> None:  # outside the timing: only our save deletes its predecessor (keep=1)
        for old in scratch.iterdir():
            old.unlink()

    def raw() -> None:
        raw_write(fresh("raw"), state, size)

    def plain() -> None:
        plain_torch_save(fresh("torch"), state)

    def safe() -> None:
        safetensors_save(fresh("safetensors"), state)

    step = iter(range(1, 1 << 30))

    def ours() -> None:
        sync_manager.save(state, step=next(step))

    figures: Dict[str, List[Tuple[float, float]]] = {}
    blocks: List[Tuple[str, Callable[[], None]]] = [("raw write+fsync", raw),
                                                     ("torch.save (crc32 off)+fsync", plain),
                                                     ("CheckpointManager.save", ours)]
    if has_safetensors():
        blocks.append(("safetensors save_file+fsync", safe))
    for r in range(repeat):
        order = blocks[r % len(blocks):] + blocks[: r % len(blocks)]
        for name, fn in order:
            figures.setdefault(name, []).append(timed(fn, clear))
    shutil.rmtree(scratch, ignore_errors=True)
    sync_manager.list()  # waits for the helper that unlinks pruned files

    # async: a fresh manager's first save, then later saves (steady state), beside a sync save
    gpu_state = state
    if device != "cpu":
        gpu_state = {part: {k: t.to(device) for k, t in d.items()} for part, d in state.items()}
    first: List[Tuple[float, float]] = []
    prepared: List[Tuple[float, float]] = []
    steady: List[Tuple[float, float]] = []
    sync_dev: List[Tuple[float, float]] = []
    for r in range(repeat):
        first.append(first_save_in_child(size_mb, tensors, directory / f"first{r}", device, False))
        prepared.append(first_save_in_child(size_mb, tensors, directory / f"prep{r}", device, True))
        manager = CheckpointManager(directory / f"async{r}", keep=1)
        manager.save_async(gpu_state, step=1).result()
        for s in (2, 3):
            drop_caches()
            before = load()
            started = time.perf_counter()
            pending = manager.save_async(gpu_state, step=s)
            elapsed = time.perf_counter() - started
            pending.result()
            if s == 3:
                steady.append((elapsed, max(before, load())))
        sync_dev.append(timed(lambda m=manager: m.save(gpu_state, step=10)))
        manager.wait()
        manager.list()  # also waits for the helper that unlinks pruned files
        shutil.rmtree(directory / f"async{r}", ignore_errors=True)
    figures[f"save_async stall, first, cold, {device}"] = first
    figures[f"save_async stall, first, prepared, {device}"] = prepared
    figures[f"save_async stall, steady, {device}"] = steady
    figures[f"sync save, {device} state"] = sync_dev

    mib = size / (1 << 20)
    print(f"state: {count} tensors ({tensors} asked), {payload / (1 << 20):.0f} MiB payload, "
          f"file {size} bytes; dir {directory}; {repeat} repeats, alternating blocks; "
          f"{_drop_note[0] if _drop_note else ''}")
    if not has_safetensors():
        print("safetensors is not installed: its baseline is skipped")
    print(f"{'figure':40} {'median s':>9} {'MiB/s':>7}   each run (s @ load avg)")
    med: Dict[str, float] = {}
    for name, runs in figures.items():
        med[name] = statistics.median(s for s, _ in runs)
        rate = f"{mib / med[name]:7.0f}" if "stall" not in name else " " * 7
        each = ", ".join(f"{s:.2f}@{ld:.1f}" for s, ld in runs)
        print(f"{name:40} {med[name]:9.3f} {rate}   {each}")
    ours_s = med["CheckpointManager.save"]

    def verdict(ratio: float, goal: float, higher: bool) -> str:
        ok = ratio >= goal if higher else ratio <= goal
        return f"goal {'>=' if higher else '<='} {goal}{'' if ok else ' MISSED'}"

    print("ratios (ours / baseline, as throughput for saves, as time for stalls):")
    for name, goal in (("raw write+fsync", 0.8), ("torch.save (crc32 off)+fsync", 1.0),
                       ("safetensors save_file+fsync", 1.0)):
        if name in med:
            ratio = med[name] / ours_s
            print(f"  sync save vs {name:32} {ratio:6.2f}x  {verdict(ratio, goal, True)}")
    sync_s = med[f"sync save, {device} state"]
    for kind in ("first, cold", "first, prepared", "steady"):
        ratio = med[f"save_async stall, {kind}, {device}"] / sync_s
        print(f"  async stall ({kind:10}) vs sync save     {ratio:6.3f}x  {verdict(ratio, 0.1, False)}")
    if device == "cpu":
        print("  (CPU state: no GPU on this machine; rerun with --device cuda for the device->host stall)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="state size in MiB (1024)")
    parser.add_argument("--tensors", type=int, default=340, help="number of tensors (340)")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per figure (3)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a scratch dir under the current "
                             "directory, so it is the disk checkpoints would use, not /tmp)")
    parser.add_argument("--device", default="cpu", help="device of the state for the stall "
                        "figures: cpu (default) or cuda")
    parser.add_argument("--child-first-save", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_first_save is not None:
        child_first_save(args.child_first_save, args.size_mb, args.tensors, args.device,
                         args.prepared)
        return 0
    if args.size_mb < 1 or args.repeat < 1 or args.tensors < 3:
        parser.error("--size-mb and --repeat must be at least 1, --tensors at least 3")
    base = args.dir if args.dir is not None else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=base))
    try:
        run(args.size_mb, args.tensors, args.repeat, scratch, args.device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
