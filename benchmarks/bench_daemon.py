"""Daemon cost as users pay it, each figure beside its baseline in one run.

    python benchmarks/bench_daemon.py [--watch-s 60] [--repeat 3] [--ticks 400]

- the real ``session-watchdog run`` process (default 5 s interval, a scratch run dir and log):
  RSS after ``--watch-s`` seconds vs a bare ``python`` sleeping (goal <= 2.5x), and its CPU share
  over that window (its threads' schedstat, goal <= 0.1 % of a core), beside a naive poller
  that spawns an nvidia-smi stand-in every 5 s over the same window (goal <= 0.5x);
- start-up of ``session-watchdog --help`` and ``session-watchdog status`` (of a run dir a real
  watchdog filled) vs a bare interpreter (``python -c pass``): goal <= +0.15 s; the heaviest
  imports of each (``-X importtime``) are listed;
- one tick with a stand-in NVML of 8 GPUs (its state parsed once, injected where the probes take
  their NVML entry point, ``probes.Nvml(module=...)``) vs one ``subprocess.run(["true"])``, the
  floor of any nvidia-smi poll: goal <= 0.25x. CPU time (``time.process_time``), not wall time.
  Also reported: the same tick with a trainer attached (``run.lock`` held, ``trainer.json`` read
  and parsed each tick) and with 64 GPUs. The real daemon above runs with a trainer attached
  too (a process holding ``run.lock`` and rewriting ``trainer.json`` every 5 s, as a training
  ``Session`` does; ``--no-trainer`` leaves it out).

On a machine with an NVIDIA driver (``--nvml auto``, the default, finds it; ``--nvml live``
insists) the tick is also measured with the live NVML against one real ``nvidia-smi --query-gpu``
run, the way nvidia-smi pollers read the same fields, and the naive poller spawns the real
nvidia-smi; the GPUs' persistence mode is printed as found (it is left as it is).

Figures alternate in blocks, ``--repeat`` times, with the 1-minute load average beside each.

``--against TREE`` compares only the real daemon's CPU with that of another checkout (e.g. a
``git worktree`` of an earlier commit), both running at the same time, each with a trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

PYTHON = sys.executable
CLI = [PYTHON, "-m", "session_watchdog"]


def load() -> float:
    return os.getloadavg()[0]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s threads in ns (schedstat): /proc/PID/stat counts 10 ms clock ticks,
    and an idle daemon uses about one tick a minute."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            pass
    return total / 1e9


# The naive poller users write instead: every 5 s spawn nvidia-smi, parse its CSV. The stand-in
# for nvidia-smi is `cat` of the CSV an 8-GPU machine prints (one exec, the floor of the real
# binary, which also starts NVML); its CPU counts for the poller. On SIGUSR1 the poller writes
# its own and its reaped children's CPU time (getrusage: not rounded to clock ticks) to a file.
NAIVE_POLLER = r"""
import json, os, resource, signal, subprocess, sys, time
command, report = json.loads(sys.argv[1]), sys.argv[2]

def cpu(signum, frame):
    used = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))
    with open(report + ".tmp", "w") as fh:
        fh.write(repr(used))
    os.replace(report + ".tmp", report)

signal.signal(signal.SIGUSR1, cpu)
while True:
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [line.split(", ") for line in out.splitlines()]
    busy = [float(r[3]) if r[3].strip().isdigit() else None for r in rows]  # "[N/A]" on MIG
    time.sleep(5.0)
"""
SMI_CSV = "".join(f"{i}, NVIDIA H100 80GB HBM3, GPU-{i:04d}, {90 + i}, {(10 + i) * 1024}, 81559, "
                  f"{60 + i}, {300 + i}.00\n" for i in range(8))
# What the real nvidia-smi is asked for: the fields a tick reads, as a poller asks for them.
SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,uuid,utilization.gpu,memory.used,memory.total,"
             "temperature.gpu,power.draw", "--format=csv,noheader,nounits"]


NVML_USER = r"""
import ctypes, time, pynvml
pynvml.nvmlInit()
for i in range(pynvml.nvmlDeviceGetCount()):
    gpu = pynvml.nvmlDeviceGetHandleByIndex(i)
    pynvml.nvmlDeviceGetUtilizationRates(gpu), pynvml.nvmlDeviceGetMemoryInfo(gpu)
ctypes.CDLL(None).malloc_trim(0)
time.sleep(3600)
"""


def live_nvml() -> Optional[str]:
    """``"N GPUs, persistence mode on/off/mixed"`` when NVML starts here, else None."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        try:
            modes = {int(pynvml.nvmlDeviceGetPersistenceMode(pynvml.nvmlDeviceGetHandleByIndex(i)))
                     for i in range(count)}
        except pynvml.NVMLError:  # not supported on this GPU or platform
            modes = set()
        mode = {frozenset({1}): "on", frozenset({0}): "off"}.get(frozenset(modes), "unknown")
        return f"{count} GPUs, persistence mode {mode}"
    finally:
        pynvml.nvmlShutdown()


# --------------------------------------------------------------------------------------------
# The real daemon process


# A trainer as the daemon sees one (what the trainer side does through its Session, without torch):
# it holds run.lock for its life and rewrites trainer.json about every 5 s (the default
# heartbeat). The period is drawn from 4-6 s: a fixed 5 s locked the trainer's wake-ups to a
# constant phase against the daemon's ticks, and how warm the shared interpreter code was at a
# tick moved the daemon's CPU by up to +-30 % between otherwise identical runs.
HEARTBEAT_TRAINER = r"""
import os, random, sys, time
from pathlib import Path
from session_watchdog import channel
run_dir = channel.RunDir(Path(sys.argv[1]), create=True)
lock = run_dir.lock(channel.RUN_LOCK)
lock.acquire()
start, step = time.time(), 0
while True:
    now = time.time()
    step += 12
    run_dir.write_status(channel.TrainerStatus(
        pid=os.getpid(), start_time=start, state="running", step=step, epoch=0, step_time_s=0.41,
        acked_seq=0, heartbeat=now, extra={}, last_checkpoint=None))
    time.sleep(random.uniform(4.0, 6.0))
"""


def watch_daemon(seconds: float, scratch: Path, trainer: bool = True,
                 live: bool = False) -> Dict[str, float]:
    """Start ``session-watchdog run``, let it run ``seconds``, read RSS and CPU, stop it.

    ``trainer``: a heartbeat-writing trainer is attached (its own CPU is not counted).
    ``live``: the naive poller runs the real nvidia-smi (the daemon reads the live NVML anyway)."""
    env = dict(os.environ)
    env["SESSION_WATCHDOG_RUN_DIR"] = str(scratch / "run")
    started: List[subprocess.Popen[bytes]] = []  # every process, reaped in the finally below

    def start(argv: List[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(subprocess.Popen(argv, start_new_session=True, **kwargs))
        return started[-1]
    try:
        return _watch(seconds, scratch, trainer, live, env, start)
    finally:
        for p in started:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _watch(seconds: float, scratch: Path, trainer: bool, live: bool, env: Dict[str, str],
           start: Callable[..., subprocess.Popen[bytes]]) -> Dict[str, float]:
    if trainer:
        start([PYTHON, "-c", HEARTBEAT_TRAINER, str(scratch / "run")], env=env)
    argv = [*CLI, "run", "--log-file", str(scratch / "log.jsonl"), "--watch-paths", str(scratch),
            "--max-session", "12h"]
    proc = start(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE)
    bare = start([PYTHON, "-c", "import time; time.sleep(3600)"])
    # With a live NVML, also a bare python holding NVML as any NVML user does (nvidia-ml-py
    # imported, nvmlInit, every GPU read once, the C heap trimmed as the daemon trims it): the
    # library's own share of the daemon's RSS.
    nvml_user = start([PYTHON, "-c", NVML_USER]) if live else None
    (scratch / "smi.csv").write_text(SMI_CSV)
    naive_cpu = scratch / "naive-cpu"
    command = SMI_QUERY if live else ["cat", str(scratch / "smi.csv")]
    naive = start([PYTHON, "-c", NAIVE_POLLER, json.dumps(command), str(naive_cpu)])

    def naive_seconds() -> float:
        """Ask the poller for its CPU time (SIGUSR1) and read it."""
        naive_cpu.unlink(missing_ok=True)
        os.kill(naive.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not naive_cpu.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the naive poller did not report its CPU time")
            time.sleep(0.05)
        return float(naive_cpu.read_text())
    log = scratch / "log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and b'"sample"' in log.read_bytes()):
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr is not None else ""
            raise RuntimeError(f"the daemon exited: {err[-2000:]}")
        time.sleep(0.2)
    cpu0, t0, load0 = cpu_seconds(proc.pid), time.monotonic(), load()
    naive0 = naive_seconds()
    time.sleep(seconds)
    cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
    naive1 = naive_seconds()
    if trainer:  # the daemon must have read the trainer's status, not failed on it
        last = [json.loads(line) for line in log.read_text().splitlines()
                if '"event":"sample"' in line.replace(" ", "")][-1]["trainer"]
        if not last["alive"] or last["state"] != "running" or last["error"] is not None:
            raise RuntimeError(f"the daemon did not read the trainer's status: {last}")
    return {"rss": rss_bytes(proc.pid), "bare_rss": rss_bytes(bare.pid),
            "nvml_user_rss": rss_bytes(nvml_user.pid) if nvml_user is not None else 0,
            "cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0), "window_s": t1 - t0,
            "naive_cpu_pct": 100.0 * (naive1 - naive0) / (t1 - t0),
            "load": max(load0, load())}


def side_by_side(against: Path, seconds: float, repeat: int) -> List[Tuple[float, float, float]]:
    """The real daemon of this tree and of ``against`` (another checkout: PYTHONPATH=against), run
    at the same time, each with its own heartbeat trainer and run dir, the order of their starts
    alternating between repeats: (ours, theirs) CPU in % of a core over ``seconds`` after a 15 s
    warm-up, and the load, per repeat."""
    ours = Path(__file__).resolve().parent.parent
    out = []
    for index in range(repeat):
        started: List[subprocess.Popen[bytes]] = []
        try:
            daemons, logs = {}, {}
            for tree in (ours, against) if index % 2 == 0 else (against, ours):
                scratch = Path(tempfile.mkdtemp(prefix="bench-daemon-side-"))
                env = dict(os.environ, PYTHONPATH=str(tree),
                           SESSION_WATCHDOG_RUN_DIR=str(scratch / "run"))
                for argv in ([PYTHON, "-c", HEARTBEAT_TRAINER, str(scratch / "run")],
                             [*CLI, "run", "--log-file", str(scratch / "log.jsonl"),
                              "--watch-paths", str(scratch), "--max-session", "12h"]):
                    started.append(subprocess.Popen(argv, env=env, start_new_session=True,
                                                    stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL))
                daemons[tree] = started[-1].pid
                logs[tree] = scratch / "log.jsonl"
            time.sleep(15.0)
            cpu0, t0, load0 = {t: cpu_seconds(p) for t, p in daemons.items()}, time.monotonic(), load()
            time.sleep(seconds)
            cpu1, t1 = {t: cpu_seconds(p) for t, p in daemons.items()}, time.monotonic()
            for tree, log in logs.items():  # each daemon read its trainer's status to the end
                last = [json.loads(line) for line in log.read_text().splitlines()
                        if '"event":"sample"' in line][-1]["trainer"]
                if not last["alive"] or last["state"] != "running" or last["error"] is not None:
                    raise RuntimeError(f"the daemon of {tree} did not read its trainer: {last}")
            pct = {t: 100.0 * (cpu1[t] - cpu0[t]) / (t1 - t0) for t in daemons}
            out.append((pct[ours], pct[against], max(load0, load())))
        finally:
            for p in started:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait()
    return out


# --------------------------------------------------------------------------------------------
# Start-up


def startup(argv: List[str], env: Dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def heavy_imports(argv: List[str], env: Dict[str, str], top: int = 6) -> List[Tuple[str, float]]:
    """The top-level imports with the largest cumulative time, from ``-X importtime``."""
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, capture_output=True,
                          text=True, check=False)
    found: Dict[str, float] = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) <= 1:  # top-level imports only
            found[match.group(3)] = int(match.group(1)) / 1e6
    return sorted(found.items(), key=lambda kv: -kv[1])[:top]


# --------------------------------------------------------------------------------------------
# The tick with 8 GPUs


def gpu_state(count: int) -> str:
    return json.dumps([{"name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{i:04d}", "util": 90 + i,
                        "used": (10 + i) << 30, "total": 80 << 30, "temp": 60 + i,
                        "power_mw": 300_000 + i} for i in range(count)])


GPU_STATE = gpu_state(8)


class StandInNvml:
    """The nvidia-ml-py functions ``probes.Nvml`` calls, over a state parsed once."""

    def __init__(self, state: str) -> None:
        import pynvml  # only its plain ctypes structs; no call into the library

        self._pynvml = pynvml
        self.gpus = json.loads(state)

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Dict[str, Any]:
        return self.gpus[index]  # type: ignore[no-any-return]

    def nvmlDeviceGetUtilizationRates(self, gpu: Dict[str, Any]) -> Any:
        return self._pynvml.c_nvmlUtilization_t(gpu=gpu["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, gpu: Dict[str, Any]) -> Any:
        return self._pynvml.c_nvmlMemory_t(total=gpu["total"], free=gpu["total"] - gpu["used"],
                                           used=gpu["used"])

    def nvmlDeviceGetPowerUsage(self, gpu: Dict[str, Any]) -> int:
        return int(gpu["power_mw"])

    def nvmlDeviceGetTemperature(self, gpu: Dict[str, Any], sensor: int) -> int:
        return int(gpu["temp"])

    def nvmlDeviceGetName(self, gpu: Dict[str, Any]) -> str:
        return str(gpu["name"])

    def nvmlDeviceGetUUID(self, gpu: Dict[str, Any]) -> str:
        return str(gpu["uuid"])

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: Dict[str, Any]) -> List[Any]:
        return []


def children_and_self_cpu() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))


def tick_vs_true(ticks: int, scratch: Path, gpus: int = 8, trainer: bool = False,
                 live: bool = False,
                 baseline: Tuple[str, ...] = ("true",)) -> Tuple[float, float, float, str]:
    """CPU seconds of one tick (``gpus`` stand-in GPUs) and of one ``subprocess.run(baseline)``.

    ``trainer``: a trainer is attached, as while training: ``run.lock`` held (through another
    open file description, as a trainer process holds it) and a ``trainer.json`` with a
    checkpoint, read and parsed on every tick as the daemon does.
    ``live``: the tick reads this machine's GPUs through the real NVML (``gpus`` is ignored).
    """
    from session_watchdog import channel, log, platforms, probes
    from session_watchdog.config import Config
    from session_watchdog.daemon import Watchdog

    name = f"{'live' if live else gpus}-{'trainer' if trainer else 'alone'}-{baseline[0]}"
    cfg = Config.build(run_dir=str(scratch / f"tick-run-{name}"),
                       log_file=str(scratch / f"tick-{name}.jsonl"),
                       max_session="12h", watch_paths=str(scratch))
    log.configure(cfg.log_file, console=None)
    nvml = probes.Nvml() if live else probes.Nvml(module=StandInNvml(gpu_state(gpus)))
    assert cfg.run_dir is not None  # given above
    probe = probes.SystemProbe(channel.RunDir(cfg.run_dir), cfg.watch_paths, nvml=nvml)
    dog = Watchdog(cfg, platform=platforms.Platform("generic", ("bench",)), probe=probe)
    held = None
    if trainer:
        run_dir = channel.RunDir(cfg.run_dir)
        held = run_dir.lock(channel.RUN_LOCK)
        held.acquire()
        now = time.time()
        run_dir.write_status(channel.TrainerStatus(
            pid=os.getpid(), start_time=now, state="running", step=12_000, epoch=3,
            step_time_s=0.41, acked_seq=0, heartbeat=now, extra={},
            last_checkpoint=channel.CheckpointInfo(
                path=str(scratch / "ckpt" / "step-12000.pt"), seq=None, step=12_000, at=now,
                duration_s=2.1, bytes=1 << 30, sha256="", checksum="crc32c:0a1b2c3d")))
    try:
        for _ in range(20):
            dog.tick()

        def cpu_per_call(fn: Callable[[], object], n: int) -> float:
            started = time.process_time()
            for _ in range(n):
                fn()
            return (time.process_time() - started) / n

        def true() -> None:
            subprocess.run(baseline, check=True, stdout=subprocess.DEVNULL)

        load0 = load()
        tick_s, true_s = [], []
        for _ in range(8):  # alternating blocks
            tick_s.append(cpu_per_call(dog.tick, max(1, ticks // 8)))
            # the parent's CPU for fork+exec+wait, plus the child's (RUSAGE_CHILDREN); getrusage
            # counts microseconds (os.times counts 10 ms clock ticks: a block of 50 runs read
            # 0.6 or 0.8 ms per run by rounding alone)
            c0 = children_and_self_cpu()
            n = max(1, ticks // 8)
            for _ in range(n):
                true()
            true_s.append((children_and_self_cpu() - c0) / n)
        if trainer:  # the tick must read the trainer's status, not fail on it
            reading = dog.last_sample.trainer if dog.last_sample is not None else None
            if reading is None or reading.status is None or reading.status_error is not None:
                raise RuntimeError(f"the tick did not read the trainer's status: {reading}")
        state = dog.last_sample.nvml if dog.last_sample is not None else "?"
        gpus = len(dog.last_sample.gpus) if dog.last_sample is not None else 0
        return statistics.median(tick_s), statistics.median(true_s), max(load0, load()), \
            f"{state}, {gpus} GPUs"
    finally:
        if held is not None:
            held.release()
        dog.probe.close()  # type: ignore[attr-defined]
        log.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--watch-s", type=float, default=60.0,
                        help="how long the real daemon runs before RSS/CPU are read (60)")
    parser.add_argument("--repeat", type=int, default=3, help="start-up measurements x5 (3)")
    parser.add_argument("--ticks", type=int, default=400, help="ticks per tick figure (400)")
    parser.add_argument("--no-trainer", action="store_true",
                        help="watch the real daemon with no trainer attached")
    parser.add_argument("--nvml", choices=("auto", "live", "stand-in"), default="auto",
                        help="live NVML and the real nvidia-smi where a driver answers (auto), "
                             "always (live) or never (stand-in)")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="only compare the real daemon's CPU (a trainer attached) with the one "
                             "of another checkout TREE, side by side, --repeat times")
    args = parser.parse_args(argv)
    if args.against is not None:
        if not (args.against / "session_watchdog" / "daemon.py").is_file():
            print(f"error: --against {args.against}: not a session-watchdog checkout; pass the "
                  "directory that holds session_watchdog/", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        for ours, theirs, ld in side_by_side(args.against.resolve(), args.watch_s, args.repeat):
            print(f"`run` CPU vs {args.against}  {ours:.4f} % vs {theirs:.4f} %  "
                  f"{ours / theirs if theirs else float('nan'):8.3f}  load {ld:.1f}")
        return 0
    found = live_nvml() if args.nvml != "stand-in" else None
    smi = shutil.which("nvidia-smi")
    if args.nvml == "live" and (found is None or smi is None):
        why = "NVML does not start" if found is None else "nvidia-smi is not on PATH"
        print(f"error: --nvml live, but {why} on this machine; use --nvml stand-in",
              file=sys.stderr)
        return 2
    live = found is not None and smi is not None
    # A timeout's SIGTERM ends the run through the finally blocks that reap every child.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scratch = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    env = dict(os.environ, SESSION_WATCHDOG_RUN_DIR=str(scratch / "status-run"))
    os.makedirs(scratch / "status-run", mode=0o700)
    # `status` reads what a watchdog left in its run dir (daemon.json, state, session), as users run
    # it: a short real run fills the run dir first.
    subprocess.run([*CLI, "run", "--for", "6s", "--log-file", str(scratch / "status.jsonl"),
                    "--max-session", "12h", "--watch-paths", str(scratch)], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=300)

    rows: List[Tuple[str, str, float, str, float]] = []
    # start-up, alternating bare / --help / status
    kinds = {"bare": [PYTHON, "-c", "pass"], "--help": [*CLI, "--help"],
             "status": [*CLI, "status", "--run-dir", str(scratch / "status-run")]}
    times: Dict[str, List[float]] = {k: [] for k in kinds}
    load0 = load()
    for _ in range(args.repeat * 5):
        for name, cmd in kinds.items():
            times[name].append(startup(cmd, env))
    bare = statistics.median(times["bare"])
    for name in ("--help", "status"):
        over = statistics.median(times[name]) - bare
        rows.append((f"`session-watchdog {name}` start-up", f"{statistics.median(times[name]):.3f} s "
                     f"vs bare {bare:.3f} s", over, "over bare <= +0.15 s", max(load0, load())))

    tick, true, tick_load, nvml = tick_vs_true(args.ticks, scratch)
    rows.append(("tick CPU, 8 GPUs (stand-in NVML)", f"{tick * 1e3:.3f} ms vs true {true * 1e3:.3f} ms",
                 tick / true, "<= 0.25x", tick_load))
    tick, true, tick_load, _ = tick_vs_true(args.ticks, scratch, trainer=True)
    rows.append(("tick CPU, 8 GPUs + a trainer attached", f"{tick * 1e3:.3f} ms vs true {true * 1e3:.3f} ms",
                 tick / true, "(reported)", tick_load))
    tick, true, tick_load, _ = tick_vs_true(args.ticks, scratch, gpus=64)
    rows.append(("tick CPU, 64 GPUs (stand-in NVML)", f"{tick * 1e3:.3f} ms vs true {true * 1e3:.3f} ms",
                 tick / true, "(reported)", tick_load))

    if live:
        for trainer in (False, True):
            attached = " + a trainer attached" if trainer else ""
            for baseline in (tuple(SMI_QUERY), ("true",)):
                tick, base, tick_load, state = tick_vs_true(args.ticks, scratch, trainer=trainer,
                                                            live=True, baseline=baseline)
                label = "nvidia-smi" if baseline[0] == "nvidia-smi" else "true"
                rows.append((f"tick CPU, live NVML ({found}){attached}, vs {label}",
                             f"{tick * 1e3:.3f} ms vs {label} {base * 1e3:.3f} ms", tick / base,
                             "<= 0.25x" if label == "nvidia-smi" and not trainer else "(reported)",
                             tick_load))
        print(f"live tick nvml: {state}")

    daemon = watch_daemon(args.watch_s, scratch, trainer=not args.no_trainer, live=live)
    rows.append((f"`run` RSS after {daemon['window_s']:.0f} s", f"{daemon['rss'] / 2**20:.1f} MiB vs "
                 f"bare {daemon['bare_rss'] / 2**20:.1f} MiB", daemon["rss"] / daemon["bare_rss"],
                 "<= 2.5x", daemon["load"]))
    if daemon["nvml_user_rss"]:
        rows.append(("`run` RSS vs a bare python holding NVML", f"{daemon['rss'] / 2**20:.1f} MiB vs "
                     f"{daemon['nvml_user_rss'] / 2**20:.1f} MiB",
                     daemon["rss"] / daemon["nvml_user_rss"], "(reported)", daemon["load"]))
    rows.append(("`run` CPU at the 5 s interval", f"{daemon['cpu_pct']:.3f} % of a core", daemon["cpu_pct"],
                 "<= 0.1 (% of a core)", daemon["load"]))
    naive = daemon["naive_cpu_pct"]
    poller = "the real nvidia-smi" if live else "an smi stand-in"
    rows.append((f"`run` CPU vs a naive poller of {poller}", f"{daemon['cpu_pct']:.3f} % vs {naive:.3f} %",
                 daemon["cpu_pct"] / naive if naive else float("nan"), "<= 0.5x", daemon["load"]))

    print(f"tick nvml: {nvml}")
    width = max(len(r[0]) for r in rows)
    for name, figures, ratio, goal, ld in rows:
        print(f"{name:<{width}}  {figures:<34} {ratio:8.3f}  goal {goal:<22} load {ld:.1f}")
    for name in ("--help", "status"):
        heavy = ", ".join(f"{mod} {s * 1e3:.0f} ms" for mod, s in heavy_imports(kinds[name], env))
        print(f"heaviest imports of {name}: {heavy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
