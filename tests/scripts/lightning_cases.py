"""Lightning set-ups where Lightning's own machinery meets the watchdog's stop or resume.

Used by tests/test_integrations_lightning.py as a child process (also under torchrun).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from session_watchdog.integrations.lightning import WatchdogCallback, watchdog_resume


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SigtermRank0At(L.Callback):
    """SIGTERM to rank 0 alone at one step (as a platform or the daemon signals one pid)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), self.signum)


class StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        print(f"started at step {trainer.global_step}", flush=True)


class DirectoryCheckpointIO(TorchCheckpointIO):
    """A checkpoint path that is a directory of files, as FSDP sharded and DeepSpeed write."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        os.makedirs(path, exist_ok=True)
        weights = checkpoint.pop("state_dict")
        torch.save(weights, os.path.join(path, "weights.pt"))
        torch.save(checkpoint, os.path.join(path, "state.pt"))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        checkpoint = torch.load(os.path.join(path, "state.pt"), weights_only=False)
        checkpoint["state_dict"] = torch.load(os.path.join(path, "weights.pt"))
        return checkpoint


def directory_checkpoints(opts: argparse.Namespace) -> int:
    """Single process; stops at --stop-at (SIGTERM), or resumes and completes."""
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(400, 4)),
                                       batch_size=4)
    watchdog = WatchdogCallback(opts.out, checkpoint_every=None, poll_interval=0.05)
    callbacks: list = [StartStep(), watchdog]
    if opts.sigterm_at:
        callbacks.insert(0, SigtermRank0At(opts.sigterm_at))
    trainer = L.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[DirectoryCheckpointIO()],
                        callbacks=callbacks)
    resume = watchdog_resume(opts.out)
    print(f"ckpt_path={resume}", flush=True)
    trainer.fit(Linear(), data, ckpt_path=resume)
    print(f"completed at step {trainer.global_step}", flush=True)
    return 0


def stateful_loader_epochs(opts: argparse.Namespace) -> int:
    """Single process, 3 epochs of 10 batches from a StatefulDataLoader; SIGUSR1 at --sigterm-at
    (with no daemon: a stop that Lightning leaves alone), or resume and complete."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(0)
    data = StatefulDataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4)), batch_size=4)
    watchdog = WatchdogCallback(opts.out, checkpoint_every=None, poll_interval=0.05)
    callbacks: list = [StartStep(), watchdog]
    if opts.sigterm_at:
        callbacks.insert(0, SigtermRank0At(opts.sigterm_at, signal.SIGUSR1))
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    resume = watchdog_resume(opts.out)
    print(f"ckpt_path={resume}", flush=True)
    trainer.fit(Linear(), data, ckpt_path=resume)
    if watchdog.stopped:
        return 75
    print(f"completed at step {trainer.global_step}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sigterm-at", type=int, default=7)
    parser.add_argument("--directory-checkpoints", action="store_true")
    parser.add_argument("--stateful-loader-epochs", action="store_true")
    opts = parser.parse_args()
    if opts.stateful_loader_epochs:
        return stateful_loader_epochs(opts)
    if opts.directory_checkpoints:
        return directory_checkpoints(opts)
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(400, 4)),
                                       batch_size=4)
    watchdog = WatchdogCallback(opts.out, checkpoint_every=None, poll_interval=0.05)
    trainer = L.Trainer(max_steps=60, accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]),
                        strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SigtermRank0At(opts.sigterm_at), watchdog])
    trainer.fit(Linear(), data)  # SIGTERMException (a SystemExit) ends it with 75 when stopped
    print(f"rank {trainer.global_rank}: fit() returned at step {trainer.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
