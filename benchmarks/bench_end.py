"""Seconds from training completion to the end action, with a checkpoint of ``--size-mb``.

    python benchmarks/bench_end.py [--grace 2m] [--interval 5s] [--size-mb 1024]

A real `session-watchdog run -- <command>` (default tick interval 5 s) wraps a trainer whose
Session saves a ``--size-mb`` MiB model with ``complete()`` (which reads the final checkpoint back
from disk) and exits 0; the end command is a recorder that writes the time it ran. The target is
grace + < 10 s at any size (issue 17). Nothing is shut down: the end command only records. Also
printed: what a cold re-read of the same checkpoint costs, the work the end no longer does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TRAIN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from session_watchdog.trainer import Session
    size = int(sys.argv[3]) << 20
    model = torch.nn.ParameterDict({f"t{i}": torch.nn.Parameter(torch.rand(size // 4 // 16))
                                    for i in range(16)})
    session = Session(checkpoint_dir=sys.argv[1], model=model, keep=1)
    session.step()
    session.complete(end_runtime_after="exit")
    Path(sys.argv[2]).write_text(repr(time.time()))
""")

RECORDER = "#!{python}\nimport time\nopen({out!r}, 'a').write(repr(time.time()) + '\\n')\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grace", default="2m")
    parser.add_argument("--interval", default="5s")
    parser.add_argument("--size-mb", type=int, default=1024, help="checkpoint size (1024)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    recorder = tmp / "end"
    recorder.write_text(RECORDER.format(python=sys.executable, out=str(tmp / "ended_at")))
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    proc = subprocess.run(
        [sys.executable, "-m", "session_watchdog", "run", "--platform", "generic", "--end-when-done",
         "--grace", args.grace, "--interval", args.interval, "--end-command", str(recorder),
         "--run-dir", str(tmp / "run"), "--log-file", str(tmp / "log.jsonl"),
         "--", sys.executable, "-c", TRAIN, str(tmp / "ckpt"), str(tmp / "done_at"),
         str(args.size_mb)],
        capture_output=True, text=True, env={**os.environ})
    done = float((tmp / "done_at").read_text())
    # the first call is the end action; a second one is the confirm step's retry (the recorder
    # ends nothing, so the watchdog is still alive a minute later and says so)
    calls = (tmp / "ended_at").read_text().split() if (tmp / "ended_at").exists() else []
    ended = float(calls[0]) if calls else None
    actions = [json.loads(line) for line in (tmp / "log.jsonl").read_text().splitlines()
               if '"event":"action"' in line]
    steps = [a.get("step") for a in actions]
    verify = [a for a in actions if a.get("step") == "end_verify"]
    try:
        done_at = float((tmp / "done_at").read_text())
        events = [json.loads(line) for line in (tmp / "log.jsonl").read_text().splitlines()]
        marks = [(e.get("step") or e.get("event"), e.get("ts"))
                 for e in events if e.get("event") in ("child_exited", "decision", "action")]
        print("after completion: " + ", ".join(
            f"{name} +{float(at) - done_at:.1f}s" for name, at in marks
            if isinstance(at, (int, float)) and float(at) >= done_at - 1))
    except (OSError, ValueError):
        pass
    if verify:
        print(f"end_verify: trusted the trainer's read-back (no re-read): {verify[0].get('trusted')}")
    print(f"watchdog exit code {proc.returncode}; end steps: {', '.join(s for s in steps if s)}; "
          f"end command calls: {len(calls)}")
    if ended is None:
        print("the end action did not run")
        print(proc.stderr[-2000:])
        return 1
    from session_watchdog.config import parse_duration

    grace = parse_duration(args.grace)
    took = ended - done
    print(f"completion -> end action: {took:.1f} s with grace {grace:g} s, tick {args.interval} and "
          f"a {args.size_mb} MiB checkpoint: grace + {took - grace:.1f} s (target grace + < 10 s), "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"for comparison, a full re-read of that checkpoint now: {reread_s(tmp / 'ckpt'):.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def reread_s(directory: Path) -> float:
    """Seconds verify_checkpoint takes without the trainer's read-back (page cache dropped
    where permitted): what the end of the runtime did before."""
    from session_watchdog.actions import verify_checkpoint
    from session_watchdog.checksum import for_record

    marker = next(directory.glob("*.pt.sha256"))
    obj = json.loads(marker.read_text())
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass
    started = time.perf_counter()
    problem = verify_checkpoint(str(marker)[: -len(".sha256")], str(for_record(obj)), obj["bytes"])
    assert problem is None, problem
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
