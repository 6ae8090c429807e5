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
    """``90`` / ``"90s"`` / ``"15m"`` / ``"11h30m"`` / ``"1d"`` -> seconds (> 0)."""
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
            seconds = float(text)
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


def format_duration(seconds: Optional[float]) -> str:
    """The inverse of parse_duration for people: ``5400`` -> ``1h30m``, ``75`` -> ``1m15s``."""
    if seconds is None:
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


def parse_abs_path(raw: Any) -> Path:
    if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
        raise ValueError("expected an absolute path")
    path = Path(os.path.expanduser(str(raw).strip()))
    if not path.is_absolute():
        raise ValueError("expected an absolute path (starting with / or ~)")
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


# --------------------------------------------------------------------------------------------
# The key table


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"
    is_flag: bool = False  # boolean: --name / --no-name


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
    Key("log_backups", parse_int_min1, "rotated log files kept (default 5)", "N"),
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
        "end a runtime whose GPUs idled this long with no trainer (default 30m on Colab/AutoDL)",
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
    Key("price_per_hour", parse_positive_float, "runtime price per hour, for costs", "PRICE"),
    Key("money_budget", parse_positive_float,
        "money budget; with price_per_hour it sets the session budget (AutoDL)", "AMOUNT"),
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
    price_per_hour: Optional[float] = None
    money_budget: Optional[float] = None

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
            parsed[name] = key.parse(raw)
        except ValueError as err:
            raise ConfigError(
                f"{prefix}{spell(name)} = {_describe(raw)} is invalid: {err}") from None
    return parsed


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
    if config.stop_margin >= config.margin:
        raise ConfigError(
            f"stop_margin = {config.stop_margin:g}s is invalid: expected less than "
            f"margin = {config.margin:g}s"
        )


def read_toml(path: Path) -> Dict[str, Any]:
    """Read a flat TOML table of config keys (``key = value``; ``[session-watchdog]`` also works)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.9/3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a .toml file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable; check its permissions") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    for table in ("session-watchdog", "session_watchdog"):
        if isinstance(data.get(table), dict):
            data = {**{k: v for k, v in data.items() if k != table}, **data[table]}
    return data


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
