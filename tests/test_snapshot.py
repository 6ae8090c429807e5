"""Shared-memory snapshots (issue 13): never torn, persisted by the daemon, resumed from."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import heavy_n

from session_watchdog import channel, ckptfile, snapshot_slots
from session_watchdog.supervise.snapshots import persist_after_death, persist_newest

REPO = str(Path(__file__).resolve().parent.parent)


class TestSlots:
    def test_a_complete_slot_reads_back(self, tmp_path):
        """Header last, sha256 checked: the payload and its step come back exactly."""
        snapshot_slots.write_slot(tmp_path / "slot1", b"abc" * 1000, {
            "gen": 1, "step": 7, "epoch": 0, "sha256": __import__("hashlib").sha256(
                b"abc" * 1000).hexdigest()})
        snap = snapshot_slots.newest(tmp_path)
        assert (snap.gen, snap.step, snap.payload) == (1, 7, b"abc" * 1000)

    def test_a_corrupted_payload_or_an_incomplete_header_is_never_taken(self, tmp_path):
        """A flipped payload byte or a header still saying complete=false: the slot is ignored
        and the other slot's older snapshot is the newest."""
        import hashlib

        for gen, name in ((1, "slot1"), (2, "slot0")):
            data = bytes([gen]) * 5000
            snapshot_slots.write_slot(tmp_path / name, data, {
                "gen": gen, "step": gen * 10, "epoch": 0, "sha256": hashlib.sha256(data).hexdigest()})
        with open(tmp_path / "slot0", "r+b") as fh:
            fh.seek(snapshot_slots.HEADER_BYTES + 100)
            fh.write(b"\x00")
        assert snapshot_slots.newest(tmp_path).gen == 1
        with open(tmp_path / "slot1", "r+b") as fh:
            fh.write(snapshot_slots._header_bytes({"gen": 3, "complete": False}))
        assert snapshot_slots.newest(tmp_path) is None

    def test_kill_9_during_writes_never_yields_a_torn_snapshot(self, tmp_path):
        """A writer SIGKILLed at random moments while it rewrites the two slots: the newest
        snapshot found is always whole (its bytes are its generation's), and the checkpoint the
        daemon commits from it holds exactly those bytes and verifies."""
        writer = textwrap.dedent("""
            import hashlib, sys
            from pathlib import Path
            from session_watchdog import snapshot_slots
            d = Path(sys.argv[1]); gen = 0
            print("ready", flush=True)
            while True:
                gen += 1
                data = bytes([gen % 251]) * (8 << 20)
                snapshot_slots.write_slot(d / snapshot_slots.SLOTS[gen % 2], data, {
                    "gen": gen, "step": gen, "epoch": 0,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "checkpoint_dir": sys.argv[2], "prefix": "ckpt"})
        """)
        rng = random.Random(5)
        env = dict(os.environ, PYTHONPATH=REPO)
        persisted = 0
        for attempt in range(heavy_n(6)):
            shm = tmp_path / f"shm{attempt}"
            ckpt = tmp_path / f"ckpt{attempt}"
            shm.mkdir()
            ckpt.mkdir()
            proc = subprocess.Popen([sys.executable, "-c", writer, str(shm), str(ckpt)],
                                    stdout=subprocess.PIPE, text=True, env=env)
            try:
                assert proc.stdout.readline().strip() == "ready"
                time.sleep(rng.uniform(0.05, 1.5))  # a random moment of the write loop
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            snap = snapshot_slots.newest(shm)
            if snap is None:
                continue  # killed inside the very first write: nothing to persist, correctly
            assert snap.payload == bytes([snap.gen % 251]) * (8 << 20)
            assert persist_newest(shm) == snap.step
            committed = ckptfile.newest_committed(ckpt, "ckpt")
            assert committed is not None and committed[1] == snap.step
            assert committed[2].read_bytes() == snap.payload
            marker = json.loads(ckptfile.marker_path(committed[2]).read_text())
            assert marker["sha256"] == snap.sha256 and marker["bytes"] == 8 << 20
            persisted += 1
        assert persisted >= 1


class TestSessionSnapshots:
    def test_every_n_steps_and_persisted_as_a_checkpoint_the_trainer_resumes(self, tmp_path):
        """snapshot_every=5: after 12 steps the newest snapshot is step 10; once the trainer is
        gone the daemon commits it and a new Session resumes at step 10 with the same weights."""
        import torch

        from session_watchdog.trainer import Session

        run_dir = tmp_path / "run"
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        session = Session(tmp_path / "ckpt", model=model, optimizer=opt, run_dir=run_dir,
                          checkpoint_every=None, snapshot_every=5, handle_signals=False)
        weights_at_10 = None
        try:
            for step in range(1, 13):
                loss = model(torch.ones(3, 4) * step).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                session.step()
                if step == 10:
                    weights_at_10 = {k: v.clone() for k, v in model.state_dict().items()}
            session._snapshots.wait()
            snap_dir = snapshot_slots.snapshot_dir(run_dir)
            assert snapshot_slots.newest(snap_dir).step == 10
            assert persist_after_death(channel.RunDir(run_dir)) is None  # alive: never
        finally:
            session.fail(RuntimeError("crash"))
        try:
            assert persist_after_death(channel.RunDir(run_dir)) == 10
            model2 = torch.nn.Linear(4, 2)
            opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
            with Session(tmp_path / "ckpt", model=model2, optimizer=opt2, run_dir=run_dir,
                         checkpoint_every=None, handle_signals=False) as again:
                start = again.resume()
                assert (start.resumed, start.step) == (True, 10)
            assert all(torch.equal(model2.state_dict()[k], weights_at_10[k]) for k in weights_at_10)
        finally:
            import shutil

            shutil.rmtree(snapshot_slots.snapshot_dir(run_dir), ignore_errors=True)

    def test_a_completed_session_removes_its_snapshots(self, tmp_path):
        """complete() writes its own final checkpoint: the /dev/shm slots are freed."""
        import torch

        from session_watchdog.trainer import Session

        model = torch.nn.Linear(2, 1)
        with Session(tmp_path / "ckpt", model=model, run_dir=tmp_path / "run",
                     checkpoint_every=None, snapshot_every=1, handle_signals=False) as session:
            session.step()
            session._snapshots.wait()
            assert snapshot_slots.newest(snapshot_slots.snapshot_dir(tmp_path / "run")) is not None
            session.complete()
        assert not snapshot_slots.snapshot_dir(tmp_path / "run").exists()

    def test_a_script_raising_right_after_a_snapshot_exits_with_it_written(self, tmp_path):
        """A script that raises (no close) while its step-3 snapshot is being written exits
        with its own code 1, and the slot holds step 3 for the daemon: the exit waits for the
        write instead of aborting the process inside torch.save."""
        code = textwrap.dedent("""
            import sys, torch
            from session_watchdog.trainer import Session
            model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(96)])
            opt = torch.optim.Adam(model.parameters())
            session = Session(sys.argv[1] + "/ckpt", model=model, optimizer=opt,
                              run_dir=sys.argv[1] + "/run", checkpoint_every=None,
                              snapshot_every=1, handle_signals=False)
            for step in range(1, 4):
                model(torch.randn(2, 256)).sum().backward()
                opt.step()
                opt.zero_grad()
                session.step()
            raise RuntimeError("a bug in the evaluation after step 3")
        """)
        env = dict(os.environ, PYTHONPATH=REPO)
        for attempt in range(2):
            run_dir = tmp_path / str(attempt) / "run"
            try:
                out = subprocess.run([sys.executable, "-c", code, str(tmp_path / str(attempt))],
                                     capture_output=True, text=True, timeout=240, env=env)
                assert out.returncode == 1, (attempt, out.returncode, out.stderr[-2000:])
                snap = snapshot_slots.newest(snapshot_slots.snapshot_dir(run_dir))
                assert snap is not None and snap.step == 3, attempt
            finally:
                import shutil

                shutil.rmtree(snapshot_slots.snapshot_dir(run_dir), ignore_errors=True)

    def test_a_write_outlasting_the_wait_is_said_and_still_completes(self, tmp_path, caplog,
                                                                     monkeypatch):
        """A snapshot write longer than the wait (Session.close waits 10 s) is logged as still
        writing, keeps going, and its slot completes: the snapshot is not lost silently."""
        import logging
        import threading

        import torch

        from session_watchdog.trainer import snapshot
        from session_watchdog.trainer.snapshot import Snapshotter

        release = threading.Event()
        real_write_slot = snapshot.fmt.write_slot

        def slow_write_slot(*args, **kwargs):  # a large snapshot, still being written
            assert release.wait(60)
            return real_write_slot(*args, **kwargs)

        monkeypatch.setattr(snapshot.fmt, "write_slot", slow_write_slot)
        shm = tmp_path / "shm"
        shm.mkdir()
        snap = Snapshotter(tmp_path / "run", tmp_path / "ckpt", "ckpt", 1, None, lambda r: None,
                           shm_root=shm)
        snap.take({"w": torch.arange(8.0)}, step=4, epoch=0)
        with caplog.at_level(logging.INFO, logger="session_watchdog.trainer"):
            snap.wait(0.01)
        said = [r for r in caplog.records if getattr(r, "event", None) == "snapshot_still_writing"]
        assert len(said) == 1 and said[0].fields["exit_waits_s"] == snapshot.EXIT_WAIT_S
        release.set()
        snap.wait(60)
        assert snapshot_slots.newest(snap.directory).step == 4

    @pytest.mark.parametrize("bad", [0, -3, "12", "soon"])
    def test_bad_snapshot_every_is_refused(self, tmp_path, bad):
        """0 steps, negative steps, a number string without a unit: ValueError naming it."""
        from session_watchdog.trainer import Session

        with pytest.raises(ValueError, match="snapshot_every"):
            Session(tmp_path / "ckpt", run_dir=tmp_path / "run", snapshot_every=bad,
                    handle_signals=False)


class TestSnapshotContent:
    def test_metadata_tied_views_and_meta_tensors_come_back_as_torch_save_keeps_them(self, tmp_path):
        """A snapshot keeps state_dict()'s _metadata, writes tied weights (two tensor objects,
        one view) once so they load tied, and takes a meta tensor as a meta tensor; twice, the
        second time into reused buffers."""
        import io

        import torch

        from session_watchdog.trainer.snapshot import Snapshotter

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        tied = torch.nn.Module()
        tied.a = tied.b = torch.nn.Linear(4, 4)
        state = {"model": model.state_dict(), "tied": tied.state_dict(),
                 "lazy": torch.empty(2, 5, device="meta")}
        (tmp_path / "shm").mkdir()
        snapper = Snapshotter(tmp_path / "run", tmp_path / "ckpt", "ckpt", every_steps=1,
                              every_s=None, on_report=lambda report: None,
                              shm_root=tmp_path / "shm")
        for step in (1, 2):
            assert snapper.take(state, step=step, epoch=0) is not None
            snapper._thread.join(120)
            snap = snapshot_slots.newest(snapper.directory)
            assert (snap.gen, snap.step) == (step, step)
            loaded = torch.load(io.BytesIO(snap.payload), weights_only=False)
            assert loaded["model"]._metadata == state["model"]._metadata
            assert loaded["tied"]._metadata == state["tied"]._metadata
            a, b = loaded["tied"]["a.weight"], loaded["tied"]["b.weight"]
            assert a.data_ptr() == b.data_ptr() and torch.equal(a, state["tied"]["a.weight"])
            assert (loaded["lazy"].device.type, loaded["lazy"].shape) == ("meta", (2, 5))
            assert torch.equal(loaded["model"]["0.weight"], state["model"]["0.weight"])


class TestDaemonSideIsTorchFree:
    def test_supervise_modules_load_no_torch(self):
        """The daemon's supervise modules, the slot format and the checkpoint names import no torch."""
        code = ("import sys\n"
                "import session_watchdog.supervise.restarts, session_watchdog.supervise.snapshots\n"
                "import session_watchdog.supervise.hang, session_watchdog.snapshot_slots\n"
                "import session_watchdog.ckptfile\n"
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONPATH=REPO))
        assert out.stdout.strip() == "False"


class TestDoctor:
    def test_doctor_shows_the_size_of_dev_shm(self):
        """doctor has a "shared memory" line with /dev/shm's free and total size."""
        from session_watchdog.cli import doctor_checks
        from session_watchdog.config import Config

        rows = [c for c in doctor_checks(Config(platform="generic")) if c["name"] == "shared memory"]
        assert len(rows) == 1 and rows[0]["detail"].startswith("/dev/shm: ")
        assert "GiB free of" in rows[0]["detail"]


class TestSharedMemorySafety:
    def test_a_planted_directory_turns_snapshots_off(self, tmp_path):
        """A snapshot directory that is a symlink to someone else's place: no snapshot is
        written, the reason is reported, training goes on."""
        import torch

        from session_watchdog.trainer.snapshot import Snapshotter

        reports = []
        shm = tmp_path / "shm"
        shm.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        snap = Snapshotter(tmp_path / "run", tmp_path / "ckpt", "ckpt", 1, None, reports.append,
                           shm_root=shm)
        snap.directory.parent.mkdir(mode=0o700)
        os.symlink(elsewhere, snap.directory)
        assert snap.take({"w": torch.ones(4)}, step=1, epoch=0) is None
        assert "not a private directory" in reports[-1]["disabled"]
        assert list(elsewhere.iterdir()) == []

    def test_a_private_directory_gets_the_snapshot(self, tmp_path):
        """In a fresh shm root the directories are created 0700 and the snapshot lands there."""
        import torch

        from session_watchdog.trainer.snapshot import Snapshotter

        shm = tmp_path / "shm"
        shm.mkdir()
        snap = Snapshotter(tmp_path / "run", tmp_path / "ckpt", "ckpt", 1, None, lambda r: None,
                           shm_root=shm)
        assert snap.take({"w": torch.ones(4)}, step=1, epoch=0) is not None
        snap.wait()
        assert snapshot_slots.newest(snap.directory).step == 1
        assert oct(os.stat(snap.directory).st_mode & 0o777) == "0o700"


class TestAfterARestart:
    def test_a_restarted_trainers_first_snapshot_outranks_the_crashed_attempts(self, tmp_path):
        """A Snapshotter over slots an earlier attempt left (generations 7 and 8) numbers its
        first snapshot 9, so the newest complete snapshot is the restarted trainer's own."""
        import torch

        from session_watchdog.trainer.snapshot import Snapshotter

        shm = tmp_path / "shm"
        shm.mkdir()
        first = Snapshotter(tmp_path / "run", tmp_path / "ckpt", "ckpt", 1, None, lambda r: None,
                            shm_root=shm)
        for step in range(1, 9):  # the crashed attempt: generations 1..8, steps 1..8
            first.take({"w": torch.full((4,), float(step))}, step=step, epoch=0)
            first.wait()
        assert [snapshot_slots.read_header(first.directory / n)["gen"]
                for n in snapshot_slots.SLOTS] == [8, 7]
        again = Snapshotter(tmp_path / "run", tmp_path / "ckpt", "ckpt", 1, None, lambda r: None,
                            shm_root=shm)
        again.take({"w": torch.full((4,), 6.0)}, step=6, epoch=0)  # resumed from step 5
        again.wait()
        newest = snapshot_slots.newest(again.directory)
        assert (newest.gen, newest.step) == (9, 6)
