"""The probe: ``SystemProbe.sample(times)`` reads the machine and the trainer into one Sample.

Every call that can hang (NVML on a wedged driver, ``statvfs`` on a stale Drive FUSE mount) runs
on one worker thread and is bounded by a timeout; a call still pending is reported, not waited on.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from session_watchdog import channel
from session_watchdog.probes.host import (
    CPU_EVERY_S,
    CpuPercent,
    KernelFiles,
    locate_cgroup,
    read_disks,
    read_host,
    remote_paths,
)
from session_watchdog.probes.nvml import Nvml, _nvml_error_text
from session_watchdog.probes.readings import DiskReading, GpuReading, Sample, Times, TrainerReading


def read_trainer(run_dir: Optional[channel.RunDir]) -> TrainerReading:
    """Liveness from the kernel's locks; status from trainer.json. No process scan."""
    if run_dir is None:
        return TrainerReading(False, False)
    try:
        alive = run_dir.trainer_alive()
        saving = run_dir.trainer_saving()
    except (channel.ChannelError, OSError) as err:
        # A planted symlink at a lock name: liveness unknown, so assume the worst (alive and
        # saving) - that blocks ending the runtime, which is the safe side.
        return TrainerReading(True, True, None, str(err))
    try:
        return TrainerReading(alive, saving, run_dir.read_status())
    except (channel.ChannelError, OSError) as err:
        return TrainerReading(alive, saving, None, str(err))


# --------------------------------------------------------------------------------------------
# The probe


class _Call:
    """One call handed to a :class:`_Worker`; ``wait`` returns whether it finished in time."""

    __slots__ = ("fn", "finished", "value", "error", "_done")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn: Optional[Callable[[], Any]] = fn
        self.finished = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self._done = threading.Lock()
        self._done.acquire()  # released by the worker when the call returns

    def run(self) -> None:
        fn, self.fn = self.fn, None  # the probe is not kept alive by a finished call
        try:
            self.value = fn() if fn is not None else None
        except BaseException as err:  # handed to the waiter, as a Future would
            self.error = err
        self.finished = True
        self._done.release()

    def wait(self, timeout_s: float) -> bool:
        if self.finished:
            return True
        if not self._done.acquire(timeout=timeout_s):
            return False
        self._done.release()  # a later waiter (the next tick) finds it done too
        return True

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _run_calls(calls: queue.SimpleQueue[Optional[_Call]]) -> None:
    while True:
        call = calls.get()
        if call is None:
            return
        call.run()
        del call  # not held while waiting for the next one


class _Worker:
    """One daemon thread running calls in order: the lightest hand-off between two threads (a
    queue and a lock; a ThreadPoolExecutor's Future and work item cost twice the CPU per tick,
    issue 17). A daemon thread, so a call hung in the driver never holds up the exit. The
    thread holds only the queue: a worker (and its probe) never closed still ends its thread
    once it is garbage, as a ThreadPoolExecutor's does."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Optional[_Call]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=_run_calls, args=(self._calls,), name=name,
                                       daemon=True)
        self.thread.start()
        weakref.finalize(self, self._calls.put, None)

    def submit(self, fn: Callable[[], Any]) -> _Call:
        call = _Call(fn)
        self._calls.put(call)
        return call

    def stop(self) -> None:
        self._calls.put(None)  # after the calls already queued


class SystemProbe:
    """Reads the real machine. ``sample(times)`` never raises for a missing GPU or a bad file."""

    def __init__(
        self,
        run_dir: Optional[channel.RunDir] = None,
        watch_paths: Sequence[Path] = (),
        nvml: Optional[Nvml] = None,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        proc_self_cgroup: Path = Path("/proc/self/cgroup"),
        timeout_s: float = 2.0,
        notebook_idle: Optional[Callable[[], Optional[float]]] = None,
        child_exit: Optional[Callable[[], Optional[int]]] = None,
        processes_every: int = 12,
    ) -> None:
        self.run_dir = run_dir
        self.watch_paths = tuple(watch_paths)
        self.nvml = nvml if nvml is not None else Nvml()
        self.cgroup_root = cgroup_root
        self.proc_self_cgroup = proc_self_cgroup
        self.timeout_s = timeout_s
        self.notebook_idle = notebook_idle
        self.child_exit = child_exit
        self.processes_every = processes_every  # GPU process lists: every Nth sample (slow call)
        self._samples = 0
        self._workers: Dict[str, _Worker] = {}
        self._pending: Dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._cgroup_files = locate_cgroup(cgroup_root, proc_self_cgroup)  # found once
        self._kernel_files = KernelFiles()
        self._cpu = CpuPercent(self._kernel_files, every_s=CPU_EVERY_S)
        self._remote = bool(remote_paths(self.watch_paths))

    def _submit(self, name: str, fn: Callable[[], Any]) -> _Call:
        """Start ``fn`` on worker ``name``, unless that worker's previous call still runs.

        One worker per kind (gpu, disk): a hung NVML call must not blind the disk readings.
        """
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                worker = self._workers[name] = _Worker(f"session-watchdog-{name}")
            pending = self._pending.get(name)
            if pending is None or pending.finished:
                pending = self._pending[name] = worker.submit(fn)
            return pending

    def _result(self, call: Optional[_Call], inline: Callable[[], Any],
                timed_out: Callable[[], Any]) -> Any:
        if call is None:
            return inline()
        if not call.wait(self.timeout_s):
            return timed_out()
        return call.result()

    def _read_disks(self) -> Tuple[DiskReading, ...]:
        return read_disks(self.watch_paths)

    def _read_gpus(self) -> Tuple[str, Tuple[GpuReading, ...]]:
        if not self.nvml.start():
            return self.nvml.state, ()
        self._samples += 1
        try:
            return "ok", self.nvml.read(with_processes=self._samples % self.processes_every == 1
                                        or self.processes_every == 1)
        except Exception as err:
            return f"unavailable: {_nvml_error_text(err)}", ()

    def sample(self, times: Times) -> Sample:
        # Calls that can hang (a live NVML, statvfs on a network/FUSE mount) run on workers,
        # bounded by timeout_s. Without them (no driver, local disks) a hand-off would cost more
        # than the reads. The fast reads come first and the GPU worker runs while this thread
        # waits: run side by side, the two threads passed the GIL back and forth at every
        # syscall, which cost more CPU than the overlap saved time (issue 17).
        host = read_host(cgroup_files=self._cgroup_files, locate=False, read=self._kernel_files,
                         cpu=self._cpu)
        trainer = read_trainer(self.run_dir)
        nvml = self.nvml
        gpu_job = self._submit("gpu", self._read_gpus) if nvml.ready or nvml.retry_due() else None
        disk_job = self._submit("disk", self._read_disks) if self._remote else None
        if gpu_job is None:  # no NVML, and not yet time to look for it again: _read_gpus's answer
            nvml_state, gpus = nvml.state, ()
        else:
            nvml_state, gpus = self._result(gpu_job, self._read_gpus, lambda: ("timeout", ()))
        if disk_job is None:
            disks = read_disks(self.watch_paths)
        else:
            disks = self._result(disk_job, self._read_disks, lambda: tuple(
                DiskReading(str(p), None, None, "timeout") for p in self.watch_paths))
        return Sample(
            now=times.now,
            elapsed_s=times.elapsed_s,
            gpus=gpus,
            nvml=nvml_state,
            host=host,
            disks=disks,
            trainer=trainer,
            notebook_idle_s=self.notebook_idle() if self.notebook_idle else None,
            child_exit=self.child_exit() if self.child_exit else None,
        )

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the workers; wait up to ``wait_s`` for them (a hung NVML call keeps its thread)."""
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
            self._pending.clear()
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + wait_s
        for worker in workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        self.nvml.shutdown()
        self._kernel_files.close()
