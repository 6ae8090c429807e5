"""Benchmark: the real ``session-watchdog report`` command against a naive single pass (issue 17).

The log: 8 GPUs sampled every 5 s in the schema of ``session_watchdog.log.sample_event``, with
periodic checkpoint requests, acknowledgements and checkpoints; 7 days is 120,960 samples (about
250 MB). It is generated here directly, not through the daemon.

Ours: ``python -m session_watchdog report LOG --json --out report.png`` in a fresh process (the
command a user runs: interpreter start, imports, reading, summary, figure). The baseline: a naive
script in a fresh process that reads the same file once with ``json.loads`` per line, keeps the
columns it plots, and draws the same five-panel figure (step, GPU util, GPU memory, RAM, disk) with
matplotlib's Agg canvas. Both run in alternating blocks (ours, baseline, ours, ...), ``--repeat``
times; CPU time (user + sys of the child, which does not grow when other processes share the
cores), wall time and peak RSS (``ru_maxrss`` from ``os.wait4``) are printed with the ratios, and
the machine's load average beside each block. Peak RSS is also measured for ours on a log half as
long: its growth with the log's length is the last figure.

    python benchmarks/bench_report.py                # 1 day (17,280 samples): a quick look
    python benchmarks/bench_report.py --full         # 7 days x 8 GPUs (120,960 samples)
    python benchmarks/bench_report.py --days 3 --repeat 5 --keep /tmp/bench

Goal (issue 17): ours <= 1.0x the baseline's CPU time, RSS flat in the log's length. Exit code 0
either way: the figures are the output.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

GiB = 2**30
INTERVAL_S = 5.0
GPUS = 8
START = 1_800_000_000.0
ROOT = Path(__file__).resolve().parents[1]

BASELINE = r"""
import json, sys
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log, out = sys.argv[1], sys.argv[2]
t, step, ram, util, mem, disk = [], [], [], {}, {}, {}
for line in open(log, encoding="utf-8"):
    event = json.loads(line)
    if event.get("event") != "sample":
        continue
    t.append(event["elapsed_s"] / 3600)
    step.append((event.get("trainer") or {}).get("step"))
    r = event.get("ram") or {}
    ram.append((r["total_bytes"] - r["available_bytes"]) / 2**30)
    for g in event.get("gpus") or []:
        util.setdefault(g["index"], []).append(g["util_pct"])
        mem.setdefault(g["index"], []).append(g["mem_used_bytes"] / 2**30)
    for d in event.get("disks") or []:
        disk.setdefault(d["path"], []).append(d["free_bytes"] / 2**30)
fig = Figure(figsize=(12, 12), dpi=100)
FigureCanvasAgg(fig)
axes = fig.subplots(5, 1, sharex=True)
axes[0].plot(t, [float("nan") if s is None else s for s in step])
for i in util:
    axes[1].plot(t, [float("nan") if u is None else u for u in util[i]], lw=0.9)
    axes[2].plot(t, mem[i], lw=0.9)
axes[3].plot(t, ram)
for p in disk:
    axes[4].plot(t, disk[p])
fig.savefig(out, format="png")
print(json.dumps({"samples": len(t)}))
"""


def write_log(path: Path, hours: float) -> Tuple[int, int]:
    """The synthetic log of ``hours`` hours; returns (samples, bytes)."""
    rng = random.Random(6)
    samples = int(hours * 3600 / INTERVAL_S)
    dump = json.JSONEncoder(separators=(",", ":")).encode
    ckpt: Dict[str, Any] = {}
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(dump({"event": "daemon_started", "platform": "autodl", "evidence": ["bench"],
                       "run_dir": "/tmp/run", "session_start": START, "session_source": "given",
                       "budget_s": 12.5 * 3600, "interval_s": INTERVAL_S, "log_file": str(path),
                       "dry_run": False, "ts": START, "schema": 1}) + "\n")
        for k in range(samples):
            elapsed = k * INTERVAL_S
            now = START + elapsed
            # Training with a slow data-loading phase in hour 3 and idle GPUs in the last 20 min.
            idle = elapsed > (hours - 1 / 3) * 3600
            slow = 3 * 3600 <= elapsed < 3.5 * 3600
            gpus = []
            for i in range(GPUS):
                util = 1.0 if idle else (25.0 if slow else 92.0) + rng.uniform(-6, 6)
                gpus.append({"index": i, "name": "NVIDIA A100-SXM4-80GB",
                             "util_pct": None if rng.random() < 0.001 else round(util, 1),
                             "mem_used_bytes": int((30 + 5 * rng.random()) * GiB),
                             "mem_total_bytes": 80 * GiB, "temp_c": 60.0 + rng.uniform(0, 15),
                             "power_w": round(250 + rng.uniform(0, 150), 1), "error": None})
            if k % 360 == 0 and k:  # a checkpoint every 30 min
                ckpt = {"path": f"/root/autodl-tmp/ckpt/step-{k}.pt", "step": k * 3,
                        "at": now - 40, "duration_s": 35.0 + rng.uniform(0, 10), "bytes": 9 * GiB}
            event = {
                "elapsed_s": elapsed, "remaining_s": 12.5 * 3600 - elapsed,
                "budget_s": 12.5 * 3600, "nvml": "ok", "gpus": gpus,
                "ram": {"total_bytes": 256 * GiB,
                        "available_bytes": int((120 + 40 * rng.random()) * GiB),
                        "source": "cgroup2", "swap_used_bytes": 0, "cpu_pct": 60.0,
                        "oom_kills": 0},
                "disks": [{"path": "/root/autodl-tmp", "free_bytes": (400 - k // 40) * GiB,
                           "total_bytes": 500 * GiB},
                          {"path": "/", "free_bytes": 20 * GiB, "total_bytes": 30 * GiB}],
                "trainer": {"alive": not idle, "saving": False,
                            "state": "completed" if idle else "running", "step": k * 3,
                            "epoch": k // 1000, "step_time_s": 1.6, "acked_seq": k // 360,
                            "checkpoint": ckpt or None, "error": None},
                "notebook_idle_s": None, "event": "sample", "ts": now, "schema": 1,
            }
            fh.write(dump(event) + "\n")
            if k % 360 == 0 and k:
                seq = k // 360
                fh.write(dump({"kind": "request", "reason": "periodic",
                               "message": "periodic checkpoint (every 30m)", "action": "checkpoint",
                               "seq": seq, "deadline": None, "event": "decision", "ts": now,
                               "schema": 1}) + "\n")
                fh.write(dump({"step": "request_written", "reason": "periodic",
                               "action": "checkpoint", "seq": seq, "deadline": None,
                               "signal": "sent", "event": "action", "ts": now, "schema": 1}) + "\n")
        fh.write(dump({"event": "daemon_stopped", "ticks": samples, "ts": START + samples * 5,
                       "schema": 1}) + "\n")
    return samples, path.stat().st_size


def run_child(argv: List[str], stdout_path: Path) -> Tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MiB, exit code) of one child process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(stdout_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, code


def median(values: List[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=1.0, help="log length (default 1 day)")
    parser.add_argument("--full", action="store_true", help="7 days x 8 GPUs (120,960 samples)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating blocks (default 3)")
    parser.add_argument("--keep", metavar="DIR", help="write the logs and outputs here")
    opts = parser.parse_args()
    days = 7.0 if opts.full else opts.days
    tmp = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="bench-report-"))
    tmp.mkdir(parents=True, exist_ok=True)
    log, half = tmp / "session.jsonl", tmp / "half.jsonl"
    t0 = time.perf_counter()
    samples, size = write_log(log, days * 24)
    write_log(half, days * 12)
    print(f"log: {samples} samples x {GPUS} GPUs ({days:g} days at {INTERVAL_S:g} s), "
          f"{size / 2**20:.0f} MiB; written in {time.perf_counter() - t0:.1f} s")
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    ours = [sys.executable, "-m", "session_watchdog", "report", str(log), "--json",
            "--out", str(tmp / "ours.png")]
    base_script = tmp / "naive_report.py"
    base_script.write_text(BASELINE)
    baseline = [sys.executable, str(base_script), str(log), str(tmp / "baseline.png")]
    figures: Dict[str, Dict[str, List[float]]] = {
        name: {"wall": [], "cpu": [], "rss": []} for name in ("ours", "baseline")}
    for block in range(opts.repeat):
        for name, argv in (("ours", ours), ("baseline", baseline)):
            load = os.getloadavg()[0]
            wall, cpu, rss, code = run_child(argv, tmp / f"{name}.out")
            if code != 0:
                print(f"{name}: exited {code}; output in {tmp / (name + '.out')}")
                return 1
            for key, value in (("wall", wall), ("cpu", cpu), ("rss", rss)):
                figures[name][key].append(value)
            print(f"  block {block + 1} {name:8s} CPU {cpu:6.2f} s  wall {wall:6.2f} s  "
                  f"peak RSS {rss:6.0f} MiB  (load {load:.1f})")
    o, b = figures["ours"], figures["baseline"]
    print(f"report CPU time: ours {median(o['cpu']):.2f} s / naive {median(b['cpu']):.2f} s = "
          f"{median(o['cpu']) / median(b['cpu']):.2f}x (goal <= 1.0x)")
    print(f"report wall time: ours {median(o['wall']):.2f} s / naive {median(b['wall']):.2f} s = "
          f"{median(o['wall']) / median(b['wall']):.2f}x")
    print(f"peak RSS: ours {max(o['rss']):.0f} MiB / naive {max(b['rss']):.0f} MiB = "
          f"{max(o['rss']) / max(b['rss']):.2f}x")
    half_argv = [sys.executable, "-m", "session_watchdog", "report", str(half), "--json",
                 "--out", str(tmp / "half.png")]
    _, _, rss_half, _ = run_child(half_argv, tmp / "half.out")
    print(f"RSS growth with log length: ours at {days:g} days {max(o['rss']):.0f} MiB / at "
          f"{days / 2:g} days {rss_half:.0f} MiB = {max(o['rss']) / rss_half:.2f}x "
          "(1.0x = flat)")
    summary: Dict[str, Any] = json.loads((tmp / "ours.out").read_text())
    print(f"check: ours read {summary['input']['samples']} samples; baseline "
          f"{json.loads((tmp / 'baseline.out').read_text())['samples']}; outputs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
