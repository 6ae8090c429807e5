"""Distributed training: the ranks' agreement, DDP stop and resume, sharded (DCP) checkpoints.

Real processes throughout: torchrun with the example trainer (gloo on CPU, 2 ranks), or two
ranks started here with the env:// rendezvous on 127.0.0.1 (no elastic agent: faster). Every
process imports torch (1-2 s each on 2 cores), so the scenarios are few and each checks a lot.
The pure parts (window schedule, GPU-to-rank mapping) and the single-process sharded protocol
are tested in this process.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from conftest import TORCHRUN, heavy_n
from torch_helpers import assert_same

from session_watchdog import channel
from session_watchdog.channel import Request, RunDir, TrainerStatus
from session_watchdog.probes import ranks_on_gpus
from session_watchdog.trainer.checkpoint import CheckpointManager
from session_watchdog.trainer.distributed import next_window
from session_watchdog.trainer.sharded import COMMIT_MARKER, ShardedCheckpointer

START_S = 240.0  # a torchrun launch on 2 loaded cores: agent + 2 workers importing torch (80 s each)
EPOCHS, STEPS_PER_EPOCH = 4, 25
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
SYNC_EVERY = 10  # the example's agreement cadence in the torchrun scenarios


# --------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SESSION_WATCHDOG_") and k not in (
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    # One intra-op thread: identical float reductions in every run, no oversubscription.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


pytestmark = TORCHRUN


def torchrun_example(run_dir: Path, ckpt_dir: Path, *extra: str) -> subprocess.Popen[str]:
    """The example trainer under ``torchrun --nproc_per_node=2`` (DDP, gloo, CPU)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max-restarts=0",
            "-m", "session_watchdog.trainer.example", "--ddp", "--device", "cpu",
            "--checkpoint-dir", str(ckpt_dir), "--run-dir", str(run_dir), "--run-dir-per-rank",
            "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS_PER_EPOCH),
            "--batch-size", "16", "--poll-interval", "0.05", "--heartbeat-interval", "0.1",
            "--checkpoint-every", "0", "--sync-every", str(SYNC_EVERY), "--sync-interval", "0",
            "--quiet", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env())


def finish(proc: subprocess.Popen[str], timeout: float = START_S) -> Tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"child did not finish in {timeout} s\n{out}") from None
    return proc.returncode, out


def status_of(run_dir: Path) -> Optional[TrainerStatus]:
    try:
        return RunDir(run_dir).read_status()
    except channel.ChannelError:
        return None


def wait_running(proc: subprocess.Popen[str], *run_dirs: Path, after_step: int = 0) -> None:
    """Wait until every run dir reports a live trainer past ``after_step``."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}\n{finish(proc)[1]}")
        found = [status_of(d) for d in run_dirs]
        if all(s is not None and s.state == "running" and s.step > after_step for s in found):
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the ranks never reported state=running")


def stop_request(seq: int, reason: str) -> Request:
    return Request(seq=seq, action="stop", reason=reason, deadline=None, issued=time.time())


def stopped_steps(out: str) -> Dict[int, Tuple[str, int, str]]:
    """rank -> (reason, step, path) from the example's "[rank r] stopped (...)" lines.

    Two ranks' lines may run together in torchrun's output: the path ends at ".pt".
    """
    found = {}
    for match in re.finditer(r"\[rank (\d)\] stopped \((.*?)\) at step (\d+): (\S+?\.pt)", out):
        found[int(match.group(1))] = (match.group(2), int(match.group(3)), match.group(4))
    return found


def spawn_ranks(script: str, *args: str, world: int = 2) -> List[subprocess.Popen[str]]:
    """``world`` ranks of ``script`` with the env:// rendezvous on 127.0.0.1 (no agent)."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env(RANK=str(rank), LOCAL_RANK=str(rank),
                                           WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for rank in range(world)]


def results(procs: Sequence[subprocess.Popen[str]], timeout: float = START_S) -> List[dict]:
    """Each rank's last stdout line, parsed as JSON (the scenario's report)."""
    reports = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a rank did not finish in time") from None
        assert proc.returncode == 0, f"rank exited with {proc.returncode}\n{out}\n{err}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


# Scenario scripts: every rank prints one JSON line last.

_PRELUDE = """
    import datetime, json, os, sys, time
    from pathlib import Path
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=240))  # = START_S
    rank, world = dist.get_rank(), dist.get_world_size()
    base = Path(sys.argv[1])

    def leave():  # together, and with the group torn down: no peer vanishes mid-exit
        dist.barrier()
        dist.destroy_process_group()
"""

CADENCE = _PRELUDE + """
    from session_watchdog.trainer import Session
    calls = {"n": 0}
    def counting(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapper
    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather",
                 "all_gather_object", "gather_object", "barrier", "reduce", "all_to_all"):
        setattr(dist, name, counting(getattr(dist, name)))
    session = Session(base / "ckpt", model=torch.nn.Linear(2, 2), run_dir=base / f"run{rank}",
                      sync_every=int(sys.argv[2]), sync_interval_s=None, checkpoint_every=None,
                      handle_signals=False, poll_interval=0.02)
    setup_calls, per_step = calls["n"], []
    for _ in range(int(sys.argv[3])):
        before = calls["n"]
        session.step()
        per_step.append(calls["n"] - before)
    session.close()
    leave()
    print(json.dumps({"rank": rank, "setup": setup_calls, "steps_with": [
        i + 1 for i, n in enumerate(per_step) if n], "max_per_step": max(per_step),
        "agreements": session.agreement.agreements}))
"""

MISMATCH = _PRELUDE + """
    from session_watchdog.trainer import Session
    from session_watchdog.trainer.distributed import DistributedError
    try:
        Session(base / "ckpt", run_dir=base / f"run{rank}", sync_every=50 + rank,
                handle_signals=False)
    except DistributedError as err:
        refused = str(err)
    else:
        refused = None
    leave()
    print(json.dumps({"rank": rank, "refused": refused}))
"""

SHARDED_SESSION = _PRELUDE + """
    import copy
    from torch.nn.parallel import DistributedDataParallel
    from session_watchdog.channel import Request, RunDir
    from session_watchdog.trainer import Session, StopTraining

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2),
                                    torch.nn.Linear(16, 4))
        net = DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return model, net, opt, sched

    def session_for(model, opt, sched):
        return Session(base / "ckpt", model=model, optimizer=opt, scheduler=sched,
                       run_dir=base / f"run{rank}", sharded=True, sync_every=5,
                       sync_interval_s=None, checkpoint_every=None, exit_on_stop=False,
                       handle_signals=False, poll_interval=0.02, heartbeat_interval=0.05)

    def train_step(net, opt, sched, session):
        opt.zero_grad()
        net(torch.randn(4, 8)).pow(2).mean().backward()  # torch RNG: dropout and data
        opt.step()
        sched.step()
        session.step()

    model, net, opt, sched = build(0)
    torch.manual_seed(100 + rank)  # ranks draw different numbers from here on
    session = session_for(model, opt, sched)
    assert not session.resume().resumed
    stopped_at = None
    try:
        for i in range(10_000):
            if i == 12 and rank == 1:  # a request only rank 1's run dir holds
                RunDir(base / "run1").write_request(Request(
                    seq=1, action="stop", reason="only-rank-1", deadline=None,
                    issued=time.time()))
            train_step(net, opt, sched, session)
            time.sleep(0.002)
    except StopTraining as stop:
        stopped_at = stop.checkpoint.step
        reason = stop.reason
        directory = str(Path(stop.checkpoint.path).parent)
    at_stop = {"model": copy.deepcopy(model.state_dict()),
               "opt": copy.deepcopy(opt.state_dict()), "sched": sched.state_dict(),
               "rng": torch.get_rng_state()}

    model2, net2, opt2, sched2 = build(1)  # other weights: the resume must replace them
    session2 = session_for(model2, opt2, sched2)
    start = session2.resume()
    same = {
        "model": all(torch.equal(a, b) for a, b in zip(at_stop["model"].values(),
                                                        model2.state_dict().values())),
        "opt": all(torch.equal(x, y) for k in at_stop["opt"]["state"]
                   for x, y in zip(at_stop["opt"]["state"][k].values(),
                                   opt2.state_dict()["state"][k].values())),
        "sched": sched2.state_dict() == at_stop["sched"],
        "rng": torch.equal(torch.get_rng_state(), at_stop["rng"]),
    }
    for _ in range(3):
        train_step(net2, opt2, sched2, session2)
    final = session2.complete()
    leave()
    print(json.dumps({"rank": rank, "stopped_at": stopped_at, "reason": reason,
                      "directory": directory, "resumed_step": start.step, "same": same,
                      "final_step": final.step, "final": str(final.path)}))
"""

ACK_THROUGH_PEER = _PRELUDE + """
    from session_watchdog.channel import Request, RunDir
    from session_watchdog.trainer import Session
    run = base / "run"  # one run dir for both ranks: rank 0 is its reporter
    model = torch.nn.Linear(4, 2)
    # Rank 0's poller never wakes on its own here: only rank 1 reads request.json.
    poll = 1000.0 if rank == 0 else 0.02
    session = Session(base / "ckpt", model=model, run_dir=run, poll_interval=poll,
                      heartbeat_interval=poll, checkpoint_every=None, handle_signals=False,
                      sync_every=5, sync_interval_s=None, keep=10)
    dist.barrier()
    if rank == 0:
        RunDir(run).write_request(Request(seq=7, action="checkpoint", reason="peer",
                                          deadline=None, issued=time.time(), rid="abcd.7"))
    dist.barrier()
    seen = True
    if rank == 1:
        deadline = time.monotonic() + 120
        while session._request is None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = session._request is not None
    dist.barrier()
    for _ in range(5):  # the agreement at step 5 carries rank 1's request
        session.step()
    first_ack = None
    if rank == 0:  # the reporter wrote its ack before it left the save
        first = RunDir(run).read_status()
        first_ack = [first.acked_seq, first.acked_rid]
        session._poll_once()  # rank 0's poller reads the request at last: answered already?
    for _ in range(5):  # the next agreement, at step 10
        session.step()
    session.close()
    leave()
    status = RunDir(run).read_status()
    saves = sorted(p.name for p in (base / "ckpt").iterdir() if p.name.endswith(".pt"))
    print(json.dumps({"rank": rank, "seen": seen, "saves": saves, "first_ack": first_ack,
                      "acked_seq": status.acked_seq, "acked_rid": status.acked_rid}))
"""

PER_RANK_DATA = _PRELUDE + """
    from torch.utils.data import DataLoader
    from session_watchdog.trainer import Session

    def train(ckpt, sharded, stop_at):
        torch.manual_seed(1000 + rank)  # per-rank seeds: each rank shuffles differently
        session = Session(base / ckpt, model=torch.nn.Linear(1, 1), run_dir=base / f"run{rank}",
                          sharded=sharded, sync_every=1000, sync_interval_s=None,
                          checkpoint_every=None, handle_signals=False)
        loader = session.track(DataLoader(list(range(40)), batch_size=4, shuffle=True))
        session.resume()
        seen = []
        for _epoch in session.epochs(2):
            for batch in loader:
                seen.append(batch.tolist())
                session.step()
                if session.global_step == stop_at:
                    session.checkpoint("test")
                    session.close()
                    return seen
        session.close()
        return seen

    report = {"rank": rank, "reference": train("ref", False, None)}
    for sharded in (False, True):
        name = "sharded" if sharded else "ddp"
        report[name] = train(name, sharded, 13) + train(name, sharded, None)
    leave()
    print(json.dumps(report))
"""

SAVE_FOREVER = _PRELUDE + """
    from session_watchdog.trainer.sharded import ShardedCheckpointer
    ckpt = ShardedCheckpointer(base / "ckpt", keep=1000)
    for step in range(1, 10_000):
        # Each rank owns a distinct 8 MB entry, so both ranks write shards in every save.
        state = {f"shard{rank}": torch.full((2_000_000,), float(step))}
        print(f"saving {step}", flush=True)
        ckpt.save(state, step=step)
        print(f"saved {step}", flush=True)
"""


# --------------------------------------------------------------------------------------------
# Pure parts


class TestNextWindow:
    @pytest.mark.parametrize("sync_every, interval, step_time, previous, expected", [
        (50, None, None, 0, 50),       # steps only: always sync_every
        (50, None, 2.0, 50, 50),
        (50, 10.0, 0.01, 1, 50),       # fast steps: 1000 would fit in 10 s, capped at 50
        (50, 10.0, 0.5, 50, 20),       # 0.5 s steps: 20 steps make 10 s
        (50, 10.0, 30.0, 20, 1),       # steps longer than the interval: every step
        (50, 10.0, None, 0, 1),        # unknown step time: start at 1 ...
        (50, 10.0, None, 1, 2),        # ... and double
        (50, 10.0, None, 32, 50),      # ... up to sync_every
        (7, 10.0, 0.0, 4, 7),          # a zero reading is no reading
    ])
    def test_window_from_the_agreed_step_time(self, sync_every: int, interval: Optional[float],
                                              step_time: Optional[float], previous: int,
                                              expected: int) -> None:
        """The next window is sync_every, or interval / agreed step time clamped to [1, sync_every]."""
        assert next_window(sync_every, interval, step_time, previous) == expected


class TestRanksOnGpus:
    def test_ranks_are_mapped_by_pid_and_unknown_is_never_empty(self) -> None:
        """GPU -> ranks by pid; an empty or foreign (container pid namespace) list is None."""
        gpu_pids = {0: [4100, 999], 1: [4101], 2: [], 3: None, 4: [77777]}
        rank_by_pid = {4100: 0, 4101: 1, 4102: 2}
        assert ranks_on_gpus(gpu_pids, rank_by_pid) == {0: [0], 1: [1], 2: None, 3: None,
                                                        4: None}


# --------------------------------------------------------------------------------------------
# Sharded checkpoints in one process (no process group: the protocol without collectives)


def committed_names(directory: Path) -> List[str]:
    return sorted(n for n in os.listdir(directory) if re.fullmatch(r"step-\d{10}", n))


class TestShardedCheckpointer:
    def test_its_names_stay_importable_from_distributed(self) -> None:
        """Every public name of sharded.py is the same object when imported from distributed."""
        from session_watchdog.trainer import distributed, sharded

        assert sharded.__all__ == ["COMMIT_MARKER", "ShardedCheckpoint", "ShardedCheckpointer",
                                   "ShardedCheckpointError", "is_initialized"]
        for name in sharded.__all__:
            assert name in distributed.__all__
            assert getattr(distributed, name) is getattr(sharded, name)

    def test_save_commits_a_step_directory_with_the_marker_last(self, tmp_path: Path) -> None:
        """A save leaves step-0000000007/ with DCP's files and a COMMITTED marker listing them."""
        ckpt = ShardedCheckpointer(tmp_path / "ckpt")
        saved = ckpt.save({"w": torch.arange(6.0)}, step=7, epoch=2)
        assert saved.directory == tmp_path / "ckpt" / "step-0000000007"
        assert (saved.step, saved.epoch, saved.world_size) == (7, 2, 1)
        assert saved.path == saved.directory / COMMIT_MARKER
        marker = json.loads(saved.path.read_bytes())
        assert set(marker["files"]) == {n for n in os.listdir(saved.directory)
                                        if n != COMMIT_MARKER}
        assert ".metadata" in marker["files"]
        assert saved.total_bytes == sum(marker["files"].values())
        assert [p for p in os.listdir(tmp_path / "ckpt") if ".tmp-" in p] == []
        loaded = {"w": torch.zeros(6)}
        ckpt.load(loaded)
        assert torch.equal(loaded["w"], torch.arange(6.0))

    def test_saving_a_committed_step_again_writes_the_new_state(self, tmp_path: Path) -> None:
        """Saving step 5 again with other tensors commits them in step-5 (another run's state
        there is never handed back as this save); nothing of the old directory is left."""
        ckpt = ShardedCheckpointer(tmp_path / "ckpt")
        first = ckpt.save({"w": torch.ones(3)}, step=5)
        again = ckpt.save({"w": torch.zeros(3)}, step=5)
        assert again.directory == first.directory and again.sha256 != first.sha256
        assert ckpt.latest() == again
        loaded = {"w": torch.ones(3)}
        ckpt.load(loaded)
        assert torch.equal(loaded["w"], torch.zeros(3))
        assert os.listdir(tmp_path / "ckpt") == ["step-0000000005"]

    @pytest.mark.parametrize("new_in_place", [False, True])
    def test_a_replacement_cut_short_is_settled_at_start(self, tmp_path: Path,
                                                         new_in_place: bool) -> None:
        """A save of step 3 that died between renaming the old step-3 aside and renaming its
        own in leaves the old one back in place; one that died after leaves the new one."""
        directory = tmp_path / "ckpt"
        ckpt = ShardedCheckpointer(directory)
        old = ckpt.save({"w": torch.ones(2)}, step=3)
        aside = directory / "step-0000000003.old-deadbeef"
        os.rename(old.directory, aside)
        new = ShardedCheckpointer(tmp_path / "other").save({"w": torch.zeros(2)}, step=3)
        temp = directory / ("step-0000000003" if new_in_place else "step-0000000003.tmp-cafe")
        os.rename(new.directory, temp)
        checker = ShardedCheckpointer(directory)
        assert os.listdir(directory) == ["step-0000000003"]
        loaded = {"w": torch.full((2,), 5.0)}
        checker.load(loaded)
        assert torch.equal(loaded["w"], torch.zeros(2) if new_in_place else torch.ones(2))

    def test_only_the_newest_keep_are_kept(self, tmp_path: Path) -> None:
        """With keep=2, three saves leave the two newest step directories."""
        ckpt = ShardedCheckpointer(tmp_path / "ckpt", keep=2)
        for step in (1, 2, 3):
            ckpt.save({"w": torch.full((2,), float(step))}, step=step)
        assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-0000000002", "step-0000000003"]

    def test_keep_ahead_of_exempts_later_steps_until_a_save_replaces_them(
            self, tmp_path: Path) -> None:
        """With keep=1, steps beyond keep_ahead_of's step survive saves of earlier steps; once a
        save replaces such a step it is pruned like any other."""
        ckpt = ShardedCheckpointer(tmp_path / "ckpt", keep=1)
        ckpt.save({"w": torch.ones(2)}, step=100)
        assert [saved.step for saved in ckpt.keep_ahead_of(0)] == [100]
        for step in (1, 2):
            ckpt.save({"w": torch.zeros(2)}, step=step)
        assert committed_names(tmp_path / "ckpt") == ["step-0000000002", "step-0000000100"]
        ckpt.save({"w": torch.zeros(2)}, step=100)
        ckpt.save({"w": torch.zeros(2)}, step=101)
        assert committed_names(tmp_path / "ckpt") == ["step-0000000101"]

    @pytest.mark.parametrize("damage", ["no marker", "shard removed", "shard truncated",
                                        "metadata changed", "marker garbage"])
    def test_latest_skips_a_directory_that_is_not_complete(self, tmp_path: Path,
                                                           damage: str) -> None:
        """A newer step directory with a missing/garbled marker or a wrong file is skipped."""
        ckpt = ShardedCheckpointer(tmp_path / "ckpt")
        ckpt.save({"w": torch.ones(1000)}, step=1)
        newer = ckpt.save({"w": torch.full((1000,), 2.0)}, step=2).directory
        shard = next(newer / n for n in os.listdir(newer) if n.endswith(".distcp"))
        if damage == "no marker":
            (newer / COMMIT_MARKER).unlink()
        elif damage == "shard removed":
            shard.unlink()
        elif damage == "shard truncated":
            os.truncate(shard, shard.stat().st_size - 1)
        elif damage == "metadata changed":
            with open(newer / ".metadata", "r+b") as fh:
                byte = fh.read(1)
                fh.seek(0)
                fh.write(bytes([byte[0] ^ 1]))
        else:
            (newer / COMMIT_MARKER).write_bytes(b"{not json")
        latest = ckpt.latest()
        assert latest is not None and latest.step == 1

    def test_stale_temp_directories_are_swept_at_start(self, tmp_path: Path) -> None:
        """A .tmp- directory (a save that died, even after writing its marker) is removed."""
        ckpt = ShardedCheckpointer(tmp_path / "ckpt")
        saved = ckpt.save({"w": torch.ones(2)}, step=3)
        dead = tmp_path / "ckpt" / "step-0000000004.tmp-deadbeef"
        dead.mkdir()
        (dead / COMMIT_MARKER).write_bytes((saved.path).read_bytes())
        assert ShardedCheckpointer(tmp_path / "ckpt").latest() == saved
        assert os.listdir(tmp_path / "ckpt") == ["step-0000000003"]

    def test_a_pickled_object_in_a_checkpoint_is_refused(self, tmp_path: Path) -> None:
        """Non-tensor entries load with weights_only rules: a pickled callable is never run."""
        from session_watchdog.trainer.sharded import ShardedCheckpointError

        ckpt = ShardedCheckpointer(tmp_path / "ckpt")
        ckpt.save({"w": torch.ones(2), "evil": os.getcwd}, step=1)
        with pytest.raises(ShardedCheckpointError, match="weights_only"):
            ckpt.load({"w": torch.zeros(2), "evil": None})


# --------------------------------------------------------------------------------------------
# Real ranks


class TestAgreementCadence:
    def test_one_collective_per_sync_every_steps(self, tmp_path: Path) -> None:
        """With sync_every=50, 1000 idle steps issue exactly one collective every 50th step."""
        reports = results(spawn_ranks(CADENCE, str(tmp_path), "50", "1000"))
        for report in reports:
            assert report["steps_with"] == list(range(50, 1001, 50))
            assert report["max_per_step"] == 1
            assert report["agreements"] == 20
            assert report["setup"] == 3  # token broadcast, probe barrier, all_gather: once

    def test_ranks_built_with_different_settings_refuse_to_start(self, tmp_path: Path) -> None:
        """sync_every 50 on rank 0 and 51 on rank 1: both raise DistributedError (no deadlock)."""
        reports = results(spawn_ranks(MISMATCH, str(tmp_path)))
        assert [r["rank"] for r in reports] == [0, 1]
        for report in reports:
            assert report["refused"] is not None and "sync_every" in report["refused"]


class TestRequestReadByAnotherRank:
    def test_a_request_read_only_by_another_rank_is_acked_with_its_rid_once(
            self, tmp_path: Path) -> None:
        """A checkpoint request that only rank 1 read reaches the agreement as a seq: rank 0,
        the reporter, acks it with the request's rid and never saves for it a second time."""
        reports = results(spawn_ranks(ACK_THROUGH_PEER, str(tmp_path)))
        assert reports[1]["seen"]
        assert reports[0]["first_ack"] == [7, "abcd.7"]  # the daemon matches acks by rid
        for report in reports:
            assert (report["acked_seq"], report["acked_rid"]) == (7, "abcd.7")
            assert report["saves"] == ["ckpt-00000001-step5.pt"]


class TestPerRankDataResume:
    def test_each_rank_resumes_its_own_shuffle_from_a_ddp_and_a_sharded_checkpoint(
            self, tmp_path: Path) -> None:
        """Ranks seeded differently, interrupted mid-epoch at step 13: after resume() each rank
        sees its own uninterrupted order, from a DDP (rank 0's file) and a sharded checkpoint."""
        r0, r1 = results(spawn_ranks(PER_RANK_DATA, str(tmp_path)))
        assert r0["reference"] != r1["reference"]  # the ranks' orders differ: a real check
        for report in (r0, r1):
            assert len(report["reference"]) == 20
            assert report["ddp"] == report["reference"]
            assert report["sharded"] == report["reference"]


class TestDdpUnderTorchrun:
    def test_a_request_in_one_rank_dir_stops_both_ranks_and_resumes_bit_identically(
            self, tmp_path: Path) -> None:
        """A stop written into only rank 0's run dir stops rank 1 at the same step (and the
        reverse on the next launch); rank 0's file is complete and acked by the run dir that got
        the request; resumed twice, 2 ranks end bit for bit like a run never stopped."""
        ref_run, ref_ckpt = tmp_path / "ref-run", tmp_path / "ref-ckpt"
        run, ckpt = tmp_path / "run", tmp_path / "ckpt"
        reference = torchrun_example(ref_run, ref_ckpt)
        # Slow steps (the reference shows they change no number): the stop must land before the
        # last step however late the poller runs on a loaded machine.
        victim = torchrun_example(run, ckpt, "--step-sleep", "0.1")

        # Launch 1: the request reaches rank 1 only through rank 0.
        wait_running(victim, run / "rank0", run / "rank1")
        RunDir(run / "rank0").write_request(stop_request(1, "to-rank-0"))
        code, out = finish(victim)
        assert code != 0, out  # torchrun reports a worker's 75 as a failure of the job
        stops = stopped_steps(out)
        assert set(stops) == {0, 1}, out
        (reason0, step, path), (reason1, step1, path1) = stops[0], stops[1]
        assert (reason0, reason1) == ("request:to-rank-0", "request:stop from rank 0")
        assert (step, path) == (step1, path1)
        assert step % SYNC_EVERY == 0 and step < TOTAL_STEPS
        first0, first1 = RunDir(run / "rank0").read_status(), RunDir(run / "rank1").read_status()
        assert first0 is not None and first1 is not None
        assert (first0.state, first0.acked_seq, first0.step) == ("stopped", 1, step)
        assert (first1.state, first1.acked_seq, first1.step) == ("stopped", 0, step)
        ck0, ck1 = first0.last_checkpoint, first1.last_checkpoint
        assert ck0 is not None and ck1 is not None
        assert (ck0.path, ck0.step, ck0.seq) == (path, step, 1)  # answers rank 0's request
        assert replace(ck1, seq=1) == ck0  # the same file; rank 1's run dir had no request
        assert CheckpointManager(ckpt).verify(path)  # complete: size and sha256 match
        assert first0.extra["agree_window_steps"] == SYNC_EVERY
        assert 0 < first0.extra["agree_delay_s"] < SYNC_EVERY * 10.0  # window x step time
        assert [r["rank"] for r in first1.extra["distributed"]["ranks"]] == [1]
        saved = torch.load(path, weights_only=True)
        assert len(saved["extras"]["session_watchdog"]["rank_rng"]) == 2

        # Launch 2: resumed by both ranks; now the request reaches rank 0 only through rank 1.
        victim = torchrun_example(run, ckpt, "--step-sleep", "0.1")
        wait_running(victim, run / "rank0", run / "rank1", after_step=step)
        RunDir(run / "rank1").write_request(stop_request(1, "to-rank-1"))
        code, out = finish(victim)
        assert out.count(f"resumed from {path} at epoch {step // STEPS_PER_EPOCH} step {step}") \
            == 2, out
        stops = stopped_steps(out)
        assert stops[1][0] == "request:to-rank-1" and stops[0][0] == "request:stop from rank 1"
        second = stops[0][1]
        assert stops[1][1] == second and step < second < TOTAL_STEPS
        assert RunDir(run / "rank1").read_status().acked_seq == 1  # type: ignore[union-attr]
        assert RunDir(run / "rank0").read_status().acked_seq == 1  # type: ignore[union-attr]

        # Launch 3: resume to the end; compare with the run that never stopped.
        code, out = finish(torchrun_example(run, ckpt))
        assert code == 0, out
        assert out.count(f"completed at step {TOTAL_STEPS}") == 2, out
        code, ref_out = finish(reference)
        assert code == 0, ref_out
        ours, theirs = CheckpointManager(ckpt).load(), CheckpointManager(ref_ckpt).load()
        assert (ours["step"], ours["epoch"]) == (theirs["step"], theirs["epoch"])
        assert_same(ours["model"], theirs["model"], "model")
        assert_same(ours["optimizer"]["state"], theirs["optimizer"]["state"], "optimizer")
        assert ours["scheduler"] == theirs["scheduler"]
        # torch's generator drives dropout; the example never seeds Python's or numpy's.
        assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
        for rank in (0, 1):
            assert torch.equal(ours["extras"]["session_watchdog"]["rank_rng"][rank]["torch"],
                               theirs["extras"]["session_watchdog"]["rank_rng"][rank]["torch"])


class TestShardedSession:
    def test_one_process_saves_and_resumes_through_dcp(self, tmp_path: Path) -> None:
        """sharded=True without a process group: a requested checkpoint is a committed step
        directory, acked in trainer.json by its marker; a new Session resumes from it exactly."""
        from session_watchdog.trainer import Session

        def build(seed: int) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            return model, torch.optim.Adam(model.parameters(), lr=0.01)

        model, opt = build(0)
        session = Session(tmp_path / "ckpt", model=model, optimizer=opt, run_dir=tmp_path / "run",
                          sharded=True, checkpoint_every=None, handle_signals=False,
                          poll_interval=0.02)
        try:
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(5, 4)).sum().backward()
                opt.step()
                session.step()
            RunDir(tmp_path / "run").write_request(Request(seq=1, action="checkpoint",
                                                           reason="test", deadline=None,
                                                           issued=time.time()))
            deadline = time.monotonic() + 120
            while session.acked_seq < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
                session.step()
            step = session.global_step
        finally:
            session.close()
        status = RunDir(tmp_path / "run").read_status()
        assert status is not None and status.acked_seq == 1
        ckpt = status.last_checkpoint
        assert ckpt is not None and ckpt.step == step
        assert ckpt.path == str(tmp_path / "ckpt" / f"step-{step:010d}" / COMMIT_MARKER)
        marker = json.loads(Path(ckpt.path).read_bytes())
        assert status.extra["checkpoint_total_bytes"] == marker["total_bytes"] > ckpt.bytes
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        expected_opt = copy.deepcopy(opt.state_dict()["state"])
        rng = torch.get_rng_state()

        torch.manual_seed(99)
        model2, opt2 = build(1)
        resumed = Session(tmp_path / "ckpt", model=model2, optimizer=opt2,
                          run_dir=tmp_path / "run", sharded=True, checkpoint_every=None,
                          handle_signals=False)
        try:
            start = resumed.resume()
        finally:
            resumed.close()
        assert (start.resumed, start.step) == (True, step)
        assert_same(dict(model2.state_dict()), expected, "model")
        assert_same(opt2.state_dict()["state"], expected_opt, "adam state")
        assert torch.equal(torch.get_rng_state(), rng)

    def test_a_rank_local_request_stops_both_and_the_dcp_resume_restores_every_rank(
            self, tmp_path: Path) -> None:
        """sharded=True: rank 1's own request stops both ranks at one agreed step in one DCP
        directory; a fresh model resumes from it with the same weights, Adam state, scheduler
        and each rank's own RNG; complete() commits a final directory."""
        reports = results(spawn_ranks(SHARDED_SESSION, str(tmp_path)))
        r0, r1 = reports
        assert r0["stopped_at"] == r1["stopped_at"] and r0["stopped_at"] % 5 == 0
        assert (r0["reason"], r1["reason"]) == ("request:stop from rank 1", "request:only-rank-1")
        assert r0["directory"] == r1["directory"]
        for report in reports:
            assert report["resumed_step"] == r0["stopped_at"]
            assert report["same"] == {"model": True, "opt": True, "sched": True, "rng": True}
            assert report["final_step"] == r0["stopped_at"] + 3
        directory = Path(r0["directory"])
        files = json.loads((directory / COMMIT_MARKER).read_bytes())["files"]
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)
        assert ShardedCheckpointer(tmp_path / "ckpt").latest().step == r0["final_step"]  # type: ignore[union-attr]
        assert RunDir(tmp_path / "run1").read_status().acked_seq == 1  # type: ignore[union-attr]
        assert RunDir(tmp_path / "run0").read_status().acked_seq == 0  # type: ignore[union-attr]


class TestKillDuringShardedSave:
    @pytest.mark.heavy
    @pytest.mark.parametrize("attempt", range(heavy_n(2)))
    def test_kill_9_of_one_rank_mid_save_leaves_nothing_committed_but_incomplete(
            self, tmp_path: Path, attempt: int) -> None:
        """Rank 0 or 1 killed -9 at a random point of a save: every step directory that looks
        committed verifies and loads whole; the dead save is a .tmp- directory swept at start."""
        rng = random.Random(attempt)
        victim_rank = attempt % 2
        procs = spawn_ranks(SAVE_FOREVER, str(tmp_path))
        victim = procs[victim_rank]
        target = rng.randint(2, 4)
        assert victim.stdout is not None
        deadline = time.monotonic() + START_S
        for line in victim.stdout:
            if line.strip() == f"saving {target}":
                break
            assert time.monotonic() < deadline, "no save started in time"
        time.sleep(rng.uniform(0.0, 0.12))  # a save of 2 x 8 MB takes ~0.1 s here
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        survivor = procs[1 - victim_rank]
        try:  # gloo notices the dead peer and raises; kill it if it hangs instead
            survivor.wait(timeout=15)
        except subprocess.TimeoutExpired:
            survivor.kill()
            survivor.wait()
        for proc in procs:
            proc.communicate()

        directory = tmp_path / "ckpt"
        committed = committed_names(directory)
        assert committed, "at least the saves before the kill were committed"
        checker = ShardedCheckpointer(directory)  # sweeps what the dead save left
        for name in committed:
            saved = checker.verify(directory / name)
            assert saved is not None, f"{name} looks committed but is incomplete"
            state = {"shard0": torch.zeros(2_000_000), "shard1": torch.zeros(2_000_000)}
            checker.load(state, saved)
            assert all(bool((t == float(saved.step)).all()) for t in state.values()), name
        assert [n for n in os.listdir(directory) if ".tmp-" in n] == []
        assert checker.latest().step == int(committed[-1][5:])  # type: ignore[union-attr]
        assert int(committed[-1][5:]) >= target - 1
