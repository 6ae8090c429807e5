"""APScheduler's own log records reach the JSONL log, never the console raw (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from session_watchdog import log

TESTS = Path(__file__).parent

# A watchdog configured as `session-watchdog run` configures it, whose ticks (0.6 s) outlast their
# interval (0.2 s): APScheduler skips the runs that come while one is still going and says so.
SLOW_TICKS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from fakes import ScriptedProbe, sample
    from session_watchdog import cli, daemon, platforms
    from session_watchdog.config import Config

    class SlowProbe(ScriptedProbe):
        def sample(self, times):
            time.sleep(0.6)
            return super().sample(times)

    config = Config(platform="generic", interval=0.2, run_dir=Path(sys.argv[2]),
                    log_file=Path(sys.argv[3]), preemption=())
    cli._configure_log(config)  # what run and attach do
    try:
        watchdog = daemon.Watchdog(config, platform=platforms.Platform("generic", ("test",)),
                                   probe=SlowProbe([sample(alive=False)]), pollers=[])
        watchdog.run(run_for=3.0)
    finally:
        from session_watchdog import log
        log.close()
""")


class TestSchedulerRecords:
    def test_skipped_runs_are_logged_as_events_and_not_printed(self, tmp_path):
        """'skipped: maximum number of running instances' lands in the JSONL log as scheduler_log
        events; the console shows no APScheduler line."""
        log_file = tmp_path / "log.jsonl"
        proc = subprocess.run([sys.executable, "-c", SLOW_TICKS, str(TESTS), str(tmp_path / "run"),
                               str(log_file)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        events = [json.loads(line) for line in log_file.read_text().splitlines()]
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
