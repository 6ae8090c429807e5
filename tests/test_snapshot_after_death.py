"""Snapshots persisted after a trainer's death beyond a single process under ``run`` (issue 13):
DDP ranks under torchrun (a generation complete and equal on every rank, never a mix), and a
trainer the watchdog did not start (``attach``, notebook ``launch()``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from conftest import TORCHRUN
from integration_helpers import wait_for

from session_watchdog import channel, ckptfile, snapshot_slots
from session_watchdog.actions import verify_checkpoint
from session_watchdog.supervise.snapshots import persist_after_death, persist_ranks

CLI = [sys.executable, "-m", "session_watchdog"]
HERE = Path(__file__).resolve().parent
REPO = str(HERE.parent)
DDP_TRAINER = str(HERE / "ddp_snapshot_trainer.py")
TRAINER = str(HERE / "supervise_trainer.py")
DEADLINE_S = 240.0  # generous: torch imports on a busy machine


def env(**extra: str) -> Dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHDOG_")}
    out.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return out


def events(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def shm_cleanup() -> Iterator[List[Path]]:
    """Snapshot directories in /dev/shm a test made, removed whatever happened."""
    dirs: List[Path] = []
    yield dirs
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


# ---- the daemon's choice among the ranks' slots (written here, in the trainer's format) -------


def write(root: Path, rank: int, slot: int, *, gen: int, step: int, job: str = "job1",
          world_size: int = 2, ckpt: Optional[Path] = None) -> bytes:
    payload = f"rank {rank} gen {gen} step {step}".encode() * 100
    directory = snapshot_slots.rank_dir(root, rank)
    directory.mkdir(parents=True, exist_ok=True)
    (ckpt or root.parent / "ckpt").mkdir(exist_ok=True)
    snapshot_slots.write_slot(directory / snapshot_slots.SLOTS[slot], payload, {
        "gen": gen, "step": step, "epoch": 0, "sha256": hashlib.sha256(payload).hexdigest(),
        "rank": rank, "world_size": world_size, "job": job,
        "checkpoint_dir": str(ckpt or root.parent / "ckpt"), "prefix": "ckpt"})
    return payload


def committed(ckpt: Path) -> Optional[tuple]:
    ckpt.mkdir(exist_ok=True)
    return ckptfile.newest_committed(ckpt, "ckpt")


class TestRanksChoice:
    def test_the_newest_generation_equal_on_every_rank_is_committed_from_rank_0(self, tmp_path):
        """Both ranks have generations 4 (step 16) and 5 (step 20) complete: rank 0's step-20
        payload becomes the checkpoint, byte for byte."""
        root, ckpt = tmp_path / "shm", tmp_path / "ckpt"
        write(root, 0, 0, gen=4, step=16)
        want = write(root, 0, 1, gen=5, step=20)
        write(root, 1, 0, gen=4, step=16)
        write(root, 1, 1, gen=5, step=20)
        assert persist_ranks(root, [0, 1], 2) == 20
        found = committed(ckpt)
        assert found is not None and found[1] == 20 and found[2].read_bytes() == want

    def test_a_rank_killed_mid_write_makes_the_previous_equal_generation_the_one(self, tmp_path):
        """Rank 1 died writing generation 5 (its header still says incomplete): generation 4,
        complete on both ranks, is committed - never rank 0's generation 5 alone."""
        root, ckpt = tmp_path / "shm", tmp_path / "ckpt"
        want = write(root, 0, 0, gen=4, step=16)
        write(root, 0, 1, gen=5, step=20)
        write(root, 1, 0, gen=4, step=16)
        write(root, 1, 1, gen=5, step=20)
        with open(snapshot_slots.rank_dir(root, 1) / "slot1", "r+b") as fh:
            fh.write(snapshot_slots._header_bytes({"gen": 5, "complete": False}))
        assert persist_ranks(root, [0, 1], 2) == 16
        found = committed(ckpt)
        assert found is not None and found[1] == 16 and found[2].read_bytes() == want

    def test_a_corrupted_payload_on_another_rank_is_not_equal(self, tmp_path):
        """Rank 1's generation-5 payload has a flipped byte (its header is complete): its sha256
        fails, so generation 4 is committed."""
        root, ckpt = tmp_path / "shm", tmp_path / "ckpt"
        write(root, 0, 0, gen=4, step=16)
        write(root, 0, 1, gen=5, step=20)
        write(root, 1, 0, gen=4, step=16)
        write(root, 1, 1, gen=5, step=20)
        with open(snapshot_slots.rank_dir(root, 1) / "slot1", "r+b") as fh:
            fh.seek(snapshot_slots.HEADER_BYTES + 3)
            fh.write(b"X")
        assert persist_ranks(root, [0, 1], 2) == 16
        assert committed(ckpt)[1] == 16

    def test_slots_of_another_job_or_no_common_generation_commit_nothing(self, tmp_path):
        """Rank 1's slots were left by an earlier run (another job token), then hold only older
        generations than rank 0's: nothing is committed, and the log says why."""
        from structlog.testing import capture_logs

        root, ckpt = tmp_path / "shm", tmp_path / "ckpt"
        write(root, 0, 0, gen=4, step=16)
        write(root, 0, 1, gen=5, step=20)
        write(root, 1, 0, gen=4, step=16, job="earlier")
        write(root, 1, 1, gen=5, step=20, job="earlier")
        with capture_logs() as logs:
            assert persist_ranks(root, [0, 1], 2) is None
        assert [e["reason"] for e in logs if e["event"] == "snapshot_not_persisted"] == \
            ["no generation is complete on every rank"]
        write(root, 0, 0, gen=6, step=24)
        write(root, 1, 0, gen=2, step=8)
        write(root, 1, 1, gen=3, step=12)
        assert persist_ranks(root, [0, 1], 2) is None
        assert committed(ckpt) is None

    def test_a_missing_rank_or_another_world_size_commits_nothing(self, tmp_path):
        """Rank 1 never wrote (or wrote for a world of 4): rank 0's snapshot alone is not kept;
        without rank 0 among the ranks (its slots are on another node) nothing either."""
        root, ckpt = tmp_path / "shm", tmp_path / "ckpt"
        write(root, 0, 0, gen=1, step=4)
        assert persist_ranks(root, [0, 1], 2) is None
        write(root, 1, 0, gen=1, step=4, world_size=4)
        assert persist_ranks(root, [0, 1], 2) is None
        assert persist_ranks(root, [1], 2) is None
        assert committed(ckpt) is None


# ---- DDP under torchrun, under `session-watchdog run --restarts` -----------------------------


def torchrun(ckpt: Path, out: Path, *args: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--max-restarts=0", DDP_TRAINER, str(ckpt), str(out), *args]


def finish(proc: subprocess.Popen, timeout: float = DEADLINE_S) -> tuple:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"did not finish in {timeout} s\n{out}\n{err[-3000:]}") from None
    return proc.returncode, out, err


@TORCHRUN
class TestDdpUnderTorchrun:
    def test_killed_ranks_resume_from_their_equal_snapshot_with_identical_weights(
            self, tmp_path, shm_cleanup):
        """Two DDP ranks snapshot every 4 steps and are SIGKILLed at step 18 before any
        checkpoint: the watchdog commits the generation both ranks have complete (16, or 12 when
        16 was still being written), the restarted ranks resume there, and the final weights equal
        an uninterrupted run's bit for bit (every rank's RNG state came back)."""
        import torch

        ckpt = tmp_path / "ckpt"
        shm_cleanup.append(snapshot_slots.ranks_root(ckpt))
        ref_run = tmp_path / "ref-run"
        ref_run.mkdir(mode=0o700)
        reference = subprocess.Popen(
            torchrun(tmp_path / "ref-ckpt", tmp_path / "ref.pt", "--steps", "30"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env(SESSION_WATCHDOG_RUN_DIR=str(ref_run)), start_new_session=True)
        argv = [*CLI, "run", "--interval", "0.3s", "--run-dir", str(tmp_path / "run"),
                "--platform", "generic", "--log-file", str(tmp_path / "log.jsonl"),
                "--restarts", "1", "--restart-backoff", "0.1s", "--",
                *torchrun(ckpt, tmp_path / "out.pt", "--steps", "30", "--snapshot-every", "4",
                          "--kill-at", "18", "--step-sleep", "0.02")]
        watched = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env(), start_new_session=True)
        code, out, err = finish(watched)
        assert code == 0, err[-3000:]
        log = events(tmp_path / "log.jsonl")
        persisted = [e["step"] for e in log if e["event"] == "snapshot_persisted"]
        assert len(persisted) == 1 and persisted[0] in (12, 16), persisted
        restarted = [e for e in log if e["event"] == "child_restarted"]
        assert [e["resume_from_step"] for e in restarted] == persisted
        for rank in (0, 1):
            assert f"[rank {rank}] SIGKILLed at step 18" in out
            assert f"[rank {rank}] starts at step {persisted[0]}" in out
        code, ref_out, ref_err = finish(reference)
        assert code == 0, ref_err[-3000:]
        got = torch.load(tmp_path / "out.pt", weights_only=True)
        want = torch.load(tmp_path / "ref.pt", weights_only=True)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        # completed: the ranks gave the shared memory back
        assert not snapshot_slots.ranks_root(ckpt).exists()


    def test_a_duration_becomes_the_same_steps_on_every_rank(self, tmp_path, shm_cleanup):
        """snapshot_every="0.3s" under DDP: the ranks snapshot at the same steps (taken from
        their agreed step time, so no rank waits alone in the gather), and after both are
        SIGKILLed the newest generation complete on both is committed from rank 0."""
        ckpt, run = tmp_path / "ckpt", tmp_path / "run"
        shm_cleanup.append(snapshot_slots.ranks_root(ckpt))
        run.mkdir(mode=0o700)
        proc = subprocess.Popen(
            torchrun(ckpt, tmp_path / "out.pt", "--steps", "1000", "--snapshot-every", "0.3s",
                     "--kill-at", "80", "--step-sleep", "0.02"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env(SESSION_WATCHDOG_RUN_DIR=str(run)), start_new_session=True)
        code, out, err = finish(proc)
        assert code != 0 and "[rank 0] SIGKILLed at step 80" in out, err[-3000:]
        steps = {}  # rank -> {generation: step} of its complete slots
        for rank in (0, 1):
            headers = [snapshot_slots.read_header(snapshot_slots.rank_dir(
                snapshot_slots.ranks_root(ckpt), rank) / name) for name in snapshot_slots.SLOTS]
            steps[rank] = {h["gen"]: h["step"] for h in headers if h is not None}
        common = set(steps[0]) & set(steps[1])
        assert common and all(steps[0][g] == steps[1][g] for g in common), steps
        step = persist_after_death(channel.RunDir(run))
        assert step == steps[0][max(common)] and 0 < step < 80
        assert committed(ckpt)[1] == step


    def test_ranks_with_different_snapshot_every_refuse_to_start(self, tmp_path):
        """snapshot_every 4 on rank 0 and off on rank 1 would leave rank 0 alone in the
        snapshot's gather: both ranks raise DistributedError at Session() instead."""
        import textwrap

        from test_distributed import _PRELUDE, results, spawn_ranks

        script = _PRELUDE + textwrap.indent(textwrap.dedent("""
            from session_watchdog.trainer import Session
            from session_watchdog.trainer.distributed import DistributedError
            try:
                Session(base / "ckpt", run_dir=base / f"run{rank}", handle_signals=False,
                        snapshot_every=4 if rank == 0 else None)
            except DistributedError as err:
                refused = str(err)
            else:
                refused = None
            leave()
            print(json.dumps({"rank": rank, "refused": refused}))
        """), "    ")  # the prelude's indentation: spawn_ranks dedents the whole
        reports = results(spawn_ranks(script, str(tmp_path)))
        assert [r["rank"] for r in reports] == [0, 1]
        assert all("snapshot_every" in (r["refused"] or "") for r in reports), reports


# ---- attach and the notebook: a trainer the watchdog did not start -------------------------


def start_trainer(tmp_path: Path) -> subprocess.Popen:
    """supervise_trainer.py, snapshots every 3 steps, no checkpoint for a long while."""
    return subprocess.Popen(
        [sys.executable, TRAINER, str(tmp_path / "ckpt"), str(tmp_path / "out.pt"), "--steps",
         "100000", "--save-every", "100000", "--snapshot-every", "3", "--step-sleep", "0.02"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env(SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run")), start_new_session=True)


def snapshot_step(run_dir: Path) -> int:
    try:
        status = channel.RunDir(run_dir, create=False).read_status()
    except (channel.ChannelError, OSError):
        return 0
    info = status.extra.get("snapshot") if status is not None else None
    return int(info.get("step") or 0) if isinstance(info, dict) else 0


def resumed_step(tmp_path: Path, steps: int) -> str:
    """The trainer run again to ``steps``: the line saying where it started."""
    done = subprocess.run([sys.executable, TRAINER, str(tmp_path / "ckpt"),
                           str(tmp_path / "out.pt"), "--steps", str(steps), "--save-every",
                           "100000", "--step-sleep", "0"], capture_output=True, text=True,
                          env=env(SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run")),
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[0]


class TestAttach:
    def test_an_attached_trainer_killed_by_sigkill_leaves_its_snapshot_as_a_checkpoint(
            self, tmp_path, shm_cleanup):
        """attach watches a trainer that snapshots every 3 steps; SIGKILL (no cleanup, no save):
        the watchdog commits its newest complete snapshot, exits, and the trainer run again
        resumes from that step."""
        shm_cleanup.append(snapshot_slots.snapshot_dir(tmp_path / "run"))
        trainer = start_trainer(tmp_path)
        try:
            wait_for(lambda: snapshot_step(tmp_path / "run") >= 3, "snapshot 3", timeout=DEADLINE_S)
            attach = subprocess.Popen(
                [*CLI, "attach", "--pid", str(trainer.pid), "--interval", "0.2s", "--platform",
                 "generic", "--run-dir", str(tmp_path / "run"), "--log-file",
                 str(tmp_path / "log.jsonl")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                start_new_session=True)
            wait_for(lambda: any(e["event"] == "sample" for e in events(tmp_path / "log.jsonl")),
                     "the first sample", timeout=DEADLINE_S)
        finally:
            trainer.send_signal(signal.SIGKILL)
            trainer.wait()
        code, _, err = finish(attach)
        assert code == 0, err[-3000:]
        newest = snapshot_slots.newest(snapshot_slots.snapshot_dir(tmp_path / "run"))
        assert newest is not None and newest.step % 3 == 0
        persisted = [e for e in events(tmp_path / "log.jsonl") if e["event"] == "snapshot_persisted"]
        assert [e["step"] for e in persisted] == [newest.step]
        assert committed(tmp_path / "ckpt")[1] == newest.step
        assert resumed_step(tmp_path, newest.step + 2) == f"attempt 1 starts at step {newest.step}"

    def test_a_trainer_that_completed_leaves_nothing_to_persist(self, tmp_path):
        """The same attach over a trainer that completes: no snapshot is persisted (its own final
        checkpoint is the newest) and its slots are gone."""
        trainer = subprocess.Popen(
            [sys.executable, TRAINER, str(tmp_path / "ckpt"), str(tmp_path / "out.pt"), "--steps",
             "60", "--save-every", "100000", "--snapshot-every", "3", "--step-sleep", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env(SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "run")), start_new_session=True)
        try:
            wait_for(lambda: snapshot_step(tmp_path / "run") >= 3, "snapshot 3", timeout=DEADLINE_S)
            attach = subprocess.run(
                [*CLI, "attach", "--pid", str(trainer.pid), "--interval", "0.2s", "--platform",
                 "generic", "--run-dir", str(tmp_path / "run"), "--log-file",
                 str(tmp_path / "log.jsonl")],
                capture_output=True, text=True, env=env(), timeout=DEADLINE_S)
        finally:
            trainer.kill()
            trainer.wait()
        assert attach.returncode == 0, attach.stderr[-3000:]
        assert not [e for e in events(tmp_path / "log.jsonl") if e["event"] == "snapshot_persisted"]
        assert not snapshot_slots.snapshot_dir(tmp_path / "run").exists()


class TestNotebookLaunch:
    def test_a_launched_trainer_killed_by_sigkill_leaves_its_snapshot_as_a_checkpoint(
            self, shell, tmp_path, monkeypatch, shm_cleanup):
        """A trainer started with launch() from the notebook is SIGKILLed: the watchdog thread in
        the kernel commits its newest complete snapshot, which the next run resumes from."""
        import session_watchdog as sw

        monkeypatch.setenv("PYTHONPATH", REPO)
        shm_cleanup.append(snapshot_slots.snapshot_dir(tmp_path / "run"))
        launched = sw.launch(
            [sys.executable, TRAINER, str(tmp_path / "ckpt"), str(tmp_path / "out.pt"), "--steps",
             "100000", "--save-every", "100000", "--snapshot-every", "3", "--step-sleep", "0.02"],
            run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"), interval="0.2s",
            platform="generic")
        try:
            wait_for(lambda: snapshot_step(tmp_path / "run") >= 3, "snapshot 3", timeout=DEADLINE_S)
        finally:
            os.killpg(launched.pid, signal.SIGKILL)
        persisted = wait_for(lambda: [e for e in events(tmp_path / "log.jsonl")
                                      if e["event"] == "snapshot_persisted"],
                             "snapshot_persisted", timeout=DEADLINE_S)
        sw.stop()
        newest = snapshot_slots.newest(snapshot_slots.snapshot_dir(tmp_path / "run"))
        assert newest is not None and [e["step"] for e in persisted] == [newest.step]
        assert committed(tmp_path / "ckpt")[1] == newest.step
        assert resumed_step(tmp_path, newest.step + 2) == f"attempt 1 starts at step {newest.step}"


def test_persist_after_death_reads_the_ranks_from_trainer_json(tmp_path):
    """trainer.json naming ranks_dir, ranks and world_size (what a DDP reporter publishes) sends
    the daemon to the ranks' slots, not to rank 0's alone."""
    run_dir = channel.RunDir(tmp_path / "run")
    root = tmp_path / "shm"
    ckpt = tmp_path / "ckpt"
    write(root, 0, 0, gen=1, step=4, ckpt=ckpt)
    write(root, 0, 1, gen=2, step=8, ckpt=ckpt)
    write(root, 1, 0, gen=1, step=4, ckpt=ckpt)
    run_dir.write_status(channel.TrainerStatus(
        pid=1, start_time=1.0, state="running", step=9, epoch=0, step_time_s=0.1, acked_seq=0,
        last_checkpoint=None, heartbeat=time.time(), extra={"snapshot": {
            "dir": str(snapshot_slots.rank_dir(root, 0)), "ranks_dir": str(root), "ranks": [0, 1],
            "world_size": 2, "rank": 0}}))
    assert persist_after_death(run_dir) == 4
    assert committed(ckpt)[1] == 4


# ---- run: the snapshot is a checkpoint before any end of the runtime ------------------------

# A trainer that checkpointed step 10, snapshotted step 20 and then crashed (exit 1), without
# torch: the files are written in the trainer's formats. argv: ckpt dir, snapshot dir.
CRASHING_TRAINER = r'''
import hashlib, os, sys, time
from pathlib import Path
import psutil
from session_watchdog import channel, ckptfile, snapshot_slots
ckpt, shm = Path(sys.argv[1]), Path(sys.argv[2])
payload = b"x" * 1000
name = ckptfile.final_name("ckpt", 1, 10)
(ckpt / name).write_bytes(payload)
digest = hashlib.sha256(payload).hexdigest()
channel.write_json(ckptfile.marker_path(ckpt / name), ckptfile.marker_json(
    file=name, sha256=digest, size=len(payload), step=10, epoch=0, at=time.time(), duration_s=0.1))
snap = b"y" * 2000
snapshot_slots.write_slot(shm / snapshot_slots.SLOTS[0], snap, {
    "gen": 1, "step": 20, "epoch": 0, "sha256": hashlib.sha256(snap).hexdigest(),
    "checkpoint_dir": str(ckpt), "prefix": "ckpt"})
run_dir = channel.RunDir(Path(os.environ[channel.ENV_RUN_DIR]))
info = channel.CheckpointInfo(path=str(ckpt / name), seq=None, step=10, at=time.time(),
                              duration_s=0.1, bytes=len(payload), sha256=digest)
run_dir.write_status(channel.TrainerStatus(
    pid=os.getpid(), start_time=psutil.Process().create_time(), state="running", step=25,
    epoch=0, step_time_s=1.0, acked_seq=0, last_checkpoint=info, heartbeat=time.time(),
    extra={"snapshot": {"dir": str(shm)}}))
time.sleep(2)
raise SystemExit(1)
'''

# The end action: note what the checkpoint dir holds, then end this runtime as a real end does
# (the watchdog is killed at once). argv: the file to write, the ckpt dir.
KILLING_END = 'ls "$2" > "$1.tmp" && mv "$1.tmp" "$1"; kill -KILL $PPID'


class TestRunEndsOnlyAfterPersisting:
    def test_end_on_failure_starts_only_once_the_snapshot_is_a_checkpoint(self, tmp_path):
        """run --end-on-failure over a trainer that crashed with a snapshot (step 20) newer than
        its checkpoint (step 10): the snapshot is committed before the end action runs, which
        kills the watchdog like a real end."""
        ckpt, shm = tmp_path / "ckpt", tmp_path / "shm"
        ckpt.mkdir()
        shm.mkdir()
        (tmp_path / "trainer.py").write_text(CRASHING_TRAINER)
        (tmp_path / "end.sh").write_text(KILLING_END)
        at_end = tmp_path / "at_end.txt"
        end = json.dumps(["/bin/sh", str(tmp_path / "end.sh"), str(at_end), str(ckpt)])
        watched = subprocess.Popen(
            [*CLI, "run", "--interval", "0.3s", "--platform", "generic", "--run-dir",
             str(tmp_path / "run"), "--log-file", str(tmp_path / "log.jsonl"), "--end-when-done",
             "--end-on-failure", "--grace", "1s", "--end-command", end, "--",
             sys.executable, str(tmp_path / "trainer.py"), str(ckpt), str(shm)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
            start_new_session=True)
        try:
            code, _, err = finish(watched)
        finally:
            try:
                os.killpg(watched.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert code == -signal.SIGKILL, err[-3000:]  # the end action ran and killed us
        step20 = ckptfile.final_name("ckpt", 2, 20)
        assert at_end.read_text().split() == sorted([
            ckptfile.final_name("ckpt", 1, 10), ckptfile.marker_path(ckpt / ckptfile.final_name(
                "ckpt", 1, 10)).name, step20, ckptfile.marker_path(ckpt / step20).name])
        log = events(tmp_path / "log.jsonl")
        assert [e["step"] for e in log if e["event"] == "snapshot_persisted"] == [20]
        # the end verified the persisted checkpoint: trainer.json names it now
        assert [e["path"] for e in log if e["event"] == "action"
                and e["step"] == "end_verify"] == [str(ckpt / step20)]
        status = channel.RunDir(tmp_path / "run", create=False).read_status()
        assert status is not None and status.last_checkpoint is not None
        assert (status.last_checkpoint.step, status.last_checkpoint.path) == (20, str(ckpt / step20))
        assert verify_checkpoint(str(ckpt / step20), status.last_checkpoint.checksum,
                                 status.last_checkpoint.bytes) is None
