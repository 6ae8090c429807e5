"""A tiny torch trainer for the supervise tests: crashes, hangs and snapshots on command.

    python supervise_trainer.py CKPT_DIR OUT --steps N --save-every K
        [--crash-at S,S,...] [--hang-at S] [--snapshot-every E] [--step-sleep SECONDS]

Runs are counted in CKPT_DIR/attempts; ``--crash-at`` lists, per attempt, the global step at which
that attempt raises (``-1``: no crash in that attempt; attempts past the list never crash);
``--always-crash-at S`` crashes every attempt at step S. ``--kill-at S``: the first attempt SIGKILLs itself at step S (an OOM kill). ``--hang-at S``: the first attempt's main
thread sleeps at step S, holding the step (a stuck collective). Batches are a pure function of the
step, so a resumed run ends with the same weights as an uninterrupted one; OUT gets the final
state dict.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from session_watchdog.trainer import Session


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--crash-at", default="")
    parser.add_argument("--always-crash-at", type=int, default=None)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--snapshot-every", default=None)
    parser.add_argument("--step-sleep", type=float, default=0.05)
    args = parser.parse_args()
    ckpt = Path(args.ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    attempts = ckpt / "attempts"
    attempt = int(attempts.read_text()) if attempts.exists() else 0
    attempts.write_text(str(attempt + 1))
    crash_at = [int(x) for x in args.crash_at.split(",") if x]
    crash = crash_at[attempt] if attempt < len(crash_at) else -1
    if args.always_crash_at is not None:
        crash = args.always_crash_at
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kwargs = {}
    if args.snapshot_every is not None:  # "3": steps; "2s": a duration
        every = args.snapshot_every
        kwargs["snapshot_every"] = int(every) if every.isdigit() else every
    with Session(ckpt, model=model, optimizer=opt, checkpoint_every=None, poll_interval=0.1,
                 heartbeat_interval=0.1, **kwargs) as session:
        start = session.resume()
        print(f"attempt {attempt} starts at step {start.step}", flush=True)
        for step in range(start.step + 1, args.steps + 1):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(16, 8, generator=gen)
            y = x.sum(dim=1, keepdim=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == crash:
                print(f"attempt {attempt} crashes at step {step}", flush=True)
                raise RuntimeError(f"injected crash at step {step}")
            if args.kill_at == step and attempt == 0:
                print(f"attempt {attempt} is SIGKILLed at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
            if args.hang_at == step and attempt == 0:
                print(f"attempt {attempt} hangs at step {step}", flush=True)
                time.sleep(3600)
            session.step()
            if step % args.save_every == 0:
                session.checkpoint()
            time.sleep(args.step_sleep)
        session.complete()
    torch.save(model.state_dict(), args.out)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
