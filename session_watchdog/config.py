"""Configuration: one frozen, validated object built from TOML, environment and flags.

Precedence, lowest first: built-in defaults < TOML file (``--config``) < ``SESSION_WATCHDOG_*``
environment variables < command-line flags / keyword arguments. Every key has all three spellings,
generated from the one table :data:`KEYS`, so they cannot drift apart.

A value of ``None`` means "the platform's default" (see :mod:`session_watchdog.platforms`);
durations that a user switches off with ``off`` are stored as :data:`OFF` (0.0). A literal zero or
negative duration is a user error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

ENV_PREFIX = "SESSION_WATCHDOG_"
OFF = 0.0  # a duration switched off by the user ("off")

PLATFORMS = ("auto", "colab", "autodl", "slurm", "generic")
TIERS = ("colab-free", "colab-pro", "colab-pro-plus")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming key, value and what is expected."""


# --------------------------------------------------------------------------------------------
# Value parsers: each takes a raw value (str from env/flags, native from TOML) and returns the
# typed value, or raises ValueError with what was expected.

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


MAX_DURATION_S = 366 * 86400.0  # a bound keeps schedulers and timedelta arithmetic sane


def parse_duration(raw: Any) -> float:
    """``"90s"`` / ``"15m"`` / ``"11h30m"`` / ``"1d"`` (or a Python number of seconds) -> seconds.

    A string needs a unit: ``--max-session 12`` once gave a 12-second session to someone who
    meant 12 hours (issue 11). Numbers are seconds only from Python (keyword arguments); a TOML
    number is refused by :func:`parse_values` for the same reason.
    """
    if isinstance(raw, bool):
        raise ValueError("expected a duration like 90s, 15m or 11h30m")
    if isinstance(raw, (int, float)):
        try:
            seconds = float(raw)
        except OverflowError:
            raise ValueError("expected a duration of at most 366 days") from None
    elif isinstance(raw, str):
        text = raw.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            raise ValueError(_no_unit(text))
        else:
            parts = _DURATION_RE.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError("expected a duration like 90s, 15m or 11h30m")
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError("expected a duration like 90s, 15m or 11h30m")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("expected a positive duration like 90s, 15m or 11h30m ('off' to disable)")
    if seconds > MAX_DURATION_S:
        raise ValueError("expected a duration of at most 366 days")
    return seconds


def _no_unit(number: str) -> str:
    if float(number) == 0:
        return "expected a positive duration like 90s, 15m or 11h30m"
    return f"{number!r} has no unit; write {number}s, {number}m or {number}h"


def format_duration(seconds: Optional[float]) -> str:
    """The inverse of parse_duration for people: ``5400`` -> ``1h30m``, ``75`` -> ``1m15s``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def parse_duration_or_off(raw: Any) -> float:
    if isinstance(raw, str) and raw.strip().lower() in ("off", "none", "never"):
        return OFF
    if raw is False:
        return OFF
    if isinstance(raw, str) and re.fullmatch(r"0+(\.0*)?", raw.strip()):
        raise ValueError(f"{raw.strip()!r} has no unit; write 'off' to switch it off")
    return parse_duration(raw)


def parse_size(raw: Any) -> int:
    """``1073741824`` / ``"1GiB"`` / ``"500MB"`` -> bytes (> 0)."""
    if isinstance(raw, bool):
        raise ValueError("expected a size like 500MB or 2GiB")
    if isinstance(raw, (int, float)):
        try:
            value = float(raw)
        except OverflowError:
            raise ValueError("expected a size like 500MB or 2GiB") from None
    elif isinstance(raw, str):
        match = _SIZE_RE.match(raw.strip())
        if not match:
            raise ValueError("expected a size like 500MB or 2GiB")
        value = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
    else:
        raise ValueError("expected a size like 500MB or 2GiB")
    if value <= 0 or not math.isfinite(value):
        raise ValueError("expected a positive size like 500MB or 2GiB")
    return int(value)


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError("expected true or false")


def parse_positive_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a positive number")
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("expected a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive number")
    return value


def parse_percent(raw: Any) -> float:
    value = parse_positive_float(raw)
    if value >= 100:
        raise ValueError("expected a percentage between 0 and 100")
    return value


MAX_LOG_BACKUPS = 1000  # rotation renames every backup in turn


def parse_log_backups(raw: Any) -> int:
    expected = f"expected a whole number from 1 to at most {MAX_LOG_BACKUPS}"
    try:
        value = parse_int_min1(raw)
    except ValueError:
        raise ValueError(expected) from None
    if value > MAX_LOG_BACKUPS:
        raise ValueError(expected)
    return value


def parse_int_min1(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number >= 1")
    try:
        value = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("expected a whole number >= 1") from None
    if value < 1 or (isinstance(raw, float) and raw != value):
        raise ValueError("expected a whole number >= 1")
    return value


def parse_int_min0(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number >= 0")
    try:
        value = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("expected a whole number >= 0") from None
    if value < 0 or (isinstance(raw, float) and raw != value):
        raise ValueError("expected a whole number >= 0")
    return value


PATH_MAX_BYTES = 4095  # Linux PATH_MAX (4096) less the terminating NUL
NAME_MAX_BYTES = 255  # one path component


def parse_abs_path(raw: Any) -> Path:
    if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
        raise ValueError("expected an absolute path")
    text = str(raw).strip()
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        # NUL cannot reach the kernel at all; a newline or an escape sequence in a path we
        # print and log is a mistake or a trick (issue 18)
        raise ValueError("expected a path without control characters (NUL, newline, escape)")
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        raise ValueError("expected an absolute path (starting with / or ~)")
    encoded = os.fsencode(path)
    if len(encoded) > PATH_MAX_BYTES:
        raise ValueError(f"expected a path of at most {PATH_MAX_BYTES} bytes")
    if any(len(part) > NAME_MAX_BYTES for part in encoded.split(b"/")):
        raise ValueError(f"expected path components of at most {NAME_MAX_BYTES} bytes each")
    return path


def parse_existing_paths(raw: Any) -> Tuple[Path, ...]:
    items = _split_list(raw)
    paths = tuple(parse_abs_path(item) for item in items)
    for path in paths:
        if not path.exists():
            raise ValueError(f"expected existing absolute paths; {path} does not exist")
    return paths


def parse_durations(raw: Any) -> Tuple[float, ...]:
    return tuple(sorted((parse_duration(item) for item in _split_list(raw)), reverse=True))


# Keys parsed by these hold durations: a TOML number for one is refused (it has no unit).
DURATION_PARSERS: Tuple[Callable[[Any], Any], ...] = (
    parse_duration, parse_duration_or_off, parse_durations)


def parse_argv(raw: Any) -> Tuple[str, ...]:
    """An argv list (TOML array, or a JSON-ish/whitespace-separated string). Never a shell line."""
    if isinstance(raw, (list, tuple)):
        if not raw or not all(isinstance(item, str) and item for item in raw):
            raise ValueError("expected a non-empty list of non-empty strings (argv)")
        return tuple(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            import json

            try:
                items = json.loads(text)
            except ValueError:
                raise ValueError('expected an argv list like ["sudo", "shutdown", "-h", "now"]') from None
            return parse_argv(items)
        # Split on whitespace only: quotes, ';', '|' and '$' stay literal argument characters.
        parts = tuple(text.split())
        if parts:
            return parts
    raise ValueError('expected an argv list like ["sudo", "shutdown", "-h", "now"]')


def _split_list(raw: Any) -> List[Any]:
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, str):
        return [item for item in (part.strip() for part in raw.split(",")) if item]
    return [raw]


def _choice(options: Tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if not isinstance(raw, str) or raw.strip().lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return raw.strip().lower()

    return parse


PREEMPTION_SOURCES = ("auto", "aws", "gcp", "slurm", "off")


def parse_preemption(raw: Any) -> Tuple[str, ...]:
    items = tuple(str(x).strip().lower() for x in _split_list(raw))
    if not items or any(x not in PREEMPTION_SOURCES for x in items):
        raise ValueError(f"expected a list of {', '.join(PREEMPTION_SOURCES)}")
    return () if "off" in items else items


def _non_empty_name(raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", raw):
        raise ValueError("expected a short name of letters, digits, '.', '_' or '-'")
    return raw


# Notifications (issue 15). Kinds of messages a user can choose with notify_on.
NOTIFY_KINDS: Tuple[str, ...] = (
    "session_warning", "checkpoint", "completed", "failed", "hang", "oom", "disk", "ram",
    "preemption", "end_grace", "end_done")
_URL_START = re.compile(r"[\s,]+(?=[A-Za-z][A-Za-z0-9+.-]*://)")
REMOTE_SCHEMES = ("ntfy", "ntfys", "tgram")


def parse_notify_urls(raw: Any) -> Tuple[str, ...]:
    """Apprise URLs: a TOML list, or one string with URLs separated by spaces or commas.

    A comma splits only before another ``scheme://``: some Apprise URLs carry commas inside.
    """
    items = raw if isinstance(raw, (list, tuple)) else _URL_START.split(str(raw).strip())
    urls = tuple(str(item).strip() for item in items if str(item).strip())
    if not urls or not all(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$", u) for u in urls):
        raise ValueError("expected Apprise URLs like tgram://BOT_TOKEN/CHAT_ID or ntfys://ntfy.sh/TOPIC")
    return urls


def parse_notify_on(raw: Any) -> Tuple[str, ...]:
    items = {str(x).strip().lower() for x in _split_list(raw)}
    if "all" in items:
        return NOTIFY_KINDS
    if not items or not items <= set(NOTIFY_KINDS):
        raise ValueError(f"expected 'all' or a list of {', '.join(NOTIFY_KINDS)}")
    return tuple(k for k in NOTIFY_KINDS if k in items)


def parse_remote(raw: Any) -> str:
    text = str(raw).strip() if isinstance(raw, str) else ""
    match = re.match(r"^([a-z]+)://([^/\s]+)/([^/\s?]+)/?$", text)
    if not match or match.group(1) not in REMOTE_SCHEMES:
        raise ValueError("expected ntfys://HOST/TOPIC, ntfy://HOST/TOPIC (plain http) or "
                         "tgram://BOT_TOKEN/CHAT_ID")
    if match.group(1) == "tgram" and not re.fullmatch(r"-?\d+", match.group(3)):
        raise ValueError("expected a numeric Telegram chat id: tgram://BOT_TOKEN/CHAT_ID")
    return text


def parse_remote_token(raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"\S{8,128}", raw.strip()):
        raise ValueError("expected a token of 8 to 128 characters without spaces")
    return raw.strip()


def parse_http_url(raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", raw.strip()):
        raise ValueError("expected an http(s) URL like https://api.telegram.org")
    return raw.strip().rstrip("/")


# --------------------------------------------------------------------------------------------
# The key table


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"
    is_flag: bool = False  # boolean: --name / --no-name
    secret: bool = False  # its value never appears in an error message (tokens in URLs)


KEYS: Tuple[Key, ...] = (
    Key("platform", _choice(PLATFORMS), "platform to assume (default: detect)", "NAME"),
    Key("tier", _choice(TIERS), "Colab plan; it cannot be detected (default colab-free)", "TIER"),
    Key("max_session", parse_duration_or_off,
        "session budget, e.g. 11h30m (default: the platform's; 'off' for none)", "DURATION"),
    Key("interval", parse_duration, "seconds between ticks (default 5s)", "DURATION"),
    Key("run_dir", parse_abs_path, "run directory shared with the trainer", "PATH"),
    Key("run_name", _non_empty_name, "name of the run (default 'default')", "NAME"),
    Key("log_file", parse_abs_path, "JSONL log file (default: persistent storage)", "PATH"),
    Key("log_max_bytes", parse_size, "rotate the log past this size (default 20MiB)", "SIZE"),
    Key("log_backups", parse_log_backups, "rotated logs (gzipped) are kept within log_max_bytes x "
        "N of disk (default 5, at most 1000)", "N"),
    Key("dry_run", parse_bool, "say what would be done, end nothing", is_flag=True),
    Key("checkpoint_every", parse_duration_or_off,
        "periodic checkpoint request interval (default 30m; 'off')", "DURATION"),
    Key("margin", parse_duration, "safety margin in the lead time (default 5m)", "DURATION"),
    Key("stop_margin", parse_duration,
        "margin of the final stop request before the deadline (default 1m)", "DURATION"),
    Key("save_factor", parse_positive_float,
        "lead time counts this many checkpoint durations (default 2)", "K"),
    Key("default_checkpoint_time", parse_duration,
        "checkpoint duration assumed until one is measured (default 60s)", "DURATION"),
    Key("default_step_time", parse_duration,
        "step time assumed until one is measured (default 10s)", "DURATION"),
    Key("warn_before", parse_durations, "warnings before the deadline (default 60m,15m)", "LIST"),
    Key("resend_after", parse_duration,
        "re-send an unacknowledged request after this long (default 2m)", "DURATION"),
    Key("ram_min_available_pct", parse_percent,
        "checkpoint now when available RAM falls below this % of the limit (default 5)", "PCT"),
    Key("disk_margin", parse_size, "free-space margin on watched disks (default 1GiB)", "SIZE"),
    Key("watch_paths", parse_existing_paths,
        "comma-separated paths whose disks are watched (default: platform's)", "PATHS"),
    Key("gpu_idle_pct", parse_percent, "GPU utilisation below this is idle (default 5)", "PCT"),
    Key("gpu_idle_after", parse_duration,
        "warn when every GPU was idle this long (default 10m)", "DURATION"),
    Key("trainer_stall_after", parse_duration,
        "warn when the trainer's heartbeat is this old (default 10m)", "DURATION"),
    Key("idle_limit", parse_duration_or_off,
        "Colab idle reclaim after this long with no cell running (default 90m on Colab)",
        "DURATION"),
    Key("idle_warn", parse_duration_or_off,
        "warn after this long with no cell running (default 30m on colab-free)", "DURATION"),
    Key("end_when_done", parse_bool,
        "end the runtime when training completed (default on Colab/AutoDL)", is_flag=True),
    Key("end_on_failure", parse_bool, "end the runtime after a failed run too", is_flag=True),
    Key("grace", parse_duration,
        "cancellable wait before ending (default 2m on Colab/AutoDL, 1m elsewhere)", "DURATION"),
    Key("idle_end_after", parse_duration_or_off,
        "end a runtime whose GPUs idled this long with no trainer, command or cell running "
        "(default 30m on Colab/AutoDL)",
        "DURATION"),
    Key("end_command", parse_argv,
        'argv that ends a generic host, e.g. ["sudo","shutdown","-h","now"]', "ARGV"),
    Key("kill_after", parse_duration,
        "SIGKILL a wrapped command this long after forwarding SIGINT/SIGTERM (default 30s)", "DURATION"),
    Key("preemption", parse_preemption,
        "preemption notice sources: auto, aws, gcp, slurm or off (default auto)", "LIST"),
    Key("preemption_poll_every", parse_duration,
        "how often preemption sources are polled (default 10s)", "DURATION"),
    Key("slurm_signal_grace", parse_duration_or_off,
        "SIGUSR1 (sbatch --signal=B:USR1@N) means the job ends in this long (default 300s under "
        "SLURM, off elsewhere)", "DURATION"),
    Key("hang_factor", parse_positive_float,
        "a trainer is hung when its step stands still this many learned step intervals (default 3)",
        "K"),
    Key("hang_floor", parse_duration,
        "never call a trainer hung sooner than this (default 10m; raise it for long evaluations)",
        "DURATION"),
    Key("hang_ceiling", parse_duration_or_off,
        "call a trainer hung at the latest after this (default 2h; 'off')", "DURATION"),
    Key("restarts", parse_int_min0,
        "run: restart a crashed, hung or OOM-killed command up to N times (default 0)", "N"),
    Key("restart_no_progress", parse_int_min1,
        "run: give up after this many restarts without a newer checkpoint (default 3)", "K"),
    Key("restart_storm", parse_int_min1,
        "run: give up when this many restarts come within restart_storm_window (default 5)", "M"),
    Key("restart_storm_window", parse_duration,
        "run: the window of restart_storm (default 30m)", "DURATION"),
    Key("restart_backoff", parse_duration,
        "run: wait before the first restart; doubles each time (default 10s)", "DURATION"),
    Key("restart_backoff_max", parse_duration,
        "run: the longest wait between restarts (default 5m)", "DURATION"),
    Key("restart_gpu_wait", parse_duration,
        "run: wait at most this long for a dead command's GPU memory before a restart "
        "(default 2m)", "DURATION"),
    Key("price_per_hour", parse_positive_float, "runtime price per hour, for costs", "PRICE"),
    Key("money_budget", parse_positive_float,
        "money budget; with price_per_hour it sets the session budget (AutoDL)", "AMOUNT"),
    # notifications and remote commands (session_watchdog.notify; issue 15)
    Key("notify", parse_notify_urls, "Apprise URLs to notify, e.g. tgram://TOKEN/CHAT_ID or "
        "ntfys://ntfy.sh/TOPIC (pip install 'session-watchdog[notify]')", "URLS", secret=True),
    Key("notify_on", parse_notify_on, "message kinds to send (default all): "
        + ", ".join(NOTIFY_KINDS), "KINDS"),
    Key("remote", parse_remote, "take commands from an ntfy topic (ntfys://ntfy.sh/TOPIC) or a "
        "Telegram chat (tgram://BOT_TOKEN/CHAT_ID); needs remote_token", "URL", secret=True),
    Key("remote_token", parse_remote_token,
        "shared token every remote command must carry (8+ characters)", "TOKEN", secret=True),
    Key("remote_poll_every", parse_duration, "how often remote commands are polled (default 20s)",
        "DURATION"),
    Key("remote_api", parse_http_url,
        "Telegram Bot API base URL (default https://api.telegram.org)", "URL"),
)
KEYS_BY_NAME: Dict[str, Key] = {key.name: key for key in KEYS}


@dataclass(frozen=True)
class Config:
    """Everything the watchdog is told. Build with :func:`load_config` or ``Config.build(...)``."""

    platform: str = "auto"
    tier: str = "colab-free"
    max_session: Optional[float] = None
    interval: float = 5.0
    run_dir: Optional[Path] = None
    run_name: str = "default"
    log_file: Optional[Path] = None
    log_max_bytes: int = 20 * 2**20
    log_backups: int = 5
    dry_run: bool = False
    checkpoint_every: float = 30 * 60.0
    margin: float = 5 * 60.0
    stop_margin: float = 60.0
    save_factor: float = 2.0
    default_checkpoint_time: float = 60.0
    default_step_time: float = 10.0
    warn_before: Tuple[float, ...] = (3600.0, 900.0)
    resend_after: float = 120.0
    ram_min_available_pct: float = 5.0
    disk_margin: int = 2**30
    watch_paths: Tuple[Path, ...] = ()
    gpu_idle_pct: float = 5.0
    gpu_idle_after: float = 600.0
    trainer_stall_after: float = 600.0
    idle_limit: Optional[float] = None
    idle_warn: Optional[float] = None
    end_when_done: Optional[bool] = None
    end_on_failure: bool = False
    grace: Optional[float] = None
    idle_end_after: Optional[float] = None
    end_command: Tuple[str, ...] = ()
    kill_after: float = 30.0
    preemption: Tuple[str, ...] = ("auto",)
    preemption_poll_every: float = 10.0
    slurm_signal_grace: Optional[float] = None
    hang_factor: float = 3.0
    hang_floor: float = 600.0
    hang_ceiling: float = 2 * 3600.0
    restarts: int = 0
    restart_no_progress: int = 3
    restart_storm: int = 5
    restart_storm_window: float = 30 * 60.0
    restart_backoff: float = 10.0
    restart_backoff_max: float = 300.0
    restart_gpu_wait: float = 120.0
    price_per_hour: Optional[float] = None
    money_budget: Optional[float] = None
    notify: Tuple[str, ...] = dataclasses.field(default=(), repr=False)
    notify_on: Tuple[str, ...] = NOTIFY_KINDS
    remote: Optional[str] = dataclasses.field(default=None, repr=False)
    remote_token: Optional[str] = dataclasses.field(default=None, repr=False)
    remote_poll_every: float = 20.0
    remote_api: str = "https://api.telegram.org"

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def build(cls, **values: Any) -> Config:
        """Parse raw values (strings or native) key by key, then validate the whole."""
        return cls(**parse_values(values, source=""))

    def replace(self, **values: Any) -> Config:
        return dataclasses.replace(self, **parse_values(values, source=""))

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[f.name] = value
        return out


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


SPELLINGS: Dict[str, Callable[[str], str]] = {
    "flag": lambda name: "--" + name.replace("_", "-"),
    "env": lambda name: ENV_PREFIX + name.upper(),
    "file": lambda name: name,
    "argument": lambda name: name,
}


def parse_values(values: Mapping[str, Any], *, source: str, spelling: str = "argument") -> Dict[str, Any]:
    """Parse raw values by key name; unknown keys and bad values raise ConfigError.

    ``spelling`` names each key the way the user wrote it: ``--max-session`` (flag),
    ``SESSION_WATCHDOG_MAX_SESSION`` (env), ``max_session`` (file, keyword argument).
    """
    spell = SPELLINGS[spelling]
    prefix = f"{source}: " if source else ""
    parsed: Dict[str, Any] = {}
    for raw_name, raw in values.items():
        name = raw_name.replace("-", "_")
        key = KEYS_BY_NAME.get(name)
        if key is None:
            close = [spell(k.name) for k in KEYS if k.name.startswith(name[:4])][:3]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{prefix}unknown config key {spell(name)!r}{hint}")
        try:
            if spelling == "file" and key.parse in DURATION_PARSERS:
                _refuse_toml_numbers(raw)
            parsed[name] = key.parse(raw)
        except ValueError as err:
            shown = "[redacted]" if key.secret else _describe(raw)
            raise ConfigError(f"{prefix}{spell(name)} = {shown} is invalid: {err}") from None
    return parsed


def _refuse_toml_numbers(raw: Any) -> None:
    """A TOML number for a duration (``max_session = 12``) has no unit: refuse it, name the fix."""
    for item in raw if isinstance(raw, list) else [raw]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            try:
                text = f"{item:g}" if isinstance(item, float) else str(item)
            except OverflowError:
                text = "number"
            if item == 0:
                raise ValueError('0 has no unit; write "off" to switch it off')
            if len(text) > 20:
                raise ValueError("a number has no unit; write a quoted duration like \"90s\"")
            raise ValueError(f'{text} has no unit; write "{text}s", "{text}m" or "{text}h"')


def validate(config: Config) -> None:
    """Checks that span several keys (the single values were parsed already)."""
    if config.max_session and config.idle_limit and config.idle_limit >= config.max_session:
        raise ConfigError(
            f"idle_limit = {config.idle_limit:g}s is invalid: expected less than "
            f"max_session = {config.max_session:g}s"
        )
    if config.idle_warn and config.idle_limit and config.idle_warn >= config.idle_limit:
        raise ConfigError(
            f"idle_warn = {config.idle_warn:g}s is invalid: expected less than "
            f"idle_limit = {config.idle_limit:g}s"
        )
    if config.remote and not config.remote_token:
        raise ConfigError("remote is set but remote_token is not: every remote command must carry "
                          "a shared token (set remote_token, 8+ characters)")
    if config.hang_ceiling and config.hang_ceiling < config.hang_floor:
        raise ConfigError(
            f"hang_ceiling = {config.hang_ceiling:g}s is invalid: expected at least "
            f"hang_floor = {config.hang_floor:g}s"
        )
    if config.stop_margin >= config.margin:
        raise ConfigError(
            f"stop_margin = {config.stop_margin:g}s is invalid: expected less than "
            f"margin = {config.margin:g}s"
        )


MAX_TOML_NESTING = 64  # our keys are flat; a list of lists is already more than any key takes


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether arrays/inline tables nest deeper than ``limit`` (strings and comments skipped)."""
    depth = 0
    quote = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1  # an escaped character in a basic string
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return False


def read_toml(path: Path) -> Dict[str, Any]:
    """Read a flat TOML table of config keys (``key = value``; ``[session-watchdog]`` also works)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.9/3.10
        import tomli as tomllib
    try:
        raw = _read_small_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a .toml file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable; check its permissions") from None
    except OSError as err:  # a FIFO or device (refused, never waited on), a name too long, ...
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}; give a "
                          "regular .toml file") from None
    except ValueError:  # a NUL byte in the name
        raise ConfigError(f"config file {path!r} is not a valid file name; check --config") from None
    try:
        text = raw.decode("utf-8")
        if _nesting_exceeds(text, MAX_TOML_NESTING):
            # Checked before parsing: whether the parser hits RecursionError depends on how deep
            # the caller's stack already is (a depth of 1200 passed in one place, failed in another).
            raise ConfigError(f"config file {path} is not valid TOML: nested too deeply")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except RecursionError:  # arrays or tables nested thousands of levels deep (issue 18)
        raise ConfigError(f"config file {path} is not valid TOML: nested too deeply") from None
    for table in ("session-watchdog", "session_watchdog"):
        if isinstance(data.get(table), dict):
            data = {**{k: v for k, v in data.items() if k != table}, **data[table]}
    return data


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; 1 MiB is generous


def _read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; a FIFO or a device is refused at
    once (O_NONBLOCK, fstat after open), never waited on or read without end (issue 18)."""
    import errno
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def env_values(env: Mapping[str, str]) -> Dict[str, str]:
    """``SESSION_WATCHDOG_<KEY>`` variables (RUN_DIR is also the trainer's; all are keys)."""
    out: Dict[str, str] = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and value != "":
            out[name[len(ENV_PREFIX):].lower()] = value
    return out


def load_config(
    config_file: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    overrides_spelling: str = "flag",
) -> Config:
    """defaults < TOML file < environment < overrides (flags / keyword arguments)."""
    env = os.environ if env is None else env
    merged: Dict[str, Any] = {}
    if config_file is not None:
        merged.update(parse_values(read_toml(Path(config_file)), source=f"config file {config_file}",
                                   spelling="file"))
    merged.update(parse_values(env_values(env), source="environment", spelling="env"))
    if overrides:
        merged.update(parse_values(overrides, source="", spelling=overrides_spelling))
    return Config(**merged)
