"""Checkpoint cost as ratios, measured side by side on one disk, on the state users save.

The state is a model + Adam-like optimizer (params, exp_avg, exp_avg_sq): ``--tensors`` tensors
(340 by default) of mixed sizes totalling ``--size-mb`` MiB of random (incompressible) float32.
Before every measurement dirty pages are flushed (``sync``) and the page cache is dropped
(``/proc/sys/vm/drop_caches``; the output says when that is not permitted). The figures run in
alternating blocks (the order rotates each repeat), ``--repeat`` times, and the machine's 1-minute
load average is printed beside each one: on a busy machine the ratios hold better than the times.

Figures:

1. sync save: ``CheckpointManager.save`` (temp file, checksum while writing, fsync, rename,
   commit marker, prune) against (a) a raw ``write`` + ``fsync`` of the same number of bytes to
   a new file, (b) plain ``torch.save`` with torch's crc32 off + ``fsync``, (c) safetensors'
   ``save_file`` + ``fsync`` when safetensors is installed. Goals: >= 0.8x (a), >= 1.0x (b, c).
2. async stall: how long ``save_async`` blocks the caller, in four blocks whose order rotates
   each repeat: the first save of a fresh process with a bare ``CheckpointManager`` (cold: its
   snapshot buffers are allocated and faulted in during the stall), the same after
   ``prepare_async`` paged them in (as a ``Session(async_save=True)`` does at its first step;
   the time the ``prepare_async`` call itself blocked is added to this stall),
   a later save reusing the buffers (steady), and a sync ``save`` of the same state, the
   baseline. Each stall is printed as a ratio to the sync save, as medians and repeat by
   repeat. Goal: <= 0.1x. ``--device cuda`` places the state on the GPU for this.
3. training time lost to a save: a CPU-bound training loop (torch matmuls on all of torch's
   intra-op threads, i.e. every core) runs the same number of steps (about ``--lost-loop``
   sync saves long) with no save, with one ``save`` in the middle, with one ``save_async`` in
   the middle (its writer at idle priority, as shipped), and with one ``save_async`` whose writer
   runs at normal priority (as before issue 17's priority change). Lost = loop time with the
   save - loop time without (blocks alternate, the no-save loop beside each); the async figures
   also say how long after the loop's last step the write became durable. Goal: async lost <=
   0.2x sync lost.

4. a Session's stall, as a training loop feels it: a real model (Linear layers) + Adam of about
   ``--size-mb`` MiB of state in about ``--tensors`` tensors, trained on CPU; a checkpoint is
   requested through the run dir (as the daemon does) and ``session.step()`` takes it. Stall =
   the save step's ``session.step()`` over the median ``session.step()``, plus the time the next
   ``optimizer.step()`` waited in the Session's pre-hook for the writer's copy (timed between
   two hooks of the benchmark's, registered before and after the Session's). Variants: a sync
   save (the baseline), ``async_save=True`` (the default: every tensor copied in the stall),
   and the opt-in ``overlap_copy="optimizer_state"`` (Adam's moments copied by the writer, the
   rest in the stall) and ``overlap_copy=True`` (the parameters too); the first save
   of each Session (its buffers prepared at the first step) and a second one. Also printed:
   the time lost over the save step and the two after it (their excess over the median step).
   Goal: stall <= 0.1x the sync save's.

Usage: ``python benchmarks/bench_checkpoint.py [--size-mb 1024] [--tensors 340] [--repeat 3]
[--dir DIR] [--device cpu|cuda] [--figures save,stall,lost,session] [--lost-loop 3]``. Exit status is
nonzero only when something crashes; missed goals are printed, not failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from session_watchdog.trainer import priority
from session_watchdog.trainer.checkpoint import CheckpointManager

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
_drop_note: List[str] = []


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache, so each figure starts from the same state."""
    os.sync()
    try:
        DROP_CACHES.write_text("1\n")
    except OSError as err:
        if not _drop_note:
            _drop_note.append(f"page cache NOT dropped ({DROP_CACHES}: {err.strerror}); sync only")
    else:
        if not _drop_note:
            _drop_note.append("page cache dropped before each figure")


def load() -> float:
    return os.getloadavg()[0]


def build_state(size_mb: int, tensors: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """A model + Adam-like optimizer state: ``tensors`` tensors (params, exp_avg, exp_avg_sq).

    Layer sizes follow a transformer's shape: a few big matrices, many small biases and norms.
    """
    layers = max(1, tensors // 3)
    generator = torch.Generator().manual_seed(0)
    # weights of the form: every 4th layer big (embedding/MLP), others medium, some tiny (norms)
    weights = [16.0 if i % 4 == 0 else 4.0 if i % 4 in (1, 2) else 0.01 for i in range(layers)]
    total = (size_mb << 20) // 4 // 3  # floats per third (params / exp_avg / exp_avg_sq)
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[0] += total - sum(sizes)
    model = {f"layer{i}.weight": torch.rand(n, generator=generator) for i, n in enumerate(sizes)}
    exp_avg = {f"{i}.exp_avg": torch.rand(n, generator=generator) for i, n in enumerate(sizes)}
    exp_avg_sq = {f"{i}.exp_avg_sq": torch.rand(n, generator=generator) for i, n in enumerate(sizes)}
    extra = tensors - 3 * layers  # 340 = 3 * 113 + 1: the step counter
    opt: Dict[str, torch.Tensor] = {**exp_avg, **exp_avg_sq}
    for i in range(extra):
        opt[f"step{i}"] = torch.tensor(float(i))
    return {"model": model, "optimizer": opt}


def tensors_of(state: Dict[str, Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
    return [t for part in state.values() for t in part.values()]


def raw_write(path: Path, state: Dict[str, Dict[str, torch.Tensor]], total: int) -> None:
    """Write ``total`` bytes (the tensors' memory, then zero padding) to a new file and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        left = total
        for tensor in tensors_of(state):
            view = memoryview(tensor.numpy()).cast("B")[:left]  # type: ignore[arg-type]
            left -= view.nbytes
            while view:
                view = view[os.write(fd, view):]
        pad = memoryview(bytes(min(max(left, 0), 1 << 20)))
        while left > 0:
            left -= os.write(fd, pad[:left])
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_torch_save(path: Path, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    save_config = getattr(config, "save", None)
    previous = getattr(save_config, "compute_crc32", None)
    if save_config is not None and previous is not None:
        save_config.compute_crc32 = False
    try:
        with open(path, "xb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if save_config is not None and previous is not None:
            save_config.compute_crc32 = previous


def safetensors_save(path: Path, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    flat = {f"{part}.{name}": t for part, tensors in state.items() for name, t in tensors.items()}
    save_file(flat, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object], setup: Callable[[], object] = lambda: None) -> Tuple[float, float]:
    """(seconds, load average) of one call, ``setup()`` run, garbage collected and caches
    dropped first (a full collection, ~60 ms here, falls on whichever call comes first)."""
    setup()
    gc.collect()
    drop_caches()
    before = load()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started, max(before, load())


def first_save_in_child(size_mb: int, tensors: int, directory: Path, device: str,
                        prepared: bool) -> Tuple[float, float]:
    """(stall, load) of the first save_async of a fresh process: in this one, freed snapshot
    buffers would come back from the allocator already paged in. ``prepared``: after
    prepare_async paged its buffers in (as Session(async_save=True) does at its first step)."""
    import subprocess

    argv = [sys.executable, __file__, "--child-first-save", str(directory), "--size-mb",
            str(size_mb), "--tensors", str(tensors), "--device", device]
    done = subprocess.run(argv + (["--prepared"] if prepared else []), capture_output=True,
                          text=True, check=True)
    shutil.rmtree(directory, ignore_errors=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if prepared:
        print(f"  (first, prepared: of its {result['stall']:.3f} s stall, the prepare_async call "
              f"blocked {result['prepare']:.3f} s)", flush=True)
    return float(result["stall"]), max(float(result["load"]), load())


def child_first_save(directory: Path, size_mb: int, tensors: int, device: str,
                     prepared: bool) -> None:
    state = build_state(size_mb, tensors)
    if device != "cpu":
        state = {part: {k: t.to(device) for k, t in d.items()} for part, d in state.items()}
    manager = CheckpointManager(directory, keep=1)
    # A training loop has run (and its garbage collections with it) before its first step's
    # prepare_async and before its first checkpoint; without this the fresh state just built
    # makes a full collection (~60 ms here) fall into whichever call comes first.
    gc.collect()
    prepare_s = 0.0
    if prepared:
        started = time.perf_counter()
        manager.prepare_async(state)  # the training thread waits for this call too
        prepare_s = time.perf_counter() - started
        manager._join_prepare()  # a training loop runs a while before its first checkpoint
    gc.collect()
    drop_caches()
    before = load()
    started = time.perf_counter()
    pending = manager.save_async(state, step=1)
    stall = time.perf_counter() - started
    pending.result()
    print(json.dumps({"stall": prepare_s + stall, "prepare": prepare_s, "load": before}))


class TrainingLoop:
    """A CPU-bound stand-in for training: chained matmuls that keep every intra-op thread busy."""

    def __init__(self, width: int = 512) -> None:
        generator = torch.Generator().manual_seed(1)
        self.weight = torch.rand(width, width, generator=generator) / width
        self.x = torch.rand(width, width, generator=generator)

    def step(self) -> None:
        self.x = torch.tanh(self.x @ self.weight) + 0.5

    def steps_for(self, seconds: float) -> int:
        """How many steps take about ``seconds`` now (measured over a short run)."""
        for _ in range(5):
            self.step()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            self.step()
            count += 1
        return max(10, int(count * seconds / (time.perf_counter() - started)))

    def run(self, steps: int, save_at: int, save: Optional[Callable[[], object]]
            ) -> Tuple[float, float, Optional[float]]:
        """(seconds for ``steps`` steps, their excess over ``steps`` median steps, seconds from
        the last step until the save's write was durable: None for no save or a sync one, 0
        when it was durable before the loop ended).

        The excess is what a save adds (its stall, the steps it slows) plus what other
        processes took; the median step is the loop's own pace under the load of the moment,
        so comparing excesses cancels a load that drifts between runs (this machine is shared).
        """
        pending: Any = None
        times: List[float] = []
        started = last = time.perf_counter()
        for i in range(steps):
            if i == save_at and save is not None:
                pending = save()
            self.step()
            now = time.perf_counter()
            times.append(now - last)
            last = now
        elapsed = last - started
        excess = elapsed - steps * statistics.median(times)
        if pending is None or not hasattr(pending, "result"):
            return elapsed, excess, None
        if pending.done():
            return elapsed, excess, 0.0
        pending.result()
        return elapsed, excess, time.perf_counter() - started - elapsed


def lost_time(state: Dict[str, Dict[str, torch.Tensor]], directory: Path, repeat: int,
              loop_syncs: float) -> None:
    """Figure 3: training time lost to a sync save, an async save, an async save at normal
    priority; printed with the machine load."""
    manager = CheckpointManager(directory / "lost", keep=1)
    loop = TrainingLoop()
    drop_caches()
    started = time.perf_counter()
    manager.save(state, step=0)
    sync_s = time.perf_counter() - started
    manager.save_async(state, step=1).result()  # its snapshot buffers exist from now on
    steps = loop.steps_for(max(4.0, loop_syncs * sync_s))
    step = iter(range(2, 1 << 30))
    original_lower = priority.Yielding.lower

    def sync() -> object:
        return manager.save(state, step=next(step))

    def background() -> object:
        return manager.save_async(state, step=next(step))

    # The writer thread calls Yielding.lower when it starts, after save_async returned: the
    # patch stays until the loop is over (restored in the loop's finally below).
    def background_normal() -> object:
        priority.Yielding.lower = lambda self: None  # type: ignore[method-assign]
        return manager.save_async(state, step=next(step))

    variants: List[Tuple[str, Optional[Callable[[], object]]]] = [
        ("sync save", sync), ("async save, idle-priority writer", background),
        ("async save, normal-priority writer", background_normal)]
    # Each variant: a loop without a save, one with, one without (their mean is the baseline).
    rows: Dict[str, List[Tuple[float, float, float, Optional[float]]]] = {}
    for r in range(repeat):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for name, save in order:
            for label, fn in (("before", None), (name, save), ("after", None)):
                manager.wait()
                drop_caches()
                gc.collect()
                before = load()
                try:
                    elapsed, excess, tail = loop.run(steps, steps // 2, fn)
                finally:
                    priority.Yielding.lower = original_lower  # type: ignore[method-assign]
                rows.setdefault(f"{label}|{name}", []).append(
                    (elapsed, excess, max(before, load()), tail))
    manager.wait()
    print(f"training time lost to one save in a CPU-bound loop of {steps} steps "
          f"(~{loop_syncs:g} sync saves long; sync save {sync_s:.2f} s when measured), "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, {repeat} repeats:")
    print("  lost = loop time with the save - mean of the loops before and after without; each "
          "run: lost s (loop s with / without) [excess over median step, with - without] @ load")
    lost: Dict[str, float] = {}
    for name, _ in variants:
        runs = list(zip(rows[f"{name}|{name}"], rows[f"before|{name}"], rows[f"after|{name}"]))
        diffs = [w[0] - (b[0] + a[0]) / 2 for w, b, a in runs]
        lost[name] = statistics.median(diffs)
        tails = [w[3] for w, _, _ in runs if w[3] is not None]
        each = ", ".join(f"{d:.2f} ({w[0]:.1f}/{(b[0] + a[0]) / 2:.1f}) "
                         f"[{w[1] - (b[1] + a[1]) / 2:.2f}]@{w[2]:.1f}"
                         for d, (w, b, a) in zip(diffs, runs))
        tail = (f"; durable {statistics.median(tails):.2f} s after the loop (median)"
                if tails else "")
        print(f"  {name:36} lost {lost[name]:6.2f} s (median)   {each}{tail}")
    for name in ("async save, idle-priority writer", "async save, normal-priority writer"):
        ratio = lost[name] / lost["sync save"] if lost["sync save"] > 0 else float("nan")
        if name.endswith("idle-priority writer"):  # as shipped: the goal is this one's
            verdict = "goal <= 0.2" + ("" if ratio <= 0.2 else " MISSED")
        else:
            verdict = "(reference: the writer's priority before issue 17, no goal)"
        print(f"  lost: {name} vs sync save {ratio:6.3f}x  {verdict}")


SESSION_VARIANTS: Tuple[Tuple[str, bool, Union[bool, str]], ...] = (
    ("sync save", False, False),
    ("async (default: whole copy in the stall)", True, False),
    ("async, overlap_copy=\"optimizer_state\"", True, "optimizer_state"),
    ("async, overlap_copy=True", True, True))


def session_model(size_mb: int, tensors: int) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear layers whose parameters with Adam's two moments come to about ``size_mb`` MiB in
    about ``tensors`` tensors (per layer: weight and bias, their moments and step counters)."""
    layers = max(1, tensors // 8)
    width = max(8, int((size_mb * (1 << 20) / 3 / 4 / layers) ** 0.5))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    return model, torch.optim.Adam(model.parameters(), lr=1e-5)


def session_stalls(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
                   async_save: bool, overlap: Union[bool, str], saves: int = 2
                   ) -> List[Tuple[float, float, float]]:
    """Train under a fresh Session and have it take ``saves`` requested checkpoints; for each,
    (stall s, time lost over the save step and the two after it s, load)."""
    from session_watchdog.channel import Request, RunDir
    from session_watchdog.trainer.session import Session

    width = model[0].in_features
    hook_times: List[float] = []
    before = optimizer.register_step_pre_hook(lambda *a: hook_times.append(time.perf_counter()))
    session = Session(directory / "ckpt", model=model, optimizer=optimizer,
                      run_dir=directory / "run", keep=1, async_save=async_save,
                      overlap_copy=overlap, checkpoint_every=None, handle_signals=False,
                      exit_on_stop=False, poll_interval=0.05, heartbeat_interval=60.0)
    after = optimizer.register_step_pre_hook(lambda *a: hook_times.append(time.perf_counter()))
    results: List[Tuple[float, float, float]] = []
    try:
        def train_step() -> Tuple[float, float, float]:
            """(session.step s, the optimizer step's wait in the Session's hook s, step s)"""
            started = time.perf_counter()
            optimizer.zero_grad()
            model(torch.randn(16, width)).pow(2).mean().backward()
            del hook_times[:]
            optimizer.step()
            waited = hook_times[1] - hook_times[0]
            at = time.perf_counter()
            session.step()
            done = time.perf_counter()
            return done - at, waited, done - started

        rows = [train_step() for _ in range(3)]  # the first boundary prepares async buffers
        session.manager._join_prepare()  # as after a few minutes of training
        for seq in range(1, saves + 1):
            gc.collect()
            drop_caches()
            before_load = load()
            RunDir(directory / "run").write_request(Request(
                seq=seq, action="checkpoint", reason="bench", deadline=None, issued=time.time()))
            marker = (session.manager._pending, session.last_checkpoint)
            deadline = time.monotonic() + 600
            while (session.manager._pending, session.last_checkpoint) == marker:
                if time.monotonic() > deadline:
                    raise RuntimeError("the requested checkpoint was never taken")
                rows.append(train_step())
            at = len(rows) - 1  # the step whose session.step() took the checkpoint
            rows.extend(train_step() for _ in range(3))
            session.manager.wait()
            others = rows[:at] + rows[at + 3:]
            med_session = statistics.median(r[0] for r in others)
            med_step = statistics.median(r[2] for r in others)
            stall = (rows[at][0] - med_session) + rows[at + 1][1]
            lost = sum(r[2] for r in rows[at:at + 3]) - 3 * med_step
            results.append((stall, lost, max(before_load, load())))
    finally:
        session.close()
        before.remove()
        after.remove()
        shutil.rmtree(directory, ignore_errors=True)
    return results


def session_figures(size_mb: int, tensors: int, directory: Path, repeat: int) -> None:
    """Figure 4: the stall of a Session's save in a real training loop, sync vs async."""
    model, optimizer = session_model(size_mb, tensors)
    rows: Dict[str, List[Tuple[float, float, float]]] = {}
    runs = iter(range(1 << 30))
    for r in range(repeat):
        turn = r % len(SESSION_VARIANTS)
        order = SESSION_VARIANTS[turn:] + SESSION_VARIANTS[:turn]
        for name, async_save, overlap in order:
            first, second = session_stalls(model, optimizer, directory / f"s{next(runs)}",
                                           async_save, overlap)
            rows.setdefault(f"{name}, first", []).append(first)
            rows.setdefault(f"{name}, second", []).append(second)
    tensors = [*model.state_dict().values(),
               *(v for s in optimizer.state.values() for v in s.values())]
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    print(f"a Session's stall in a training loop: {len(model)} Linear layers of width "
          f"{model[0].in_features} + Adam, {state_bytes / (1 << 20):.0f} MiB of tensors, "
          f"{repeat} repeats, torch threads {torch.get_num_threads()}:")
    print("  stall = save step's session.step() over the median + the next optimizer.step()'s "
          "wait in the Session's hook; lost = excess of the save step and the two after it")
    med: Dict[str, float] = {}
    for name, values in rows.items():
        med[name] = statistics.median(v[0] for v in values)
        each = ", ".join(f"{s:.3f}/{lost:.2f}@{ld:.1f}" for s, lost, ld in values)
        print(f"  {name:52} stall {med[name]:7.3f} s, lost {statistics.median(v[1] for v in values):6.2f} s "
              f"(median)   each: stall/lost@load {each}")
    # Each against the sync save of the same place in its Session, and against the faster of
    # the two sync saves (a Session's first save also creates its directory).
    fastest = min(med["sync save, first"], med["sync save, second"])
    for which in ("first", "second"):
        sync_s = med[f"sync save, {which}"]
        for name, _, _ in SESSION_VARIANTS[1:]:
            ratio = med[f"{name}, {which}"] / sync_s
            worst = max(ratio, med[f"{name}, {which}"] / fastest)
            goal = "goal <= 0.1" + ("" if worst <= 0.1 else " MISSED")
            print(f"  Session stall, {which} save, {name:52} vs sync save {ratio:6.3f}x "
                  f"(vs the faster sync save {med[f'{name}, {which}'] / fastest:6.3f}x)  {goal}")


def has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(size_mb: int, tensors: int, repeat: int, directory: Path, device: str,
        figures_wanted: Sequence[str] = ("save", "stall", "lost", "session"),
        loop_syncs: float = 3.0) -> None:
    if "session" in figures_wanted:
        session_figures(size_mb, tensors, directory / "session", repeat)
        if not {"save", "stall", "lost"} & set(figures_wanted):
            return
    state = build_state(size_mb, tensors)
    if "lost" in figures_wanted:
        lost_time(state, directory, repeat, loop_syncs)
        if not {"save", "stall"} & set(figures_wanted):
            return
    count = len(tensors_of(state))
    payload = sum(t.nbytes for t in tensors_of(state))
    figures: Dict[str, List[Tuple[float, float]]] = {}
    size = 0
    if "save" in figures_wanted:
        size = save_figures(state, directory, repeat, figures)
    if "stall" in figures_wanted:
        size = stall_figures(state, size_mb, tensors, directory, repeat, device, figures)

    mib = size / (1 << 20)
    print(f"state: {count} tensors ({tensors} asked), {payload / (1 << 20):.0f} MiB payload, "
          f"file {size} bytes; dir {directory}; {repeat} repeats, alternating blocks; "
          f"{_drop_note[0] if _drop_note else ''}")
    if "save" in figures_wanted and not has_safetensors():
        print("safetensors is not installed: its baseline is skipped")
    print(f"{'figure':40} {'median s':>9} {'MiB/s':>7}   each run (s @ load avg)")
    med: Dict[str, float] = {}
    for name, runs in figures.items():
        med[name] = statistics.median(s for s, _ in runs)
        rate = f"{mib / med[name]:7.0f}" if "stall" not in name else " " * 7
        each = ", ".join(f"{s:.2f}@{ld:.1f}" for s, ld in runs)
        print(f"{name:40} {med[name]:9.3f} {rate}   {each}")

    def verdict(ratio: float, goal: float, higher: bool) -> str:
        ok = ratio >= goal if higher else ratio <= goal
        return f"goal {'>=' if higher else '<='} {goal}{'' if ok else ' MISSED'}"

    print("ratios (ours / baseline, as throughput for saves, as time for stalls):")
    if "save" in figures_wanted:
        ours_s = med["CheckpointManager.save"]
        for name, goal in (("raw write+fsync", 0.8), ("torch.save (crc32 off)+fsync", 1.0),
                           ("safetensors save_file+fsync", 1.0)):
            if name in med:
                ratio = med[name] / ours_s
                print(f"  sync save vs {name:32} {ratio:6.2f}x  {verdict(ratio, goal, True)}")
    if "stall" in figures_wanted:
        sync_name = f"sync save, {device} state"
        sync_s = med[sync_name]
        for kind in STALL_KINDS:
            name = f"save_async stall, {kind}, {device}"
            ratio = med[name] / sync_s
            # The same repeat's stall over its sync save: the load of the moment cancels out.
            each = ", ".join(f"{a / b:.3f}" for (a, _), (b, _) in zip(figures[name],
                                                                     figures[sync_name]))
            print(f"  async stall ({kind:15}) vs sync save {ratio:6.3f}x  "
                  f"{verdict(ratio, 0.1, False)}   each repeat: {each}")
        if device == "cpu":
            print("  (CPU state: no GPU on this machine; rerun with --device cuda for the "
                  "device->host stall)")


def save_figures(state: Dict[str, Dict[str, torch.Tensor]], directory: Path, repeat: int,
                 figures: Dict[str, List[Tuple[float, float]]]) -> int:
    """Figure 1 into ``figures``: our sync save and its baselines; returns the file's size."""
    sync_manager = CheckpointManager(directory / "sync", keep=1)
    size = sync_manager.save(state, step=0).bytes  # warm-up; gives the exact file size
    scratch = directory / "scratch"
    scratch.mkdir()
    counter = iter(range(1, 1 << 30))

    def fresh(name: str) -> Path:
        return scratch / f"{name}-{next(counter)}"

    def clear() -> None:  # outside the timing: only our save deletes its predecessor (keep=1)
        for old in scratch.iterdir():
            old.unlink()

    def raw() -> None:
        raw_write(fresh("raw"), state, size)

    def plain() -> None:
        plain_torch_save(fresh("torch"), state)

    def safe() -> None:
        safetensors_save(fresh("safetensors"), state)

    step = iter(range(1, 1 << 30))

    def ours() -> None:
        sync_manager.save(state, step=next(step))

    blocks: List[Tuple[str, Callable[[], None]]] = [("raw write+fsync", raw),
                                                     ("torch.save (crc32 off)+fsync", plain),
                                                     ("CheckpointManager.save", ours)]
    if has_safetensors():
        blocks.append(("safetensors save_file+fsync", safe))
    for r in range(repeat):
        order = blocks[r % len(blocks):] + blocks[: r % len(blocks)]
        for name, fn in order:
            figures.setdefault(name, []).append(timed(fn, clear))
    shutil.rmtree(scratch, ignore_errors=True)
    sync_manager.list()  # waits for the helper that unlinks pruned files
    shutil.rmtree(directory / "sync", ignore_errors=True)
    return size


STALL_KINDS = ("first, cold", "first, prepared", "steady")


def stall_figures(state: Dict[str, Dict[str, torch.Tensor]], size_mb: int, tensors: int,
                  directory: Path, repeat: int, device: str,
                  figures: Dict[str, List[Tuple[float, float]]]) -> int:
    """Figure 2 into ``figures``, four blocks in an order that rotates each repeat: the first
    save_async of a fresh process with a bare manager (cold: its buffers are allocated and
    faulted in during the stall), the same after prepare_async (as a Session does at its first
    step), a later save_async of a manager whose buffers exist (steady), and a sync save of the
    same state; returns the checkpoint file's size."""
    if device != "cpu":
        state = {part: {k: t.to(device) for k, t in d.items()} for part, d in state.items()}
    sync_manager = CheckpointManager(directory / "stall-sync", keep=1)
    size = sync_manager.save(state, step=0).bytes  # warm-up, as the steady manager's below
    async_manager = CheckpointManager(directory / "stall-async", keep=1)
    async_manager.save_async(state, step=0).result()
    step = iter(range(1, 1 << 30))
    children = iter(range(1 << 30))

    def child(prepared: bool) -> Tuple[float, float]:
        return first_save_in_child(size_mb, tensors, directory / f"child{next(children)}",
                                   device, prepared)

    def steady() -> Tuple[float, float]:
        gc.collect()  # as before every figure: the child's and timed()'s
        drop_caches()
        before = load()
        started = time.perf_counter()
        pending = async_manager.save_async(state, step=next(step))
        elapsed = time.perf_counter() - started
        pending.result()
        async_manager.list()  # also waits for the helper that unlinks pruned files
        return elapsed, max(before, load())

    def sync() -> Tuple[float, float]:
        result = timed(lambda: sync_manager.save(state, step=next(step)))
        sync_manager.list()
        return result

    blocks: List[Tuple[str, Callable[[], Tuple[float, float]]]] = [
        (f"save_async stall, first, cold, {device}", lambda: child(False)),
        (f"save_async stall, first, prepared, {device}", lambda: child(True)),
        (f"save_async stall, steady, {device}", steady),
        (f"sync save, {device} state", sync)]
    for r in range(repeat):
        for name, fn in blocks[r % len(blocks):] + blocks[: r % len(blocks)]:
            figures.setdefault(name, []).append(fn())
    return size


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="state size in MiB (1024)")
    parser.add_argument("--tensors", type=int, default=340, help="number of tensors (340)")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per figure (3)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a scratch dir under the current "
                             "directory, so it is the disk checkpoints would use, not /tmp)")
    parser.add_argument("--device", default="cpu", help="device of the state for the stall "
                        "figures: cpu (default) or cuda")
    parser.add_argument("--figures", default="save,stall,lost,session",
                        help="which figures, comma-separated: save,stall,lost,session (all)")
    parser.add_argument("--lost-loop", type=float, default=3.0,
                        help="training loop length for the lost-time figure, in sync saves (3)")
    parser.add_argument("--child-first-save", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_first_save is not None:
        child_first_save(args.child_first_save, args.size_mb, args.tensors, args.device,
                         args.prepared)
        return 0
    if args.size_mb < 1 or args.repeat < 1 or args.tensors < 3:
        parser.error("--size-mb and --repeat must be at least 1, --tensors at least 3")
    base = args.dir if args.dir is not None else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=base))
    try:
        run(args.size_mb, args.tensors, args.repeat, scratch, args.device,
            [f for f in args.figures.split(",") if f], args.lost_loop)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
