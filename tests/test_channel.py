"""The daemon <-> trainer protocol: run-dir safety, atomic files, messages and kernel locks."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from session_watchdog import channel
from session_watchdog.channel import (
    MAX_FILE_BYTES,
    ChannelError,
    CheckpointInfo,
    FileLock,
    Request,
    RunDir,
    RunDirError,
    TrainerStatus,
)

# --------------------------------------------------------------------------------------------
# Helpers: real child processes that hold an flock (psutil's spawn_psproc is the model)

_HOLDER = (
    "import sys, time\n"
    "from session_watchdog.channel import FileLock\n"
    "lock = FileLock(sys.argv[1], shared=sys.argv[2] == 'shared')\n"
    "print('held' if lock.acquire(blocking=False) else 'busy', flush=True)\n"
    "time.sleep(600)\n"  # killed by the test (or the harness) long before
)


@dataclass
class Holder:
    proc: subprocess.Popen[str]
    reported: str  # "held" or "busy": what the child's non-blocking acquire returned


class Holders:
    """Starts lock-holding children and SIGKILLs whichever are left at teardown."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen[str]] = []

    def spawn(self, path: Path, mode: str) -> Holder:
        """A child that tries a non-blocking flock on ``path``; returns once it reported."""
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), mode],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        return Holder(proc, proc.stdout.readline().strip())

    def kill(self, holder: Holder) -> None:
        holder.proc.send_signal(signal.SIGKILL)
        holder.proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def holders() -> Iterator[Holders]:
    spawned = Holders()
    yield spawned
    spawned.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> RunDir:
    return RunDir(tmp_path / "run")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _request_obj(**changes: object) -> dict:
    obj = {"v": 1, "seq": 3, "action": "stop", "reason": "session_limit",
           "deadline": 1_800_000_100.5, "issued": 1_800_000_000.0}
    obj.update(changes)
    return obj


def _status_obj(**changes: object) -> dict:
    obj = {"v": 1, "pid": 4242, "start_time": 1_799_999_000.25, "state": "running", "step": 100,
           "epoch": 2, "step_time_s": 0.5, "acked_seq": 3, "last_checkpoint": None,
           "heartbeat": 1_800_000_000.0, "extra": {}}
    obj.update(changes)
    return obj


# --------------------------------------------------------------------------------------------
# The run directory


class TestEnsureRunDir:
    def test_creates_missing_dir_with_mode_0700(self, tmp_path: Path) -> None:
        """A missing run dir (and its missing parents) is created, the run dir itself 0700."""
        path = tmp_path / "a" / "b" / "run"
        assert channel.ensure_run_dir(path) == path
        assert _mode(path) == 0o700

    def test_refuses_symlink(self, tmp_path: Path) -> None:
        """A symlink as run dir is refused even when it points at a safe 0700 dir of ours."""
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        link = tmp_path / "link"
        link.symlink_to(real)
        with pytest.raises(RunDirError, match="symlink") as info:
            channel.ensure_run_dir(link)
        assert str(link) in str(info.value)

    def test_refuses_dangling_symlink(self, tmp_path: Path) -> None:
        """A dangling symlink is refused, and nothing is created at its target."""
        link = tmp_path / "link"
        link.symlink_to(tmp_path / "target")
        with pytest.raises(RunDirError, match="symlink"):
            channel.ensure_run_dir(link)
        assert not (tmp_path / "target").exists()

    def test_refuses_regular_file(self, tmp_path: Path) -> None:
        """A regular file at the run-dir path is refused as not a directory."""
        path = tmp_path / "run"
        path.write_text("x")
        with pytest.raises(RunDirError, match="not a directory"):
            channel.ensure_run_dir(path)

    @pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o720])
    def test_refuses_group_or_world_writable(self, tmp_path: Path, mode: int) -> None:
        """A dir that group or others may write is refused with the chmod command to fix it."""
        path = tmp_path / "run"
        path.mkdir()
        os.chmod(path, mode)
        with pytest.raises(RunDirError) as info:
            channel.ensure_run_dir(path)
        assert f"mode {mode:o}" in str(info.value)
        assert f"run 'chmod 700 {path}'" in str(info.value)
        assert _mode(path) == mode  # refused, not silently repaired

    def test_refuses_dir_owned_by_another_user(self, tmp_path: Path) -> None:
        """A dir owned by another uid is refused with both uids in the message."""
        if os.geteuid() != 0:
            pytest.skip("chown to another uid needs root")
        path = tmp_path / "run"
        path.mkdir(mode=0o700)
        os.chown(path, 12345, -1)
        with pytest.raises(RunDirError) as info:
            channel.ensure_run_dir(path)
        assert str(info.value) == (f"run dir {path} is owned by uid 12345, not by us (uid 0); "
                                   "choose another --run-dir")

    def test_refuses_readable_dir_instead_of_changing_its_mode(self, tmp_path: Path) -> None:
        """An existing 0755 dir (maybe $HOME given by mistake) is refused, its mode untouched."""
        path = tmp_path / "run"
        path.mkdir()
        os.chmod(path, 0o755)
        with pytest.raises(RunDirError) as info:
            channel.ensure_run_dir(path)
        assert str(info.value) == (f"run dir {path} is mode 0755 (not 0700); choose a new "
                                   f"directory or run 'chmod 700 {path}'")
        assert _mode(path) == 0o755

    def test_refuses_relative_path(self) -> None:
        """A relative run dir is refused before anything is created."""
        with pytest.raises(RunDirError, match="'run/here' is relative"):
            channel.ensure_run_dir(Path("run/here"))
        assert not Path("run").exists()


class TestDefaultRunDir:
    def test_explicit_env_wins(self) -> None:
        """$SESSION_WATCHDOG_RUN_DIR is used as given."""
        env = {"SESSION_WATCHDOG_RUN_DIR": "/x/run", "XDG_RUNTIME_DIR": "/"}
        assert channel.default_run_dir("r", env) == Path("/x/run")

    def test_xdg_runtime_dir_when_it_exists(self, tmp_path: Path) -> None:
        """An existing $XDG_RUNTIME_DIR holds session-watchdog/<run>."""
        env = {"XDG_RUNTIME_DIR": str(tmp_path)}
        assert channel.default_run_dir("r", env) == tmp_path / "session-watchdog" / "r"

    def test_cache_dir_otherwise(self, tmp_path: Path) -> None:
        """Without either variable (or with a missing runtime dir) it is under ~/.cache."""
        env = {"XDG_RUNTIME_DIR": str(tmp_path / "missing")}
        assert channel.default_run_dir("r", env) == (
            Path.home() / ".cache" / "session-watchdog" / "run" / "r")


# --------------------------------------------------------------------------------------------
# Atomic files


class TestAtomicWrite:
    def test_writes_new_file_with_mode_0600(self, tmp_path: Path) -> None:
        """The file holds exactly the data, is 0600, and no temp file is left behind."""
        path = tmp_path / "request.json"
        channel.atomic_write(path, b"hello")
        assert path.read_bytes() == b"hello"
        assert _mode(path) == 0o600
        assert os.listdir(tmp_path) == ["request.json"]

    def test_previous_file_intact_when_fsync_fails(self, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """An EIO from fsync leaves the old content whole and removes the temp file."""
        path = tmp_path / "request.json"
        channel.atomic_write(path, b'{"old":1}')

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError) as info:
            channel.atomic_write(path, b'{"new":2}' * 1000)
        assert info.value.errno == errno.EIO
        assert path.read_bytes() == b'{"old":1}'
        assert os.listdir(tmp_path) == ["request.json"]

    def test_previous_file_intact_when_replace_fails(self, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        """A failing rename leaves the old content whole and removes the temp file."""
        path = tmp_path / "request.json"
        channel.atomic_write(path, b"old")

        def failing_replace(src: object, dst: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="No space left"):
            channel.atomic_write(path, b"new")
        assert path.read_bytes() == b"old"
        assert os.listdir(tmp_path) == ["request.json"]

    def test_temp_is_0600_hidden_and_next_to_target(self, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """The temp lives in the target's directory, is 0600 even under umask 0, and is swept-able."""
        seen = []
        real_replace = os.replace

        def recording_replace(src: str, dst: str) -> None:
            seen.append((Path(src), _mode(Path(src)), Path(src).read_bytes()))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", recording_replace)
        old_umask = os.umask(0)
        try:
            channel.atomic_write(tmp_path / "trainer.json", b"data")
        finally:
            os.umask(old_umask)
        [(tmp, mode, content)] = seen
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(f".trainer.json.{os.getpid()}.")
        assert tmp.name.endswith(".sw-tmp")
        assert (mode, content) == (0o600, b"data")

    def test_open_exclusive_refuses_existing_file_and_symlink(self, tmp_path: Path) -> None:
        """open_exclusive (O_EXCL|O_NOFOLLOW) never opens an existing file or a planted link."""
        existing = tmp_path / "existing"
        existing.write_text("keep")
        target = tmp_path / "target"
        link = tmp_path / "link"
        link.symlink_to(target)
        with pytest.raises(FileExistsError):
            channel.open_exclusive(existing)
        with pytest.raises(FileExistsError):
            channel.open_exclusive(link)
        assert existing.read_text() == "keep"
        assert not target.exists()

    def test_write_json_replaces_planted_symlink_not_its_target(self, tmp_path: Path) -> None:
        """write_json onto a planted symlink replaces the link; the link's target is untouched."""
        outside = tmp_path / "outside.txt"
        outside.write_text("precious")
        run = RunDir(tmp_path / "run")
        planted = run.file(channel.REQUEST_FILE)
        planted.symlink_to(outside)
        channel.write_json(planted, {"v": 1, "seq": 1})
        assert not planted.is_symlink()
        assert planted.read_text() == '{"seq":1,"v":1}'
        assert outside.read_text() == "precious"

    def test_write_json_is_compact_and_sorted(self, tmp_path: Path) -> None:
        """write_json writes compact JSON with sorted keys."""
        path = tmp_path / "x.json"
        channel.write_json(path, {"b": [1, 2], "a": None, "v": 1})
        assert path.read_text() == '{"a":null,"b":[1,2],"v":1}'


class TestSweepTemps:
    def test_removes_only_temps_of_dead_writers(self, tmp_path: Path) -> None:
        """Hidden ``*.sw-tmp`` files of a dead pid go; a live writer's temp, protocol files and
        look-alikes stay."""
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        ours = [f".request.json.{dead.pid}.deadbeef.sw-tmp", f".trainer.json.{dead.pid}.0a0b0c0d.sw-tmp"]
        others = ["request.json", "trainer.json", "notes.sw-tmp", ".hidden",
                  ".state.json.1.abcd.sw-tmp.bak", "run.lock",
                  f".state.json.{os.getpid()}.cafe0001.sw-tmp"]  # a live writer's, mid-write
        for name in ours + others:
            (tmp_path / name).write_text("x")
        assert channel.sweep_temps(tmp_path) == 2
        assert sorted(os.listdir(tmp_path)) == sorted(others)

    def test_missing_directory_is_zero(self, tmp_path: Path) -> None:
        """A directory that does not exist has nothing to sweep."""
        assert channel.sweep_temps(tmp_path / "missing") == 0


class TestReadJson:
    def test_missing_file_is_none(self, tmp_path: Path) -> None:
        """A file that does not exist reads as None."""
        assert channel.read_json(tmp_path / "request.json") is None

    def test_reads_object(self, tmp_path: Path) -> None:
        """A well-formed schema-1 object is returned as a dict."""
        path = tmp_path / "x.json"
        path.write_text('{"v": 1, "seq": 2}')
        assert channel.read_json(path) == {"v": 1, "seq": 2}

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b'{"v": 1, "seq": ', "is not valid JSON"),
            (b"", "is not valid JSON"),
            (b'{"v": 1, "s": "\xff\xfe"}', "is not valid JSON"),
            (b"[1, 2]", "holds list, expected a JSON object"),
            (b'"v"', "holds str, expected a JSON object"),
            (b'{"v": 2, "seq": 1}', "has schema version 2, expected 1"),
            (b'{"seq": 1}', "has schema version None, expected 1"),
            (b'{"v": "1"}', "has schema version '1', expected 1"),
        ],
    )
    def test_bad_content_raises_naming_the_file(self, tmp_path: Path, content: bytes,
                                                message: str) -> None:
        """Malformed JSON, a non-object or a wrong schema version raises ChannelError naming the file."""
        path = tmp_path / "trainer.json"
        path.write_bytes(content)
        with pytest.raises(ChannelError) as info:
            channel.read_json(path)
        assert str(info.value).startswith(f"{path} ")
        assert message in str(info.value)

    @pytest.mark.parametrize("content", [
        b'{"v":1,"seq":2}', b' {"v": 1}\n', b'{"v":1}\n\n', b'\xef\xbb\xbf{"v": 1}',
        '{"v": 1, "s": "\u00e9"}'.encode("utf-16"), '{"v": 1}'.encode("utf-32-le"),
        b'{"v":1} {"v":1}', b'{"v":1}x', b'{"v":1,"x":NaN}', b'{"v":1,"s":"\x01"}', b"\t",
        b'{"v":1,"k":1,"k":2}', b'{"v":1,"s":"\xc3"}', b'{"v":1}\x00'])
    def test_accepts_and_refuses_what_json_loads_does(self, tmp_path: Path,
                                                      content: bytes) -> None:
        """The file is parsed exactly as json.loads parses its bytes (encodings, whitespace,
        a BOM, trailing data): the same object, or an error where json.loads raises."""
        path = tmp_path / "x.json"
        path.write_bytes(content)
        try:
            expected = json.loads(content)
        except ValueError:
            with pytest.raises(ChannelError, match="is not valid JSON"):
                channel.read_json(path)
        else:
            obj = channel.read_json(path)
            assert json.dumps(obj) == json.dumps(expected)  # NaN != NaN: compare the text

    def test_oversized_file_raises(self, tmp_path: Path) -> None:
        """A file over MAX_FILE_BYTES raises with its size and the limit, even when valid JSON."""
        path = tmp_path / "trainer.json"
        head = b'{"v":1,"pad":"'
        path.write_bytes(head + b"x" * (MAX_FILE_BYTES + 1 - len(head) - 2) + b'"}')
        assert path.stat().st_size == MAX_FILE_BYTES + 1
        with pytest.raises(ChannelError) as info:
            channel.read_json(path)
        assert str(info.value) == (
            f"{path} is {MAX_FILE_BYTES + 1} bytes, over the {MAX_FILE_BYTES}-byte limit")

    def test_file_of_exactly_the_limit_is_read(self, tmp_path: Path) -> None:
        """A file of exactly MAX_FILE_BYTES is still accepted."""
        path = tmp_path / "trainer.json"
        head = b'{"v":1,"pad":"'
        path.write_bytes(head + b"x" * (MAX_FILE_BYTES - len(head) - 2) + b'"}')
        obj = channel.read_json(path)
        assert obj is not None and len(obj["pad"]) == MAX_FILE_BYTES - len(head) - 2

    def test_directory_raises(self, tmp_path: Path) -> None:
        """A directory at a protocol file name is not a regular file."""
        path = tmp_path / "request.json"
        path.mkdir()
        with pytest.raises(ChannelError, match="is not a regular file"):
            channel.read_json(path)

    def test_fifo_raises_without_blocking(self, tmp_path: Path) -> None:
        """A FIFO planted at a protocol file name raises at once instead of hanging the reader."""
        path = tmp_path / "request.json"
        os.mkfifo(path)
        outcome: List[object] = []

        def read() -> None:
            try:
                outcome.append(channel.read_json(path))
            except ChannelError as err:
                outcome.append(err)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=30)  # "at once", with room for a loaded machine
        if reader.is_alive():  # unblock the stuck open() so the thread can end
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(timeout=5)
            pytest.fail("read_json blocked on a FIFO")
        [err] = outcome
        assert isinstance(err, ChannelError)
        assert str(err) == f"{path} is not a regular file"

    def test_symlink_raises_and_target_is_not_read(self, tmp_path: Path) -> None:
        """A planted request.json symlink raises; the valid request at its target is never used."""
        outside = tmp_path / "outside.json"
        outside.write_text(json.dumps(_request_obj()))
        run = RunDir(tmp_path / "run")
        run.file(channel.REQUEST_FILE).symlink_to(outside)
        with pytest.raises(ChannelError) as info:
            run.read_request()
        assert str(info.value) == f"{run.file(channel.REQUEST_FILE)} is a symlink; refusing to read it"

    def test_reading_leaves_the_access_time_alone(self, run_dir: RunDir) -> None:
        """The daemon's read of a fresh trainer.json does not write its access time back (relatime
        would: the access time is older than the change)."""
        run_dir.write(channel.TRAINER_FILE, _status_obj())
        path = run_dir.file(channel.TRAINER_FILE)
        os.utime(path, ns=(1_000_000_000, path.stat().st_mtime_ns))
        assert run_dir.read_status() is not None
        assert path.stat().st_atime_ns == 1_000_000_000

    def test_a_file_of_another_owner_is_read_without_noatime(
            self, run_dir: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where the kernel refuses O_NOATIME (EPERM: not the file's owner) the file is still
        read, and later reads stop asking for it."""
        run_dir.write(channel.TRAINER_FILE, _status_obj())
        expected = TrainerStatus.from_json(_status_obj())
        asked: List[bool] = []
        real_open = os.open

        def open_as_non_owner(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            asked.append(bool(flags & os.O_NOATIME))
            if flags & os.O_NOATIME:
                raise PermissionError(errno.EPERM, "Operation not permitted")
            return real_open(name, flags, *args, **kwargs)

        monkeypatch.setattr(channel, "_noatime_refused", False)
        monkeypatch.setattr(os, "open", open_as_non_owner)
        assert run_dir.read_status() == expected
        assert run_dir.read_status() == expected
        assert asked == [True, False, False]


class TestQuarantine:
    def test_moves_file_to_bad(self, tmp_path: Path) -> None:
        """The file moves to ``<name>.bad`` with its content; the name is free again."""
        path = tmp_path / "state.json"
        path.write_text("{broken")
        assert channel.quarantine(path) == tmp_path / "state.json.bad"
        assert not path.exists()
        assert (tmp_path / "state.json.bad").read_text() == "{broken"

    def test_keeps_one_bad_copy(self, tmp_path: Path) -> None:
        """A second quarantine replaces the earlier ``.bad`` file."""
        path = tmp_path / "state.json"
        path.write_text("first")
        channel.quarantine(path)
        path.write_text("second")
        channel.quarantine(path)
        assert sorted(os.listdir(tmp_path)) == ["state.json.bad"]
        assert (tmp_path / "state.json.bad").read_text() == "second"

    def test_missing_file_is_none(self, tmp_path: Path) -> None:
        """Quarantining a file that is not there does nothing and returns None."""
        assert channel.quarantine(tmp_path / "state.json") is None
        assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Messages


class TestRequest:
    def test_round_trip_through_run_dir(self, run_dir: RunDir) -> None:
        """A written request reads back equal, as the exact schema-1 JSON on disk."""
        request = Request(seq=3, action="stop", reason="session_limit",
                          deadline=1_800_000_100.5, issued=1_800_000_000.0)
        run_dir.write_request(request)
        assert run_dir.read_request() == request
        assert json.loads(run_dir.file(channel.REQUEST_FILE).read_text()) == _request_obj()

    def test_deadline_may_be_null(self) -> None:
        """A request without a deadline parses with ``deadline=None``."""
        request = Request.from_json(_request_obj(action="checkpoint", deadline=None))
        assert request == Request(3, "checkpoint", "session_limit", None, 1_800_000_000.0)

    def test_no_request_is_none(self, run_dir: RunDir) -> None:
        """Before the daemon writes one there is no request."""
        assert run_dir.read_request() is None

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"action": "pause"}, "request action 'pause' is not one of ('checkpoint', 'stop')"),
            ({"action": None}, "field 'action' is None, expected a string"),
            ({"seq": "3"}, "field 'seq' is '3', expected an integer"),
            ({"seq": True}, "field 'seq' is True, expected an integer"),
            ({"seq": 2.0}, "field 'seq' is 2.0, expected an integer"),
            ({"seq": 0}, "request seq 0 is not positive"),
            ({"reason": 5}, "field 'reason' is 5, expected a string"),
            ({"deadline": "soon"}, "field 'deadline' is 'soon', expected a finite number"),
            ({"issued": None}, "field 'issued' is None, expected a finite number"),
        ],
    )
    def test_invalid_fields_raise(self, changes: dict, message: str) -> None:
        """A field of the wrong type or an unknown action raises ChannelError saying which."""
        with pytest.raises(ChannelError) as info:
            Request.from_json(_request_obj(**changes))
        assert str(info.value) == message

    def test_malformed_request_file_raises(self, run_dir: RunDir) -> None:
        """read_request raises for a file whose fields are wrong, not only for bad JSON."""
        run_dir.file(channel.REQUEST_FILE).write_text(json.dumps(_request_obj(action="reboot")))
        with pytest.raises(ChannelError, match="request action 'reboot'"):
            run_dir.read_request()


_STATUS_KEYS = ("pid", "start_time", "state", "step", "epoch", "step_time_s", "acked_seq",
                "last_checkpoint", "heartbeat", "extra", "acked_rid")
# plain values, edge values and wrong types, for every field
_EDGE_VALUES = [None, True, False, 0, 7, -1, 2**53, 2**53 + 1, -(2**53), -(2**53) - 1, 0.0, -0.0,
                2.5, 1.8e9, float("inf"), float("-inf"), float("nan"), "", "ab12.3", "x" * 65,
                "a b", *channel.TRAINER_STATES, {}, {"k": 1}, [], [1],
                {"path": "/c.pt", "step": 3, "at": 1.0, "duration_s": 2.0, "bytes": 9,
                 "sha256": "ab"}, {"path": 3}]
_REMOVED = object()  # the field is left out


class TestTrainerStatus:
    def test_round_trip_with_checkpoint_and_extra(self, run_dir: RunDir) -> None:
        """A status with a checkpoint and extra fields reads back equal."""
        ckpt = CheckpointInfo(path="/ckpt/step-100.pt", seq=3, step=100, at=1_800_000_050.0,
                              duration_s=12.5, bytes=2**31, sha256="ab" * 32)
        status = TrainerStatus(pid=4242, start_time=1_799_999_000.25, state="saving", step=100,
                               epoch=2, step_time_s=0.5, acked_seq=3, last_checkpoint=ckpt,
                               heartbeat=1_800_000_000.0, extra={"loss": 0.25, "tags": ["a"]})
        run_dir.write_status(status)
        assert run_dir.read_status() == status
        on_disk = json.loads(run_dir.file(channel.TRAINER_FILE).read_text())
        assert on_disk["v"] == 1
        assert on_disk["last_checkpoint"] == {
            "path": "/ckpt/step-100.pt", "seq": 3, "step": 100, "at": 1_800_000_050.0,
            "duration_s": 12.5, "bytes": 2**31, "sha256": "ab" * 32}

    def test_optional_fields_may_be_null(self) -> None:
        """step_time_s and last_checkpoint may be null; extra may be absent."""
        obj = _status_obj(step_time_s=None)
        del obj["extra"]
        status = TrainerStatus.from_json(obj)
        assert (status.step_time_s, status.last_checkpoint, status.extra) == (None, None, {})

    def test_quick_path_agrees_with_the_checks_for_every_single_field_change(self) -> None:
        """Each field set to each edge value (or removed), and each pair of such changes: from_json
        returns or refuses exactly as the field-by-field checks do."""
        changes: List[Dict[str, Any]] = [{key: value} for key in _STATUS_KEYS
                                         for value in [*_EDGE_VALUES, _REMOVED]]
        seconds = [{key: value} for key in _STATUS_KEYS
                   for value in (None, -0.0, 2**53 + 1, float("nan"), "x" * 65, _REMOVED)]
        for one in changes:
            for two in [{}, *seconds]:
                obj: Dict[str, Any] = {**_status_obj(), **one, **two}
                obj = {k: v for k, v in obj.items() if v is not _REMOVED}
                try:
                    expected: Any = TrainerStatus._checked(obj)
                except ChannelError as err:
                    with pytest.raises(ChannelError) as info:
                        TrainerStatus.from_json(obj)
                    assert str(info.value) == str(err), obj
                else:
                    assert repr(TrainerStatus.from_json(obj)) == repr(expected), obj

    @pytest.mark.parametrize("state", channel.TRAINER_STATES)
    def test_every_known_state_parses(self, state: str) -> None:
        """Each documented trainer state is accepted."""
        assert TrainerStatus.from_json(_status_obj(state=state)).state == state

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"state": "sleeping"}, "trainer state 'sleeping' is not one of ('starting', "
             "'running', 'saving', 'stopping', 'stopped', 'completed', 'failed')"),
            ({"pid": "4242"}, "field 'pid' is '4242', expected an integer"),
            ({"step": 1.5}, "field 'step' is 1.5, expected an integer"),
            ({"epoch": None}, "field 'epoch' is None, expected an integer"),
            ({"step_time_s": "fast"}, "field 'step_time_s' is 'fast', expected a finite number"),
            ({"heartbeat": False}, "field 'heartbeat' is False, expected a finite number"),
            ({"last_checkpoint": []}, "last_checkpoint is [], expected an object"),
            ({"last_checkpoint": {"path": "/c.pt"}}, "field 'step' is None, expected an integer"),
            ({"extra": [1]}, "field 'extra' must be an object"),
        ],
    )
    def test_invalid_fields_raise(self, changes: dict, message: str) -> None:
        """A field of the wrong type or an unknown state raises ChannelError saying which."""
        with pytest.raises(ChannelError) as info:
            TrainerStatus.from_json(_status_obj(**changes))
        assert str(info.value) == message


# --------------------------------------------------------------------------------------------
# Locks


class TestLockHeld:
    def test_false_without_lock_file(self, run_dir: RunDir) -> None:
        """No run.lock at all means no trainer, and probing does not create the file."""
        assert run_dir.trainer_alive() is False
        assert not run_dir.file(channel.RUN_LOCK).exists()

    def test_false_with_no_holder(self, run_dir: RunDir) -> None:
        """A run.lock nobody holds (left by an earlier trainer) is not held."""
        run_dir.file(channel.RUN_LOCK).touch()
        assert channel.lock_held(run_dir.file(channel.RUN_LOCK)) is False

    def test_tracks_child_holding_shared_lock_until_sigkill(self, run_dir: RunDir,
                                                            holders: Holders) -> None:
        """True while a child holds a shared flock on run.lock; False right after SIGKILL."""
        child = holders.spawn(run_dir.file(channel.RUN_LOCK), "shared")
        assert child.reported == "held"
        assert run_dir.trainer_alive() is True
        holders.kill(child)
        assert run_dir.trainer_alive() is False

    def test_saving_tracks_exclusive_save_lock(self, run_dir: RunDir, holders: Holders) -> None:
        """trainer_saving is True while a child holds save.lock exclusively."""
        assert run_dir.trainer_saving() is False
        child = holders.spawn(run_dir.file(channel.SAVE_LOCK), "exclusive")
        assert child.reported == "held"
        assert run_dir.trainer_saving() is True
        assert run_dir.trainer_alive() is False

    def test_planted_symlink_raises(self, tmp_path: Path, run_dir: RunDir) -> None:
        """A lock file planted as a symlink raises ChannelError and creates nothing at its target."""
        target = tmp_path / "elsewhere.lock"
        run_dir.file(channel.RUN_LOCK).symlink_to(target)
        with pytest.raises(ChannelError) as info:
            run_dir.trainer_alive()
        assert str(info.value) == f"{run_dir.file(channel.RUN_LOCK)} is a symlink; refusing to lock it"
        with pytest.raises(ChannelError, match="is a symlink"):
            FileLock(run_dir.file(channel.RUN_LOCK), shared=True).acquire(blocking=False)
        assert not target.exists()


    def test_missing_free_held_and_planted_lock_files(
            self, tmp_path: Path, run_dir: RunDir, holders: Holders) -> None:
        """A missing lock file is free and stays missing; a free one is free, a held one held,
        and a planted symlink is refused without creating its target."""
        assert run_dir.trainer_saving() is False  # no save.lock yet
        assert not run_dir.file(channel.SAVE_LOCK).exists()  # the probe created none
        run_dir.file(channel.SAVE_LOCK).touch()
        assert run_dir.trainer_saving() is False  # there, nobody holds it
        child = holders.spawn(run_dir.file(channel.RUN_LOCK), "shared")
        assert child.reported == "held"
        assert run_dir.trainer_alive() is True
        run_dir.file(channel.SAVE_LOCK).unlink()
        run_dir.file(channel.SAVE_LOCK).symlink_to(tmp_path / "elsewhere.lock")
        with pytest.raises(ChannelError, match="is a symlink"):
            run_dir.trainer_saving()
        assert not (tmp_path / "elsewhere.lock").exists()


    def test_a_lock_under_a_file_is_not_held(self, tmp_path: Path) -> None:
        """A run dir path that runs through a regular file (`status --run-dir` given a file):
        no lock can be there, so none is held, as before the probe opened it directly."""
        (tmp_path / "a-file").write_text("x")
        assert channel.lock_held(tmp_path / "a-file" / channel.RUN_LOCK) is False


class TestFileLock:
    def test_shared_locks_in_two_processes_both_succeed(self, run_dir: RunDir,
                                                        holders: Holders) -> None:
        """Two children and this process all get a shared lock on the same file."""
        path = run_dir.file(channel.RUN_LOCK)
        first = holders.spawn(path, "shared")
        second = holders.spawn(path, "shared")
        assert (first.reported, second.reported) == ("held", "held")
        with FileLock(path, shared=True) as mine:
            assert mine.held is True

    def test_exclusive_fails_while_child_holds_shared(self, run_dir: RunDir,
                                                      holders: Holders) -> None:
        """A non-blocking exclusive lock returns False while another process holds a shared one."""
        path = run_dir.file(channel.RUN_LOCK)
        holders.spawn(path, "shared")
        lock = FileLock(path)
        assert lock.acquire(blocking=False) is False
        assert lock.held is False

    def test_shared_fails_while_child_holds_exclusive(self, run_dir: RunDir,
                                                      holders: Holders) -> None:
        """A child cannot take a shared lock while this process holds it exclusively."""
        path = run_dir.file(channel.SAVE_LOCK)
        with FileLock(path):
            child = holders.spawn(path, "shared")
            assert child.reported == "busy"

    def test_exclusive_succeeds_after_holder_killed(self, run_dir: RunDir,
                                                    holders: Holders) -> None:
        """The kernel drops a SIGKILLed holder's lock, so the daemon can take it at once."""
        path = run_dir.file(channel.RUN_LOCK)
        holders.kill(holders.spawn(path, "shared"))
        lock = FileLock(path)
        assert lock.acquire(blocking=False) is True
        lock.release()
        assert lock.held is False

    def test_acquire_is_idempotent_and_release_twice_is_safe(self, tmp_path: Path) -> None:
        """Acquiring a held lock again is True; releasing twice does nothing the second time."""
        lock = FileLock(tmp_path / "x.lock")
        assert lock.acquire() is True
        assert lock.acquire(blocking=False) is True
        lock.release()
        lock.release()
        assert lock.held is False
        assert channel.lock_held(tmp_path / "x.lock") is False

    def test_lock_file_is_created_0600(self, tmp_path: Path) -> None:
        """A lock file that did not exist is created with mode 0600."""
        with FileLock(tmp_path / "run.lock", shared=True):
            assert _mode(tmp_path / "run.lock") == 0o600
