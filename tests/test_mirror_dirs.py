"""Mirrors of committed checkpoint directories (issue 14 for the framework callbacks, issue 12).

Real Hugging Face and Lightning runs in child processes mirror ``checkpoint-N/`` to a directory
on another filesystem (/dev/shm); a fresh runtime (the local output dir deleted) resumes from the
mirror; kill -9 during directory copies never leaves a mirror whose newest committed directory
does not load; a torn directory on the mirror is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
import torch
from ckpt_helpers import COMMITTED, fork_child, send
from conftest import heavy_n
from integration_helpers import SCRIPTS, finish, reap, spawn, wait_for, wait_for_file
from test_mirror import s3  # noqa: F401 - the moto S3 server fixture
from torch_helpers import assert_same

from session_watchdog.actions import EndTransaction
from session_watchdog.channel import RunDir
from session_watchdog.integrations._core import COMMIT_MARKER, commit_dir, verify_dir
from session_watchdog.integrations._mirror import DirMirror, restore_dir
from session_watchdog.trainer.mirror import LocalTarget

WAIT_S = 120.0


def marked(mirror: Path) -> List[str]:
    """The checkpoint-N directories on the mirror with their marker, oldest first."""
    names = [n for n in os.listdir(mirror)
             if n.startswith("checkpoint-") and (mirror / n / COMMIT_MARKER).exists()]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def tree(directory: Path) -> Dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def mirrored_step(run_dir: Path) -> int:
    status = RunDir(run_dir).read_status() if (run_dir / "trainer.json").exists() else None
    last = status.extra.get("last_mirrored") if status is not None else None
    return int(last["step"]) if isinstance(last, dict) else -1


def end_transaction(tmp_path: Path, run_dir: Path, calls: List[str]) -> EndTransaction:
    """The watchdog's end transaction over the run's real trainer.json (no end action run)."""
    return EndTransaction(run_dir=RunDir(run_dir), reason="training_complete",
                          status=RunDir(run_dir).read_status(), grace_s=0.0, dry_run=False,
                          end_action=("recorder", lambda: calls.append("end") or "ok"),
                          sleep=lambda s: None, confirm_after_s=0.0, alive=lambda: False,
                          flush=lambda paths, unmount=True: "not-on-drive")


# --------------------------------------------------------------------------------------------
# Hugging Face Trainer


def test_hf_mirror_then_a_fresh_runtime_resumes_from_the_mirror_with_identical_weights(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """WatchdogCallback(mirror=...) copies checkpoint-20 with identical bytes and marker; after
    kill -9 and the local output dir deleted, watchdog_resume restores it from the mirror, training
    ends with the weights of an uninterrupted run, and the end verifies the final one there."""
    if not other_fs:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    script = [sys.executable, str(SCRIPTS / "hf_train.py")]
    out, ref, mirror = tmp_path / "out", tmp_path / "ref", shm / "m"
    common = ["--steps", "40", "--save-steps", "10"]
    reference = spawn([*script, "--out", str(ref), *common, "--no-watchdog"],
                      SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "ref-run"))
    flag = tmp_path / "hanging"
    first = spawn([*script, "--out", str(out), *common, "--mirror", str(mirror),
                   "--hang-save-at", "30", "--hang-flag", str(flag)],
                  SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run-1"))
    try:
        wait_for_file(flag, first)  # hangs inside its save of step 30
        wait_for(lambda: mirrored_step(tmp_path / "run-1") == 20, "checkpoint-20 mirrored")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        reap(first)
    status = RunDir(tmp_path / "run-1").read_status()
    assert status is not None and status.last_checkpoint is not None
    assert status.last_checkpoint.step == 20
    last = status.extra["last_mirrored"]
    assert last["path"] == str(mirror / "checkpoint-20" / COMMIT_MARKER)
    assert (last["sha256"], last["bytes"]) == (status.last_checkpoint.sha256,
                                               status.last_checkpoint.bytes)
    local = tree(out / "checkpoint-20")
    assert "model.safetensors" in local and COMMIT_MARKER in local
    assert tree(mirror / "checkpoint-20") == local  # every file and the marker, byte for byte
    assert verify_dir(mirror / "checkpoint-20") is not None

    shutil.rmtree(out)  # a new runtime: the local disk is empty
    second = spawn([*script, "--out", str(out), *common, "--mirror", str(mirror)],
                   SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run-2"))
    try:
        code, stdout, stderr = finish(second)
        assert code == 0, stdout[-3000:] + stderr[-3000:]
        assert f"resume_from_checkpoint={out / 'checkpoint-20'}" in stdout
        code, _out, stderr = finish(reference)
        assert code == 0, stderr[-3000:]
    finally:
        reap(second)
        reap(reference)
    assert_same(torch.load(out / "final.pt"), torch.load(ref / "final.pt"), "weights")
    final = RunDir(tmp_path / "run-2").read_status()
    assert final is not None and final.state == "completed" and final.last_checkpoint is not None
    last = final.extra["last_mirrored"]  # finish() waited for the final copy
    assert (last["step"], last["sha256"]) == (40, final.last_checkpoint.sha256)
    on_mirror = marked(mirror)
    assert on_mirror[-1] == "checkpoint-40" and len(on_mirror) <= 2, on_mirror  # keep=2 there
    assert tree(mirror / "checkpoint-40") == tree(out / "checkpoint-40")

    calls: List[str] = []
    assert end_transaction(tmp_path, tmp_path / "run-2", calls).run() == "ended"
    assert calls == ["end"]
    weights = mirror / "checkpoint-40" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    assert end_transaction(tmp_path, tmp_path / "run-2", calls).run() == "aborted"
    assert calls == ["end"]


# --------------------------------------------------------------------------------------------
# Lightning


def test_lightning_mirror_restores_the_final_checkpoint_into_an_empty_dir(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """Lightning's WatchdogCallback(mirror=...) mirrors the final committed checkpoint-30 with
    identical bytes; with the local dir deleted, watchdog_resume copies it down and it loads."""
    if not other_fs:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    from session_watchdog.integrations.lightning import CHECKPOINT_FILE, watchdog_resume

    out, mirror = tmp_path / "out", shm / "m"
    proc = spawn([sys.executable, str(SCRIPTS / "lightning_train.py"), "--out", str(out),
                  "--steps", "30", "--mirror", str(mirror)],
                 SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run"))
    try:
        code, stdout, stderr = finish(proc)
    finally:
        reap(proc)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    status = RunDir(tmp_path / "run").read_status()
    assert status is not None and status.state == "completed" and status.last_checkpoint is not None
    last = status.extra["last_mirrored"]
    assert (last["step"], last["sha256"]) == (30, status.last_checkpoint.sha256)
    assert marked(mirror) == ["checkpoint-30"]
    assert tree(mirror / "checkpoint-30") == tree(out / "checkpoint-30")

    shutil.rmtree(out)
    resumed = watchdog_resume(out, mirror=str(mirror))
    assert resumed == str(out / "checkpoint-30" / CHECKPOINT_FILE)
    assert tree(out / "checkpoint-30") == tree(mirror / "checkpoint-30")
    assert torch.load(resumed, weights_only=False)["global_step"] == 30
    assert [n for n in os.listdir(out) if n.startswith(".")] == []  # no temp directory left


# --------------------------------------------------------------------------------------------
# Torn directories and kill -9


def _save_dir(parent: Path, step: int) -> Path:
    """A checkpoint directory like a framework's: weights, and a file in a sub-directory."""
    directory = parent / f"checkpoint-{step}"
    (directory / "sub").mkdir(parents=True)
    torch.save({"w": torch.full((300_000,), float(step))}, directory / "weights.pt")
    (directory / "sub" / "state.json").write_text(json.dumps({"step": step}))
    return directory


def _load_dir(directory: Path) -> int:
    """The step a restored directory holds; asserts its files agree."""
    step = json.loads((directory / "sub" / "state.json").read_text())["step"]
    assert torch.equal(torch.load(directory / "weights.pt")["w"], torch.full((300_000,), float(step)))
    return int(step)


def test_a_torn_or_changed_directory_on_the_mirror_is_never_resumed_from(
        tmp_path: Path, shm: Path, other_fs: bool, caplog: pytest.LogCaptureFixture) -> None:
    """On the mirror, checkpoint-30 without its marker and checkpoint-40 with a changed file are
    skipped: the fresh directory gets checkpoint-20, byte for byte, and nothing else."""
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    mirror = DirMirror(LocalTarget(mirror_dir), keep=4, allow_same_filesystem=not other_fs)
    mirror.attach_dir(local, keep=4)
    try:
        for step in (10, 20):
            saved = commit_dir(_save_dir(local, step), step=step)
            mirror.submit(saved)  # type: ignore[arg-type]
            assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
    finally:
        mirror.close()
    assert marked(mirror_dir) == ["checkpoint-10", "checkpoint-20"]
    shutil.copytree(mirror_dir / "checkpoint-20", mirror_dir / "checkpoint-30")
    os.unlink(mirror_dir / "checkpoint-30" / COMMIT_MARKER)  # a copy cut short before its commit
    commit_dir(_save_dir(tmp_path / "other", 40), step=40)
    shutil.copytree(tmp_path / "other" / "checkpoint-40", mirror_dir / "checkpoint-40")
    (mirror_dir / "checkpoint-40" / "sub" / "state.json").write_text('{"step": 41}')

    fresh = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING):
        found = restore_dir(DirMirror(LocalTarget(mirror_dir)), fresh)
    assert found is not None and found.directory == fresh / "checkpoint-20"
    assert os.listdir(fresh) == ["checkpoint-20"]
    assert tree(fresh / "checkpoint-20") == tree(mirror_dir / "checkpoint-20")
    assert _load_dir(fresh / "checkpoint-20") == 20
    assert any("mirror_restore_skipped" in r.getMessage() and "checkpoint-40" in r.getMessage()
               for r in caplog.records)
    # A local directory at least as new is kept: the mirror is not consulted for an older one.
    assert restore_dir(str(mirror_dir), fresh) == found


class SlowTarget(LocalTarget):
    """Writes in small slices with pauses, so that a SIGKILL lands inside a copy."""

    def write_chunk(self, fd: int, data: memoryview) -> int:
        time.sleep(0.002)
        return super().write_chunk(fd, data[: 64 * 1024])


@pytest.mark.heavy
def test_kill9_during_directory_copies_the_newest_committed_mirror_directory_always_loads(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """SIGKILL at random moments while directories are copied (and pruned locally as HF does):
    the mirror's newest committed directory restores, verifies and loads; torn ones are skipped."""
    rng = random.Random(12)
    attempts = heavy_n(3)
    torn_seen = 0  # kills that left a copy in progress behind (a directory without its marker)
    mirror_dir = shm / "m"
    for attempt in range(attempts):
        local = tmp_path / f"ckpt{attempt}"

        def child(fd: int) -> None:
            torch.set_num_threads(1)
            mirror = DirMirror(SlowTarget(mirror_dir), keep=2, allow_same_filesystem=not other_fs)
            mirror.attach_dir(local, keep=2)
            for step in range(attempt * 1000 + 1, attempt * 1000 + 10_000):
                saved = commit_dir(_save_dir(local, step), step=step)
                mirror.submit(saved)  # type: ignore[arg-type]
                send(fd, COMMITTED, step)
                old = local / f"checkpoint-{step - 2}"  # the framework's own rotation
                if old.exists():
                    os.unlink(old / COMMIT_MARKER)
                    shutil.rmtree(old)
                time.sleep(0.01)

        proc = fork_child(child)
        try:
            before = marked(mirror_dir)[-1] if mirror_dir.exists() and marked(mirror_dir) else None
            wait_for(lambda: mirror_dir.exists() and marked(mirror_dir) != []
                     and marked(mirror_dir)[-1] != before, "a new mirrored directory")
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.kill_and_collect()
        newest = marked(mirror_dir)[-1]
        unmarked = [n for n in os.listdir(mirror_dir) if n.startswith("checkpoint-")
                    and n not in marked(mirror_dir)]
        torn_seen += any(int(n.split("-")[1]) > int(newest.split("-")[1]) for n in unmarked)
        fresh = tmp_path / f"fresh{attempt}"
        found = restore_dir(DirMirror(LocalTarget(mirror_dir)), fresh)
        assert found is not None, f"attempt {attempt}: nothing restorable in {os.listdir(mirror_dir)}"
        assert found.directory.name == newest
        assert _load_dir(found.directory) == int(newest.split("-")[1])
        assert tree(found.directory) == tree(mirror_dir / newest)
        digest = hashlib.sha256((found.directory / COMMIT_MARKER).read_bytes()).hexdigest()
        assert digest == found.sha256
    assert torn_seen >= 1, "no kill landed inside a copy: the test did not test anything"


# --------------------------------------------------------------------------------------------
# Accelerate


def test_accelerate_stop_waits_for_the_mirror_and_a_fresh_runtime_resumes_from_it(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """AcceleratorSession(..., mirror=...): a SIGTERM stop returns only once checkpoint-11 verified
    on the mirror; with the local directory deleted, resume() restores it from there and the run
    ends with the batches and weights of an uninterrupted run."""
    if not other_fs:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    pytest.importorskip("accelerate")
    from test_integrations_accelerate import run

    mirror = shm / "m"
    reference, expected, _ = run(tmp_path / "a", None)
    _, first, stop = run(tmp_path / "b", 11, mirror=mirror)
    assert stop is not None and stop.code == 75 and stop.checkpoint.step == 11
    status = RunDir(tmp_path / "b" / "run").read_status()
    assert status is not None and status.state == "stopped" and status.last_checkpoint is not None
    last = status.extra["last_mirrored"]  # the stop waited for it
    assert (last["step"], last["sha256"]) == (11, status.last_checkpoint.sha256)
    assert tree(mirror / "checkpoint-11") == tree(tmp_path / "b" / "ckpt" / "checkpoint-11")

    shutil.rmtree(tmp_path / "b" / "ckpt")
    model, rest, stop = run(tmp_path / "b", None, mirror=mirror)
    assert stop is None and first + rest == expected
    assert_same(model.state_dict(), reference.state_dict(), "weights")
    assert marked(mirror)[-1] == "checkpoint-24"


# --------------------------------------------------------------------------------------------
# S3 (moto's server on 127.0.0.1, through s3fs)


def test_directories_on_s3_are_identical_pruned_and_restored_and_the_marker_object_commits(
        tmp_path: Path, s3: Any) -> None:  # noqa: F811
    """Objects equal every file and the marker, keep=2 prunes on S3, a fresh directory restores
    the newest; without its marker object that directory is skipped for the older one."""
    import s3fs

    _server, options, _stopped, url = s3
    local = tmp_path / "ckpt"
    mirror = DirMirror(url, storage_options=options, keep=2)
    mirror.attach_dir(local, keep=2)
    try:
        for step in (10, 20, 30):
            saved = commit_dir(_save_dir(local, step), step=step)
            mirror.submit(saved)  # type: ignore[arg-type]
            assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
    finally:
        mirror.close()
    fs = s3fs.S3FileSystem(**options)
    root = url[len("s3://"):]
    objects = {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}
    expected = {f"checkpoint-{s}/{rel}": data for s in (20, 30)
                for rel, data in tree(local / f"checkpoint-{s}").items()}
    assert objects == expected  # checkpoint-10 pruned there; no temp objects

    found = restore_dir(DirMirror(url, storage_options=options), tmp_path / "fresh")
    assert found is not None and found.directory.name == "checkpoint-30"
    assert _load_dir(found.directory) == 30
    fs.rm_file(f"{root}/checkpoint-30/{COMMIT_MARKER}")  # as if the copy died before its commit
    found = restore_dir(DirMirror(url, storage_options=options), tmp_path / "fresh2")
    assert found is not None and found.directory.name == "checkpoint-20"
    assert tree(found.directory) == tree(local / "checkpoint-20")


def test_the_same_commit_again_is_read_back_not_rewritten_and_a_damaged_copy_is_redone(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """Submitting a directory whose commit is on the mirror already leaves its files untouched
    (same inodes); when a file there was damaged, that commit is undone and copied again."""
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    mirror = DirMirror(LocalTarget(mirror_dir), allow_same_filesystem=not other_fs)
    mirror.attach_dir(local, keep=2)
    try:
        saved = commit_dir(_save_dir(local, 5), step=5)
        for _ in range(2):
            mirror.submit(saved)  # type: ignore[arg-type]
            assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
        inode = os.stat(mirror_dir / "checkpoint-5" / "weights.pt").st_ino
        mirror.submit(saved)  # type: ignore[arg-type]
        wait_for(lambda: mirror.report()["state"] == "ok", "the third copy")
        assert os.stat(mirror_dir / "checkpoint-5" / "weights.pt").st_ino == inode
        (mirror_dir / "checkpoint-5" / "sub" / "state.json").write_text('{"step": 6}')
        mirror.submit(saved)  # type: ignore[arg-type]
        wait_for(lambda: (mirror_dir / "checkpoint-5" / "sub" / "state.json").read_text()
                 == '{"step": 5}' and marked(mirror_dir) == ["checkpoint-5"], "the copy redone")
    finally:
        mirror.close()
    assert tree(mirror_dir / "checkpoint-5") == tree(local / "checkpoint-5")


def test_ranks_restoring_into_one_shared_directory_at_once_all_get_the_same_checkpoint(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """Four processes call restore_dir on the same empty directory at once (every rank of a job
    on a shared disk): each gets checkpoint-20, which verifies, and no temp directory is left."""
    local, mirror_dir, fresh = tmp_path / "ckpt", shm / "m", tmp_path / "fresh"
    mirror = DirMirror(LocalTarget(mirror_dir), allow_same_filesystem=not other_fs)
    mirror.attach_dir(local, keep=2)
    try:
        for step in (10, 20):
            saved = commit_dir(_save_dir(local, step), step=step)
            mirror.submit(saved)  # type: ignore[arg-type]
            assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
    finally:
        mirror.close()
    assert mirror._thread is not None
    mirror._thread.join(WAIT_S)  # no thread of ours is forked mid-lock
    go = tmp_path / "go"

    def child(fd: int) -> None:  # no torch here: its thread pool does not survive a fork
        wait_for(go.exists, "the start")
        found = restore_dir(str(mirror_dir), fresh)
        send(fd, COMMITTED, -1 if found is None else found.step)

    children = [fork_child(child) for _ in range(4)]
    try:
        go.write_text("")
    finally:
        reports = [c.reap() for c in children]
    assert reports == [[(COMMITTED, 20)]] * 4
    assert os.listdir(fresh) == ["checkpoint-20"] and _load_dir(fresh / "checkpoint-20") == 20
    assert tree(fresh / "checkpoint-20") == tree(mirror_dir / "checkpoint-20")


# --------------------------------------------------------------------------------------------
# A copy verified before is never deleted on a re-check that failed


class FlakyReads(LocalTarget):
    """Reads from the mirror numbered in ``fail`` (counted from 1) fail: a connection reset."""

    fail: Set[int] = set()
    reads = 0

    def read_chunks(self, name: str) -> Any:
        FlakyReads.reads += 1
        if FlakyReads.reads in FlakyReads.fail:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read_chunks(name)


def test_finish_does_not_send_the_verified_final_checkpoint_again_to_a_flaky_mirror(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """finish() with a checkpoint that verified on the mirror already reads nothing more there:
    its copy stays committed, as trainer.json's last_mirrored says, though reads fail now."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from session_watchdog.integrations.accelerate import AcceleratorSession

    FlakyReads.fail, FlakyReads.reads = set(), 0
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    mirror = DirMirror(FlakyReads(mirror_dir), allow_same_filesystem=not other_fs)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 1))
    session = AcceleratorSession(accelerator, local, run_dir=tmp_path / "run",
                                 checkpoint_every=None, poll_interval=0.05, mirror=mirror)
    session.resume()
    session.step()
    saved = session.checkpoint()
    assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
    reads = FlakyReads.reads
    FlakyReads.fail = set(range(reads + 1, reads + 100))  # every read from now on fails
    session.finish(saved)
    assert mirror._thread is not None
    mirror._thread.join(WAIT_S)
    assert FlakyReads.reads == reads
    assert marked(mirror_dir) == ["checkpoint-1"]
    assert tree(mirror_dir / "checkpoint-1") == tree(local / "checkpoint-1")
    assert mirrored_step(tmp_path / "run") == 1
    del model


@pytest.mark.parametrize("failed_read", [1, 2])  # the marker's, a file's
def test_a_failed_read_back_of_a_commit_there_already_keeps_it_and_reports(
        tmp_path: Path, shm: Path, other_fs: bool, failed_read: int) -> None:
    """The same commit submitted again while one read from the mirror fails (the marker's or a
    file's): its copy there stays committed, untouched (same inodes), the failure is reported
    and the retry verifies it."""
    FlakyReads.fail, FlakyReads.reads = set(), 0
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    mirror = DirMirror(FlakyReads(mirror_dir), allow_same_filesystem=not other_fs)
    problems: List[str] = []
    mirror.attach_dir(local, keep=2, on_change=lambda report: problems.append(
        str(report.get("problem"))))
    try:
        saved = commit_dir(_save_dir(local, 5), step=5)
        mirror.submit(saved)  # type: ignore[arg-type]
        assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
        inodes = {p: os.stat(p).st_ino for p in (mirror_dir / "checkpoint-5").rglob("*")}
        FlakyReads.fail = {FlakyReads.reads + failed_read}
        mirror.submit(saved)  # type: ignore[arg-type]
        wait_for(lambda: "unreachable" in problems, "the failed read reported")
        assert (mirror_dir / "checkpoint-5" / COMMIT_MARKER).exists()
        wait_for(lambda: mirror.report()["state"] == "ok", "the retry")
    finally:
        mirror.close()
    assert marked(mirror_dir) == ["checkpoint-5"]
    assert {p: os.stat(p).st_ino for p in (mirror_dir / "checkpoint-5").rglob("*")} == inodes
    assert tree(mirror_dir / "checkpoint-5") == tree(local / "checkpoint-5")


def test_higher_numbered_directories_on_the_mirror_never_get_the_new_copies_pruned(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """A mirror holding checkpoint-900 and -1000 of an earlier run: a new run's checkpoint-100,
    -200, -300 (keep=2) each stay committed there after wait() reported them; the new run's own
    prune keeps the newest two of its steps (100 goes) and leaves 900 and 1000 alone."""
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    for step in (900, 1000):
        commit_dir(_save_dir(mirror_dir, step), step=step)
    mirror = DirMirror(LocalTarget(mirror_dir), keep=2, allow_same_filesystem=not other_fs)
    mirror.attach_dir(local, keep=2)
    try:
        for step in (100, 200, 300):
            saved = commit_dir(_save_dir(local, step), step=step)
            mirror.submit(saved)  # type: ignore[arg-type]
            assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
            assert f"checkpoint-{step}" in marked(mirror_dir)
            assert tree(mirror_dir / f"checkpoint-{step}") == tree(local / f"checkpoint-{step}")
    finally:
        mirror.close()
    assert marked(mirror_dir) == ["checkpoint-200", "checkpoint-300", "checkpoint-900",
                                  "checkpoint-1000"]
    assert sorted(os.listdir(mirror_dir)) == ["checkpoint-1000", "checkpoint-200",
                                              "checkpoint-300", "checkpoint-900"]


class GatedWrites(LocalTarget):
    """Writes wait for ``gate`` once ``closed`` (a copy held in the middle)."""

    gate = threading.Event()
    closed = False
    waiting = threading.Event()

    def write_chunk(self, fd: int, data: memoryview) -> int:
        if GatedWrites.closed:
            GatedWrites.waiting.set()
            assert GatedWrites.gate.wait(WAIT_S)
        return super().write_chunk(fd, data)


def test_the_same_step_saved_again_is_waited_for_by_checksum_and_replaces_the_old_copy_last(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """checkpoint-8 committed again with other bytes (keep=1): while it copies, the first copy
    stays committed there and wait() does not return; then wait() returns the new commit and
    the mirror holds exactly its files."""
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    GatedWrites.gate.clear()
    GatedWrites.waiting.clear()
    GatedWrites.closed = False
    mirror = DirMirror(GatedWrites(mirror_dir), keep=1, allow_same_filesystem=not other_fs)
    mirror.attach_dir(local, keep=2)
    try:
        first = commit_dir(_save_dir(local, 8), step=8)
        mirror.submit(first)  # type: ignore[arg-type]
        assert mirror.wait(first, WAIT_S) is not None  # type: ignore[arg-type]
        first_tree = tree(mirror_dir / "checkpoint-8")
        GatedWrites.closed = True
        shutil.rmtree(local / "checkpoint-8")
        torch.save({"w": torch.full((300_000,), 9.0)}, _save_dir(local, 8) / "weights.pt")
        second = commit_dir(local / "checkpoint-8", step=8)
        assert second.sha256 != first.sha256
        mirror.submit(second)  # type: ignore[arg-type]
        assert GatedWrites.waiting.wait(WAIT_S)
        assert mirror.wait(second, 0.5) is None  # type: ignore[arg-type]
        assert marked(mirror_dir) == ["checkpoint-8"]
        assert tree(mirror_dir / "checkpoint-8") == first_tree
        GatedWrites.gate.set()
        done = mirror.wait(second, WAIT_S)  # type: ignore[arg-type]
        assert done is not None and done.sha256 == second.sha256
        assert done.location == str(mirror_dir / "checkpoint-8" / COMMIT_MARKER)
    finally:
        GatedWrites.gate.set()
        mirror.close()
    assert sorted(os.listdir(mirror_dir)) == ["checkpoint-8"]
    assert tree(mirror_dir / "checkpoint-8") == tree(local / "checkpoint-8")
    found = restore_dir(str(mirror_dir), tmp_path / "fresh")
    assert found is not None and found.sha256 == second.sha256


@pytest.mark.heavy
def test_the_same_step_saved_again_replaces_its_objects_on_s3(
        tmp_path: Path, s3: Any) -> None:  # noqa: F811
    """On S3 (keep=1), checkpoint-8 committed again: wait() returns the new commit, the objects
    are exactly its files and marker (no staging objects left) and a fresh directory gets it."""
    import s3fs

    _server, options, _stopped, url = s3
    local = tmp_path / "ckpt"
    mirror = DirMirror(url, storage_options=options, keep=1)
    mirror.attach_dir(local, keep=2)
    try:
        first = commit_dir(_save_dir(local, 8), step=8)
        mirror.submit(first)  # type: ignore[arg-type]
        assert mirror.wait(first, WAIT_S) is not None  # type: ignore[arg-type]
        (local / "checkpoint-8" / "sub" / "state.json").write_text('{"step": 8, "again": 1}')
        second = commit_dir(local / "checkpoint-8", step=8)
        mirror.submit(second)  # type: ignore[arg-type]
        done = mirror.wait(second, WAIT_S)  # type: ignore[arg-type]
        assert done is not None and done.sha256 == second.sha256
    finally:
        mirror.close()
    fs = s3fs.S3FileSystem(**options)
    root = url[len("s3://"):]
    objects = {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}
    assert objects == {f"checkpoint-8/{rel}": data
                       for rel, data in tree(local / "checkpoint-8").items()}
    found = restore_dir(DirMirror(url, storage_options=options), tmp_path / "fresh")
    assert found is not None and found.sha256 == second.sha256


def test_a_directory_of_700_files_with_a_marker_over_64_kib_is_restored_from_the_mirror(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """A sharded state of 700 files (its marker ~78 KiB) verifies on the mirror and a fresh
    directory is restored from it, byte for byte."""
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    directory = local / "checkpoint-7"
    (directory / "shards").mkdir(parents=True)
    for i in range(700):
        (directory / "shards" / f"__{i}_0.distcp").write_bytes(b"%d" % i)
    saved = commit_dir(directory, step=7)
    assert saved.bytes > 64 * 1024
    mirror = DirMirror(LocalTarget(mirror_dir), keep=2, allow_same_filesystem=not other_fs)
    mirror.attach_dir(local, keep=2)
    try:
        mirror.submit(saved)  # type: ignore[arg-type]
        assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
    finally:
        mirror.close()
    found = restore_dir(str(mirror_dir), tmp_path / "fresh")
    assert found is not None and found.directory == tmp_path / "fresh" / "checkpoint-7"
    assert found.sha256 == saved.sha256
    assert tree(found.directory) == tree(directory)


def test_a_staging_directory_a_killed_copy_left_is_swept_at_the_next_prune(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """A .staging-checkpoint-8 left on the mirror (a copy killed while it replaced
    checkpoint-8) is gone once the next checkpoint verified; the committed ones stay."""
    local, mirror_dir = tmp_path / "ckpt", shm / "m"
    commit_dir(_save_dir(mirror_dir, 8), step=8)
    shutil.copytree(mirror_dir / "checkpoint-8", mirror_dir / ".staging-checkpoint-8")
    mirror = DirMirror(LocalTarget(mirror_dir), keep=2, allow_same_filesystem=not other_fs)
    mirror.attach_dir(local, keep=2)
    try:
        saved = commit_dir(_save_dir(local, 9), step=9)
        mirror.submit(saved)  # type: ignore[arg-type]
        assert mirror.wait(saved, WAIT_S) is not None  # type: ignore[arg-type]
    finally:
        mirror.close()
    assert sorted(os.listdir(mirror_dir)) == ["checkpoint-8", "checkpoint-9"]
    assert marked(mirror_dir) == ["checkpoint-8", "checkpoint-9"]
