"""Framework integrations and exact data resume, measured side by side in one run.

    python benchmarks/bench_integrations.py [--steps 400] [--repeats 3] [--runs 2] [--skip-deadline]

1. Per-step overhead of each callback (Hugging Face ``WatchdogCallback``, Lightning
   ``WatchdogCallback``) against the same training without it: median step time with the step
   hook on vs off, in alternating blocks of 25 steps of the same runs (so a busy machine's drift
   hits both alike; target: at most 1 %, aim 0.2 %); plus the median time inside the hook
   itself, as a share of a step. The model is tiny (a step is well under 1 ms), so these are
   upper bounds for real training.
2. Resume of a mid-epoch position in a 100k-sample shuffled loader (plain ``DataLoader`` through
   ``session.track``, and torchdata's ``StatefulDataLoader``; 2 workers): time to the first resumed
   batch against a fresh epoch start (target: at most 1.5x), next to the naive skip that iterates
   and discards the batches already done.
3. Steps lost at a known deadline: real daemon (``session-watchdog run``, generic platform, a
   compressed session of randomized length) wrapping the framework script (randomized step time);
   lost = steps trained - step of the last committed checkpoint acknowledged before the deadline
   (target: 0 in every run). ``--runs 10`` for the full figure (about 1 minute per run).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the framework scripts and the daemon helpers

from integration_helpers import (  # noqa: E402
    SCRIPTS,
    events,
    finish,
    reap,
    requests_and_acks,
    session_clock,
    spawn,
    watchdog_argv,
)

from session_watchdog.channel import RunDir  # noqa: E402

# --------------------------------------------------------------------------------------------
# 1. per-step overhead


class _HookTimer:
    """Wraps a callback's step hook and sums the time spent in it."""

    def __init__(self, callback: Any, hook: str) -> None:
        self.calls_ns: List[int] = []
        inner = getattr(callback, hook)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                self.calls_ns.append(time.perf_counter_ns() - began)

        setattr(callback, hook, timed)


BLOCK = 25  # steps per block: the hook runs in even blocks, not in odd ones (same run)


def _on(step: int) -> bool:
    return (step // BLOCK) % 2 == 0


def _hf_run(steps: int, run_dir: Path) -> Tuple[List[float], List[float], List[int]]:
    """One Trainer.train(): step times with the callback's hook on / off, and the hook's times."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from session_watchdog.integrations.hf import WatchdogCallback

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    sys.path.insert(0, str(SCRIPTS))
    from hf_train import Points, Tiny

    stamps: List[Tuple[float, int]] = []
    watchdog = WatchdogCallback(run_dir=run_dir, checkpoint_every=None, handle_signals=False)
    timer = _HookTimer(watchdog, "on_step_end")

    class Toggle(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            watchdog.on_train_begin(*args, **kwargs)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if _on(state.global_step):
                control = watchdog.on_step_end(args, state, control, **kwargs)
            stamps.append((time.perf_counter(), state.global_step))
            return control

        def on_save(self, *args: Any, **kwargs: Any) -> None:
            watchdog.on_save(*args, **kwargs)

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            watchdog.on_train_end(*args, **kwargs)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8,
                                 learning_rate=0.05, logging_steps=10_000, report_to="none",
                                 save_strategy="no", use_cpu=True, disable_tqdm=True)
        Trainer(model=Tiny(), args=args, train_dataset=Points(4096), callbacks=[Toggle()]).train()
    return _split(stamps, steps) + (timer.calls_ns,)


def _lightning_run(steps: int, run_dir: Path) -> Tuple[List[float], List[float], List[int]]:
    import lightning as L

    from session_watchdog.integrations.lightning import WatchdogCallback

    sys.path.insert(0, str(SCRIPTS))
    from lightning_train import Tiny, data

    stamps: List[Tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as out:
        watchdog = WatchdogCallback(out, run_dir=run_dir, checkpoint_every=None,
                                    handle_signals=False)
        timer = _HookTimer(watchdog, "on_train_batch_end")

        class Toggle(L.Callback):
            def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
                watchdog.setup(trainer, pl_module, stage)

            def on_train_start(self, *args: Any) -> None:
                watchdog.on_train_start(*args)

            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                step = trainer.global_step
                if _on(step):
                    watchdog.on_train_batch_end(trainer, *args)
                else:
                    watchdog._last_step = step  # as if it had looked
                stamps.append((time.perf_counter(), step))

            def on_train_end(self, *args: Any) -> None:
                watchdog.on_train_end(*args)

            def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
                watchdog.teardown(trainer, pl_module, stage)

        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(data(), batch_size=8, shuffle=True)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Toggle()])
        trainer.fit(Tiny(), loader)
    return _split(stamps, steps) + (timer.calls_ns,)


def _split(stamps: List[Tuple[float, int]], steps: int) -> Tuple[List[float], List[float]]:
    """Step times in blocks with the hook on and off (the first and last block left out)."""
    on: List[float] = []
    off: List[float] = []
    for (t0, _), (t1, step) in zip(stamps, stamps[1:]):
        if BLOCK <= step < steps - BLOCK:
            (on if _on(step) else off).append(t1 - t0)
    return on, off


def bench_overhead(name: str, run: Callable[[int, Path], Tuple[List[float], List[float], List[int]]],
                   steps: int, repeats: int) -> None:
    on: List[float] = []
    off: List[float] = []
    hook: List[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(repeats):
            run_on, run_off, calls = run(steps, Path(tmp) / f"run{index}")
            on += run_on
            off += run_off
            hook += calls[1:-1]  # the last step's final save left out
    step_s = statistics.median(off)
    ratio = statistics.median(on) / step_s
    share = statistics.median(hook) / 1e9 / step_s
    print(f"{name:<12} step {step_s * 1e3:.3f} ms: overhead {100 * (ratio - 1):+.2f} % (median "
          f"step, hook on vs off in alternating blocks of {BLOCK} steps of the same runs; target "
          f"<= 1 %); the hook itself {statistics.median(hook) / 1e3:.2f} us = {100 * share:.3f} % "
          "of a step")


# --------------------------------------------------------------------------------------------
# 2. mid-epoch resume of a 100k-sample shuffled loader


def _first_batch_s(make_iter: Callable[[], Any]) -> float:
    began = time.perf_counter()
    it = iter(make_iter())
    next(it)
    elapsed = time.perf_counter() - began
    del it
    return elapsed


def bench_data_resume(samples: int, repeats: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from session_watchdog.trainer.data import TrackedLoader

    data = TensorDataset(torch.randn(samples, 16), torch.arange(samples))
    done = (samples // 32) // 2  # resume in the middle of the epoch

    def plain() -> DataLoader[Any]:
        return DataLoader(data, batch_size=32, shuffle=True, num_workers=2,
                          generator=torch.Generator().manual_seed(0))

    source = TrackedLoader(plain())
    it = iter(source)
    for _ in range(done):
        next(it)
    position = source.state_dict()
    del it

    def resumed_plain() -> Any:
        tracked = TrackedLoader(plain())
        tracked.load_state_dict(position)
        return tracked

    def naive_skip() -> Any:
        it = iter(plain())
        for _ in range(done):
            next(it)
        return it

    rows: Dict[str, List[float]] = {"fresh": [], "resumed": [], "naive": []}
    for _ in range(repeats):
        rows["fresh"].append(_first_batch_s(lambda: TrackedLoader(plain())))
        rows["resumed"].append(_first_batch_s(resumed_plain))
        rows["naive"].append(_first_batch_s(naive_skip))
    fresh = statistics.median(rows["fresh"])
    print(f"plain DataLoader, {samples} samples, resume at batch {done}: first batch "
          f"{fresh * 1e3:.1f} ms fresh, {statistics.median(rows['resumed']) * 1e3:.1f} ms resumed "
          f"= {statistics.median(rows['resumed']) / fresh:.2f}x (target <= 1.5x); "
          f"naive skip {statistics.median(rows['naive']) * 1e3:.1f} ms = "
          f"{statistics.median(rows['naive']) / fresh:.1f}x")

    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        print("StatefulDataLoader: torchdata is not installed (pip install 'session-watchdog[data]')")
        return

    def stateful() -> Any:
        return StatefulDataLoader(data, batch_size=32, shuffle=True, num_workers=2,
                                  generator=torch.Generator().manual_seed(0))

    loader = stateful()
    it = iter(loader)
    for _ in range(done):
        next(it)
    state = loader.state_dict()
    del it

    def resumed_stateful() -> Any:
        fresh_loader = stateful()
        fresh_loader.load_state_dict(state)
        return fresh_loader

    fresh_s = statistics.median(_first_batch_s(stateful) for _ in range(repeats))
    resumed_s = statistics.median(_first_batch_s(resumed_stateful) for _ in range(repeats))
    print(f"StatefulDataLoader, same position: first batch {fresh_s * 1e3:.1f} ms fresh, "
          f"{resumed_s * 1e3:.1f} ms resumed = {resumed_s / fresh_s:.2f}x (target <= 1.5x)")


# --------------------------------------------------------------------------------------------
# 3. steps lost at a known deadline


def bench_deadline(framework: str, runs: int, seed: int) -> None:
    script = SCRIPTS / ("hf_train.py" if framework == "hf" else "lightning_train.py")
    rng = random.Random(seed)
    lost: List[int] = []
    for index in range(runs):
        session_s = rng.uniform(35.0, 45.0)
        step_sleep = rng.uniform(0.05, 0.3)
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            proc = spawn([*watchdog_argv(base, "run", session_s), "--", sys.executable,
                          str(script), "--out", str(base / "out"), "--steps", "100000",
                          "--step-sleep", f"{step_sleep:.3f}"])
            try:
                code, out, err = finish(proc, timeout=session_s + 120)
            finally:
                reap(proc)
            status = RunDir(base / "run").read_status()
            evs = events(base / "run.jsonl")
            requests, acks = requests_and_acks(evs)
            ckpt = status.last_checkpoint if status is not None else None
            in_time = [a for a in acks if session_clock(evs, a) < session_s]
            if code != 75 or status is None or ckpt is None or not in_time:
                print(f"  {framework} run {index}: exit {code}, no acknowledged checkpoint before "
                      f"the deadline\n{err[-1500:]}")
                lost.append(-1)
                continue
            lost.append(status.step - ckpt.step)
            print(f"  {framework} run {index}: session {session_s:.1f} s, step {step_sleep:.3f} s: "
                  f"trained {status.step} steps, committed {ckpt.step}, lost {status.step - ckpt.step}"
                  f"; stop acked at {session_clock(evs, in_time[-1]):.1f} s")
    failed = sum(1 for n in lost if n < 0)
    print(f"{framework:<12} steps lost at the deadline over {runs} runs: "
          f"{[n for n in lost if n >= 0]} (target 0 each){f'; {failed} runs failed' if failed else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per overhead run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per figure")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=2, help="deadline runs per framework (10: full)")
    parser.add_argument("--skip-deadline", action="store_true", help="leave out the daemon runs")
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    print("== per-step overhead of the callbacks ==")
    bench_overhead("HF Trainer", _hf_run, opts.steps, opts.repeats)
    bench_overhead("Lightning", _lightning_run, opts.steps, opts.repeats)
    print("== mid-epoch resume of a shuffled loader ==")
    bench_data_resume(opts.samples, max(5, opts.repeats))
    if not opts.skip_deadline:
        print("== steps lost at a known deadline (real daemon, compressed sessions) ==")
        for framework in ("hf", "lightning"):
            bench_deadline(framework, opts.runs, opts.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
