"""A stock Hugging Face Trainer script with the watchdog's lines added (the README's pattern).

Used by tests/test_integrations_hf.py and benchmarks/bench_integrations.py as a child process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from session_watchdog.integrations.hf import WatchdogCallback, watchdog_resume


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Points(torch.utils.data.Dataset):
    def __init__(self, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(99)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = self.x.sum(dim=1, keepdim=True).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class Pace(TrainerCallback):
    """Test knobs: slow steps (so a session ends mid-training), a hang in one save, a crash."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts

    def on_step_end(self, args, state, control, **kwargs):
        if self.opts.raise_at and state.global_step == self.opts.raise_at:
            raise RuntimeError(f"boom at step {state.global_step}")
        if self.opts.step_sleep:
            time.sleep(self.opts.step_sleep)


class HangingTrainer(Trainer):
    """Hangs inside the Trainer's own save of one step, after some of its files are written."""

    hang_at = 0
    flag = ""

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.state.global_step == self.hang_at:
            Path(self.flag).write_text(output_dir)
            time.sleep(600)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--hang-save-at", type=int, default=0)
    parser.add_argument("--hang-flag", default="")
    parser.add_argument("--raise-at", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=float, default=0)
    parser.add_argument("--no-watchdog", action="store_true")
    parser.add_argument("--mirror", default=None)
    opts = parser.parse_args()

    torch.manual_seed(0)
    model = Tiny()
    args = TrainingArguments(
        output_dir=opts.out, max_steps=opts.steps, per_device_train_batch_size=8,
        learning_rate=0.05, logging_steps=10_000, report_to="none", seed=0, use_cpu=True,
        save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
        dataloader_num_workers=0, disable_tqdm=True)
    callbacks = [Pace(opts)]
    # --- the watchdog's lines -------------------------------------------------------------
    watchdog = WatchdogCallback(checkpoint_every=opts.checkpoint_every or None,
                                poll_interval=0.1, heartbeat_interval=0.5, mirror=opts.mirror)
    if not opts.no_watchdog:
        callbacks.append(watchdog)
    trainer_class = HangingTrainer if opts.hang_save_at else Trainer
    HangingTrainer.hang_at, HangingTrainer.flag = opts.hang_save_at, opts.hang_flag
    trainer = trainer_class(model=model, args=args, train_dataset=Points(), callbacks=callbacks)
    resume = watchdog_resume(opts.out, mirror=opts.mirror)
    print(f"resume_from_checkpoint={resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if torch.distributed.is_initialized():  # torchrun: every rank leaves together, cleanly
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if watchdog.stopped:
        print(f"stopped at step {trainer.state.global_step}", flush=True)
        sys.exit(75)
    # ----------------------------------------------------------------------------------------
    os.makedirs(opts.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(opts.out, "final.pt"))
    print(f"completed at step {trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
