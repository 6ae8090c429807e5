"""Config: parsing, precedence, validation; the CLI's answer to every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from session_watchdog.cli import main
from session_watchdog.config import (
    KEYS,
    OFF,
    Config,
    ConfigError,
    load_config,
    parse_argv,
    parse_duration,
    parse_size,
)


class TestParsers:
    @pytest.mark.parametrize("raw, seconds", [
        (90, 90.0), ("90s", 90.0), ("15m", 900.0), ("11h30m", 41400.0),
        ("1d", 86400.0), ("1h 30m", 5400.0), ("250ms", 0.25), (2.5, 2.5),
    ])
    def test_durations(self, raw, seconds):
        """Durations are seconds, minutes, hours and days, alone or combined."""
        assert parse_duration(raw) == seconds

    @pytest.mark.parametrize("raw", ["", "abc", "-5s", "0", "0s", "5x", "m", "1h-", "90", True, None, [1]])
    def test_bad_durations(self, raw):
        """Zero, negative and malformed durations are refused."""
        with pytest.raises(ValueError):
            parse_duration(raw)

    @pytest.mark.parametrize("raw, size", [("1GiB", 2**30), ("500MB", 500 * 10**6), (4096, 4096), ("2 kib", 2048)])
    def test_sizes(self, raw, size):
        """Sizes accept SI and binary units."""
        assert parse_size(raw) == size

    def test_argv_is_never_a_shell_line(self):
        """An end command is split on whitespace only; shell syntax stays literal."""
        assert parse_argv("echo ok; touch /tmp/x") == ("echo", "ok;", "touch", "/tmp/x")
        assert parse_argv('["sudo", "shutdown", "-h", "now"]') == ("sudo", "shutdown", "-h", "now")
        assert parse_argv(["a b", "c"]) == ("a b", "c")


class TestDurationsNeedAUnit:
    """A bare number for a duration is refused everywhere it is text (issue 11: `--max-session 12`
    gave a 12-second session)."""

    @pytest.mark.parametrize("raw, hint", [
        ("12", "'12' has no unit; write 12s, 12m or 12h"),
        ("1.5", "'1.5' has no unit; write 1.5s, 1.5m or 1.5h"),
    ])
    def test_a_bare_number_string_names_the_fix(self, raw, hint):
        """A string without a unit is refused with the three spellings the user may have meant."""
        with pytest.raises(ValueError) as info:
            parse_duration(raw)
        assert str(info.value) == hint

    def test_flag_without_a_unit_is_exit_2_with_the_fix(self, capsys):
        """`run --max-session 12` is exit 2 with one line naming the flag and the fix."""
        code, _, err = run_cli(["run", "--max-session", "12", "--for", "1s"], capsys)
        assert code == 2
        assert err.strip() == ("session-watchdog: error: --max-session = '12' is invalid: "
                               "'12' has no unit; write 12s, 12m or 12h")

    def test_variable_without_a_unit_is_refused(self):
        """SESSION_WATCHDOG_MAX_SESSION=12 is refused, naming the variable."""
        with pytest.raises(ConfigError, match=r"^environment: SESSION_WATCHDOG_MAX_SESSION = '12' "
                                              r"is invalid: '12' has no unit; write 12s, 12m or 12h$"):
            load_config(None, {"SESSION_WATCHDOG_MAX_SESSION": "12"})

    @pytest.mark.parametrize("line, hint", [
        ("max_session = 12", 'max_session = 12 is invalid: 12 has no unit; write "12s", "12m" or "12h"'),
        ("grace = 2.5", 'grace = 2.5 is invalid: 2.5 has no unit; write "2.5s", "2.5m" or "2.5h"'),
        ('warn_before = ["15m", 60]', "60 has no unit"),
        ("checkpoint_every = 0", 'checkpoint_every = 0 is invalid: 0 has no unit; write "off"'),
    ])
    def test_toml_number_for_a_duration_is_refused(self, tmp_path, line, hint):
        """A TOML number for a duration key is refused with a hint to quote it with a unit."""
        toml = tmp_path / "w.toml"
        toml.write_text(line + "\n")
        with pytest.raises(ConfigError) as info:
            load_config(toml, {})
        assert hint in str(info.value)

    def test_python_numbers_stay_seconds(self):
        """From Python a number is seconds (Config.build(interval=2.5)); strings need a unit."""
        assert Config.build(interval=2.5, max_session="12h").max_session == 43200.0
        assert Config.build(interval=2.5).interval == 2.5


class TestPrecedence:
    def test_file_then_env_then_flags(self, tmp_path):
        """Flags beat SESSION_WATCHDOG_* variables, which beat the TOML file, which beats defaults."""
        toml = tmp_path / "w.toml"
        toml.write_text('interval = "7s"\nmargin = "10m"\nmax_session = "2h"\ntier = "colab-pro"\n')
        env = {"SESSION_WATCHDOG_MARGIN": "8m", "SESSION_WATCHDOG_MAX_SESSION": "3h"}
        config = load_config(toml, env, {"max_session": "4h"})
        assert (config.interval, config.margin, config.max_session, config.tier, config.stop_margin) == (
            7.0, 480.0, 14400.0, "colab-pro", 60.0)

    def test_every_key_has_a_flag_and_a_variable(self):
        """Each key is settable by SESSION_WATCHDOG_<KEY> and by --<key> (no drift between them)."""
        from session_watchdog.cli import build_parser

        help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
        for key in KEYS:
            assert "--" + key.name.replace("_", "-") in help_text
        assert {f.name for f in __import__("dataclasses").fields(Config)} == {k.name for k in KEYS}

    def test_off_switches_a_duration_off(self):
        """'off' disables a duration key (stored as 0.0)."""
        assert Config.build(checkpoint_every="off").checkpoint_every == OFF

    def test_toml_section_is_accepted(self, tmp_path):
        """Keys may sit under a [session-watchdog] table."""
        toml = tmp_path / "w.toml"
        toml.write_text('[session-watchdog]\ninterval = "3s"\nend_command = ["sudo", "poweroff"]\n')
        config = load_config(toml, {})
        assert (config.interval, config.end_command) == (3.0, ("sudo", "poweroff"))


class TestValidation:
    def test_idle_limit_must_be_below_the_session_limit(self):
        """idle_limit >= max_session is refused with both values named."""
        with pytest.raises(ConfigError, match=r"idle_limit = 7200s is invalid: expected less than max_session = 3600s"):
            Config.build(max_session="1h", idle_limit="2h")

    def test_config_is_frozen(self):
        """Config cannot be mutated after it was validated."""
        with pytest.raises(Exception):
            Config().interval = 1.0  # type: ignore[misc]


def run_cli(argv, capsys, env=None, monkeypatch=None):
    if env and monkeypatch:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


class TestBadInput:
    """Every bad input: exit code 2, one line naming key, value and what was expected."""

    @pytest.mark.parametrize("argv, env, expected", [
        (["run", "--interval=-5s"], {}, "--interval = '-5s' is invalid: expected a duration like 90s"),
        (["run", "--interval", "abc"], {}, "--interval = 'abc' is invalid"),
        (["run", "--max-session", "0"], {}, "--max-session = '0' is invalid: '0' has no unit; write 'off' to switch it off"),
        (["run", "--interval", "0"], {}, "--interval = '0' is invalid: expected a positive duration"),
        (["run", "--tier", "colab-gold"], {}, "--tier = 'colab-gold' is invalid: expected one of colab-free"),
        (["run", "--log-backups", "1.5"], {}, "--log-backups = '1.5' is invalid: expected a whole number"),
        (["run", "--max-session", "1h", "--idle-limit", "2h"], {}, "idle_limit = 7200s is invalid"),
        (["run", "--run-dir", "relative/dir"], {}, "--run-dir = 'relative/dir' is invalid: expected an absolute path"),
        (["run", "--watch-paths", "/nonexistent/x"], {}, "/nonexistent/x does not exist"),
        (["run", "--config", "/nonexistent/w.toml"], {}, "config file /nonexistent/w.toml does not exist"),
        (["run"], {"SESSION_WATCHDOG_BOGUS": "1"}, "unknown config key 'SESSION_WATCHDOG_BOGUS'"),
        (["run"], {"SESSION_WATCHDOG_INTERVAL": "-1"}, "SESSION_WATCHDOG_INTERVAL = '-1' is invalid"),
        (["run", "--for", "soon"], {}, "--for 'soon' is invalid"),
    ])
    def test_flag_and_env_errors(self, argv, env, expected, capsys, monkeypatch):
        """A bad flag or variable is one line on stderr, exit code 2, no traceback."""
        code, out, err = run_cli(argv, capsys, env, monkeypatch)
        assert code == 2
        assert expected in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    @pytest.mark.parametrize("content, expected", [
        ("bogus_key = 1\n", "unknown config key 'bogus_key'"),
        ('interval = "fast"\n', "interval = 'fast' is invalid"),
        ("interval = [1, 2]\n", "interval = [1, 2] is invalid"),
        ("interval = \n", "is not valid TOML"),
        ('dry_run = "maybe"\n', "dry_run = 'maybe' is invalid: expected true or false"),
    ])
    def test_config_file_errors(self, content, expected, tmp_path, capsys):
        """A bad TOML file (unknown key, wrong type, malformed) is one line and exit code 2."""
        toml = tmp_path / "w.toml"
        toml.write_text(content)
        code, _, err = run_cli(["run", "--config", str(toml)], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1

    def test_unreadable_config_file(self, tmp_path, capsys):
        """A config path that cannot be read as a file (a directory, non-UTF-8 bytes) is exit 2."""
        code, _, err = run_cli(["run", "--config", str(tmp_path)], capsys)
        assert code == 2 and "is a directory" in err
        bad = tmp_path / "bin.toml"
        bad.write_bytes(b"interval = '\xff\xfe'\n")
        code, _, err = run_cli(["run", "--config", str(bad)], capsys)
        assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1

    def test_unknown_flag(self, capsys):
        """An unknown flag is one line with a pointer to --help."""
        code, _, err = run_cli(["run", "--bogus"], capsys)
        assert code == 2 and "unrecognized arguments: --bogus" in err and len(err.strip().splitlines()) == 1

    def test_real_process_prints_no_traceback(self, tmp_path):
        """Through the console entry point too: exit 2, one line, no traceback."""
        proc = subprocess.run([sys.executable, "-m", "session_watchdog", "run", "--margin=-1m"],
                              capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
        assert proc.returncode == 2
        assert proc.stderr.strip() == ("session-watchdog: error: --margin = '-1m' is invalid: "
                                       "expected a duration like 90s, 15m or 11h30m")


class TestStatusAndDoctor:
    def test_status_of_a_missing_run_dir_is_a_clear_error(self, tmp_path, capsys):
        """status on a run dir that does not exist says so (exit 2)."""
        code, _, err = run_cli(["status", "--run-dir", str(tmp_path / "nope")], capsys)
        assert code == 2 and "no run directory at" in err

    def test_doctor_json_reports_checks(self, tmp_path, capsys):
        """doctor --json lists the platform, NVML state and run dir; nothing to fix here: exit 0."""
        code, out, _ = run_cli(["doctor", "--json", "--run-dir", str(tmp_path / "run")], capsys)
        report = json.loads(out)
        names = [c["name"] for c in report["checks"]]
        assert code == 0 and report["ok"] is True
        assert names[:3] == ["platform", "session budget", "nvml"]
        assert "package name" in names and "end action" in names

    def test_doctor_flags_an_unsafe_run_dir(self, tmp_path, capsys):
        """A world-writable run dir is something to fix: exit code 1."""
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        run_dir.chmod(0o777)
        code, out, _ = run_cli(["doctor", "--run-dir", str(run_dir)], capsys)
        assert code == 1 and "[FIX ] run dir" in out and "chmod 700" in out


    @pytest.mark.parametrize("argv", [["doctor"], ["doctor", "--json"], ["status", "--json"]])
    def test_a_closed_pipe_ends_quietly(self, tmp_path, argv):
        """`doctor | head -2`: a reader that went away ends the command with 141 and no traceback."""
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first write: EPIPE every time
        try:
            proc = subprocess.run([sys.executable, "-m", "session_watchdog", *argv, "--run-dir",
                                   str(tmp_path)], stdout=write_end, stderr=subprocess.PIPE,
                                  text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        finally:
            os.close(write_end)
        assert (proc.returncode, proc.stderr) == (141, "")


class TestBadInputFromReview:
    @pytest.mark.parametrize("argv, expected", [
        (["run", "--interval", "100000000000000s"], "expected a duration of at most 366 days"),
        (["run", "--end-command", "[]"], "expected a non-empty list"),
        (["run", "--log-file", "/proc/x/log.jsonl", "--for", "1s"], "cannot write the log file /proc/x/log.jsonl"),
        (["attach", "--pid", "-5"], "--pid -5 is not a process id"),
    ])
    def test_one_line_and_exit_2(self, argv, expected, capsys, tmp_path):
        """Huge numbers, an empty argv, an unwritable log and a negative pid: one line, exit 2."""
        code, _, err = run_cli(argv + ["--run-dir", str(tmp_path / "run")], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1

    @pytest.mark.parametrize("content", ["log_backups = inf\n", "interval = " + "9" * 400 + "\n"])
    def test_overflowing_toml_values(self, content, tmp_path, capsys):
        """inf and 400-digit integers in TOML are refused with one line, not an OverflowError."""
        toml = tmp_path / "w.toml"
        toml.write_text(content)
        code, _, err = run_cli(["run", "--config", str(toml)], capsys)
        assert code == 2 and "is invalid" in err and "Traceback" not in err

    def test_status_with_malformed_files(self, tmp_path, capsys):
        """status reports a malformed trainer.json/state.json as a problem line, never a traceback."""
        from session_watchdog import channel

        run = channel.RunDir(tmp_path / "run")
        (run.path / "trainer.json").write_text(json.dumps({"v": 1, "state": "running", "last_checkpoint": {"at": "yesterday"}}))
        (run.path / "state.json").write_text('{"v": 1, "policy": []}')
        code, out, _ = run_cli(["status", "--run-dir", str(run.path)], capsys)
        assert code == 0 and out.count("problem:") == 2

    def test_demo_refuses_a_directory_it_did_not_make(self, tmp_path, capsys):
        """demo --dir on a folder with someone's files: exit 2, nothing deleted."""
        keep = tmp_path / "checkpoints" / "my-model.pt"
        keep.parent.mkdir()
        keep.write_text("precious")
        code, _, err = run_cli(["demo", "--dir", str(tmp_path)], capsys)
        assert code == 2 and "not made by the demo" in err and keep.read_text() == "precious"

    def test_for_is_checked_every_second(self, tmp_path):
        """run --for 1s with a 300 s tick stops long before the tick (start-up may be slow under load)."""
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "session_watchdog", "run", "--interval", "300s", "--for", "1s",
                               "--run-dir", str(tmp_path / "run"), "--log-file", str(tmp_path / "l.jsonl")],
                              capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0 and time.monotonic() - start < 150
