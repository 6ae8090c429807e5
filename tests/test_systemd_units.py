"""systemd unit files: the keys the daemon relies on, hardening that keeps NVML and /proc working,
and ``systemd-analyze verify`` where it is installed.

Verify checks a copy of each unit whose ExecStart names an executable that exists here (``true``),
arguments unchanged: verify refuses a unit whose binary is missing, and
/usr/local/bin/session-watchdog exists only on an installed host. Verify reports unknown keys and
bad values as warnings with exit status 0, so the test fails on any line naming our unit too.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from session_watchdog.cli import build_parser
from session_watchdog.config import load_config

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = SYSTEMD / "session-watchdog.service"
TEMPLATE = SYSTEMD / "session-watchdog@.service"
EXAMPLE = SYSTEMD / "watchdog.toml.example"

Unit = Dict[str, List[Tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """A systemd unit file as {section: [(key, value), ...]}, repeated keys kept in order."""
    unit: Unit = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):  # continuation line
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            assert section not in unit, f"section [{section}] appears twice"
            unit[section] = []
            continue
        assert section is not None, f"key outside any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> List[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


REQUIRED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "60",
    "Restart": "on-failure",
    "RestartSec": "5",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "30",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "full",
}
# Each of these would break a reading the watchdog needs or a path it shares with the trainer:
# device restrictions hide /dev/nvidia* (NVML); ProtectSystem=strict makes /home, /data read-only.
FORBIDDEN_SERVICE = ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock",
                     "ProtectHome", "PrivateTmp", "ProtectProc", "ProcSubset",
                     "MemoryDenyWriteExecute", "ReadOnlyPaths", "InaccessiblePaths")


def check_common(unit: Unit) -> None:
    for key, value in REQUIRED_SERVICE.items():
        assert one(unit, "Service", key) == value, key
    present = {k for k, _ in unit["Service"]}
    assert not present & set(FORBIDDEN_SERVICE)
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]
    keys = [k for k, _ in unit["Service"] if k != "Environment"]
    assert len(keys) == len(set(keys)), "a [Service] key is set twice"


def exec_argv(unit: Unit, instance: str = "") -> List[str]:
    return shlex.split(one(unit, "Service", "ExecStart").replace("%i", instance))


class TestServiceUnit:
    def test_required_keys(self):
        """session-watchdog.service is Type=notify with the watchdog, restart and stop settings."""
        check_common(parse_unit(SERVICE.read_text()))

    def test_exec_start(self):
        """ExecStart runs the installed console script with the system config file."""
        argv = exec_argv(parse_unit(SERVICE.read_text()))
        assert argv == ["/usr/local/bin/session-watchdog", "run",
                        "--config", "/etc/session-watchdog/watchdog.toml"]

    def test_exec_start_flags_exist(self):
        """The CLI accepts ExecStart's arguments (a renamed flag would fail here, not on a host)."""
        args = build_parser().parse_args(exec_argv(parse_unit(SERVICE.read_text()))[1:])
        assert (args.command, args.config) == ("run", "/etc/session-watchdog/watchdog.toml")

    def test_default_dirs(self):
        """The run dir defaults to /run/session-watchdog (kept across restarts), the log to /var/lib."""
        unit = parse_unit(SERVICE.read_text())
        assert values(unit, "Service", "Environment") == [
            "PYTHONUNBUFFERED=1", "XDG_RUNTIME_DIR=%t XDG_STATE_HOME=%S"]
        assert one(unit, "Service", "RuntimeDirectory") == "session-watchdog"
        assert one(unit, "Service", "RuntimeDirectoryMode") == "0700"
        assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
        assert one(unit, "Service", "StateDirectory") == "session-watchdog"


class TestTemplateUnit:
    def test_required_keys(self):
        """session-watchdog@.service has the same required settings as the plain unit."""
        check_common(parse_unit(TEMPLATE.read_text()))

    def test_exec_start_uses_instance(self):
        """The instance name picks the config file and the run name."""
        argv = exec_argv(parse_unit(TEMPLATE.read_text()), "resnet")
        assert argv == ["/usr/local/bin/session-watchdog", "run",
                        "--config", "/etc/session-watchdog/resnet.toml", "--run-name", "resnet"]
        args = build_parser().parse_args(argv[1:])
        assert (args.config, args.run_name) == ("/etc/session-watchdog/resnet.toml", "resnet")

    def test_same_service_settings_as_plain_unit(self):
        """Apart from ExecStart, the template's [Service] section matches the plain unit's."""
        plain = [kv for kv in parse_unit(SERVICE.read_text())["Service"] if kv[0] != "ExecStart"]
        templ = [kv for kv in parse_unit(TEMPLATE.read_text())["Service"] if kv[0] != "ExecStart"]
        assert templ == plain


class TestExampleConfig:
    def test_loads(self):
        """watchdog.toml.example is a valid config for a generic host, as shipped."""
        config = load_config(EXAMPLE, env={})
        assert (config.platform, config.interval, config.max_session, config.dry_run) == (
            "generic", 5.0, 0.0, False)

    def test_tick_fits_watchdog(self):
        """The example's tick is under half of WatchdogSec, so the keep-alive after each tick is on time."""
        watchdog_sec = float(one(parse_unit(SERVICE.read_text()), "Service", "WatchdogSec"))
        assert load_config(EXAMPLE, env={}).interval < watchdog_sec / 2


# --------------------------------------------------------------------------------------------
# systemd-analyze verify


def _verify(path: Path) -> Tuple[int, str]:
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


def _runnable_copy(src: Path, dest_dir: Path, **replace: str) -> Path:
    """src with ExecStart's program swapped for one that exists here; arguments unchanged."""
    true = shutil.which("true")
    assert true is not None
    text = src.read_text().replace("ExecStart=/usr/local/bin/session-watchdog ", f"ExecStart={true} ")
    for old, new in replace.items():
        text = text.replace(old, new)
    dest = dest_dir / src.name
    dest.write_text(text)
    return dest


def _complaints(output: str, path: Path) -> List[str]:
    return [line for line in output.splitlines() if path.name in line]


@pytest.fixture
def verify_works(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd to run this check)")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe = probe_dir / "probe.service"
    probe.write_text(f"[Service]\nExecStart={shutil.which('true')}\n")
    rc, output = _verify(probe)
    if rc != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {output.strip()[:200]}")
    return tmp_path


class TestSystemdAnalyzeVerify:
    @pytest.mark.parametrize("unit", [SERVICE, TEMPLATE], ids=lambda p: p.name)
    def test_units_verify_clean(self, verify_works, unit):
        """systemd-analyze verify accepts each unit with no warning about it."""
        copy = _runnable_copy(unit, verify_works)
        rc, output = _verify(copy)
        assert rc == 0, output
        assert _complaints(output, copy) == []

    def test_a_typo_would_be_caught(self, verify_works):
        """The check is not vacuous: a misspelt key is reported against the unit."""
        copy = _runnable_copy(SERVICE, verify_works, **{"WatchdogSec=": "WatchdogSecs="})
        _, output = _verify(copy)
        assert any("WatchdogSecs" in line for line in _complaints(output, copy))
