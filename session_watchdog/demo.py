"""``session-watchdog demo``: the watchdog and the example trainer under a compressed budget.

Two "runtimes" of ``--session`` seconds each (default 40 s) share one checkpoint directory and one
JSONL log, as two Colab sessions would share a Drive folder:

1. the first runtime's watchdog asks the trainer to checkpoint before the limit, then to
   checkpoint and stop; the trainer acknowledges and exits with EXIT_STOPPED (75);
2. the second runtime (a new session clock, twice the budget so that it finishes on any machine)
   starts fresh; the trainer resumes from the exact step
   of the last acknowledged checkpoint and completes; the watchdog then runs the end transaction
   as a dry run ("would now run ...").

The demo reads its own log at the end and says what it showed; it exits 1 if any step is missing.
Torch is needed (the trainer side); the daemon itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

EXIT_STOPPED = 75  # session_watchdog.trainer.session.EXIT_STOPPED (not imported: it needs torch)
MARKER = ".session-watchdog-demo"


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="watch the example trainer through two compressed sessions")
    demo.add_argument("--session", default="40s", metavar="DURATION",
                      help="length of each compressed session (default 40s)")
    demo.add_argument("--dir", metavar="PATH", help="an empty (or earlier demo) directory for its "
                                                    "checkpoints, run dirs and log (default: a new "
                                                    "temporary directory)")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps in all (default: enough for 1.5 sessions)")
    demo.add_argument("--step-sleep", type=float, default=0.1, metavar="SECONDS",
                      help="extra time per step, so training outlasts one session (default 0.1)")


def _watchdog_argv(base: Path, run: str, session_s: float) -> List[str]:
    # A compressed schedule: margins scaled down from the defaults (5 m / 1 m) to fit a
    # one-minute session; the end runs as a dry run (nothing is shut down).
    return [
        sys.executable, "-m", "session_watchdog", "run",
        "--platform", "generic", "--max-session", f"{session_s:g}s", "--interval", "1s",
        "--margin", f"{max(4.0, session_s * 0.2):g}s", "--stop-margin", f"{max(2.0, session_s * 0.1):g}s",
        "--default-checkpoint-time", "1s", "--default-step-time", "0.5s",
        "--warn-before", f"{session_s * 0.75:g}s,{session_s * 0.4:g}s", "--checkpoint-every", "off",
        "--resend-after", "10s", "--end-when-done", "--dry-run", "--grace", "3s",
        "--end-command", "shutdown -h now",
        "--run-dir", str(base / run), "--log-file", str(base / "watchdog.jsonl"),
    ]


def _trainer_argv(base: Path, steps: int, step_sleep: float) -> List[str]:
    per_epoch = 60
    return [sys.executable, "-m", "session_watchdog.trainer.example", "--device", "cpu",
            "--epochs", str(max(1, -(-steps // per_epoch))), "--steps-per-epoch", str(per_epoch),
            "--step-sleep", f"{step_sleep:g}", "--checkpoint-every", "0",
            "--checkpoint-dir", str(base / "checkpoints"), "--poll-interval", "0.25"]


def _events(log_file: Path) -> List[Dict[str, Any]]:
    out = []
    for line in log_file.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def summarize(log_file: Path, session_s: float) -> List[str]:
    """What the log shows, as lines; raises AssertionError naming the first missing step."""
    events = _events(log_file)
    starts = [i for i, e in enumerate(events) if e.get("event") == "daemon_started"]
    if len(starts) != 2:
        raise AssertionError(f"expected two watchdog sessions in the log, found {len(starts)}")
    first, second = events[starts[0]:starts[1]], events[starts[1]:]

    def at(e: Dict[str, Any], session: List[Dict[str, Any]]) -> float:
        """Session-clock seconds of an event: the elapsed_s of the nearest preceding sample."""
        idx = session.index(e)
        for prev in reversed(session[:idx + 1]):
            if prev.get("event") == "sample":
                return float(prev["elapsed_s"])
        return 0.0

    requests = [e for e in first if e.get("event") == "decision" and e.get("kind") == "request"]
    acks = [e for e in first if e.get("event") == "decision" and e.get("kind") == "ack"]
    ckpt = next((e for e in requests if e.get("action") == "checkpoint"), None)
    stop = next((e for e in requests if e.get("action") == "stop"), None)
    if ckpt is None or stop is None:
        raise AssertionError("the first session did not request a checkpoint and a stop")
    stop_ack = next((e for e in acks if e.get("seq") == stop["seq"]), None)
    if stop_ack is None:
        raise AssertionError("the trainer did not acknowledge the stop request")
    samples = [e for e in first if e.get("event") == "sample"]
    stopped_step = max((s["trainer"]["checkpoint"] or {}).get("step", 0) for s in samples
                       if s["trainer"].get("checkpoint"))
    child_exit_1 = next((e for e in first if e.get("event") == "child_exited"), {}).get("exit_code")
    lines = [
        f"session 1: checkpoint requested at {at(ckpt, first):.1f}s of {session_s:g}s "
        f"(lead {ckpt.get('lead_s')}s), stop requested at {at(stop, first):.1f}s, acknowledged; "
        f"the trainer stopped at step {stopped_step} with exit code {child_exit_1}",
    ]
    resumed = [s for s in second if s.get("event") == "sample" and s["trainer"].get("step") is not None]
    first_step = min(s["trainer"]["step"] for s in resumed) if resumed else None
    completed = [s for s in second if s.get("event") == "sample" and s["trainer"].get("state") == "completed"]
    end_steps = [e.get("step") for e in second if e.get("event") == "action"]
    if child_exit_1 != EXIT_STOPPED:
        raise AssertionError(f"the first trainer exited {child_exit_1}, expected {EXIT_STOPPED}")
    if first_step is None or first_step < stopped_step:
        raise AssertionError(f"the second session did not resume from step {stopped_step}")
    if not completed:
        raise AssertionError("the second session did not complete training")
    if "end_dry_run" not in end_steps:
        raise AssertionError(f"no dry-run end action in the second session (steps: {end_steps})")
    final = completed[-1]["trainer"]
    dry = next(e for e in second if e.get("step") == "end_dry_run")
    lines += [
        f"session 2: resumed from the checkpoint at step {stopped_step} (first step seen "
        f"{first_step}), completed at step {final['step']}",
        f"end of runtime: {' -> '.join(s for s in end_steps if s)}; {dry.get('message')}",
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    from session_watchdog.config import parse_duration

    try:
        session_s = parse_duration(args.session)
    except ValueError as err:
        print(f"session-watchdog: error: --session {args.session!r} is invalid: {err}", file=sys.stderr)
        return 2
    if session_s < 20:
        print("session-watchdog: error: --session must be at least 20s (the trainer needs time to "
              "start)", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # looked up, not imported: this is the daemon side
        print("session-watchdog: error: the demo trains a small model and needs PyTorch: "
              "pip install 'session-watchdog[torch]'", file=sys.stderr)
        return 2
    base = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="session-watchdog-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    marker = base / MARKER
    if any(base.iterdir()) and not marker.exists():
        # never clear a directory the demo did not make (it could hold real checkpoints)
        print(f"session-watchdog: error: {base} is not empty and was not made by the demo; "
              "give an empty or new --dir", file=sys.stderr)
        return 2
    marker.write_text("made by session-watchdog demo; its contents are replaced on each run\n")
    for stale in ("run-1", "run-2", "checkpoints", "watchdog.jsonl"):
        target = base / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    # Training must outlast the first session however fast this machine is (the sleep alone takes
    # 1.25 sessions; the steps only add to it); the second runtime gets twice the budget, so it
    # finishes however slow the machine is.
    steps = args.steps or int(1.25 * session_s / max(args.step_sleep, 0.01))
    trainer = _trainer_argv(base, steps, args.step_sleep)
    codes: List[Optional[int]] = []
    for index, budget in ((1, session_s), (2, 2 * session_s)):
        print(f"\n=== runtime {index}: a {budget:g}-second session "
              f"({'training starts' if index == 1 else 'a fresh runtime resumes the training'}) ===",
              flush=True)
        codes.append(subprocess.call([*_watchdog_argv(base, f"run-{index}", budget), "--", *trainer]))
    print("\n=== what the log shows ===")
    try:
        for line in summarize(base / "watchdog.jsonl", session_s):
            print(line)
    except AssertionError as err:
        print(f"demo failed: {err} (exit codes {codes}; log {base / 'watchdog.jsonl'})")
        return 1
    print(f"log: {base / 'watchdog.jsonl'}\nreport: session-watchdog report {base / 'watchdog.jsonl'}")
    return 0
