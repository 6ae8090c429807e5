"""Preemption notices: real HTTP servers on 127.0.0.1 stand in for the AWS and GCP metadata
services; SLURM's squeue is a scripted ``run``; signals are real."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from structlog.testing import capture_logs

from session_watchdog.preemption import (
    MAX_BODY_BYTES,
    AwsSpotPoller,
    GcpPreemptionPoller,
    Notice,
    PollFailed,
    PreemptionWatch,
    SignalNotice,
    SlurmPoller,
    build_pollers,
    detect_cloud,
    http_request,
    parse_aws_time,
)

NOW = 1_795_366_800.0  # 2026-11-22T17:00:00Z
NOTICE_TIME = "2026-11-22T17:02:00Z"
NOTICE_EPOCH = 1_795_366_920.0
TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
GCP_PATH = "/computeMetadata/v1/instance/preempted"
# The fake servers run in this process: on a loaded machine an answer can take seconds, so polls
# that are not about timeouts wait this long (a timeout would read as a failed poll).
ANSWER_S = 60.0

Reply = Tuple[int, str, Dict[str, str]]  # status, body, headers


class FakeMetadata:
    """An HTTP server on 127.0.0.1:0 answering scripted replies per (method, path); records requests.

    A route's script is a list: each request takes the next reply, the last one repeats.
    A reply may also be a function of the request headers. Unknown routes answer 404.
    """

    def __init__(self) -> None:
        self.requests: List[Tuple[str, str, Dict[str, str]]] = []
        self.routes: Dict[Tuple[str, str], List[Any]] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append((self.command, self.path, headers))
                length = int(headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                script = fake.routes.get((self.command, self.path))
                reply: Any = (404, "", {})
                if script:
                    reply = script.pop(0) if len(script) > 1 else script[0]
                if callable(reply):
                    reply = reply(headers)
                status, body, extra = reply
                data = body.encode()
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def script(self, method: str, path: str, *replies: Any) -> None:
        self.routes[(method, path)] = list(replies)

    def calls(self) -> List[Tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def meta():
    server = FakeMetadata()
    yield server
    server.stop()


@pytest.fixture
def other():
    """A second server: where a redirect points, or a proxy that must not be used."""
    server = FakeMetadata()
    yield server
    server.stop()


@pytest.fixture
def closed_url():
    """A URL on a port nothing listens on: connection refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_url():
    """A URL whose server completes the TCP handshake (backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def aws(meta: FakeMetadata, *tokens: str) -> None:
    meta.script("PUT", TOKEN_PATH, *[(200, t, {}) for t in tokens or ("tok-1",)])


def gce(body: str, flavor: Optional[str] = "Google") -> Callable[[Dict[str, str]], Reply]:
    """A reply like the GCE metadata server's: 403 without the request header; the answer carries it."""
    def reply(headers: Dict[str, str]) -> Reply:
        if headers.get("metadata-flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.", {}
        return 200, body, {"Metadata-Flavor": flavor} if flavor else {}
    return reply


class TestNotice:
    def test_frozen(self):
        """A Notice is an immutable value."""
        notice = Notice("gcp", 10.0, "instance preempted")
        with pytest.raises(AttributeError):
            notice.deadline = 5.0  # type: ignore[misc]
        assert notice == Notice("gcp", 10.0, "instance preempted")


@pytest.fixture
def trickle_url():
    """A server that answers 200 with a 2000-byte body, one byte every 50 ms (never the whole body)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    sock.settimeout(5)

    def serve():
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(4096)
            try:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2000\r\n\r\n")
                for _ in range(1200):  # 60 s: only the client's deadline ends the request
                    conn.sendall(b"x")
                    time.sleep(0.05)
            except OSError:
                return  # the client gave up, as it should

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    thread.join(timeout=5)


class TestHttpRequest:
    def test_any_status_is_an_answer(self, meta):
        """An HTTP error status is returned as an answer, not raised."""
        meta.script("GET", "/x", (503, "busy", {"Retry-After": "1"}))
        answer = http_request("GET", meta.url + "/x", {}, ANSWER_S)
        assert answer.status == 503 and answer.headers["Retry-After"] == "1"

    def test_trickling_body_is_cut_off(self, trickle_url):
        """A body that trickles in is abandoned once timeout_s has passed since the request."""
        start = time.monotonic()
        with pytest.raises(PollFailed, match="not complete within 0.3s"):
            http_request("GET", trickle_url + "/x", {}, 0.3)
        assert time.monotonic() - start < 30.0  # the trickle alone would take 60 s

    def test_oversized_body_refused(self, meta):
        """An answer larger than MAX_BODY_BYTES is not the metadata service."""
        meta.script("GET", "/big", (200, "x" * (MAX_BODY_BYTES + 1), {}))
        with pytest.raises(PollFailed, match="larger than"):
            http_request("GET", meta.url + "/big", {}, ANSWER_S)


class TestParseAwsTime:
    @pytest.mark.parametrize("text, epoch", [
        (NOTICE_TIME, NOTICE_EPOCH), ("2026-11-22T17:02:00+00:00", NOTICE_EPOCH),
        ("2026-11-22T17:02:00", NOTICE_EPOCH), ("2015-01-05T18:02:00Z", 1420480920.0),
    ])
    def test_utc(self, text, epoch):
        """AWS's ISO 8601 times (Z or offset; naive read as UTC) become epoch seconds."""
        assert parse_aws_time(text) == epoch


class TestAwsSpotPoller:
    def test_token_then_action_no_notice(self, meta):
        """PUT the token request, then GET instance-action with the token; 404 means no notice."""
        aws(meta, "tok-1")
        assert AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert meta.calls() == [("PUT", TOKEN_PATH), ("GET", ACTION_PATH)]
        assert meta.requests[0][2]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
        assert meta.requests[1][2]["x-aws-ec2-metadata-token"] == "tok-1"
        assert "x-aws-ec2-metadata-token" not in meta.requests[0][2]

    def test_notice_with_exact_deadline(self, meta):
        """A 200 instance-action becomes Notice(aws-spot) with the notice's own time as deadline."""
        aws(meta)
        meta.script("GET", ACTION_PATH, (200, json.dumps({"action": "terminate", "time": NOTICE_TIME}), {}))
        assert AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) == Notice(
            "aws-spot", NOTICE_EPOCH, f"spot instance-action: terminate at {NOTICE_TIME}")

    @pytest.mark.parametrize("action", ["stop", "hibernate"])
    def test_other_actions(self, meta, action):
        """stop and hibernate are notices too, named in the detail."""
        aws(meta)
        meta.script("GET", ACTION_PATH, (200, json.dumps({"action": action, "time": NOTICE_TIME}), {}))
        notice = AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW)
        assert (notice.deadline, notice.detail) == (NOTICE_EPOCH, f"spot instance-action: {action} at {NOTICE_TIME}")

    def test_unreadable_time_means_two_minutes(self, meta):
        """A notice whose time cannot be parsed counts as AWS's two-minute warning, fixed when first seen."""
        aws(meta)
        meta.script("GET", ACTION_PATH, (200, '{"action": "terminate", "time": "soon"}', {}))
        poller = AwsSpotPoller(meta.url, timeout_s=ANSWER_S)
        assert poller.poll(NOW).deadline == NOW + 120
        assert poller.poll(NOW + 10).deadline == NOW + 120

    def test_token_is_cached_until_near_expiry(self, meta):
        """One token serves every poll until a minute before its 6 h TTL ends, then a new one is fetched."""
        aws(meta, "tok-1", "tok-2")
        poller = AwsSpotPoller(meta.url, timeout_s=ANSWER_S)
        for t in (0, 10, 21539):
            assert poller.poll(NOW + t) is None
        assert poller.poll(NOW + 21540) is None
        assert meta.calls() == [("PUT", TOKEN_PATH), ("GET", ACTION_PATH), ("GET", ACTION_PATH),
                                ("GET", ACTION_PATH), ("PUT", TOKEN_PATH), ("GET", ACTION_PATH)]
        assert [h["x-aws-ec2-metadata-token"] for m, _, h in meta.requests if m == "GET"] == [
            "tok-1", "tok-1", "tok-1", "tok-2"]

    def test_401_refreshes_token_once(self, meta):
        """A 401 fetches a new token and retries once with it."""
        aws(meta, "tok-1", "tok-2")
        meta.script("GET", ACTION_PATH, (401, "", {}), (404, "", {}))
        assert AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert meta.calls() == [("PUT", TOKEN_PATH), ("GET", ACTION_PATH),
                                ("PUT", TOKEN_PATH), ("GET", ACTION_PATH)]
        assert meta.requests[3][2]["x-aws-ec2-metadata-token"] == "tok-2"

    def test_401_twice_gives_up(self, meta):
        """A second 401 is a failed poll: no third request, no exception, no notice."""
        aws(meta, "tok-1", "tok-2", "tok-3")
        meta.script("GET", ACTION_PATH, (401, "", {}))
        with capture_logs() as logs:
            assert AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert len(meta.requests) == 4
        assert [e["event"] for e in logs] == ["preemption_poll_failed"]
        assert "HTTP 401" in logs[0]["error"] and "tok-" not in logs[0]["error"]

    def test_token_refused(self, meta):
        """A token request that is refused (IMDSv2 403) is a failed poll; the GET is not attempted."""
        meta.script("PUT", TOKEN_PATH, (403, "", {}))
        assert AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert meta.calls() == [("PUT", TOKEN_PATH)]

    def test_server_down_is_quick(self, closed_url):
        """Nothing listening: None at once, no exception, one warning."""
        start = time.monotonic()
        with capture_logs() as logs:
            assert AwsSpotPoller(closed_url, timeout_s=ANSWER_S).poll(NOW) is None
        assert time.monotonic() - start < ANSWER_S / 2  # refused, not timed out
        assert [(e["event"], e["poller"]) for e in logs] == [("preemption_poll_failed", "aws-spot")]

    def test_silent_server_times_out(self, silent_url):
        """A server that never answers costs one timeout, then None."""
        start = time.monotonic()
        assert AwsSpotPoller(silent_url, timeout_s=0.3).poll(NOW) is None
        assert 0.25 < time.monotonic() - start < 30.0  # the server itself never answers

    def test_failure_keeps_last_notice(self, meta):
        """Once announced, a notice survives a metadata service that stops answering."""
        aws(meta)
        meta.script("GET", ACTION_PATH, (200, json.dumps({"action": "stop", "time": NOTICE_TIME}), {}),
                    (500, "", {}))
        poller = AwsSpotPoller(meta.url, timeout_s=ANSWER_S)
        first = poller.poll(NOW)
        assert first is not None and poller.poll(NOW + 30) == first
        assert poller.failures == 1

    def test_backoff_after_failure(self, meta):
        """After a failure no request is made for retry_s, then doubling up to max_backoff_s."""
        meta.script("PUT", TOKEN_PATH, (500, "", {}))
        poller = AwsSpotPoller(meta.url, timeout_s=ANSWER_S, retry_s=10.0, max_backoff_s=30.0)
        asked = []
        for t in range(0, 120, 5):
            before = len(meta.requests)
            assert poller.poll(NOW + t) is None
            if len(meta.requests) > before:
                asked.append(t)
        # failures at 0 (wait 10), 10 (wait 20), 30 (wait 30, the cap), 60, 90
        assert asked == [0, 10, 30, 60, 90]

    def test_backoff_survives_days_of_failures(self, meta):
        """Thousands of consecutive failures keep the backoff at its cap (no float overflow)."""
        poller = AwsSpotPoller(meta.url, timeout_s=ANSWER_S, retry_s=10.0, max_backoff_s=60.0)
        poller.failures = 5000
        meta.script("PUT", TOKEN_PATH, (500, "", {}))
        assert poller.poll(NOW) is None
        assert poller.poll(NOW + 59) is None and len(meta.requests) == 1
        assert poller.poll(NOW + 60) is None and len(meta.requests) == 2

    def test_clock_jumping_back_does_not_freeze(self, meta):
        """A wall clock set back an hour after a failure does not postpone the next try by an hour."""
        meta.script("PUT", TOKEN_PATH, (500, "", {}))
        poller = AwsSpotPoller(meta.url, timeout_s=ANSWER_S, retry_s=10.0)
        poller.poll(NOW)
        poller.poll(NOW - 3600)
        assert len(meta.requests) == 2

    def test_recovers_after_backoff(self, meta):
        """A poll after the backoff that succeeds resets the failure count."""
        meta.script("PUT", TOKEN_PATH, (500, "", {}), (200, "tok-1", {}))
        poller = AwsSpotPoller(meta.url, timeout_s=ANSWER_S, retry_s=10.0)
        assert poller.poll(NOW) is None and poller.failures == 1
        assert poller.poll(NOW + 10) is None and poller.failures == 0
        assert meta.calls()[-1] == ("GET", ACTION_PATH)

    def test_redirect_not_followed(self, meta, other):
        """A redirect elsewhere is a failed poll; the token never reaches the other host."""
        aws(meta)
        meta.script("GET", ACTION_PATH, (302, "", {"Location": other.url + ACTION_PATH}))
        assert AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert other.requests == []

    def test_proxy_variables_ignored(self, meta, other, monkeypatch):
        """http_proxy is not used: the token goes to the metadata address itself."""
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, other.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        aws(meta)
        assert AwsSpotPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert meta.calls() == [("PUT", TOKEN_PATH), ("GET", ACTION_PATH)]
        assert other.requests == []

    @pytest.mark.parametrize("url", ["169.254.169.254", "ftp://x", "http://h/latest", "http://h?x=1"])
    def test_bad_base_url(self, url):
        """base_url must be http(s)://HOST[:PORT]."""
        with pytest.raises(ValueError, match="base_url"):
            AwsSpotPoller(url)


class TestGcpPreemptionPoller:
    def test_false_is_no_notice(self, meta):
        """FALSE: no notice; the request carries Metadata-Flavor: Google."""
        meta.script("GET", GCP_PATH, gce("FALSE"))
        assert GcpPreemptionPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert meta.calls() == [("GET", GCP_PATH)]
        assert meta.requests[0][2]["metadata-flavor"] == "Google"

    def test_true_is_notice_in_30s(self, meta):
        """TRUE: Notice(gcp) 30 s after it was first seen; later polls keep that deadline."""
        meta.script("GET", GCP_PATH, gce("TRUE\n"))
        poller = GcpPreemptionPoller(meta.url, timeout_s=ANSWER_S)
        assert poller.poll(NOW) == Notice("gcp", NOW + 30, "instance preempted")
        assert poller.poll(NOW + 5) == Notice("gcp", NOW + 30, "instance preempted")

    def test_answer_without_flavor_header_not_believed(self, meta):
        """An answer lacking Metadata-Flavor: Google is not the GCE metadata server: no notice."""
        meta.script("GET", GCP_PATH, gce("TRUE", flavor=None))
        with capture_logs() as logs:
            assert GcpPreemptionPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None
        assert "Metadata-Flavor" in logs[0]["error"]

    def test_unexpected_body(self, meta):
        """A body other than TRUE or FALSE is a failed poll."""
        meta.script("GET", GCP_PATH, gce("<html>captive portal</html>"))
        assert GcpPreemptionPoller(meta.url, timeout_s=ANSWER_S).poll(NOW) is None

    def test_server_down(self, closed_url):
        """Nothing listening: None at once, no exception."""
        start = time.monotonic()
        assert GcpPreemptionPoller(closed_url, timeout_s=ANSWER_S).poll(NOW) is None
        assert time.monotonic() - start < ANSWER_S / 2  # refused, not timed out


def squeue(stdout: str = "", returncode: int = 0, stderr: str = "", raises: Optional[BaseException] = None):
    """A fake subprocess.run for squeue that records its calls."""
    calls: List[Tuple[List[str], Dict[str, Any]]] = []

    def run(argv, **kwargs):
        calls.append((argv, kwargs))
        if raises is not None:
            raise raises
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    run.calls = calls  # type: ignore[attr-defined]
    return run


class TestSlurmPoller:
    def test_command(self):
        """squeue -h -j JOB -o %L, text output, bounded by timeout_s, no check."""
        run = squeue("1:00:00\n")
        SlurmPoller("4242", run=run).poll(NOW)
        assert run.calls == [(["squeue", "-h", "-j", "4242", "-o", "%L"],
                              {"capture_output": True, "text": True, "timeout": 5.0, "check": False})]

    @pytest.mark.parametrize("out, left", [
        ("1-02:03:04\n", 93784.0), ("02:03:04\n", 7384.0), ("03:04\n", 184.0), ("0:00\n", 0.0),
    ])
    def test_time_left_is_deadline(self, out, left):
        """The time left, in every squeue format, becomes deadline = now + left."""
        assert SlurmPoller("4242", run=squeue(out)).poll(NOW) == Notice("slurm", NOW + left, "time limit")

    @pytest.mark.parametrize("out", ["UNLIMITED\n", "NOT_SET\n"])
    def test_no_limit_no_notice(self, out):
        """An unlimited job has no deadline."""
        assert SlurmPoller("4242", run=squeue(out)).poll(NOW) is None

    def test_first_line_of_several(self):
        """A heterogeneous job's several lines: the first one counts."""
        assert SlurmPoller("4242+0", run=squeue("10:00\n10:00\n")).poll(NOW).deadline == NOW + 600

    @pytest.mark.parametrize("run", [
        squeue("", 1, "slurm_load_jobs error: Invalid job id specified\n"),
        squeue(raises=subprocess.TimeoutExpired(["squeue"], 5.0)),
        squeue(raises=FileNotFoundError(2, "No such file or directory", "squeue")),
        squeue("garbage\n"),
        squeue(""),
    ], ids=["rc1", "timeout", "missing", "garbage", "empty"])
    def test_failures_are_none(self, run):
        """squeue failing in any way: None, no exception, one warning."""
        with capture_logs() as logs:
            assert SlurmPoller("4242", run=run).poll(NOW) is None
        assert [e["event"] for e in logs] == ["preemption_poll_failed"]

    def test_answer_reused_for_refresh_s(self):
        """A known deadline is reused for refresh_s (squeue is a controller RPC), then asked again."""
        run = squeue("1:00:00\n")
        poller = SlurmPoller("4242", run=run, refresh_s=300.0)
        assert [poller.poll(NOW + t).deadline for t in (0, 10, 299, 300)] == [
            NOW + 3600, NOW + 3600, NOW + 3600, NOW + 3900]
        assert len(run.calls) == 2

    def test_failure_keeps_last_deadline(self):
        """A later squeue failure keeps the deadline already known."""
        ok, bad = squeue("1:00:00\n"), squeue("", 1, "error")
        poller = SlurmPoller("4242", run=ok, refresh_s=0.0)
        first = poller.poll(NOW)
        poller.run = bad
        assert poller.poll(NOW + 60) == first == Notice("slurm", NOW + 3600, "time limit")

    @pytest.mark.parametrize("job", ["", "-o", "12 34", "abc", "1;2"])
    def test_bad_job_id(self, job):
        """Job ids are digits (1234, 1234_5, 1234+0); anything else is refused when built."""
        with pytest.raises(ValueError, match="job_id"):
            SlurmPoller(job, run=squeue())


class TestSignalNotice:
    def test_unset_is_none(self):
        """Before the signal there is no notice."""
        assert SignalNotice(300.0).poll(NOW) is None

    def test_deadline_from_signal_time(self):
        """After the signal: Notice(slurm-signal, deadline = signal time + grace), the same every poll."""
        clock = iter([NOW, NOW + 999]).__next__
        notice = SignalNotice(grace_s=300.0, clock=clock)
        notice.set(signal.SIGUSR1, None)
        notice.set(signal.SIGUSR1, None)  # a repeat does not move the deadline
        expected = Notice("slurm-signal", NOW + 300, "SIGUSR1 received; 300s grace")
        assert notice.poll(NOW + 10) == expected == notice.poll(NOW + 200)

    def test_real_signal_and_restore(self):
        """install() catches a real SIGUSR1, chains the previous Python handler, and restore() puts it back."""
        seen = []

        def previous(signum, frame):
            seen.append(signum)

        old = signal.signal(signal.SIGUSR1, previous)
        try:
            notice = SignalNotice(grace_s=60.0, clock=lambda: NOW)
            restore = notice.install([signal.SIGUSR1])
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 60
            while not notice.is_set and time.monotonic() < deadline:
                time.sleep(0.01)
            assert notice.poll(NOW + 1) == Notice("slurm-signal", NOW + 60, "SIGUSR1 received; 60s grace")
            assert seen == [signal.SIGUSR1]
            restore()
            assert signal.getsignal(signal.SIGUSR1) is previous
        finally:
            signal.signal(signal.SIGUSR1, old)

    def test_install_main_thread_only(self):
        """install() from another thread is refused with a clear error."""
        errors = []

        def target():
            try:
                SignalNotice().install()
            except RuntimeError as err:
                errors.append(str(err))

        thread = threading.Thread(target=target)
        thread.start()
        thread.join(timeout=5)
        assert errors == ["SignalNotice.install() must be called from the main thread"]

    def test_bad_grace(self):
        """A zero grace is refused when built."""
        with pytest.raises(ValueError, match="grace_s"):
            SignalNotice(grace_s=0)


class Scripted:
    """A poller answering from a list (or raising)."""

    def __init__(self, name, answers):
        self.name = name
        self.answers = list(answers)

    def poll(self, now):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class TestPreemptionWatch:
    def test_earliest_deadline_wins(self):
        """Of several notices the earliest deadline is the answer; a notice without time counts as now."""
        slurm = Notice("slurm", NOW + 3600, "time limit")
        spot = Notice("aws-spot", NOW + 120, "spot")
        untimed = Notice("x", None, "untimed")
        watch = PreemptionWatch([Scripted("slurm", [slurm]), Scripted("aws-spot", [None, spot]),
                                 Scripted("x", [None, None, untimed])])
        assert [watch.poll(NOW), watch.poll(NOW), watch.poll(NOW)] == [slurm, spot, untimed]
        assert watch.latest == untimed

    def test_raising_poller_is_isolated(self):
        """A poller that raises is logged once and keeps its last answer; the others still count."""
        spot = Notice("aws-spot", NOW + 120, "spot")
        watch = PreemptionWatch([Scripted("bad", [RuntimeError("bug")]), Scripted("aws-spot", [spot])])
        with capture_logs() as logs:
            assert watch.poll(NOW) == spot
            assert watch.poll(NOW + 5) == spot
        assert [e["event"] for e in logs if e["event"].startswith("preemption_poller")] == [
            "preemption_poller_raised"]

    def test_logs_appear_move_clear(self):
        """preemption_notice on appearance and on a move > 60 s; preemption_cleared when it goes away."""
        answers = [Notice("slurm", NOW + 3600, "t"), Notice("slurm", NOW + 3601, "t"),
                   Notice("slurm", NOW + 1800, "t"), None]
        watch = PreemptionWatch([Scripted("slurm", answers + [None])])
        with capture_logs() as logs:
            for _ in range(4):
                watch.poll(NOW)
        assert [(e["event"], e.get("remaining_s")) for e in logs] == [
            ("preemption_notice", 3600.0), ("preemption_notice", 1800.0), ("preemption_cleared", None)]


class TestDetectCloud:
    @pytest.mark.parametrize("files, cloud", [
        ({"sys_vendor": "Amazon EC2\n", "product_name": "g5.xlarge\n"}, "aws"),
        ({"board_vendor": "Amazon EC2\n"}, "aws"),
        ({"sys_vendor": "Google\n", "product_name": "Google Compute Engine\n"}, "gcp"),
        ({"sys_vendor": "QEMU\n", "product_name": "Standard PC\n"}, None),
        ({}, None),
    ])
    def test_dmi(self, tmp_path, files, cloud):
        """The hypervisor's DMI strings name the cloud; anything else is none."""
        dmi = tmp_path / "sys/class/dmi/id"
        dmi.mkdir(parents=True)
        for name, text in files.items():
            (dmi / name).write_text(text)
        assert detect_cloud(tmp_path) == cloud


class TestBuildPollers:
    def test_by_name(self):
        """aws, gcp and slurm build their pollers in that order; a signal notice is appended."""
        sig = SignalNotice()
        pollers = build_pollers(["slurm", "gcp", "aws"], slurm_job_id="7", signal_notice=sig)
        assert [p.name for p in pollers] == ["aws-spot", "gcp", "slurm", "slurm-signal"]

    def test_auto(self, tmp_path):
        """auto: the detected cloud plus slurm inside a job."""
        dmi = tmp_path / "sys/class/dmi/id"
        dmi.mkdir(parents=True)
        (dmi / "product_name").write_text("Google Compute Engine\n")
        assert [p.name for p in build_pollers(["auto"], slurm_job_id="7", root=tmp_path)] == ["gcp", "slurm"]
        assert build_pollers(["auto"], root=tmp_path / "nowhere") == []

    @pytest.mark.parametrize("kinds, job, match", [
        (["azure"], None, "unknown preemption source"),
        (["slurm"], None, "needs a SLURM job id"),
    ])
    def test_bad(self, kinds, job, match):
        """Unknown names and slurm without a job id are refused with the reason."""
        with pytest.raises(ValueError, match=match):
            build_pollers(kinds, slurm_job_id=job)
