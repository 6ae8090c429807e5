"""Which runtime we are on, when its session started, and what it allows.

``detect()`` reads environment variables and a few marker files only (no network, no process
scan), so it is cheap and testable with a fake environment and a fake filesystem root.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from session_watchdog import channel
from session_watchdog.config import OFF, Config

HOUR = 3600.0
BUDGETS = {"colab-free": 12 * HOUR, "colab-pro": 24 * HOUR, "colab-pro-plus": 24 * HOUR}
COLAB_DRIVE = Path("/content/drive")
AUTODL_DATA = Path("/root/autodl-tmp")


@dataclass(frozen=True)
class Platform:
    """The detected runtime. Budgets are upper bounds, never promises."""

    name: str  # colab | autodl | slurm | generic
    evidence: Tuple[str, ...]
    enterprise: bool = False  # Colab Enterprise (Vertex): never unassign
    end_action: Optional[str] = None  # colab-unassign | autodl-shutdown | command | None
    persistent_dirs: Tuple[Path, ...] = ()
    slurm_job_id: Optional[str] = None


def _exists(root: Path, path: str) -> bool:
    return (root / path.lstrip("/")).exists()


def detect(
    env: Optional[Mapping[str, str]] = None,
    root: Path = Path("/"),
    hostname: Optional[str] = None,
) -> Platform:
    """Detect the platform from environment variables and marker files; say what was used."""
    env = os.environ if env is None else env
    hostname = socket.gethostname() if hostname is None else hostname

    colab = [f"env {k}" for k in ("COLAB_RELEASE_TAG", "COLAB_GPU", "TBE_RUNTIME_ADDR") if k in env]
    if _exists(root, "/var/colab/hostname"):
        colab.append("file /var/colab/hostname")
    if colab:
        enterprise = env.get("VERTEX_PRODUCT") == "COLAB_ENTERPRISE"
        if enterprise:
            colab.append("env VERTEX_PRODUCT=COLAB_ENTERPRISE")
        drive = root / str(COLAB_DRIVE).lstrip("/")
        return Platform(
            "colab",
            tuple(colab),
            enterprise=enterprise,
            end_action=None if enterprise or not env.get("TBE_RUNTIME_ADDR") else "colab-unassign",
            persistent_dirs=(COLAB_DRIVE,) if drive.exists() else (),
        )

    autodl = [f"env {k}" for k in ("AutoDLContainerUUID", "AutoDLRegion") if k in env]
    if hostname.startswith("autodl-container-"):
        autodl.append(f"hostname {hostname}")
    if _exists(root, str(AUTODL_DATA)):
        autodl.append(f"dir {AUTODL_DATA}")
    # The data dir alone is weak evidence (anyone can mkdir it); require a second sign with it.
    if autodl and autodl != [f"dir {AUTODL_DATA}"]:
        persistent = (AUTODL_DATA,) if _exists(root, str(AUTODL_DATA)) else ()
        return Platform("autodl", tuple(autodl), end_action="autodl-shutdown",
                        persistent_dirs=persistent)

    if env.get("SLURM_JOB_ID"):
        return Platform("slurm", (f"env SLURM_JOB_ID={env['SLURM_JOB_ID']}",),
                        slurm_job_id=env["SLURM_JOB_ID"])
    return Platform("generic", ("no platform marker found",), end_action="command")


def forced(name: str, detected: Platform) -> Platform:
    """The platform the user named with --platform, keeping detected details where they match."""
    if name in ("auto", detected.name):
        return detected
    end_action = {"colab": "colab-unassign", "autodl": "autodl-shutdown", "generic": "command"}
    return Platform(name, (f"--platform {name}",), end_action=end_action.get(name))


# --------------------------------------------------------------------------------------------
# Platform defaults -> one concrete Config


def resolve(config: Config, platform: Platform, slurm_limit_s: Optional[float] = None) -> Config:
    """Fill every "platform default" (None) of ``config``; an explicit value always wins."""
    on_paid_clock = platform.name in ("colab", "autodl")
    budget = config.max_session
    if budget is None:
        if platform.name == "colab":
            budget = BUDGETS[config.tier]
        elif platform.name == "autodl" and config.money_budget and config.price_per_hour:
            budget = config.money_budget / config.price_per_hour * HOUR
        elif platform.name == "slurm" and slurm_limit_s:
            budget = slurm_limit_s
        else:
            budget = OFF
    idle_limit = config.idle_limit
    if idle_limit is None:
        idle_limit = 90 * 60.0 if platform.name == "colab" else OFF
    idle_warn = config.idle_warn
    if idle_warn is None:
        idle_warn = 30 * 60.0 if platform.name == "colab" and config.tier == "colab-free" else OFF
    if budget and idle_limit and idle_limit >= budget:
        idle_limit = OFF if config.idle_limit is None else idle_limit
    if idle_warn and (not idle_limit or idle_warn >= idle_limit):
        idle_warn = OFF if config.idle_warn is None else idle_warn
    watch = config.watch_paths or default_watch_paths(platform, config)
    from session_watchdog.log import default_log_file

    values: Dict[str, Any] = dict(
        platform=platform.name,
        log_file=config.log_file or default_log_file(config.run_name, platform.persistent_dirs),
        max_session=budget,
        idle_limit=idle_limit,
        idle_warn=idle_warn,
        end_when_done=on_paid_clock if config.end_when_done is None else config.end_when_done,
        grace=(120.0 if on_paid_clock else 60.0) if config.grace is None else config.grace,
        idle_end_after=(30 * 60.0 if on_paid_clock else OFF)
        if config.idle_end_after is None else config.idle_end_after,
        watch_paths=watch,
        slurm_signal_grace=(300.0 if platform.name == "slurm" else OFF)
        if config.slurm_signal_grace is None else config.slurm_signal_grace,
    )
    return dataclasses.replace(config, **values)


def default_watch_paths(platform: Platform, config: Config) -> Tuple[Path, ...]:
    candidates = [Path("/content"), AUTODL_DATA, *platform.persistent_dirs, Path.home()]
    if config.run_dir:
        candidates.append(config.run_dir)
    seen = []
    for path in candidates:
        if path.exists() and path not in seen:
            seen.append(path)
    return tuple(seen)


# --------------------------------------------------------------------------------------------
# The session clock


def boot_id(root: Path = Path("/")) -> str:
    try:
        return (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class SessionStart:
    start: float  # wall-clock epoch seconds
    source: str
    persisted: bool  # True when read back from an earlier run of the daemon


FIRST_START = "first start of the watchdog"  # no platform clock: the session is ours since boot


def _pid1_create_time() -> Optional[float]:
    import psutil

    try:
        return float(psutil.Process(1).create_time())
    except (psutil.Error, OSError):
        return None


def observed_session_start(platform: Platform, now: float) -> Tuple[float, str]:
    """What the machine says about when this session began (before persistence)."""
    import psutil

    pid1 = _pid1_create_time()
    if platform.name == "colab":
        boot = float(psutil.boot_time())
        if pid1 is not None and pid1 > boot:
            return pid1, "create time of PID 1"
        return boot, "boot time"
    if platform.name == "autodl" and pid1 is not None:
        return pid1, "create time of PID 1 (boot time is the shared host's)"
    return now, FIRST_START


def _same_session(stored: Mapping[str, object], fence: Mapping[str, object]) -> bool:
    """Same boot, same platform, and PID 1 started at the same time (within 2 s: the kernel
    derives create times from the wall clock, which NTP may step)."""
    if any(stored.get(k) != fence.get(k) for k in ("boot_id", "platform", "slurm_job")):
        return False
    old, new = stored.get("pid1"), fence["pid1"]
    if old is None or new is None:
        return old is new
    return isinstance(old, (int, float)) and isinstance(new, float) and abs(old - new) <= 2.0


def session_start(run_dir: Path, platform: Platform, now: Optional[float] = None,
                  restart: bool = False) -> SessionStart:
    """The session start, persisted on first sight so restarts keep it.

    The stored value is fenced by boot id and by PID 1's create time: a new boot or a restarted
    container is a new session. ``restart`` (``run --new-session``) ignores a stored value.
    """
    now = time.time() if now is None else now
    path = Path(run_dir) / channel.SESSION_FILE
    fence = {"boot_id": boot_id(), "pid1": _pid1_create_time(), "platform": platform.name,
             "slurm_job": platform.slurm_job_id}
    try:
        stored = channel.read_json(path)
    except channel.ChannelError:
        channel.quarantine(path)
        stored = None
    if stored and not restart and _same_session(stored, fence):
        start = stored.get("start")
        if isinstance(start, (int, float)) and start <= now:
            return SessionStart(float(start), str(stored.get("source", "stored")), True)
    start, source = observed_session_start(platform, now)
    channel.write_json(path, {"v": channel.SCHEMA_VERSION, "start": start, "source": source,
                              **fence})
    return SessionStart(start, source, False)


# --------------------------------------------------------------------------------------------
# SLURM


_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


def parse_slurm_duration(text: str) -> Optional[float]:
    """``1-02:03:04`` / ``02:03:04`` / ``03:04`` -> seconds; ``UNLIMITED``/garbage -> None."""
    text = text.strip()
    match = _SLURM_TIME.match(text)
    if not match:
        if text.isdigit():
            return float(text) * 60.0  # a bare number is minutes in SLURM
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_job_times(
    job_id: str, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
) -> Dict[str, float]:
    """``{"start": epoch, "limit_s": seconds}`` from squeue, or {} when squeue is unavailable."""
    if shutil.which("squeue") is None and run is subprocess.run:
        return {}
    try:
        out = run(["squeue", "-h", "-j", job_id, "-o", "%S|%l"], capture_output=True, text=True,
                  timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or "|" not in out.stdout:
        return {}
    start_text, limit_text = out.stdout.strip().splitlines()[0].split("|", 1)
    result: Dict[str, float] = {}
    limit = parse_slurm_duration(limit_text)
    if limit is not None:
        result["limit_s"] = limit
    try:
        result["start"] = datetime.fromisoformat(start_text.strip()).timestamp()
    except ValueError:
        pass
    return result
