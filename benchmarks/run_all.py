"""Run every figure of issue 17 in one command, in under 10 minutes on a busy 2-core machine.

    python benchmarks/run_all.py [--size-mb 1024] [--watch-s 60]

Each benchmark prints its figures as ours/baseline ratios with the machine load beside them;
see bench_checkpoint.py, bench_daemon.py, bench_report.py and bench_end.py for what is measured.
``--quick`` uses a 256 MiB state, a 20 s daemon window and a 1-day log (7 days otherwise).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="checkpoint state size (1024)")
    parser.add_argument("--watch-s", type=float, default=60.0, help="daemon window in s (60)")
    parser.add_argument("--device", default="cpu", help="device for the async stall (cpu)")
    parser.add_argument("--quick", action="store_true", help="256 MiB state, 20 s daemon window")
    args = parser.parse_args(argv)
    size, watch = (256, 20.0) if args.quick else (args.size_mb, args.watch_s)
    failed = 0
    for name, extra in (("bench_checkpoint.py", ["--size-mb", str(size), "--device", args.device]),
                        ("bench_daemon.py", ["--watch-s", str(watch)]),
                        ("bench_report.py", [] if args.quick else ["--full"]),
                        ("bench_end.py", ["--grace", "5s", "--size-mb", str(size)])):
        print(f"== {name} {' '.join(extra)}", flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(HERE / name), *extra], check=False)
        print(f"== {name}: exit {done.returncode}, {time.monotonic() - started:.0f} s", flush=True)
        failed |= done.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
