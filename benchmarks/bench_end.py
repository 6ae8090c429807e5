"""Seconds from training completion to the end action, with the default grace period (2 min).

    python benchmarks/bench_end.py [--grace 2m] [--interval 5s]

A real `session-watchdog run -- <command>` (default tick interval 5 s) wraps a command that writes
a verified checkpoint and exits 0; the end command is a recorder that writes the time it ran. The
target is grace + < 10 s. Nothing is shut down: the end command only records.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TRAIN = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    from session_watchdog import channel
    run_dir = channel.RunDir(Path(os.environ["SESSION_WATCHDOG_RUN_DIR"]))
    ckpt = Path(sys.argv[1])
    data = os.urandom(1 << 20)
    ckpt.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    channel.write_json(Path(str(ckpt) + ".sha256"), {"v": 1, "sha256": digest, "bytes": len(data)})
    info = channel.CheckpointInfo(str(ckpt), None, 100, time.time(), 0.1, len(data), digest)
    run_dir.write_status(channel.TrainerStatus(os.getpid(), 0.0, "completed", 100, 1, 0.1, 0, info, time.time()))
    Path(sys.argv[2]).write_text(repr(time.time()))
""")

RECORDER = "#!{python}\nimport time\nopen({out!r}, 'a').write(repr(time.time()) + '\\n')\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grace", default="2m")
    parser.add_argument("--interval", default="5s")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    recorder = tmp / "end"
    recorder.write_text(RECORDER.format(python=sys.executable, out=str(tmp / "ended_at")))
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    proc = subprocess.run(
        [sys.executable, "-m", "session_watchdog", "run", "--platform", "generic", "--end-when-done",
         "--grace", args.grace, "--interval", args.interval, "--end-command", str(recorder),
         "--run-dir", str(tmp / "run"), "--log-file", str(tmp / "log.jsonl"),
         "--", sys.executable, "-c", TRAIN, str(tmp / "ckpt.pt"), str(tmp / "done_at")],
        capture_output=True, text=True, env={**os.environ})
    done = float((tmp / "done_at").read_text())
    # the first call is the end action; a second one is the confirm step's retry (the recorder
    # ends nothing, so the watchdog is still alive a minute later and says so)
    calls = (tmp / "ended_at").read_text().split() if (tmp / "ended_at").exists() else []
    ended = float(calls[0]) if calls else None
    steps = [json.loads(line).get("step") for line in (tmp / "log.jsonl").read_text().splitlines()
             if '"event":"action"' in line]
    print(f"watchdog exit code {proc.returncode}; end steps: {', '.join(s for s in steps if s)}; "
          f"end command calls: {len(calls)}")
    if ended is None:
        print("the end action did not run")
        print(proc.stderr[-2000:])
        return 1
    from session_watchdog.config import parse_duration

    grace = parse_duration(args.grace)
    took = ended - done
    print(f"completion -> end action: {took:.1f} s with grace {grace:g} s and tick {args.interval}: "
          f"grace + {took - grace:.1f} s (target grace + < 10 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
