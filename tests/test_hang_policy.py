"""policy: hang detection by progress (issue 13), tables of literal numbers with a fake clock."""

from __future__ import annotations

from typing import List, Optional

from fakes import GiB, gpu, sample, status

from session_watchdog.config import OFF, Config
from session_watchdog.policy import TRAINER_HUNG, Decision, PolicyState, decide, hang_timeout

NOW = 1_800_000_000.0


def cfg(**overrides) -> Config:
    base = dict(platform="generic", max_session=OFF, checkpoint_every=OFF, idle_limit=OFF,
                idle_warn=OFF, gpu_idle_after=60.0, trainer_stall_after=600.0, disk_margin=GiB,
                hang_factor=3.0, hang_floor=20.0, hang_ceiling=3600.0, idle_end_after=120.0,
                end_when_done=True)
    base.update(overrides)
    return Config(**base)


def tick(elapsed: float, step: int, state: str = "running", pid: int = 4242, saving: bool = False,
         gpus=()):
    return sample(now=NOW + elapsed, elapsed=elapsed, gpus=gpus, saving=saving,
                  trainer_status=status(step=step, state=state, pid=pid, heartbeat=NOW + elapsed))


def drive(config: Config, samples, state: Optional[PolicyState] = None):
    state = state or PolicyState()
    out: List[List[Decision]] = []
    for s in samples:
        state, decisions = decide(config, state, s)
        out.append(decisions)
    return state, out


def hangs(per_tick: List[List[Decision]]) -> List[int]:
    return [i for i, ds in enumerate(per_tick) if any(d.reason == TRAINER_HUNG for d in ds)]


class TestHangTimeout:
    def test_nothing_learned_before_three_intervals(self):
        """Two observed intervals are not enough to call anything a hang."""
        assert hang_timeout(cfg(), (10.0, 10.0)) is None

    def test_robust_max_times_factor_clamped(self):
        """3 x the largest interval, the second largest from 8 on, within floor and ceiling."""
        assert hang_timeout(cfg(), (10.0, 12.0, 11.0)) == 36.0
        assert hang_timeout(cfg(), (10.0,) * 7 + (500.0,)) == 30.0  # one outlier ignored
        assert hang_timeout(cfg(), (1.0, 1.0, 1.0)) == 20.0  # floor
        assert hang_timeout(cfg(hang_ceiling=25.0), (10.0, 10.0, 10.0)) == 25.0  # ceiling


class TestHangRule:
    def test_stuck_step_is_hung_within_timeout_plus_one_tick(self):
        """Steps every 10 s, then none: one trainer_hung decision 30 s (3 x 10 s) after the last
        advance, at the first 5 s tick past it, and no other decision."""
        samples = [tick(10.0 * i, 100 + i) for i in range(6)]  # advances at 0..50
        samples += [tick(50.0 + 5.0 * k, 105) for k in range(1, 9)]  # 55..90, stuck
        state, per_tick = drive(cfg(), samples)
        assert hangs(per_tick) == [6 + 5]  # elapsed 80 = 50 + 30
        decision = per_tick[11][0]
        assert (decision.reason, decision.data["step"], decision.data["stuck_s"],
                decision.data["timeout_s"]) == (TRAINER_HUNG, 105, 30.0, 30.0)
        assert sum(len(ds) for ds in per_tick) == 1  # said once per episode
        assert state.step_intervals == (10.0, 10.0, 10.0, 10.0)

    def test_slowly_growing_step_time_is_never_hung(self):
        """Step time from 2 s growing 0.5 % a step for 400 steps, then doubled (a larger batch):
        ticks every second, no hang."""
        samples = []
        t, step, interval = 0.0, 0, 2.0
        for i in range(400):
            interval = interval * 1.005 * (2.0 if i == 300 else 1.0)
            end = t + interval
            while t + 1.0 < end:  # ticks that see no progress
                t += 1.0
                samples.append(tick(t, step))
            t = end
            step += 1
            samples.append(tick(t, step))
        _, per_tick = drive(cfg(hang_floor=1.0), samples)
        assert interval > 2 * 2.0 * 1.005 ** 300  # the series really drifted and jumped
        assert hangs(per_tick) == []

    def test_a_checkpoint_save_is_not_a_hang(self):
        """State saving (or save.lock held) for 200 s is not a hang, and is not learned from."""
        samples = [tick(10.0 * i, 100 + i) for i in range(6)]
        samples += [tick(50.0 + 10.0 * k, 105, state="saving") for k in range(1, 11)]  # to 150
        samples += [tick(150.0 + 10.0 * k, 105, saving=True) for k in range(1, 11)]  # to 250
        samples += [tick(260.0, 106), tick(270.0, 107)]
        state, per_tick = drive(cfg(), samples)
        assert hangs(per_tick) == []
        assert state.step_intervals == (10.0,) * 5  # 250 -> 260 spans the save: not learned

    def test_a_hung_trainer_is_not_idle(self):
        """With every GPU idle and the step stuck, the trainer is hung: no gpu_idle warning and
        no end of the runtime (a hung trainer is alive), for 10 minutes."""
        idle = (gpu(0, util=0.0),)
        samples = [tick(10.0 * i, 100 + i, gpus=(gpu(0, util=90.0),)) for i in range(6)]
        samples += [tick(50.0 + 10.0 * k, 105, gpus=idle) for k in range(1, 61)]
        _, per_tick = drive(cfg(gpu_idle_after=10.0), samples)
        reasons = [d.reason for ds in per_tick for d in ds]
        assert reasons == [TRAINER_HUNG]

    def test_learned_intervals_survive_a_daemon_restart_and_a_new_trainer(self):
        """The state's JSON keeps the intervals; a new trainer pid starts its own progress count
        with them, so its hang is called at the learned 30 s, not after re-learning."""
        state, _ = drive(cfg(), [tick(10.0 * i, 100 + i) for i in range(5)])
        state = PolicyState.from_json(state.to_json())
        assert state.step_intervals == (10.0,) * 3  # the first advance only starts the count
        samples = [tick(100.0, 0, pid=7), tick(110.0, 1, pid=7)]
        samples += [tick(110.0 + 5.0 * k, 1, pid=7) for k in range(1, 8)]
        _, per_tick = drive(cfg(), samples, state)
        assert hangs(per_tick) == [2 + 5]  # 140 = 110 + 30
