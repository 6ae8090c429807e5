"""The daemon <-> trainer protocol: the run directory, its files and its locks.

Both sides import this module; it uses the standard library only (no torch, no psutil), so the
trainer process pays nothing for it. See DESIGN.md, "The daemon <-> trainer protocol".

Files in the run directory, each written with :func:`atomic_write`:

- ``request.json``  daemon -> trainer: ``{v, seq, rid, action, reason, deadline, issued}``
- ``trainer.json``  trainer -> daemon: ``{v, pid, start_time, state, step, epoch, step_time_s,
  acked_seq, acked_rid, last_checkpoint, heartbeat}`` (``rid``: see :class:`Request`)
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
import re
import stat
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

SCHEMA_VERSION = 1
MAX_FILE_BYTES = 64 * 1024  # every protocol file is a few hundred bytes; larger is hostile
MAX_JSON_DEPTH = 32  # our files nest 3 levels; 5,000 levels made json.loads recurse out (#18)
MAX_INT = 2**53  # every integer in the protocol (seq, pid, step, bytes) is below this (#18)
MAX_RID_CHARS = 64

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
    whose mode is not 0700: any of those lets someone else plant the files we trust, and a
    directory we did not create is never re-moded (a mistaken ``--run-dir $HOME`` must not
    lock other users out). Every ancestor is checked as well (:func:`check_ancestors`).
    """
    path = Path(path)
    if not path.is_absolute():
        raise RunDirError(f"run dir {str(path)!r} is relative; give an absolute path")
    if path == path.parent:
        raise RunDirError(f"run dir {path} is the root directory; choose a new directory")
    check_ancestors(path)
    try:
        if not os.path.lexists(path.parent):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file in the way: refused just below
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise RunDirError(f"cannot create run dir {path}: {_why(err)}; choose another --run-dir") \
            from err
    if not os.path.isdir(path.parent):
        raise RunDirError(f"run dir {path} is below {path.parent}, which is not a directory; "
                          "choose another --run-dir")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot create run dir {path}: {_why(err)}; choose another --run-dir") \
            from err
    try:
        st = os.lstat(path)
    except OSError as err:
        raise RunDirError(f"cannot use run dir {path}: {err.strerror}; choose another --run-dir") \
            from err
    check_run_dir_stat(path, st)
    return path


def check_creatable(path: Path) -> None:
    """Refuse a missing run dir that could not be created safely (``doctor`` asks before ``run``).

    Its ancestors are checked (:func:`check_ancestors`) and the nearest existing one must be a
    directory: ``afile/run`` is refused here with one line, not a NotADirectoryError later.
    """
    path = Path(path)
    if not path.is_absolute():
        raise RunDirError(f"run dir {str(path)!r} is relative; give an absolute path")
    check_ancestors(path)
    for ancestor in Path(os.path.normpath(path)).parents:
        if os.path.lexists(ancestor):
            if not os.path.isdir(ancestor):
                raise RunDirError(f"run dir {path} is below {ancestor}, which is not a "
                                  "directory; choose another --run-dir")
            return


def _why(err: Exception) -> str:
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def check_run_dir_stat(path: Path, st: os.stat_result) -> None:
    """Refuse a run dir whose ``lstat``/``fstat`` is not ours, a directory, and mode 0700."""
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
        # Refused, not repaired: the directory may be $HOME or / given by mistake (#18).
        raise RunDirError(
            f"run dir {path} is mode {stat.S_IMODE(st.st_mode):04o} (not 0700); "
            f"choose a new directory or run 'chmod 700 {path}'"
        )


def check_ancestors(path: Path) -> None:
    """Refuse a run dir that another user could swap: check every ancestor up to ``/``.

    Each ancestor (symlinks resolved) must be owned by root or by us, and not writable by group
    or others unless it is sticky (like /tmp: others cannot rename what is ours there). Only
    checking the last component let the owner of a parent directory replace the run dir after
    a root daemon checked it (#18).
    """
    try:
        real = Path(os.path.realpath(path.parent))
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot resolve the parent of run dir {path}: {_why(err)}") from err
    me = os.geteuid()
    # Both chains: the one the path names (a symlink's parent decides who can swap the link)
    # and the one it resolves to.
    lexical = Path(os.path.normpath(path.parent))
    seen: set[Path] = set()
    for ancestor in (lexical, *lexical.parents, real, *real.parents):
        if ancestor in seen:
            continue
        seen.add(ancestor)
        try:
            st = os.stat(ancestor)
        except FileNotFoundError:
            continue  # not created yet: created by us, below a checked ancestor
        except (OSError, ValueError) as err:
            raise RunDirError(f"cannot use run dir {path}: {ancestor}: {_why(err)}; "
                              "choose another --run-dir") from err
        if st.st_uid not in (0, me):
            raise RunDirError(
                f"run dir {path} is below {ancestor}, owned by uid {st.st_uid} (another user "
                "could replace the run dir); choose a run dir below a directory of yours")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise RunDirError(
                f"run dir {path} is below {ancestor}, which other users may write to (mode "
                f"{stat.S_IMODE(st.st_mode):o}, not sticky); choose a run dir below a directory "
                "of yours")


# --------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(directory: Path, dir_fd: Optional[int] = None) -> None:
    """fsync a directory so a rename in it is durable (``dir_fd``: that directory, held open)."""
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A fresh, unpredictable temp name next to ``path`` (same directory, same filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{_token_hex(4)}{_TMP_SUFFIX}")


def open_exclusive(path: Path, dir_fd: Optional[int] = None) -> int:
    """Open a new file for writing: O_EXCL|O_NOFOLLOW, mode 0600. Never follows a planted link.

    With ``dir_fd``, ``path``'s name is opened in that directory (openat).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    if dir_fd is not None:
        return os.open(Path(path).name, flags, 0o600, dir_fd=dir_fd)
    return os.open(path, flags, 0o600)


def atomic_write(path: Path, data: bytes, dir_fd: Optional[int] = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    temp file in the same directory (O_EXCL|O_NOFOLLOW, 0600) -> write -> fsync -> os.replace ->
    fsync(dir). On any error the temp file is removed and the previous file stays as it was.
    With ``dir_fd`` (the directory held open, see :class:`RunDir`) every step is relative to it,
    so a directory swapped at ``path.parent`` after the check receives nothing.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    fd = open_exclusive(tmp, dir_fd)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp, dir_fd)
        raise
    os.close(fd)
    try:
        if dir_fd is None:
            os.replace(tmp, path)
        else:
            os.replace(tmp.name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(tmp, dir_fd)
        raise
    fsync_dir(path.parent, dir_fd)


def _unlink_quietly(path: Path, dir_fd: Optional[int] = None) -> None:
    try:
        if dir_fd is None:
            os.unlink(path)
        else:
            os.unlink(path.name, dir_fd=dir_fd)
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


def write_json(path: Path, obj: Mapping[str, Any], dir_fd: Optional[int] = None) -> None:
    """Atomically write ``obj`` as compact JSON."""
    atomic_write(path, json.dumps(obj, separators=(",", ":"), sort_keys=True).encode(), dir_fd)


_JSON_TOKENS = re.compile(rb'[\\"\[\]{}]')


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests deeper than ``limit``, found without parsing it.

    One linear pass over the characters that matter (quotes, backslashes, brackets): a bracket
    inside a string is text. Run before ``json.loads``, whose recursion a 5,000-level document
    exhausts. (A regex that skips whole strings backtracks quadratically on ``[\\"`` x 20,000.)
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    in_string = False
    escaped_at = -1  # the character after a backslash in a string is never a token
    for match in _JSON_TOKENS.finditer(raw):
        at = match.start()
        if at == escaped_at:
            continue
        char = raw[at]
        if in_string:
            if char == 0x5C:  # backslash
                escaped_at = at + 1
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _read_fd(fd: int, limit: int, first: int) -> bytes:
    """Up to ``limit`` bytes from ``fd`` (read until EOF or the limit; no file object), asking
    for ``first`` bytes first (the size fstat gave: one read, no 64 KiB buffer per read)."""
    chunks = []
    ask = max(1, min(first, limit))
    while limit > 0:
        chunk = os.read(fd, ask)
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
        if len(chunk) < ask:  # a short read of a regular file is its end: no read for the EOF
            break
        ask = min(limit, 4096)  # then: what was written since, in small reads
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_json(path: Path, max_bytes: int = MAX_FILE_BYTES,
              dir_fd: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Read a protocol file; None when it does not exist.

    Raises ChannelError for a symlink, an oversized or too deeply nested file, malformed JSON,
    a non-object, or a schema version we do not know. Never follows a planted symlink
    (O_NOFOLLOW). With ``dir_fd``, ``path``'s name is opened in that directory (openat).
    """
    # O_NONBLOCK: opening a FIFO planted at this name would otherwise block until a writer
    # comes; regular files ignore the flag, and the S_ISREG check below refuses the FIFO.
    try:
        fd = _open_for_read(path, dir_fd)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        if isinstance(err, OSError) and err.errno == errno.ELOOP:
            raise ChannelError(f"{path} is a symlink; refusing to read it") from err
        raise ChannelError(f"cannot read {path}: {_why(err)}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ChannelError(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise ChannelError(f"{path} is {st.st_size} bytes, over the {max_bytes}-byte limit")
        raw = _read_fd(fd, max_bytes + 1, first=st.st_size + 1)
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise ChannelError(f"{path} grew past the {max_bytes}-byte limit while read")
    if json_depth_exceeds(raw):
        raise ChannelError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = _loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ChannelError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise ChannelError(f"{path} holds {type(obj).__name__}, expected a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ChannelError(f"{path} has schema version {version!r}, expected {SCHEMA_VERSION}")
    return obj


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
# O_NOATIME: the daemon reads trainer.json on every tick, and each heartbeat replaces it, so under
# relatime every read also wrote the new file's access time back to the filesystem (an inode
# update in the journal, ~3 % of an idle daemon's CPU, issue 17). Only the file's owner (or
# CAP_FOWNER) may ask for it: a trainer running as another user gets an ordinary open.
_NOATIME = getattr(os, "O_NOATIME", 0)
_noatime_refused = False


def _open_for_read(path: Path, dir_fd: Optional[int]) -> int:
    global _noatime_refused
    name: Any = path if dir_fd is None else os.path.basename(path)
    if _NOATIME and not _noatime_refused:
        try:
            return os.open(name, _READ_FLAGS | _NOATIME, dir_fd=dir_fd)
        except PermissionError as err:
            if err.errno != errno.EPERM:  # EACCES: not ours to read at all, said below
                raise
            _noatime_refused = True  # not the owner: the same for every later read
    return os.open(name, _READ_FLAGS, dir_fd=dir_fd)


_DECODER = json.JSONDecoder()


def _loads(raw: bytes) -> Any:
    """``json.loads(raw)``: our files (UTF-8, one value, nothing around it) straight through
    the decoder, which parsed trainer.json on every tick in two thirds of json.loads's cold CPU
    (issue 17); anything else - an error, whitespace around the value, another encoding, a
    BOM - goes through json.loads itself, so what is accepted and refused is unchanged."""
    try:
        text = raw.decode()
        obj, end = _DECODER.raw_decode(text)
        if end == len(text):
            return obj
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        pass
    return json.loads(raw)


def quarantine(path: Path, dir_fd: Optional[int] = None) -> Optional[Path]:
    """Move an untrustworthy file aside as ``<name>.bad`` (one kept) so it stops being read."""
    target = path.with_name(path.name + ".bad")
    try:
        if dir_fd is None:
            os.replace(path, target)
        else:
            os.replace(path.name, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return target


# --------------------------------------------------------------------------------------------
# Messages


def _num(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[float]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT <= value <= MAX_INT:
        raise ChannelError(f"field {key!r} is out of range (magnitude over {MAX_INT})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ChannelError(f"field {key!r} is {value!r}, expected a finite number")
    return float(value)


def _int(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[int]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChannelError(f"field {key!r} is {value!r}, expected an integer")
    if not -MAX_INT <= value <= MAX_INT:
        raise ChannelError(f"field {key!r} is out of range (magnitude over {MAX_INT})")
    return value


def _str(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[str]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ChannelError(f"field {key!r} is {value!r}, expected a string")
    return value


_RID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_RID_CHARS}}}")


def _rid(obj: Mapping[str, Any], key: str) -> Optional[str]:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _RID.fullmatch(value):
        raise ChannelError(f"field {key!r} is not a request id (1-{MAX_RID_CHARS} characters "
                           "of A-Z a-z 0-9 . _ : -)")
    return value


def new_rid_prefix() -> str:
    """A random prefix for request ids: one per daemon state (``<prefix>.<seq>``)."""
    return _token_hex(8)


def _token_hex(nbytes: int) -> str:
    """``secrets.token_hex`` (it is ``os.urandom(n).hex()``) without importing ``secrets``: that
    pulls in hmac and OpenSSL's libcrypto, ~3.5 MB of every command's RSS (issue 17)."""
    return os.urandom(nbytes).hex()


@dataclass(frozen=True)
class Request:
    """A daemon -> trainer request. ``deadline`` and ``issued`` are wall-clock epoch seconds."""

    seq: int
    action: str  # "checkpoint" | "stop"
    reason: str
    deadline: Optional[float]
    issued: float
    # The request's identity across sessions and daemons (seq restarts with a new daemon
    # state; a stale acked_seq of a previous session must not acknowledge a new request, #18).
    # The trainer echoes it as ``acked_rid``. None: a request from an older daemon.
    rid: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        obj = {"v": SCHEMA_VERSION, **asdict(self)}
        if self.rid is None:
            del obj["rid"]
        return obj

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
            rid=_rid(obj, "rid"),
        )


class DaemonBusyError(RuntimeError):
    """Another watchdog already holds this run directory (raised by daemon.Watchdog)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the trainer reports about a committed checkpoint."""

    path: str
    seq: Optional[int]  # the request this checkpoint answered; None for periodic/own saves
    step: int
    at: float
    duration_s: float
    bytes: int
    sha256: str  # checkpoints written before checksums; "" for newer ones
    checksum: str = ""  # "<algorithm>:<hex>" (session_watchdog/checksum.py): what verifies
    # When the trainer last read the file back from disk and found it whole, and the file's
    # mtime then: the end of the runtime checks size + mtime instead of re-reading it (issue 17).
    verified_at: Optional[float] = None
    mtime_ns: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.checksum and self.sha256:
            object.__setattr__(self, "checksum", f"sha256:{self.sha256}")

    def to_json(self) -> Dict[str, Any]:
        """The ``last_checkpoint`` object: a sha256 as before checksums, unset fields omitted."""
        obj = asdict(self)
        if self.checksum == f"sha256:{self.sha256}":
            del obj["checksum"]
        for key in ("verified_at", "mtime_ns"):
            if obj[key] is None:
                del obj[key]
        return obj

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
            sha256=_str(obj, "sha256", optional="checksum" in obj) or "",
            checksum=_str(obj, "checksum", optional=True) or "",
            verified_at=_num(obj, "verified_at", optional=True),
            mtime_ns=_mtime_ns(obj),
        )


def _mtime_ns(obj: Mapping[str, Any]) -> Optional[int]:
    """A file's st_mtime_ns: nanoseconds since 1970 exceed the bound of other integers."""
    value = obj.get("mtime_ns")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ChannelError(f"field 'mtime_ns' is {value!r}, expected nanoseconds since 1970")
    return value


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
    # The rid of the request ``acked_seq`` answered ("" before any); None: an older trainer that
    # does not echo rids (the daemon then falls back to seq, see policy.decide).
    acked_rid: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        obj = asdict(self)
        obj["v"] = SCHEMA_VERSION
        if self.acked_rid is None:
            del obj["acked_rid"]
        if self.last_checkpoint is not None:
            obj["last_checkpoint"] = self.last_checkpoint.to_json()
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TrainerStatus:
        """The status in ``obj``; raises ChannelError naming the first bad field."""
        # The common case - every field of its plain type and in range - in one pass, without a
        # validator call per field: trainer.json is parsed on every tick, with caches gone cold
        # in between (issue 17). Anything else goes through the checks, which say what is wrong
        # (tests/test_channel.py checks that both ways agree).
        get = obj.get
        pid, step, epoch, acked = get("pid"), get("step"), get("epoch"), get("acked_seq")
        start, beat, step_time = get("start_time"), get("heartbeat"), get("step_time_s")
        state, extra, rid = get("state"), get("extra"), get("acked_rid")
        if (type(pid) is int and type(step) is int and type(epoch) is int and type(acked) is int
                and -MAX_INT <= min(pid, step, epoch, acked)
                and max(pid, step, epoch, acked) <= MAX_INT
                and type(start) is float and start - start == 0.0  # finite: not inf, not NaN
                and type(beat) is float and beat - beat == 0.0
                and (step_time is None or type(step_time) is float and step_time - step_time == 0.0)
                and type(state) is str and state in TRAINER_STATES
                and (extra is None or type(extra) is dict)
                and (rid is None or type(rid) is str and (rid == "" or _RID.fullmatch(rid)))):
            return cls(pid=pid, start_time=start or 0.0, state=state, step=step, epoch=epoch,
                       step_time_s=step_time, acked_seq=acked,
                       last_checkpoint=CheckpointInfo.from_json(get("last_checkpoint")),
                       heartbeat=beat or 0.0, extra=extra or {}, acked_rid=rid)
        return cls._checked(obj)

    @classmethod
    def _checked(cls, obj: Mapping[str, Any]) -> TrainerStatus:
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
            acked_rid=None if obj.get("acked_rid") is None else (
                "" if obj.get("acked_rid") == "" else _rid(obj, "acked_rid")),
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
    last_checksum: Optional[str] = None  # "<algorithm>:<hex>"; from last_sha256 for old records

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
                last_checksum=_str(last, "checksum", optional=True) or (
                    f"sha256:{last['sha256']}" if isinstance(last.get("sha256"), str) else None),
            )
        except ChannelError:
            return None


class RunDir:
    """Typed access to one run directory (both sides use it).

    ``create=True`` checks (or creates) the directory and holds it open (``fd``): every file
    this object reads, writes or locks is then opened relative to that descriptor (openat), so
    a directory swapped in at ``path`` after the check changes nothing (#18). ``file()`` still
    returns the plain path, for messages and for callers outside the protocol.
    """

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = ensure_run_dir(Path(path)) if create else Path(path)
        self._files: Dict[str, Path] = {}
        self.fd: Optional[int] = _open_checked_dir(self.path) if create else None
        if self.fd is not None:
            weakref.finalize(self, os.close, self.fd)

    def file(self, name: str) -> Path:
        found = self._files.get(name)  # the daemon asks for the same few names every tick
        if found is None:
            found = self._files[name] = self.path / name
        return found

    # any protocol file, relative to the held directory
    def read(self, name: str, max_bytes: int = MAX_FILE_BYTES) -> Optional[Dict[str, Any]]:
        return read_json(self.file(name), max_bytes, dir_fd=self.fd)

    def write(self, name: str, obj: Mapping[str, Any]) -> None:
        write_json(self.file(name), obj, dir_fd=self.fd)

    def quarantine(self, name: str) -> Optional[Path]:
        return quarantine(self.file(name), dir_fd=self.fd)

    def lock(self, name: str, *, shared: bool = False) -> FileLock:
        lock = FileLock(self.file(name), shared=shared, dir_fd=self.fd)
        lock.dir_owner = self  # the descriptor must outlive the lock
        return lock

    def lock_held(self, name: str) -> bool:
        path = self.file(name)
        return _lock_held(name if self.fd is not None else path, self.fd, path)

    # requests
    def write_request(self, request: Request) -> None:
        self.write(REQUEST_FILE, request.to_json())

    def read_request(self) -> Optional[Request]:
        """The current request, or None. Raises ChannelError when it is malformed."""
        obj = self.read(REQUEST_FILE)
        return None if obj is None else Request.from_json(obj)

    # trainer status
    def write_status(self, status: TrainerStatus) -> None:
        self.write(TRAINER_FILE, status.to_json())

    def read_status(self) -> Optional[TrainerStatus]:
        """The trainer's status, or None. Raises ChannelError when it is malformed."""
        obj = self.read(TRAINER_FILE)
        return None if obj is None else TrainerStatus.from_json(obj)

    # liveness
    def trainer_alive(self) -> bool:
        """True while some process holds ``run.lock`` (the kernel drops it when it dies)."""
        return self.lock_held(RUN_LOCK)

    def trainer_saving(self) -> bool:
        """True while a checkpoint is being written (``save.lock`` held)."""
        return self.lock_held(SAVE_LOCK)


def _open_checked_dir(path: Path) -> int:
    """Open the run dir (O_DIRECTORY|O_NOFOLLOW) and check what was opened, not the name."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RunDirError(f"run dir {path} is a symlink or not a directory; choose another "
                              "--run-dir") from err
        raise RunDirError(f"cannot open run dir {path}: {_why(err)}") from err
    try:
        check_run_dir_stat(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------------------------------
# Locks (flock: per open file description, released by the kernel when the holder dies)


def _open_lock_file(path: Path, dir_fd: Optional[int] = None) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        if dir_fd is not None:
            return os.open(os.path.basename(path), flags, 0o600, dir_fd=dir_fd)
        return os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ChannelError(f"{path} is a symlink; refusing to lock it") from err
        raise


class FileLock:
    """An flock on ``path``; ``acquire`` returns False instead of blocking when ``blocking`` is off."""

    def __init__(self, path: Path, *, shared: bool = False, dir_fd: Optional[int] = None) -> None:
        self.path = path if isinstance(path, Path) else Path(path)  # Path(a Path) parses it again
        self.shared = shared
        self.dir_fd = dir_fd  # open path's name in this directory (openat), see RunDir.lock
        self.dir_owner: Any = None
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        if self._fd is not None:
            return True
        fd = _open_lock_file(self.path, self.dir_fd)
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


def lock_held(path: Path, dir_fd: Optional[int] = None) -> bool:
    """Whether another open file description holds any flock on ``path`` (non-blocking probe)."""
    return _lock_held(os.path.basename(path) if dir_fd is not None else path, dir_fd, path)


_PROBE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _exists(name: Any, dir_fd: Optional[int]) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except (OSError, ValueError):
        return False
    return True


def _lock_held(name: Any, dir_fd: Optional[int], path: Path) -> bool:
    """:func:`lock_held` of ``name`` (in ``dir_fd`` when given; ``path`` for messages).

    What ``FileLock(path).acquire(blocking=False)`` and ``release()`` do, less a lock object and
    less a separate existence test: the daemon probes two locks on every tick, and with caches
    gone cold between ticks each Python call and system call costs several times its warm
    price (issue 17).
    """
    # Opened without O_CREAT: a missing lock file (no trainer, or not saving) is not held, and
    # the probe leaves none behind. O_NOFOLLOW refuses a symlink, a dangling one included.
    try:
        fd = os.open(name, _PROBE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except ValueError:  # a NUL in the name: no such lock
        return False
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ChannelError(f"{path} is a symlink; refusing to lock it") from err
        if err.errno in (errno.ENOTDIR, errno.ENAMETOOLONG) or (
                err.errno == errno.EACCES and not _exists(name, dir_fd)):
            return False  # no such lock file (a parent that is not a directory or not ours)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        # unlocked before the close: a child forked meanwhile (its copy of the descriptor
        # lives until its exec) must not keep the lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
