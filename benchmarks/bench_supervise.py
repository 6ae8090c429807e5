"""Crashes and hangs (issue 13), as ratios measured side by side in one run.

1. Snapshot stall: ``Session(snapshot_every=...)``'s pause of the training loop (copy of the state
   into CPU buffers; the ``torch.save`` into ``/dev/shm`` runs in the background) against a
   synchronous ``CheckpointManager.save`` of the same state (the loop waits for serialise, write,
   fsync, marker). Target <= 0.1 (0.05 hoped). Also the step-time overhead of one snapshot a
   minute, target <= 1 %: derived (stall / 60 s), and measured - a real training loop of the same
   state with ``snapshot_every`` a few seconds against the same loop without, in alternating
   blocks (the background write's CPU included), scaled to one snapshot a minute.
2. Steps lost per crash: a real (tiny) trainer under ``session-watchdog run --restarts`` crashes
   at N random steps (default 20, one per checkpoint interval, at a random place in it); lost =
   crash step - step the next attempt starts at. With snapshots every S steps against periodic
   checkpoints every C steps alone (the same crashes). Target: lost <= S with snapshots (ratio
   max lost / S <= 1).
3. Hang detection: a real trainer hangs (its main thread sleeps inside a step); latency = how
   long its step had stood still when ``trainer_hung`` was decided, against the learned timeout
   + 1 tick (target ratio <= 1). And false hangs: the policy over a simulated hour of steps whose
   time varies +-50 % at random, ticked every 5 s (target 0).

Usage: ``python benchmarks/bench_supervise.py [--size-mb 64] [--repeat 3] [--crashes 20]``.
Parts 2 and 3 start real processes (each imports torch: on a busy machine that takes a while).
The trainer is ``tests/supervise_trainer.py``. Missed targets are printed, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "tests" / "supervise_trainer.py"


def model_state(size_mb: int) -> Dict[str, Any]:
    """A model of about ``size_mb`` MiB of float32 parameters plus SGD momentum of the same size."""
    width = 1024
    layers = max(1, size_mb * 2**20 // (4 * width * width) // 2)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}


def bench_stall(size_mb: int, repeat: int) -> Dict[str, float]:
    from session_watchdog.trainer.checkpoint import CheckpointManager
    from session_watchdog.trainer.snapshot import Snapshotter

    state = model_state(size_mb)
    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(Path(tmp) / "ckpt", keep=1)
        snap = Snapshotter(Path(tmp) / "run", Path(tmp) / "ckpt", "ckpt", 1, None, lambda r: None)
        saves, stalls = [], []
        try:
            for i in range(repeat + 1):  # the first of each warms buffers and page cache
                started = time.perf_counter()
                manager.save(state, step=i + 1)
                save_s = time.perf_counter() - started
                stall = snap.take(state, step=i + 1, epoch=0)
                snap.wait()
                if i and stall is not None:
                    saves.append(save_s)
                    stalls.append(stall)
        finally:
            snap.remove()
    save = statistics.median(saves)
    stall = statistics.median(stalls)
    return {"save_s": save, "stall_s": stall, "ratio": stall / save, "overhead_1min_pct": 100 * stall / 60}


def bench_overhead(size_mb: int, every_s: float, block_s: float, blocks: int) -> Dict[str, float]:
    """Mean step time of a real loop with snapshots every ``every_s`` vs without (alternating)."""
    from session_watchdog import snapshot_slots
    from session_watchdog.trainer import Session

    torch.manual_seed(0)
    width = 1024
    layers = max(1, size_mb * 2**20 // (4 * width * width) // 2)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    x = torch.randn(32, width)
    per_step: Dict[str, List[float]] = {"off": [], "on": []}
    snapshots = 0
    with tempfile.TemporaryDirectory() as tmp:
        for block in range(blocks):
            for label in ("off", "on"):
                run = Path(tmp) / f"run-{label}-{block}"
                session = Session(Path(tmp) / "ckpt", model=model, optimizer=opt, run_dir=run,
                                  checkpoint_every=None, poll_interval=0.1, handle_signals=False,
                                  snapshot_every=f"{every_s}s" if label == "on" else None)
                try:
                    steps, started = 0, time.perf_counter()
                    while time.perf_counter() - started < block_s:
                        loss = model(x).pow(2).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        session.step()
                        steps += 1
                    per_step[label].append((time.perf_counter() - started) / steps)
                    if session._snapshots is not None:
                        session._snapshots.wait()
                        snapshots += session._snapshots._gen
                finally:
                    session.close()
                    shutil.rmtree(snapshot_slots.snapshot_dir(run), ignore_errors=True)
    off, on = statistics.median(per_step["off"]), statistics.median(per_step["on"])
    measured_pct = 100 * (on / off - 1)
    return {"off_ms": off * 1e3, "on_ms": on * 1e3, "measured_pct": measured_pct,
            "per_min_pct": measured_pct * every_s / 60, "snapshots": snapshots,
            "every_s": every_s}


def watched(tmp: Path, trainer_args: List[str], *flags: str) -> tuple[str, List[Dict[str, Any]]]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "session_watchdog", "run", "--interval", "0.3s", "--platform",
            "generic", "--run-dir", str(tmp / "run"), "--log-file", str(tmp / "log.jsonl"), *flags,
            "--", sys.executable, str(TRAINER), str(tmp / "ckpt"), str(tmp / "out.pt"), *trainer_args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"watched run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    log = [json.loads(line) for line in (tmp / "log.jsonl").read_text().splitlines() if line.strip()]
    return proc.stdout, log


def lost_per_crash(stdout: str) -> List[int]:
    starts = {int(a): int(s) for a, s in re.findall(r"attempt (\d+) starts at step (\d+)", stdout)}
    crashes = {int(a): int(s) for a, s in re.findall(r"attempt (\d+) crashes at step (\d+)", stdout)}
    return [step - starts[a + 1] for a, step in sorted(crashes.items()) if a + 1 in starts]


def bench_crashes(crashes: int, snapshot_every: int, checkpoint_every: int,
                  seed: int = 13) -> Dict[str, Any]:
    rng = random.Random(seed)
    steps = checkpoint_every * (crashes + 1) + 5
    # attempt i crashes inside its own checkpoint interval, at a random step
    crash_at = [checkpoint_every * i + rng.randint(1, checkpoint_every - 1) for i in range(crashes)]
    out: Dict[str, Any] = {"crash_at": crash_at}
    for label, extra in (("snapshots", ["--snapshot-every", str(snapshot_every)]), ("checkpoints", [])):
        with tempfile.TemporaryDirectory() as tmp:
            stdout, _ = watched(Path(tmp), ["--steps", str(steps), "--save-every", str(checkpoint_every),
                                            "--crash-at", ",".join(map(str, crash_at)),
                                            "--step-sleep", "0", *extra],
                                "--restarts", str(crashes + 1), "--restart-backoff", "0.1s",
                                "--restart-backoff-max", "0.2s",  # else it doubles to minutes
                                "--restart-no-progress", str(crashes + 1),
                                "--restart-storm", str(crashes + 1))
            out[label] = lost_per_crash(stdout)
    return out


def bench_hang() -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        _, log = watched(Path(tmp), ["--steps", "40", "--save-every", "10", "--hang-at", "25",
                                     "--step-sleep", "0.1"],
                         "--restarts", "1", "--restart-backoff", "0.1s", "--hang-floor", "2s",
                         "--kill-after", "2s")
    hang = [e for e in log if e["event"] == "decision" and e.get("reason") == "trainer_hung"][0]
    return {"stuck_s": hang["stuck_s"], "timeout_s": hang["timeout_s"], "tick_s": 0.3,
            "ratio": hang["stuck_s"] / (hang["timeout_s"] + 0.3)}


def false_hangs(hours: float = 1.0, seed: int = 7) -> Dict[str, int]:
    """The pure policy over a simulated run: step time 2 s +-50 % at random, ticks every 5 s."""
    from session_watchdog.channel import TrainerStatus
    from session_watchdog.config import Config
    from session_watchdog.policy import PolicyState, decide
    from session_watchdog.probes import Sample, TrainerReading

    rng = random.Random(seed)
    config = Config(platform="generic", checkpoint_every=0.0, hang_floor=1.0)
    state = PolicyState()
    t, step, next_step, hangs, ticks = 0.0, 0, 0.0, 0, 0
    while t < hours * 3600:
        t += 5.0
        while next_step <= t:
            step += 1
            next_step += 2.0 * rng.uniform(0.5, 1.5)
        status = TrainerStatus(pid=1, start_time=1.0, state="running", step=step, epoch=0,
                               step_time_s=2.0, acked_seq=0, last_checkpoint=None, heartbeat=t)
        state, decisions = decide(config, state, Sample(
            now=t, elapsed_s=t, trainer=TrainerReading(True, False, status)))
        hangs += sum(d.reason == "trainer_hung" for d in decisions)
        ticks += 1
    return {"ticks": ticks, "steps": step, "false_hangs": hangs}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--crashes", type=int, default=20)
    parser.add_argument("--snapshot-every", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=13, help="where the crashes fall")
    parser.add_argument("--overhead-every-s", type=float, default=2.0,
                        help="snapshot interval of the measured overhead loop (scaled to 60 s)")
    parser.add_argument("--overhead-block-s", type=float, default=6.0)
    parser.add_argument("--overhead-blocks", type=int, default=3)
    args = parser.parse_args()

    stall = bench_stall(args.size_mb, args.repeat)
    print(f"1. snapshot stall {stall['stall_s'] * 1e3:.1f} ms vs synchronous checkpoint "
          f"{stall['save_s'] * 1e3:.1f} ms of {args.size_mb} MiB (weights + momentum): "
          f"ratio {stall['ratio']:.3f} "
          f"(target <= 0.1) {'OK' if stall['ratio'] <= 0.1 else 'MISSED'}; one snapshot a minute "
          f"costs {stall['overhead_1min_pct']:.3f} % of step time (stall / 60 s; target <= 1 %)",
          flush=True)
    over = bench_overhead(args.size_mb, args.overhead_every_s, args.overhead_block_s,
                          args.overhead_blocks)
    print(f"   measured: step {over['on_ms']:.2f} ms with a snapshot every {over['every_s']:g} s "
          f"({over['snapshots']} taken) vs {over['off_ms']:.2f} ms without: "
          f"{over['measured_pct']:+.2f} %; at snapshot_every=60 s: {over['per_min_pct']:+.3f} % "
          f"(target <= 1 %) {'OK' if over['per_min_pct'] <= 1 else 'MISSED'}", flush=True)
    started = time.monotonic()
    lost = bench_crashes(args.crashes, args.snapshot_every, args.checkpoint_every, args.seed)
    snaps, ckpts = lost["snapshots"], lost["checkpoints"]
    print(f"2. steps lost per crash, {len(lost['crash_at'])} random crashes "
          f"({time.monotonic() - started:.0f} s):")
    print(f"   crash  lost(snapshot every {args.snapshot_every})  "
          f"lost(checkpoint every {args.checkpoint_every} alone)")
    for i, at in enumerate(lost["crash_at"]):
        print(f"   {at:5d}  {snaps[i] if i < len(snaps) else '-':>24}  "
              f"{ckpts[i] if i < len(ckpts) else '-':>32}")
    if snaps and ckpts:
        worst = max(snaps)
        print(f"   with snapshots: mean {statistics.mean(snaps):.2f}, max {worst} = "
              f"{worst / args.snapshot_every:.2f} x the snapshot interval {args.snapshot_every} "
              f"(target <= 1) {'OK' if worst <= args.snapshot_every else 'MISSED'}; checkpoints "
              f"alone: mean {statistics.mean(ckpts):.2f}, max {max(ckpts)} "
              f"(<= checkpoint_every {args.checkpoint_every})", flush=True)
    hang = bench_hang()
    print(f"3. hang detected after {hang['stuck_s']:.2f} s standing still; learned timeout "
          f"{hang['timeout_s']:.2f} s + 1 tick {hang['tick_s']} s: ratio {hang['ratio']:.2f} "
          "(target <= 1)")
    fh = false_hangs()
    print(f"   false hangs over a simulated hour ({fh['steps']} steps of 2 s +-50 %, "
          f"{fh['ticks']} ticks): {fh['false_hangs']} (target 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
