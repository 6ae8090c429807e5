"""Checksums of checkpoint files: ``"<algorithm>:<hex>"`` strings, computed at memory speed.

A checkpoint's checksum guards against torn, truncated or changed files, not against an attacker
(who could rewrite the marker as well), so it need not be cryptographic. sha256 runs at 0.7-1.5
GB/s on one core, slower than a disk takes the bytes: it cost a 1 GiB save more than the write
itself (issue 17). CRC32C (the ``crc32c`` package: SSE4.2/ARMv8 instructions, GIL released) runs
at 10+ GB/s. Without that package, zlib's CRC-32 (stdlib, GIL released) is used. Records written
before this module (markers, ``trainer.json``) carry a bare ``"sha256"`` field; they still verify,
read as ``"sha256:<hex>"``. sha256 stays where a digest names content (shared-memory snapshot
slots, directory commits of the integrations).

Daemon side too: no torch here, and the optional package is imported only when used.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Dict, Mapping, Optional, Tuple, Union

__all__ = ["CHUNK", "ChecksumError", "for_record", "new", "normalize", "of_file", "of_stream",
           "parse", "preferred", "record_fields", "valid"]

CHUNK = 8 << 20  # read size when checksumming a file: large enough to keep the disk streaming
_FORMS = {"crc32c": re.compile(r"[0-9a-f]{8}"), "crc32": re.compile(r"[0-9a-f]{8}"),
          "sha256": re.compile(r"[0-9a-f]{64}")}


class ChecksumError(ValueError):
    """A checksum string that is malformed or names an algorithm this install cannot compute."""


class _Crc:
    """A hashlib-like running CRC over ``fn(data, crc) -> crc``."""

    def __init__(self, fn: Callable[[Any, int], int]) -> None:
        self._fn = fn
        self._value = 0

    def update(self, data: Any) -> None:
        self._value = self._fn(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value & 0xFFFFFFFF:08x}"


Hasher = Any  # a _Crc or a hashlib object: update(bytes-like), hexdigest()


def _crc32c_module() -> Any:
    try:
        import crc32c
    except ImportError:
        return None
    return crc32c


def preferred() -> str:
    """The algorithm new checkpoints use: ``crc32c`` with its package installed, else ``crc32``."""
    return "crc32c" if _crc32c_module() is not None else "crc32"


def new(algorithm: str) -> Hasher:
    """A running checksum with ``update(bytes-like)`` and ``hexdigest()``.

    Raises:
        ChecksumError: an unknown algorithm, or crc32c without its package.
    """
    if algorithm == "crc32c":
        module = _crc32c_module()
        if module is None:
            raise ChecksumError("this checkpoint's checksum is crc32c; install the crc32c package "
                                "(pip install 'session-watchdog[torch]') to verify it")
        function = module.crc32c
        return _Crc(lambda data, value: int(function(data, value)))
    if algorithm == "crc32":
        return _Crc(zlib.crc32)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ChecksumError(f"unknown checksum algorithm {algorithm!r}")


def parse(text: str) -> Tuple[str, str]:
    """``(algorithm, hex)`` of ``"crc32c:1a2b3c4d"``; a bare 64-digit hex is a sha256 (old records).

    Raises:
        ChecksumError: anything else (truncated, upper-case, unknown algorithm).
    """
    if not isinstance(text, str):
        raise ChecksumError(f"{text!r} is not a checksum")
    algorithm, sep, digest = text.partition(":")
    if not sep:
        algorithm, digest = "sha256", text
    form = _FORMS.get(algorithm)
    if form is None or not form.fullmatch(digest):
        raise ChecksumError(f"{text!r} is not a checksum")
    return algorithm, digest


def valid(text: Any) -> bool:
    """Whether ``text`` is a well-formed checksum string."""
    try:
        parse(text)
    except ChecksumError:
        return False
    return True


def normalize(text: str) -> str:
    """``text`` spelt ``"<algorithm>:<hex>"`` (a bare sha256 hex gains its prefix).

    Raises:
        ChecksumError: as :func:`parse`.
    """
    algorithm, digest = parse(text)
    return f"{algorithm}:{digest}"


def for_record(obj: Mapping[str, Any]) -> Optional[str]:
    """The checksum a marker or ``last_checkpoint`` object records, normalized: its ``checksum``
    field, or the ``sha256`` field of records written before checksums; None when it has neither
    or a malformed one."""
    value = obj.get("checksum")
    if value is None:
        old = obj.get("sha256")
        value = f"sha256:{old}" if isinstance(old, str) else None
    return normalize(value) if isinstance(value, str) and valid(value) else None


def record_fields(checksum: str) -> Dict[str, str]:
    """The JSON fields that record ``checksum``: ``{"checksum": "crc32c:<hex>"}``; a sha256 keeps
    the form that predates checksums, ``{"sha256": "<hex>"}``, which every reader knows."""
    algorithm, digest = parse(checksum)
    if algorithm == "sha256":
        return {"sha256": digest}
    return {"checksum": f"{algorithm}:{digest}"}


def of_stream(fh: IO[bytes], algorithm: str, limit: Optional[int] = None) -> Tuple[str, int]:
    """``("<algorithm>:<hex>", bytes read)`` of what ``fh`` (unbuffered) yields, in 8 MiB blocks,
    reading at most ``limit`` + 1 bytes when ``limit`` is given (one more shows a file that grew).

    Raises:
        OSError: a read failed. ChecksumError: as :func:`new`.
    """
    hasher = new(algorithm)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    left = None if limit is None else limit + 1
    total = 0
    while left is None or left > 0:
        count = fh.readinto(view if left is None or left >= CHUNK else view[:left])  # type: ignore[attr-defined]
        if not count:
            break
        hasher.update(view[:count])
        total += count
        if left is not None:
            left -= count
    return f"{algorithm}:{hasher.hexdigest()}", total


def open_regular(path: Union[str, Path]) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file: never follows a symlink, never
    blocks on a FIFO (O_NONBLOCK), refuses devices and directories (fstat after open).

    Raises:
        OSError: ELOOP for a symlink, EINVAL for anything but a regular file.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def of_file(path: Union[str, Path], algorithm: str, limit: Optional[int] = None, *,
            cold: bool = False) -> str:
    """The checksum of the regular file at ``path`` (see :func:`open_regular`), as
    ``"<algorithm>:<hex>"``; reads at most ``limit`` + 1 bytes when ``limit`` is given.

    ``cold``: first drop the file's clean cached pages (``POSIX_FADV_DONTNEED``, after an
    ``fdatasync`` so that all of them are clean), so what is checked is what the disk returns, not
    the copy in memory that was just written.

    Raises:
        OSError: the file cannot be read (or is not a regular file). ChecksumError: as :func:`new`.
    """
    with open_regular(path) as fh:
        if cold and hasattr(os, "posix_fadvise"):
            try:
                os.fdatasync(fh.fileno())
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only: some filesystems refuse it
                pass
        return of_stream(fh, algorithm, limit)[0]


def matches(path: Union[str, Path], checksum: str, limit: Optional[int] = None, *,
            cold: bool = False) -> bool:
    """Whether the file at ``path`` has ``checksum`` (any spelling :func:`parse` accepts).

    Raises:
        OSError, ChecksumError: as :func:`of_file`.
    """
    algorithm, _ = parse(checksum)
    return of_file(path, algorithm, limit, cold=cold) == normalize(checksum)
