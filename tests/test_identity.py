"""Signals go only to a process the kernel proves to be the trainer or the daemon; run-dir paths
that another user could swap are refused; hostile protocol files are bounded (issue 18)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator, List

import pytest
import structlog
from fakes import sample, status

from session_watchdog import channel, identity, wrap
from session_watchdog.actions import Actions, signal_trainer
from session_watchdog.channel import ChannelError, Request, RunDir, RunDirError
from session_watchdog.policy import Decision, Outstanding, PolicyState, acknowledges, decide

CLI = [sys.executable, "-m", "session_watchdog"]
WAIT_S = 60.0

# A process that records SIGUSR1/SIGTERM in a file instead of dying, optionally holding an flock
# on argv[2] (argv[3]: "lock" | "open" | "fork-lock"). Prints its pid (or its forked child's).
DECOY = textwrap.dedent("""
    import fcntl, os, signal, sys, time
    record, target, how = sys.argv[1], sys.argv[2], sys.argv[3]
    def note(signum, frame):
        with open(record, "a") as fh:
            fh.write(signal.Signals(signum).name + "\\n")
    signal.signal(signal.SIGUSR1, note)
    signal.signal(signal.SIGTERM, note)
    if how in ("lock", "open", "fork-lock"):
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
        if how != "open":
            fcntl.flock(fd, fcntl.LOCK_SH if target.endswith("run.lock") else fcntl.LOCK_EX)
    if how == "nobody":  # another uid (the interpreter is already loaded: / may be 0700)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    if how == "fork-lock":
        child = os.fork()
        if child == 0:
            print(os.getpid(), flush=True)  # the child holds the lock its parent took
            time.sleep(300)
            os._exit(0)
        time.sleep(300)
    print(os.getpid(), flush=True)
    time.sleep(300)
""")


class Decoys:
    """Spawned decoy processes; every one is killed (by process group) at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: List[subprocess.Popen] = []

    def spawn(self, target: Path = Path("/nonexistent"), how: str = "none") -> tuple[int, Path]:
        record = self.tmp_path / f"decoy-{len(self.procs)}.signals"
        proc = subprocess.Popen([sys.executable, "-c", DECOY, str(record), str(target), how],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        return pid, record

    def close(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=WAIT_S)


@pytest.fixture
def decoys(tmp_path: Path) -> Iterator[Decoys]:
    found = Decoys(tmp_path)
    try:
        yield found
    finally:
        found.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] not in ("Z", "X")
    except FileNotFoundError:
        return False


def create_time(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (exit 2), no traceback."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# The proof


class TestTrainerPidProven:
    def test_the_holder_of_run_lock_is_proven(self, tmp_path, decoys):
        """A process with an flock on this run dir's run.lock is the trainer."""
        rd = RunDir(tmp_path / "run")
        pid, _ = decoys.spawn(rd.file(channel.RUN_LOCK), "lock")
        assert identity.trainer_pid_proven(rd, pid) is None

    def test_a_child_that_inherited_the_lock_across_fork_is_proven(self, tmp_path, decoys):
        """flock belongs to the open file: a forked child holds its parent's lock (/proc/locks
        names only the parent)."""
        rd = RunDir(tmp_path / "run")
        child, _ = decoys.spawn(rd.file(channel.RUN_LOCK), "fork-lock")
        assert identity.trainer_pid_proven(rd, child) is None

    def test_run_lock_open_without_a_lock_is_not_proof(self, tmp_path, decoys):
        """Having run.lock open is not holding it."""
        rd = RunDir(tmp_path / "run")
        pid, _ = decoys.spawn(rd.file(channel.RUN_LOCK), "open")
        assert identity.trainer_pid_proven(rd, pid) == f"pid {pid} does not hold run.lock"

    def test_a_lock_on_another_run_dirs_run_lock_is_not_proof(self, tmp_path, decoys):
        """The lock must be on this run dir's run.lock (same device and inode), not on a namesake."""
        rd = RunDir(tmp_path / "run")
        other = RunDir(tmp_path / "other")
        rd.lock(channel.RUN_LOCK).acquire()  # the file exists here too
        pid, _ = decoys.spawn(other.file(channel.RUN_LOCK), "lock")
        assert identity.trainer_pid_proven(rd, pid) == f"pid {pid} does not hold run.lock"

    @pytest.mark.parametrize("pid, reason", [
        (1, "pid 1 is never signalled (init or a process group)"),
        (0, "pid 0 is never signalled (init or a process group)"),
        (-1, "pid -1 is never signalled (init or a process group)"),
        (2**40, f"pid {2**40} is above the kernel's pid limit"),
        ("x", "pid 'x' is not a process id"),
        (True, "pid 'True' is not a process id"),
        (float("nan"), "pid 'nan' is not a process id"),
    ])
    def test_impossible_pids_are_refused(self, tmp_path, pid, reason):
        """pid <= 1, huge, or not an integer: refused with the reason, before any lookup."""
        assert identity.trainer_pid_proven(RunDir(tmp_path / "run"), pid) == reason

    def test_our_own_pid_is_refused_even_while_we_hold_run_lock(self, tmp_path):
        """The watchdog never signals itself, even when it holds run.lock (the end transaction)."""
        rd = RunDir(tmp_path / "run")
        lock = rd.lock(channel.RUN_LOCK)
        lock.acquire()
        assert identity.trainer_pid_proven(rd, os.getpid()) == f"pid {os.getpid()} is this watchdog itself"

    def test_another_users_process_is_refused(self, tmp_path, decoys):
        """A process of another uid is refused whatever it holds (as root, everything could be
        signalled)."""
        if os.geteuid() != 0:
            pytest.skip("starting a process as another uid needs root")
        pid, _ = decoys.spawn(how="nobody")
        assert identity.trainer_pid_proven(RunDir(tmp_path / "run"), pid) == \
            f"pid {pid} belongs to uid 65534, not to us (uid 0)"

    def test_the_wrapped_childs_process_group_is_proven_without_the_lock(self, tmp_path, decoys):
        """A process in the group of the command we wrapped ourselves is ours to signal."""
        rd = RunDir(tmp_path / "run")
        pid, _ = decoys.spawn()  # start_new_session: its own group, pgid == pid
        assert identity.trainer_pid_proven(rd, pid, child_pgid=pid) is None
        assert identity.trainer_pid_proven(rd, pid) == f"{rd.file(channel.RUN_LOCK)} is missing or not a regular file"


class TestForgedTrainerJsonGetsNoSignal:
    """A forged or stale trainer.json names a process: the request is written, no signal is sent."""

    def _send(self, rd: RunDir, pid: int, times: int = 3) -> List[dict]:
        forged = status(pid=pid, start_time=create_time(pid) if pid > 1 else 1.0,
                        extra={"sigusr1": True})
        rd.write_status(forged)
        actions = Actions(rd)
        with structlog.testing.capture_logs() as events:
            for _ in range(times):
                actions.send_request(Decision("request", "session_limit", action="stop", seq=1,
                                              rid="abc.1"), sample(trainer_status=forged, alive=True))
        assert rd.read_request().rid == "abc.1"  # the trainer still reads the request
        return events

    def test_an_unrelated_process_of_the_same_user_is_not_signalled(self, tmp_path, decoys):
        """trainer.json names a decoy (pid and create time right) while the real trainer holds
        run.lock: the decoy gets nothing, and the refusal is logged once."""
        rd = RunDir(tmp_path / "run")
        decoys.spawn(rd.file(channel.RUN_LOCK), "lock")  # the real trainer
        decoy, record = decoys.spawn()
        events = self._send(rd, decoy)
        written = [e["signal"] for e in events if e.get("step") == "request_written"]
        assert written == ["refused"] * 3
        refused = [e for e in events if e["event"] == "signal_refused"]
        assert [(e["pid"], e["reason"]) for e in refused] == [(decoy, f"pid {decoy} does not hold run.lock")]
        assert alive(decoy) and not record.exists()

    def test_pid_1_and_minus_1_are_refused_without_an_error(self, tmp_path):
        """PID 1 (a container's init) and -1 (every process) are refused; the tick goes on."""
        rd = RunDir(tmp_path / "run")
        for pid in (1, -1):
            events = self._send(rd, pid, times=1)
            assert [e["signal"] for e in events if e.get("step") == "request_written"] == ["refused"]

    def test_the_daemon_itself_is_not_signalled(self, tmp_path):
        """trainer.json naming the daemon's own pid: no SIGUSR1 to ourselves (it killed the daemon)."""
        got: List[int] = []
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
        try:
            rd = RunDir(tmp_path / "run")
            events = self._send(rd, os.getpid())
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert got == []
        assert [e["reason"] for e in events if e["event"] == "signal_refused"] == \
            [f"pid {os.getpid()} is this watchdog itself"]

    def test_the_real_trainer_is_signalled(self, tmp_path, decoys):
        """The process that holds run.lock and wrote its status gets its wake-up."""
        rd = RunDir(tmp_path / "run")
        pid, record = decoys.spawn(rd.file(channel.RUN_LOCK), "lock")
        forged = status(pid=pid, start_time=create_time(pid), extra={"sigusr1": True})
        assert signal_trainer(forged, rd) == "sent"
        deadline = time.monotonic() + WAIT_S
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert record.read_text() == "SIGUSR1\n"


# --------------------------------------------------------------------------------------------
# session-watchdog stop


class TestStopSignalsOnlyTheDaemonLockHolder:
    def _run_dir(self, tmp_path: Path, decoys: Decoys, daemon_json: str | None) -> tuple[Path, int, Path]:
        rd = RunDir(tmp_path / "run")
        holder, holder_record = decoys.spawn(rd.file(channel.DAEMON_LOCK), "lock")
        if daemon_json is not None:
            (rd.path / "daemon.json").write_text(daemon_json)
        return rd.path, holder, holder_record

    def _stop(self, run_dir: Path) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "stop", "--run-dir", str(run_dir)], capture_output=True,
                              text=True, timeout=WAIT_S)

    def test_daemon_json_naming_a_decoy_is_refused(self, tmp_path, decoys):
        """daemon.json names an unrelated process: stop refuses (exit 2) and the decoy is untouched."""
        decoy, record = decoys.spawn()
        run_dir, holder, _ = self._run_dir(tmp_path, decoys, json.dumps({"v": 1, "pid": decoy}))
        line = one_line_error(self._stop(run_dir))
        assert line.startswith(f"session-watchdog: error: not stopping: pid {decoy} does not hold daemon.lock")
        assert alive(decoy) and not record.exists() and alive(holder)

    @pytest.mark.parametrize("daemon_json, reason", [
        ('{"v": 1, "pid": 1}', "pid 1 is never signalled"),
        ('{"v": 1, "pid": -1}', "pid -1 is never signalled"),
        ('{"v": 1, "pid": "x"}', "pid 'x' is not a process id"),
        ('{"v": 1, "pid": NaN}', "pid 'nan' is not a process id"),
        ('{"v": 1}', "pid 'None' is not a process id"),
        ('{"v": 1, "pid": 1' + "0" * 300 + "}", "is out of range"),
    ])
    def test_hostile_pids_are_refused_with_one_line(self, tmp_path, decoys, daemon_json, reason):
        """PID 1, -1, a string, NaN, no pid: exit 2, one line, and the lock holder lives on."""
        run_dir, holder, holder_record = self._run_dir(tmp_path, decoys, daemon_json)
        line = one_line_error(self._stop(run_dir))
        if "out of range" in reason:
            assert "not stopping" in line
        else:
            assert f"not stopping: {reason}" in line
        assert alive(holder) and not holder_record.exists()

    def test_daemon_json_that_is_a_directory(self, tmp_path, decoys):
        """daemon.json as a directory: stop refuses with one line; status reports it; no traceback."""
        run_dir, holder, _ = self._run_dir(tmp_path, decoys, None)
        (run_dir / "daemon.json").mkdir()
        line = one_line_error(self._stop(run_dir))
        assert "daemon.json is not a regular file" in line
        shown = subprocess.run([*CLI, "status", "--run-dir", str(run_dir)], capture_output=True,
                               text=True, timeout=WAIT_S)
        assert shown.returncode == 0 and shown.stderr == ""
        assert f"problem: {run_dir / 'daemon.json'} is not a regular file" in shown.stdout
        assert alive(holder)

    def test_the_lock_holder_named_in_daemon_json_is_stopped(self, tmp_path, decoys):
        """daemon.json names the process that holds daemon.lock: SIGTERM reaches it."""
        rd = RunDir(tmp_path / "run")
        holder, record = decoys.spawn(rd.file(channel.DAEMON_LOCK), "lock")
        (rd.path / "daemon.json").write_text(json.dumps({"v": 1, "pid": holder}))
        # the decoy records SIGTERM instead of exiting: the lock stays, so stop waits and says so
        assert wrap.stop_daemon(rd.path, timeout_s=0.5) == "still-running"
        deadline = time.monotonic() + WAIT_S
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert record.read_text() == "SIGTERM\n"

    def test_status_with_nan_session_start_and_odd_pid(self, tmp_path):
        """status shows a daemon.json with session_start NaN and pid "x" without a traceback."""
        rd = RunDir(tmp_path / "run")
        (rd.path / "daemon.json").write_text(
            '{"v": 1, "pid": "x", "session_start": NaN, "budget_s": 1e999}')
        shown = subprocess.run([*CLI, "status", "--run-dir", str(rd.path)], capture_output=True,
                               text=True, timeout=WAIT_S)
        assert shown.returncode == 0 and shown.stderr == ""
        assert "session          - elapsed, no budget" in shown.stdout

    def test_run_with_daemon_json_a_directory(self, tmp_path):
        """run refuses a run dir whose daemon.json is a directory with one line (exit 2)."""
        rd = RunDir(tmp_path / "run")
        (rd.path / "daemon.json").mkdir()
        proc = subprocess.run([*CLI, "run", "--for", "1s", "--run-dir", str(rd.path), "--log-file",
                               str(tmp_path / "log.jsonl")], capture_output=True, text=True,
                              timeout=WAIT_S)
        assert one_line_error(proc) == (f"session-watchdog: error: cannot write {rd.path / 'daemon.json'}: "
                                        "it is a directory; remove it or choose another --run-dir")


# --------------------------------------------------------------------------------------------
# The run directory's path


class TestRunDirPath:
    def test_an_ancestor_others_may_write_is_refused(self, tmp_path):
        """A non-sticky world-writable ancestor lets its users swap the run dir: refused."""
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        with pytest.raises(RunDirError) as info:
            RunDir(shared / "a" / "run")
        assert str(info.value) == (
            f"run dir {shared / 'a' / 'run'} is below {shared}, which other users may write to "
            "(mode 777, not sticky); choose a run dir below a directory of yours")
        assert not (shared / "a").exists()  # refused before anything was created

    def test_a_sticky_ancestor_is_accepted(self, tmp_path):
        """Like /tmp: in a sticky directory others cannot rename what is ours."""
        shared = tmp_path / "sticky"
        shared.mkdir()
        shared.chmod(0o1777)
        assert RunDir(shared / "run").path == shared / "run"

    def test_a_group_writable_ancestor_behind_a_symlink_is_refused(self, tmp_path):
        """The path's own chain counts: a link inside a group-writable dir could be swapped."""
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o770)
        safe = tmp_path / "safe"
        safe.mkdir(mode=0o700)
        (shared / "link").symlink_to(safe)
        with pytest.raises(RunDirError, match=f"is below {shared}, which other users may write to"):
            RunDir(shared / "link" / "run")

    def test_an_ancestor_owned_by_another_user_is_refused(self, tmp_path):
        """A parent owned by another user (who could rename it) is refused, even as root."""
        if os.geteuid() != 0:
            pytest.skip("chown to another uid needs root")
        parent = tmp_path / "alice"
        parent.mkdir(mode=0o755)
        os.chown(parent, 65534, -1)
        with pytest.raises(RunDirError, match=f"is below {parent}, owned by uid 65534"):
            RunDir(parent / "run")

    def test_a_run_dir_swapped_after_the_check_changes_nothing(self, tmp_path, decoys):
        """The directory is held open: after a rename and a planted replacement, requests still go
        to the checked directory, and the planted trainer.json and run.lock are never read."""
        path = tmp_path / "run"
        rd = RunDir(path)
        path.rename(tmp_path / "moved")
        path.mkdir(mode=0o700)  # the attacker's directory at the checked name
        RunDir(path).write_status(status(pid=1, extra={"sigusr1": True}))
        decoys.spawn(path / channel.RUN_LOCK, "lock")
        rd.write_request(Request(1, "stop", "session_limit", None, time.time(), rid="abc.1"))
        assert not (path / channel.REQUEST_FILE).exists()
        assert RunDir(tmp_path / "moved").read_request().rid == "abc.1"
        assert rd.read_status() is None and not rd.trainer_alive()

    def test_run_and_doctor_refuse_an_existing_0755_dir_without_changing_it(self, tmp_path):
        """A directory we did not create keeps its mode: run exits 2, doctor says FIX, one-line fix."""
        existing = tmp_path / "home"
        existing.mkdir(mode=0o755)
        existing.chmod(0o755)
        proc = subprocess.run([*CLI, "run", "--for", "1s", "--run-dir", str(existing), "--log-file",
                               str(tmp_path / "log.jsonl")], capture_output=True, text=True,
                              timeout=WAIT_S)
        assert one_line_error(proc) == (f"session-watchdog: error: run dir {existing} is mode 0755 (not "
                                        f"0700); choose a new directory or run 'chmod 700 {existing}'")
        doctor = subprocess.run([*CLI, "doctor", "--run-dir", str(existing)], capture_output=True,
                                text=True, timeout=WAIT_S)
        assert doctor.returncode == 1 and f"[FIX ] run dir             run dir {existing} is mode 0755" in doctor.stdout
        assert existing.stat().st_mode & 0o777 == 0o755

    def test_the_root_directory_is_refused(self):
        """--run-dir / (a slip) is refused whatever its mode."""
        with pytest.raises(RunDirError, match="run dir / is the root directory; choose a new directory"):
            RunDir(Path("/"))

    def test_a_run_dir_below_a_regular_file(self, tmp_path):
        """afile/run: one line from run, RunDirError from Session(), FIX from doctor."""
        afile = tmp_path / "afile"
        afile.write_text("x")
        expected = f"run dir {afile / 'run'} is below {afile}, which is not a directory; choose another --run-dir"
        proc = subprocess.run([*CLI, "run", "--for", "1s", "--run-dir", str(afile / "run"), "--log-file",
                               str(tmp_path / "log.jsonl")], capture_output=True, text=True,
                              timeout=WAIT_S)
        assert one_line_error(proc) == f"session-watchdog: error: {expected}"
        doctor = subprocess.run([*CLI, "doctor", "--run-dir", str(afile / "run")], capture_output=True,
                                text=True, timeout=WAIT_S)
        assert doctor.returncode == 1 and f"[FIX ] run dir             {expected}" in doctor.stdout
        code = ("import sys, torch\nfrom session_watchdog.trainer import Session\n"
                "try:\n    Session(model=torch.nn.Linear(1, 1), run_dir=sys.argv[1], checkpoint_dir=sys.argv[2])\n"
                "except Exception as err:\n    print(type(err).__name__, err)\n")
        session = subprocess.run([sys.executable, "-c", code, str(afile / "run"), str(tmp_path / "ck")],
                                 capture_output=True, text=True, timeout=WAIT_S)
        assert session.stdout.strip() == f"RunDirError {expected}"


# --------------------------------------------------------------------------------------------
# Bounded input


DEEP = "[" * 5000 + "]" * 5000


class TestBoundedInput:
    @pytest.mark.parametrize("name", ["trainer.json", "request.json", "state.json", "session.json"])
    def test_json_nested_5000_levels_is_refused_before_parsing(self, tmp_path, name):
        """A 5,000-level document is a ChannelError (quarantined by callers), not a RecursionError."""
        rd = RunDir(tmp_path / "run")
        (rd.path / name).write_text('{"v": 1, "x": ' + DEEP + "}")
        with pytest.raises(ChannelError, match=f"{name} nests deeper than 32 levels"):
            rd.read(name)

    def test_brackets_inside_strings_do_not_count(self, tmp_path):
        """Depth is counted outside strings: a reason full of brackets is fine."""
        rd = RunDir(tmp_path / "run")
        rd.write(channel.REQUEST_FILE, {"v": 1, "seq": 1, "action": "stop", "reason": "[{" * 1000 + '"\\',
                                        "deadline": None, "issued": 1.0})
        assert rd.read_request().reason == "[{" * 1000 + '"\\'

    @pytest.mark.parametrize("raw", [b'[\\"' * 20000, b'["' * 32000, b'"' + b"\\" * 60000])
    def test_hostile_quotes_and_backslashes_are_malformed_not_deep(self, tmp_path, raw):
        """Quote/backslash soups (which made a string-skipping regex backtrack) are plain bad JSON."""
        rd = RunDir(tmp_path / "run")
        (rd.path / channel.REQUEST_FILE).write_bytes(raw)
        with pytest.raises(ChannelError, match="is not valid JSON|nests deeper"):
            rd.read_request()

    def test_status_daemon_and_session_go_on_past_deep_files(self, tmp_path):
        """status reports deep files as problems (exit 0); the daemon quarantines its deep state."""
        rd = RunDir(tmp_path / "run")
        for name in ("trainer.json", "request.json", "state.json", "session.json"):
            (rd.path / name).write_text('{"v": 1, "x": ' + DEEP + "}")
        shown = subprocess.run([*CLI, "status", "--run-dir", str(rd.path)], capture_output=True,
                               text=True, timeout=WAIT_S)
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        assert shown.stdout.count("nests deeper than 32 levels") == 4
        proc = subprocess.run([*CLI, "run", "--for", "1s", "--interval", "0.2s", "--run-dir", str(rd.path),
                               "--log-file", str(tmp_path / "log.jsonl")], capture_output=True, text=True,
                              timeout=WAIT_S)
        assert proc.returncode == 0, proc.stderr
        assert (rd.path / "state.json.bad").exists() and (rd.path / "session.json.bad").exists()

    def test_a_300_digit_seq_is_refused(self):
        """Every protocol integer is bounded: a schema-valid request with a 300-digit seq is malformed."""
        obj = {"v": 1, "seq": int("9" * 300), "action": "stop", "reason": "x", "deadline": None, "issued": 1.0}
        with pytest.raises(ChannelError, match="field 'seq' is out of range"):
            Request.from_json(obj)
        with pytest.raises(ChannelError, match="field 'deadline' is out of range"):
            Request.from_json({**obj, "seq": 1, "deadline": int("9" * 400)})

    def test_a_request_id_must_be_short_and_plain(self):
        """rid: 1-64 characters of a small alphabet (it lands in logs and comparisons)."""
        obj = {"v": 1, "seq": 1, "action": "stop", "reason": "x", "deadline": None, "issued": 1.0}
        assert Request.from_json({**obj, "rid": "0123abcd.7"}).rid == "0123abcd.7"
        for bad in ("", "a" * 65, "a b", 7, "x\n"):
            with pytest.raises(ChannelError, match="is not a request id"):
                Request.from_json({**obj, "rid": bad})


# --------------------------------------------------------------------------------------------
# Request identity across sessions (the daemon's side; the trainer's is in test_request_identity)


class TestAcknowledgementByRequestId:
    @pytest.mark.parametrize("acked_seq, acked_rid, out_rid, acked", [
        (6, "old.6", "new.1", False),  # a previous session's ack: not ours
        (6, "", "new.1", False),  # a fresh trainer that answered nothing yet
        (1, "new.1", "new.1", True),
        (0, "new.1", "new.1", True),  # the rid decides, not the seq
        (6, None, "new.1", True),  # an older trainer without rids: by seq
        (0, None, "new.1", False),
        (6, "old.6", "", True),  # a request without a rid (state from an older daemon): by seq
    ])
    def test_acknowledges(self, acked_seq, acked_rid, out_rid, acked):
        """An ack counts by rid when both sides have one, by seq otherwise."""
        st = dataclasses.replace(status(acked_seq=acked_seq), acked_rid=acked_rid)
        assert acknowledges(st, Outstanding(1, "stop", "session_limit", 0.0, rid=out_rid)) is acked

    def test_a_stale_acked_seq_does_not_acknowledge_a_new_sessions_stop(self):
        """New session: seq restarts at 1, trainer.json still says acked_seq 6 - the stop stays
        outstanding until the trainer echoes its rid."""
        from session_watchdog.config import Config
        from session_watchdog.platforms import Platform, resolve

        config = resolve(Config.build(max_session="1h"), Platform("generic", ("test",)))
        stale = dataclasses.replace(status(acked_seq=6, heartbeat=1.0), acked_rid="old.6")
        state = PolicyState(rid_prefix="new")
        state, decisions = decide(config, state, sample(elapsed=3590.0, trainer_status=stale))
        requests = [(d.action, d.seq, d.rid) for d in decisions if d.kind == "request"]
        assert requests == [("stop", 1, "new.1")]
        state, decisions = decide(config, state, sample(elapsed=3591.0, trainer_status=stale))
        assert not [d for d in decisions if d.kind == "ack"] and state.outstanding is not None
        answered = dataclasses.replace(stale, acked_seq=1, acked_rid="new.1")
        state, decisions = decide(config, state, sample(elapsed=3592.0, trainer_status=answered))
        assert [(d.kind, d.seq) for d in decisions if d.kind == "ack"] == [("ack", 1)]
        assert state.outstanding is None

    def test_the_rid_prefix_survives_the_state_file(self):
        """The prefix and the outstanding rid are saved with the daemon state; old states load."""
        state = PolicyState(seq=3, rid_prefix="feed",
                            outstanding=Outstanding(3, "stop", "x", 1.0, rid="feed.3"))
        again = PolicyState.from_json(json.loads(json.dumps(state.to_json())))
        assert (again.rid_prefix, again.outstanding.rid) == ("feed", "feed.3")
        legacy = state.to_json()
        del legacy["rid_prefix"], legacy["outstanding"]["rid"]
        assert PolicyState.from_json(legacy).outstanding.rid == ""

    @pytest.mark.parametrize("changes", [{"seq": 10**300}, {"rid_prefix": "a b"},
                                         {"rid_prefix": "x" * 33}, {"rid_prefix": 7}])
    def test_a_hostile_saved_state_is_refused(self, changes):
        """A saved seq or prefix that would build a request id the trainer rejects is malformed
        (the daemon quarantines state.json and starts fresh)."""
        with pytest.raises(ValueError):
            PolicyState.from_json({**PolicyState(seq=1, rid_prefix="ab").to_json(), **changes})
