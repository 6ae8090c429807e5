"""Checkpoints under faults: SIGKILL mid-save, restart loops, full disks, failing fsync, bad state.

Fault-injection loops are marked ``heavy``; their length is ``SW_HEAVY_N`` (default 20, a few
seconds). A failing loop prints its seed: ``SW_CKPT_SEED=<seed>`` replays the same kill times.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import random
import resource
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import ckpt_helpers as helpers  # tests/ is on sys.path (conftest.py)
import pytest
import torch

from session_watchdog.trainer import checkpoint, checkpoint_dir
from session_watchdog.trainer.checkpoint import (
    CheckpointManager,
    CheckpointStateError,
    CheckpointWriteError,
)

HEAVY_N = int(os.environ.get("SW_HEAVY_N", "20"))
SEED = int(os.environ.get("SW_CKPT_SEED", str(int.from_bytes(os.urandom(4), "little"))))
KILL_WINDOW_S = 0.05  # a save of the state below takes ~5-20 ms: kills land in every phase

# Built here, before any fork: children reuse these tensors and run no parallel kernels.
PAYLOAD = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB, so a write takes a while
MODEL = torch.nn.Linear(32, 32)


def generation_state(gen: int) -> Dict[str, Any]:
    """A small model plus a few MB of payload, stamped with its generation number."""
    return {
        "gen": gen,
        "model": MODEL.state_dict(),
        "payload": PAYLOAD,
        "stamp": torch.full((256,), gen, dtype=torch.int64),
    }


def assert_generation(state: Dict[str, Any], gen: int) -> None:
    """Every part of a loaded state belongs to generation ``gen``: nothing torn or mixed."""
    assert state["gen"] == gen
    assert torch.equal(state["stamp"], torch.full((256,), gen, dtype=torch.int64))
    assert torch.equal(state["payload"], PAYLOAD)
    for key, value in MODEL.state_dict().items():
        assert torch.equal(state["model"][key], value)


def litter(directory: Path) -> List[str]:
    """Names that show a save was cut short: temp files and unmarked checkpoints."""
    names = set(os.listdir(directory))
    return sorted(
        n for n in names
        if n.endswith(".sw-tmp") or (n.endswith(".pt") and n + ".sha256" not in names)
    )


def previous_intact(directory: Path, saved: checkpoint.SavedCheckpoint, gen: int) -> None:
    """The checkpoint committed before a failed save is still the latest and still loads."""
    manager = CheckpointManager(directory)
    assert manager.latest() == saved
    assert_generation(manager.load(), gen)


def names(directory: Path) -> List[str]:
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------------------------
# Children


def save_forever(directory: Path, fd: int) -> None:
    """Child: commit generation 1, 2, 3, ... and report each one after save() returns."""
    manager = CheckpointManager(directory)
    gen = 0
    while True:
        gen += 1
        manager.save(generation_state(gen), step=gen)
        helpers.send(fd, helpers.COMMITTED, gen)


def torch_save_in_place_forever(path: Path, fd: int) -> None:
    """Child (canary): plain torch.save onto the same path, the way most training scripts do."""
    gen = 0
    while True:
        gen += 1
        torch.save(generation_state(gen), path)
        helpers.send(fd, helpers.COMMITTED, gen)


def resume_and_save_forever(directory: Path, fd: int) -> None:
    """Child: resume from the latest checkpoint (as a restarted trainer would), then keep saving."""
    manager = CheckpointManager(directory, keep=1)
    latest = manager.latest()
    gen = manager.load(latest)["gen"] if latest is not None else 0
    helpers.send(fd, helpers.RESUMED, gen)
    while True:
        gen += 1
        manager.save(generation_state(gen), step=gen)
        helpers.send(fd, helpers.COMMITTED, gen)


# --------------------------------------------------------------------------------------------


@pytest.mark.heavy
class TestKillDuringSave:
    @pytest.mark.parametrize("unlink_ahead", [False, True], ids=["prune-inline", "prune-helper"])
    def test_latest_is_always_the_last_reported_generation_or_the_next(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unlink_ahead: bool):
        """After SIGKILL at a random instant the latest checkpoint loads and is generation k or k+1,
        also when pruned files are unlinked by the helper thread (large checkpoints)."""
        if unlink_ahead:  # set before the fork: the child prunes every file off its save thread
            monkeypatch.setattr(checkpoint_dir, "_UNLINK_AHEAD_BYTES", 1)
        rng = random.Random(SEED)
        interrupted = 0
        for cycle in range(HEAVY_N):
            where = f"seed={SEED} cycle={cycle}"
            directory = tmp_path / f"run{cycle}"
            child = helpers.fork_child(lambda fd, d=directory: save_forever(d, fd))
            first = child.wait_report(timeout=120)
            assert first is not None, f"the child never committed a checkpoint ({where})"
            time.sleep(rng.uniform(0, KILL_WINDOW_S))
            reports = [first, *child.kill_and_collect()]
            last = reports[-1][1]
            interrupted += bool(litter(directory))

            manager = CheckpointManager(directory)
            latest = manager.latest()
            assert latest is not None, where
            state = manager.load(latest)
            assert state["gen"] in (last, last + 1), where
            assert latest.step == state["gen"], where
            assert_generation(state, state["gen"])
        # The harness must really cut saves short, or the loop above proves nothing.
        assert interrupted >= 1, f"no kill landed inside a save (seed={SEED})"

    def test_canary_plain_torch_save_in_place_tears(self, tmp_path: Path):
        """The same harness catches tears in plain torch.save(path): the kills really land mid-write."""
        rng = random.Random(SEED)
        tears = 0
        for cycle in range(HEAVY_N):
            path = tmp_path / f"canary{cycle}.pt"
            child = helpers.fork_child(lambda fd, p=path: torch_save_in_place_forever(p, fd))
            first = child.wait_report(timeout=120)
            assert first is not None, f"the canary never saved (seed={SEED} cycle={cycle})"
            time.sleep(rng.uniform(0, KILL_WINDOW_S))
            last = [first, *child.kill_and_collect()][-1][1]
            try:
                state = torch.load(path, weights_only=True)
                assert_generation(state, state["gen"])
                torn = state["gen"] not in (last, last + 1)
            except Exception:
                torn = True
            tears += torn
        assert tears >= 1, f"plain torch.save never tore in {HEAVY_N} kills (seed={SEED})"


@pytest.mark.heavy
class TestKillRestartCycles:
    def test_restarts_never_lose_everything_and_litter_is_swept(self, tmp_path: Path):
        """Killed-and-restarted trainers always resume from k or k+1, and the directory stays clean."""
        rng = random.Random(SEED)
        directory = tmp_path / "ckpt"
        floor = 0  # the newest generation some child has reported (resumed or committed)
        for cycle in range(HEAVY_N):
            where = f"seed={SEED} cycle={cycle}"
            child = helpers.fork_child(lambda fd: resume_and_save_forever(directory, fd))
            first = child.wait_report(timeout=120)
            assert first is not None and first[0] == helpers.RESUMED, where
            reports = [first]
            if floor == 0:
                # Nothing committed yet: let this child commit once before the kill, so that the
                # loop tests resuming from something however slow saves are on a loaded machine.
                committed = child.wait_report(timeout=120)
                assert committed is not None and committed[0] == helpers.COMMITTED, where
                reports.append(committed)
            # Kill anywhere: in the resume scan, in the first save, or later.
            time.sleep(rng.uniform(0, KILL_WINDOW_S))
            reports += child.kill_and_collect()
            resumed = first[1]
            assert resumed in (floor, floor + 1), f"resumed {resumed}, floor {floor} ({where})"
            floor = max(value for _, value in reports)

        manager = CheckpointManager(directory, keep=1)
        latest = manager.latest()
        assert latest is not None
        gen = manager.load(latest)["gen"]
        assert gen in (floor, floor + 1)
        final = manager.save(generation_state(gen + 1), step=gen + 1)
        left = names(directory)
        broken = [n for n in left if n.endswith(".broken")]
        assert len(broken) <= 1
        assert [n for n in left if n not in broken] == [final.path.name,
                                                         final.path.name + ".sha256"]


class TestDiskFull:
    def test_file_size_limit_gives_efbig_and_keeps_the_previous(self, tmp_path: Path):
        """A write past RLIMIT_FSIZE fails with EFBIG, names the file, and leaves no temp file."""
        manager = CheckpointManager(tmp_path)
        previous = manager.save({"gen": 1, "stamp": torch.ones(4)}, step=1)

        def child(fd: int) -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() returns EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
            try:
                CheckpointManager(tmp_path).save(generation_state(2), step=2)
            except CheckpointWriteError as err:
                os.write(fd, json.dumps({"errno": err.errno, "message": str(err),
                                         "path": str(err.path),
                                         "cause": type(err.cause).__name__,
                                         "needed": err.needed_bytes}).encode())

        code, out = helpers.run_child(child)
        assert code == 0
        report = json.loads(out)
        assert report["errno"] == errno.EFBIG
        assert report["cause"] == "OSError"
        assert report["path"] == str(tmp_path / "ckpt-00000002-step2.pt")
        assert report["needed"] >= PAYLOAD.nbytes
        assert report["message"].startswith(
            f"cannot save checkpoint {tmp_path / 'ckpt-00000002-step2.pt'}: EFBIG (File too large)"
        )
        assert report["message"].endswith(f"previous checkpoint {previous.path} is intact")
        assert names(tmp_path) == [previous.path.name, previous.path.name + ".sha256"]
        assert CheckpointManager(tmp_path).latest() == previous

    def test_enospc_message_names_cause_space_and_previous(self, tmp_path: Path, monkeypatch):
        """ENOSPC reads as one line: path, cause, bytes needed vs free, and the intact previous one."""
        manager = CheckpointManager(tmp_path)
        previous = manager.save({"stamp": torch.ones(4)}, step=1)
        usage = collections.namedtuple("usage", "total used free")

        def no_space(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", no_space)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 6 << 20, 4096))
        with pytest.raises(CheckpointWriteError) as caught:
            manager.save({"w": torch.zeros(1 << 18)}, step=2)  # exactly 1 MiB of tensor data
        monkeypatch.undo()

        err = caught.value
        assert str(err) == (
            f"cannot save checkpoint {tmp_path / 'ckpt-00000002-step2.pt'}: "
            "ENOSPC (No space left on device); needs 1048576 bytes (1.0 MiB), "
            f"4096 bytes (4.0 KiB) free; previous checkpoint {previous.path} is intact"
        )
        assert (err.errno, err.needed_bytes, err.free_bytes) == (errno.ENOSPC, 1 << 20, 4096)
        assert isinstance(err.cause, OSError)
        assert names(tmp_path) == [previous.path.name, previous.path.name + ".sha256"]

    def test_first_save_failure_mentions_no_previous(self, tmp_path: Path, monkeypatch):
        """With nothing committed yet the message does not claim an intact previous checkpoint."""
        manager = CheckpointManager(tmp_path)

        def no_space(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", no_space)
        with pytest.raises(CheckpointWriteError) as caught:
            manager.save({"w": torch.zeros(8)}, step=1)
        monkeypatch.undo()
        assert "previous" not in str(caught.value)
        assert caught.value.previous is None
        assert names(tmp_path) == []


class TestFsyncFailure:
    def test_failed_fsync_discards_the_temp_and_the_next_save_uses_a_fresh_one(
        self, tmp_path: Path, monkeypatch
    ):
        """An EIO from fsync is never retried on that file: it is deleted, and the next save succeeds."""
        manager = CheckpointManager(tmp_path)
        previous = manager.save({"stamp": torch.ones(4)}, step=1)
        real_fsync = os.fsync
        synced: List[str] = []

        def flaky_fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            if len(synced) == 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", flaky_fsync)
        with pytest.raises(CheckpointWriteError) as caught:
            manager.save({"stamp": torch.full((4,), 2.0)}, step=2)
        failed_temp = synced[0]
        assert caught.value.errno == errno.EIO
        assert failed_temp.endswith(".sw-tmp") and "ckpt-00000002-step2.pt" in failed_temp
        assert not os.path.exists(failed_temp)
        assert names(tmp_path) == [previous.path.name, previous.path.name + ".sha256"]

        saved = manager.save({"stamp": torch.full((4,), 3.0)}, step=3)
        assert synced[1] != failed_temp and synced[1].endswith(".sw-tmp")
        assert manager.latest() == saved
        assert torch.equal(manager.load()["stamp"], torch.full((4,), 3.0))


class _Unpicklable:
    """Registered as a safe global (passes the up-front check) but refuses to be pickled."""

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle _Unpicklable")


class TestUnsavableState:
    @pytest.mark.parametrize("bad", [lambda: 1, threading.Lock()], ids=["lambda", "lock"])
    def test_unpicklable_object_is_a_typed_error_and_changes_nothing(self, tmp_path: Path, bad):
        """A lambda or lock in the state raises CheckpointStateError naming where it sits."""
        manager = CheckpointManager(tmp_path)
        previous = manager.save(generation_state(1), step=1)
        with pytest.raises(CheckpointStateError, match=r"state\['extras'\]\['hook'\]"):
            manager.save({"extras": {"hook": bad}}, step=2)
        assert names(tmp_path) == [previous.path.name, previous.path.name + ".sha256"]
        previous_intact(tmp_path, previous, 1)

    @pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"),
                        reason="torch < 2.5 has no safe_globals context")
    def test_pickling_failure_inside_torch_save_removes_the_temp(self, tmp_path: Path):
        """An object that fails only inside torch.save still gives the typed error and no temp."""
        manager = CheckpointManager(tmp_path)
        previous = manager.save(generation_state(1), step=1)
        with torch.serialization.safe_globals([_Unpicklable]):
            with pytest.raises(CheckpointStateError, match="cannot pickle _Unpicklable"):
                manager.save({"odd": _Unpicklable(), "w": torch.ones(4)}, step=2)
        assert names(tmp_path) == [previous.path.name, previous.path.name + ".sha256"]
        previous_intact(tmp_path, previous, 1)

    def test_numpy_scalar_is_refused_at_save_not_at_resume(self, tmp_path: Path):
        """A numpy scalar would fail weights_only loading later, so save refuses it now."""
        np = pytest.importorskip("numpy")
        manager = CheckpointManager(tmp_path)
        with pytest.raises(CheckpointStateError,
                           match=r"state\['extras'\]\['best'\] is a numpy\.float64"):
            manager.save({"extras": {"best": np.float64(0.5)}}, step=1)
        assert names(tmp_path) == []


class TestInterruptedSave:
    def test_keyboard_interrupt_propagates_unchanged_and_leaves_no_temp(self, tmp_path: Path,
                                                                         monkeypatch):
        """Ctrl-C during a save is re-raised as is, after the temp file is removed."""
        manager = CheckpointManager(tmp_path)
        previous = manager.save(generation_state(1), step=1)

        def interrupted(fd: int) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            manager.save(generation_state(2), step=2)
        monkeypatch.undo()
        assert names(tmp_path) == [previous.path.name, previous.path.name + ".sha256"]
        previous_intact(tmp_path, previous, 1)
