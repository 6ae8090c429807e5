"""Resume and saves on a hostile checkpoint directory (issue 18): never hang, never crash.

Markers and checkpoints that are symlinks (to /dev/zero, to a FIFO), FIFOs, directories or JSON
nested thousands of levels deep are set aside as ``.broken`` and resume falls back to the
previous verified checkpoint; keep-last-K still holds afterwards. A ``save.lock`` that is a
symlink refuses the start once; one replaced during the run is recreated, and the run goes on.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
import torch

from session_watchdog import channel
from session_watchdog.channel import SAVE_LOCK, Request, RunDir
from session_watchdog.trainer.checkpoint import CheckpointManager, SavedCheckpoint
from session_watchdog.trainer.session import Session, SessionError

RESUME_LIMIT_S = 60  # a hang fails the test instead of blocking the suite


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def state_of(gen: int) -> dict:
    """A real small model's state, stamped with its generation."""
    return {"model": tiny_model(gen).state_dict(), "gen": gen}


@pytest.fixture
def no_hang() -> Iterator[None]:
    """SIGALRM turns a hang into a failure (the main thread is the one that would block)."""
    def timeout(signum: int, frame: Any) -> None:
        raise AssertionError(f"blocked for more than {RESUME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(RESUME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def three_saves(directory: Path) -> List[SavedCheckpoint]:
    manager = CheckpointManager(directory, keep=3)
    return [manager.save(state_of(gen), step=gen) for gen in (1, 2, 3)]


def marker_of(saved: SavedCheckpoint) -> Path:
    return saved.path.with_name(saved.path.name + ".sha256")


def replace_with_symlink(path: Path, target: Path) -> None:
    os.unlink(path)
    os.symlink(target, path)


def corrupt_marker(kind: str, marker: Path) -> None:
    """Turn a committed checkpoint's marker into one of the hostile kinds."""
    if kind == "symlink-to-dev-zero":
        replace_with_symlink(marker, Path("/dev/zero"))
    elif kind == "symlink-to-fifo":
        fifo = marker.parent / "planted-fifo"
        os.mkfifo(fifo)
        replace_with_symlink(marker, fifo)
    elif kind == "fifo":
        os.unlink(marker)
        os.mkfifo(marker)
    elif kind == "directory":
        os.unlink(marker)
        os.mkdir(marker)
        (marker / "inside").write_text("x")
    elif kind == "nested-5000":
        marker.write_text('{"v":1,"x":' + "[" * 5000 + "]" * 5000 + "}")
    else:
        raise AssertionError(kind)


def corrupt_checkpoint(kind: str, path: Path) -> None:
    """Turn a committed checkpoint file into one of the hostile kinds (its marker stays)."""
    if kind == "symlink-to-dev-zero":
        replace_with_symlink(path, Path("/dev/zero"))
    elif kind == "fifo":
        os.unlink(path)
        os.mkfifo(path)
    elif kind == "directory":
        os.unlink(path)
        os.mkdir(path)
    else:
        raise AssertionError(kind)


MARKER_KINDS = ["symlink-to-dev-zero", "symlink-to-fifo", "fifo", "directory", "nested-5000"]


class TestHostileMarkers:
    @pytest.mark.parametrize("kind", MARKER_KINDS)
    def test_resume_falls_back_to_the_previous_checkpoint(self, tmp_path: Path, kind: str,
                                                          no_hang: None) -> None:
        """The newest marker made hostile: resume returns the previous checkpoint at once, with its
        weights, and the bad checkpoint is set aside as .broken."""
        saves = three_saves(tmp_path / "ckpt")
        corrupt_marker(kind, marker_of(saves[2]))
        manager = CheckpointManager(tmp_path / "ckpt", keep=3)
        assert manager.latest() == saves[1]
        loaded = manager.load()
        assert loaded["gen"] == 2
        for name, tensor in tiny_model(2).state_dict().items():
            assert torch.equal(loaded["model"][name], tensor)
        left = sorted(os.listdir(tmp_path / "ckpt"))
        assert saves[2].path.name not in left and saves[2].path.name + ".broken" in left
        assert marker_of(saves[2]).name not in left

    @pytest.mark.parametrize("kind", MARKER_KINDS)
    def test_keep_last_k_holds_after_a_hostile_old_marker(self, tmp_path: Path, kind: str,
                                                          no_hang: None) -> None:
        """A hostile marker on the oldest checkpoint never stops pruning: after four more saves
        exactly the newest three checkpoint files are left."""
        saves = three_saves(tmp_path / "ckpt")
        corrupt_marker(kind, marker_of(saves[0]))
        manager = CheckpointManager(tmp_path / "ckpt", keep=3)
        newer = [manager.save(state_of(gen), step=gen) for gen in (4, 5, 6, 7)]
        files = sorted(n for n in os.listdir(tmp_path / "ckpt") if n.endswith(".pt"))
        assert files == [s.path.name for s in newer[1:]]
        assert manager.latest() == newer[-1]

    @pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo", "directory"])
    def test_a_hostile_checkpoint_file_is_set_aside(self, tmp_path: Path, kind: str,
                                                    no_hang: None) -> None:
        """The newest checkpoint file replaced by a symlink, FIFO or directory: resume uses the
        previous one; nothing is opened through the planted name."""
        saves = three_saves(tmp_path / "ckpt")
        corrupt_checkpoint(kind, saves[2].path)
        manager = CheckpointManager(tmp_path / "ckpt", keep=3)
        assert manager.latest() == saves[1]
        assert manager.load()["gen"] == 2

    def test_a_symlink_whose_length_matches_the_marker_is_not_followed(
            self, tmp_path: Path, no_hang: None) -> None:
        """A marker claiming 9 bytes and a checkpoint that is a 9-byte symlink to /dev/zero (lstat
        sizes agree): verify() says no without reading /dev/zero forever."""
        saves = three_saves(tmp_path / "ckpt")
        marker = channel.read_json(marker_of(saves[2]))
        assert marker is not None
        marker["bytes"] = len("/dev/zero")
        channel.write_json(marker_of(saves[2]), marker)
        replace_with_symlink(saves[2].path, Path("/dev/zero"))
        manager = CheckpointManager(tmp_path / "ckpt", keep=3)
        assert manager.verify(saves[2].path) is False
        assert manager.latest() == saves[1]

    def test_load_refuses_a_checkpoint_swapped_for_a_symlink(self, tmp_path: Path) -> None:
        """A checkpoint replaced by a symlink to a valid copy after latest() cannot be loaded
        through the link."""
        saves = three_saves(tmp_path / "ckpt")
        manager = CheckpointManager(tmp_path / "ckpt", keep=3)
        latest = manager.latest()
        assert latest == saves[2]
        copy = tmp_path / "copy.pt"
        copy.write_bytes(saves[2].path.read_bytes())
        replace_with_symlink(saves[2].path, copy)
        with pytest.raises(Exception) as info:
            manager.load(latest)
        assert "does not match its marker" in str(info.value)


# --------------------------------------------------------------------------------------------
# Session: resume and save.lock


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Callable[..., Session]]:
    made: List[Session] = []

    def make(**kwargs: Any) -> Session:
        model = tiny_model(0)
        session = Session(tmp_path / "ckpt", model=model,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          run_dir=tmp_path / "run", poll_interval=0.02, heartbeat_interval=60.0,
                          checkpoint_every=None, handle_signals=False, keep=3, **kwargs)
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()


def train(session: Session, steps: int) -> None:
    for _ in range(steps):
        session.optimizer.zero_grad()
        session.model(torch.randn(3, 4)).pow(2).mean().backward()
        session.optimizer.step()
        session.step()


class TestSessionOnAHostileDirectory:
    @pytest.mark.parametrize("kind", MARKER_KINDS)
    def test_session_resume_falls_back(self, tmp_path: Path, sessions: Callable[..., Session],
                                       kind: str, no_hang: None) -> None:
        """Session.resume() after the newest marker was made hostile resumes from the checkpoint
        before it (its step), never hangs, never raises."""
        first = sessions()
        train(first, 3)
        first.checkpoint()
        train(first, 2)
        newest = first.checkpoint()
        first.close()
        corrupt_marker(kind, marker_of(newest))
        start = sessions().resume()
        assert start.resumed and start.step == 3

    def test_a_symlinked_save_lock_refuses_the_start(self, tmp_path: Path,
                                                     sessions: Callable[..., Session]) -> None:
        """save.lock planted as a symlink before the start: Session() refuses once, saying how to
        fix it, and the planted target is untouched."""
        run = RunDir(tmp_path / "run")
        target = tmp_path / "victim"
        target.write_text("keep me")
        os.symlink(target, run.file(SAVE_LOCK))
        with pytest.raises(SessionError, match="save.lock is a symlink; remove it"):
            sessions()
        assert target.read_text() == "keep me"

    @pytest.mark.parametrize("async_save", [False, True])
    def test_a_save_lock_replaced_during_the_run_is_recreated(
            self, tmp_path: Path, sessions: Callable[..., Session], async_save: bool) -> None:
        """save.lock swapped for a symlink mid-run: the next requested checkpoint is still written
        and acked, save.lock is a fresh regular file again, the symlink's target is untouched."""
        session = sessions(async_save=async_save)
        train(session, 2)
        session.checkpoint()
        lock = session.run_dir.file(SAVE_LOCK)
        target = tmp_path / "victim"
        target.write_text("keep me")
        os.unlink(lock)
        os.symlink(target, lock)
        session.run_dir.write_request(Request(seq=1, action="checkpoint", reason="test",
                                              deadline=None, issued=0.0))
        done = threading.Event()
        for _ in range(2000):
            train(session, 1)
            if session.acked_seq == 1:
                done.set()
                break
            done.wait(0.005)
        assert session.acked_seq == 1
        assert not os.path.islink(lock) and os.path.isfile(lock)
        assert target.read_text() == "keep me"
        assert session.manager.latest() is not None

    def test_a_save_lock_that_cannot_be_recreated_fails_the_save_not_the_run(
            self, tmp_path: Path, sessions: Callable[..., Session]) -> None:
        """save.lock turned into a directory mid-run (not ours to remove): the requested
        checkpoint fails and is reported, unacknowledged, and training goes on."""
        session = sessions()
        train(session, 2)
        lock = session.run_dir.file(SAVE_LOCK)
        if os.path.lexists(lock):
            os.unlink(lock)
        os.mkdir(lock)
        session.run_dir.write_request(Request(seq=1, action="checkpoint", reason="test",
                                              deadline=None, issued=0.0))
        for _ in range(50):
            train(session, 1)
            threading.Event().wait(0.005)
        status = session.run_dir.read_status()
        assert status is not None and status.acked_seq == 0
        assert "save.lock" in status.extra.get("last_error", "")
        assert session.global_step == 52


class TestHostileShardedMarkers:
    @pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "symlink-to-fifo", "fifo",
                                      "directory", "nested-5000"])
    def test_latest_skips_a_hostile_commit_marker(self, tmp_path: Path, kind: str,
                                                  no_hang: None) -> None:
        """A sharded step directory whose COMMITTED marker is hostile is skipped: the previous
        step is the latest, without a hang or a RecursionError."""
        from session_watchdog.trainer.sharded import COMMIT_MARKER, ShardedCheckpointer

        ckpt = ShardedCheckpointer(tmp_path / "ckpt")
        ckpt.save({"w": torch.ones(8)}, step=1)
        newer = ckpt.save({"w": torch.full((8,), 2.0)}, step=2)
        corrupt_marker(kind, newer.directory / COMMIT_MARKER)
        latest = ckpt.latest()
        assert latest is not None and latest.step == 1


class TestEndVerifiesWithoutFollowing:
    @pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo", "directory"])
    def test_the_end_refuses_a_reported_checkpoint_that_is_not_a_regular_file(
            self, tmp_path: Path, kind: str, no_hang: None) -> None:
        """trainer.json names a checkpoint (0 bytes, as a forged report could say) that is now a
        symlink to /dev/zero, a FIFO or a directory: the end's verification says no at once."""
        from session_watchdog.actions import verify_checkpoint

        saves = three_saves(tmp_path / "ckpt")
        corrupt_checkpoint(kind, saves[2].path)
        os.unlink(marker_of(saves[2]))  # nothing to compare with: only the file itself is read
        problem = verify_checkpoint(str(saves[2].path), "0" * 64, 0)
        assert problem is not None and str(saves[2].path) in problem

    def test_a_deeply_nested_marker_stops_the_end_with_a_reason(self, tmp_path: Path) -> None:
        """The marker next to the reported checkpoint nested 5,000 deep: a reason, no exception."""
        from session_watchdog.actions import verify_checkpoint

        saves = three_saves(tmp_path / "ckpt")
        corrupt_marker("nested-5000", marker_of(saves[2]))
        problem = verify_checkpoint(str(saves[2].path), saves[2].checksum, saves[2].bytes)
        assert problem is not None and problem.startswith("checkpoint marker is unreadable")

    def test_a_good_checkpoint_still_verifies(self, tmp_path: Path) -> None:
        """The committed newest checkpoint, as reported: verified."""
        from session_watchdog.actions import verify_checkpoint

        saves = three_saves(tmp_path / "ckpt")
        assert verify_checkpoint(str(saves[2].path), saves[2].checksum, saves[2].bytes) is None
