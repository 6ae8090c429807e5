"""Hugging Face Trainer set-ups where the Trainer's own schedule meets a stop or the last step.

Used by tests/test_integrations_hf.py as a child process; prints one JSON line with the outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from hf_train import Points, Tiny
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from session_watchdog.channel import RunDir
from session_watchdog.integrations._core import verify_dir
from session_watchdog.integrations.hf import WatchdogCallback, watchdog_resume


class SigtermAt(TrainerCallback):
    """SIGTERM to this process at one step end (the watchdog's handler turns it into a stop)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--case", required=True, choices=["epoch", "best", "best_epoch", "early_stop",
                                                          "stl1"])
    parser.add_argument("--sigterm-at", type=int, default=0)
    opts = parser.parse_args()
    common = dict(output_dir=opts.out, per_device_train_batch_size=8, learning_rate=0.05,
                  report_to="none", use_cpu=True, disable_tqdm=True)
    if opts.case == "epoch":  # every epoch: log, evaluate, save
        args = TrainingArguments(num_train_epochs=3, save_strategy="epoch",
                                 logging_strategy="epoch", eval_strategy="epoch", **common)
    elif opts.case == "best":  # a checkpoint only on a new best eval_loss
        args = TrainingArguments(max_steps=100, eval_strategy="steps", eval_steps=5,
                                 save_strategy="best", metric_for_best_model="loss",
                                 greater_is_better=False, logging_steps=1000, **common)
    elif opts.case == "best_epoch":  # evaluated each epoch; "best" is the highest loss: epoch 1
        args = TrainingArguments(num_train_epochs=3, eval_strategy="epoch", save_strategy="best",
                                 metric_for_best_model="loss", greater_is_better=True,
                                 logging_steps=1000, **common)
    elif opts.case == "early_stop":  # EarlyStoppingCallback ends the run at its second eval
        args = TrainingArguments(max_steps=100, eval_strategy="steps", eval_steps=10,
                                 save_strategy="steps", save_steps=10, load_best_model_at_end=True,
                                 metric_for_best_model="loss", logging_steps=1000, **common)
    else:  # the Trainer deletes every checkpoint but the best one when training ends
        args = TrainingArguments(max_steps=100, eval_strategy="steps", eval_steps=5,
                                 save_strategy="steps", save_steps=5, save_total_limit=1,
                                 load_best_model_at_end=True, metric_for_best_model="loss",
                                 logging_steps=1000, **common)
    callbacks: list = []
    if opts.sigterm_at:
        callbacks.append(SigtermAt(opts.sigterm_at))
    watchdog = WatchdogCallback(poll_interval=0.1, heartbeat_interval=0.5, checkpoint_every=None)
    callbacks.append(watchdog)
    if opts.case == "early_stop":
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=1,
                                               early_stopping_threshold=100.0))
    torch.manual_seed(0)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=Points(), eval_dataset=Points(16),
                      callbacks=callbacks)
    trainer.train()
    status = RunDir(os.environ["SESSION_WATCHDOG_RUN_DIR"]).read_status()
    names = sorted(n for n in os.listdir(opts.out) if n.startswith("checkpoint-"))
    print(json.dumps({
        "global_step": trainer.state.global_step, "stopped": watchdog.stopped,
        "state": None if status is None else status.state,
        "status_step": None if status is None else status.step,
        "committed": [n for n in names if verify_dir(os.path.join(opts.out, n)) is not None],
        "checkpoints": names, "resume": watchdog_resume(opts.out)}), flush=True)
    return 75 if watchdog.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
