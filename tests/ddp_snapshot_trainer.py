"""A tiny DDP trainer (gloo, CPU) for the distributed snapshot tests; run it under torchrun.

    torchrun --nproc_per_node=2 ddp_snapshot_trainer.py CKPT_DIR OUT --steps N
        [--snapshot-every E|DURATION] [--kill-at S] [--step-sleep SECONDS]

Each rank's batch is a pure function of (step, rank) plus noise from torch's global generator,
seeded differently per rank, so a resumed run equals an uninterrupted one only when every rank's
RNG state comes back too. ``--kill-at S``: in a run that started from scratch, every rank
SIGKILLs itself after the optimizer step of step S (no Python cleanup, like the OOM killer).
Rank 0 writes the final state dict to OUT.
"""

import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from session_watchdog.trainer import Session


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--snapshot-every", default=None, help="steps (4) or a duration (0.3s)")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    every = args.snapshot_every
    snapshot_every = int(every) if every is not None and every.isdigit() else every
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(100 + rank)  # per-rank noise: the ranks' RNG states differ
    try:
        with Session(args.ckpt, model=model, optimizer=opt, checkpoint_every=None,
                     poll_interval=0.1, heartbeat_interval=0.1, sync_every=5,
                     sync_interval_s=None, snapshot_every=snapshot_every) as session:
            start = session.resume()
            print(f"[rank {rank}] starts at step {start.step}", flush=True)
            for step in range(start.step + 1, args.steps + 1):
                gen = torch.Generator().manual_seed(step * 10 + rank)
                x = torch.randn(16, 8, generator=gen) + 0.01 * torch.randn(16, 8)
                y = x.sum(dim=1, keepdim=True)
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == args.kill_at and start.step == 0:
                    print(f"[rank {rank}] SIGKILLed at step {step}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                session.step()
                time.sleep(args.step_sleep)
            session.complete()
        if rank == 0:
            torch.save(model.module.state_dict(), args.out)
        print(f"[rank {rank}] done", flush=True)
        dist.barrier()  # leave together: no rank tears its group down while a peer still works
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
