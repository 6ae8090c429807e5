"""Platforms: detection from env/files/hostname, resolved defaults, the session clock, SLURM."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import psutil
import pytest

from session_watchdog import channel, platforms
from session_watchdog.config import OFF, Config
from session_watchdog.platforms import Platform, SessionStart

DRIVE = Path("/content/drive")
AUTODL_TMP = Path("/root/autodl-tmp")


def detect(tmp_path: Path, env: Mapping[str, str], *, files: tuple = (), dirs: tuple = (),
           hostname: str = "runner-1") -> Platform:
    """detect() on a fake filesystem root holding ``files`` and ``dirs`` (absolute paths)."""
    for name in dirs:
        (tmp_path / name.lstrip("/")).mkdir(parents=True)
    for name in files:
        target = tmp_path / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("x\n")
    return platforms.detect(env=dict(env), root=tmp_path, hostname=hostname)


class TestDetect:
    @pytest.mark.parametrize("name", ["COLAB_RELEASE_TAG", "COLAB_GPU"])
    def test_colab_by_env_marker(self, tmp_path: Path, name: str) -> None:
        """Either Colab variable alone means Colab; without TBE_RUNTIME_ADDR there is no end action."""
        assert detect(tmp_path, {name: "1"}) == Platform("colab", (f"env {name}",))

    def test_colab_by_runtime_addr_can_unassign(self, tmp_path: Path) -> None:
        """TBE_RUNTIME_ADDR means Colab, and the runtime can be ended with colab-unassign."""
        got = detect(tmp_path, {"TBE_RUNTIME_ADDR": "172.28.0.1:8013"})
        assert got == Platform("colab", ("env TBE_RUNTIME_ADDR",), end_action="colab-unassign")

    def test_colab_by_hostname_file(self, tmp_path: Path) -> None:
        """The /var/colab/hostname file alone means Colab."""
        got = detect(tmp_path, {}, files=("/var/colab/hostname",))
        assert got == Platform("colab", ("file /var/colab/hostname",))

    def test_colab_lists_all_evidence_and_drive(self, tmp_path: Path) -> None:
        """Every marker found is listed in order; a mounted Drive is the persistent dir."""
        env = {"COLAB_RELEASE_TAG": "release-colab_20250801", "COLAB_GPU": "1",
               "TBE_RUNTIME_ADDR": "172.28.0.1:8013"}
        got = detect(tmp_path, env, files=("/var/colab/hostname",), dirs=("/content/drive",))
        assert got == Platform(
            "colab", ("env COLAB_RELEASE_TAG", "env COLAB_GPU", "env TBE_RUNTIME_ADDR",
                      "file /var/colab/hostname"),
            end_action="colab-unassign", persistent_dirs=(DRIVE,))

    def test_colab_enterprise_never_unassigns(self, tmp_path: Path) -> None:
        """On Colab Enterprise (Vertex) enterprise is True and there is no end action."""
        env = {"COLAB_RELEASE_TAG": "x", "TBE_RUNTIME_ADDR": "172.28.0.1:8013",
               "VERTEX_PRODUCT": "COLAB_ENTERPRISE"}
        got = detect(tmp_path, env)
        assert got == Platform("colab", ("env COLAB_RELEASE_TAG", "env TBE_RUNTIME_ADDR",
                                         "env VERTEX_PRODUCT=COLAB_ENTERPRISE"),
                               enterprise=True, end_action=None)

    def test_vertex_product_alone_is_not_colab(self, tmp_path: Path) -> None:
        """VERTEX_PRODUCT without a Colab marker is not Colab."""
        assert detect(tmp_path, {"VERTEX_PRODUCT": "COLAB_ENTERPRISE"}).name == "generic"

    @pytest.mark.parametrize("name", ["AutoDLContainerUUID", "AutoDLRegion"])
    def test_autodl_by_env(self, tmp_path: Path, name: str) -> None:
        """An AutoDL variable means AutoDL, ended with autodl-shutdown."""
        assert detect(tmp_path, {name: "abc"}) == Platform(
            "autodl", (f"env {name}",), end_action="autodl-shutdown")

    def test_autodl_by_hostname_with_data_dir(self, tmp_path: Path) -> None:
        """An autodl-container-* hostname plus the data dir: AutoDL with the data dir persistent."""
        got = detect(tmp_path, {}, dirs=("/root/autodl-tmp",), hostname="autodl-container-xyz")
        assert got == Platform("autodl", ("hostname autodl-container-xyz", "dir /root/autodl-tmp"),
                               end_action="autodl-shutdown", persistent_dirs=(AUTODL_TMP,))

    def test_autodl_by_hostname_alone(self, tmp_path: Path) -> None:
        """The hostname alone is enough; with no data dir nothing is persistent."""
        got = detect(tmp_path, {}, hostname="autodl-container-xyz")
        assert got == Platform("autodl", ("hostname autodl-container-xyz",),
                               end_action="autodl-shutdown")

    def test_autodl_data_dir_alone_is_not_enough(self, tmp_path: Path) -> None:
        """/root/autodl-tmp by itself (anyone can mkdir it) is not AutoDL."""
        got = detect(tmp_path, {}, dirs=("/root/autodl-tmp",))
        assert got == Platform("generic", ("no platform marker found",), end_action="command")

    def test_slurm_by_job_id(self, tmp_path: Path) -> None:
        """SLURM_JOB_ID means SLURM; the job id is kept; nothing ends the allocation."""
        got = detect(tmp_path, {"SLURM_JOB_ID": "123456"})
        assert got == Platform("slurm", ("env SLURM_JOB_ID=123456",), slurm_job_id="123456")

    def test_empty_slurm_job_id_is_generic(self, tmp_path: Path) -> None:
        """An empty SLURM_JOB_ID is no evidence."""
        assert detect(tmp_path, {"SLURM_JOB_ID": ""}).name == "generic"

    def test_generic_otherwise(self, tmp_path: Path) -> None:
        """No marker at all: generic, ended by the configured command."""
        assert detect(tmp_path, {"HOME": "/root", "PATH": "/usr/bin"}) == Platform(
            "generic", ("no platform marker found",), end_action="command")

    def test_colab_wins_over_slurm_and_autodl(self, tmp_path: Path) -> None:
        """Markers are checked Colab first, then AutoDL, then SLURM."""
        assert detect(tmp_path, {"COLAB_GPU": "1", "AutoDLRegion": "x",
                                 "SLURM_JOB_ID": "1"}).name == "colab"
        assert detect(tmp_path, {"AutoDLRegion": "x", "SLURM_JOB_ID": "1"}).name == "autodl"


class TestForced:
    def test_auto_and_same_name_keep_detected(self) -> None:
        """--platform auto, or the detected name, keeps the detected details."""
        detected = Platform("colab", ("env COLAB_GPU",), persistent_dirs=(DRIVE,))
        assert platforms.forced("auto", detected) is detected
        assert platforms.forced("colab", detected) is detected

    def test_other_name_replaces_detection(self) -> None:
        """A different --platform gives that platform's end action and says why."""
        detected = Platform("generic", ("no platform marker found",), end_action="command")
        assert platforms.forced("autodl", detected) == Platform(
            "autodl", ("--platform autodl",), end_action="autodl-shutdown")
        assert platforms.forced("slurm", detected) == Platform("slurm", ("--platform slurm",))


COLAB = Platform("colab", ("env COLAB_GPU",), end_action="colab-unassign")
AUTODL = Platform("autodl", ("env AutoDLRegion",), end_action="autodl-shutdown")
SLURM = Platform("slurm", ("env SLURM_JOB_ID=1",), slurm_job_id="1")
GENERIC = Platform("generic", ("no platform marker found",), end_action="command")


def resolved(config: Config, platform: Platform, **kwargs: Any) -> Dict[str, Any]:
    got = platforms.resolve(config, platform, **kwargs)
    keys = ("platform", "max_session", "idle_limit", "idle_warn", "end_when_done", "grace",
            "idle_end_after")
    return {key: getattr(got, key) for key in keys}


class TestResolve:
    def test_colab_free(self) -> None:
        """Colab free: 12 h budget, 90 min idle limit, 30 min idle warning, ends when done."""
        assert resolved(Config(), COLAB) == {
            "platform": "colab", "max_session": 43200.0, "idle_limit": 5400.0,
            "idle_warn": 1800.0, "end_when_done": True, "grace": 120.0, "idle_end_after": 1800.0}

    @pytest.mark.parametrize("tier", ["colab-pro", "colab-pro-plus"])
    def test_colab_paid_tiers(self, tier: str) -> None:
        """Colab Pro and Pro+: 24 h budget, no idle warning by default."""
        got = resolved(Config(tier=tier), COLAB)
        assert (got["max_session"], got["idle_limit"], got["idle_warn"]) == (86400.0, 5400.0, OFF)

    def test_explicit_max_session_wins(self) -> None:
        """--max-session beats the tier's budget; an idle limit not below it is switched off."""
        got = resolved(Config.build(max_session="1h"), COLAB)
        assert (got["max_session"], got["idle_limit"], got["idle_warn"]) == (3600.0, OFF, OFF)

    def test_explicit_off_stays_off(self) -> None:
        """--max-session off gives no budget even on Colab."""
        assert resolved(Config.build(max_session="off"), COLAB)["max_session"] == OFF

    def test_autodl_money_budget(self) -> None:
        """AutoDL: budget = money_budget / price_per_hour hours."""
        got = resolved(Config(money_budget=10.0, price_per_hour=2.5), AUTODL)
        assert got == {"platform": "autodl", "max_session": 14400.0, "idle_limit": OFF,
                       "idle_warn": OFF, "end_when_done": True, "grace": 120.0,
                       "idle_end_after": 1800.0}

    def test_autodl_without_price_has_no_budget(self) -> None:
        """A money budget without a price gives no session budget."""
        assert resolved(Config(money_budget=10.0), AUTODL)["max_session"] == OFF

    def test_generic_has_nothing_on(self) -> None:
        """Generic: no budget, no idle rules, does not end the host by default, 60 s grace."""
        assert resolved(Config(), GENERIC) == {
            "platform": "generic", "max_session": OFF, "idle_limit": OFF, "idle_warn": OFF,
            "end_when_done": False, "grace": 60.0, "idle_end_after": OFF}

    def test_slurm_limit_passed_in(self) -> None:
        """SLURM: the job's time limit is the budget; the allocation is not ended by default."""
        got = resolved(Config(), SLURM, slurm_limit_s=7200.0)
        assert (got["max_session"], got["end_when_done"], got["idle_limit"]) == (7200.0, False, OFF)
        assert resolved(Config(), SLURM)["max_session"] == OFF

    def test_explicit_values_win_over_platform_defaults(self) -> None:
        """Explicit end_when_done, grace, idle limits are kept as given."""
        config = Config.build(end_when_done=False, grace="30s", idle_limit="1h",
                              idle_warn="10m", idle_end_after="off")
        got = resolved(config, COLAB)
        assert got == {"platform": "colab", "max_session": 43200.0, "idle_limit": 3600.0,
                       "idle_warn": 600.0, "end_when_done": False, "grace": 30.0,
                       "idle_end_after": OFF}

    def test_log_file_defaults_to_state_dir(self, tmp_path: Path) -> None:
        """Without persistent storage the log goes to $XDG_STATE_HOME/session-watchdog/<run>.jsonl."""
        got = platforms.resolve(Config(run_name="exp1"), GENERIC)
        assert got.log_file == tmp_path / "state" / "session-watchdog" / "exp1.jsonl"

    def test_explicit_log_file_wins(self, tmp_path: Path) -> None:
        """A configured log file is kept."""
        got = platforms.resolve(Config(log_file=tmp_path / "x.jsonl"), COLAB)
        assert got.log_file == tmp_path / "x.jsonl"


# --------------------------------------------------------------------------------------------
# The session clock


@pytest.fixture
def fence(monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    """Boot id and PID 1 create time under the test's control (both read at call time)."""
    values: Dict[str, Any] = {"boot_id": "boot-a", "pid1": 1_700_000_000.5}
    monkeypatch.setattr(platforms, "boot_id", lambda root=Path("/"): values["boot_id"])
    monkeypatch.setattr(platforms, "_pid1_create_time", lambda: values["pid1"])
    return values


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    return channel.RunDir(tmp_path / "run").path


class TestSessionStart:
    def test_first_call_persists_second_reads_back(self, run_path: Path,
                                                   fence: Dict[str, Any]) -> None:
        """The first value is stored; a later call returns it with persisted=True."""
        first = platforms.session_start(run_path, GENERIC, now=1000.0)
        second = platforms.session_start(run_path, GENERIC, now=2000.0)
        assert first == SessionStart(1000.0, "first start of the watchdog", False)
        assert second == SessionStart(1000.0, "first start of the watchdog", True)
        assert channel.read_json(run_path / channel.SESSION_FILE) == {
            "v": 1, "start": 1000.0, "source": "first start of the watchdog",
            "boot_id": "boot-a", "pid1": 1_700_000_000.5, "platform": "generic", "slurm_job": None}

    def test_new_boot_is_a_new_session(self, run_path: Path, fence: Dict[str, Any]) -> None:
        """A changed boot id invalidates the stored start."""
        platforms.session_start(run_path, GENERIC, now=1000.0)
        fence["boot_id"] = "boot-b"
        assert platforms.session_start(run_path, GENERIC, now=3000.0) == SessionStart(
            3000.0, "first start of the watchdog", False)
        assert platforms.session_start(run_path, GENERIC, now=4000.0).start == 3000.0

    def test_restarted_container_is_a_new_session(self, run_path: Path,
                                                  fence: Dict[str, Any]) -> None:
        """A changed PID 1 create time (container restarted) invalidates the stored start."""
        platforms.session_start(run_path, GENERIC, now=1000.0)
        fence["pid1"] = 1_700_000_500.0
        assert platforms.session_start(run_path, GENERIC, now=3000.0).persisted is False

    def test_other_platform_is_a_new_session(self, run_path: Path, fence: Dict[str, Any]) -> None:
        """A start stored for another platform is not reused."""
        platforms.session_start(run_path, GENERIC, now=1000.0)
        assert platforms.session_start(run_path, SLURM, now=3000.0).start == 3000.0

    def test_stored_start_in_the_future_is_ignored(self, run_path: Path,
                                                   fence: Dict[str, Any]) -> None:
        """A stored start later than now (clock stepped back) is replaced."""
        platforms.session_start(run_path, GENERIC, now=5000.0)
        assert platforms.session_start(run_path, GENERIC, now=4000.0) == SessionStart(
            4000.0, "first start of the watchdog", False)

    def test_corrupted_file_is_quarantined(self, run_path: Path, fence: Dict[str, Any]) -> None:
        """A corrupted session.json is moved to .bad and a fresh start is recorded; no crash."""
        (run_path / channel.SESSION_FILE).write_text("{corrupt")
        got = platforms.session_start(run_path, GENERIC, now=1000.0)
        assert got == SessionStart(1000.0, "first start of the watchdog", False)
        assert (run_path / "session.json.bad").read_text() == "{corrupt"
        assert platforms.session_start(run_path, GENERIC, now=2000.0).persisted is True

    def test_colab_start_is_later_of_boot_and_pid1(self) -> None:
        """On Colab the observed start is max(boot time, PID 1 create time) of this machine."""
        boot = float(psutil.boot_time())
        pid1 = float(psutil.Process(1).create_time())
        start, source = platforms.observed_session_start(COLAB, now=9e9)
        assert start == max(boot, pid1)
        assert source == ("create time of PID 1" if pid1 > boot else "boot time")

    def test_autodl_start_is_pid1(self) -> None:
        """On AutoDL the observed start is PID 1's create time (boot time is the host's)."""
        start, source = platforms.observed_session_start(AUTODL, now=9e9)
        assert start == float(psutil.Process(1).create_time())
        assert source == "create time of PID 1 (boot time is the shared host's)"

    def test_boot_id_from_root(self, tmp_path: Path) -> None:
        """boot_id reads the kernel's boot id under root; 'unknown' when it cannot."""
        path = tmp_path / "proc/sys/kernel/random/boot_id"
        path.parent.mkdir(parents=True)
        path.write_text("0f1e2d3c-aaaa-bbbb-cccc-000000000001\n")
        assert platforms.boot_id(tmp_path) == "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
        assert platforms.boot_id(tmp_path / "nowhere") == "unknown"


# --------------------------------------------------------------------------------------------
# SLURM


class TestParseSlurmDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("1-02:03:04", 93784.0),
            ("02:03:04", 7384.0),
            ("03:04", 184.0),
            ("30", 1800.0),
            (" 0:30:00\n", 1800.0),
            ("10-00:00:00", 864000.0),
            ("UNLIMITED", None),
            ("INFINITE", None),
            ("NOT_SET", None),
            ("", None),
        ],
    )
    def test_table(self, text: str, seconds: Optional[float]) -> None:
        """squeue's time formats parse to seconds; a bare number is minutes; no limit is None."""
        assert platforms.parse_slurm_duration(text) == seconds


class FakeRun:
    """Stands in for subprocess.run: records argv and returns a scripted CompletedProcess."""

    def __init__(self, stdout: str = "", returncode: int = 0,
                 error: Optional[BaseException] = None) -> None:
        self.stdout = stdout
        self.returncode = returncode
        self.error = error
        self.calls: List[Dict[str, Any]] = []

    def __call__(self, argv: List[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append({"argv": argv, **kwargs})
        if self.error is not None:
            raise self.error
        return subprocess.CompletedProcess(argv, self.returncode, self.stdout, "")


class TestSlurmJobTimes:
    def test_start_and_limit_from_squeue(self) -> None:
        """squeue's start (local time) and limit are parsed; squeue is asked with a timeout."""
        run = FakeRun(stdout="2025-03-01T10:00:00|1-00:00:00\n")
        assert platforms.slurm_job_times("4242", run=run) == {
            "start": datetime(2025, 3, 1, 10, 0, 0).timestamp(), "limit_s": 86400.0}
        assert run.calls == [{"argv": ["squeue", "-h", "-j", "4242", "-o", "%S|%l"],
                              "capture_output": True, "text": True, "timeout": 10,
                              "check": False}]

    def test_pending_job_has_limit_only(self) -> None:
        """A start of N/A (job pending) gives the limit alone."""
        assert platforms.slurm_job_times("1", run=FakeRun(stdout="N/A|30:00\n")) == {
            "limit_s": 1800.0}

    def test_unlimited_job_has_start_only(self) -> None:
        """An UNLIMITED limit gives the start alone."""
        got = platforms.slurm_job_times("1", run=FakeRun(stdout="2025-03-01T10:00:00|UNLIMITED\n"))
        assert list(got) == ["start"]

    @pytest.mark.parametrize(
        "run",
        [
            FakeRun(stdout="", returncode=1),
            FakeRun(stdout="slurm_load_jobs error: Invalid job id specified\n", returncode=0),
            FakeRun(error=FileNotFoundError(2, "No such file or directory: 'squeue'")),
            FakeRun(error=subprocess.TimeoutExpired(["squeue"], 10)),
        ],
    )
    def test_failures_give_empty(self, run: FakeRun) -> None:
        """A failing, missing or hung squeue gives {} instead of an exception."""
        assert platforms.slurm_job_times("1", run=run) == {}


class TestSlurmSessionFence:
    def test_another_job_on_the_same_node_starts_a_new_session(self, tmp_path):
        """A stored session start of SLURM job 1001 is not reused by job 1002 (shared home)."""
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        job1 = platforms.Platform("slurm", ("t",), slurm_job_id="1001")
        job2 = platforms.Platform("slurm", ("t",), slurm_job_id="1002")
        first = platforms.session_start(run, job1, now=1000.0)
        second = platforms.session_start(run, job2, now=1000.0 + 6 * 3600)
        assert (first.start, second.start, second.persisted) == (1000.0, 1000.0 + 6 * 3600, False)
