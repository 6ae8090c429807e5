"""A stock Lightning script with the watchdog's lines added (the README's pattern).

Used by tests/test_integrations_lightning.py and benchmarks/bench_integrations.py as a child.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchdata.stateful_dataloader import StatefulDataLoader

from session_watchdog.integrations.lightning import WatchdogCallback, watchdog_resume


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.7)}


def data() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(256, 8, generator=gen)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


class Pace(L.Callback):
    """Test knobs: slow steps, a crash."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.opts.raise_at and trainer.global_step == self.opts.raise_at:
            raise RuntimeError(f"boom at step {trainer.global_step}")
        if self.opts.step_sleep:
            time.sleep(self.opts.step_sleep)


class HangingIO(TorchCheckpointIO):
    """Lightning's checkpoint writer; hangs halfway through the first file of a step at or after
    --hang-save-at (a slow disk, then kill -9)."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if int(Path(path).parent.name.split("-")[-1]) < self.opts.hang_save_at:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            fh.flush()
            Path(self.opts.hang_flag).write_text(str(path))
            time.sleep(600)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--hang-save-at", type=int, default=0)
    parser.add_argument("--hang-flag", default="")
    parser.add_argument("--raise-at", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=float, default=0)
    parser.add_argument("--no-watchdog", action="store_true")
    parser.add_argument("--mirror", default=None)
    opts = parser.parse_args()

    L.seed_everything(0, verbose=False)
    model = Tiny()
    loader = StatefulDataLoader(data(), batch_size=8, shuffle=True, num_workers=opts.workers,
                                generator=torch.Generator().manual_seed(7))
    callbacks = [Pace(opts)]
    # --- the watchdog's lines -------------------------------------------------------------
    watchdog = WatchdogCallback(opts.out, checkpoint_every=opts.checkpoint_every or None,
                                poll_interval=0.1, heartbeat_interval=0.5, mirror=opts.mirror)
    if not opts.no_watchdog:
        callbacks.append(watchdog)
    trainer = L.Trainer(max_steps=opts.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks,
                        plugins=[HangingIO(opts)] if opts.hang_save_at else None)
    resume = watchdog_resume(opts.out, mirror=opts.mirror)
    print(f"ckpt_path={resume}", flush=True)
    trainer.fit(model, loader, ckpt_path=resume)
    if watchdog.stopped:
        print(f"stopped at step {trainer.global_step}", flush=True)
        sys.exit(75)
    # ----------------------------------------------------------------------------------------
    os.makedirs(opts.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(opts.out, "final.pt"))
    print(f"completed at step {trainer.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
