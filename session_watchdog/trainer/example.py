"""A runnable training script: a small CNN on synthetic images, driven by a Session.

    python -m session_watchdog.trainer.example --checkpoint-dir /tmp/ckpt --epochs 3

No downloads: sample ``i`` is generated from (seed, i), and a shuffled ``DataLoader`` (seeded
generator, ``--workers`` worker processes) draws them in a new order each epoch. The loader is
registered with ``session.track(loader)``: every checkpoint stores its position and a resumed run
continues the interrupted epoch at the next batch, without loading the ones before it. With the
RNG states restored from the checkpoint (dropout draws from torch's global generator), a run that
is killed and resumed ends with the same parameters, bit for bit, as one that never stopped.

Exit status: 0 when training completed (final checkpoint verified), ``EXIT_STOPPED`` (75) when it
stopped on a request or a signal after a durable checkpoint (run it again to resume), 2 for bad
arguments.

Distributed data parallel, one process per rank (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node=2 -m session_watchdog.trainer.example --ddp --checkpoint-dir /tmp/ckpt

Rank ``r`` of ``W`` trains on its ``DistributedSampler`` share (shuffled by seed and epoch), so
the global batch order survives a restart with the same ``W``. ``--sharded`` saves with
``torch.distributed.checkpoint`` (every rank writes its part) instead of rank 0's single file.
``--run-dir-per-rank`` gives rank ``r`` the run directory ``<run-dir>/rank<r>``: a request written
into one rank's directory reaches the others only through the ranks' agreement (used by the tests).
Lines printed by a rank start with ``[rank r]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from session_watchdog.trainer.session import (
    DEFAULT_CHECKPOINT_EVERY_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_SYNC_EVERY,
    DEFAULT_SYNC_INTERVAL_S,
    EXIT_STOPPED,
    Session,
    SessionExit,
)

if TYPE_CHECKING:
    import torch

NUM_CLASSES = 10
IMAGE_SIZE = 16
CHANNELS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m session_watchdog.trainer.example",
        description="Train a small CNN on synthetic images under a session-watchdog Session.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes (default 0: load in the training process)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints") / "example")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run directory shared with the daemon (default: "
                             "$SESSION_WATCHDOG_RUN_DIR or the per-user default)")
    parser.add_argument("--async-save", action="store_true",
                        help="write requested/periodic checkpoints in the background")
    parser.add_argument("--checkpoint-every", type=float, default=DEFAULT_CHECKPOINT_EVERY_S,
                        help="seconds between periodic checkpoints; 0 turns them off")
    parser.add_argument("--step-sleep", type=float, default=0.0,
                        help="seconds to sleep per step, to stretch a demo run")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S)
    parser.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL_S)
    parser.add_argument("--quiet", action="store_true", help="no session log lines on stderr")
    parser.add_argument("--mirror", default=None,
                        help="copy every checkpoint, verified, to this path or fsspec URL "
                             "(Drive, autodl-fs, s3://...); resume looks there too")
    dist = parser.add_argument_group("distributed (under torchrun)")
    dist.add_argument("--ddp", action="store_true",
                      help="DistributedDataParallel over the torchrun process group "
                           "(gloo on CPU, NCCL on CUDA)")
    dist.add_argument("--sharded", action="store_true",
                      help="save with torch.distributed.checkpoint into committed step directories")
    dist.add_argument("--run-dir-per-rank", action="store_true",
                      help="rank r uses <run-dir>/rank<r> instead of sharing the node's run dir")
    dist.add_argument("--sync-every", type=int, default=DEFAULT_SYNC_EVERY,
                      help="the most steps between two agreements of the ranks")
    dist.add_argument("--sync-interval", type=float, default=DEFAULT_SYNC_INTERVAL_S,
                      help="the most seconds between two agreements; 0: --sync-every alone")
    return parser


def make_model() -> torch.nn.Module:
    """conv-relu-pool, conv-relu-pool, dropout, linear: ~4k parameters."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(CHANNELS, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Dropout(0.1), nn.Linear(8 * 4 * 4, NUM_CLASSES),
    )


def prototypes(seed: int) -> torch.Tensor:
    """One fixed random image per class: what the classifier has to tell apart."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CLASSES, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)


def make_batch(protos: torch.Tensor, seed: int, epoch: int, index: int,
               batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of ``epoch``: noisy class prototypes, a pure function of its arguments
    (a ready-made batch for benchmarks; the training loop reads :class:`SyntheticImages`)."""
    import torch

    gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    noise = torch.randn(batch_size, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return protos[labels] + noise, labels


class SyntheticImages:
    """A map-style dataset: sample ``i`` is a noisy class prototype, a pure function of (seed, i)."""

    def __init__(self, protos: torch.Tensor, seed: int, size: int) -> None:
        self.protos, self.seed, self.size = protos, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        import torch

        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**63)
        label = torch.randint(0, NUM_CLASSES, (), generator=gen)
        noise = torch.randn(CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        return self.protos[label] + noise, label


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(argv: Optional[List[str]] = None) -> int:
    """Train; return 0 on completion, EXIT_STOPPED on a stop, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.step_sleep < 0 or args.checkpoint_every < 0 or args.sync_interval < 0 \
            or args.workers < 0:
        parser.error("--step-sleep, --checkpoint-every, --sync-interval and --workers must not "
                     "be negative")
    if args.sync_every < 1:
        parser.error("--sync-every must be at least 1")
    if args.run_dir_per_rank and args.run_dir is None:
        parser.error("--run-dir-per-rank needs --run-dir")

    import torch

    rank, world = 0, 1
    device = pick_device(args.device)
    if args.ddp:
        import torch.distributed as dist

        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (env:// rendezvous).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    prefix = f"[rank {rank}] " if args.ddp else ""
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format=f"{prefix}[session] %(message)s",
                            stream=sys.stderr)
    run_dir = args.run_dir / f"rank{rank}" if args.run_dir_per_rank else args.run_dir
    from session_watchdog.trainer.checkpoint import CheckpointDirError

    try:
        try:
            code = train(args, device, rank, world, run_dir, prefix)
        except CheckpointDirError as err:  # a path the user can fix: one line, no traceback
            print(f"{prefix}error: {err}", file=sys.stderr)
            return 2
        if args.ddp:
            # Leave together: torchrun ends the other workers as soon as one exits.
            torch.distributed.barrier()
        return code
    finally:
        if args.ddp:
            torch.distributed.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, rank: int, world: int,
          run_dir: Optional[Path], prefix: str) -> int:
    """The training loop proper (one rank of ``world`` when ``--ddp``)."""
    import torch
    from torch import nn

    if device.type == "cuda":
        # Bit-identical resume needs deterministic kernels (cuDNN autotuning picks per run).
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.manual_seed(args.seed)
    model = make_model().to(device)
    net: nn.Module = model
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.steps_per_epoch),
                                                gamma=0.9)
    loss_fn = nn.CrossEntropyLoss()
    from torch.utils.data import DataLoader, DistributedSampler

    dataset: Any = SyntheticImages(prototypes(args.seed), args.seed,
                              args.steps_per_epoch * args.batch_size * world)
    sampler: Optional[Any] = (DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                  seed=args.seed) if args.ddp else None)
    loader: Any = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None,
                        sampler=sampler, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed))

    # The bare module goes to the Session: its state dict keys do not depend on the wrapper.
    session = Session(
        args.checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler,
        run_dir=run_dir, async_save=args.async_save,
        checkpoint_every=args.checkpoint_every or None, poll_interval=args.poll_interval,
        heartbeat_interval=args.heartbeat_interval, sync_every=args.sync_every,
        sync_interval_s=args.sync_interval or None, sharded=args.sharded, mirror=args.mirror)
    with session:
        batches = session.track(loader)  # its position travels with every checkpoint
        start = session.resume()
        if start.resumed:
            print(f"{prefix}resumed from {start.path} at epoch {start.epoch} step {start.step} "
                  f"(batch {start.batch})", flush=True)
        else:
            print(f"{prefix}fresh start on {device}", flush=True)
        try:
            for epoch in session.epochs(args.epochs):
                began = time.monotonic()
                total, count = 0.0, 0
                if sampler is not None:
                    sampler.set_epoch(epoch)
                net.train()
                for inputs, labels in batches:  # after a resume: the rest of the epoch
                    inputs, labels = inputs.to(device), labels.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(net(inputs), labels)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total += float(loss.detach())
                    count += 1
                    if args.step_sleep:
                        time.sleep(args.step_sleep)
                    session.step()  # checkpoints / stops here when asked
                if count:  # an epoch the checkpoint had finished has nothing left to report
                    print(f"{prefix}epoch {epoch + 1}/{args.epochs} step {session.global_step} "
                          f"loss {total / count:.4f} ({time.monotonic() - began:.2f} s)",
                          flush=True)
        except SessionExit as stop:
            # A script could let it propagate (exit status 75); main() returns codes instead.
            print(f"{prefix}stopped ({stop.reason}) at step {stop.checkpoint.step}: "
                  f"{stop.checkpoint.path}", flush=True)
            return EXIT_STOPPED
        final = session.complete()
        agreement = session.agreement
        agreements = f" after {agreement.agreements} agreements" if agreement else ""
        print(f"{prefix}completed at step {final.step}: {final.path} "
              f"{getattr(final, 'checksum', '') or 'sha256:' + final.sha256[:16]}"
              f"{agreements}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
