"""Checkpoint mirror cost (issue 14), as ratios measured side by side in one run.

The slow target: Google Drive's FUSE mount uploads at tens of MB/s, so a save written straight
into ``/content/drive`` stalls training for the whole upload. It is simulated by a rate-limited
writer (``Throttle``: after each write, sleep until the bytes written so far match the rate;
default 50 MiB/s) in front of a directory on another filesystem (``/dev/shm`` when it is one).
Both sides of each ratio go through the same throttle.

1. Training stall per checkpoint: ``Session(mirror=...)``'s path (``CheckpointManager.save`` on
   the local disk, then ``Mirror.submit``, which returns at once) against ``torch.save`` of the
   same state straight into the slow target (plus fsync: what users do today). Target <= 0.25.
   The stall is the local save: on a busy shared disk it grows, and with it the ratio. Shown
   too: ``async_save=True``, where the loop waits for the CPU snapshot only.
2. Local commit -> verified on the mirror (copy, fsync, read back from the target, sha256,
   marker) against a plain ``shutil.copyfileobj`` of the same bytes into the same slow target
   (no fsync, no verification). Target <= 1.3.
3. For information, the same as 2 on the fast, unthrottled target against ``shutil.copy``
   (``sendfile``): there the verification read and two sha256 passes are most of the time, so
   the ratio is higher; that is what verification costs on a fast target.

Usage: ``python benchmarks/bench_mirror.py [--size-mb 64] [--rate-mb 50] [--repeat 3]
[--local DIR] [--mirror DIR]``. Exit status is nonzero only when something crashes; missed
targets are printed, not failed.
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
from typing import Any, Dict, List, Optional

import torch

from session_watchdog.trainer.checkpoint import CheckpointManager
from session_watchdog.trainer.mirror import LocalTarget, Mirror


class Throttle:
    """A rate limit: ``wrote(n)`` sleeps until the bytes so far match ``rate`` bytes/s."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start: Optional[float] = None
        self.total = 0

    def reset(self) -> None:
        self.start, self.total = None, 0

    def wrote(self, n: int) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        self.total += n
        ahead = self.total / self.rate - (time.perf_counter() - self.start)
        if ahead > 0:
            time.sleep(ahead)


class ThrottledFile:
    """A write-only file object over an fd, through a Throttle (for torch.save and shutil)."""

    def __init__(self, fd: int, throttle: Throttle) -> None:
        self.fd = fd
        self.throttle = throttle

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:
            n = os.write(self.fd, view)
            self.throttle.wrote(n)
            view = view[n:]
        return size

    def flush(self) -> None:
        pass


class ThrottledTarget(LocalTarget):
    """The mirror's local target with the same throttle at its write boundary."""

    def __init__(self, path: Path, throttle: Throttle) -> None:
        super().__init__(path)
        self.throttle = throttle

    def write_chunk(self, fd: int, data: memoryview) -> int:
        n = os.write(fd, data[: 1 << 20])
        self.throttle.wrote(n)
        return n


def build_state(size_mb: int) -> Dict[str, torch.Tensor]:
    per = max(1, (size_mb << 20) // 4 // 4)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(per, generator=generator) for i in range(4)}


def direct_save(path: Path, state: Dict[str, torch.Tensor], throttle: Throttle) -> float:
    throttle.reset()
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        torch.save(state, ThrottledFile(fd, throttle))  # type: ignore[arg-type]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def plain_copy(src: Path, dst: Path, throttle: Optional[Throttle]) -> float:
    started = time.perf_counter()
    if throttle is None:
        shutil.copy(src, dst)
    else:
        throttle.reset()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(src, "rb") as fh:
                shutil.copyfileobj(fh, ThrottledFile(fd, throttle), 1 << 20)  # type: ignore[misc]
        finally:
            os.close(fd)
    return time.perf_counter() - started


def run(size_mb: int, rate_mb: float, repeat: int, local_root: Path, mirror_root: Path) -> None:
    state = build_state(size_mb)
    throttle = Throttle(rate_mb * (1 << 20))
    local_dir = Path(tempfile.mkdtemp(prefix="bench-mirror-local-", dir=local_root))
    slow_dir = Path(tempfile.mkdtemp(prefix="bench-mirror-slow-", dir=mirror_root))
    fast_dir = Path(tempfile.mkdtemp(prefix="bench-mirror-fast-", dir=mirror_root))
    same_fs = os.stat(local_dir).st_dev == os.stat(slow_dir).st_dev
    try:
        manager = CheckpointManager(local_dir / "ckpt", keep=2)
        slow = Mirror(ThrottledTarget(slow_dir / "mirror", throttle), allow_same_filesystem=same_fs)
        slow.attach(manager)
        direct, stall, submit, verified, copied, async_stall = [], [], [], [], [], []
        for i in range(repeat):
            direct.append(direct_save(slow_dir / f"direct-{i}.pt", state, throttle))
            os.unlink(slow_dir / f"direct-{i}.pt")
            throttle.reset()
            started = time.perf_counter()
            saved = manager.save(state, step=i + 1)
            committed = time.perf_counter()
            slow.submit(saved)
            stall.append(time.perf_counter() - started)
            submit.append(time.perf_counter() - committed)
            done = slow.wait(saved, 600.0)
            assert done is not None, "the mirror copy did not verify"
            verified.append(time.perf_counter() - committed)
            copied.append(plain_copy(saved.path, slow_dir / "plain.pt", throttle))
            os.unlink(slow_dir / "plain.pt")
            # Session(async_save=True, mirror=...): the loop waits for the CPU snapshot only.
            started = time.perf_counter()
            pending = manager.save_async(state, step=i + 1)
            async_stall.append(time.perf_counter() - started)
            slow.submit(pending.result())
            assert slow.wait(pending.result(), 600.0) is not None
        slow.close()

        fast = Mirror(LocalTarget(fast_dir / "mirror"), allow_same_filesystem=same_fs)
        fast_manager = CheckpointManager(local_dir / "ckpt-fast", keep=2)
        fast.attach(fast_manager)
        fast_verified, fast_copied = [], []
        for i in range(repeat):
            saved = fast_manager.save(state, step=i + 1)
            committed = time.perf_counter()
            fast.submit(saved)
            assert fast.wait(saved, 600.0) is not None
            fast_verified.append(time.perf_counter() - committed)
            fast_copied.append(plain_copy(saved.path, fast_dir / "plain.pt", None))
            os.unlink(fast_dir / "plain.pt")
        fast.close()
    finally:
        for path in (local_dir, slow_dir, fast_dir):
            shutil.rmtree(path, ignore_errors=True)

    med = statistics.median
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"state: {size_mb} MiB; {os.cpu_count()} CPUs, load average {load}")
    print(f"local {local_root}, mirror {mirror_root}"
          f"{' (same filesystem: testing override)' if same_fs else ''}; slow target "
          f"throttled to {rate_mb:g} MiB/s; median of {repeat}")
    rows = [("direct torch.save into the slow target", med(direct)),
            ("stall with mirror= (local save+submit)", med(stall)),
            ("  of which Mirror.submit", med(submit)),
            ("stall with mirror= and async_save=True", med(async_stall)),
            ("commit -> verified on the slow mirror", med(verified)),
            ("shutil.copyfileobj into the slow target", med(copied)),
            ("commit -> verified on the fast mirror", med(fast_verified)),
            ("shutil.copy to the fast target", med(fast_copied))]
    for name, seconds in rows:
        print(f"  {name:42} {seconds:8.3f} s")
    stall_ratio = med(stall) / med(direct)
    verify_ratio = med(verified) / med(copied)
    fast_ratio = med(fast_verified) / med(fast_copied)
    print(f"training stall, mirror= / direct save:     {stall_ratio:.3f} (target <= 0.25"
          f"{', MET' if stall_ratio <= 0.25 else ', MISSED'})")
    print(f"  with async_save=True (snapshot only):    {med(async_stall) / med(direct):.3f}")
    print(f"verified on mirror / plain copy (slow):    {verify_ratio:.3f} (target <= 1.3"
          f"{', MET' if verify_ratio <= 1.3 else ', MISSED'})")
    print(f"verified on mirror / shutil.copy (fast):   {fast_ratio:.3f} (information: verification "
          "read and hashing on a target as fast as memory)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--rate-mb", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--local", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--mirror", type=Path,
                        default=Path("/dev/shm") if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1 or args.rate_mb <= 0:
        print("bench_mirror: --size-mb, --repeat and --rate-mb must be positive", file=sys.stderr)
        return 2
    run(args.size_mb, args.rate_mb, args.repeat, args.local, args.mirror or args.local)
    return 0


if __name__ == "__main__":
    sys.exit(main())
