"""The idle daemon's own cost (issue 17), as behaviour: no job of its own polls a stop condition
between ticks, and `--for` still ends on time with a long tick interval. Speed itself is measured
by benchmarks/bench_daemon.py, never asserted here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import List

from fakes import FakeClock, ScriptedProbe, sample

from session_watchdog import platforms
from session_watchdog.config import Config
from session_watchdog.daemon import Watchdog

GENERIC = platforms.Platform("generic", ("test",))
START = 1_800_000_000.0


def make(tmp_path: Path, interval: str) -> Watchdog:
    cfg = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"),
                       max_session="1h", interval=interval)
    return Watchdog(cfg, platform=GENERIC, probe=ScriptedProbe([sample()]), clock=FakeClock(START),
                    session_start=START)


class TestStopCheck:
    def test_stop_when_is_asked_once_per_tick(self, tmp_path: Path):
        """stop_when is consulted right after each tick and at no other time (no 1 s polling job)."""
        dog = make(tmp_path, "0.3s")
        calls: List[int] = []

        def stop_when() -> bool:
            calls.append(dog.ticks)
            return dog.ticks >= 4

        done = threading.Event()
        runner = threading.Thread(target=lambda: (dog.run(stop_when=stop_when, handle_signals=False),
                                                  done.set()), daemon=True)
        runner.start()
        assert done.wait(120), "the watchdog did not stop after its fourth tick"
        assert calls == list(range(1, dog.ticks + 1))

    def test_run_for_ends_on_time_with_a_long_interval(self, tmp_path: Path):
        """`--for 1s` with a 300 s tick interval ends after about a second, not a tick later."""
        dog = make(tmp_path, "300s")
        done = threading.Event()
        started = time.monotonic()
        runner = threading.Thread(target=lambda: (dog.run(run_for=1.0, handle_signals=False),
                                                  done.set()), daemon=True)
        runner.start()
        assert done.wait(120), "run_for did not stop the watchdog"
        assert time.monotonic() - started >= 1.0
        assert dog.ticks == 1  # the first tick, at start; the next would be 300 s later

    def test_check_stop_between_ticks(self, tmp_path: Path):
        """check_stop() stops run() between ticks once stop_when holds (a signal after the end)."""
        dog = make(tmp_path, "300s")
        flag = threading.Event()
        done = threading.Event()
        runner = threading.Thread(target=lambda: (dog.run(stop_when=flag.is_set, handle_signals=False),
                                                  done.set()), daemon=True)
        runner.start()
        deadline = time.monotonic() + 120
        while dog.ticks < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dog.ticks == 1
        flag.set()
        dog.check_stop()
        assert done.wait(120), "check_stop did not stop the watchdog"


class TestCpuPercent:
    def test_reads_proc_stat_at_most_every_window_and_repeats_the_figure(self):
        """With every_s, /proc/stat is read once per window and the busy % is repeated in between;
        the figure covers the whole window."""
        reads: List[str] = []
        texts = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  200 0 200 1400 0 0 0 0 0 0\n",
                      "cpu  300 0 300 1500 0 0 0 0 0 0\n"])
        now = [0.0]

        def read(path: Path) -> str:
            reads.append(str(path))
            return next(texts)

        from session_watchdog.probes import CpuPercent

        cpu = CpuPercent(read, Path("/proc/stat"), every_s=30.0, monotonic=lambda: now[0])
        assert cpu() is None  # the first read is the baseline
        now[0] = 5.0
        assert cpu() is None and len(reads) == 1
        now[0] = 30.0
        assert cpu() == 25.0  # (200 busy of 800) over the 30 s window
        now[0] = 55.0
        assert cpu() == 25.0 and len(reads) == 2
        now[0] = 60.0
        assert cpu() == 66.7 and len(reads) == 3


class TestLeanImports:
    def test_the_cli_process_imports_structlog_without_rich_and_rich_stays_importable(self):
        """import_structlog_without_rich() loads structlog but not rich; a later import of rich works."""
        import subprocess
        import sys

        code = ("import sys\nfrom session_watchdog import log\nlog.import_structlog_without_rich()\n"
                "print('structlog' in sys.modules, 'rich' in sys.modules)\n"
                "import rich\nprint('rich' in sys.modules)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["True", "False", "True"]

    def test_help_and_status_do_not_import_structlog_or_the_daemon(self, tmp_path: Path):
        """`--help` and `status` load neither structlog nor the daemon module (start-up cost)."""
        import subprocess
        import sys

        for argv in (["--help"], ["status", "--run-dir", str(tmp_path / "run")]):
            code = ("import sys, contextlib, io\nfrom session_watchdog import cli\n"
                    "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
                    f"    try:\n        cli.main({argv!r})\n    except SystemExit:\n        pass\n"
                    "print(sorted(m for m in ('structlog', 'session_watchdog.daemon', 'apscheduler') "
                    "if m in sys.modules))\n")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "[]", argv
