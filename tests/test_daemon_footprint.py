"""The idle daemon's own cost (issue 17), as behaviour: no job of its own polls a stop condition
between ticks, and `--for` still ends on time with a long tick interval. Speed itself is measured
by benchmarks/bench_daemon.py, never asserted here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import List, Tuple

from fakes import FakeClock, ScriptedProbe, sample

from session_watchdog import channel, platforms
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


# What each command must not load (issue 17): the report's modules and plotting, the daemon's
# scheduler and logging, and the libraries behind them (rich, colorama, ssl/libcrypto).
REPORT_MODULES = ("session_watchdog.report.reading", "session_watchdog.report.summary",
                  "session_watchdog.report.render", "session_watchdog.report.tail",
                  "session_watchdog.report.aggregate", "matplotlib", "numpy")
DAEMON_MODULES = ("session_watchdog.daemon", "session_watchdog.policy", "session_watchdog.probes",
                  "apscheduler", "structlog", "psutil", "pynvml")
HEAVY_LIBRARIES = ("rich", "colorama", "_ssl", "_hashlib", "hmac", "torch")


def modules_after(argv: List[str], env_run_dir: Path) -> List[str]:
    """The modules a fresh interpreter holds after ``cli.main(argv)`` returns."""
    import os
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom session_watchdog import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    code = cli.main({argv!r})\n"
            "print(code)\nprint(' '.join(sorted(sys.modules)))\n")
    env = dict(os.environ, SESSION_WATCHDOG_RUN_DIR=str(env_run_dir))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=env)
    assert done.returncode == 0, done.stderr
    code_line, names = done.stdout.splitlines()[-2:]
    assert code_line == "0", (argv, done.stdout[-2000:])
    return names.split()


def loaded(names: List[str], prefixes: Tuple[str, ...]) -> List[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


class TestModulesLoaded:
    def test_help_loads_no_report_daemon_or_heavy_library(self, tmp_path: Path):
        """`session-watchdog --help` builds every subparser without the report's modules, the
        daemon's, structlog or APScheduler (start-up time, issue 17)."""
        names = modules_after(["--help"], tmp_path / "run")
        assert loaded(names, REPORT_MODULES + DAEMON_MODULES + HEAVY_LIBRARIES) == []

    def test_status_loads_no_report_probe_scheduler_or_heavy_library(self, tmp_path: Path):
        """`status` of a run dir a real watchdog filled (its policy state included) reads it
        without the report, the daemon, the probes (psutil, NVML), structlog or APScheduler."""
        run_dir = tmp_path / "run"
        modules_after(["run", "--for", "1s", "--log-file", str(tmp_path / "log.jsonl"),
                       "--max-session", "1h", "--watch-paths", str(tmp_path)], run_dir)
        assert (run_dir / channel.STATE_FILE).exists()
        names = modules_after(["status", "--run-dir", str(run_dir)], run_dir)
        assert "session_watchdog.policy" in names  # it read the policy state
        assert loaded(names, REPORT_MODULES + DAEMON_MODULES[2:] + ("session_watchdog.daemon",)
                      + HEAVY_LIBRARIES) == []

    def test_the_watchdog_process_loads_neither_the_report_nor_rich_colorama_or_ssl(
            self, tmp_path: Path):
        """A real `run --for 1s` holds the daemon and structlog, but not the report's modules,
        plotting, rich, colorama, ssl or OpenSSL's hashes (RSS, issue 17)."""
        names = modules_after(["run", "--for", "1s", "--log-file", str(tmp_path / "log.jsonl"),
                               "--max-session", "1h", "--watch-paths", str(tmp_path)],
                              tmp_path / "run")
        assert "session_watchdog.daemon" in names and "structlog" in names  # it did run
        assert loaded(names, REPORT_MODULES + HEAVY_LIBRARIES + ("ssl", "secrets")) == []

    def test_the_lean_structlog_import_leaves_ssl_and_colorama_importable(self):
        """After import_structlog_without_rich(), ssl (with TLS contexts) still imports."""
        import subprocess
        import sys

        code = ("import sys\nfrom session_watchdog import log\nlog.import_structlog_without_rich()\n"
                "print(sorted(m for m in ('ssl', 'colorama', 'rich') if m in sys.modules))\n"
                "import ssl\nprint(ssl.create_default_context().protocol is not None)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[:2] == ["[]", "True"]

    def test_with_notifications_asyncio_keeps_its_tls(self, tmp_path: Path):
        """A watchdog with a notification channel imports structlog with ssl as usual: asyncio's
        TLS transports (some Apprise channels use them) work; without one they are left out."""
        import os
        import subprocess
        import sys

        def sslproto_has_ssl(extra: List[str]) -> str:
            argv = ["run", "--for", "1s", "--log-file", str(tmp_path / "log.jsonl"),
                    "--max-session", "1h", "--watch-paths", str(tmp_path), *extra]
            code = ("import sys, contextlib, io\nfrom session_watchdog import cli\n"
                    "with contextlib.redirect_stdout(io.StringIO()), "
                    "contextlib.redirect_stderr(io.StringIO()):\n"
                    f"    assert cli.main({argv!r}) == 0\n"
                    "print(sys.modules['asyncio.sslproto'].ssl is not None)\n")
            env = dict(os.environ, SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run"))
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=240, env=env)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        # an unreachable hook (discard port): sending fails quietly, the watchdog runs on
        assert sslproto_has_ssl(["--notify", "json://127.0.0.1:9/hook"]) == "True"
        assert sslproto_has_ssl([]) == "False"
