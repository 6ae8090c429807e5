"""Notifications and remote commands (issue 15): real Apprise URLs to local recording servers."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from fakes import FakeClock, ScriptedProbe, sample, status, write_checkpoint
from integration_helpers import reap, wait_for
from notify_servers import Recorder

from session_watchdog import channel, cli, log, platforms
from session_watchdog.config import Config, ConfigError, load_config
from session_watchdog.daemon import Watchdog
from session_watchdog.notify.channels import Channels, display_url, secret_parts
from session_watchdog.notify.messages import Context, Limiter, Message, compose
from session_watchdog.notify.remote import CommandRejected, parse_command
from session_watchdog.notify.worker import Worker
from session_watchdog.probes import DiskReading

NOW = 1_800_000_000.0
GiB = 2**30
TOKEN = "tok-7f3a9c2e"


@pytest.fixture(autouse=True)
def _fresh_log_state():
    """Listeners and configured secrets are process-wide: each test starts without them."""
    yield
    log._listeners.clear()
    log._extra_secrets.clear()


@pytest.fixture
def servers():
    made: List[Recorder] = []

    def make(*args: Any, **kw: Any) -> Recorder:
        made.append(Recorder(*args, **kw))
        return made[-1]

    yield make
    for server in made:
        server.close()


def watchdog(tmp_path: Path, probe: Any, clock: FakeClock, end_calls: List[str], **keys: Any) -> Watchdog:
    config = Config.build(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"), **keys)
    log.configure(config.log_file, console=None)
    return Watchdog(config, platform=platforms.Platform("colab", ("test",)), clock=clock,
                    session_start=NOW, probe=probe, confirm_after_s=0.0,
                    end_action=("POST http://test/unassign", lambda: end_calls.append("end") or "HTTP 200"))


def events(tmp_path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


class TestGoldenSession:
    def test_a_scripted_session_sends_exactly_these_messages(self, tmp_path, servers):
        """Warnings at 60 and 15 min, the acknowledged limit checkpoint, completion, the grace and the end."""
        server = servers()
        ckpt = write_checkpoint(tmp_path / "ckpt")
        clock = FakeClock(NOW)

        def running(step: int, acked: int = 0, heartbeat: float = NOW):
            return sample(trainer_status=status(step=step, acked_seq=acked, heartbeat=heartbeat,
                                                start_time=NOW, ckpt_at=None))

        done = channel.TrainerStatus(pid=4242, start_time=NOW, state="completed", step=500, epoch=3,
                                     step_time_s=0.5, acked_seq=1, last_checkpoint=ckpt,
                                     heartbeat=NOW + 6920)
        script = [running(100), running(200, heartbeat=NOW + 3660), running(400, heartbeat=NOW + 6300),
                  running(450, heartbeat=NOW + 6900), running(460, acked=1, heartbeat=NOW + 6910),
                  sample(alive=False, trainer_status=done)]
        ends: List[str] = []
        dog = watchdog(tmp_path, ScriptedProbe(script), clock, ends, max_session="2h", grace="1s",
                       end_when_done=True, checkpoint_every="off",
                       notify=f"json://127.0.0.1:{server.port}/hook")
        dog.acquire()
        try:
            for advance in (0, 3660, 2640, 600, 10, 10):
                clock.advance(advance)
                dog.tick()
            assert dog.wait_end(60) == "ended"
        finally:
            dog.release()
        assert server.titles() == [
            "session ends in about 59m00s",
            "session ends in about 15m00s",
            "checkpoint before the session limit: acknowledged after 10s",
            "training completed (500 steps in 1h55m)",
            "ending the runtime in 1s",
            "runtime end action done",
        ]
        bodies = [body["message"] for _, body in server.posts]
        assert bodies[3] == (f"last checkpoint: step 500, 7 KiB, {ckpt.path}\n"
                             "colab · session 1h55m of 2h00m · step 500")
        assert bodies[0] == ("the trainer will be asked to checkpoint and stop in time\n"
                             "colab · session 1h01m of 2h00m · step 200")
        assert bodies[4] == ("end action: POST http://test/unassign\n"
                             "cancel: `session-watchdog cancel` on the machine\n"
                             "colab · session 1h55m of 2h00m · step 500")
        assert ends == ["end", "end"]  # the action, and its one retry (the test process lives on)
        sent = [e for e in events(tmp_path) if e["event"] == "notify_sent"]
        assert [e["kind"] for e in sent] == ["session_warning", "session_warning", "checkpoint",
                                             "completed", "end_grace", "end_done"]
        assert {e["channel"] for e in sent} == {f"json://127.0.0.1:{server.port}/***"}

    @staticmethod
    def _failed_run(tmp_path, server, extra, **keys):
        """A trainer at step 70 that then failed at step 77 (exit code 1, trainer.json ``extra``),
        ticked through with notifications to ``server``; a pending end is cancelled."""
        failed = dataclasses.replace(status(step=77, heartbeat=NOW), state="failed", extra=extra)
        script = [sample(trainer_status=status(step=70, heartbeat=NOW)),
                  sample(alive=False, trainer_status=failed, child_exit=1)]
        dog = watchdog(tmp_path, ScriptedProbe(script), FakeClock(NOW), [], max_session="off",
                       notify=f"json://127.0.0.1:{server.port}/hook", **keys)
        dog.acquire()
        try:
            for _ in range(4):
                dog.tick()
        finally:
            dog.stop()  # cancels the end and waits for its thread: nothing of it outlives the test

    def test_a_failed_command_reports_its_exit_code_and_error(self, tmp_path, servers):
        """A run that fails says so once, with the exit code and the trainer's last error."""
        server = servers()
        self._failed_run(tmp_path, server, {"error": "ValueError: loss is nan"})
        assert server.titles() == ["training failed (exit code 1)"]
        assert server.posts[0][1]["message"] == ("error: ValueError: loss is nan\n"
                                                 "no checkpoint was reported\n"
                                                 "the runtime is left running\n"
                                                 "colab · session 0s · step 77")

    def test_a_failure_that_ends_the_runtime_says_so(self, tmp_path, servers):
        """With end_on_failure the failure message says the runtime will be ended, not that it is
        left running."""
        server = servers()
        self._failed_run(tmp_path, server, {"error": "ValueError: loss is nan"},
                         end_when_done="on", end_on_failure="on", grace="1h")
        assert server.titles()[0] == "training failed (exit code 1)"
        assert server.posts[0][1]["message"] == (
            "error: ValueError: loss is nan\n"
            "no checkpoint was reported\n"
            "the runtime will be ended (end_on_failure) once nothing runs on it\n"
            "colab · session 0s · step 77")

    def test_a_failed_trainer_sends_the_last_lines_of_its_traceback(self, tmp_path, servers):
        """The traceback tail the trainer reported (trainer.json extra.traceback) is in the
        failure message, after the error line."""
        server = servers()
        tail = 'File "train.py", line 9, in <module>\n    loss.backward()\nValueError: loss is nan'
        self._failed_run(tmp_path, server, {"error": "ValueError: loss is nan", "traceback": tail})
        assert server.posts[0][1]["message"] == ("error: ValueError: loss is nan\n"
                                                 "traceback (last lines):\n" + tail + "\n"
                                                 "no checkpoint was reported\n"
                                                 "the runtime is left running\n"
                                                 "colab · session 0s · step 77")

    def test_oom_kills_disk_and_notify_on(self, tmp_path, servers):
        """An OOM kill and a critical disk are sent; kinds left out of notify_on are not."""
        server = servers()
        disk = DiskReading("/data", 10 * 2**20, 100 * GiB)
        base = status(step=5, heartbeat=NOW, ckpt_at=NOW, ckpt_bytes=GiB)
        from fakes import host
        script = [sample(trainer_status=base, host_reading=host(oom=2)),
                  sample(trainer_status=base, host_reading=host(oom=3), disks=[disk])]
        dog = watchdog(tmp_path, ScriptedProbe(script), FakeClock(NOW), [], max_session="off",
                       notify=f"json://127.0.0.1:{server.port}/hook", notify_on="oom,failed")
        dog.acquire()
        try:
            dog.tick()
            dog.tick()
        finally:
            dog.release()
        assert server.titles() == ["out-of-memory kill on this machine"]
        kinds = {e.get("kind") for e in events(tmp_path) if e["event"] == "decision"}
        assert "warn" in kinds  # the disk warning was decided, and not sent (notify_on)


CTX = Context(platform="autodl", elapsed_s=3723.0, budget_s=7200.0, step=900, trainer_pid=7)
LINE = "autodl · session 1h02m of 2h00m · step 900"


class TestCompose:
    @pytest.mark.parametrize("event, expected", [
        ({"event": "decision", "kind": "warn", "reason": "disk_low", "level": "critical", "path": "/data",
          "message": "/data: 10 bytes free"},
         ("disk", "disk:critical:/data", "disk critical: /data", "/data: 10 bytes free")),
        ({"event": "decision", "kind": "warn", "reason": "ram_pressure", "message": "available RAM 3.0%"},
         ("ram", "ram", "RAM nearly exhausted: checkpoint requested", "available RAM 3.0%")),
        ({"event": "decision", "kind": "warn", "reason": "preemption", "deadline": 5.0,
          "message": "aws notice: the machine goes away in 2m00s"},
         ("preemption", "preemption:5.0", "preemption notice",
          "aws notice: the machine goes away in 2m00s\nthe trainer was asked to checkpoint and stop")),
        ({"event": "decision", "kind": "warn", "reason": "trainer_stalled",
          "message": "trainer heartbeat is 10m00s old at step 900"},
         ("hang", "hang:7", "training looks hung", "trainer heartbeat is 10m00s old at step 900")),
        ({"event": "decision", "kind": "warn", "reason": "trainer_stalled", "seq": 4,
          "message": "request 4 (stop) unanswered after 5 re-sends"},
         ("checkpoint", "unanswered:4", "checkpoint request not acknowledged",
          "request 4 (stop) unanswered after 5 re-sends")),
        ({"event": "decision", "kind": "ack", "reason": "request_acked", "action": "stop", "seq": 3,
          "request_reason": "preemption", "latency_s": 4.2},
         ("checkpoint", "ack:3", "checkpoint and stop before the preemption: acknowledged after 4s", "")),
        ({"event": "action", "step": "end_cancelled", "message": "cancelled by the user; the runtime stays"},
         ("end_grace", "end_cancelled", "end of the runtime cancelled",
          "cancelled by the user; the runtime stays")),
        ({"event": "action", "step": "end_aborted", "message": "run.lock (a trainer is alive)"},
         ("end_grace", "end_aborted", "end of the runtime stopped",
          "run.lock (a trainer is alive)\nthe runtime is left running")),
        ({"event": "action", "step": "end_dry_run", "message": "dry run: would now run /usr/bin/shutdown"},
         ("end_done", "end_done", "dry run: the runtime would end now",
          "dry run: would now run /usr/bin/shutdown")),
    ])
    def test_each_kind(self, event, expected):
        """Each decision or end step the user should hear about becomes one short message."""
        (message,) = compose(event, CTX)
        kind, key, title, body = expected
        assert (message.kind, message.key, message.title) == (kind, key, title)
        assert message.body == (f"{body}\n{LINE}" if body else LINE)

    @pytest.mark.parametrize("event", [
        {"event": "decision", "kind": "request", "reason": "periodic", "action": "checkpoint", "seq": 1},
        {"event": "decision", "kind": "ack", "reason": "request_acked", "request_reason": "periodic"},
        {"event": "decision", "kind": "warn", "reason": "gpu_idle", "message": "every GPU idle"},
        {"event": "action", "step": "request_written", "reason": "periodic"},
        {"event": "action", "step": "end_action", "retry": True, "message": "x", "result": "exit 0"},
        {"event": "sample"},
    ])
    def test_routine_events_send_nothing(self, event):
        """Periodic checkpoints, idle GPUs, request writes and retries of the end action are not news."""
        assert compose(event, CTX) == []


class TestLimiter:
    @pytest.mark.parametrize("sends, expected", [
        # (key, kind, now) -> allowed?
        ([("a", "disk", 0.0), ("a", "disk", 10.0)], [True, False]),  # duplicate within the episode
        ([("a", "disk", 0.0), ("a", "disk", 3600.0)], [True, True]),  # an hour later: a new episode
        ([(f"k{i}", "disk", 0.0) for i in range(8)], [True] * 6 + [False] * 2),  # burst of 6
        ([(f"k{i}", "disk", 0.0) for i in range(6)] + [("k9", "disk", 300.0)], [True] * 7),  # refilled
        ([(f"k{i}", "disk", 0.0) for i in range(6)] + [("u", "end_grace", 1.0)], [True] * 7),  # urgent
    ])
    def test_dedup_and_rate_limit(self, sends, expected):
        """A key repeats only after an hour; 6 at once, then one per 5 min; urgent kinds skip the bucket."""
        limiter = Limiter()
        got = [limiter.allow(Message(kind, key, "t", "b"), now)[0] for key, kind, now in sends]
        assert got == expected

    def test_a_flapping_disk_warning_is_sent_once(self, tmp_path, servers):
        """A disk that goes low, recovers and goes low again every tick gives one message."""
        server = servers()
        low = DiskReading("/data", 10 * 2**20, 100 * GiB)
        ok = DiskReading("/data", 50 * GiB, 100 * GiB)
        script = [sample(trainer_status=status(heartbeat=NOW), disks=[d]) for d in [low, ok] * 4]
        dog = watchdog(tmp_path, ScriptedProbe(script), FakeClock(NOW), [], max_session="off",
                       notify=f"json://127.0.0.1:{server.port}/hook")
        dog.acquire()
        try:
            for _ in range(8):
                dog.tick()
        finally:
            dog.release()
        assert server.titles() == ["disk low: /data"]
        assert sum(1 for e in events(tmp_path) if e["event"] == "notify_suppressed") == 3


class TestDeadNetwork:
    @pytest.mark.parametrize("mode", ["hang", "500"])
    def test_a_dead_server_never_delays_a_tick(self, tmp_path, servers, mode):
        """With the only channel hanging or failing, every tick still returns within its budget (1 s)."""
        server = servers(mode)
        clock = FakeClock(NOW)
        disks = [[DiskReading(f"/d{i}", 10 * 2**20, 100 * GiB)] for i in range(12)]
        script = [sample(trainer_status=status(heartbeat=NOW), disks=d) for d in disks]
        dog = watchdog(tmp_path, ScriptedProbe(script), clock, [], max_session="off",
                       notify=f"json://127.0.0.1:{server.port}/hook")
        dog.notify.worker.backoff_s = (0.01,)  # the queue drains before the test ends
        dog.acquire()
        durations = []
        try:
            for _ in range(12):  # each tick: a new disk episode, a new message for the worker
                started = time.monotonic()
                dog.tick()
                durations.append(time.monotonic() - started)
            assert wait_for(lambda: len(server.posts) >= 1)
        finally:
            server.release()
            dog.release()
        assert max(durations) < 1.0, durations

    def test_a_failing_server_is_retried_then_logged(self, tmp_path, servers):
        """A channel answering 500 gets the bounded attempts, then one notify_failed event."""
        server = servers("500")
        log.configure(tmp_path / "log.jsonl", console=None)
        worker = Worker(Channels([f"json://127.0.0.1:{server.port}/hook"]), attempts=3, backoff_s=(0.05,))
        worker.start()
        worker.submit(Message("disk", "disk:low:/x", "disk low: /x", "body"))
        assert worker.close(60) == 0
        assert len(server.posts) == 3
        failed = [e for e in events(tmp_path) if e["event"] == "notify_failed"
                  and e["channel"] == f"json://127.0.0.1:{server.port}/***"]
        assert len(failed) == 1 and failed[0]["attempts"] == 3 and "500" in failed[0]["error"]

    def test_a_full_queue_drops_and_says_so(self, tmp_path, servers):
        """When the channel hangs and the queue is full, a new message is dropped with an event."""
        server = servers("hang")
        log.configure(tmp_path / "log.jsonl", console=None)
        worker = Worker(Channels([f"json://127.0.0.1:{server.port}/hook"]), queue_size=2)
        worker.start()
        try:
            assert worker.submit(Message("disk", "a", "first", "b"))
            assert wait_for(lambda: len(server.posts) == 1)  # the worker is stuck in this one
            results = [worker.submit(Message("disk", k, k, "b")) for k in ("b", "c", "d")]
        finally:
            server.release()
            worker.close(30)
        assert results == [True, True, False]
        assert [e["title"] for e in events(tmp_path) if e["event"] == "notify_dropped"] == ["d"]


SECRET_URLS = ("json://alice:pa55word-xyz@127.0.0.1:{port}/hook-9d8e7f6a5b",
               "tgram://123456789:AAH-bot-token-abcdef/987654321")


class TestSecrets:
    def test_display_and_secret_parts(self):
        """A channel is shown as scheme://host/*** (or scheme://*** when the host is a token)."""
        assert display_url("json://u:p@127.0.0.1:8080/path?token=abcdefgh") == "json://127.0.0.1:8080/***"
        assert display_url("tgram://123456789:AAH-bot-token/987654321") == "tgram://***"
        assert display_url("ntfys://ntfy.sh/my-private-topic") == "ntfys://ntfy.sh/***"
        parts = secret_parts("tgram://123456789:AAH-bot-token/987654321")
        assert "123456789:AAH-bot-token" in parts and "987654321" in parts

    def test_no_secret_reaches_the_log_status_doctor_or_an_error(self, tmp_path, servers, capsys,
                                                                  monkeypatch):
        """URLs, bot token, password and remote token appear in no log line, status, doctor or error."""
        server = servers("500")
        urls = [u.format(port=server.port) for u in SECRET_URLS]
        secrets = ["pa55word-xyz", "hook-9d8e7f6a5b", "AAH-bot-token-abcdef", "987654321", TOKEN]
        script = [sample(trainer_status=status(heartbeat=NOW),
                         disks=[DiskReading("/data", 10 * 2**20, 100 * GiB)])]
        dog = watchdog(tmp_path, ScriptedProbe(script), FakeClock(NOW), [], max_session="off",
                       notify=urls[0], remote=f"ntfy://127.0.0.1:{server.port}/topic-abc123",
                       remote_token=TOKEN, remote_poll_every="1h")
        dog.notify.worker.backoff_s = (0.01,)
        dog.acquire()
        try:
            dog.tick()
            log.get_logger().error("tick_failed", error=f"boom at {urls[0]} with {TOKEN}")
            assert wait_for(lambda: any(e["event"] == "notify_failed" for e in events(tmp_path)))
        finally:
            dog.release()
        text = (tmp_path / "log.jsonl").read_text()
        assert "notify_failed" in text and "[redacted]" in text
        run_dir = str(tmp_path / "run")
        monkeypatch.setenv("SESSION_WATCHDOG_NOTIFY", " ".join(urls))
        monkeypatch.setenv("SESSION_WATCHDOG_REMOTE_TOKEN", TOKEN)
        assert cli.main(["status", "--run-dir", run_dir, "--json"]) == 0
        cli.main(["doctor", "--json", "--run-dir", run_dir])
        assert cli.main(["doctor", "--notify", "bad url " + urls[1]]) == 2
        out, err = capsys.readouterr()
        assert "tgram://***" in out and "json://127.0.0.1" in out
        assert "notify" in err and "[redacted]" in err
        for secret in secrets:
            assert secret not in text and secret not in out and secret not in err, secret
        config = load_config(env={"SESSION_WATCHDOG_NOTIFY": urls[1]})
        assert "AAH-bot" not in repr(config)


class Ntfy:
    """An ntfy-shaped topic: GET /<topic>/json?poll=1&since=... answers the queued messages."""

    def __init__(self, servers: Any, topic: str = "phone-topic") -> None:
        self.topic = topic
        self.messages: List[Dict[str, Any]] = []
        self.server = servers(get=self.get)

    def say(self, text: str, at: float, **extra: Any) -> None:
        self.messages.append({"id": f"m{len(self.messages)}", "time": int(at), "event": "message",
                              "topic": self.topic, "message": text, **extra})

    def get(self, path: str, query: Dict[str, List[str]]):
        if path != f"/{self.topic}/json" or query.get("poll") != ["1"]:
            return 404, b""
        since = query["since"][0]
        ids = [m["id"] for m in self.messages]
        start = ids.index(since) + 1 if since in ids else 0
        if since not in ids:  # a timestamp
            return 200, "\n".join(json.dumps(m) for m in self.messages
                                  if m["time"] >= int(since)).encode()
        return 200, "\n".join(json.dumps(m) for m in self.messages[start:]).encode()

    def replies(self) -> List[str]:
        return [body["raw"] for path, body in self.server.posts if path == f"/{self.topic}"]


class Telegram:
    """A Telegram-shaped Bot API: getUpdates (with offset) and sendMessage."""

    def __init__(self, servers: Any, bot: str = "123:ABCtoken") -> None:
        self.bot = bot
        self.updates: List[Dict[str, Any]] = []
        self.server = servers(get=self.get)

    def say(self, text: str, chat: int, at: float) -> None:
        self.updates.append({"update_id": 100 + len(self.updates),
                             "message": {"message_id": 1, "chat": {"id": chat}, "date": int(at),
                                         "text": text}})

    def get(self, path: str, query: Dict[str, List[str]]):
        if path != f"/bot{self.bot}/getUpdates":
            return 404, b""
        offset = int(query.get("offset", ["0"])[0])
        result = [u for u in self.updates if u["update_id"] >= offset]
        return 200, json.dumps({"ok": True, "result": result}).encode()

    def replies(self) -> List[Any]:
        return [(body["chat_id"], body["text"]) for path, body in self.server.posts
                if path == f"/bot{self.bot}/sendMessage"]


def remote_dog(tmp_path: Path, clock: FakeClock, script: List[Any], ends: List[str], **keys: Any) -> Watchdog:
    keys.setdefault("max_session", "1h")
    return watchdog(tmp_path, ScriptedProbe(script), clock, ends, remote_token=TOKEN,
                    remote_poll_every="1h", **keys)


class TestCommands:
    @pytest.mark.parametrize("text, expected", [
        (f"{TOKEN} status", ("status", None)),
        (f"extend 2h {TOKEN}", ("extend", 7200.0)),
        (f"{TOKEN} /Cancel", ("cancel", None)),
        (f"{TOKEN} checkpoint", ("checkpoint", None)),
    ])
    def test_commands_parse(self, text, expected):
        """A command is its words once the token is taken out; the token may stand anywhere."""
        command = parse_command(text, TOKEN)
        assert (command.name, command.seconds) == expected

    @pytest.mark.parametrize("text, why", [
        ("status", "no valid token"), (f"{TOKEN}x stop", "no valid token"),
        (f"{TOKEN} reboot", "unknown command 'reboot'"), (f"{TOKEN} extend", "extend needs a duration, e.g. extend 2h"),
        (f"{TOKEN} extend 2", "extend: '2' has no unit; write 2s, 2m or 2h"),
    ])
    def test_bad_commands_are_rejected(self, text, why):
        """A message without the exact token, or with an unknown command, is not obeyed."""
        with pytest.raises(CommandRejected, match=why.replace("(", r"\(").replace(")", r"\)")):
            parse_command(text, TOKEN)

    def test_cancel_from_the_phone_cancels_a_real_end_in_its_grace(self, tmp_path, servers):
        """`cancel` on the ntfy topic, with the token, stops the end transaction; the runtime stays."""
        ntfy = Ntfy(servers)
        ckpt = write_checkpoint(tmp_path / "ckpt")
        done = channel.TrainerStatus(pid=4242, start_time=NOW, state="completed", step=500, epoch=3,
                                     step_time_s=0.5, acked_seq=0, last_checkpoint=ckpt, heartbeat=NOW)
        clock = FakeClock(NOW)
        ends: List[str] = []
        dog = remote_dog(tmp_path, clock, [sample(alive=False, trainer_status=done)], ends,
                         grace="10m", end_when_done=True,
                         remote=f"ntfy://127.0.0.1:{ntfy.server.port}/{ntfy.topic}")
        dog.acquire()
        try:
            dog.tick()
            assert wait_for(lambda: any(e["event"] == "action" and e.get("step") == "end_grace"
                                        for e in events(tmp_path)))
            ntfy.say(f"{TOKEN} cancel", NOW + 5)
            dog.notify.remote.poll_once()
            assert dog.wait_end(60) == "cancelled"
        finally:
            dog.release()
        assert ends == []
        assert ntfy.replies() == ["cancelled: the runtime stays"]
        commands = [e for e in events(tmp_path) if e["event"] == "remote_command"]
        assert [c["command"] for c in commands] == ["cancel"]

    def test_wrong_chat_missing_token_and_old_messages_are_ignored(self, tmp_path, servers):
        """Only the configured chat with the token is obeyed; others are logged and ignored."""
        tg = Telegram(servers)
        status_now = status(heartbeat=NOW, step=42)
        clock = FakeClock(NOW)
        dog = remote_dog(tmp_path, clock, [sample(trainer_status=status_now)], [],
                         remote=f"tgram://{tg.bot}/555", remote_api=f"http://127.0.0.1:{tg.server.port}")
        dog.acquire()
        try:
            dog.tick()
            tg.say(f"{TOKEN} stop", chat=666, at=NOW + 1)  # another chat
            tg.say("stop", chat=555, at=NOW + 1)  # no token
            tg.say(f"{TOKEN} stop", chat=555, at=NOW - 3600)  # from before the watchdog started
            tg.say(f"{TOKEN} status", chat=555, at=NOW + 2)
            dog.notify.remote.poll_once()
            dog.notify.remote.poll_once()  # offset confirms: nothing is handled twice
        finally:
            dog.release()
        assert tg.replies() == [(555, "colab: 60m left; trainer running at step 42")]
        ignored = [e["why"] for e in events(tmp_path) if e["event"] == "remote_ignored"]
        assert ignored == ["not from the configured chat/topic", "no valid token",
                           "sent before the watchdog started"]
        assert not (tmp_path / "run" / channel.REQUEST_FILE).exists()
        assert "offset=104" in tg.server.gets[-1]

    def test_extend_moves_the_budget_and_rearms_the_warnings(self, tmp_path, servers):
        """`extend 2h` adds 2 h to the budget (daemon.json, log) and the 60-min warning comes again."""
        tg = Telegram(servers)
        clock = FakeClock(NOW)
        dog = remote_dog(tmp_path, clock, [sample(trainer_status=status(heartbeat=NOW))], [],
                         remote=f"tgram://{tg.bot}/555", remote_api=f"http://127.0.0.1:{tg.server.port}")
        dog.acquire()
        try:
            dog.tick()
            assert [d.reason for d in dog.last_decisions] == ["session_limit"]  # 60 min left
            tg.say(f"{TOKEN} extend 2h", chat=555, at=NOW + 1)
            dog.notify.remote.poll_once()
            assert dog.config.max_session == 3 * 3600.0
            assert channel.read_json(tmp_path / "run" / "daemon.json")["budget_s"] == 3 * 3600.0
            clock.advance(2 * 3600.0 + 60)
            dog.tick()
            warned = [d.message for d in dog.last_decisions if d.reason == "session_limit"]
            assert warned == ["session ends in about 59m00s (budget 3h00m)"]
        finally:
            dog.release()
        assert tg.replies() == [(555, "budget extended by 2h00m to 3h00m")]
        extended = [e for e in events(tmp_path) if e["event"] == "budget_extended"]
        assert [(e["by_s"], e["budget_s"]) for e in extended] == [(7200.0, 10800.0)]
        restarted = remote_dog(tmp_path, clock, [sample(trainer_status=status(heartbeat=NOW))], [],
                               remote=f"tgram://{tg.bot}/555",
                               remote_api=f"http://127.0.0.1:{tg.server.port}")
        assert restarted.config.max_session == 3 * 3600.0  # a restarted watchdog keeps the extension

    def test_checkpoint_and_stop_go_through_the_request_path(self, tmp_path, servers):
        """`checkpoint` then `stop` write request.json with the next seqs and answer with them."""
        ntfy = Ntfy(servers)
        dog = remote_dog(tmp_path, FakeClock(NOW), [sample(trainer_status=status(heartbeat=NOW))], [],
                         max_session="off", remote=f"ntfy://127.0.0.1:{ntfy.server.port}/{ntfy.topic}")
        dog.acquire()
        try:
            dog.tick()
            ntfy.say(f"{TOKEN} checkpoint", NOW + 1)
            dog.notify.remote.poll_once()
            first = dog.run_dir.read_request()
            ntfy.say(f"{TOKEN} stop", NOW + 2)
            ntfy.say("session-watchdog says hello", NOW + 2, title="session-watchdog: disk low")
            dog.notify.remote.poll_once()
            second = dog.run_dir.read_request()
        finally:
            dog.release()
        assert (first.seq, first.action, first.reason) == (1, "checkpoint", "remote_command")
        assert (second.seq, second.action) == (2, "stop")
        assert dog.state.outstanding is not None and dog.state.outstanding.seq == 2
        assert ntfy.replies() == ["checkpoint requested (request 1)", "stop requested (request 2)"]
        assert not any(e["event"] == "remote_ignored" for e in events(tmp_path))  # our own message


class TestCommandLine:
    def test_notify_test_says_which_channel_worked(self, tmp_path, servers, capsys):
        """`notify --test` sends one message per channel and names the one that failed (exit 1)."""
        good, bad = servers(), servers("500")
        urls = f"json://127.0.0.1:{good.port}/a json://127.0.0.1:{bad.port}/b"
        code = cli.main(["notify", "--test", "--notify", urls, "--log-file", str(tmp_path / "l.jsonl")])
        out = capsys.readouterr().out.splitlines()
        assert code == 1
        assert out[0] == f"[ok  ] json://127.0.0.1:{good.port}/***"
        assert out[1].startswith(f"[FAIL] json://127.0.0.1:{bad.port}/***  ")
        assert good.titles() == ["session-watchdog: test message"]

    def test_notify_test_prints_only_its_result_lines_in_a_fresh_process(self, servers, tmp_path):
        """The real command in a process of its own (nothing configured structlog before it):
        stdout holds the result line and nothing else, exit 0."""
        import os
        import subprocess
        import sys

        good = servers()
        done = subprocess.run(
            [sys.executable, "-m", "session_watchdog", "notify", "--test", "--notify",
             f"json://127.0.0.1:{good.port}/a", "--run-dir", str(tmp_path / "run")],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
            env={**os.environ, "SESSION_WATCHDOG_LOG_FILE": str(tmp_path / "log.jsonl")})
        assert (done.returncode, done.stdout) == (0, f"[ok  ] json://127.0.0.1:{good.port}/***\n")
        assert good.titles() == ["session-watchdog: test message"]

    def test_notify_without_channels_is_a_usage_error(self, capsys):
        """`notify --test` with nothing configured is one line naming the fix, exit 2."""
        assert cli.main(["notify", "--test"]) == 2
        assert "pass --notify URL" in capsys.readouterr().err

    def test_doctor_lists_channels_and_reachability(self, servers, capsys):
        """doctor shows each channel redacted, reachable or not."""
        server = servers()
        cli.main(["doctor", "--json", "--notify", f"json://u:secretpw1@127.0.0.1:{server.port}/x "
                  "json://127.0.0.1:1/y"])
        checks = [c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "notify"]
        assert [c["ok"] for c in checks] == [True, False]
        assert checks[0]["detail"] == f"json://127.0.0.1:{server.port}/***: 127.0.0.1:{server.port} reachable"

    def test_doctor_checks_the_remote_source(self, servers, capsys):
        """doctor shows the remote topic redacted and whether its server answers a connection."""
        server = servers()
        cli.main(["doctor", "--json", "--remote", f"ntfy://127.0.0.1:{server.port}/topic-secret-9",
                  "--remote-token", TOKEN])
        out = capsys.readouterr().out
        (check,) = [c for c in json.loads(out)["checks"] if c["name"] == "remote commands"]
        assert check["ok"] is True
        assert check["detail"] == f"ntfy://127.0.0.1:{server.port}/***: 127.0.0.1:{server.port} reachable"
        assert "topic-secret-9" not in out and TOKEN not in out

    def test_config_keys(self):
        """notify takes spaces or commas between URLs; remote needs a token; bad values name the key."""
        config = Config.build(notify="json://a.example/x, ntfys://ntfy.sh/t", notify_on="disk,failed")
        assert config.notify == ("json://a.example/x", "ntfys://ntfy.sh/t")
        assert config.notify_on == ("failed", "disk")
        with pytest.raises(ConfigError, match="remote_token"):
            Config.build(remote="ntfys://ntfy.sh/topic")
        with pytest.raises(ConfigError, match="notify_on = 'nope' is invalid"):
            Config.build(notify_on="nope")
        with pytest.raises(ConfigError, match=r"remote = \[redacted\] is invalid"):
            Config.build(remote="tgram://token/notanumber", remote_token=TOKEN)


class TestNtfyChannel:
    def test_an_ntfy_url_reaches_a_plain_http_server_and_is_not_read_back_as_a_command(self, tmp_path, servers):
        """ntfy://127.0.0.1:PORT/topic publishes {topic, title, message}; polling it back obeys nothing."""
        ntfy = Ntfy(servers)
        log.configure(tmp_path / "log.jsonl", console=None)
        channels = Channels([f"ntfy://127.0.0.1:{ntfy.server.port}/{ntfy.topic}"])
        assert channels.send(channels.channels[0], "disk low: /data", "10 MiB free") == (True, "")
        path, body = ntfy.server.posts[0]
        assert body == {"topic": ntfy.topic, "title": "disk low: /data", "message": "10 MiB free"}
        ntfy.say(body["message"], NOW + 1, title=body["title"])  # what the server would store
        from session_watchdog.notify.remote import NtfySource, Remote

        remote = Remote(None, NtfySource(f"ntfy://127.0.0.1:{ntfy.server.port}/{ntfy.topic}", since=NOW),
                        TOKEN, 60.0, NOW)
        remote.poll_once()
        assert not any(e["event"].startswith("remote_") for e in events(tmp_path))


class TestNotebook:
    def test_a_notebook_restart_with_other_channels_names_the_key_not_the_url(self):
        """start() with different notify URLs warns naming `notify`, never the URLs themselves."""
        import types

        from session_watchdog import notebook

        log.configure(None, console=None)
        running = types.SimpleNamespace(requested=Config.build(notify="tgram://111:AAA-secret-one/5"))
        with pytest.warns(notebook.ConfigMismatchWarning) as caught:
            notebook._report_differences(running, Config.build(notify="tgram://222:BBB-secret-two/5"), 2)
        text = str(caught[0].message)
        assert "notify: running [redacted], asked [redacted]" in text and "secret" not in text


class TestWrappedCommand:
    def test_a_wrapped_command_that_fails_is_reported_before_the_watchdog_exits(self, tmp_path, servers):
        """`run --notify URL -- cmd` exiting 3 sends "training failed (exit code 3)" before it exits 3."""
        import os
        import subprocess
        import sys

        server = servers()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_watchdog", "run", "--platform", "generic", "--interval", "200ms",
             "--run-dir", str(tmp_path / "run"), "--log-file", str(tmp_path / "log.jsonl"),
             "--notify", f"json://127.0.0.1:{server.port}/hook", "--",
             sys.executable, "-c", "import sys; sys.exit(3)"],
            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.communicate(timeout=120)
        finally:
            reap(proc)
        assert proc.returncode == 3
        assert server.titles() == ["training failed (exit code 3)"]
        body = server.posts[0][1]["message"]
        assert body.startswith("no checkpoint was reported\nthe runtime is left running\ngeneric · session ")
