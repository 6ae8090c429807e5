"""Benchmark: ``session-watchdog report`` over a 12-hour log, 5 s interval, 8 GPUs (issue 6).

Target: under 3 s wall and under 300 MB peak RSS on 2 cores, for the JSON summary plus the PNG
timeline. The log (8,640 samples in the schema of ``session_watchdog.log.sample_event``, with
decisions, actions and checkpoints) is generated here directly, not through the daemon. Each
variant runs in a fresh child process (interpreter start and imports included, as a user sees
it); wall time is measured around the child and peak RSS is the child's own ``ru_maxrss``
(``os.wait4``), cross-checked with ``getrusage(RUSAGE_CHILDREN)``.

    python benchmarks/bench_report.py [--repeat 3] [--keep DIR]

Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

GiB = 2**30
HOURS = 12
INTERVAL_S = 5.0
GPUS = 8
START = 1_800_000_000.0
TARGET_WALL_S = 3.0
TARGET_RSS_MB = 300.0

CHILD = """
import argparse, sys
from session_watchdog import report
parser = argparse.ArgumentParser(prog="session-watchdog")
sub = parser.add_subparsers(dest="command")
report.add_parser(sub)
sys.exit(report.run(parser.parse_args(sys.argv[1:])))
"""


def write_log(path: Path) -> Tuple[int, int]:
    """The synthetic 12 h log; returns (samples, bytes)."""
    rng = random.Random(6)
    samples = int(HOURS * 3600 / INTERVAL_S)
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
            idle = elapsed > (HOURS - 1 / 3) * 3600
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


def run_child(args: List[str], stdout_path: Path) -> Tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MB, exit code) of one report run in a fresh interpreter."""
    with open(stdout_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=out,
                                stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024.0, proc.returncode  # ru_maxrss is KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="write the log and outputs here")
    opts = parser.parse_args()
    tmp = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="bench-report-"))
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "session.jsonl"
    t0 = time.perf_counter()
    samples, size = write_log(log)
    print(f"log: {samples} samples x {GPUS} GPUs, {HOURS} h at {INTERVAL_S:g} s, "
          f"{size / 1e6:.1f} MB, written in {time.perf_counter() - t0:.2f} s")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"Python {sys.version.split()[0]} (CPU time = user + sys of the child: the figure "
          "that does not grow when other processes share the cores)")

    variants = [
        ("json", ["report", str(log), "--json"]),
        ("json+png", ["report", str(log), "--json", "--out", str(tmp / "report.png")]),
        ("json+html", ["report", str(log), "--json", "--out", str(tmp / "report.html")]),
    ]
    ok = True
    for name, args in variants:
        walls, cpus, rsss = [], [], []
        for _ in range(opts.repeat):
            wall, cpu, rss, code = run_child(args, tmp / f"{name}.out")
            if code != 0:
                print(f"{name}: the report exited {code}")
                return 1
            walls.append(wall)
            cpus.append(cpu)
            rsss.append(rss)
        walls.sort()
        cpus.sort()
        wall_med, rss_max = walls[len(walls) // 2], max(rsss)
        verdict = "ok" if wall_med < TARGET_WALL_S and rss_max < TARGET_RSS_MB else "OVER TARGET"
        ok = ok and verdict == "ok"
        print(f"{name:10s} wall median {wall_med:.2f} s (min {walls[0]:.2f}, max {walls[-1]:.2f}) "
              f"= {wall_med / TARGET_WALL_S:.2f} x the 3 s target (CPU median "
              f"{cpus[len(cpus) // 2]:.2f} s); peak RSS {rss_max:.0f} MB "
              f"= {rss_max / TARGET_RSS_MB:.2f} x the 300 MB target  [{verdict}]")
    summary = json.loads((tmp / "json+png.out").read_text())
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(f"getrusage(RUSAGE_CHILDREN).ru_maxrss over all runs: {children_mb:.0f} MB")
    print(f"check: {summary['input']['samples']} samples read, {len(summary['gpus'])} GPUs, "
          f"input-bound hint: {summary['input_bound']['suspected']}, PNG "
          f"{(tmp / 'report.png').stat().st_size / 1e3:.0f} kB, HTML "
          f"{(tmp / 'report.html').stat().st_size / 1e3:.0f} kB, outputs in {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
