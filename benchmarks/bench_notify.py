"""Cost of notifications (issue 15), measured side by side with its baseline in one run.

    python benchmarks/bench_notify.py [--blocks 12] [--block-ticks 40]

- tick time with notify + remote configured while their server hangs (the worker is stuck in a
  send, the poller in a GET) vs a watchdog without notify: alternating blocks, median of the
  per-block medians; target ratio <= 1.05
- daemon RSS after 300 ticks with notify unset, this tree vs the tree before notify/ existed
  (git archive of the commit before it was added): target ratio <= 1.01, and apprise not loaded
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    from session_watchdog import log, platforms
    from session_watchdog.config import Config
    from session_watchdog.daemon import Watchdog

    tmp = Path(tempfile.mkdtemp())
    cfg = Config.build(run_dir=str(tmp / "run"), log_file=str(tmp / "log.jsonl"), max_session="12h",
                       watch_paths=str(tmp))
    log.configure(cfg.log_file, console=None)
    dog = Watchdog(cfg, platform=platforms.Platform("generic", ("bench",)))
    for _ in range(300):
        dog.tick()
    with open("/proc/self/status") as fh:
        rss = [int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:")][0]
    print(json.dumps({"rss": rss, "apprise": "apprise" in sys.modules,
                      "notify": "session_watchdog.notify" in sys.modules}))
""")


class Hanging(http.server.BaseHTTPRequestHandler):
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.release.wait(600)

    do_POST = do_GET


def tick_ratio(blocks: int, block_ticks: int) -> tuple[float, float]:
    from session_watchdog import log, platforms
    from session_watchdog.config import Config
    from session_watchdog.daemon import Watchdog
    from session_watchdog.notify.messages import Message

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hanging)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    tmp = tempfile.mkdtemp()
    common = dict(max_session="12h", watch_paths=tmp)
    plain = Config.build(run_dir=f"{tmp}/a", log_file=f"{tmp}/a.jsonl", **common)
    notified = Config.build(run_dir=f"{tmp}/b", log_file=f"{tmp}/b.jsonl", **common,
                            notify=f"json://127.0.0.1:{port}/hook",
                            remote=f"ntfy://127.0.0.1:{port}/topic", remote_token="bench-token-1",
                            remote_poll_every="1s")
    log.configure(Path(tmp) / "log.jsonl", console=None)
    generic = platforms.Platform("generic", ("bench",))
    dog_a = Watchdog(plain, platform=generic)
    dog_b = Watchdog(notified, platform=generic)
    hub = dog_b.notify
    hub.start()
    hub.worker.submit(Message("disk", "bench", "bench", "the worker hangs in this send"))
    for _ in range(20):
        dog_a.tick()
        dog_b.tick()
    a_s, b_s = [], []
    try:
        for _ in range(blocks):
            log.remove_listener(hub.on_event)  # the listener is process-wide: only for dog_b's block
            a_s.append(statistics.median(_timed(dog_a.tick) for _ in range(block_ticks)))
            log.add_listener(hub.on_event)
            b_s.append(statistics.median(_timed(dog_b.tick) for _ in range(block_ticks)))
    finally:
        Hanging.release.set()
        hub.close(wait_s=1.0)
        server.shutdown()
        log.close()
    return statistics.median(a_s), statistics.median(b_s)


def _timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def rss(pythonpath: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin",
                              "HOME": tempfile.mkdtemp()})
    return json.loads(out.stdout)


def baseline_tree() -> Path:
    """The package as it was before session_watchdog/notify/ was added (git archive)."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--",
                            "session_watchdog/notify/__init__.py"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()[-1]
    target = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", f"{added}~1", "session_watchdog"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--block-ticks", type=int, default=40)
    args = parser.parse_args()
    plain, notified = tick_ratio(args.blocks, args.block_ticks)
    base = baseline_tree()
    now_rss, before = [], []
    for _ in range(3):  # alternated
        now_rss.append(rss(ROOT))
        before.append(rss(base))
    ours = statistics.median(int(r["rss"]) for r in now_rss)  # type: ignore[call-overload]
    theirs = statistics.median(int(r["rss"]) for r in before)  # type: ignore[call-overload]
    rows = [
        ("tick, notify+remote hanging vs unset", f"{notified * 1e3:.3f} ms vs {plain * 1e3:.3f} ms",
         notified / plain, "<= 1.05"),
        ("RSS, notify unset: now vs before", f"{ours / 2**20:.1f} MiB vs {theirs / 2**20:.1f} MiB",
         ours / theirs, "<= 1.01"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, figures, ratio, target in rows:
        print(f"{name:<{width}}  {figures:<26} ratio {ratio:6.3f}  target {target}")
    print(f"notify unset: apprise loaded {now_rss[0]['apprise']}, notify package loaded "
          f"{now_rss[0]['notify']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
