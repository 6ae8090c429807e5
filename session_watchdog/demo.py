"""``session-watchdog demo``: the watchdog and the example trainer under a compressed budget.

"Runtimes" share one checkpoint directory and one JSONL log, as Colab sessions share a Drive
folder. Every budget is counted from the moment the trainer reports its first step, and sized
from what this machine measured, so the demo finishes however slow the machine is (PyTorch's
import alone takes 10 s on an idle 2-core box and over a minute on a busy one; issue 11):

1. the example trainer starts; once it reports ``running``, a watchdog attaches
   (``session-watchdog attach --pid``) with a ``--session`` budget (default 40 s) counted from
   then. It asks the trainer to checkpoint before the limit, then to checkpoint and stop; the
   trainer acknowledges and exits with EXIT_STOPPED (75), which the watchdog logs as a planned
   stop (``training_stopped``), not a failure;
2. a fresh runtime: the trainer resumes from the exact step of the last acknowledged checkpoint,
   under a budget several times what the remaining steps took at the step time measured in the
   runtime before; it completes and the watchdog runs the end transaction as a dry run
   ("would now run ..."). Should the machine slow down so much that this runtime is stopped
   too, a further one resumes, as a real runtime would (at most ``MAX_RUNTIMES``).

The demo reads its own log at the end and says what it showed; it exits 1 if any step is missing,
saying what went wrong and what to do. Torch is needed (the trainer side); the daemon itself never
imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from session_watchdog import channel
from session_watchdog.config import format_duration

MARKER = ".session-watchdog-demo"
STEPS_PER_EPOCH = 60
# Training sleeps this many sessions in all, so it outlasts runtime 1 even when the watchdog
# takes up to 0.6 of a session to start after the trainer's first step (a busy machine).
SLEEP_SESSIONS = 1.6
# A later runtime's budget: this many times what its remaining steps took at the measured pace.
HEADROOM = 4.0
MIN_STEP_S = 0.02  # the floor of a measured time per step
MAX_RUNTIMES = 5
POLL_S = 0.2
PROGRESS_EVERY_S = 30.0  # "still waiting for the trainer" lines while PyTorch loads
WATCHDOG_EXIT_S = 600.0  # after the trainer exits, the watchdog's end steps must finish in this
TERMINATE_S = 60.0  # SIGTERM -> SIGKILL when the demo cleans up its children


class DemoFailed(Exception):
    """What went wrong and what to do about it (the demo then exits 1)."""

    def __init__(self, what: str, todo: str) -> None:
        super().__init__(what)
        self.what = what
        self.todo = todo


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="watch the example trainer through two compressed sessions")
    demo.add_argument("--session", default="40s", metavar="DURATION",
                      help="length of the first compressed session, counted from the trainer's "
                           "first step (default 40s)")
    demo.add_argument("--dir", metavar="PATH", help="an empty (or earlier demo) directory for its "
                                                    "checkpoints, run dirs and log (default: a new "
                                                    "temporary directory)")
    demo.add_argument("--steps", type=int, default=None,
                      help=f"training steps in all (default: enough for {SLEEP_SESSIONS:g} sessions "
                           "of --step-sleep, in epochs of 60)")
    demo.add_argument("--step-sleep", type=float, default=0.1, metavar="SECONDS",
                      help="extra time per step, so training outlasts one session (default 0.1)")


def _watchdog_argv(base: Path, run: str, pid: int, budget_s: float) -> List[str]:
    # A compressed schedule: margins scaled down from the defaults (5 m / 1 m) to fit a
    # one-minute session; the end runs as a dry run (nothing is shut down).
    return [
        sys.executable, "-m", "session_watchdog", "attach", "--pid", str(pid),
        "--platform", "generic", "--max-session", f"{budget_s:g}s", "--interval", "1s",
        "--margin", f"{max(4.0, budget_s * 0.2):g}s", "--stop-margin", f"{max(2.0, budget_s * 0.1):g}s",
        "--default-checkpoint-time", "1s", "--default-step-time", "0.5s",
        "--warn-before", f"{budget_s * 0.75:g}s,{budget_s * 0.4:g}s", "--checkpoint-every", "off",
        "--resend-after", "10s", "--end-when-done", "--dry-run", "--grace", "3s",
        "--end-command", "shutdown -h now",
        "--run-dir", str(base / run), "--log-file", str(base / "watchdog.jsonl"),
    ]


def _trainer_argv(base: Path, run: str, steps: int, step_sleep: float) -> List[str]:
    return [sys.executable, "-m", "session_watchdog.trainer.example", "--device", "cpu",
            "--epochs", str(_epochs(steps)), "--steps-per-epoch", str(STEPS_PER_EPOCH),
            "--step-sleep", f"{step_sleep:g}", "--checkpoint-every", "0",
            "--checkpoint-dir", str(base / "checkpoints"), "--poll-interval", "0.25",
            "--run-dir", str(base / run)]


def _epochs(steps: int) -> int:
    return max(1, -(-steps // STEPS_PER_EPOCH))


def _child_env() -> Dict[str, str]:
    # Unbuffered: the children's lines reach a pipe (`demo | tee`) in the order they were written.
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread: on a busy 2-core box torch's default (a thread per core, spinning while
    # it waits for the others) made a step of this small model 2.16 s instead of 0.010 s (load 13).
    env["OMP_NUM_THREADS"] = "1"
    env.pop(channel.ENV_RUN_DIR, None)  # each runtime names its own run dir
    return env


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def _events(log_file: Path) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    if not log_file.exists():
        return out
    for line in log_file.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _sessions(events: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """The log cut at each ``daemon_started``: one list of events per watchdog session."""
    starts = [i for i, e in enumerate(events) if e.get("event") == "daemon_started"]
    return [events[a:b] for a, b in zip(starts, starts[1:] + [len(events)])]


def _samples(session: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [e for e in session if e.get("event") == "sample" and isinstance(e.get("trainer"), dict)]


def measured_step_s(session: List[Dict[str, Any]]) -> Optional[float]:
    """Seconds per step over a session's samples (sleep and compute), None with too few steps."""
    points = [(float(s["elapsed_s"]), int(s["trainer"]["step"])) for s in _samples(session)
              if s["trainer"].get("alive") and s["trainer"].get("step") is not None]
    if len(points) >= 2 and points[-1][1] - points[0][1] >= 5:
        return (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])
    reported = [s["trainer"].get("step_time_s") for s in _samples(session)]
    known = [float(x) for x in reported if isinstance(x, (int, float)) and x > 0]
    return known[-1] if known else None


def stopped_step(session: List[Dict[str, Any]]) -> int:
    """The step of the newest checkpoint the trainer reported in this session (0: none)."""
    steps = [(s["trainer"].get("checkpoint") or {}).get("step") for s in _samples(session)]
    return max((int(x) for x in steps if isinstance(x, int)), default=0)


def next_budget(session_s: float, remaining_steps: int, step_s: Optional[float]) -> float:
    """A later runtime's budget: HEADROOM x the remaining steps at the measured pace, at least one
    session, rounded up to 10 s."""
    # nothing measured: a slow guess (a further runtime follows if it was wrong)
    pace = 0.5 if step_s is None else max(step_s, MIN_STEP_S)
    return float(10 * math.ceil(max(session_s, HEADROOM * remaining_steps * pace) / 10))


def summarize(log_file: Path, session_s: float, codes: List[int]) -> List[str]:
    """What the log shows, as lines; raises AssertionError naming the first missing step.

    ``codes``: the trainer's exit code in each runtime (the demo started those processes).
    """
    # Here, not at the top: every command builds the demo's subparser, and the policy (psutil,
    # the probes) is start-up time `--help` and `status` need not pay (issue 17).
    from session_watchdog.policy import EXIT_STOPPED, TRAINING_FAILED, TRAINING_STOPPED

    sessions = _sessions(_events(log_file))
    if len(sessions) != len(codes):
        raise AssertionError(f"expected {len(codes)} watchdog sessions in the log, found {len(sessions)}")
    first = sessions[0]

    def at(e: Dict[str, Any], session: List[Dict[str, Any]]) -> float:
        """Session-clock seconds of an event: the elapsed_s of the nearest preceding sample."""
        idx = session.index(e)
        for prev in reversed(session[:idx + 1]):
            if prev.get("event") == "sample":
                return float(prev["elapsed_s"])
        return 0.0

    decisions = [e for e in first if e.get("event") == "decision"]
    requests = [e for e in decisions if e.get("kind") == "request"]
    acks = [e for e in decisions if e.get("kind") == "ack"]
    # the session limit's own requests (a busy machine may add one for RAM pressure first)
    ckpts = [e for e in requests if e.get("action") == "checkpoint"]
    ckpt = next((e for e in ckpts if e.get("reason") == "session_limit"), ckpts[0] if ckpts else None)
    stop = next((e for e in requests if e.get("action") == "stop"), None)
    if ckpt is None or stop is None:
        raise AssertionError("the first session did not request a checkpoint and a stop")
    if not any(e.get("seq") == stop["seq"] for e in acks):
        raise AssertionError("the trainer did not acknowledge the stop request")
    if codes[0] != EXIT_STOPPED:
        raise AssertionError(f"the first trainer exited {codes[0]}, expected {EXIT_STOPPED}")
    reasons = [e.get("reason") for e in decisions]
    if TRAINING_STOPPED not in reasons or TRAINING_FAILED in reasons:
        raise AssertionError(f"the first session did not log the planned stop as {TRAINING_STOPPED} "
                             f"(decisions: {reasons})")
    stopped = stopped_step(first)
    lines = [
        f"session 1: checkpoint requested at {at(ckpt, first):.1f}s of {session_s:g}s "
        + (f"(lead {ckpt['lead_s']}s)" if ckpt.get("lead_s") is not None else f"({ckpt.get('reason')})")
        + f", stop requested at {at(stop, first):.1f}s, acknowledged; "
        f"the trainer stopped at step {stopped} with exit code {codes[0]} (logged as a planned "
        "stop, not a failure)",
    ]
    for number, (session, code) in enumerate(zip(sessions[1:], codes[1:]), start=2):
        seen = [s["trainer"]["step"] for s in _samples(session) if s["trainer"].get("step") is not None]
        if not seen or min(seen) < stopped:
            raise AssertionError(f"session {number} did not resume from step {stopped}")
        budget = next((e.get("budget_s") for e in session if e.get("event") == "daemon_started"), None)
        resumed = (f"session {number} ({format_duration(budget)} budget): resumed from the checkpoint "
                   f"at step {stopped} (first step seen {min(seen)})")
        if code == EXIT_STOPPED:
            stopped = stopped_step(session)
            lines.append(f"{resumed}, stopped again at step {stopped} (the machine slowed down); "
                         "a fresh runtime went on")
            continue
        completed = [s for s in _samples(session) if s["trainer"].get("state") == "completed"]
        if code != 0 or not completed:
            raise AssertionError(f"session {number} did not complete training (trainer exit code {code})")
        end_steps = [e.get("step") for e in session if e.get("event") == "action"
                     and str(e.get("step")).startswith("end_")]
        if "end_dry_run" not in end_steps:
            raise AssertionError(f"no dry-run end action in session {number} (steps: {end_steps})")
        dry = next(e for e in session if e.get("step") == "end_dry_run")
        lines += [
            f"{resumed}, completed at step {completed[-1]['trainer']['step']}",
            f"end of runtime: {' -> '.join(s for s in end_steps if s)}; {dry.get('message')}",
        ]
    return lines


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a child the demo started: SIGTERM (the trainer checkpoints and stops), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(TERMINATE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def _wait_running(trainer: subprocess.Popen[bytes], run_dir: Path, index: int) -> Tuple[float, int]:
    """Wait (however long it takes) for the trainer's first step; (seconds it took, its step)."""
    began = time.monotonic()
    next_note = began + PROGRESS_EVERY_S
    while True:
        code = trainer.poll()
        if code is not None:
            raise DemoFailed(
                f"runtime {index}: the trainer exited with code {code} before its first step "
                "(its output is above)",
                "check that PyTorch imports (python -c 'import torch'), then run the trainer alone: "
                "python -m session_watchdog.trainer.example --device cpu --epochs 1 "
                "--checkpoint-dir /tmp/sw-example")
        try:
            status = channel.read_json(run_dir / channel.TRAINER_FILE)
        except channel.ChannelError:
            status = None  # written atomically, but a planted file must not stop the demo
        if status and status.get("pid") == trainer.pid and status.get("state") not in (None, "starting"):
            return time.monotonic() - began, int(status.get("step") or 0)
        now = time.monotonic()
        if now >= next_note:
            _say(f"still waiting for the trainer's first step ({now - began:.0f}s; importing "
                 "PyTorch takes over a minute on a busy machine)")
            next_note = now + PROGRESS_EVERY_S
        time.sleep(POLL_S)


def _wait_attached(watchdog: subprocess.Popen[bytes], run_dir: Path) -> None:
    """Wait until the watchdog has attached (its daemon.json names it) or has exited.

    The trainer is not reaped meanwhile: one that finishes first stays a zombie with its pid, so
    the watchdog still finds it (and sees it gone) instead of refusing an unknown pid. The lock
    is not probed: a probe holds it for a moment, and the watchdog's own try would then fail.
    """
    def attached() -> bool:
        try:
            info = channel.read_json(run_dir / "daemon.json")
        except channel.ChannelError:
            return False
        return bool(info and info.get("pid") == watchdog.pid)

    began = time.monotonic()
    next_note = began + PROGRESS_EVERY_S
    while watchdog.poll() is None and not attached():
        now = time.monotonic()
        if now >= next_note:
            _say(f"still waiting for the watchdog to start ({now - began:.0f}s)")
            next_note = now + PROGRESS_EVERY_S
        time.sleep(POLL_S)


def _runtime(index: int, base: Path, budget_s: float, steps: int, step_sleep: float) -> int:
    """One runtime: the trainer, then the watchdog attached at its first step. The trainer's exit code."""
    run = f"run-{index}"
    env = _child_env()
    trainer = subprocess.Popen(_trainer_argv(base, run, steps, step_sleep), env=env)
    watchdog: Optional[subprocess.Popen[bytes]] = None
    try:
        took, step = _wait_running(trainer, base / run, index)
        _say(f"the trainer reported its first step after {took:.1f}s (at step {step}); the watchdog "
             f"attaches now: session-watchdog attach --pid {trainer.pid} --max-session {budget_s:g}s "
             "... (a dry run: it ends nothing)")
        watchdog = subprocess.Popen(_watchdog_argv(base, run, trainer.pid, budget_s), env=env)
        _wait_attached(watchdog, base / run)
        while trainer.poll() is None:
            code = watchdog.poll()
            if code is not None:
                _say("the watchdog ended while the trainer runs; stopping the trainer")
                _stop(trainer)
                raise DemoFailed(f"runtime {index}: the watchdog exited with code {code} while the "
                                 "trainer was running (its error is above)",
                                 "run `session-watchdog doctor` and fix what it reports")
            time.sleep(POLL_S)
        try:
            code = watchdog.wait(WATCHDOG_EXIT_S)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"runtime {index}: the watchdog did not finish within "
                             f"{WATCHDOG_EXIT_S:g}s after the trainer exited",
                             f"read its log: session-watchdog report {base / 'watchdog.jsonl'}") from None
        if code != 0:
            raise DemoFailed(f"runtime {index}: the watchdog exited with code {code} (its error is "
                             "above)", "run `session-watchdog doctor` and fix what it reports")
        return int(trainer.returncode)
    finally:
        for proc in (watchdog, trainer):
            if proc is not None:
                _stop(proc)


def _prepare_dir(raw: Optional[str]) -> Path:
    base = Path(raw).resolve() if raw else Path(tempfile.mkdtemp(prefix="session-watchdog-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    marker = base / MARKER
    if any(base.iterdir()) and not marker.exists():
        # never clear a directory the demo did not make (it could hold real checkpoints)
        raise ValueError(f"{base} is not empty and was not made by the demo; give an empty or new --dir")
    marker.write_text("made by session-watchdog demo; its contents are replaced on each run\n")
    for stale in [*(f"run-{i}" for i in range(1, MAX_RUNTIMES + 1)), "checkpoints", "watchdog.jsonl"]:
        target = base / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return base


def _train(base: Path, session_s: float, steps: int, step_sleep: float) -> List[int]:
    """Runtimes until training completes; the trainer's exit code in each."""
    from session_watchdog.policy import EXIT_STOPPED

    log_file = base / "watchdog.jsonl"
    codes: List[int] = []
    budget = session_s
    for index in range(1, MAX_RUNTIMES + 1):
        what = "training starts" if index == 1 else "a fresh runtime resumes the training"
        print(f"\n=== runtime {index}: {what}; a {format_duration(budget)} session from the "
              "trainer's first step ===", flush=True)
        code = _runtime(index, base, budget, steps, step_sleep)
        codes.append(code)
        if code == 0 and index == 1:
            raise DemoFailed(
                f"training completed inside the first session ({steps} steps), so there was no "
                "stop to show", "give it more work: --steps "
                f"{2 * steps} (or a longer --step-sleep)")
        if code == 0:
            return codes
        if code != EXIT_STOPPED:
            raise DemoFailed(f"runtime {index}: the trainer exited with code {code} (its output "
                             "is above)", "run the trainer alone to see the error: python -m "
                             "session_watchdog.trainer.example --device cpu --epochs 1 "
                             "--checkpoint-dir /tmp/sw-example")
        session = (_sessions(_events(log_file)) or [[]])[-1]
        step_s = measured_step_s(session)
        left = _epochs(steps) * STEPS_PER_EPOCH - stopped_step(session)
        budget = next_budget(session_s, left, step_s)
        pace = "nothing" if step_s is None else f"{step_s:.3f}s per step"
        _say(f"runtime {index} stopped as asked; it measured {pace}; {left} steps are left, so the "
             f"next runtime gets {format_duration(budget)} (at least {HEADROOM:g} x what they "
             "should take)")
    raise DemoFailed(f"training did not complete in {MAX_RUNTIMES} runtimes: this machine slowed "
                     "down faster than the demo could measure it",
                     "run it again when the machine is less busy, or with a longer --session")


def run(args: argparse.Namespace) -> int:
    from session_watchdog.config import parse_duration

    try:
        session_s = parse_duration(args.session)
    except ValueError as err:
        print(f"session-watchdog: error: --session {args.session!r} is invalid: {err}", file=sys.stderr)
        return 2
    if session_s < 20:
        print("session-watchdog: error: --session must be at least 20s (the margins need room)",
              file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print("session-watchdog: error: --steps must be at least 1", file=sys.stderr)
        return 2
    if not (args.step_sleep >= 0 and math.isfinite(args.step_sleep)):
        print("session-watchdog: error: --step-sleep must be 0 or more seconds", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # looked up, not imported: this is the daemon side
        print("session-watchdog: error: the demo trains a small model and needs PyTorch: "
              "pip install 'session-watchdog[torch]'", file=sys.stderr)
        return 2
    try:
        base = _prepare_dir(args.dir)
    except ValueError as err:
        print(f"session-watchdog: error: {err}", file=sys.stderr)
        return 2
    log_file = base / "watchdog.jsonl"
    # Training must outlast the first session however fast this machine is: its sleep alone
    # takes SLEEP_SESSIONS sessions; later budgets are sized from the pace measured before them.
    steps = args.steps or math.ceil(SLEEP_SESSIONS * session_s / max(args.step_sleep, 0.01))
    try:
        codes = _train(base, session_s, steps, args.step_sleep)
        print("\n=== what the log shows ===", flush=True)
        try:
            lines = summarize(log_file, session_s, codes)
        except AssertionError as err:
            raise DemoFailed(f"{err} (trainer exit codes {codes})",
                             "this is a bug: please report it with the log file") from None
    except DemoFailed as failed:
        print(f"\ndemo failed: {failed.what}\n  what to do: {failed.todo}\n  log: {log_file} "
              f"(session-watchdog report {log_file})", file=sys.stderr, flush=True)
        return 1
    for line in lines:
        print(line)
    print(f"log: {log_file}\nreport: session-watchdog report {log_file}", flush=True)
    return 0
