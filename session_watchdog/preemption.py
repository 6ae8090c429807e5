"""Preemption notices: deadlines the platform announces, polled on a slower cadence than the tick.

A :class:`Notice` is a deadline, not an alarm: "this machine (or job) ends at ``deadline``". The
daemon treats the earliest notice deadline as the session deadline, and the policy's lead time
does the rest (checkpoint at ``deadline - lead``, stop at ``deadline - stop_lead``).

Sources:

- :class:`AwsSpotPoller`: EC2 spot interruption notice, IMDSv2, about two minutes ahead
  (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html).
- :class:`GcpPreemptionPoller`: GCE preemptible / Spot VM, ``instance/preempted``, about 30 s
  ahead (https://cloud.google.com/compute/docs/instances/spot#preemption-process).
- :class:`SlurmPoller`: the job's time limit as ``squeue %L`` reports it (catches a limit changed
  by ``scontrol update`` after the daemon started).
- :class:`SignalNotice`: the signal SLURM sends ahead of the limit with ``--signal=B:USR1@300``.

Every poller's ``poll(now)`` never raises and is bounded (``timeout_s`` per HTTP request or
subprocess). A poll that fails (service unreachable, timeout, bad answer) returns the poller's last
known notice, since a failure says nothing new and a deadline once announced stays true, and backs
off (10 s doubling to 60 s) so a poller on the wrong cloud costs little. HTTP uses only the
standard library, ignores proxy variables and refuses redirects, so a metadata token is sent to
``base_url`` and nowhere else.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Set

from session_watchdog.log import get_logger
from session_watchdog.platforms import parse_slurm_duration

log = get_logger()

AWS_NOTICE_S = 120.0  # "a two-minute warning" when the notice's own time cannot be read
GCP_NOTICE_S = 30.0  # GCE sends ACPI soft-off and gives ~30 s before the hard stop
MAX_BODY_BYTES = 64 * 1024  # metadata answers are tiny; a larger one is not the metadata service


@dataclass(frozen=True)
class Notice:
    """A deadline announced by the platform."""

    source: str  # aws-spot | gcp | slurm | slurm-signal
    deadline: Optional[float]  # wall-clock epoch seconds; None: announced, time unknown (= now)
    detail: str


class Poller(Protocol):
    """Something that may know a deadline. ``poll`` never raises and returns within seconds."""

    name: str

    def poll(self, now: float) -> Optional[Notice]: ...


class PollFailed(Exception):
    """A poll that learned nothing (unreachable, timeout, unexpected answer); never escapes poll()."""


class _BackoffPoller:
    """Shared poll() logic: keep the last notice on failure, back off, log a failure streak once."""

    name = "poller"

    def __init__(self, *, retry_s: float = 10.0, max_backoff_s: float = 60.0,
                 refresh_s: float = 0.0) -> None:
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self.refresh_s = refresh_s  # a successful answer stays good this long (0: ask every poll)
        self.notice: Optional[Notice] = None  # the last known answer
        self.failures = 0  # consecutive
        self._next_try: Optional[float] = None

    def poll(self, now: float) -> Optional[Notice]:
        # A wall clock that jumped back (NTP) must not freeze the poller until it catches up.
        if self._next_try is not None and now < self._next_try and \
                self._next_try - now <= max(self.max_backoff_s, self.refresh_s):
            return self.notice
        try:
            notice = self._fetch(now)
        except PollFailed as err:
            self.failures += 1
            doublings = min(self.failures - 1, 16)  # 2 ** 1024 would overflow a float
            self._next_try = now + min(self.max_backoff_s, self.retry_s * 2 ** doublings)
            if self.failures == 1:
                log.warning("preemption_poll_failed", poller=self.name, error=str(err),
                            retry_s=round(self._next_try - now, 1))
            return self.notice
        if self.failures:
            log.info("preemption_poll_recovered", poller=self.name, failures=self.failures)
        self.failures = 0
        self._next_try = now + self.refresh_s if self.refresh_s else None
        self.notice = notice
        return notice

    def _fetch(self, now: float) -> Optional[Notice]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# HTTP: standard library only, bounded, no proxies, no redirects


_openers: List[Any] = []  # built at the first request: urllib.request pulls in ssl, http, email


def _opener() -> Any:
    """The opener every metadata request uses (imported lazily: ~7 MB of a daemon that may never
    poll a cloud, issue 17)."""
    if not _openers:
        import urllib.request

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                                 newurl: str) -> None:
                # Returning None makes urllib raise HTTPError(3xx): the token never follows a
                # redirect.
                return None

        # ProxyHandler({}) ignores http_proxy/HTTP_PROXY: a metadata request (and its token)
        # must go to the link-local service itself, never to a proxy (botocore does the same).
        _openers.append(urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect))
    return _openers[0]


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: Mapping[str, str]


def http_request(method: str, url: str, headers: Mapping[str, str], timeout_s: float) -> HttpAnswer:
    """One request; any HTTP status is an answer, no answer within ``timeout_s`` is PollFailed.

    ``timeout_s`` bounds the connect and every read, and the body is read against a deadline of
    ``timeout_s`` after the request started (a server that trickles bytes is cut off).
    """
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    opener = _opener()
    data = b"" if method in ("PUT", "POST") else None
    request = urllib.request.Request(url, data=data, headers=dict(headers), method=method)
    deadline = time.monotonic() + timeout_s
    try:
        response = opener.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        return HttpAnswer(err.code, b"", dict(err.headers or {}))
    except (urllib.error.URLError, OSError, HTTPException, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise PollFailed(f"{method} {url}: {type(reason).__name__}: {reason}") from err
    with response:
        chunks: List[bytes] = []
        size = 0
        try:
            while True:
                chunk = response.read1(4096)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise PollFailed(f"{method} {url}: answer larger than {MAX_BODY_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise PollFailed(f"{method} {url}: answer not complete within {timeout_s:g}s")
        except (OSError, HTTPException) as err:
            raise PollFailed(f"{method} {url}: {type(err).__name__}: {err}") from err
        return HttpAnswer(response.status, b"".join(chunks), dict(response.headers))


def _base_url(raw: str) -> str:
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment \
            or parts.path not in ("", "/"):
        raise ValueError(f"base_url={raw!r} is invalid: expected http://HOST[:PORT]")
    return f"{parts.scheme}://{parts.netloc}"


# --------------------------------------------------------------------------------------------
# AWS EC2 spot


def parse_aws_time(text: str) -> float:
    """``2026-11-22T17:02:00Z`` -> epoch seconds (UTC)."""
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"  # fromisoformat accepts "Z" only from Python 3.11
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class AwsSpotPoller(_BackoffPoller):
    """EC2 spot interruption notice via IMDSv2 (``curl`` equivalent below).

    ``TOKEN=$(curl -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600"
    http://169.254.169.254/latest/api/token)``, then
    ``curl -H "X-aws-ec2-metadata-token: $TOKEN"
    http://169.254.169.254/latest/meta-data/spot/instance-action``: 404 while there is no notice,
    200 ``{"action": "terminate", "time": "2026-11-22T17:02:00Z"}`` once there is. The token is
    cached until a minute before it expires; a 401 fetches a new one and retries once. Inside a
    container the PUT answer can be dropped by the IMDS hop limit (default 1): that reads as a
    timeout, i.e. no notice.
    """

    name = "aws-spot"
    TOKEN_TTL_S = 21600
    TOKEN_PATH = "/latest/api/token"
    ACTION_PATH = "/latest/meta-data/spot/instance-action"

    def __init__(self, base_url: str = "http://169.254.169.254", timeout_s: float = 1.0,
                 **backoff: float) -> None:
        super().__init__(**backoff)
        self.base_url = _base_url(base_url)
        self.timeout_s = timeout_s
        self._token: Optional[str] = None
        self._token_until = 0.0  # wall clock; refresh a minute early

    def _get_token(self, now: float) -> str:
        if self._token is not None and now < self._token_until:
            return self._token
        answer = http_request("PUT", self.base_url + self.TOKEN_PATH,
                              {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
                              self.timeout_s)
        token = answer.body.decode("ascii", "replace").strip()
        if answer.status != 200 or not token or not token.isprintable():
            raise PollFailed(f"IMDSv2 token request answered HTTP {answer.status}")
        self._token, self._token_until = token, now + self.TOKEN_TTL_S - 60
        return token

    def _get_action(self, token: str) -> HttpAnswer:
        return http_request("GET", self.base_url + self.ACTION_PATH,
                            {"X-aws-ec2-metadata-token": token}, self.timeout_s)

    def _fetch(self, now: float) -> Optional[Notice]:
        answer = self._get_action(self._get_token(now))
        if answer.status == 401:  # token expired or revoked early: one fresh token, one retry
            self._token = None
            answer = self._get_action(self._get_token(now))
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise PollFailed(f"spot/instance-action answered HTTP {answer.status}")
        try:
            obj = json.loads(answer.body.decode("utf-8"))
            action, when = str(obj["action"]), str(obj["time"])
        except (ValueError, KeyError, TypeError):
            raise PollFailed(f"spot/instance-action answered {answer.body[:80]!r}") from None
        try:
            deadline = parse_aws_time(when)
        except ValueError:
            # A notice we cannot time is still a notice: keep the first estimate, do not slide it.
            known = self.notice
            deadline = known.deadline if known and known.deadline else now + AWS_NOTICE_S
        return Notice(self.name, deadline, f"spot instance-action: {action} at {when}")


# --------------------------------------------------------------------------------------------
# Google Compute Engine


class GcpPreemptionPoller(_BackoffPoller):
    """GCE preemptible / Spot VM notice.

    ``curl -H "Metadata-Flavor: Google"
    http://metadata.google.internal/computeMetadata/v1/instance/preempted``: ``FALSE``, then
    ``TRUE`` once preemption has begun (about 30 s before the hard stop). The answer must carry
    ``Metadata-Flavor: Google`` itself, as google-auth's metadata check requires, so that some
    other server answering on that name is not believed. The deadline is fixed when ``TRUE`` is
    first seen.
    """

    name = "gcp"
    PATH = "/computeMetadata/v1/instance/preempted"

    def __init__(self, base_url: str = "http://metadata.google.internal", timeout_s: float = 1.0,
                 notice_s: float = GCP_NOTICE_S, **backoff: float) -> None:
        super().__init__(**backoff)
        self.base_url = _base_url(base_url)
        self.timeout_s = timeout_s
        self.notice_s = notice_s

    def _fetch(self, now: float) -> Optional[Notice]:
        answer = http_request("GET", self.base_url + self.PATH, {"Metadata-Flavor": "Google"},
                              self.timeout_s)
        if answer.status != 200:
            raise PollFailed(f"instance/preempted answered HTTP {answer.status}")
        flavor = {k.lower(): v for k, v in answer.headers.items()}.get("metadata-flavor")
        if flavor != "Google":
            raise PollFailed("instance/preempted answer lacks 'Metadata-Flavor: Google'; "
                             "not the GCE metadata server")
        text = answer.body.decode("ascii", "replace").strip().upper()
        if text == "FALSE":
            return None
        if text != "TRUE":
            raise PollFailed(f"instance/preempted answered {answer.body[:80]!r}")
        if self.notice is not None:
            return self.notice
        return Notice(self.name, now + self.notice_s, "instance preempted")


# --------------------------------------------------------------------------------------------
# SLURM


_JOB_ID = re.compile(r"\d+(?:[_+]\d+)?")
_NO_LIMIT = ("UNLIMITED", "NOT_SET", "INFINITE")


class SlurmPoller(_BackoffPoller):
    """The job's end as SLURM sees it: ``squeue -h -j JOB -o %L`` (time left).

    Semantics: whenever the time left is known, the notice is ``deadline = now + left`` with
    detail ``time limit``; an unlimited job (``UNLIMITED`` / ``NOT_SET``) has no notice. This is a
    deadline, not an alarm: the policy's lead time decides when to checkpoint. squeue is an RPC to
    slurmctld, which every node of a large job would otherwise hammer, so a successful answer is
    reused for ``refresh_s`` (default 5 min); the deadline is absolute, so reuse is exact unless
    someone changes the limit meanwhile.
    """

    name = "slurm"

    def __init__(self, job_id: str, run: Callable[..., Any] = subprocess.run,
                 timeout_s: float = 5.0, refresh_s: float = 300.0, **backoff: float) -> None:
        super().__init__(refresh_s=refresh_s, **backoff)
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"SlurmPoller(job_id={job_id!r}) is invalid: expected 1234, 1234_5 "
                             "or 1234+0")
        self.job_id = job_id
        self.run = run
        self.timeout_s = timeout_s

    def _fetch(self, now: float) -> Optional[Notice]:
        try:
            done = self.run(["squeue", "-h", "-j", self.job_id, "-o", "%L"], capture_output=True,
                            text=True, timeout=self.timeout_s, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            raise PollFailed(f"squeue: {type(err).__name__}: {err}") from err
        lines = [line.strip() for line in (done.stdout or "").splitlines() if line.strip()]
        if done.returncode != 0 or not lines:
            error = (done.stderr or "").strip().splitlines()[:1]
            raise PollFailed(f"squeue exited {done.returncode}: {error[0] if error else 'no output'}")
        text = lines[0]  # a heterogeneous job lists one line per component; they end together
        if text.upper() in _NO_LIMIT:
            return None
        left = parse_slurm_duration(text)
        if left is None:
            raise PollFailed(f"squeue %L answered {text[:40]!r}")
        return Notice(self.name, now + left, "time limit")


class SignalNotice:
    """The signal SLURM sends ahead of the time limit (``sbatch --signal=B:USR1@300``).

    The handler only records when the signal came (STYLE.md #6); ``poll`` then returns
    ``Notice("slurm-signal", deadline=signalled_at + grace_s)`` on every call. ``grace_s`` is the
    ``@300`` of ``--signal``. SLURM may send the signal up to 60 s earlier than asked (the
    resolution of its event handling, sbatch(1)), so the deadline errs on the early, safe side.
    """

    name = "slurm-signal"

    def __init__(self, grace_s: float = 300.0, source: str = "slurm-signal",
                 clock: Callable[[], float] = time.time) -> None:
        if not grace_s > 0:
            raise ValueError(f"SignalNotice(grace_s={grace_s!r}) is invalid: expected seconds > 0")
        self.grace_s = grace_s
        self.source = source
        self.name = source
        self._clock = clock
        self.signalled_at: Optional[float] = None
        self.signum: Optional[int] = None

    @property
    def is_set(self) -> bool:
        return self.signalled_at is not None

    def set(self, signum: Optional[int] = None, frame: Any = None) -> None:
        """Record the notice; usable as a signal handler. The first signal counts."""
        if self.signalled_at is None:
            self.signum = signum
            self.signalled_at = self._clock()

    def poll(self, now: float) -> Optional[Notice]:
        at = self.signalled_at
        if at is None:
            return None
        name = _signal_name(self.signum)
        return Notice(self.source, at + self.grace_s, f"{name} received; {self.grace_s:g}s grace")

    def install(self, signums: Sequence[int] = (signal.SIGUSR1,)) -> Callable[[], None]:
        """Handle ``signums`` (main thread only); returns a function that restores the old handlers.

        A previous Python handler is called after ours (chained); a default or ignored
        disposition is replaced. Note that SIGUSR1's default action kills the process, so a
        daemon under ``--signal=USR1`` must install this before the job can send it.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SignalNotice.install() must be called from the main thread")
        previous: Dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            self.set(signum, frame)
            before = previous.get(signum)
            if callable(before):
                before(signum, frame)

        for signum in signums:
            previous[signum] = signal.signal(signum, handler)

        def restore() -> None:
            for signum, before in previous.items():
                signal.signal(signum, before if before is not None else signal.SIG_DFL)

        return restore


def _signal_name(signum: Optional[int]) -> str:
    try:
        return signal.Signals(signum).name if signum else "signal"
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------------------------
# Which cloud, and the watch over all pollers


def detect_cloud(root: Path = Path("/")) -> Optional[str]:
    """``"aws"`` / ``"gcp"`` from the DMI strings the hypervisor sets, else None (no network)."""
    def read(name: str) -> str:
        try:
            return (root / "sys/class/dmi/id" / name).read_text(errors="replace").strip()
        except OSError:
            return ""

    vendor, product, board = read("sys_vendor"), read("product_name"), read("board_vendor")
    if "Amazon EC2" in (vendor, board) or product.startswith("Amazon EC2"):
        return "aws"
    if product == "Google Compute Engine" or vendor == "Google":
        return "gcp"
    return None


class PreemptionWatch:
    """All pollers of this host; :meth:`poll` is the scheduler job, :attr:`latest` the answer.

    The earliest deadline wins (a notice without a time counts as now). A poller that raises
    despite its contract is logged once and counts as "no new answer"; the others still run.
    Notices appearing, moving by more than ``log_move_s`` or going away are logged.
    """

    def __init__(self, pollers: Sequence[Poller], log_move_s: float = 60.0) -> None:
        self.pollers = list(pollers)
        self.log_move_s = log_move_s
        self.latest: Optional[Notice] = None
        self._by_poller: Dict[str, Optional[Notice]] = {p.name: None for p in self.pollers}
        self._logged: Dict[str, Optional[Notice]] = {p.name: None for p in self.pollers}
        self._broken: Set[str] = set()
        self._lock = threading.Lock()

    def poll(self, now: float) -> Optional[Notice]:
        with self._lock:
            for poller in self.pollers:
                try:
                    notice = poller.poll(now)
                except Exception as err:  # a poller bug must not hide the other pollers
                    if poller.name not in self._broken:
                        self._broken.add(poller.name)
                        log.error("preemption_poller_raised", poller=poller.name,
                                  error=f"{type(err).__name__}: {err}")
                    continue
                self._by_poller[poller.name] = notice
                self._log_change(poller.name, notice, now)
            notices = [n for n in self._by_poller.values() if n is not None]
            self.latest = min(notices, key=lambda n: now if n.deadline is None else n.deadline,
                              default=None)
            return self.latest

    def _log_change(self, name: str, notice: Optional[Notice], now: float) -> None:
        before = self._logged[name]
        if notice is None:
            if before is not None:
                log.info("preemption_cleared", poller=name, source=before.source)
                self._logged[name] = None
            return
        moved = before is None or before.source != notice.source or (
            (before.deadline is None) != (notice.deadline is None)) or (
            before.deadline is not None and notice.deadline is not None
            and abs(before.deadline - notice.deadline) > self.log_move_s)
        if moved:
            self._logged[name] = notice
            log.warning("preemption_notice", poller=name, source=notice.source,
                        deadline=notice.deadline, detail=notice.detail,
                        remaining_s=None if notice.deadline is None
                        else round(notice.deadline - now, 1))


def build_pollers(kinds: Sequence[str], *, slurm_job_id: Optional[str] = None,
                  signal_notice: Optional[SignalNotice] = None,
                  timeout_s: float = 1.0, root: Path = Path("/")) -> List[Poller]:
    """Pollers by name: ``aws``, ``gcp``, ``slurm`` (needs ``slurm_job_id``), ``auto``.

    ``auto`` is the cloud :func:`detect_cloud` names plus ``slurm`` inside a SLURM job. A
    ``signal_notice`` (installed by the CLI) is always included.
    """
    wanted = set(kinds)
    if "auto" in wanted:
        wanted.discard("auto")
        cloud = detect_cloud(root)
        if cloud:
            wanted.add(cloud)
        if slurm_job_id:
            wanted.add("slurm")
    unknown = wanted - {"aws", "gcp", "slurm"}
    if unknown:
        raise ValueError(f"unknown preemption source(s) {', '.join(sorted(unknown))}: "
                         "expected aws, gcp, slurm or auto")
    pollers: List[Poller] = []
    if "aws" in wanted:
        pollers.append(AwsSpotPoller(timeout_s=timeout_s))
    if "gcp" in wanted:
        pollers.append(GcpPreemptionPoller(timeout_s=timeout_s))
    if "slurm" in wanted:
        if not slurm_job_id:
            raise ValueError("preemption source slurm needs a SLURM job id (SLURM_JOB_ID)")
        pollers.append(SlurmPoller(slurm_job_id))
    if signal_notice is not None:
        pollers.append(signal_notice)
    return pollers
