"""The wrapped command's stderr (issue 15): passed through unchanged, its traceback in the failure.

Real child processes, a real Apprise ``json://`` URL to a local recording server, and the
watchdog itself under a pseudo-terminal where a terminal matters.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from fakes import sample
from integration_helpers import reap, wait_for
from notify_servers import Recorder

from session_watchdog.config import Config
from session_watchdog.policy import PolicyState, decide
from session_watchdog.supervise import output
from session_watchdog.supervise.output import TAIL_BYTES, Tee, screen_lines, traceback_tail

REPO = str(Path(__file__).resolve().parent.parent)
CLI = [sys.executable, "-m", "session_watchdog"]
# Python's own traceback of BOOM (3.11 prints no carets: each expression is its whole line)
BOOM = textwrap.dedent('''\
    import sys
    sys.stderr.buffer.write(b"step 1\\rstep 2\\rdone\\n"); sys.stderr.flush()
    def main():
        raise ValueError("boom-xyz at https://alice:s3cret-pw@data.example/x")
    main()
''')


def boom_traceback(path: Path, url: str = "https://***@data.example/x") -> str:
    return (f'Traceback (most recent call last):\n'
            f'  File "{path}", line 5, in <module>\n'
            f'    main()\n'
            f'  File "{path}", line 4, in main\n'
            f'    raise ValueError("boom-xyz at {url}")\n'
            f'ValueError: boom-xyz at {url}')


def env() -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_argv(tmp_path: Path, *flags: str) -> List[str]:
    return [*CLI, "run", "--platform", "generic", "--interval", "200ms", "--run-dir",
            str(tmp_path / "run"), "--log-file", str(tmp_path / "log.jsonl"), *flags]


def events(tmp_path: Path) -> List[Dict[str, Any]]:
    path = tmp_path / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def failed_decisions(tmp_path: Path) -> List[Dict[str, Any]]:
    return [e for e in events(tmp_path)
            if e.get("event") == "decision" and e.get("reason") == "training_failed"]


@pytest.fixture
def server():
    recorder = Recorder()
    yield recorder
    recorder.close()


class TestTracebackTail:
    def test_a_traceback_is_taken_from_its_header_to_the_error(self):
        """The last traceback, header to exception line, with the lines printed before it left out."""
        text = ("epoch 1\nloss 0.3\nTraceback (most recent call last):\n  File \"t.py\", line 2, in <module>\n"
                "    f()\nValueError: bad\n\n")
        assert traceback_tail(text) == ('Traceback (most recent call last):\n  File "t.py", line 2, '
                                        'in <module>\n    f()\nValueError: bad')

    def test_of_chained_tracebacks_the_last_is_kept(self):
        """"During handling of the above exception": the final traceback is the one quoted."""
        text = ("Traceback (most recent call last):\n  File \"a\", line 1\nKeyError: 'k'\n\nDuring handling"
                " of the above exception, another exception occurred:\n\nTraceback (most recent call "
                "last):\n  File \"b\", line 2\nRuntimeError: wrapped\n")
        assert traceback_tail(text) == 'Traceback (most recent call last):\n  File "b", line 2\nRuntimeError: wrapped'

    def test_a_deep_traceback_keeps_the_header_the_innermost_frames_and_the_error(self):
        """A 40-frame traceback becomes 15 lines: header, "...", the last 12 frame lines, the error."""
        frames = [f'  File "m.py", line {i}, in f{i}' for i in range(40)]
        text = "\n".join(["Traceback (most recent call last):", *frames, "RecursionError: deep",
                          "worker 1 exited", "worker 2 exited"])
        assert traceback_tail(text).splitlines() == [
            "Traceback (most recent call last):", "  ...", *frames[-12:], "RecursionError: deep"]

    def test_without_a_traceback_the_last_lines_are_kept_as_a_terminal_shows_them(self):
        """No traceback: the last 5 non-empty lines; a \\r progress line shows its last state, no colours."""
        text = "a\nb\nc\n\x1b[31mred\x1b[0m\n\n10%\r50%\r100%\nCUDA error: device-side assert\n\n"
        assert traceback_tail(text) == "b\nc\nred\n100%\nCUDA error: device-side assert"
        assert screen_lines("x\r\ny") == ["x", "y"]

    def test_nothing_printed_is_none(self):
        """A command that printed nothing has no tail."""
        assert traceback_tail("") is None and traceback_tail("\n \n\r") is None

    def test_credentials_in_urls_are_hidden_and_the_text_is_bounded(self):
        """user:password@ in a URL becomes ***@; the tail never exceeds 2000 characters."""
        text = "Traceback (most recent call last):\n" + "x" * 5000 + "\nOSError: https://u:pw@h.example/p"
        tail = traceback_tail(text)
        assert len(tail) <= 2000 and "pw@" not in tail
        assert tail.startswith("Traceback (most recent call last):\n...\n")
        assert tail.endswith("OSError: https://***@h.example/p")


class TestFailureDecision:
    @pytest.mark.parametrize("end_on_failure, kind", [(False, "warn"), (True, "end")])
    def test_the_training_failed_decision_carries_the_commands_traceback(self, end_on_failure, kind):
        """PURE: a failed command's stderr tail in the sample is in the training_failed decision."""
        config = Config.build(max_session="off", end_when_done=True, end_on_failure=end_on_failure)
        failed = dataclasses.replace(sample(alive=False, child_exit=1),
                                     child_traceback="Traceback (most recent call last):\nValueError: x")
        _, decisions = decide(config, PolicyState(), failed)
        assert [(d.kind, d.reason, d.data) for d in decisions] == [
            (kind, "training_failed", {"child_exit": 1,
                                       "traceback": "Traceback (most recent call last):\nValueError: x"})]

    def test_without_a_tail_the_decision_is_as_before(self):
        """No stderr tail (attach, a notebook): the decision has no traceback field."""
        _, decisions = decide(Config.build(max_session="off"), PolicyState(),
                              sample(alive=False, child_exit=1))
        assert [d.data for d in decisions if d.reason == "training_failed"] == [{"child_exit": 1}]


class TestTee:
    def test_every_byte_reaches_the_destination_and_the_tail_is_the_last_64k(self, tmp_path):
        """A command that writes 300 KB and exits at once loses nothing: all bytes are copied,
        in order, and the kept tail is exactly the last 64 KiB."""
        payload = bytes(range(256)) * 1200  # 307200 bytes, \r and \n among them
        script = tmp_path / "w.py"
        script.write_text("import sys\nsys.stderr.buffer.write(open(sys.argv[1], 'rb').read())\n")
        (tmp_path / "payload").write_bytes(payload)
        dest = os.open(tmp_path / "dest", os.O_WRONLY | os.O_CREAT, 0o600)
        tee = Tee(dest, tty=False)
        try:
            proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "payload")],
                                    stderr=tee.child_fd)
            tee.started()
            assert proc.wait(timeout=120) == 0
            tee.close()  # drains: what the pipe held when the command exited is copied too
        finally:
            os.close(dest)
        assert (tmp_path / "dest").read_bytes() == payload
        assert tee.text().encode("utf-8", "surrogateescape") != b""  # decoded with replacement
        assert len(tee._tail) == TAIL_BYTES and bytes(tee._tail) == payload[-TAIL_BYTES:]

    def test_a_gone_destination_never_blocks_the_command(self, tmp_path):
        """Our stderr's reader left (EPIPE): the command still writes all it wants and exits 0."""
        read_end, write_end = os.pipe()
        os.close(read_end)
        tee = Tee(write_end, tty=False)
        try:
            proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('z' * 500000)"],
                                    stderr=tee.child_fd)
            tee.started()
            assert proc.wait(timeout=120) == 0
            tee.close()
        finally:
            os.close(write_end)
        assert tee.text() == "z" * TAIL_BYTES

    def test_a_blocked_destination_never_holds_a_drain_past_its_bound(self, tmp_path):
        """Our stderr stopped taking bytes (a terminal paused with Ctrl-S): drain() still returns
        (a tick calls it), and the tail holds what was read."""
        read_end, write_end = os.pipe()  # nobody reads it: full after 64 KiB
        tee = Tee(write_end, tty=False)
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('q' * 400000)"],
                                stderr=tee.child_fd)
        tee.started()
        try:
            assert wait_for(lambda: len(tee._tail) > 0, "the tail to fill", timeout=120)
            done = threading.Event()
            drainer = threading.Thread(target=lambda: (tee.drain(timeout_s=0.5), done.set()), daemon=True)
            drainer.start()
            assert done.wait(60)
            assert set(tee.text()) == {"q"}
        finally:
            proc.kill()
            proc.wait()
            os.close(read_end)  # the copying thread's write fails (EPIPE): it reads to the end
            tee.close()
            os.close(write_end)

    def test_a_regular_file_is_read_back_instead_of_piped(self, tmp_path):
        """Our stderr is a file: the command inherits it, and the tail is what it added (our own
        console lines left out)."""
        fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, b"an earlier run's output\n")
            kept = output.capture(fd)
            assert isinstance(kept, output.FileTail) and kept.child_fd is None
            proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('mine\\n')"],
                                    stderr=fd)
            assert proc.wait(timeout=120) == 0
            os.write(fd, b"[session-watchdog 10:00:00] child_exited exit_code=0\n")  # our own line
            assert kept.text() == "mine\n"
        finally:
            os.close(fd)


class TestWrappedCommand:
    def test_a_failing_script_sends_its_traceback_and_its_stderr_still_passes_through(self, tmp_path, server):
        """`run -- python boom.py` raising ValueError: the failure message and the training_failed
        event quote the traceback (URL credentials hidden); our stderr got the child's exact bytes."""
        script = tmp_path / "boom.py"
        script.write_text(BOOM)
        proc = subprocess.Popen(
            [*run_argv(tmp_path, "--notify", f"json://127.0.0.1:{server.port}/hook"), "--",
             sys.executable, str(script)],
            env=env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=180)
        finally:
            reap(proc)
        assert proc.returncode == 1, err.decode(errors="replace")[-2000:]
        assert b"step 1\rstep 2\rdone\n" in err
        assert boom_traceback(script, "https://alice:s3cret-pw@data.example/x").encode() + b"\n" in err
        posts = server.wait_posts(1)
        assert [body["title"] for _, body in posts] == ["training failed (exit code 1)"]
        message = posts[0][1]["message"]
        assert message.startswith("traceback (last lines):\n" + boom_traceback(script) + "\n")
        assert "ValueError: boom-xyz" in message and "s3cret-pw" not in message
        decisions = failed_decisions(tmp_path)
        assert [d["traceback"] for d in decisions] == [boom_traceback(script)]

    def test_a_flood_of_output_before_the_crash_loses_nothing(self, tmp_path):
        """2 MB of stderr written just before the exception: every byte reaches our stderr and the
        training_failed event still has the traceback (the pipe is drained before the report)."""
        code = ("import sys; sys.stderr.write(('x' * 99 + '\\n') * 20000); "
                "raise KeyError('flood-end')")
        proc = subprocess.Popen([*run_argv(tmp_path), "--", sys.executable, "-c", code],
                                env=env(), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=180)
        finally:
            reap(proc)
        assert proc.returncode == 1, err.decode(errors="replace")[-2000:]
        assert (b"x" * 99 + b"\n") * 20000 + b"Traceback (most recent call last):\n" in err
        assert [d["traceback"].splitlines()[-1] for d in failed_decisions(tmp_path)] == [
            "KeyError: 'flood-end'"]

    def test_a_session_reported_traceback_wins_over_stderr(self, tmp_path, server):
        """A trainer that reported its own traceback in trainer.json: that one is sent."""
        script = tmp_path / "reported.py"
        script.write_text(textwrap.dedent('''\
            import os, sys, time
            import psutil
            from session_watchdog import channel
            run = channel.RunDir(os.environ["SESSION_WATCHDOG_RUN_DIR"])
            status = channel.TrainerStatus(  # the start time a Session reports: the process's
                os.getpid(), psutil.Process().create_time(), "failed", 3, 0, None, 0, None,
                time.time(),
                extra={"error": "KeyError: 'reported'", "traceback": "KeyError: 'reported-by-session'"})
            run.write(channel.TRAINER_FILE, status.to_json())
            # like a real trainer, alive while a tick reads its status (on a loaded machine the
            # first tick may come late)
            log, deadline = sys.argv[1], time.monotonic() + 120
            while time.monotonic() < deadline:
                if os.path.exists(log) and any(
                        '"sample"' in line and '"failed"' in line for line in open(log)):
                    break
                time.sleep(0.05)
            sys.stderr.write("Traceback (most recent call last):\\nKeyError: 'from-stderr'\\n")
            sys.exit(1)
        '''))
        proc = subprocess.Popen(
            [*run_argv(tmp_path, "--notify", f"json://127.0.0.1:{server.port}/hook"), "--",
             sys.executable, str(script), str(tmp_path / "log.jsonl")],
            env=env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=180)
        finally:
            reap(proc)
        assert proc.returncode == 1, err.decode(errors="replace")[-2000:]
        message = server.wait_posts(1)[0][1]["message"]
        assert "KeyError: 'reported-by-session'" in message and "from-stderr" not in message

    def test_under_a_terminal_the_command_gets_one_too(self, tmp_path):
        """The watchdog's stderr is a terminal: the command's stderr is a tty of the same size
        (its own, read by us: the traceback is kept), and its bytes reach our terminal
        translated once ("a\\rb\\n" shows as "a\\rb\\r\\n")."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        ours = os.ttyname(slave)
        seen = tmp_path / "seen.txt"
        code = ("import os, sys; open(sys.argv[1], 'w').write(f'{sys.stderr.isatty()}|"
                "{tuple(os.get_terminal_size(2))}|{os.ttyname(2)}'); sys.stderr.write('a\\rb\\n'); "
                "raise ValueError('tty-boom')")
        proc = subprocess.Popen([*run_argv(tmp_path), "--", sys.executable, "-c", code, str(seen)],
                                env=env(), start_new_session=True, stdin=slave, stdout=slave,
                                stderr=slave)
        os.close(slave)
        data = bytearray()
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO: every holder of the terminal closed it
                        break
                    if not chunk:
                        break
                    data += chunk
                elif proc.poll() is not None:
                    break
            assert proc.wait(timeout=60) == 1, bytes(data)[-2000:]
        finally:
            reap(proc)
            os.close(master)
        isatty, size, name = seen.read_text().split("|")
        assert (isatty, size) == ("True", "(101, 33)")
        assert name != ours  # not our terminal itself: a pseudo-terminal we read
        assert b"a\rb\r\n" in data and b"a\rb\r\r\n" not in data
        assert b"ValueError: tty-boom\r\n" in data
        assert [d["traceback"].splitlines()[-1] for d in failed_decisions(tmp_path)] == [
            "ValueError: tty-boom"]

    def test_restarts_log_each_crash_with_its_traceback(self, tmp_path, server):
        """Under --restarts every crash event carries that run's traceback; the final failure too."""
        script = tmp_path / "crash.py"
        script.write_text("import os, sys\nn = len(os.listdir(sys.argv[1]))\n"
                          "open(os.path.join(sys.argv[1], str(n)), 'w').close()\n"
                          "raise RuntimeError(f'crash-{n}')\n")
        (tmp_path / "runs").mkdir()
        proc = subprocess.Popen(
            [*run_argv(tmp_path, "--restarts", "1", "--restart-backoff", "200ms", "--notify",
                       f"json://127.0.0.1:{server.port}/hook"),
             "--", sys.executable, str(script), str(tmp_path / "runs")],
            env=env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=300)
        finally:
            reap(proc)
        assert proc.returncode == 1, err.decode(errors="replace")[-2000:]
        crashes = [e for e in events(tmp_path) if e.get("event") == "child_failed"]
        assert [c["traceback"].splitlines()[-1] for c in crashes] == ["RuntimeError: crash-0",
                                                                      "RuntimeError: crash-1"]
        assert all(c["traceback"].startswith("Traceback (most recent call last):\n") for c in crashes)
        assert [d["traceback"].splitlines()[-1] for d in failed_decisions(tmp_path)] == ["RuntimeError: crash-1"]
        assert "RuntimeError: crash-1" in server.wait_posts(1)[0][1]["message"]


class TestDetached:
    def test_a_detached_run_reads_the_tail_from_its_output_file(self, tmp_path, server):
        """`run --detach`: the command writes to <log>.out itself, and the failure message
        quotes the traceback read back from that file."""
        script = tmp_path / "boom.py"
        script.write_text("import os, sys\nopen(sys.argv[1], 'w').write(os.readlink('/proc/self/fd/2'))\n"
                          + BOOM)
        detached = subprocess.run(
            [*run_argv(tmp_path, "--detach", "--notify", f"json://127.0.0.1:{server.port}/hook"), "--",
             sys.executable, str(script), str(tmp_path / "fd2")],
            env=env(), capture_output=True, text=True, timeout=180)
        assert detached.returncode == 0, detached.stderr
        pid = int(re.search(r"detached \(pid (\d+)\)", detached.stdout).group(1))
        try:
            posts = server.wait_posts(1, timeout_s=180)
            assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                            open(f"/proc/{pid}/stat").read().split()[2] == "Z",
                            "the detached daemon to exit", timeout=120)
        finally:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        out = Path(f"{tmp_path / 'log.jsonl'}.out")
        assert (tmp_path / "fd2").read_text() == str(out)
        # the traceback lines moved by the two lines added at the top of BOOM
        expected = boom_traceback(script).replace("line 5,", "line 7,").replace("line 4,", "line 6,")
        assert posts[0][1]["title"] == "training failed (exit code 1)"
        assert posts[0][1]["message"].startswith("traceback (last lines):\n" + expected + "\n")
        assert [d["traceback"] for d in failed_decisions(tmp_path)] == [expected]
