"""Accelerate: AcceleratorSession saves with accelerator.save_state into committed directories."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

pytest.importorskip("accelerate")
import torch  # noqa: E402
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from conftest import TORCHRUN  # noqa: E402
from integration_helpers import SCRIPTS, finish, free_port, reap, spawn  # noqa: E402
from torch_helpers import assert_same  # noqa: E402

from session_watchdog.channel import RunDir  # noqa: E402
from session_watchdog.integrations._core import COMMIT_MARKER, verify_dir  # noqa: E402
from session_watchdog.integrations.accelerate import AcceleratorSession  # noqa: E402
from session_watchdog.trainer import SessionExit  # noqa: E402

EPOCHS, SAMPLES, BATCH = 3, 64, 8


def run(tmp: Path, stop_at: Optional[int],
        mirror: Optional[Path] = None) -> Tuple[Any, List[int], Optional[SessionExit]]:
    """Train (or resume); SIGTERM to ourselves after step ``stop_at``, as the end of a runtime would."""
    # A seedable sampler: each epoch's order is a function of (seed, epoch) (README's recipe).
    accelerator = Accelerator(cpu=True,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, 4, generator=gen)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True), torch.arange(SAMPLES))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(7))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    seen: List[int] = []
    session = AcceleratorSession(accelerator, tmp / "ckpt", run_dir=tmp / "run",
                                 checkpoint_every=None, poll_interval=0.05, mirror=mirror)
    try:
        with session:
            start = session.resume()
            for epoch in session.epochs(EPOCHS):
                loader.set_epoch(epoch)
                batches = (accelerator.skip_first_batches(loader, start.batch)
                           if epoch == start.epoch and start.batch else loader)
                for inputs, target, index in batches:
                    seen.extend(int(i) for i in index)
                    loss = torch.nn.functional.mse_loss(model(inputs), target)
                    opt.zero_grad()
                    accelerator.backward(loss)
                    opt.step()
                    if stop_at is not None and session.global_step + 1 == stop_at:
                        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
                    session.step()
            session.complete()
    except SessionExit as stop:
        return accelerator.unwrap_model(model), seen, stop
    return accelerator.unwrap_model(model), seen, None


class TestAcceleratorSession:
    def test_sigterm_stop_then_resume_matches_an_uninterrupted_run(self, tmp_path: Path) -> None:
        """SIGTERM at step 11: a committed save_state directory, exit code 75, state=stopped;
        the resumed run (skip_first_batches) sees the same batches and ends with the same
        weights as an uninterrupted run, and completes with a committed final directory."""
        reference, expected, _ = run(tmp_path / "a", None)
        _, first, stop = run(tmp_path / "b", 11)
        assert stop is not None and stop.code == 75 and stop.checkpoint.step == 11
        directory = tmp_path / "b" / "ckpt" / "checkpoint-11"
        assert verify_dir(directory) is not None
        status = RunDir(tmp_path / "b" / "run").read_status()
        assert status is not None and status.state == "stopped"
        assert status.last_checkpoint is not None
        assert status.last_checkpoint.path == str(directory / COMMIT_MARKER)
        assert json.loads((directory / "watchdog_state.json").read_text())["step"] == 11
        model, rest, stop = run(tmp_path / "b", None)
        assert stop is None
        assert first + rest == expected
        assert_same(model.state_dict(), reference.state_dict(), "weights")
        final = RunDir(tmp_path / "b" / "run").read_status()
        assert final is not None and (final.state, final.step) == ("completed", EPOCHS * SAMPLES // BATCH)
        assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()
                      if p.name.startswith("checkpoint-")) == ["checkpoint-11", "checkpoint-24"]


@TORCHRUN
def test_ddp_both_ranks_resume_the_step_rank0_restored_from_the_mirror(
        tmp_path: Path, shm: Path, other_fs: bool) -> None:
    """torchrun, 2 ranks, mirror=: with the checkpoint directory gone, rank 0 restores
    checkpoint-5 from the mirror and rank 1 resumes that same step with the same weights."""
    if not other_fs:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")

    def torchrun(steps: int) -> str:
        proc = spawn([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                      "--max-restarts=0", str(SCRIPTS / "accelerate_mirror_train.py"),
                      str(tmp_path), str(shm / "m"), "--steps", str(steps)])
        try:
            code, stdout, stderr = finish(proc)
        finally:
            reap(proc)
        assert code == 0, stdout[-3000:] + stderr[-6000:]
        return stdout

    first = torchrun(5)
    done = sorted(re.findall(r"rank (\d): completed step=(\d+) weights=(\S+)", first))
    assert [d[:2] for d in done] == [("0", "5"), ("1", "5")] and done[0][2] == done[1][2], first
    assert verify_dir(shm / "m" / "checkpoint-5") is not None
    shutil.rmtree(tmp_path / "ckpt")
    second = torchrun(0)
    resumed = sorted(re.findall(r"rank (\d): resumed=(\w+) step=(\d+) weights=(\S+)", second))
    assert resumed == [("0", "True", "5", done[0][2]), ("1", "True", "5", done[0][2])], second
