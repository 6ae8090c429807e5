"""The checkpoint module as a specification: format, retention, resume picking, loading, async
saves, training-state capture and restore. Fault injection lives in test_checkpoint_faults.py.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_watchdog import channel
from session_watchdog.trainer import checkpoint
from session_watchdog.trainer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointStateError,
    CheckpointWriteError,
    SavedCheckpoint,
    capture_state,
    restore_state,
)

np = pytest.importorskip("numpy")
crc32c = pytest.importorskip("crc32c")


def names(directory: Path) -> List[str]:
    return sorted(os.listdir(directory))


def stamped(value: float) -> Dict[str, Any]:
    return {"w": torch.full((16,), float(value))}


class TestCheckpointManagerInit:
    def test_creates_the_directory_private(self, tmp_path: Path):
        """A new checkpoint directory is created with mode 0700."""
        CheckpointManager(tmp_path / "a" / "ckpt")
        assert stat.S_IMODE(os.stat(tmp_path / "a" / "ckpt").st_mode) == 0o700

    @pytest.mark.parametrize("keep", [0, -1, True, 1.5])
    def test_rejects_a_keep_below_one(self, tmp_path: Path, keep: Any):
        """keep must be an integer of at least 1: keeping nothing would defeat the manager."""
        with pytest.raises(ValueError, match="keep"):
            CheckpointManager(tmp_path, keep=keep)

    @pytest.mark.parametrize("prefix", ["", "../x", "a/b", ".hidden"])
    def test_rejects_a_prefix_that_is_not_a_plain_name(self, tmp_path: Path, prefix: str):
        """The prefix becomes part of file names, so paths and hidden names are refused."""
        with pytest.raises(ValueError, match="prefix"):
            CheckpointManager(tmp_path, prefix=prefix)

    def test_sweeps_only_its_own_stale_temps(self, tmp_path: Path):
        """Startup removes temps of our prefix, never another writer's temps or other files."""
        ours = channel.temp_path_for(tmp_path / "ckpt-00000003-step30.pt")
        ours_marker = channel.temp_path_for(tmp_path / "ckpt-00000003-step30.pt.sha256")
        theirs = channel.temp_path_for(tmp_path / "request.json")
        other_prefix = channel.temp_path_for(tmp_path / "ema-00000001-step1.pt")
        for path in (ours, ours_marker, theirs, other_prefix, tmp_path / "notes.txt"):
            path.write_bytes(b"x")
        CheckpointManager(tmp_path)
        assert names(tmp_path) == sorted([theirs.name, other_prefix.name, "notes.txt"])


class TestSave:
    def test_saved_checkpoint_describes_the_file_exactly(self, tmp_path: Path):
        """bytes and CRC32C of the result are those of the file on disk; step and epoch as given."""
        saved = CheckpointManager(tmp_path).save(stamped(1), step=7, epoch=2)
        data = saved.path.read_bytes()
        assert saved.path == tmp_path / "ckpt-00000001-step7.pt"
        assert (saved.step, saved.epoch) == (7, 2)
        assert saved.bytes == len(data)
        assert saved.checksum == f"crc32c:{crc32c.crc32c(data):08x}" and saved.sha256 == ""
        assert saved.duration_s > 0

    def test_hash_covers_large_records_exactly(self, tmp_path: Path):
        """The checksum matches the file when big tensors and a big pickle are hashed in the helper."""
        state = {"a": torch.randn(1 << 20), "view": torch.randn(1 << 20)[::2],
                 "pickle": list(range(300_000))}  # data.pkl > 1 MiB: memory torch owns
        manager = CheckpointManager(tmp_path)
        for saved in (manager.save(state, step=1), manager.save_async(state, step=2).result()):
            assert saved.checksum == f"crc32c:{crc32c.crc32c(saved.path.read_bytes()):08x}"
            assert saved.bytes == saved.path.stat().st_size

    @pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"),
                        reason="torch < 2.6 has no crc32 setting")
    @pytest.mark.parametrize("setting", [True, False])
    def test_torch_crc32_setting_is_left_as_it_was(self, tmp_path: Path, setting: bool):
        """Saving skips torch's redundant zip crc32 for its own file only; the global setting stays."""
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(setting)
        try:
            manager = CheckpointManager(tmp_path)
            manager.save(stamped(1), step=1)
            manager.save_async(stamped(2), step=2).result()
            assert torch.serialization.get_crc32_options() is setting
            assert torch.equal(manager.load()["w"], stamped(2)["w"])
        finally:
            torch.serialization.set_crc32_options(before)

    def test_marker_is_json_with_the_documented_fields(self, tmp_path: Path):
        """The commit marker <name>.sha256 holds {v, file, checksum, bytes, step, epoch, at, duration_s}."""
        saved = CheckpointManager(tmp_path).save(stamped(1), step=7, epoch=2)
        marker = json.loads(Path(str(saved.path) + ".sha256").read_text())
        assert marker == {
            "v": 1, "file": "ckpt-00000001-step7.pt", "checksum": saved.checksum,
            "bytes": saved.bytes, "step": 7, "epoch": 2, "at": saved.at,
            "duration_s": saved.duration_s,
        }

    def test_files_are_private(self, tmp_path: Path):
        """Checkpoint and marker are created with mode 0600."""
        saved = CheckpointManager(tmp_path).save(stamped(1), step=1)
        for path in (saved.path, Path(str(saved.path) + ".sha256")):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def test_names_are_never_reused_even_for_the_same_step(self, tmp_path: Path):
        """Saving one step twice writes a new file: a committed checkpoint is never overwritten."""
        manager = CheckpointManager(tmp_path, keep=5)
        first = manager.save(stamped(1), step=4)
        second = manager.save(stamped(2), step=4)
        assert (first.path.name, second.path.name) == ("ckpt-00000001-step4.pt",
                                                       "ckpt-00000002-step4.pt")
        assert manager.verify(first.path) and manager.verify(second.path)

    def test_numbering_continues_after_a_restart(self, tmp_path: Path):
        """A new manager on the same directory numbers after the highest existing name."""
        CheckpointManager(tmp_path).save(stamped(1), step=10)
        saved = CheckpointManager(tmp_path).save(stamped(2), step=3)
        assert saved.path.name == "ckpt-00000002-step3.pt"

    def test_keeps_the_newest_k(self, tmp_path: Path):
        """After five saves with keep=2 exactly the last two checkpoints and markers remain."""
        manager = CheckpointManager(tmp_path, keep=2)
        for step in range(1, 6):
            manager.save(stamped(step), step=step)
        assert [s.step for s in manager.list()] == [4, 5]
        assert names(tmp_path) == ["ckpt-00000004-step4.pt", "ckpt-00000004-step4.pt.sha256",
                                   "ckpt-00000005-step5.pt", "ckpt-00000005-step5.pt.sha256"]

    def test_prune_deletes_markers_before_files(self, tmp_path: Path, monkeypatch):
        """Old markers go first, so a prune cut short leaves unmarked files, never orphaned marks."""
        writer = CheckpointManager(tmp_path, keep=3)
        for step in (1, 2, 3):
            writer.save(stamped(step), step=step)
        removed: List[str] = []
        real_unlink = os.unlink

        def recording_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            removed.append(Path(path).name)
            real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", recording_unlink)
        CheckpointManager(tmp_path, keep=1).save(stamped(4), step=4)
        assert [n for n in removed if not n.endswith(".sw-tmp")] == [
            "ckpt-00000003-step3.pt.sha256", "ckpt-00000002-step2.pt.sha256",
            "ckpt-00000001-step1.pt.sha256",
            "ckpt-00000003-step3.pt", "ckpt-00000002-step2.pt", "ckpt-00000001-step1.pt",
        ]

    def test_round_trip_is_exact(self, tmp_path: Path):
        """What load() returns equals what was saved, nested containers included."""
        state = {"w": torch.randn(3, 4), "meta": {"names": ["a", "b"], "pair": (1, None)},
                 "n": 3, "x": 0.25, "flag": True, "raw": b"\x00\x01"}
        manager = CheckpointManager(tmp_path)
        manager.save(state, step=1)
        loaded = manager.load()
        assert torch.equal(loaded["w"], state["w"])
        assert {k: v for k, v in loaded.items() if k != "w"} == \
            {k: v for k, v in state.items() if k != "w"}


# --------------------------------------------------------------------------------------------
# Resume picking

KINDS = ["good", "torn", "empty", "unmarked", "bad_sha", "bad_size", "bad_json", "flipped"]


def damage(manager: CheckpointManager, saved: SavedCheckpoint, kind: str, cut: float) -> None:
    """Turn a committed checkpoint into the given kind of bad file."""
    marker = Path(str(saved.path) + ".sha256")
    if kind == "torn":
        os.truncate(saved.path, max(1, int(saved.bytes * cut)) if saved.bytes > 1 else 0)
    elif kind == "empty":
        os.truncate(saved.path, 0)
    elif kind == "unmarked":
        os.unlink(marker)
    elif kind in ("bad_sha", "bad_size"):
        obj = json.loads(marker.read_text())
        if kind == "bad_sha":
            algorithm, digest = obj["checksum"].split(":")
            obj["checksum"] = f"{algorithm}:{'0' if digest[0] != '0' else '1'}{digest[1:]}"
        else:
            obj["bytes"] += 1
        channel.write_json(marker, obj)
    elif kind == "bad_json":
        marker.write_text("{not json")
    elif kind == "flipped":
        data = bytearray(saved.path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        saved.path.write_bytes(bytes(data))


class TestLatest:
    @settings(max_examples=40, deadline=None,  # too_slow: a loaded machine is no test failure
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(
        kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=6),
        cut=st.floats(min_value=0.01, max_value=0.99),
        temps=st.integers(min_value=0, max_value=2),
        old_broken=st.booleans(),
    )
    def test_picks_exactly_the_newest_good_checkpoint(self, kinds, cut, temps, old_broken):
        """latest() returns the newest good checkpoint among torn/unmarked/bad/empty files and litter."""
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            writer = CheckpointManager(directory, keep=100)
            saved = [writer.save(stamped(i), step=i) for i in range(len(kinds))]
            for item, kind in zip(saved, kinds):
                damage(writer, item, kind, cut)
            for i in range(temps):
                channel.temp_path_for(directory / f"ckpt-{90 + i:08d}-step9.pt").write_bytes(b"x")
            if old_broken:
                (directory / "ckpt-00000000-step0.pt.broken").write_bytes(b"old")
            (directory / "notes.txt").write_text("unrelated")
            (directory / "ckpt-00000077-step1.pt.sha256").write_text("{}")  # orphan marker

            manager = CheckpointManager(directory)  # a restart
            good = [s for s, k in zip(saved, kinds) if k == "good"]
            expected = good[-1] if good else None
            assert manager.latest() == expected
            left = names(directory)
            assert "notes.txt" in left
            assert not [n for n in left if n.endswith(".sw-tmp")]
            assert "ckpt-00000077-step1.pt.sha256" not in left
            assert len([n for n in left if n.endswith(".broken")]) <= 1
            if expected is not None:
                assert manager.load(expected)["w"][0].item() == float(expected.step)
                # Everything newer than the pick has been set aside.
                newer = [s for s in saved if s.path.name > expected.path.name]
                assert not [s for s in newer if s.path.exists()]

    def test_empty_directory_has_no_latest(self, tmp_path: Path):
        """With nothing saved latest() is None and load() says so."""
        manager = CheckpointManager(tmp_path)
        assert manager.latest() is None
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            manager.load()

    def test_a_torn_newest_is_set_aside_and_only_one_broken_file_is_kept(self, tmp_path: Path):
        """Each bad newest file becomes <name>.broken, replacing the previous .broken file."""
        manager = CheckpointManager(tmp_path, keep=5)
        good = manager.save(stamped(1), step=1)
        for step in (2, 3):
            bad = manager.save(stamped(step), step=step)
            damage(manager, bad, "torn", 0.5)
            assert manager.latest() == good
        assert names(tmp_path) == [good.path.name, good.path.name + ".sha256",
                                   "ckpt-00000003-step3.pt.broken"]


class TestVerify:
    def test_accepts_a_committed_checkpoint(self, tmp_path: Path):
        """A checkpoint just saved verifies."""
        manager = CheckpointManager(tmp_path)
        assert manager.verify(manager.save(stamped(1), step=1).path)

    @pytest.mark.parametrize("kind", ["flipped", "torn", "unmarked", "bad_sha", "bad_json"])
    def test_rejects_a_damaged_checkpoint(self, tmp_path: Path, kind: str):
        """A changed byte, a cut, or a missing or wrong marker fails verification."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save(stamped(1), step=1)
        damage(manager, saved, kind, 0.5)
        assert not manager.verify(saved.path)

    def test_load_of_a_damaged_checkpoint_raises(self, tmp_path: Path):
        """load(saved) checks the file against its marker before unpickling anything."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save(stamped(1), step=1)
        damage(manager, saved, "flipped", 0.5)
        with pytest.raises(CheckpointError, match="does not match its marker"):
            manager.load(saved)


class _Exploit:
    """Pickles to a call of exec(): what a malicious checkpoint looks like."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> Any:
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def commit_by_hand(path: Path, step: int) -> SavedCheckpoint:
    """Give an arbitrary file a valid marker, the way an attacker with write access could."""
    data = path.read_bytes()
    obj = {"v": 1, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
           "bytes": len(data), "step": step, "epoch": 0, "at": 1.0, "duration_s": 0.0}
    channel.write_json(Path(str(path) + ".sha256"), obj)
    return SavedCheckpoint(path, step, 0, len(data), obj["sha256"], 0.0, 1.0)


class TestLoad:
    def test_a_crafted_reduce_pickle_is_refused_and_never_runs(self, tmp_path: Path):
        """A checkpoint whose pickle calls exec() is refused on load; its side effect never happens."""
        # The exploit is real: an unrestricted load runs it.
        canary_target = tmp_path / "canary-pwned"
        canary = tmp_path / "canary.pt"
        torch.save({"model": _Exploit(canary_target)}, canary)
        torch.load(canary, weights_only=False)
        assert canary_target.read_text() == "pwned"

        target = tmp_path / "pwned"
        directory = tmp_path / "ckpt"
        manager = CheckpointManager(directory)
        crafted = directory / "ckpt-00000001-step1.pt"
        torch.save({"model": _Exploit(target)}, crafted)
        saved = commit_by_hand(crafted, 1)
        assert manager.latest() == saved  # the marker is valid: only loading can stop it
        with pytest.raises(CheckpointError, match="refusing to load .*weights_only=True"):
            manager.load()
        with pytest.raises(CheckpointError, match="refusing to load"):
            manager.load(saved)
        assert not target.exists()

    def test_map_location_is_passed_through(self, tmp_path: Path):
        """Tensors land on the requested device (meta here, so no GPU is needed)."""
        manager = CheckpointManager(tmp_path)
        manager.save(stamped(1), step=1)
        assert manager.load(map_location="meta")["w"].device.type == "meta"


def _call_arguments(source: str, open_paren: int) -> str:
    """The text between the parenthesis at ``open_paren`` and its matching close."""
    depth = 0
    for i in range(open_paren, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[open_paren + 1 : i]
    return source[open_paren + 1 :]


class TestWeightsOnlyLint:
    def test_every_torch_load_in_the_package_sets_weights_only_true(self):
        """Every torch.load( in session_watchdog/ passes weights_only=True, and load is never aliased."""
        package = Path(checkpoint.__file__).resolve().parents[1]
        calls = 0
        offenders = []
        for path in sorted(package.rglob("*.py")):
            source = path.read_text()
            # grep: every textual call, in code, comments or docs alike (strictest reading).
            for found in re.finditer(r"torch(?:\.serialization)?\.load\(", source):
                calls += 1
                arguments = _call_arguments(source, found.end() - 1)
                if not re.search(r"\bweights_only\s*=\s*True\b", arguments):
                    line = source.count("\n", 0, found.start()) + 1
                    offenders.append(f"{path}:{line}: torch.load({arguments})")
            # A call the grep cannot see: load imported under another name.
            for node in ast.walk(ast.parse(source, filename=str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch") \
                        and any(alias.name == "load" for alias in node.names):
                    offenders.append(f"{path}:{node.lineno}: from {node.module} import load")
        assert calls, "no torch.load call found: the scan looks in the wrong place"
        assert offenders == []


# --------------------------------------------------------------------------------------------
# Async saves


class TestSaveAsync:
    def test_snapshot_ignores_later_in_place_updates(self, tmp_path: Path, monkeypatch):
        """Parameters changed right after save_async returns do not leak into the checkpoint."""
        model = torch.nn.Linear(4, 4)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        release = threading.Event()
        real_open = checkpoint.open_exclusive

        def held_open(path: Path) -> int:  # the background write waits until we mutated
            assert release.wait(10)
            return real_open(path)

        monkeypatch.setattr(checkpoint, "open_exclusive", held_open)
        manager = CheckpointManager(tmp_path)
        pending = manager.save_async({"model": model.state_dict()}, step=1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        release.set()
        saved = manager.wait()
        assert saved == pending.result() and pending.done()
        loaded = manager.load(saved)["model"]
        for key, value in before.items():
            assert torch.equal(loaded[key], value)

    def test_wait_returns_the_committed_checkpoint(self, tmp_path: Path):
        """wait() returns the same SavedCheckpoint that latest() then finds."""
        manager = CheckpointManager(tmp_path)
        manager.save_async(stamped(1), step=3, epoch=1)
        saved = manager.wait()
        assert saved is not None and (saved.step, saved.epoch) == (3, 1)
        assert manager.latest() == saved

    def test_wait_without_async_save_is_none(self, tmp_path: Path):
        """wait() with no async save started returns None at once."""
        assert CheckpointManager(tmp_path).wait() is None

    def test_back_to_back_async_saves_keep_their_own_contents(self, tmp_path: Path):
        """A second save_async waits for the first, and each file holds its own snapshot."""
        manager = CheckpointManager(tmp_path, keep=3)
        state = {"w": torch.zeros(1 << 16)}
        manager.save_async(state, step=1)
        state["w"].fill_(1.0)
        manager.save_async(state, step=2)
        state["w"].fill_(2.0)
        manager.save_async(state, step=3)
        manager.wait()
        values = [manager.load(s)["w"].unique().tolist() for s in manager.list()]
        assert values == [[0.0], [1.0], [2.0]]

    def test_tied_tensors_stay_shared_in_the_snapshot(self, tmp_path: Path):
        """A tensor that appears twice in the state is one tensor after loading."""
        shared = torch.ones(8)
        manager = CheckpointManager(tmp_path)
        manager.save_async({"a": shared, "b": shared}, step=1)
        manager.wait()
        loaded = manager.load()
        assert loaded["a"].data_ptr() == loaded["b"].data_ptr()

    def test_state_dict_metadata_and_tied_views_come_back_as_from_a_sync_save(
            self, tmp_path: Path) -> None:
        """state_dict()'s _metadata (versions for load_state_dict) is kept, and tied weights
        (two tensor objects, one view) load still tied, as after a sync save."""
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        tied = torch.nn.Module()
        tied.a = tied.b = torch.nn.Linear(4, 4)
        state = {"model": model.state_dict(), "tied": tied.state_dict()}
        assert state["tied"]["a.weight"] is not state["tied"]["b.weight"]
        manager = CheckpointManager(tmp_path, keep=3)
        synced = manager.load(manager.save(state, step=1))
        for step in (2, 3):  # fresh buffers, then reused ones
            loaded = manager.load(manager.save_async(state, step=step).result(timeout=120))
            assert loaded["model"]._metadata == synced["model"]._metadata \
                == state["model"]._metadata, step
            assert loaded["tied"]._metadata == state["tied"]._metadata, step
            a, b = loaded["tied"]["a.weight"], loaded["tied"]["b.weight"]
            assert a.data_ptr() == b.data_ptr() and torch.equal(a, state["tied"]["a.weight"])

    def test_a_meta_tensor_is_saved_as_a_sync_save_saves_it(self, tmp_path: Path) -> None:
        """A meta tensor (no data) in the state: save_async succeeds, first and later, and it
        loads as after a sync save, a meta tensor of its shape."""
        state = {"w": torch.ones(3), "lazy": torch.empty(2, 5, device="meta")}
        manager = CheckpointManager(tmp_path, keep=3)
        synced = manager.load(manager.save(state, step=1))
        for step in (2, 3):
            loaded = manager.load(manager.save_async(state, step=step).result(timeout=120))
            for got in (synced["lazy"], loaded["lazy"]):
                assert (got.device.type, got.shape) == ("meta", torch.Size([2, 5]))
            assert torch.equal(loaded["w"], state["w"])

    def test_a_save_interrupted_before_its_thread_started_does_not_block_later_saves(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Ctrl-C in save_async before its writer thread started: the next save goes through."""
        real_start = threading.Thread.start
        interrupted: List[str] = []

        def interrupted_start(thread: threading.Thread) -> None:
            if thread.name.startswith("sw-checkpoint-save-") and not interrupted:
                interrupted.append(thread.name)
                raise KeyboardInterrupt
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", interrupted_start)
        manager = CheckpointManager(tmp_path)
        with pytest.raises(KeyboardInterrupt):
            manager.save_async(stamped(1), step=1)
        assert interrupted == ["sw-checkpoint-save-1"]
        saved: List[SavedCheckpoint] = []
        later = threading.Thread(target=lambda: saved.append(manager.save(stamped(2), step=2)),
                                 daemon=True)  # a hang must not hold up the test run's exit
        later.start()
        later.join(60)
        assert not later.is_alive(), "the save after the interrupted one is blocked"
        assert [s.step for s in saved] == [2] and manager.latest() == saved[0]

    @pytest.mark.parametrize("thread_ran", [False, True])
    def test_a_ctrl_c_inside_a_thread_start_never_hangs_or_tears_the_next_save(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_ran: bool) -> None:
        """Ctrl-C inside start() of prepare_async's thread and of the writer's, before the new
        thread ran or once it did: the next save neither waits forever for a thread that never
        runs nor copies into buffers a running one still uses; every checkpoint holds its
        own values."""
        real_start = threading.Thread.start
        interrupted: List[str] = []

        def interrupted_start(thread: threading.Thread) -> None:
            if thread.name in ("sw-checkpoint-prepare", "sw-checkpoint-save-2") \
                    and thread.name not in interrupted:
                interrupted.append(thread.name)
                if thread_ran:
                    real_start(thread)
                raise KeyboardInterrupt
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", interrupted_start)
        manager = CheckpointManager(tmp_path, keep=5)
        with pytest.raises(KeyboardInterrupt):
            manager.prepare_async(stamped(0))
        saved: List[SavedCheckpoint] = []

        def later_saves() -> None:  # on a thread of its own: a hang fails the test, not the run
            with pytest.raises(KeyboardInterrupt):
                manager.save_async(stamped(2), step=2)
            assert interrupted == ["sw-checkpoint-prepare", "sw-checkpoint-save-2"]
            saved.append(manager.save_async(stamped(3), step=3).result(timeout=120))
            saved.append(manager.save_async(stamped(4), step=4).result(timeout=120))
            manager.release_buffers()
        later = threading.Thread(target=later_saves, daemon=True)  # a hang must not hold the run
        later.start()
        later.join(120)
        assert not later.is_alive(), "a save after the interrupted start is blocked"
        assert [s.step for s in saved] == [3, 4]
        for value, done in ((3, saved[0]), (4, saved[1])):
            assert torch.equal(manager.load(done)["w"], stamped(value)["w"])
        steps = [c.step for c in manager.list()]
        assert steps == ([2, 3, 4] if thread_ran else [3, 4])

    def test_background_failure_surfaces_from_wait_once(self, tmp_path: Path, monkeypatch):
        """A failed background write raises CheckpointWriteError from wait(), leaving no temp."""
        manager = CheckpointManager(tmp_path)
        previous = manager.save(stamped(1), step=1)
        monkeypatch.setattr(os, "fsync", _eio)
        manager.save_async(stamped(2), step=2)
        with pytest.raises(CheckpointWriteError, match="EIO") as caught:
            manager.wait()
        monkeypatch.undo()
        assert caught.value.path.name == "ckpt-00000002-step2.pt"
        assert manager.wait() is None
        assert names(tmp_path) == [previous.path.name, previous.path.name + ".sha256"]

    def test_unreported_failure_surfaces_from_the_next_save(self, tmp_path: Path, monkeypatch):
        """If nobody waited, the next save raises the old failure first; the one after works."""
        manager = CheckpointManager(tmp_path)
        monkeypatch.setattr(os, "fsync", _eio)
        pending = manager.save_async(stamped(1), step=1)
        while not pending.done():
            threading.Event().wait(0.01)
        monkeypatch.undo()
        with pytest.raises(CheckpointWriteError) as caught:
            manager.save(stamped(2), step=2)
        assert caught.value.path.name == "ckpt-00000001-step1.pt"
        saved = manager.save(stamped(3), step=3)
        assert manager.latest() == saved

    def test_failure_read_from_the_pending_save_is_not_raised_again(self, tmp_path: Path,
                                                                    monkeypatch):
        """A failure already raised by PendingSave.result() does not reappear in the next save."""
        manager = CheckpointManager(tmp_path)
        monkeypatch.setattr(os, "fsync", _eio)
        pending = manager.save_async(stamped(1), step=1)
        with pytest.raises(CheckpointWriteError):
            pending.result(timeout=120)
        monkeypatch.undo()
        assert manager.save(stamped(2), step=2).step == 2

    def test_state_errors_are_raised_before_the_background_starts(self, tmp_path: Path):
        """An unsavable object fails save_async itself, synchronously, with the typed error."""
        manager = CheckpointManager(tmp_path)
        with pytest.raises(CheckpointStateError):
            manager.save_async({"fn": lambda: 0}, step=1)
        assert manager.wait() is None and names(tmp_path) == []

    def test_a_save_interrupted_while_prepared_buffers_page_in_leaves_no_zeros_behind(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Ctrl-C in a save waiting for prepare_async's page-in: the next save holds no zeros."""
        from session_watchdog.trainer import checkpoint_async

        caught_up = threading.Event()  # set once the next save has copied its snapshot
        interrupted: List[bool] = []
        real_page_in = checkpoint_async.page_in

        class InterruptedWork:
            def __init__(self, bufs: Any) -> None:
                self._work = real_page_in(bufs)

            def run(self) -> int:
                if threading.current_thread().name != "sw-checkpoint-prepare" and not interrupted:
                    interrupted.append(True)
                    raise KeyboardInterrupt  # Ctrl-C lands while the save helps with the page-in
                # The prepare thread zero-fills late: after the next save copied, unless that
                # save waits for it (bounded, so a correct manager only costs this wait).
                caught_up.wait(3.0)
                return self._work.run()

        monkeypatch.setattr(checkpoint_async, "page_in", InterruptedWork)
        release = threading.Event()
        real_open = checkpoint.open_exclusive

        def held_open(path: Path) -> int:  # the write waits until the zero fill could have run
            assert release.wait(60)
            return real_open(path)

        state = {f"w{i}": torch.full((1 << 16,), float(i + 1)) for i in range(4)}
        manager = CheckpointManager(tmp_path)
        manager.prepare_async(state)
        preparing = manager._prepare_thread
        assert preparing is not None
        with pytest.raises(KeyboardInterrupt):
            manager.save_async(state, step=1)
        monkeypatch.setattr(checkpoint, "open_exclusive", held_open)
        manager.save_async(state, step=2)
        caught_up.set()
        preparing.join(60)
        release.set()
        saved = manager.wait()
        assert saved is not None and saved.step == 2
        loaded = manager.load(saved)
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key

    def test_prepared_buffers_no_save_uses_are_freed(self, tmp_path: Path) -> None:
        """A buffer prepare_async made for a tensor the state no longer holds, or now holds in
        another shape or dtype, is freed once a save has not used it."""
        import gc
        import weakref

        manager = CheckpointManager(tmp_path)
        state = {"w": torch.ones(1 << 10), "gone": torch.ones(1 << 12),
                 "reshaped": torch.ones(64), "recast": torch.ones(64)}
        manager.prepare_async(state)
        manager._join_prepare()
        prepared = {key[0]: weakref.ref(buf) for key, buf in manager._spare.items()}
        assert sorted(prepared) == sorted(state)
        later = {"w": state["w"], "reshaped": torch.ones(8, 8), "recast": torch.ones(64).double()}
        for step in (1, 2):
            manager.save_async(later, step=step).result(timeout=120)
        gc.collect()
        assert {key: ref() is not None for key, ref in prepared.items()} == {
            "w": True, "gone": False, "reshaped": False, "recast": False}


def _eio(fd: int) -> None:
    raise OSError(5, os.strerror(5))


# --------------------------------------------------------------------------------------------
# Training state


def _tiny_training() -> Any:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25),
                                torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    except (AttributeError, TypeError, RuntimeError) as err:
        pytest.skip(f"this torch has no CPU GradScaler ({err})")
    return model, optimizer, scheduler, scaler


def _train(model: Any, optimizer: Any, scheduler: Any, scaler: Any, steps: int) -> None:
    """Steps that draw from every RNG a training script uses: torch (data, dropout), python, numpy."""
    for _ in range(steps):
        x = torch.randn(16, 8)
        if random.random() < 0.5:
            x = x.flip(0)
        y = x.sum(dim=1, keepdim=True) * float(np.random.rand())
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


class TestCaptureRestore:
    def test_resume_continues_bit_identically(self, tmp_path: Path):
        """Training resumed from a checkpoint matches uninterrupted training bit for bit."""
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        model, optimizer, scheduler, scaler = _tiny_training()
        _train(model, optimizer, scheduler, scaler, 3)
        manager = CheckpointManager(tmp_path)
        manager.save(capture_state(model=model, optimizer=optimizer, scheduler=scheduler,
                                   scaler=scaler, epoch=1, step=3, elapsed_s=12.5,
                                   extras={"best": 0.5}), step=3, epoch=1)
        _train(model, optimizer, scheduler, scaler, 3)
        expected = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                    scaler.state_dict(), torch.rand(4), random.random(), np.random.rand(3))

        torch.manual_seed(99)  # a fresh process: other weights, other RNG states
        random.seed(99)
        np.random.seed(99)
        model, optimizer, scheduler, scaler = _tiny_training()
        info = restore_state(manager.load(), model=model, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler)
        assert info == {"epoch": 1, "step": 3, "elapsed_s": 12.5, "extras": {"best": 0.5}}
        _train(model, optimizer, scheduler, scaler, 3)
        resumed = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                   scaler.state_dict(), torch.rand(4), random.random(), np.random.rand(3))
        _assert_same(list(expected[:6]), list(resumed[:6]))
        assert np.array_equal(expected[6], resumed[6])

    def test_captured_state_loads_with_weights_only(self, tmp_path: Path):
        """Every part of capture_state() survives torch.load(weights_only=True)."""
        model, optimizer, scheduler, scaler = _tiny_training()
        random.gauss(0, 1)  # leaves a cached gaussian in Python's RNG state
        np.random.standard_normal()  # and in numpy's
        state = capture_state(model=model, optimizer=optimizer, scheduler=scheduler,
                              scaler=scaler, epoch=0, step=0, elapsed_s=0.0)
        path = tmp_path / "s.pt"
        torch.save(state, path)
        loaded = torch.load(path, weights_only=True)
        assert set(loaded) == {"format", "model", "optimizer", "scheduler", "scaler", "rng",
                               "epoch", "step", "elapsed_s", "extras"}
        assert {"python", "numpy", "torch"} <= set(loaded["rng"])
        _assert_same(state["rng"], loaded["rng"])

    def test_omitted_objects_are_left_out(self):
        """capture_state with no model or optimizer stores only RNG and counters."""
        state = capture_state(epoch=2, step=5, elapsed_s=1.0)
        assert "model" not in state and "optimizer" not in state
        assert (state["epoch"], state["step"], state["extras"]) == (2, 5, {})

    def test_restoring_a_part_the_checkpoint_lacks_raises(self):
        """Asking to restore a model from a checkpoint without one is a CheckpointError."""
        state = capture_state(epoch=0, step=0, elapsed_s=0.0)
        with pytest.raises(CheckpointError, match="no model state"):
            restore_state(state, model=torch.nn.Linear(2, 2))

    def test_a_foreign_dict_is_refused(self):
        """restore_state refuses a dict not built by capture_state."""
        with pytest.raises(CheckpointError, match="format"):
            restore_state({"model": {}}, model=torch.nn.Linear(2, 2))
