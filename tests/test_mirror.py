"""The checkpoint mirror (issue 14): verified background copies to a second directory or to S3.

The mirror directory lives under /dev/shm (tmpfs), a different filesystem than the test's
tmp_path: a mirror on the checkpoint directory's filesystem is refused as "not a second copy".
Where /dev/shm is the same filesystem, the tests pass ``allow_same_filesystem=True`` (the
documented testing override). S3 is a real S3 API: moto's server on 127.0.0.1, through s3fs.
Faults are injected at our own boundary (``LocalTarget.write_chunk``) or by the kernel
(RLIMIT_FSIZE in a child, a directory removed mid-copy, a server stopped, SIGKILL).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import random
import resource
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
from ckpt_helpers import COMMITTED, fork_child, run_child, send
from conftest import TORCHRUN, heavy_n
from integration_helpers import wait_for
from torch_helpers import assert_same

from session_watchdog import channel
from session_watchdog.actions import EndTransaction
from session_watchdog.trainer import checkpoint
from session_watchdog.trainer.mirror import FsspecTarget, LocalTarget, Mirror
from session_watchdog.trainer.session import Session, StopTraining

WAIT_S = 60.0  # generous: the machine running the tests may be very busy


# --------------------------------------------------------------------------------------------
# Helpers


def model_and_optimizer(seed: int = 0) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(session: Session, steps: int) -> None:
    for _ in range(steps):
        session.optimizer.zero_grad()
        session.model(torch.randn(8, 16)).pow(2).mean().backward()
        session.optimizer.step()
        session.step()


def status_of(run_dir: Path) -> channel.TrainerStatus:
    found = channel.RunDir(run_dir).read_status()
    assert found is not None
    return found


def mirror_report(run_dir: Path) -> Dict[str, Any]:
    return status_of(run_dir).extra.get("mirror") or {}


def events(caplog: pytest.LogCaptureFixture, name: str) -> List[Dict[str, Any]]:
    return [r.fields for r in caplog.records if getattr(r, "event", None) == name]


def committed(directory: Path) -> List[str]:
    """Checkpoint names with their marker next to them, oldest first."""
    names = set(os.listdir(directory))
    return sorted(n for n in names if n.endswith(".pt") and n + ".sha256" in names)


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[Callable[..., Session]]:
    made: List[Session] = []

    def make(mirror: Any, **kwargs: Any) -> Session:
        model, optimizer = kwargs.pop("model_opt", None) or model_and_optimizer()
        kwargs.setdefault("run_dir", tmp_path / "run")
        kwargs.setdefault("poll_interval", 0.02)
        kwargs.setdefault("heartbeat_interval", 60.0)
        kwargs.setdefault("checkpoint_every", None)
        kwargs.setdefault("handle_signals", False)
        kwargs.setdefault("exit_on_stop", False)
        session = Session(kwargs.pop("checkpoint_dir", tmp_path / "ckpt"), model=model,
                          optimizer=optimizer, mirror=mirror, **kwargs)
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()


def local_mirror(path: Path, other_fs: bool, target: Optional[LocalTarget] = None, **kw: Any) -> Mirror:
    return Mirror(target or LocalTarget(path), allow_same_filesystem=not other_fs, **kw)


class RecordingTarget(LocalTarget):
    """Records the order of writes, verification reads and marker writes (our boundary)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.ops: List[Tuple[str, str]] = []

    def write(self, name: str, source_fd: int) -> int:
        written = super().write(name, source_fd)
        self.ops.append(("wrote", name))
        return written

    def read_chunks(self, name: str) -> Iterator[bytes]:
        yield from super().read_chunks(name)
        self.ops.append(("read back", name))

    def write_marker(self, name: str, data: bytes) -> None:
        self.ops.append(("marker", name))
        super().write_marker(name, data)


class GatedTarget(LocalTarget):
    """A mirror whose writes wait for ``gate``: a mirror as slow as the test wants."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.started = threading.Event()

    def write_chunk(self, fd: int, data: memoryview) -> int:
        self.started.set()
        if not self.gate.wait(WAIT_S):
            raise OSError(errno.ETIMEDOUT, "test gate never opened")
        return super().write_chunk(fd, data)


class FailingTarget(LocalTarget):
    """Writes fail with ``error_no`` (EROFS: read-only, ENOTCONN: a Drive mount that expired)."""

    def __init__(self, path: Path, error_no: int) -> None:
        super().__init__(path)
        self.error_no: Optional[int] = error_no

    def write_chunk(self, fd: int, data: memoryview) -> int:
        if self.error_no is not None:
            raise OSError(self.error_no, os.strerror(self.error_no))
        return super().write_chunk(fd, data)


class VanishingTarget(LocalTarget):
    """The mirror directory is removed (really) while the first copy is being written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.vanish = True

    def write_chunk(self, fd: int, data: memoryview) -> int:
        if self.vanish:
            self.vanish = False
            shutil.rmtree(self.path)
        return super().write_chunk(fd, data)


# --------------------------------------------------------------------------------------------
# A mirror directory


class TestLocalMirror:
    def test_every_checkpoint_lands_byte_identical_and_each_tier_keeps_its_own_k(
            self, make_session, tmp_path, shm, other_fs):
        """Each committed checkpoint is copied with the same bytes and marker; keep-K per tier."""
        session = make_session(local_mirror(shm / "m", other_fs, keep=3), keep=2)
        session.resume()
        for _ in range(4):
            train(session, 3)
            saved = session.checkpoint()
            # one at a time: on a busy machine a queued copy could be skipped for a newer one
            assert session._mirror is not None and session._mirror.wait(saved, WAIT_S) is not None
        local, mirrored = committed(tmp_path / "ckpt"), committed(shm / "m")
        assert local == ["ckpt-00000003-step9.pt", "ckpt-00000004-step12.pt"]
        assert mirrored == ["ckpt-00000002-step6.pt", "ckpt-00000003-step9.pt", "ckpt-00000004-step12.pt"]
        for name in local:
            for suffix in ("", ".sha256"):
                assert (shm / "m" / (name + suffix)).read_bytes() == \
                    (tmp_path / "ckpt" / (name + suffix)).read_bytes()
        assert sorted(os.listdir(shm / "m")) == sorted(mirrored + [n + ".sha256" for n in mirrored])
        last = status_of(tmp_path / "run").extra["last_mirrored"]
        assert (last["step"], last["checksum"], last["path"]) == (
            12, saved.checksum, str(shm / "m" / "ckpt-00000004-step12.pt"))

    def test_the_marker_is_written_last_after_reading_the_copy_back_from_the_target(
            self, make_session, shm, other_fs):
        """Per checkpoint: data written, then read back from the mirror, then the marker (the commit)."""
        target = RecordingTarget(shm / "m")
        session = make_session(local_mirror(shm / "m", other_fs, target=target))
        for _ in range(2):
            train(session, 1)
            saved = session.checkpoint()
            assert session._mirror.wait(saved, WAIT_S) is not None
        names = [saved_name for _, saved_name in target.ops if saved_name.endswith(".pt")]
        assert target.ops == [("wrote", names[0]), ("read back", names[0]), ("marker", names[0] + ".sha256"),
                              ("wrote", names[2]), ("read back", names[2]), ("marker", names[2] + ".sha256")]

    def test_the_trainer_never_waits_and_a_slow_mirror_skips_to_the_newest(
            self, make_session, tmp_path, shm, other_fs, caplog):
        """Saves return while a copy hangs; of 4 checkpoints the one in flight and the newest are copied."""
        caplog.set_level(logging.INFO, logger="session_watchdog.trainer.mirror")
        target = GatedTarget(shm / "m")
        session = make_session(local_mirror(shm / "m", other_fs, target=target, keep=5), keep=5)
        saved = []
        for _ in range(4):
            train(session, 1)
            saved.append(session.checkpoint())
            wait_for(target.started.is_set, what="first copy started")
        assert not target.gate.is_set()  # all four saves returned while the mirror was stuck
        assert [e["skipped_step"] for e in events(caplog, "mirror_skipped")] == [2, 3]
        assert mirror_report(tmp_path / "run")["pending_step"] == 4
        target.gate.set()
        assert session._mirror.wait(saved[-1], WAIT_S) is not None
        assert committed(shm / "m") == [saved[0].path.name, saved[3].path.name]
        report = mirror_report(tmp_path / "run")
        assert (report["state"], report["skipped"]) == ("ok", 2)

    def test_a_requested_async_save_is_mirrored_after_it_is_durable(self, make_session, tmp_path, shm, other_fs):
        """async_save: the background write's ack also hands the checkpoint to the mirror."""
        session = make_session(local_mirror(shm / "m", other_fs), async_save=True)
        channel.RunDir(tmp_path / "run").write_request(channel.Request(1, "checkpoint", "test", None, time.time()))
        deadline = time.monotonic() + WAIT_S
        while session.acked_seq < 1:
            assert time.monotonic() < deadline, "request never acknowledged"
            train(session, 1)
            time.sleep(0.005)
        name = Path(session.last_checkpoint.path).name
        wait_for(lambda: committed(shm / "m") == [name], what="async checkpoint mirrored")
        assert (shm / "m" / name).read_bytes() == (tmp_path / "ckpt" / name).read_bytes()

    def test_complete_waits_for_the_mirror_only_as_long_as_allowed_and_says_so(
            self, make_session, tmp_path, shm, other_fs, caplog):
        """complete() waits mirror_wait_s at most, logs mirror_wait_timeout; the copy lands later."""
        caplog.set_level(logging.INFO)
        target = GatedTarget(shm / "m")
        session = make_session(local_mirror(shm / "m", other_fs, target=target), mirror_wait_s=0.3)
        train(session, 2)
        final = session.complete()
        assert session.state == "completed"
        timeouts = events(caplog, "mirror_wait_timeout")
        assert [(e["why"], e["step"]) for e in timeouts] == [("complete", 2)]
        assert committed(shm / "m") == []
        target.gate.set()  # the closed session's worker still copies what was queued
        wait_for(lambda: committed(shm / "m") == [final.path.name], what="final copy")
        wait_for(lambda: status_of(tmp_path / "run").extra.get("last_mirrored", {}).get("step") == 2,
                 what="trainer.json reports it")

    def test_resume_from_the_mirror_alone_is_bit_identical(self, make_session, tmp_path, shm, other_fs):
        """With the local directory gone, resume() copies the newest mirrored checkpoint down and loads it."""
        first = make_session(local_mirror(shm / "m", other_fs))
        train(first, 5)
        final = first.complete()
        expected_model = {k: v.clone() for k, v in first.model.state_dict().items()}
        expected_opt = first.optimizer.state_dict()
        shutil.rmtree(tmp_path / "ckpt")
        second = make_session(local_mirror(shm / "m", other_fs), model_opt=model_and_optimizer(seed=1))
        start = second.resume()
        assert (start.resumed, start.step, start.path) == (True, 5, tmp_path / "ckpt" / final.path.name)
        assert_same(second.model.state_dict(), expected_model, "model")
        assert_same(second.optimizer.state_dict(), expected_opt, "optimizer")
        assert (tmp_path / "ckpt" / final.path.name).read_bytes() == (shm / "m" / final.path.name).read_bytes()
        train(second, 1)
        assert second.checkpoint().path.name == "ckpt-00000002-step6.pt"  # names go on after the mirror's

    def test_a_local_checkpoint_the_mirror_never_got_is_copied_after_resume(
            self, make_session, tmp_path, shm, other_fs):
        """Resumed from the local disk (its copy never made it): resume() queues it for the mirror."""
        target = FailingTarget(shm / "m", errno.ENOTCONN)
        first = make_session(local_mirror(shm / "m", other_fs, target=target), mirror_wait_s=0.1)
        train(first, 3)
        final = first.complete()
        assert committed(shm / "m") == []
        second = make_session(local_mirror(shm / "m", other_fs))
        start = second.resume()
        assert start.path == final.path
        wait_for(lambda: committed(shm / "m") == [final.path.name], what="copy after resume")
        assert (shm / "m" / final.path.name).read_bytes() == final.path.read_bytes()

    def test_a_torn_or_unmarked_copy_on_the_mirror_is_never_resumed_from(
            self, make_session, tmp_path, shm, other_fs):
        """A mirror file that does not match its marker, or has none, is skipped for an older good one."""
        first = make_session(local_mirror(shm / "m", other_fs, keep=5), keep=5)
        train(first, 1)
        good = first.checkpoint()
        good_weights = {k: v.clone() for k, v in first.model.state_dict().items()}
        assert first._mirror.wait(good, WAIT_S) is not None
        train(first, 1)
        torn = first.checkpoint()
        assert first._mirror.wait(torn, WAIT_S) is not None
        train(first, 1)
        unmarked = first.checkpoint()
        assert first._mirror.wait(unmarked, WAIT_S) is not None
        first.close()
        data = (shm / "m" / torn.path.name).read_bytes()
        (shm / "m" / torn.path.name).write_bytes(data[: len(data) // 2])  # torn, marker intact
        os.unlink(shm / "m" / (unmarked.path.name + ".sha256"))  # killed before its commit
        shutil.rmtree(tmp_path / "ckpt")
        second = make_session(local_mirror(shm / "m", other_fs), model_opt=model_and_optimizer(seed=1))
        start = second.resume()
        assert (start.step, start.path.name) == (1, good.path.name)
        assert_same(second.model.state_dict(), good_weights, "model")
        assert committed(tmp_path / "ckpt") == [good.path.name]

    def test_a_mirror_on_the_same_filesystem_is_refused_and_training_goes_on(
            self, make_session, tmp_path, caplog):
        """A mirror beside the checkpoints is no second copy: refused with a warning, nothing written."""
        caplog.set_level(logging.WARNING)
        session = make_session(str(tmp_path / "drive" / "run1"))
        train(session, 2)
        saved = session.checkpoint()
        assert checkpoint.CheckpointManager(tmp_path / "ckpt").verify(saved.path)
        assert [e["problem"] for e in events(caplog, "mirror_failed")] == ["same_filesystem"]
        report = mirror_report(tmp_path / "run")
        assert (report["state"], report["problem"]) == ("refused", "same_filesystem")
        assert not (tmp_path / "drive").exists()  # not even created
        assert session.complete().step == 2  # and complete() does not wait for it


# --------------------------------------------------------------------------------------------
# Faults: training never stops, the local checkpoint stays intact, no torn copy is committed


class TestFaults:
    def test_the_mirror_directory_vanishing_mid_copy(self, make_session, tmp_path, shm, other_fs, caplog):
        """The directory removed during a copy: warning 'missing', not re-created, next copy after it is back."""
        caplog.set_level(logging.INFO)
        target = VanishingTarget(shm / "m")
        session = make_session(local_mirror(shm / "m", other_fs, target=target))
        train(session, 2)
        first = session.checkpoint()
        wait_for(lambda: mirror_report(tmp_path / "run").get("problem") == "missing", what="warning")
        assert not (shm / "m").exists()  # never re-created: it could be the local disk under a dead mount
        assert checkpoint.CheckpointManager(tmp_path / "ckpt").verify(first.path)
        train(session, 2)  # training goes on
        (shm / "m").mkdir()  # remounted
        second = session.checkpoint()
        assert session._mirror.wait(second, WAIT_S) is not None
        # (a retry of the first copy may have landed just before: either way, the newest is there)
        assert committed(shm / "m")[-1] == second.path.name
        assert (shm / "m" / second.path.name).read_bytes() == second.path.read_bytes()
        assert [e["previous"] for e in events(caplog, "mirror_recovered")] == ["missing"]

    @pytest.mark.parametrize("error_no, problem", [(errno.EROFS, "read_only"),
                                                   (errno.ENOTCONN, "unreachable"),
                                                   (errno.EDQUOT, "full")])
    def test_a_failing_mirror_warns_and_a_stop_still_stops(self, make_session, tmp_path, shm, other_fs,
                                                          caplog, error_no, problem):
        """Read-only / unmounted / over quota: warned and reported, training goes on, a stop waits bounded."""
        caplog.set_level(logging.INFO)
        target = FailingTarget(shm / "m", error_no)
        session = make_session(local_mirror(shm / "m", other_fs, target=target), mirror_wait_s=0.5)
        train(session, 2)
        session.checkpoint()
        wait_for(lambda: mirror_report(tmp_path / "run").get("problem") == problem, what="warning")
        assert mirror_report(tmp_path / "run")["state"] == "failing"
        train(session, 3)
        channel.RunDir(tmp_path / "run").write_request(channel.Request(1, "stop", "test", None, time.time()))
        with pytest.raises(StopTraining) as stopped:
            for _ in range(100_000):
                train(session, 1)
                time.sleep(0.001)
        assert stopped.value.checkpoint.step > 5
        assert checkpoint.CheckpointManager(tmp_path / "ckpt").verify(stopped.value.checkpoint.path)
        assert [e["why"] for e in events(caplog, "mirror_wait_timeout")] == ["stop"]
        assert [e["problem"] for e in events(caplog, "mirror_failed") if "hint" in e][:1] == [problem]
        assert os.listdir(shm / "m") == []  # no temp, nothing under a final name

    def test_the_newest_verified_copy_stays_until_a_newer_one_verifies(self, make_session, shm, other_fs):
        """keep=1 on the mirror: while newer copies fail, the last verified one is kept; then replaced."""
        target = FailingTarget(shm / "m", errno.ENOSPC)
        target.error_no = None
        session = make_session(local_mirror(shm / "m", other_fs, target=target, keep=1))
        train(session, 1)
        first = session.checkpoint()
        assert session._mirror.wait(first, WAIT_S) is not None
        target.error_no = errno.ENOSPC
        train(session, 1)
        second = session.checkpoint()
        wait_for(lambda: session._mirror.problem == "full", what="failure")
        assert committed(shm / "m") == [first.path.name]
        target.error_no = None  # space freed: the retry goes through
        assert session._mirror.wait(second, WAIT_S) is not None
        assert committed(shm / "m") == [second.path.name]

    def test_a_mirror_that_fills_up(self, tmp_path, shm, other_fs):
        """RLIMIT_FSIZE (the kernel's EFBIG) during a copy: problem 'full', the partial copy removed."""
        manager = checkpoint.CheckpointManager(tmp_path / "ckpt")
        saved = manager.save({"w": torch.arange(200_000, dtype=torch.float32)}, step=3)

        def child(fd: int) -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (saved.bytes // 2, resource.RLIM_INFINITY))
            mirror = local_mirror(shm / "m", other_fs)
            mirror.attach(checkpoint.CheckpointManager(tmp_path / "ckpt"))
            mirror.submit(saved)
            wait_for(lambda: mirror.problem is not None, what="failure")
            os.write(fd, json.dumps(mirror.report()).encode())

        code, out = run_child(child)
        assert code == 0
        report = json.loads(out)
        assert (report["state"], report["problem"]) == ("failing", "full")
        assert "File too large" in report["error"]
        assert os.listdir(shm / "m") == []
        assert manager.verify(saved.path)


# --------------------------------------------------------------------------------------------
# S3 through s3fs, against moto's server on 127.0.0.1


@pytest.fixture
def s3() -> Iterator[Tuple[Any, Dict[str, Any], List[bool], str]]:
    """A moto S3 server on a free local port, the storage options that reach it, a new bucket.

    moto keeps its buckets per process, so each test gets a bucket of its own.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
               "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}},
               }
    import s3fs

    bucket = f"sw-{os.getpid()}-{time.monotonic_ns()}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    stopped = [False]
    try:
        yield server, options, stopped, f"s3://{bucket}/run1"
    finally:
        if not stopped[0]:
            server.stop()


class RecordingS3Target(FsspecTarget):
    def __init__(self, url: str, options: Dict[str, Any]) -> None:
        super().__init__(url, options)
        self.ops: List[Tuple[str, str]] = []

    def write(self, name: str, source_fd: int) -> int:
        written = super().write(name, source_fd)
        self.ops.append(("wrote", name))
        return written

    def read_chunks(self, name: str) -> Iterator[bytes]:
        yield from super().read_chunks(name)
        self.ops.append(("read back", name))

    def write_marker(self, name: str, data: bytes) -> None:
        self.ops.append(("marker", name))
        super().write_marker(name, data)


class TestS3Mirror:
    def test_s3_copies_are_identical_committed_by_the_marker_and_resume_alone(self, make_session, tmp_path, s3):
        """Objects equal the local files, the marker object comes last, resume from S3 is bit-identical."""
        import s3fs

        _, options, _, url = s3
        target = RecordingS3Target(url, options)
        first = make_session(Mirror(target))
        train(first, 3)
        assert first._mirror.wait(first.checkpoint(), WAIT_S) is not None
        train(first, 3)
        final = first.complete()
        weights = {k: v.clone() for k, v in first.model.state_dict().items()}
        fs = s3fs.S3FileSystem(**options)
        keys = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url, detail=False))
        local = sorted(os.listdir(tmp_path / "ckpt"))
        assert keys == local
        for name in local:  # checkpoints and markers, byte for byte
            assert fs.cat_file(f"{url}/{name}") == (tmp_path / "ckpt" / name).read_bytes()
        assert [op for op, _ in target.ops] == ["wrote", "read back", "marker"] * 2
        assert status_of(tmp_path / "run").extra["last_mirrored"]["path"] == f"{url}/{final.path.name}"
        shutil.rmtree(tmp_path / "ckpt")
        second = make_session(Mirror(url, storage_options=options),
                              model_opt=model_and_optimizer(seed=5))
        start = second.resume()
        assert (start.step, start.path.name) == (6, final.path.name)
        assert_same(second.model.state_dict(), weights, "model")

    def test_s3_errors_training_continues_and_the_end_is_refused(self, make_session, tmp_path, s3, caplog):
        """With the S3 server gone, copies fail with a warning; training and local saves go on; no end."""
        caplog.set_level(logging.INFO)
        server, options, stopped, url = s3
        session = make_session(Mirror(url, storage_options=options), mirror_wait_s=1.0)
        train(session, 2)
        ok = session.checkpoint()
        assert session._mirror.wait(ok, WAIT_S) is not None
        server.stop()
        stopped[0] = True
        train(session, 2)
        failed = session.checkpoint()
        wait_for(lambda: mirror_report(tmp_path / "run").get("state") == "failing", what="failure")
        assert mirror_report(tmp_path / "run")["problem"] == "unreachable"
        train(session, 2)  # training goes on
        final = session.complete()
        assert checkpoint.CheckpointManager(tmp_path / "ckpt").verify(final.path)
        assert failed.step == 4 and final.step == 6
        assert [e["why"] for e in events(caplog, "mirror_wait_timeout")] == ["complete"]
        calls: List[str] = []
        tx = EndTransaction(run_dir=channel.RunDir(tmp_path / "run"), reason="training_complete",
                            status=status_of(tmp_path / "run"), grace_s=0.0, dry_run=False,
                            end_action=("recorder", lambda: calls.append("end") or "ok"),
                            sleep=lambda s: None, confirm_after_s=0.0, alive=lambda: False)
        assert tx.run() == "aborted"
        assert calls == []


# --------------------------------------------------------------------------------------------
# kill -9 during mirror copies


class SlowTarget(LocalTarget):
    """Writes in small slices with pauses, so that a SIGKILL lands inside a copy."""

    def write_chunk(self, fd: int, data: memoryview) -> int:
        time.sleep(0.002)
        return super().write_chunk(fd, data[: 64 * 1024])


@pytest.mark.heavy
def test_kill9_during_mirror_copies_the_newest_verified_mirror_checkpoint_always_loads(tmp_path, shm, other_fs):
    """SIGKILL at random moments while copies run: the mirror's newest committed checkpoint restores and loads."""
    rng = random.Random(14)
    attempts = heavy_n(3)
    mid_copy = 0  # kills that left a copy in progress behind (a temp file on the mirror)
    attempt = -1
    # at least `attempts` kills, and more (up to 12) until one lands inside a copy: on a loaded
    # machine the random moments may all fall between copies
    while attempt + 1 < attempts or (mid_copy == 0 and attempt + 1 < attempts + 12):
        attempt += 1
        ckpt_dir = tmp_path / f"ckpt{attempt}"

        def child(fd: int) -> None:
            torch.set_num_threads(1)
            mirror = Mirror(SlowTarget(shm / "m"), allow_same_filesystem=not other_fs)
            manager = checkpoint.CheckpointManager(ckpt_dir)
            mirror.attach(manager)
            weights = torch.zeros(300_000)
            for step in range(1, 10_000):
                weights += 1
                mirror.submit(manager.save({"w": weights, "step": step}, step=step))
                send(fd, COMMITTED, step)
                time.sleep(0.01)

        proc = fork_child(child)
        try:
            wait_for(lambda: committed(shm / "m") != [] if (shm / "m").exists() else False,
                     what="a first mirrored checkpoint")
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.kill_and_collect()
        mid_copy += any(n.endswith(".sw-tmp") for n in os.listdir(shm / "m"))
        restore_dir = tmp_path / f"restore{attempt}"
        manager = checkpoint.CheckpointManager(restore_dir)
        mirror = Mirror(LocalTarget(shm / "m"), allow_same_filesystem=not other_fs)
        name = mirror.restore(manager)
        assert name is not None, f"attempt {attempt}: nothing restorable on {os.listdir(shm / 'm')}"
        state = manager.load()
        step = state["step"]
        assert torch.equal(state["w"], torch.full((300_000,), float(step)))
        assert name == committed(shm / "m")[-1]
    assert mid_copy >= 1, "no kill landed inside a copy: the test did not test anything"


# --------------------------------------------------------------------------------------------
# DDP under torchrun: rank 0 mirrors and restores for all ranks


@TORCHRUN
def test_ddp_rank0_mirrors_and_both_ranks_resume_from_the_mirror_alone(tmp_path, shm, other_fs):
    """torchrun, 2 ranks: rank 0's checkpoints reach the mirror; with the local dir gone both ranks resume from it."""
    if not other_fs:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir (the example has no override)")
    from test_distributed import finish, torchrun_example

    def run(epochs: int) -> str:
        proc = torchrun_example(tmp_path / "run", tmp_path / "ckpt", "--epochs", str(epochs),
                                "--steps-per-epoch", "10", "--mirror", str(shm / "m"))
        code, out = finish(proc)
        assert code == 0, out
        return out

    run(1)
    assert committed(shm / "m") == ["ckpt-00000001-step10.pt"]
    assert (shm / "m" / "ckpt-00000001-step10.pt").read_bytes() == \
        (tmp_path / "ckpt" / "ckpt-00000001-step10.pt").read_bytes()
    shutil.rmtree(tmp_path / "ckpt")
    out = run(2)
    for rank in (0, 1):
        assert f"[rank {rank}] resumed from {tmp_path / 'ckpt' / 'ckpt-00000001-step10.pt'} at epoch 1 step 10" in out
        assert f"[rank {rank}] completed at step 20: {tmp_path / 'ckpt' / 'ckpt-00000002-step20.pt'}" in out
    assert committed(shm / "m")[-1] == "ckpt-00000002-step20.pt"
    assert (shm / "m" / "ckpt-00000002-step20.pt").read_bytes() == \
        (tmp_path / "ckpt" / "ckpt-00000002-step20.pt").read_bytes()


# --------------------------------------------------------------------------------------------
# Credentials in a mirror URL


def test_a_password_in_the_mirror_url_is_never_logged_nor_reported(make_session, tmp_path, caplog):
    """memory://alice:hunter2@host/run mirrors and reports as memory://***@host/run (events,
    trainer.json); an sftp URL that cannot be used says so without the password or an s3 hint."""
    from session_watchdog.integrations._mirror import open_dir_mirror

    caplog.set_level(logging.INFO)
    session = make_session("memory://alice:hunter2@host/run")
    train(session, 2)
    assert session._mirror.wait(session.checkpoint(), WAIT_S) is not None
    session.close()
    started = events(caplog, "mirror_started")
    assert [e["target"] for e in started] == ["memory://***@host/run"]
    status = (tmp_path / "run" / "trainer.json").read_text()
    assert json.loads(status)["extra"]["mirror"]["target"] == "memory://***@host/run"
    assert json.loads(status)["extra"]["last_mirrored"]["path"].startswith("memory://***@host/run/")
    if importlib.util.find_spec("paramiko") is None:  # sftp's package missing: refused
        assert open_dir_mirror("sftp://alice:hunter2@127.0.0.1:1/ckpt", tmp_path / "d", 2,
                               None) is None
        failed = events(caplog, "mirror_failed")[-1]
        assert failed["target"] == "sftp://***@127.0.0.1:1/ckpt"
        assert "sftp://***@127.0.0.1:1/ckpt" in failed["error"] and "s3" not in failed["error"]
    assert "hunter2" not in status and not any("hunter2" in r.getMessage() for r in caplog.records)
