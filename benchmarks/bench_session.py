"""Session overhead and request latency, measured side by side in one run.

    python benchmarks/bench_session.py [--steps 2000000] [--samples 40] [--poll-interval 0.25]

1. Per-step cost of ``session.step()`` against an empty loop iteration and a no-op method call
   (target: at most 1 us per step over the empty loop).
2. Latency from a request written to ``request.json`` until the training loop sees the flag and
   until the checkpoint starts at a step boundary (simulated 1 ms steps):
   - signal path (write the request, then SIGUSR1 to ourselves, as the daemon does): target p99
     at most 50 ms;
   - poll path (no signal): target p99 at most poll interval + 50 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from session_watchdog.channel import Request, RunDir
from session_watchdog.trainer.session import Session

STEP_S = 0.001  # simulated work per training step in the latency runs


class _Noop:
    def step(self) -> None:
        pass


def _loop_ns(body: Callable[[], None], n: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` nanoseconds per iteration of ``for _ in range(n): body()``."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter_ns()
        for _ in range(n):
            body()
        best = min(best, (time.perf_counter_ns() - began) / n)
    return best


def _empty_ns(n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter_ns()
        for _ in range(n):
            pass
        best = min(best, (time.perf_counter_ns() - began) / n)
    return best


def bench_step(base: Path, n: int) -> Dict[str, float]:
    session = Session(base / "ckpt-step", model=torch.nn.Linear(4, 4), run_dir=base / "run-step",
                      checkpoint_every=None, handle_signals=False)
    try:
        empty = _empty_ns(n)
        noop = _loop_ns(_Noop().step, n)
        step = _loop_ns(session.step, n)
    finally:
        session.close()
    return {"empty_ns": empty, "noop_call_ns": noop, "step_ns": step}


def _percentile(values: List[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(pct / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def bench_latency(base: Path, name: str, *, use_signal: bool, poll_interval: float,
                  samples: int) -> Dict[str, List[float]]:
    """Write ``samples`` checkpoint requests; time request -> flag -> save start -> ack."""
    run_dir = base / f"run-{name}"
    session = Session(base / f"ckpt-{name}", model=torch.nn.Linear(4, 4), run_dir=run_dir,
                      checkpoint_every=None, handle_signals=use_signal,
                      poll_interval=poll_interval, heartbeat_interval=60.0)
    channel = RunDir(run_dir)
    save_started: List[float] = []
    real_save = session.manager.save

    def timed_save(state: Dict[str, Any], **kwargs: Any) -> Any:
        save_started.append(time.perf_counter())
        return real_save(state, **kwargs)

    session.manager.save = timed_save  # type: ignore[method-assign]
    flag_s: List[float] = []
    boundary_s: List[float] = []
    ack_s: List[float] = []
    rng = random.Random(0)
    try:
        for _ in range(20):
            session.step()
            time.sleep(STEP_S)
        for seq in range(1, samples + 2):  # seq 1 warms up (first torch.save, first fsyncs)
            # Land uniformly within the poll cycle, as a daemon's ticks would.
            time.sleep(rng.uniform(0, poll_interval) if not use_signal else 0.01)
            channel.write_request(Request(seq=seq, action="checkpoint", reason="bench",
                                          deadline=None, issued=time.time()))
            written = time.perf_counter()
            if use_signal:
                os.kill(os.getpid(), signal.SIGUSR1)
            flagged: Optional[float] = None
            deadline = written + poll_interval + 5.0
            while session.acked_seq < seq:
                if flagged is None and session._pending:  # peek: the flag step() reads
                    flagged = time.perf_counter()
                session.step()
                time.sleep(STEP_S)
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"request {seq} not acknowledged in time")
            acked = time.perf_counter()
            if seq == 1:
                continue
            flag_s.append((flagged if flagged is not None else save_started[-1]) - written)
            boundary_s.append(save_started[-1] - written)
            ack_s.append(acked - written)
    finally:
        session.close()
    return {"flag": flag_s, "boundary": boundary_s, "ack": ack_s}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2_000_000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--poll-interval", type=float, default=0.25)
    args = parser.parse_args(argv)

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-session-") as tmp:
        base = Path(tmp)
        figures = bench_step(base, args.steps)
        overhead = figures["step_ns"] - figures["empty_ns"]
        print(f"\n1. per-step cost, best of 5 x {args.steps:,} iterations")
        print(f"   empty loop iteration      {figures['empty_ns']:8.1f} ns")
        print(f"   no-op method call         {figures['noop_call_ns']:8.1f} ns")
        print(f"   session.step()            {figures['step_ns']:8.1f} ns")
        print(f"   overhead over empty loop  {overhead:8.1f} ns  "
              f"({figures['step_ns'] / figures['noop_call_ns']:.2f}x a no-op call)  "
              f"target <= 1000 ns: {'met' if overhead <= 1000 else 'MISSED'}")
        ok &= overhead <= 1000

        print(f"\n2. request -> flag -> checkpoint start -> ack, {args.samples} requests, "
              f"{STEP_S * 1e3:.0f} ms steps")
        for name, use_signal in (("signal", True), ("poll", False)):
            result = bench_latency(base, name, use_signal=use_signal,
                                   poll_interval=args.poll_interval, samples=args.samples)
            target = 0.050 if use_signal else args.poll_interval + 0.050
            label = ("signal path (write + SIGUSR1)" if use_signal
                     else f"poll path (poll_interval {args.poll_interval:g} s)")
            print(f"   {label}")
            for key in ("flag", "boundary", "ack"):
                values = result[key]
                print(f"     {key:9s} p50 {statistics.median(values) * 1e3:8.2f} ms   "
                      f"p99 {_percentile(values, 99) * 1e3:8.2f} ms   "
                      f"max {max(values) * 1e3:8.2f} ms")
            p99 = _percentile(result["flag"], 99)
            met = p99 <= target
            ok &= met
            print(f"     flag p99 target <= {target * 1e3:.0f} ms: {'met' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
