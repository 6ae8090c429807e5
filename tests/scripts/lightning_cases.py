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

from session_watchdog.integrations.lightning import WatchdogCallback


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

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sigterm-at", type=int, default=7)
    opts = parser.parse_args()
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
