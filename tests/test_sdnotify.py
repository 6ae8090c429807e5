"""sd_notify: messages received exactly on a real AF_UNIX datagram socket; watchdog ping cadence."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from session_watchdog.sdnotify import Heartbeat, Notifier, parse_address, watchdog_interval_s


class Listener:
    """The systemd end: a bound datagram socket we read messages from."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def pending(self) -> list:
        """Everything queued now, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.settimeout(2.0)


@pytest.fixture
def sock_dir(tmp_path):
    """tmp_path, unless it is too long for sun_path (108 bytes): then a short dir under /tmp."""
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def listener(sock_dir):
    path = str(sock_dir / "notify.sock")
    lst = Listener(path)
    yield lst, path
    lst.sock.close()


class TestParseAddress:
    @pytest.mark.parametrize("raw, address", [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/123", "\0/org/freedesktop/systemd1/notify/123"),
        ("", None), ("@", None), ("relative/sock", None), ("vsock:2:1234", None),
    ])
    def test_forms(self, raw, address):
        """An absolute path is used as is, @name is the abstract namespace, anything else is off."""
        assert parse_address(raw) == address


class TestNotifier:
    def test_ready_with_status(self, listener):
        """ready() sends READY=1 and the status line in one datagram."""
        lst, path = listener
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.ready("watching colab session") is True
        assert lst.recv() == "READY=1\nSTATUS=watching colab session"

    def test_each_helper_sends_its_line(self, listener):
        """status(), watchdog(), stopping() and notify() send exactly their lines."""
        lst, path = listener
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier.status("3h12m left")
        assert notifier.watchdog()
        assert notifier.stopping()
        assert notifier.notify("STATUS=a", "EXTEND_TIMEOUT_USEC=5000000")
        assert notifier.ready()
        assert [lst.recv() for _ in range(5)] == [
            "STATUS=3h12m left", "WATCHDOG=1", "STOPPING=1",
            "STATUS=a\nEXTEND_TIMEOUT_USEC=5000000", "READY=1"]

    def test_status_newlines_do_not_inject_assignments(self, listener):
        """A multi-line status becomes one STATUS line, not extra KEY=VALUE assignments."""
        lst, path = listener
        Notifier.from_env({"NOTIFY_SOCKET": path}).status("line one\nREADY=1")
        assert lst.recv() == "STATUS=line one READY=1"

    def test_abstract_namespace(self):
        """NOTIFY_SOCKET=@name reaches a socket bound in the abstract namespace."""
        name = f"session-watchdog-test-{uuid.uuid4().hex}"
        lst = Listener("\0" + name)
        try:
            notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
            assert notifier.ready("ok")
            assert lst.recv() == "READY=1\nSTATUS=ok"
        finally:
            lst.sock.close()

    def test_disabled_without_notify_socket(self, listener):
        """Without NOTIFY_SOCKET every call is a no-op returning False and nothing is sent."""
        lst, _ = listener
        notifier = Notifier.from_env({})
        assert not notifier.enabled
        assert (notifier.ready("x"), notifier.status("x"), notifier.watchdog(),
                notifier.stopping()) == (False, False, False, False)
        assert lst.pending() == []

    def test_unsupported_address_is_disabled_and_logged(self):
        """A NOTIFY_SOCKET we cannot use turns notifications off with one warning."""
        with capture_logs() as logs:
            notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert not notifier.enabled
        assert [e["event"] for e in logs] == ["sd_notify_unsupported"]

    def test_unreachable_socket_returns_false_and_logs_once(self, sock_dir):
        """A socket path nobody listens on: notify returns False, never raises, warns once per streak."""
        notifier = Notifier(str(sock_dir / "gone.sock"))
        with capture_logs() as logs:
            results = [notifier.watchdog() for _ in range(3)]
        assert results == [False, False, False]
        assert [e["event"] for e in logs] == ["sd_notify_failed"]
        assert logs[0]["address"] == str(sock_dir / "gone.sock")

    def test_failure_streak_ends_on_success(self, sock_dir):
        """After a send succeeds again, the next failure is logged again."""
        path = str(sock_dir / "later.sock")
        notifier = Notifier(path)
        with capture_logs() as logs:
            assert notifier.watchdog() is False
            lst = Listener(path)
            assert notifier.watchdog() is True
            lst.sock.close()
            os.unlink(path)
            assert notifier.watchdog() is False
        assert [e["event"] for e in logs] == ["sd_notify_failed", "sd_notify_failed"]


class TestWatchdogInterval:
    @pytest.mark.parametrize("env, seconds", [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4242"}, 5.0),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, None),
    ])
    def test_half_the_period_for_our_pid(self, env, seconds):
        """Half of WATCHDOG_USEC, in seconds, when WATCHDOG_PID is ours or absent; else None."""
        assert watchdog_interval_s(env, pid=4242) == seconds

    def test_default_pid_is_ours(self):
        """Without an explicit pid, WATCHDOG_PID is compared with os.getpid()."""
        env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        assert watchdog_interval_s(env) == 1.0


class TestHeartbeat:
    def test_pings_every_half_period(self, listener):
        """WATCHDOG_USEC=10000000 with a tick every second: WATCHDOG=1 at t=0, 5, 10, 15, 20 only."""
        lst, path = listener
        beat = Heartbeat.from_env(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})
        assert beat.enabled and beat.interval_s == 5.0
        sent_at = [t for t in range(21) if beat.maybe_ping(1000.0 + t)]
        assert sent_at == [0, 5, 10, 15, 20]
        assert lst.pending() == ["WATCHDOG=1"] * 5

    def test_irregular_ticks_never_ping_early(self, listener):
        """Ticks at odd times ping at the first tick at least interval_s after the last ping."""
        lst, path = listener
        beat = Heartbeat(Notifier(path), 5.0)
        ticks = [0.0, 4.9, 5.0, 7.0, 9.9, 10.1, 14.0, 16.0]
        assert [t for t in ticks if beat.maybe_ping(t)] == [0.0, 5.0, 10.1, 16.0]
        assert len(lst.pending()) == 4

    def test_no_notify_socket_no_pings(self):
        """WATCHDOG_USEC without NOTIFY_SOCKET: disabled, maybe_ping is always False."""
        beat = Heartbeat.from_env(env={"WATCHDOG_USEC": "10000000"})
        assert not beat.enabled
        assert [beat.maybe_ping(float(t)) for t in range(0, 20, 5)] == [False] * 4

    def test_watchdog_pid_of_another_process_no_pings(self, listener):
        """WATCHDOG_PID naming another process (we inherited it): no WATCHDOG=1 is ever sent."""
        lst, path = listener
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}
        beat = Heartbeat.from_env(env=env, pid=os.getpid() if os.getpid() != 1 else 2)
        assert not beat.enabled
        assert [beat.maybe_ping(float(t)) for t in range(0, 30, 5)] == [False] * 6
        assert lst.pending() == []

    def test_failed_ping_is_retried_next_call(self, sock_dir):
        """A ping that could not be sent does not count: the next call tries again."""
        path = str(sock_dir / "late.sock")
        beat = Heartbeat(Notifier(path), 5.0)
        assert beat.maybe_ping(0.0) is False
        lst = Listener(path)
        try:
            assert beat.maybe_ping(1.0) is True
            assert beat.maybe_ping(2.0) is False
            assert lst.pending() == ["WATCHDOG=1"]
        finally:
            lst.sock.close()

    @pytest.mark.parametrize("bad", [0.0, -1.0])
    def test_bad_interval(self, bad):
        """A zero or negative interval is refused when built."""
        with pytest.raises(ValueError, match="interval_s"):
            Heartbeat(Notifier(None), bad)
