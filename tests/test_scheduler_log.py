"""APScheduler's own log records reach the JSONL log, never the console raw (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from session_watchdog import log

TESTS = Path(__file__).parent

# A watchdog configured as `session-watchdog run` configures it, whose preemption polls (0.6 s)
# outlast their interval (0.2 s): APScheduler skips the polls that come while one is still going
# and says so. (Ticks run inline in the scheduler's thread, so they are never skipped: a slow one
# delays the next, see TestInlineTicks.)
SLOW_POLLS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from fakes import ScriptedProbe, sample
    from session_watchdog import cli, daemon, platforms
    from session_watchdog.config import Config

    class SlowPoller:
        name = "slow"

        def poll(self, now):
            time.sleep(0.6)
            return None

    config = Config(platform="generic", interval=0.2, run_dir=Path(sys.argv[2]),
                    log_file=Path(sys.argv[3]), preemption=(), preemption_poll_every=0.2)
    cli._configure_log(config)  # what run and attach do
    try:
        watchdog = daemon.Watchdog(config, platform=platforms.Platform("generic", ("test",)),
                                   probe=ScriptedProbe([sample(alive=False)]), pollers=[SlowPoller()])
        watchdog.run(run_for=3.0)
    finally:
        from session_watchdog import log
        log.close()
""")

# Ticks (0.6 s) that outlast their interval (0.2 s): each records the thread it ran on and when.
SLOW_TICKS = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from fakes import ScriptedProbe, sample
    from session_watchdog import cli, daemon, platforms
    from session_watchdog.config import Config

    spans = []

    class SlowProbe(ScriptedProbe):
        def sample(self, times):
            started = time.monotonic()
            time.sleep(0.6)
            spans.append((threading.current_thread().name, started, time.monotonic()))
            return super().sample(times)

    config = Config(platform="generic", interval=0.2, run_dir=Path(sys.argv[2]),
                    log_file=Path(sys.argv[3]), preemption=())
    cli._configure_log(config)
    try:
        watchdog = daemon.Watchdog(config, platform=platforms.Platform("generic", ("test",)),
                                   probe=SlowProbe([sample(alive=False)]), pollers=[])
        watchdog.run(run_for=3.0)
    finally:
        from session_watchdog import log
        log.close()
    print(json.dumps(spans))
""")


def run_script(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list]:
    log_file = tmp_path / "log.jsonl"
    proc = subprocess.run([sys.executable, "-c", script, str(TESTS), str(tmp_path / "run"),
                           str(log_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(line) for line in log_file.read_text().splitlines()]


class TestSchedulerRecords:
    def test_skipped_runs_are_logged_as_events_and_not_printed(self, tmp_path):
        """'skipped: maximum number of running instances' lands in the JSONL log as scheduler_log
        events; the console shows no APScheduler line."""
        proc, events = run_script(SLOW_POLLS, tmp_path)
        skipped = [e for e in events if e["event"] == "scheduler_log"
                   and "maximum number of running instances" in e["message"]]
        assert skipped, [e["event"] for e in events]
        assert {(e["logger"], e["level"]) for e in skipped} == {("apscheduler.scheduler", "warning")}
        assert "maximum number of running instances" not in proc.stderr
        assert "Execution of job" not in proc.stderr
        assert "daemon_started" in proc.stderr  # the console itself still works

    def test_close_gives_the_logger_back(self, tmp_path):
        """After log.close() APScheduler's logger propagates again, with no handler of ours left."""
        import logging

        logger = logging.getLogger("apscheduler")
        handlers = list(logger.handlers)
        log.configure(tmp_path / "log.jsonl", console=None, bridge=("apscheduler",))
        assert logger.propagate is False and len(logger.handlers) == len(handlers) + 1
        log.close()
        assert logger.propagate is True and logger.handlers == handlers


class TestInlineTicks:
    def test_slow_ticks_run_one_after_another_in_the_scheduler_thread(self, tmp_path):
        """Ticks run in the scheduler's own thread (no pool hand-off, issue 17), not in `run`'s
        (which only waits, so signal handlers never run inside a tick): a tick slower than the
        interval delays the next one, never overlaps it, and no run is reported skipped."""
        proc, events = run_script(SLOW_TICKS, tmp_path)
        spans = json.loads(proc.stdout.strip().splitlines()[-1])
        assert len(spans) >= 2, spans
        assert {name for name, _, _ in spans} == {"session-watchdog"}  # one thread, not the main one
        for (_, _, ended), (_, started, _) in zip(spans, spans[1:]):
            assert started >= ended
        assert [e for e in events if e["event"] in ("scheduler_log", "tick_missed")] == []
        assert len([e for e in events if e["event"] == "sample"]) == len(spans)
