"""Logs: JSONL events with schema, rotation, secret redaction, the console view, the default file."""

from __future__ import annotations

import gzip
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import structlog
import structlog.testing

from session_watchdog import log

HF_TOKEN = "hf_abcdef123456"
WANDB_KEY = "0123456789abcdef0123456789abcdef"
SECRET_ENV = {"HF_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY, "HOME": "/root",
              "SHORT_TOKEN": "abc"}


def read_events(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def utc() -> Iterator[None]:
    """Local time is UTC for the test, so console clocks are literal."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


class TestConfigure:
    def test_one_json_object_per_line_with_schema_event_ts(self, tmp_path: Path) -> None:
        """Each event is one JSON line with schema 1, its event name, ts and its fields."""
        path = tmp_path / "logs" / "run.jsonl"
        log.configure(path, console=None, env={})
        logger = log.get_logger()
        before = time.time()
        logger.info("daemon_started", run_dir="/run/x", interval_s=5.0)
        logger.warning("disk_low", path=Path("/content"), free_bytes=1024)
        after = time.time()
        lines = path.read_text().splitlines()
        assert len(lines) == 2
        first, second = (json.loads(line) for line in lines)
        assert before - 0.001 <= first.pop("ts") <= after + 0.001
        assert first == {"event": "daemon_started", "run_dir": "/run/x", "interval_s": 5.0,
                         "schema": 1}
        second.pop("ts")
        assert second == {"event": "disk_low", "path": "/content", "free_bytes": 1024,
                          "schema": 1, "level": "warning"}

    def test_a_log_call_returns_none(self, tmp_path: Path) -> None:
        """While configured, structlog's configuration is the process's: a log call, ours or the
        user's own, writes its line and returns None (a notebook shows any other value)."""
        import structlog

        path = tmp_path / "run.jsonl"
        log.configure(path, console=None, env={})
        assert log.get_logger().info("daemon_started") is None
        assert structlog.get_logger().info("epoch_done", epoch=3) is None
        assert [e["event"] for e in read_events(path)] == ["daemon_started", "epoch_done"]

    def test_given_ts_is_kept(self, tmp_path: Path) -> None:
        """An event that carries its own ts (the sample's clock) keeps it."""
        path = tmp_path / "run.jsonl"
        log.configure(path, console=None, env={})
        log.get_logger().info("sample", ts=1_800_000_000.0, elapsed_s=1.0)
        assert read_events(path) == [{"event": "sample", "ts": 1_800_000_000.0, "elapsed_s": 1.0,
                                      "schema": 1}]

    def test_reconfigure_closes_previous_file(self, tmp_path: Path) -> None:
        """A second configure() closes the first file and writes only to the new one."""
        first = log.configure(tmp_path / "a.jsonl", console=None, env={})
        log.configure(tmp_path / "b.jsonl", console=None, env={})
        log.get_logger().info("x")
        assert first is not None and first._fh is None
        assert (tmp_path / "a.jsonl").read_text() == ""  # opened up front (a bad path fails early), never written
        assert [e["event"] for e in read_events(tmp_path / "b.jsonl")] == ["x"]

    def test_console_only(self, tmp_path: Path) -> None:
        """configure(None) writes no file and still prints to the console."""
        console = io.StringIO()
        assert log.configure(None, console=console, env={}) is None
        log.get_logger().info("daemon_started", platform="generic")
        assert "daemon_started" in console.getvalue()
        assert "platform=generic" in console.getvalue()

    def test_console_skips_samples_file_keeps_them(self, tmp_path: Path) -> None:
        """sample events reach the file but not the console; decisions reach both."""
        path = tmp_path / "run.jsonl"
        console = io.StringIO()
        log.configure(path, console=console, env={})
        logger = log.get_logger()
        logger.info("sample", elapsed_s=5.0)
        logger.info("decision", reason="disk_low", message="free space below the margin")
        assert [e["event"] for e in read_events(path)] == ["sample", "decision"]
        [line] = console.getvalue().splitlines()
        assert line.endswith("decision (disk_low) - free space below the margin")

    def test_closed_console_does_not_raise(self, tmp_path: Path) -> None:
        """A closed terminal never stops logging to the file."""
        console = io.StringIO()
        console.close()
        log.configure(tmp_path / "run.jsonl", console=console, env={})
        log.get_logger().info("decision", reason="x")
        assert [e["event"] for e in read_events(tmp_path / "run.jsonl")] == ["decision"]

    def test_capture_logs_sees_event_dicts(self, tmp_path: Path) -> None:
        """Tests can assert on event dicts with structlog.testing.capture_logs (STYLE.md #9)."""
        log.configure(tmp_path / "run.jsonl", console=None, env={})
        with structlog.testing.capture_logs() as captured:
            log.get_logger().info("checkpoint_requested", reason="session_limit", remaining_s=812)
        assert captured == [{"event": "checkpoint_requested", "reason": "session_limit",
                             "remaining_s": 812, "log_level": "info"}]
        assert (tmp_path / "run.jsonl").read_text() == ""  # captured instead of written

    def test_one_logger_follows_every_reconfiguration(self, tmp_path: Path) -> None:
        """A module-level logger reused across configure() and capture_logs writes where the
        configuration in force says, each time (it caches its bound logger per configuration)."""
        logger = log.get_logger()
        log.configure(tmp_path / "a.jsonl", console=None, env={})
        logger.info("first")
        with structlog.testing.capture_logs() as captured:
            logger.info("captured", n=1)
        logger.info("second")
        log.configure(tmp_path / "b.jsonl", console=None, env={})
        logger.bind(run="r1").info("third")
        logger.info("fourth")
        assert [e["event"] for e in read_events(tmp_path / "a.jsonl")] == ["first", "second"]
        assert captured == [{"event": "captured", "n": 1, "log_level": "info"}]
        assert [(e["event"], e.get("run")) for e in read_events(tmp_path / "b.jsonl")] == [
            ("third", "r1"), ("fourth", None)]


class TestRotatingJsonl:
    def test_rotates_past_max_bytes_and_keeps_backups(self, tmp_path: Path) -> None:
        """Past max_bytes the file moves to .1 (older to .2); at most ``backups`` are kept."""
        path = tmp_path / "run.jsonl"
        sink = log.RotatingJsonl(path, max_bytes=100, backups=2)
        lines = [f"line-{i}-" + "x" * 32 for i in range(8)]  # 39 chars + newline = 40 bytes
        for line in lines:
            sink.write(line)
        sink.close()
        assert sorted(os.listdir(tmp_path)) == ["run.jsonl", "run.jsonl.1", "run.jsonl.2"]
        assert path.read_text().splitlines() == lines[6:8]
        assert (tmp_path / "run.jsonl.1").read_text().splitlines() == lines[4:6]
        assert (tmp_path / "run.jsonl.2").read_text().splitlines() == lines[2:4]

    def test_appends_to_existing_file_and_counts_its_size(self, tmp_path: Path) -> None:
        """A reopened log appends, and its existing bytes count toward the rotation size."""
        path = tmp_path / "run.jsonl"
        path.write_text("a" * 59 + "\n")  # 60 bytes from an earlier run
        sink = log.RotatingJsonl(path, max_bytes=100, backups=1)
        sink.write("b" * 29)  # 90 bytes: fits
        sink.write("c" * 29)  # 120 would not: rotate first
        sink.close()
        assert (tmp_path / "run.jsonl.1").read_text() == "a" * 59 + "\n" + "b" * 29 + "\n"
        assert path.read_text() == "c" * 29 + "\n"

    def test_line_longer_than_max_is_written_whole(self, tmp_path: Path) -> None:
        """An event bigger than max_bytes is still written whole, then rotated away next time."""
        path = tmp_path / "run.jsonl"
        sink = log.RotatingJsonl(path, max_bytes=10, backups=1)
        sink.write("z" * 50)
        sink.write("y")
        sink.close()
        assert (tmp_path / "run.jsonl.1").read_text() == "z" * 50 + "\n"
        assert path.read_text() == "y\n"


class TestRedaction:
    def test_secret_values_from_env(self) -> None:
        """Values of secret-looking names (6+ chars) are secrets, longest first."""
        assert log.secret_values(SECRET_ENV) == [WANDB_KEY, HF_TOKEN]

    def test_secrets_redacted_everywhere_in_the_event(self, tmp_path: Path) -> None:
        """A secret in a field, a nested dict or a list is written as [redacted]."""
        path = tmp_path / "run.jsonl"
        log.configure(path, console=None, env=SECRET_ENV)
        log.get_logger().info(
            "action", message=f"token={HF_TOKEN}",
            argv=["curl", "-H", f"Authorization: Bearer {HF_TOKEN}"],
            extra={"url": f"https://api.wandb.ai/?key={WANDB_KEY}", "n": 3,
                   "deep": [{"t": (HF_TOKEN,)}]},
            home="/root/run")
        text = path.read_text()
        assert HF_TOKEN not in text and WANDB_KEY not in text
        [event] = read_events(path)
        assert event["message"] == "token=[redacted]"
        assert event["argv"] == ["curl", "-H", "Authorization: Bearer [redacted]"]
        assert event["extra"] == {"url": "https://api.wandb.ai/?key=[redacted]", "n": 3,
                                  "deep": [{"t": ["[redacted]"]}]}
        assert event["home"] == "/root/run"  # HOME is not a secret

    def test_secrets_in_non_string_values_are_redacted(self, tmp_path: Path) -> None:
        """A secret inside a Path, an exception or a dict key never reaches the file either."""
        path = tmp_path / "run.jsonl"
        log.configure(path, console=None, env=SECRET_ENV)
        log.get_logger().info("tick_failed", path=Path(f"/tmp/{HF_TOKEN}/x"),
                              error=ValueError(f"bad key {WANDB_KEY}"), headers={HF_TOKEN: 1})
        text = path.read_text()
        assert HF_TOKEN not in text and WANDB_KEY not in text
        [event] = read_events(path)
        assert event["path"] == "/tmp/[redacted]/x"
        assert event["error"] == "ValueError('bad key [redacted]')"
        assert event["headers"] == {"[redacted]": 1}

    def test_secret_that_json_escapes_is_redacted(self, tmp_path: Path) -> None:
        """A secret with quotes, backslashes, non-ASCII and control characters (which a JSON line
        writes escaped) is still found and written as [redacted]."""
        secret = 'pa"ss\\w\u00f6rd\t\U0001f511-42'
        path = tmp_path / "run.jsonl"
        log.configure(path, console=None, env={"DB_PASSWORD": secret})
        log.get_logger().info("action", message=f"login {secret} ok", extra={secret: [secret]})
        [event] = read_events(path)
        assert event["message"] == "login [redacted] ok"
        assert event["extra"] == {"[redacted]": ["[redacted]"]}
        assert secret not in path.read_text(encoding="utf-8")

    def test_event_without_a_secret_is_written_as_without_redaction(self, tmp_path: Path) -> None:
        """With secrets configured, an event that holds none is written exactly as it would be with
        no secrets at all (tuples, Paths, numbers and nesting alike)."""
        fields = {"gpus": [{"index": 0, "util_pct": 91.5, "pids": (4242, 17)}],
                  "path": Path("/tmp/run"), "n": None, "ok": True}
        lines = []
        for env in ({}, SECRET_ENV):
            path = tmp_path / f"run-{len(env)}.jsonl"
            log.configure(path, console=None, env=env)
            log.get_logger().info("sample", ts=1.5, **fields)
            log.close()
            lines.append(path.read_text())
        assert lines[0] == lines[1]
        assert json.loads(lines[1])["gpus"] == [{"index": 0, "util_pct": 91.5, "pids": [4242, 17]}]

    def test_console_is_redacted_too(self, tmp_path: Path) -> None:
        """The console line carries [redacted], never the secret."""
        console = io.StringIO()
        log.configure(None, console=console, env=SECRET_ENV)
        log.get_logger().info("decision", reason="x", message=f"using {HF_TOKEN}")
        assert HF_TOKEN not in console.getvalue()
        assert "- using [redacted]" in console.getvalue()


    def test_a_secret_with_a_backslash_inside_an_exception_reaches_neither_file_nor_console(
            self, tmp_path: Path) -> None:
        """An exception object carrying a token with a backslash is redacted on the console
        (which prints str()) and in the file (which holds its repr, the backslash doubled)."""
        secret = "hf_ab\\cd1234"
        console = io.StringIO()
        log.configure(tmp_path / "run.jsonl", console=console, env={"HF_TOKEN": secret})
        log.get_logger().error("notify_failed", error=OSError(f"auth {secret} refused"))
        log.close()
        [event] = read_events(tmp_path / "run.jsonl")
        assert event["error"] == "OSError('auth [redacted] refused')"
        assert console.getvalue().rstrip().endswith("error=OSError('auth [redacted] refused')")
        assert "cd1234" not in (tmp_path / "run.jsonl").read_text() + console.getvalue()


class TestConsoleLine:
    def test_sample_events_are_not_shown(self) -> None:
        """sample events have no console line."""
        assert log.console_line({"event": "sample", "ts": 0.0, "elapsed_s": 1.0}) is None

    def test_decision_shows_kind_reason_message_and_known_fields(self, utc: None) -> None:
        """A decision line shows the clock, kind, (reason), '- message' and selected fields."""
        event = {"event": "decision", "ts": 3723.0, "kind": "request", "reason": "session_limit",
                 "message": "checkpoint 812 s before the deadline", "seq": 3,
                 "action": "checkpoint", "remaining_s": 812, "schema": 1}
        assert log.console_line(event) == (
            "[session-watchdog 01:02:03] decision request (session_limit) - checkpoint 812 s "
            "before the deadline seq=3 action=checkpoint")

    def test_level_shown_when_no_kind(self, utc: None) -> None:
        """Without kind or step the level is shown."""
        event = {"event": "tick_failed", "ts": 0.0, "level": "error", "error": "OSError: EIO"}
        assert log.console_line(event) == (
            "[session-watchdog 00:00:00] tick_failed error error=OSError: EIO")


class TestDefaultLogFile:
    def test_drive_mydrive_is_preferred(self, tmp_path: Path) -> None:
        """A writable Drive's MyDrive holds session-watchdog/<run>.jsonl."""
        drive = tmp_path / "drive"
        (drive / "MyDrive").mkdir(parents=True)
        env = {"XDG_STATE_HOME": str(tmp_path / "state")}
        assert log.default_log_file("exp1", [drive], env) == (
            drive / "MyDrive" / "session-watchdog" / "exp1.jsonl")

    def test_persistent_dir_without_mydrive(self, tmp_path: Path) -> None:
        """A persistent dir with no MyDrive (AutoDL's data disk) is used directly."""
        data = tmp_path / "autodl-tmp"
        data.mkdir()
        assert log.default_log_file("exp1", [data], {}) == data / "session-watchdog" / "exp1.jsonl"

    def test_first_usable_persistent_dir_wins(self, tmp_path: Path) -> None:
        """Missing persistent dirs are skipped in favour of the next one."""
        data = tmp_path / "data"
        data.mkdir()
        assert log.default_log_file("r", [tmp_path / "missing", data], {}) == (
            data / "session-watchdog" / "r.jsonl")

    def test_state_home_otherwise(self, tmp_path: Path) -> None:
        """With no usable persistent dir the log goes under $XDG_STATE_HOME."""
        env = {"XDG_STATE_HOME": str(tmp_path / "state")}
        assert log.default_log_file("exp1", [tmp_path / "missing"], env) == (
            tmp_path / "state" / "session-watchdog" / "exp1.jsonl")

    def test_home_state_dir_without_xdg(self) -> None:
        """Without $XDG_STATE_HOME it is ~/.local/state."""
        assert log.default_log_file("exp1", (), {}) == (
            Path.home() / ".local" / "state" / "session-watchdog" / "exp1.jsonl")

    def test_does_not_create_anything(self, tmp_path: Path) -> None:
        """Choosing the file creates no directory (importing/configuring is where I/O happens)."""
        log.default_log_file("exp1", (), {"XDG_STATE_HOME": str(tmp_path / "state")})
        assert os.listdir(tmp_path) == []


class TestCompressedRotation:
    def write_rotations(self, path: Path, count: int, per_file: int = 40) -> list:
        sink = log.RotatingJsonl(path, max_bytes=per_file * 41, backups=3, compress=True)
        lines = [json.dumps({"event": "sample", "i": i, "pad": "x" * 24}) for i in range(count)]
        for line in lines:
            sink.write(line)
        sink.close()
        return lines

    def test_rotated_files_are_gzipped_and_hold_every_line_in_order(self, tmp_path: Path) -> None:
        """With compress, rotated files become .N.gz; together with the live file they hold
        every line written, oldest in the highest index."""
        path = tmp_path / "run.jsonl"
        lines = self.write_rotations(path, 200)
        names = sorted(os.listdir(tmp_path))
        assert "run.jsonl" in names
        rotated = sorted((n for n in names if n != "run.jsonl"),
                         key=lambda n: int(n.split(".")[2]), reverse=True)
        assert rotated and all(n.endswith(".gz") for n in rotated)
        read: list = []
        for name in rotated:
            with gzip.open(tmp_path / name, "rt", encoding="utf-8") as fh:
                read.extend(fh.read().splitlines())
        read.extend(path.read_text().splitlines())
        assert read == lines

    def test_compressed_backups_are_kept_by_disk_budget_not_count(self, tmp_path: Path) -> None:
        """More than ``backups`` compressed files are kept while they fit in max_bytes x backups."""
        path = tmp_path / "run.jsonl"
        self.write_rotations(path, 400)
        rotated = [n for n in os.listdir(tmp_path) if n.endswith(".gz")]
        assert len(rotated) > 3
        assert sum((tmp_path / n).stat().st_size for n in rotated) <= 40 * 41 * 3

    def test_the_watchdog_log_compresses_rotated_files(self, tmp_path: Path) -> None:
        """The watchdog's own log (configured by the CLI) gzips its rotated files."""
        from session_watchdog import cli
        from session_watchdog.config import Config

        path = tmp_path / "run.jsonl"
        cli._configure_log(Config.build(log_file=str(path), log_max_bytes="2000", log_backups=2))
        sink = log._current["jsonl"]
        try:
            assert sink is not None and sink.compress
            for i in range(100):
                log.get_logger().info("sample", i=i)
        finally:
            log.close()
        assert (tmp_path / "run.jsonl.1.gz").exists()
        assert not (tmp_path / "run.jsonl.1").exists()
