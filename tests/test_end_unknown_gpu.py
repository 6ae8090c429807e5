"""The end of the runtime never follows an unknown GPU reading (issue 18).

The last check before the end action (and before its retry) uses a reading taken after the grace
period; on the idle path every GPU must be known and idle in it. With no GPU reading at all the
idle end can never fire, and the watchdog says so once at start.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
import structlog
from fakes import FakeClock, gpu, sample
from test_end import Recorder, done_status, write_checkpoint

from session_watchdog import channel, platforms
from session_watchdog.config import Config
from session_watchdog.daemon import Watchdog
from session_watchdog.probes import GpuReading, Sample, Times, gpus_all_idle

NOW = 1_800_000_000.0
END_THREAD = "session-watchdog-end"


class WorldProbe:
    """A scripted probe: ``tick_gpus`` for the ticks, ``end_gpus`` for the end transaction's own
    last-moment reading (told apart by the calling thread). Every reading is recorded."""

    def __init__(self, tick_gpus, end_gpus, alive: bool = False,
                 status: Optional[channel.TrainerStatus] = None) -> None:
        self.tick_gpus = tick_gpus
        self.end_gpus = end_gpus
        self.alive = alive
        self.status = status
        self.readings: List[Tuple[str, Tuple[GpuReading, ...]]] = []
        self._lock = threading.Lock()

    def sample(self, times: Times) -> Sample:
        thread = threading.current_thread().name
        gpus = tuple(self.end_gpus() if thread == END_THREAD else self.tick_gpus())
        with self._lock:
            self.readings.append((thread, gpus))
        return dataclasses.replace(
            sample(gpus=gpus, alive=self.alive, trainer_status=self.status,
                   nvml="ok" if gpus else "unavailable: NVML library not found"),
            now=times.now, elapsed_s=times.elapsed_s)


def watchdog(tmp_path: Path, probe: WorldProbe, recorder: Recorder, clock: FakeClock,
             **config) -> Watchdog:
    settings = dict(run_dir=str(tmp_path / "run"), log_file=str(tmp_path / "log.jsonl"),
                    platform="colab", idle_end_after="10m", grace="1ms", end_when_done=True)
    settings.update(config)
    return Watchdog(Config.build(**settings), platform=platforms.Platform("colab", ("test",)),
                    clock=clock, session_start=NOW, probe=probe, end_action=("recorder", recorder),
                    confirm_after_s=0.0)


def idle(n: int = 2) -> Sequence[GpuReading]:
    return [gpu(i, 0.0) for i in range(n)]


def run_ticks(dog: Watchdog, clock: FakeClock, ticks: int, step_s: float = 60.0) -> int:
    """Tick ``ticks`` times, ``step_s`` apart on the fake clock; each end transaction runs to
    its outcome before the next tick. Returns how many end transactions were started."""
    ends = 0
    for _ in range(ticks):
        dog.tick()
        if any(d.kind == "end" for d in dog.last_decisions):
            ends += 1
            assert dog.wait_end(60) is not None
        clock.advance(step_s)
    return ends


class TestLastCheckReadsAfresh:
    def test_a_gpu_turning_unknown_right_before_the_action_stops_every_idle_end(
            self, tmp_path: Path) -> None:
        """Ticks see idle GPUs, the reading after the grace period says unknown: idle ends are
        decided again and again, and the end action never runs."""
        probe = WorldProbe(tick_gpus=idle, end_gpus=lambda: [gpu(0, 0.0), gpu(1, None)])
        recorder, clock = Recorder(), FakeClock(NOW)
        dog = watchdog(tmp_path, probe, recorder, clock)
        with structlog.testing.capture_logs() as events:
            ends = run_ticks(dog, clock, 60)
        assert ends >= 4
        assert recorder.calls == []
        aborted = [e for e in events if e.get("step") == "end_aborted"]
        assert len(aborted) == ends
        assert all("reading is unknown" in e["message"] for e in aborted)

    def test_the_retry_after_an_unconfirmed_end_checks_again(self, tmp_path: Path) -> None:
        """The runtime outlived the first end action and a GPU turned unknown since: no retry."""
        readings = iter([idle(), [gpu(0, None)]])  # before the action, then before the retry
        probe = WorldProbe(tick_gpus=idle, end_gpus=lambda: next(readings))
        recorder, clock = Recorder(), FakeClock(NOW)
        dog = watchdog(tmp_path, probe, recorder, clock)
        with structlog.testing.capture_logs() as events:
            assert run_ticks(dog, clock, 11) == 1
        assert len(recorder.calls) == 1
        assert [e["message"] for e in events if e.get("step") == "end_aborted"] == [
            "not retrying: a GPU is busy or its reading is unknown; not ending an idle runtime"]

    @pytest.mark.parametrize("seed", [1, 2, 3, 4])
    def test_randomized_readings_never_let_an_unknown_one_through(self, tmp_path: Path,
                                                                  seed: int) -> None:
        """Random GPU readings (idle, busy, unknown, no NVML) on every probe call over 300 ticks
        of a fake clock: every end action follows a fresh all-known, all-idle reading taken by
        the end transaction itself."""
        rng = random.Random(seed)
        choices = [0.0, 0.0, 0.0, 1.0, 0.0, 60.0, None]

        def random_gpus() -> Sequence[GpuReading]:
            if rng.random() < 0.05:
                return []  # NVML gone for this reading
            return [gpu(i, rng.choice(choices)) for i in range(2)]

        def mostly_idle() -> Sequence[GpuReading]:
            return idle() if rng.random() < 0.9 else random_gpus()

        probe = WorldProbe(tick_gpus=mostly_idle, end_gpus=random_gpus)
        checked: List[bool] = []

        def action() -> str:
            thread, gpus = probe.readings[-1]
            checked.append(thread == END_THREAD and gpus_all_idle(gpus, 5.0) is True)
            return "recorded"

        recorder, clock = Recorder(), FakeClock(NOW)
        dog = watchdog(tmp_path, probe, recorder, clock)
        dog.end_action = ("check", action)
        with structlog.testing.capture_logs():
            ends = run_ticks(dog, clock, 300)
        assert ends > 0
        assert checked and all(checked)

    def test_a_training_complete_end_makes_no_gpu_claim(self, tmp_path: Path) -> None:
        """Completed training with a verified checkpoint ends even with every GPU unknown."""
        ckpt = write_checkpoint(tmp_path / "ckpt")
        probe = WorldProbe(tick_gpus=lambda: [gpu(0, None)], end_gpus=lambda: [gpu(0, None)],
                           status=done_status(ckpt))
        recorder, clock = Recorder(), FakeClock(NOW)
        dog = watchdog(tmp_path, probe, recorder, clock)
        with structlog.testing.capture_logs():
            assert run_ticks(dog, clock, 1) == 1
        assert len(recorder.calls) >= 1

    def test_a_failing_probe_after_the_grace_stops_the_end(self, tmp_path: Path) -> None:
        """No fresh reading (the probe raises) after the grace period: no end action."""
        def broken() -> Sequence[GpuReading]:
            raise OSError("NVML hung")

        probe = WorldProbe(tick_gpus=idle, end_gpus=broken)
        recorder, clock = Recorder(), FakeClock(NOW)
        dog = watchdog(tmp_path, probe, recorder, clock)
        with structlog.testing.capture_logs() as events:
            assert run_ticks(dog, clock, 11) == 1
        assert recorder.calls == []
        assert [e["message"] for e in events if e.get("step") == "end_aborted"] == [
            "no fresh reading after the grace period; not ending the runtime"]


class TestBlindIdleEnd:
    @pytest.mark.parametrize("gpus", [[], [gpu(0, None), gpu(1, None)]], ids=["no-nvml", "unknown"])
    def test_said_once_at_start(self, tmp_path: Path, gpus) -> None:
        """No readable GPU and the idle end on: one idle_end_unavailable warning at the first
        tick, none after, and never an end."""
        probe = WorldProbe(tick_gpus=lambda: gpus, end_gpus=lambda: gpus)
        recorder, clock = Recorder(), FakeClock(NOW)
        dog = watchdog(tmp_path, probe, recorder, clock)
        with structlog.testing.capture_logs() as events:
            assert run_ticks(dog, clock, 40) == 0
        said = [e for e in events if e["event"] == "idle_end_unavailable"]
        assert len(said) == 1 and "can never end this runtime" in said[0]["message"]
        assert recorder.calls == []

    def test_silent_when_gpus_are_readable_or_the_idle_end_is_off(self, tmp_path: Path) -> None:
        """Known GPU readings, or idle_end_after off: nothing to say."""
        for gpus, config in ((idle(), {}), ([], {"idle_end_after": "off"})):
            probe = WorldProbe(tick_gpus=lambda g=gpus: g, end_gpus=lambda g=gpus: g, alive=True)
            clock = FakeClock(NOW)
            dog = watchdog(tmp_path / str(len(gpus)), probe, Recorder(), clock, **config)
            with structlog.testing.capture_logs() as events:
                run_ticks(dog, clock, 3)
            assert [e for e in events if e["event"] == "idle_end_unavailable"] == []
