"""AcceleratorSession with mirror= under torchrun (CPU, gloo): train or resume, print per rank.

    torchrun --nproc_per_node=2 accelerate_mirror_train.py BASE MIRROR --steps N

Trains N more steps after resume() (0: only resume), then complete(); each rank prints
``rank R: resumed=<bool> step=<S> weights=<sum of the parameters after resume>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator

from session_watchdog.integrations.accelerate import AcceleratorSession

parser = argparse.ArgumentParser()
parser.add_argument("base", type=Path)
parser.add_argument("mirror")
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = accelerator.prepare(model, opt)
session = AcceleratorSession(accelerator, args.base / "ckpt", run_dir=args.base / "run",
                             checkpoint_every=None, poll_interval=0.05, mirror=args.mirror,
                             mirror_wait_s=120)
start = session.resume()
weights = float(sum(p.detach().double().sum() for p in model.parameters()))
print(f"rank {accelerator.process_index}: resumed={start.resumed} step={start.step} "
      f"weights={weights:.12f}", flush=True)
for _ in range(args.steps):
    loss = model(torch.ones(2, 4) * (accelerator.process_index + 1)).sum()
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
    session.step()
if args.steps:
    session.complete()
    weights = float(sum(p.detach().double().sum() for p in model.parameters()))
    print(f"rank {accelerator.process_index}: completed step={session.global_step} "
          f"weights={weights:.12f}", flush=True)
else:
    session.close()
