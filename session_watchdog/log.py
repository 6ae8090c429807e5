"""Structured logs: one JSONL stream (schema-versioned events) plus a short console view.

Events (the ``event`` field): ``sample`` (one per tick), ``decision`` (what the policy decided,
with a ``reason`` code), ``action`` (what was carried out), and lifecycle events such as
``daemon_started`` / ``daemon_stopped`` / ``tick_failed``. Configure once, in ``main()`` or
``start()``; importing this module does no I/O. Values of secret-looking environment variables
(tokens, keys, passwords) are replaced by ``[redacted]`` before anything is written.
"""

from __future__ import annotations

import errno
import json
import logging
import operator
import os
import re
import stat
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from session_watchdog import mounts

SCHEMA_VERSION = 1
# scheduler_log: APScheduler's own records ("... skipped: maximum number of running instances
# reached", common on a busy machine) are kept in the JSONL log; the console shows our own
# tick_missed / tick_failed events instead of the library's raw text.
CONSOLE_EVENTS_SKIPPED = ("sample", "scheduler_log")
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH|_KEY$|^KEY$)",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


class _Logger:
    """A logger that imports structlog at its first event, not at import.

    Modules keep a module-level ``log = get_logger()``; importing structlog (with rich and
    pygments behind ``structlog.dev`` when installed) made every command, ``--help`` and
    ``status`` included, start ~0.5 s slower (issue 17). The configuration in force
    (``configure``, ``capture_logs``) applies, as with structlog's own lazy proxy: the bound
    logger is built again whenever structlog's configuration changed, and reused while it did
    not (structlog's proxy rebuilt it - a proxy, a logger, a context - for every event, the
    largest part of a daemon tick's CPU after its reads, issue 17).
    """

    __slots__ = ("_name", "_context", "_bound")

    def __init__(self, name: str, context: Optional[Dict[str, Any]] = None) -> None:
        self._name = name
        self._context = context or {}
        self._bound: Optional[Tuple[Tuple[Any, ...], Any]] = None

    def bind(self, **values: Any) -> _Logger:
        return _Logger(self._name, {**self._context, **values})

    def __getattr__(self, method: str) -> Any:
        import structlog

        config = tuple(structlog.get_config().values())
        bound = self._bound
        # The cache holds the configuration's objects, so none of them can be freed and another
        # take its place unnoticed; `is`, not ==, since a new processor list may be equal.
        if bound is None or len(bound[0]) != len(config) or any(
                map(operator.is_not, bound[0], config)):
            logger = structlog.get_logger(self._name)
            if self._context:
                logger = logger.bind(**self._context)
            else:
                logger = logger.bind()  # resolve the lazy proxy once
            bound = self._bound = (config, logger)
        return getattr(bound[1], method)


def get_logger(name: str = "session_watchdog") -> Any:
    return _Logger(name)


# What structlog's import pulls in that the watchdog's own process never uses (issue 17: RSS <=
# 2.5x a bare interpreter): rich (and pygments) for structlog.dev's pretty tracebacks, ~5 MB when
# installed (Colab has it); colorama (and ctypes) for ANSI colours on Windows consoles; ssl, which
# asyncio imports for TLS transports (structlog.stdlib imports asyncio): libssl + libcrypto, ~4 MB.
# Without notifications the watchdog runs no asyncio transport, and its plain HTTPS clients
# (urllib) import ssl themselves when used; only asyncio's own reference would stay empty, so
# with notifications (Apprise: some channels run TLS over asyncio) ssl is left alone.
_NOT_FOR_STRUCTLOG = ("rich", "colorama", "ssl")


def import_structlog_without_rich(keep_ssl: bool = False) -> None:
    """Import structlog without letting it load rich, colorama or ssl (:data:`_NOT_FOR_STRUCTLOG`;
    ``keep_ssl``: ssl as usual, for a process that sends notifications).

    Only for the watchdog's own process (cli), never in a user's process (notebook, trainer),
    whose structlog output (and asyncio) must stay as the user configured it. Each of those
    modules stays importable afterwards.
    """
    if "structlog" in sys.modules:
        return
    blocked = [name for name in _NOT_FOR_STRUCTLOG  # one already loaded is in use: left alone
               if name not in sys.modules and not (keep_ssl and name == "ssl")]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # documented: import raises ImportError
    try:
        import structlog  # noqa: F401
    finally:
        for name in blocked:
            del sys.modules[name]


# --------------------------------------------------------------------------------------------
# Where logs go


def default_log_file(run_name: str, persistent_dirs: Iterable[Path] = (),
                     env: Optional[Mapping[str, str]] = None,
                     mount_roots: Sequence[mounts.MountRoot] = mounts.MOUNT_ROOTS) -> Path:
    """Persistent storage when there is some (Drive, /root/autodl-tmp), else the user state dir."""
    env = os.environ if env is None else env
    for base in persistent_dirs:
        # On Drive only inside MyDrive: /content/drive itself is the bare mountpoint (after an
        # unmount, files there are local and would make the next drive.mount() fail). And only
        # while it is mounted: an unmounted Drive's MyDrive is a plain local directory.
        target = base / "MyDrive" if base.name == "drive" else base
        if mounts.unmounted_root(target, mount_roots) is not None:
            continue
        if target.is_dir() and os.access(target, os.W_OK):
            return target / "session-watchdog" / f"{run_name}.jsonl"
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "session-watchdog" / f"{run_name}.jsonl"


class RotatingJsonl:
    """Append JSON lines to a file; rotate to ``.1`` .. ``.N`` past ``max_bytes``. Thread-safe.

    With ``compress`` a rotated file is gzipped (``.1.gz``, ...) in a background thread, and the
    rotated files are kept by the disk they take instead of by count: as many as fit in
    ``max_bytes * backups`` bytes. JSONL samples compress ~10x, so the default budget (20 MiB x
    5) keeps weeks of an 8-GPU log instead of ~3.4 days, and a week-long run keeps its whole
    history (issue 17). ``report`` and ``tail`` read ``.gz`` rotated files.
    """

    def __init__(self, path: Path, max_bytes: int = 20 * 2**20, backups: int = 5,
                 compress: bool = False,
                 mount_roots: Sequence[mounts.MountRoot] = mounts.MOUNT_ROOTS) -> None:
        self.path = Path(path)
        self.mount_roots = mount_roots
        self.max_bytes = max_bytes
        self.backups = backups
        self.compress = compress
        self._lock = threading.Lock()
        self._fh: Optional[IO[str]] = None
        self._size = 0
        self._regular = True  # a FIFO or a device (/dev/stdout) is written to, never rotated
        self._compressor: Optional[threading.Thread] = None

    def _open(self) -> IO[str]:
        if self._fh is None:
            # Never create it under Drive after our own flush_and_unmount (a reopen, a rotation):
            # local files in the mount point make the next drive.mount() fail.
            root = mounts.unmounted_root(self.path, self.mount_roots)
            if root is not None:
                raise OSError(errno.ENOENT, f"{root.path} is not mounted", str(self.path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NONBLOCK: a FIFO that nobody reads fails at once (ENXIO) instead of blocking the
            # start for ever (issue 18); writes block as usual once it is open.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(self.path, flags, 0o666)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    raise OSError(errno.ENXIO, "a FIFO that no process reads", str(self.path)) from err
                raise
            try:
                os.set_blocking(fd, True)
                st = os.fstat(fd)
                self._fh = os.fdopen(fd, "a", encoding="utf-8")
            except BaseException:
                os.close(fd)
                raise
            self._regular = stat.S_ISREG(st.st_mode)
            self._size = st.st_size if self._regular else 0
        return self._fh

    def _rotated(self) -> Dict[int, List[str]]:
        """Rotation index -> names of our rotated files with that index (plain and/or .gz)."""
        found: Dict[int, List[str]] = {}
        prefix = self.path.name + "."
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return found
        for name in names:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            index = rest[:-3] if rest.endswith(".gz") else rest
            if index.isdigit() and int(index) > 0:
                found.setdefault(int(index), []).append(name)
        return found

    def _rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self.compress:
            for index in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{index}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{index + 1}"))
            if self.path.exists():
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            return
        self._join_compressor()  # it works on .1, which is about to move
        for index, names in sorted(self._rotated().items(), reverse=True):
            for name in names:
                os.replace(self.path.parent / name,
                           self.path.with_name(_shifted(name, self.path.name, index)))
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        # Not a daemon thread: an exiting process finishes the file it started compressing.
        self._compressor = threading.Thread(target=self._compress_and_prune,
                                            name="session-watchdog-log-gzip")
        self._compressor.start()

    def _compress_and_prune(self) -> None:
        """gzip every plain rotated file, then drop the oldest beyond the disk budget."""
        for _, names in sorted(self._rotated().items()):
            for name in names:
                if not name.endswith(".gz"):
                    _gzip_file(self.path.parent / name)
        budget = self.max_bytes * self.backups
        used = 0
        for index, names in sorted(self._rotated().items()):
            for name in names:
                path = self.path.parent / name
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                used += size
                if used > budget and index > 1:
                    _unlink_quietly(path)

    def _join_compressor(self) -> None:
        worker, self._compressor = self._compressor, None
        if worker is not None:
            worker.join()

    def open(self) -> None:
        with self._lock:
            self._open()

    def write(self, line: str) -> None:
        data = line + "\n"
        with self._lock:
            if self._regular and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            fh = self._fh or self._open()
            fh.write(data)
            fh.flush()
            self._size += len(data.encode("utf-8")) if not data.isascii() else len(data)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._join_compressor()


def _shifted(name: str, base: str, index: int) -> str:
    """``base.<index>[.gz]`` -> ``base.<index+1>[.gz]``."""
    suffix = ".gz" if name.endswith(".gz") else ""
    return f"{base}.{index + 1}{suffix}"


def _gzip_file(path: Path) -> None:
    """Replace ``path`` with ``path.gz`` (temp file, then rename: never a half-written .gz)."""
    import gzip
    import shutil

    target = path.with_name(path.name + ".gz")
    temp = path.with_name(f".{path.name}.gz.tmp")
    try:
        with open(path, "rb") as src, gzip.open(temp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(temp, target)
        os.unlink(path)
    except OSError:  # a full disk: keep the plain file, try again at the next rotation
        _unlink_quietly(temp)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------
# Processors


def secret_values(env: Optional[Mapping[str, str]] = None) -> List[str]:
    env = os.environ if env is None else env
    return sorted({v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 6},
                  key=len, reverse=True)


class _Encoded(Dict[str, Any]):
    """An event checked clean of secrets, with the JSON line that check produced (``Sink``
    writes it instead of encoding the event a second time)."""

    __slots__ = ("json",)
    json: str


def _encode(event: Mapping[str, Any]) -> str:
    return _ENCODER.encode(event)


class Redactor:
    """Replace known secret values anywhere in an event (nested dicts/lists included).

    For the events the console does not print (``sample``, every tick), the event's JSON line is
    searched first, for each secret as JSON writes it (escaping is per character, so a secret
    inside any key, value or ``repr`` text shows up there), and only an event that holds a secret
    is walked and rebuilt: a ``sample`` event of 8 GPUs cost a 27 us walk per tick whenever
    HF_TOKEN was set (issue 17); the search costs one encode, which the sink reuses. Every other
    event is walked: the console prints its values with ``str()``.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = [s for s in secrets if s]

    @property
    def secrets(self) -> List[str]:
        return self._secrets

    @secrets.setter
    def secrets(self, values: List[str]) -> None:
        # Each secret also as repr() writes it (a backslash doubled): an object's text in an
        # event is its repr (an exception's message in quotes), see _json_default.
        variants = [form for v in values for form in dict.fromkeys((v, repr(v)[1:-1]))]
        self._variants = variants
        self._encoded = [json.dumps(v)[1:-1] for v in variants]  # as they appear in a JSON line
        self._secrets = values  # last: a concurrent event never searches for fewer than these

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._variants:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {self._clean(k) if isinstance(k, str) else k: self._clean(v)
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        # Anything else is written as the text _json_default gives it (a Path's str, an
        # exception's repr): redact that text, or a secret inside it would reach the file.
        return self._clean(_json_default(value))

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        if not self._secrets:
            return event
        if event.get("event") not in CONSOLE_EVENTS_SKIPPED:
            # The console prints str() of the values, which the JSON line (repr() for objects)
            # does not show the same way: events it prints are cleaned value by value.
            return {k: self._clean(v) for k, v in event.items()}
        line: Optional[str] = None
        try:
            line = _encode(event)
        except (TypeError, ValueError):  # not encodable as it stands: the walk, then the sink, say so
            pass
        if line is not None and not any(secret in line for secret in self._encoded):
            clean = _Encoded(event)
            clean.json = line
            return clean
        return {k: self._clean(v) for k, v in event.items()}


def _add_schema(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    event.setdefault("ts", round(time.time(), 3))
    event["schema"] = SCHEMA_VERSION
    if method not in ("info", "msg"):
        event.setdefault("level", method)
    return event


def console_line(event: Mapping[str, Any]) -> Optional[str]:
    """The human view of one event, or None for events the console does not show."""
    name = event.get("event")
    if name in CONSOLE_EVENTS_SKIPPED:
        return None
    clock = time.strftime("%H:%M:%S", time.localtime(float(event.get("ts", time.time()))))
    reason = event.get("reason")
    message = event.get("message") or ""
    kind = event.get("kind") or event.get("step") or event.get("level") or ""
    parts = [f"[session-watchdog {clock}]", str(name)]
    if kind:
        parts.append(str(kind))
    if reason:
        parts.append(f"({reason})")
    if message:
        parts.append(f"- {message}")
    extra = {k: v for k, v in event.items()
             if k in ("path", "run_dir", "log_file", "platform", "error", "argv", "seq", "action",
                      "exit_code")}
    if extra:
        parts.append(" ".join(f"{k}={v}" for k, v in extra.items()))
    return " ".join(parts)


class Sink:
    """The last processor: write the event as one JSON line, echo a human line, drop the event."""

    def __init__(self, jsonl: Optional[RotatingJsonl], console: Optional[IO[str]]) -> None:
        self.jsonl = jsonl
        self.console = console
        self.lost = 0  # lines that could not be written

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        if self.jsonl is not None:
            try:
                self.jsonl.write(event.json if isinstance(event, _Encoded) else _ENCODER.encode(event))
            except (OSError, ValueError) as err:
                # A full disk must not stop the watchdog from acting (it matters most then):
                # count the lost lines, say so once on the console.
                self.lost += 1
                if self.lost == 1 and self.console is not None:
                    try:
                        print(f"[session-watchdog] cannot write the log {self.jsonl.path}: {err}; "
                              "going on without it", file=self.console, flush=True)
                    except (OSError, ValueError):
                        pass
        if self.console is not None:
            line = console_line(event)
            if line is not None:
                try:
                    print(line, file=self.console, flush=True)
                except (OSError, ValueError):  # a closed terminal must not stop the watchdog
                    pass
        # The event ends here. Dropped, not returned: while the watchdog runs, structlog's
        # configuration is the process's, and a user's own log call must still return None
        # (a notebook would show a returned value as the cell's output).
        import structlog

        raise structlog.DropEvent


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


# json.dumps(event, default=_json_default, separators=(",", ":")), without a new encoder object
# for every event (json.dumps builds one whenever it is given options; issue 17)
_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))


class StdlibBridge(logging.Handler):
    """A library's stdlib log records (WARNING and up) -> a ``scheduler_log`` event in our log.

    APScheduler logs from its own threads ("Run time of job ... was missed by ...", "Execution of
    job ... skipped: maximum number of running instances reached"), common on a busy machine.
    Left to propagate, Python's last-resort handler (or the user's root handler) would print them
    raw onto the console or into whatever notebook cell happens to be running.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            get_logger().warning("scheduler_log", logger=record.name, level=record.levelname.lower(),
                                 message=record.getMessage())
        except Exception:  # logging must never raise into the library's thread
            pass


def bridge_stdlib(name: str) -> Callable[[], None]:
    """Route the stdlib logger ``name`` to our log (not the console); return what undoes it."""
    logger = logging.getLogger(name)
    bridge = StdlibBridge()
    propagate = logger.propagate
    logger.addHandler(bridge)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(bridge)
        logger.propagate = propagate

    return undo


_current: Dict[str, Any] = {}
_extra_secrets: List[str] = []  # secrets from the configuration (notify URLs, tokens)
_listeners: List[Callable[[Mapping[str, Any]], None]] = []


def add_secrets(values: Iterable[str]) -> None:
    """Redact these values too, from now on (the configured log and any later configure())."""
    fresh = [v for v in values if v and v not in _extra_secrets]
    _extra_secrets.extend(fresh)
    redactor = _current.get("redactor")
    if redactor is not None:
        redactor.secrets = sorted(set(redactor.secrets) | set(fresh), key=len, reverse=True)


def add_listener(listener: Callable[[Mapping[str, Any]], None]) -> None:
    """Call ``listener(event)`` with every redacted event, in the thread that logged it.

    A listener must be quick and must not raise (it runs inside a tick); notifications hook in
    here, so they see exactly what the log sees, secrets already removed.
    """
    _listeners.append(listener)


def remove_listener(listener: Callable[[Mapping[str, Any]], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _call_listeners(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    for listener in list(_listeners):
        try:
            listener(event)
        except Exception:  # a broken listener must never break logging (or a tick)
            pass
    return event


def configure(log_file: Optional[Path], *, console: Optional[IO[str]] = sys.stderr,
              max_bytes: int = 20 * 2**20, backups: int = 5,
              env: Optional[Mapping[str, str]] = None,
              bridge: Sequence[str] = (), compress: bool = False) -> Optional[RotatingJsonl]:
    """Configure structlog for the process (call once from main() or start()).

    ``bridge``: stdlib loggers (e.g. ``apscheduler``) whose records go to this log until close().
    ``compress`` (the watchdog's own log: cli and notebook pass it): rotated files are gzipped
    and kept within ``max_bytes * backups`` bytes of disk (:class:`RotatingJsonl`); without it
    ``backups`` plain files are kept.
    """
    close()
    jsonl = RotatingJsonl(log_file, max_bytes, backups, compress=compress) \
        if log_file is not None else None
    if jsonl is not None:
        jsonl.open()  # fail here, with the path, not at the first event
    redactor = Redactor(sorted(set(secret_values(env)) | set(_extra_secrets), key=len, reverse=True))
    import structlog

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_schema,
            redactor,
            _call_listeners,
            Sink(jsonl, console),
        ],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    _current["jsonl"] = jsonl
    _current["redactor"] = redactor
    _current["undo"] = [bridge_stdlib(name) for name in bridge]
    return jsonl


def close() -> None:
    for undo in reversed(_current.pop("undo", [])):
        undo()
    jsonl = _current.pop("jsonl", None)
    if jsonl is not None:
        jsonl.close()


def sample_event(sample: Any, remaining_s: Optional[float], budget_s: Optional[float]) -> Dict[str, Any]:
    """Flatten a probes.Sample into the ``sample`` event's fields (schema 1)."""
    # the module, not the package: `from package import` runs importlib Python code every call
    from session_watchdog.probes.nvml import rank_by_pid, ranks_on_gpus

    host = sample.host
    trainer = sample.trainer
    status = trainer.status
    ckpt = status.last_checkpoint if status is not None else None
    listed = {g.index: g.process_pids for g in sample.gpus if g.process_pids is not None}
    ranks = ranks_on_gpus(listed, rank_by_pid(status.extra)) if listed and status is not None else {}
    return {
        "elapsed_s": round(sample.elapsed_s, 3),
        "remaining_s": None if remaining_s is None else round(remaining_s, 3),
        "budget_s": budget_s or None,
        "nvml": sample.nvml,
        "gpus": [
            {"index": g.index, "name": g.name, "util_pct": g.utilization_pct,
             "mem_used_bytes": g.memory_used_bytes, "mem_total_bytes": g.memory_total_bytes,
             "temp_c": g.temperature_c, "power_w": g.power_w, "error": g.error,
             **({} if g.process_pids is None else {"pids": list(g.process_pids),
                                                   "ranks": ranks.get(g.index)})}
            for g in sample.gpus
        ],
        "ram": None if host is None else {
            "total_bytes": host.ram_total_bytes, "available_bytes": host.ram_available_bytes,
            "source": host.ram_source, "swap_used_bytes": host.swap_used_bytes,
            "cpu_pct": host.cpu_pct, "oom_kills": host.oom_kills,
        },
        "disks": [{"path": d.path, "free_bytes": d.free_bytes, "total_bytes": d.total_bytes}
                  for d in sample.disks],
        "trainer": {
            "alive": trainer.alive, "saving": trainer.saving,
            "state": status.state if status else None,
            "step": status.step if status else None,
            "epoch": status.epoch if status else None,
            "step_time_s": status.step_time_s if status else None,
            "acked_seq": status.acked_seq if status else None,
            "checkpoint": None if ckpt is None else {
                "path": ckpt.path, "step": ckpt.step, "at": ckpt.at,
                "duration_s": ckpt.duration_s, "bytes": ckpt.bytes},
            "error": trainer.status_error,
        },
        "notebook_idle_s": sample.notebook_idle_s,
    }
