"""Every bad input: one line on stderr, exit code 2, nothing hangs (issue 18).

A property-based fuzz test over TOML files (deep nesting, huge numbers, odd characters, FIFOs,
directories, devices), ``SESSION_WATCHDOG_*`` environment values and command-line flags runs the
real CLI, ``session_watchdog.cli.main(argv)``, in this process, with a per-example time limit
(SIGALRM). Whatever it is given, the CLI returns 0 (1 for a doctor that found problems) or 2
with exactly one line on stderr, never a traceback, and within a few seconds. A few cases also
run as real ``python -m session_watchdog`` child processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from integration_helpers import reap

from session_watchdog.cli import main
from session_watchdog.config import KEYS, ConfigError, load_config, parse_duration

EXAMPLE_LIMIT_S = 20  # per example; a hang is a failure, not a stuck suite
ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Raw material


KEY_NAMES = [key.name for key in KEYS]
ODD_STRINGS = [
    "", " ", "\x00", "a\x00b", "\n", "two\nlines", "\r\n", "\t", "\x1b[31m", "\u202e", "\ufeff",
    "é", "☃", "🚀", "%s%n", "{}", "'", '"', "\\", "-", "--", "--help", "=", "~", "~nosuchuser/x",
    "None", "null", "NaN", "nan", "inf", "-inf", "1e999", "-0", "0", "0.0", "1", "-1",
    "9" * 30, "9" * 5000, "1" * 400 + "d", "1e400s", "0x10", "1_000", "off", "never", "true",
    "a" * 10_000,
]
DURATIONS = ["90s", "15m", "11h30m", "1d", "366d", "367d", "1ms", "0s", "-5s", "5", "0.5s",
             "1e3s", "9" * 25 + "d", "1" * 400 + "s", "h", "1h1", "1x", "off"]
SIZES = ["1GiB", "500MB", "0", "-1", "1" * 400, "1e999", "9" * 30 + "TiB", "1b", "x"]
INTS = ["1", "0", "-1", "3", "1000", "1001", "10000000000000000000", "9" * 5000, "1.5", "2.0"]


def paths(tmp: str) -> List[str]:
    """Paths that break naive checks: NUL, over-long, a file where a directory belongs, devices."""
    return [
        f"{tmp}/ok", f"{tmp}/afile/below", f"{tmp}/afile", f"{tmp}/fifo", f"{tmp}/fifo/x",
        # Never an existing directory outside the scratch one ("/", "~"): until the run dir
        # refuses directories it did not create, the watchdog tightens their mode to 0700.
        "/dev/null", "/dev/null/x", "/proc/self/x", "relative/x", ".", "x/../..",
        f"{tmp}/a\x00b", f"{tmp}/" + "n" * 300, f"{tmp}/" + "d/" * 3000 + "x",
        f"{tmp}/two\nlines", f"{tmp}/sp ace", f"{tmp}/\x1b[31m", f"{tmp}/é☃", "/" + "x" * 5000,
    ]


def toml_literal(value: Any) -> str:
    """A TOML spelling of a Python value (json's escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(text, text)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(str(value))


@st.composite
def raw_values(draw: Any, tmp: str) -> Any:
    """A value for any key: right or wrong type, sane or hostile."""
    return draw(st.one_of(
        st.sampled_from(ODD_STRINGS + DURATIONS + SIZES + INTS + paths(tmp)),
        st.text(max_size=30),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.sampled_from([10**400, -(10**400), 2**63, 2**64]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.lists(st.sampled_from(["a", "1", "60m", "/tmp", 3]), max_size=4),
    ))


def key_values(key_name: str, tmp: str) -> List[Any]:
    """Values of the right kind for ``key_name``, valid and not: they get past the first check."""
    key = next(k for k in KEYS if k.name == key_name)
    metavar = key.metavar
    if key.is_flag:
        return [True, False, "yes", "no", "maybe", 1, 0]
    if metavar == "DURATION":
        return DURATIONS
    if metavar == "SIZE":
        return SIZES
    if metavar in ("PATH", "PATHS"):
        return paths(tmp)
    if metavar in ("N", "K", "PCT", "PRICE", "AMOUNT"):
        return INTS + ["1e308", "1e-308", "5e-324", 1e308, 1e-308, 10**400, "50", "99.9", "100"]
    if metavar == "NAME":
        return ["default", "colab", "autodl", "slurm", "generic", "auto", "x" * 65, "a/b", ""]
    if metavar == "ARGV":
        return [["true"], [], [""], '["sudo", "shutdown"]', "[", "echo hi", ["a", 1]]
    if metavar == "LIST":
        return ["60m,15m", "", ",", "aws,gcp", "off", "auto,bogus", "1d," * 50]
    if metavar == "TIER":
        return ["colab-free", "colab-pro", "colab-pro-plus", "pro"]
    return []


@st.composite
def value_for(draw: Any, key_name: str, tmp: str) -> Any:
    """Mostly a value of the key's own kind, sometimes anything at all."""
    own = key_values(key_name, tmp)
    if own and draw(st.integers(0, 9)) < 7:
        return draw(st.sampled_from(own))
    return draw(raw_values(tmp))


@st.composite
def toml_files(draw: Any, tmp: str) -> Tuple[str, Any]:
    """(kind, payload) of a --config file."""
    # /dev/zero is left to the child-process tests below, which run under a memory limit: a
    # regression there would read without end and take this whole test process with it.
    kind = draw(st.sampled_from(["toml"] * 6 + ["deep", "binary", "fifo", "directory",
                                                 "missing", "fifo-link", "big"]))
    if kind == "toml":
        lines = []
        for _ in range(draw(st.integers(0, 4))):
            name = draw(st.one_of(st.sampled_from(KEY_NAMES),
                                  st.sampled_from(["nope", "log-backups", "a.b", "\"\\u0000\""])))
            value = draw(value_for(name, tmp) if name in KEY_NAMES else raw_values(tmp))
            lines.append(f"{name} = {toml_literal(value)}")
        if draw(st.booleans()):
            lines.insert(0, "[session-watchdog]")
        return kind, "\n".join(lines) + "\n"
    if kind == "deep":
        depth = draw(st.sampled_from([50, 990, 1200, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a=", "}")]))
        return kind, f"{draw(st.sampled_from(KEY_NAMES))} = {opener * depth}{closer * depth}\n"
    if kind == "binary":
        return kind, draw(st.binary(max_size=64))
    return kind, None


@st.composite
def invocations(draw: Any, tmp: str) -> Tuple[List[str], Dict[str, str], Tuple[str, Any]]:
    """(argv, environment, config file) for one run of the CLI."""
    command = draw(st.sampled_from(["doctor"] * 5 + ["doctor --json"] * 2 + ["run"] + ["status",
                                                                                     "cancel"]))
    argv = command.split()
    env: Dict[str, str] = {}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(KEY_NAMES))
        value = draw(value_for(name, tmp))
        text = json.dumps(value) if isinstance(value, list) else str(value)
        if "\x00" not in text:  # the kernel cannot pass a NUL inside an environment value
            env["SESSION_WATCHDOG_" + name.upper()] = text
    config = draw(toml_files(tmp))
    if argv[0] in ("status", "cancel"):
        argv += ["--run-dir", draw(st.sampled_from(paths(tmp) + ODD_STRINGS[:8]))]
        return argv, env, config
    if argv[0] == "doctor" and draw(st.booleans()):
        argv += ["--run-dir", draw(st.sampled_from(paths(tmp)))]
    if draw(st.booleans()):
        argv += ["--config", f"{tmp}/config.toml"]
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(KEYS))
        flag = "--" + key.name.replace("_", "-")
        if key.is_flag:
            argv.append(draw(st.sampled_from([flag, "--no-" + flag[2:]])))
        else:
            value = draw(value_for(key.name, tmp))
            argv += [flag, json.dumps(value) if isinstance(value, list) else str(value)]
    if argv[0] == "run":
        # Bounded, and never a real end of this machine: --dry-run comes last and wins.
        argv += ["--for", draw(st.sampled_from(["1ms", "2ms", "", " ", "0", "0s", "-1s", "x",
                                                "1e999s", "9" * 40 + "d", "367d", "nan"])),
                 "--dry-run"]
        if draw(st.booleans()):
            argv += ["--log-file", draw(st.sampled_from(paths(tmp)))]
        else:
            argv += ["--log-file", f"{tmp}/log.jsonl"]
    return argv, env, config


def confine_run_dir(argv: List[str], tmp: Path) -> List[str]:
    """Make sure the run dir used is inside ``tmp`` whatever the environment or TOML file say:
    a flag wins over both, so the last --run-dir must name a path below ``tmp``."""
    if argv[0] not in ("doctor", "run"):
        return argv
    last = max((i for i, a in enumerate(argv) if a == "--run-dir"), default=None)
    if last is not None and last + 1 < len(argv) and argv[last + 1].startswith(f"{tmp}/"):
        return argv
    return argv + ["--run-dir", f"{tmp}/run"]


# --------------------------------------------------------------------------------------------
# Running the CLI in this process


class Hung(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise Hung(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def environment(values: Dict[str, str], home: Optional[Path] = None) -> Iterator[None]:
    """``SESSION_WATCHDOG_*`` set to ``values`` only; with ``home``, the default run dir and log
    live below it (HOME and XDG_RUNTIME_DIR), never in the real home directory."""
    names = ("HOME", "XDG_RUNTIME_DIR") if home is not None else ()
    saved = {k: v for k, v in os.environ.items() if k.startswith("SESSION_WATCHDOG_") or k in names}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    if home is not None:
        os.environ.update(HOME=str(home), XDG_RUNTIME_DIR=str(home))
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("SESSION_WATCHDOG_") or k in names]:
            del os.environ[name]
        os.environ.update(saved)


def make_config(tmp: Path, kind: str, payload: Any) -> None:
    target = tmp / "config.toml"
    if kind in ("toml", "deep"):
        target.write_text(payload, encoding="utf-8")
    elif kind == "binary":
        target.write_bytes(payload)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    elif kind == "fifo-link":
        target.symlink_to(tmp / "fifo")
    elif kind == "big":
        target.write_bytes(b"# " + b"x" * (8 << 20) + b"\n")


def invoke(argv: Sequence[str], env: Dict[str, str],
           home: Optional[Path] = None) -> Tuple[int, str, float]:
    """Run main(argv) here; (exit code, stderr, seconds). Stdout is discarded."""
    err = io.StringIO()
    started = time.monotonic()
    with time_limit(EXAMPLE_LIMIT_S), environment(env, home), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue(), time.monotonic() - started


def assert_one_line_or_success(argv: Sequence[str], code: int, err: str) -> None:
    assert "Traceback" not in err, err
    allowed = (0, 1, 2) if argv[0] == "doctor" else (0, 2)
    assert code in allowed, (code, err)
    if code == 2:
        lines = err.rstrip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("session-watchdog"), err


def scratch() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="sw-fuzz-"))
    (tmp / "afile").write_text("a regular file where a directory belongs")
    os.mkfifo(tmp / "fifo")
    return tmp


FUZZ_TMP = "/tmp/sw-fuzz-template"  # stands in for each example's own directory in strategies


class TestFuzzedInput:
    @settings(max_examples=int(os.environ.get("SW_FUZZ_N", "120")), deadline=None,
              derandomize=os.environ.get("SW_FUZZ_RANDOM") is None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(case=invocations(FUZZ_TMP))
    def test_any_input_gives_success_or_one_line_and_exit_2(self, case) -> None:
        """TOML files, environment values and flags, fuzzed: exit 0 (1: doctor found problems)
        or exit 2 with exactly one stderr line; no traceback; an answer within seconds."""
        argv, env, (kind, payload) = case
        tmp = scratch()
        try:
            argv = confine_run_dir([a.replace(FUZZ_TMP, str(tmp)) for a in argv], tmp)
            env = {k: v.replace(FUZZ_TMP, str(tmp)) for k, v in env.items()}
            if isinstance(payload, str):
                payload = payload.replace(FUZZ_TMP, str(tmp))
            make_config(tmp, kind, payload)
            code, err, _ = invoke(argv, env, home=tmp)
            assert_one_line_or_success(argv, code, err)
        finally:
            subprocess.run(["rm", "-rf", "--", str(tmp)], check=False)


# --------------------------------------------------------------------------------------------
# The cases the issue names, one by one


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("a regular file")
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


def run_cli(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    home = Path(tempfile.mkdtemp(prefix="sw-home-"))
    try:
        code, err, _ = invoke(argv, env or {}, home=home)
    finally:
        subprocess.run(["rm", "-rf", "--", str(home)], check=False)
    return code, err


class TestNamedCases:
    @pytest.mark.parametrize("depth", [1200, 5000, 100_000])
    def test_deeply_nested_toml_is_one_line(self, tmp: Path, depth: int) -> None:
        """Arrays nested thousands deep: exit 2, one line naming the file, no RecursionError."""
        (tmp / "c.toml").write_text("interval = " + "[" * depth + "]" * depth + "\n")
        code, err = run_cli(["doctor", "--config", str(tmp / "c.toml")])
        assert code == 2 and err.count("\n") == 1
        assert f"config file {tmp / 'c.toml'} is not valid TOML" in err

    def test_nesting_is_refused_before_parsing_whatever_the_stack_depth(self, tmp: Path) -> None:
        """65 levels are refused even with a huge recursion limit (the parser would accept them),
        while brackets inside strings and comments do not count."""
        import sys

        (tmp / "c.toml").write_text("interval = " + "[" * 65 + "]" * 65 + "\n")
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(100_000)
        try:
            code, err = run_cli(["doctor", "--config", str(tmp / "c.toml")])
        finally:
            sys.setrecursionlimit(old)
        assert code == 2 and f"config file {tmp / 'c.toml'} is not valid TOML: nested too deeply" in err
        (tmp / "ok.toml").write_text('run_name = "' + "[" * 100 + '"  # ' + "{" * 100 + "\n")
        code, err = run_cli(["doctor", "--config", str(tmp / "ok.toml"), "--run-dir", str(tmp / "r")])
        assert "nested too deeply" not in err

    @pytest.mark.parametrize("name", ["fifo", "fifo-link", "directory", "big"])
    def test_a_config_that_is_not_a_small_regular_file_is_refused_at_once(
            self, tmp: Path, name: str) -> None:
        """A FIFO (or a link to one), a directory or an 8 MiB file as --config: exit 2, one
        line, at once (/dev/zero: see TestRealProcesses)."""
        target = tmp / "config.toml"
        make_config(tmp, name, None)
        code, err = run_cli(["doctor", "--config", str(target)])
        assert code == 2 and err.count("\n") == 1 and str(target) in err

    @pytest.mark.parametrize("value", ["", " "])
    def test_an_empty_for_is_an_error_not_forever(self, tmp: Path, value: str) -> None:
        """`run --for ''` used to mean "no limit": it is a bad duration, exit 2."""
        code, err = run_cli(["run", "--for", value, "--run-dir", str(tmp / "run"),
                             "--log-file", str(tmp / "log.jsonl"), "--dry-run"])
        assert code == 2 and err.startswith("session-watchdog: error: --for") and err.count("\n") == 1

    @pytest.mark.parametrize("value", ["1001", "10000000000000000000", "9" * 5000],
                             ids=["1001", "1e19", "5000-digits"])
    def test_a_huge_log_backups_is_refused(self, tmp: Path, value: str) -> None:
        """log_backups is bounded (rotation walks every backup): exit 2, one line."""
        code, err = run_cli(["doctor", "--log-backups", value])
        assert code == 2 and "--log-backups" in err and "at most 1000" in err
        assert err.count("\n") == 1

    def test_a_fifo_as_log_file_is_one_line_not_a_hang(self, tmp: Path) -> None:
        """--log-file naming a FIFO that nobody reads: exit 2 at once, one line saying so."""
        code, err = run_cli(["run", "--for", "1ms", "--dry-run", "--run-dir", str(tmp / "run"),
                             "--log-file", str(tmp / "fifo")])
        assert code == 2 and err.count("\n") == 1
        assert "a FIFO that no process reads" in err

    def test_log_rotation_with_the_largest_backups_is_quick(self, tmp: Path) -> None:
        """With log_backups at its bound, rotating a tiny log still takes well under the limit."""
        from session_watchdog.log import RotatingJsonl

        jsonl = RotatingJsonl(tmp / "log.jsonl", max_bytes=10, backups=1000)
        with time_limit(EXAMPLE_LIMIT_S):
            for index in range(20):
                jsonl.write(f"line {index:04d}")
        jsonl.close()
        assert (tmp / "log.jsonl.19").exists() and not (tmp / "log.jsonl.20").exists()

    @pytest.mark.parametrize("path", [
        "{tmp}/a\x00b", "{tmp}/" + "n" * 300, "{tmp}/" + "d/" * 3000 + "x", "{tmp}/afile/below",
        "{tmp}/two\nlines", "/dev/null/x",
    ], ids=["nul", "long-name", "long-path", "file-as-dir", "newline", "dev-null-below"])
    @pytest.mark.parametrize("key", ["run_dir", "log_file"])
    def test_odd_paths_are_one_line(self, tmp: Path, path: str, key: str) -> None:
        """Run dir and log file: NUL bytes, over-long names and paths, a file where a directory
        belongs, control characters: `doctor` and `run` answer with one line, no traceback."""
        value = path.format(tmp=tmp)
        flag = "--" + key.replace("_", "-")
        for argv in (["doctor", flag, value],
                     ["run", "--for", "1ms", "--dry-run", flag, value]
                     + (["--log-file", str(tmp / "l.jsonl")] if key == "run_dir"
                        else ["--run-dir", str(tmp / "run")])):
            code, err = run_cli(argv)
            assert_one_line_or_success(argv, code, err)

    def test_huge_budget_from_money_is_formatted_without_overflow(self, tmp: Path) -> None:
        """money_budget / price_per_hour that overflows: a one-line error, not OverflowError."""
        code, err = run_cli(["doctor", "--platform", "autodl", "--money-budget", "1e308",
                             "--price-per-hour", "1e-308"])
        assert_one_line_or_success(["doctor"], code, err)
        assert "Traceback" not in err

    @pytest.mark.parametrize("command", ["status", "cancel", "stop"])
    def test_an_empty_run_dir_is_an_error_not_the_default(self, tmp: Path, command: str) -> None:
        """`--run-dir ''` is a bad path (exit 2), never the default run directory."""
        code, err = run_cli([command, "--run-dir", ""])
        assert code == 2 and "--run-dir '' is invalid" in err and err.count("\n") == 1

    def test_errors_with_newlines_in_the_value_stay_on_one_line(self, tmp: Path) -> None:
        """A bad value or file name holding a newline is shown escaped, on one line."""
        (tmp / "a\nb.toml").write_text("interval = 'x'\n")
        for argv in (["doctor", "--config", str(tmp / "a\nb.toml")],
                     ["doctor", "--interval", "1\n2"],
                     ["doctor", "--no-such\nflag"]):
            code, err = run_cli(argv)
            assert code == 2 and err.count("\n") == 1, (argv, err)

    def test_duration_parsing_is_bounded(self) -> None:
        """A duration of 400 digits is an error (a float overflow is never raised)."""
        with pytest.raises(ValueError):
            parse_duration("9" * 400 + "d")
        with pytest.raises(ConfigError):
            load_config(None, {"SESSION_WATCHDOG_INTERVAL": "1" * 400 + "s"})


def limit_memory() -> None:
    """In the child: 2 GiB of address space, so reading /dev/zero without end fails there."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


class TestRealProcesses:
    """A few of the cases as real child processes (the console script's own path)."""

    @pytest.mark.parametrize("case", ["fifo-config", "dev-zero-config", "empty-for", "deep-toml",
                                      "huge-backups", "nul-run-dir"])
    def test_child_answers_with_one_line_and_exit_2(self, tmp: Path, case: str) -> None:
        """Each named hostile input, given to `python -m session_watchdog`: exit 2, one stderr
        line, within the time limit (a hang is killed and fails the test)."""
        argv = {
            "fifo-config": ["doctor", "--config", str(tmp / "fifo")],
            "dev-zero-config": ["doctor", "--config", "/dev/zero"],
            "empty-for": ["run", "--for", "", "--dry-run", "--run-dir", str(tmp / "run"),
                          "--log-file", str(tmp / "l.jsonl")],
            "deep-toml": ["doctor", "--config", str(tmp / "deep.toml")],
            "huge-backups": ["run", "--for", "1ms", "--dry-run", "--log-backups", "9" * 30,
                             "--run-dir", str(tmp / "run"), "--log-file", str(tmp / "l.jsonl")],
            "nul-run-dir": ["doctor", "--config", str(tmp / "nul.toml")],
        }[case]
        (tmp / "deep.toml").write_text("interval = " + "[" * 5000 + "]" * 5000 + "\n")
        (tmp / "nul.toml").write_text(f'run_dir = "{tmp}/a\\u0000b"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHDOG_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen([sys.executable, "-m", "session_watchdog", *argv], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=limit_memory)
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            reap(proc)
        assert proc.returncode == 2, err
        assert err.count("\n") == 1 and err.startswith("session-watchdog"), err
