"""The daemon <-> trainer protocol: the run directory, its files and its locks.

Both sides import this module; it uses the standard library only (no torch, no psutil), so the
trainer process pays nothing for it. See DESIGN.md, "The daemon <-> trainer protocol".

Files in the run directory, each written with :func:`atomic_write`:

- ``request.json``  daemon -> trainer: ``{v, seq, action, reason, deadline, issued}``
- ``trainer.json``  trainer -> daemon: ``{v, pid, start_time, state, step, epoch, step_time_s,
  acked_seq, last_checkpoint, heartbeat}``
- ``run.lock``      shared flock held by the trainer for its whole life (liveness)
- ``save.lock``     exclusive flock held by the trainer while a checkpoint is written
- ``daemon.lock``   exclusive flock held by the one daemon of this run directory
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

SCHEMA_VERSION = 1
MAX_FILE_BYTES = 64 * 1024  # every protocol file is a few hundred bytes; larger is hostile

REQUEST_FILE = "request.json"
TRAINER_FILE = "trainer.json"
STATE_FILE = "state.json"
SESSION_FILE = "session.json"
CANCEL_FILE = "cancel.json"
RUN_LOCK = "run.lock"
SAVE_LOCK = "save.lock"
DAEMON_LOCK = "daemon.lock"

ACTIONS = ("checkpoint", "stop")
TRAINER_STATES = ("starting", "running", "saving", "stopping", "stopped", "completed", "failed")

ENV_RUN_DIR = "SESSION_WATCHDOG_RUN_DIR"
_TMP_SUFFIX = ".sw-tmp"


class ChannelError(Exception):
    """A run-directory file or the directory itself cannot be trusted or read."""


class RunDirError(ChannelError):
    """The run directory is unsafe (symlink, foreign owner, open permissions) or unusable."""


# --------------------------------------------------------------------------------------------
# The run directory


def default_run_dir(run: str = "default", env: Optional[Mapping[str, str]] = None) -> Path:
    """Where the run directory lives when none is configured (DESIGN.md order)."""
    env = os.environ if env is None else env
    explicit = env.get(ENV_RUN_DIR)
    if explicit:
        return Path(explicit)
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "session-watchdog" / run
    return Path.home() / ".cache" / "session-watchdog" / "run" / run


def ensure_run_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check an existing one; return it.

    Refuses (RunDirError) a symlink, a non-directory, a directory owned by another user, or one
    that group or others may write to: any of those lets someone else plant the files we trust.
    A directory of ours that is merely readable by others is tightened to 0700.
    """
    path = Path(path)
    if not path.is_absolute():
        raise RunDirError(f"run dir {str(path)!r} is relative; give an absolute path")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise RunDirError(f"cannot create run dir {path}: {err.strerror}") from err
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"run dir {path} is a symlink; remove it or choose another --run-dir")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run dir {path} is not a directory; choose another --run-dir")
    if st.st_uid != os.geteuid():
        raise RunDirError(
            f"run dir {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); "
            "choose another --run-dir"
        )
    if st.st_mode & 0o022:
        raise RunDirError(
            f"run dir {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run 'chmod 700 {path}' or choose another --run-dir"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


# --------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A fresh, unpredictable temp name next to ``path`` (same directory, same filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")


def open_exclusive(path: Path) -> int:
    """Open a new file for writing: O_EXCL|O_NOFOLLOW, mode 0600. Never follows a planted link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o600)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    temp file in the same directory (O_EXCL|O_NOFOLLOW, 0600) -> write -> fsync -> os.replace ->
    fsync(dir). On any error the temp file is removed and the previous file stays as it was.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    fd = open_exclusive(tmp)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # another user's live process (or a pid we cannot ask about): keep
    return True


def sweep_temps(directory: Path) -> int:
    """Remove temp files whose writer died (the pid in the name no longer runs); return how many.

    A temp of a live writer is never touched, whoever it belongs to: its rename may come next.
    """
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[: -len(_TMP_SUFFIX)].split(".")
        pid = parts[-2] if len(parts) >= 4 else ""
        if pid.isdigit() and not _pid_running(int(pid)):
            _unlink_quietly(Path(directory) / name)
            removed += 1
    return removed


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Atomically write ``obj`` as compact JSON."""
    atomic_write(path, json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


def read_json(path: Path, max_bytes: int = MAX_FILE_BYTES) -> Optional[Dict[str, Any]]:
    """Read a protocol file; None when it does not exist.

    Raises ChannelError for a symlink, an oversized file, malformed JSON, a non-object, or a
    schema version we do not know. Never follows a planted symlink (O_NOFOLLOW).
    """
    # O_NONBLOCK: opening a FIFO planted at this name would otherwise block until a writer
    # comes; regular files ignore the flag, and the S_ISREG check below refuses the FIFO.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ChannelError(f"{path} is a symlink; refusing to read it") from err
        raise ChannelError(f"cannot read {path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ChannelError(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise ChannelError(f"{path} is {st.st_size} bytes, over the {max_bytes}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise ChannelError(f"{path} grew past the {max_bytes}-byte limit while read")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ChannelError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise ChannelError(f"{path} holds {type(obj).__name__}, expected a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ChannelError(f"{path} has schema version {version!r}, expected {SCHEMA_VERSION}")
    return obj


def quarantine(path: Path) -> Optional[Path]:
    """Move an untrustworthy file aside as ``<name>.bad`` (one kept) so it stops being read."""
    target = path.with_name(path.name + ".bad")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target


# --------------------------------------------------------------------------------------------
# Messages


def _num(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[float]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ChannelError(f"field {key!r} is {value!r}, expected a finite number")
    return float(value)


def _int(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[int]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChannelError(f"field {key!r} is {value!r}, expected an integer")
    return value


def _str(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[str]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ChannelError(f"field {key!r} is {value!r}, expected a string")
    return value


@dataclass(frozen=True)
class Request:
    """A daemon -> trainer request. ``deadline`` and ``issued`` are wall-clock epoch seconds."""

    seq: int
    action: str  # "checkpoint" | "stop"
    reason: str
    deadline: Optional[float]
    issued: float

    def to_json(self) -> Dict[str, Any]:
        return {"v": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Request:
        action = _str(obj, "action")
        if action not in ACTIONS:
            raise ChannelError(f"request action {action!r} is not one of {ACTIONS}")
        seq = _int(obj, "seq")
        assert seq is not None
        if seq < 1:
            raise ChannelError(f"request seq {seq} is not positive")
        return cls(
            seq=seq,
            action=action,
            reason=_str(obj, "reason") or "",
            deadline=_num(obj, "deadline", optional=True),
            issued=_num(obj, "issued") or 0.0,
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """What the trainer reports about a committed checkpoint."""

    path: str
    seq: Optional[int]  # the request this checkpoint answered; None for periodic/own saves
    step: int
    at: float
    duration_s: float
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, obj: Any) -> Optional[CheckpointInfo]:
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise ChannelError(f"last_checkpoint is {obj!r}, expected an object")
        return cls(
            path=_str(obj, "path") or "",
            seq=_int(obj, "seq", optional=True),
            step=_int(obj, "step") or 0,
            at=_num(obj, "at") or 0.0,
            duration_s=_num(obj, "duration_s") or 0.0,
            bytes=_int(obj, "bytes") or 0,
            sha256=_str(obj, "sha256") or "",
        )


@dataclass(frozen=True)
class TrainerStatus:
    """The trainer's self-report (``trainer.json``)."""

    pid: int
    start_time: float  # process create time (psutil's create_time), for identity checks
    state: str
    step: int
    epoch: int
    step_time_s: Optional[float]
    acked_seq: int
    last_checkpoint: Optional[CheckpointInfo]
    heartbeat: float
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        obj = asdict(self)
        obj["v"] = SCHEMA_VERSION
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TrainerStatus:
        state = _str(obj, "state")
        if state not in TRAINER_STATES:
            raise ChannelError(f"trainer state {state!r} is not one of {TRAINER_STATES}")
        extra = obj.get("extra") or {}
        if not isinstance(extra, dict):
            raise ChannelError("field 'extra' must be an object")
        return cls(
            pid=_int(obj, "pid") or 0,
            start_time=_num(obj, "start_time") or 0.0,
            state=state,
            step=_int(obj, "step") or 0,
            epoch=_int(obj, "epoch") or 0,
            step_time_s=_num(obj, "step_time_s", optional=True),
            acked_seq=_int(obj, "acked_seq") or 0,
            last_checkpoint=CheckpointInfo.from_json(obj.get("last_checkpoint")),
            heartbeat=_num(obj, "heartbeat") or 0.0,
            extra=extra,
        )


@dataclass(frozen=True)
class MirrorStatus:
    """The trainer's checkpoint mirror (``extra["mirror"]`` and ``extra["last_mirrored"]``).

    Kept in ``extra`` so that daemons that do not know mirrors ignore it. ``state``: ok |
    copying | failing | refused; ``problem`` a code from trainer/mirror.py when failing.
    ``last_*`` describe the newest checkpoint verified on the mirror (None: none yet);
    ``last_duration_s`` is the time from its local commit to verified there.
    """

    target: str
    local: bool
    state: str
    problem: Optional[str] = None
    error: Optional[str] = None
    pending_step: Optional[int] = None
    last_path: Optional[str] = None
    last_step: Optional[int] = None
    last_sha256: Optional[str] = None
    last_bytes: Optional[int] = None
    last_at: Optional[float] = None
    last_duration_s: Optional[float] = None

    @classmethod
    def from_status(cls, status: Optional[TrainerStatus]) -> Optional[MirrorStatus]:
        """The mirror of ``status``; None when it has none or reports it malformed."""
        if status is None or not isinstance(status.extra.get("mirror"), dict):
            return None
        mirror = status.extra["mirror"]
        last = status.extra.get("last_mirrored")
        last = last if isinstance(last, dict) else {}
        try:
            return cls(
                target=_str(mirror, "target") or "",
                local=mirror.get("local") is True,
                state=_str(mirror, "state") or "",
                problem=_str(mirror, "problem", optional=True),
                error=_str(mirror, "error", optional=True),
                pending_step=_int(mirror, "pending_step", optional=True),
                last_path=_str(last, "path", optional=True),
                last_step=_int(last, "step", optional=True),
                last_sha256=_str(last, "sha256", optional=True),
                last_bytes=_int(last, "bytes", optional=True),
                last_at=_num(last, "at", optional=True),
                last_duration_s=_num(last, "duration_s", optional=True),
            )
        except ChannelError:
            return None


class RunDir:
    """Typed access to one run directory (both sides use it)."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = ensure_run_dir(Path(path)) if create else Path(path)
        self._files: Dict[str, Path] = {}

    def file(self, name: str) -> Path:
        found = self._files.get(name)  # the daemon asks for the same few names every tick
        if found is None:
            found = self._files[name] = self.path / name
        return found

    # requests
    def write_request(self, request: Request) -> None:
        write_json(self.file(REQUEST_FILE), request.to_json())

    def read_request(self) -> Optional[Request]:
        """The current request, or None. Raises ChannelError when it is malformed."""
        obj = read_json(self.file(REQUEST_FILE))
        return None if obj is None else Request.from_json(obj)

    # trainer status
    def write_status(self, status: TrainerStatus) -> None:
        write_json(self.file(TRAINER_FILE), status.to_json())

    def read_status(self) -> Optional[TrainerStatus]:
        """The trainer's status, or None. Raises ChannelError when it is malformed."""
        obj = read_json(self.file(TRAINER_FILE))
        return None if obj is None else TrainerStatus.from_json(obj)

    # liveness
    def trainer_alive(self) -> bool:
        """True while some process holds ``run.lock`` (the kernel drops it when it dies)."""
        return lock_held(self.file(RUN_LOCK))

    def trainer_saving(self) -> bool:
        """True while a checkpoint is being written (``save.lock`` held)."""
        return lock_held(self.file(SAVE_LOCK))


# --------------------------------------------------------------------------------------------
# Locks (flock: per open file description, released by the kernel when the holder dies)


def _open_lock_file(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ChannelError(f"{path} is a symlink; refusing to lock it") from err
        raise


class FileLock:
    """An flock on ``path``; ``acquire`` returns False instead of blocking when ``blocking`` is off."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        if self._fd is not None:
            return True
        fd = _open_lock_file(self.path)
        op = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        if not blocking:
            op |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, op)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_held(path: Path) -> bool:
    """Whether another open file description holds any flock on ``path`` (non-blocking probe)."""
    if not os.path.lexists(path):
        return False
    probe = FileLock(path)
    if probe.acquire(blocking=False):
        probe.release()
        return False
    return True
