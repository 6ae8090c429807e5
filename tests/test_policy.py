"""policy.decide: tables of literal numbers (STYLE.md #1)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
from fakes import GiB, gpu, host, sample, status

from session_watchdog.config import OFF, Config
from session_watchdog.policy import Decision, PolicyState, decide, lead_time
from session_watchdog.probes import DiskReading

NOW = 1_800_000_000.0


def cfg(**overrides) -> Config:
    """A resolved config with round numbers: 1 h budget, margin 5 m, stop margin 1 m, k = 2."""
    base = dict(platform="generic", max_session=3600.0, margin=300.0, stop_margin=60.0,
                save_factor=2.0, default_checkpoint_time=60.0, default_step_time=10.0,
                warn_before=(3600.0, 900.0), resend_after=120.0, checkpoint_every=OFF,
                idle_limit=OFF, idle_warn=OFF, gpu_idle_after=600.0, trainer_stall_after=600.0,
                ram_min_available_pct=5.0, disk_margin=GiB)
    base.update(overrides)
    return Config(**base)


def at(elapsed: float, **kw) -> object:
    """A sample ``elapsed`` seconds into the session; the trainer's heartbeat is fresh."""
    kw.setdefault("trainer_status", status(heartbeat=NOW + elapsed))
    return sample(now=NOW + elapsed, elapsed=elapsed, **kw)


def run(config: Config, samples, state: Optional[PolicyState] = None
        ) -> Tuple[PolicyState, List[List[Decision]]]:
    state = state or PolicyState()
    out = []
    for s in samples:
        state, decisions = decide(config, state, s)
        out.append(decisions)
    return state, out


def kinds(decisions: List[Decision]) -> List[Tuple[str, str, Optional[str]]]:
    return [(d.kind, d.reason, d.action) for d in decisions]


class TestLeadTime:
    @pytest.mark.parametrize("ckpt_s, step_s, lead, stop_lead", [
        (None, None, 300 + 2 * 60 + 10, 60 + 60 + 10),   # nothing measured: configured defaults
        (20.0, 0.5, 300 + 2 * 20 + 0.5, 60 + 20 + 0.5),  # measured save and step time
        (100.0, 0.5, 300 + 2 * 100 + 0.5, 60 + 100 + 0.5),  # a slower save: more lead
    ])
    def test_lead_uses_measured_checkpoint_and_step_time(self, ckpt_s, step_s, lead, stop_lead):
        """lead = margin + k x checkpoint duration + step time, measured when the trainer says so."""
        st = status(heartbeat=NOW, step_time_s=step_s,
                    ckpt_at=None if ckpt_s is None else NOW, ckpt_duration_s=ckpt_s or 0.0)
        got = lead_time(cfg(), sample(now=NOW, trainer_status=st))
        assert (got.lead_s, got.stop_lead_s) == (lead, stop_lead)


    def test_distributed_agreement_delay_adds_to_both_leads(self):
        """Ranks act at their next all-reduce: agree_delay_s (here 25 s) moves both requests earlier."""
        st = status(heartbeat=NOW, step_time_s=0.5, ckpt_at=NOW, ckpt_duration_s=20.0,
                    extra={"agree_delay_s": 25.0})
        got = lead_time(cfg(), sample(now=NOW, trainer_status=st))
        assert (got.lead_s, got.stop_lead_s, got.agree_s) == (340.5 + 25.0, 80.5 + 25.0, 25.0)

    @pytest.mark.parametrize("bad", [float("nan"), -3.0, True, "25"])
    def test_a_bad_agreement_delay_is_ignored(self, bad):
        """A non-finite, negative or non-numeric agree_delay_s adds nothing."""
        st = status(heartbeat=NOW, step_time_s=0.5, extra={"agree_delay_s": bad})
        assert lead_time(cfg(), sample(now=NOW, trainer_status=st)).agree_s == 0.0


class TestSessionBudget:
    def _status(self, elapsed: float, **kw):
        return status(heartbeat=NOW + elapsed, step_time_s=0.5, ckpt_at=NOW - 5000,
                      ckpt_duration_s=kw.pop("ckpt_duration_s", 20.0), **kw)

    @pytest.mark.parametrize("elapsed, expected", [
        (3259.4, []),                                          # remaining 340.6 > lead 340.5
        (3259.5, [("request", "session_limit", "checkpoint")]),  # remaining == lead
        (3519.5, [("request", "session_limit", "stop")]),      # remaining == stop lead 80.5
    ])
    def test_requests_go_out_at_deadline_minus_lead(self, elapsed, expected):
        """The checkpoint request fires at deadline - lead and the stop at deadline - stop lead."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        _, (decisions,) = run(cfg(), [at(elapsed, trainer_status=self._status(elapsed))], state)
        assert kinds(decisions) == expected

    def test_slower_checkpoint_moves_the_request_earlier(self):
        """With a 100 s save the checkpoint request fires at 3600 - 500.5 = 3099.5 s."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        st = self._status(3099.5, ckpt_duration_s=100.0)
        _, (early,) = run(cfg(), [at(3099.4, trainer_status=st)], state)
        _, (due,) = run(cfg(), [at(3099.5, trainer_status=st)], state)
        assert kinds(early) == [] and kinds(due) == [("request", "session_limit", "checkpoint")]

    def test_request_carries_seq_and_wall_deadline(self):
        """The checkpoint request is seq 1 and must be done by deadline - stop lead (wall clock)."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        new_state, (decisions,) = run(cfg(), [at(3300.0, trainer_status=self._status(3300.0))], state)
        (req,) = decisions
        assert (req.seq, req.deadline) == (1, NOW + 3600.0 - 80.5)
        assert new_state.outstanding is not None and new_state.outstanding.seq == 1

    def test_warnings_at_sixty_and_fifteen_minutes_once_each(self):
        """One warning as 60 min remain, one as 15 min remain, none repeated."""
        _, per_tick = run(cfg(), [at(e) for e in (0.0, 5.0, 2699.0, 2700.0, 2705.0)])
        assert [kinds(d) for d in per_tick] == [
            [("warn", "session_limit", None)], [], [], [("warn", "session_limit", None)], []]

    def test_starting_late_warns_once_for_the_most_urgent_threshold(self):
        """A watchdog started with 400 s left warns once and asks for a checkpoint (lead 420.5 s)."""
        _, per_tick = run(cfg(), [at(3200.0), at(3205.0)])
        assert [kinds(d) for d in per_tick] == [
            [("warn", "session_limit", None), ("request", "session_limit", "checkpoint")], []]

    def test_request_is_not_repeated_every_tick(self):
        """Once sent, the session checkpoint request is not sent again on the next ticks."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        _, per_tick = run(cfg(), [at(e, trainer_status=self._status(e)) for e in (3260, 3265, 3270)], state)
        assert [len(d) for d in per_tick] == [1, 0, 0]

    def test_no_budget_no_session_requests(self):
        """With no session budget (generic host) nothing about the session is decided."""
        _, per_tick = run(cfg(max_session=OFF), [at(e) for e in (0.0, 100000.0)])
        assert per_tick == [[], []]

    def test_no_live_trainer_no_requests(self):
        """Requests need a live trainer (run.lock held); warnings still go out."""
        _, (decisions,) = run(cfg(), [at(3300.0, alive=False)])
        assert kinds(decisions) == [("warn", "session_limit", None)]


class TestAcknowledgements:
    def test_ack_clears_the_outstanding_request(self):
        """acked_seq >= seq in trainer.json acknowledges the request; no re-send follows."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        state, (first,) = run(cfg(), [at(3260.0)], state)
        assert kinds(first) == [("request", "session_limit", "checkpoint")]
        acked = status(heartbeat=NOW + 3270, acked_seq=1)
        state, per_tick = run(cfg(), [at(3270.0, trainer_status=acked), at(3400.0, trainer_status=acked)],
                              state)
        assert kinds(per_tick[0]) == [("ack", "request_acked", "checkpoint")]
        assert per_tick[0][0].data["latency_s"] == 10.0
        assert state.outstanding is None and per_tick[1] == []

    @pytest.mark.parametrize("elapsed, resends", [(3379.0, 0), (3380.0, 1)])
    def test_unacknowledged_request_is_resent_after_the_timeout(self, elapsed, resends):
        """An unacknowledged request is re-sent with the same seq after resend_after (120 s)."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        state, _ = run(cfg(), [at(3260.0)], state)
        state, (decisions,) = run(cfg(), [at(elapsed)], state)
        assert [(d.kind, d.seq) for d in decisions] == ([("resend", 1)] if resends else [])
        assert state.outstanding is not None and state.outstanding.resends == resends

    def test_state_round_trips_through_json(self):
        """A restarted daemon rebuilds the same state, so it does not re-issue an acked request."""
        state, _ = run(cfg(), [at(0.0), at(3260.0)])
        again = PolicyState.from_json(state.to_json())
        assert again == state
        _, (decisions,) = run(cfg(), [at(3265.0)], again)
        assert decisions == []

    def test_the_first_trainer_seen_by_pid_keeps_its_requests(self):
        """A request sent before the trainer's first trainer.json is not sent twice when its pid appears."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        state, (first,) = run(cfg(), [sample(now=NOW + 3300, elapsed=3300.0, alive=True, trainer_status=None)], state)
        state, (second,) = run(cfg(), [at(3301.0)], state)
        assert [(d.kind, d.seq) for d in first] == [("request", 1)] and second == []
        assert state.outstanding.seq == 1 and state.trainer_pid == 4242

    def test_a_new_trainer_process_is_asked_again(self):
        """After a restart of the trainer (new pid), the session rules apply to it again."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        state, _ = run(cfg(), [at(3260.0)], state)
        new = status(pid=5000, heartbeat=NOW + 3300)
        _, (decisions,) = run(cfg(), [at(3300.0, trainer_status=new)], state)
        assert kinds(decisions) == [("request", "session_limit", "checkpoint")]
        assert decisions[0].seq == 2

    def test_a_new_session_in_the_same_process_is_asked_again(self):
        """A second Session in the same notebook kernel (same pid, a later session_started) is
        a new trainer: the session rules apply to it again; a pid-only state adopts it."""
        state = PolicyState(done=frozenset({"session_warn_3600", "session_warn_900"}))
        first = status(heartbeat=NOW + 3260, extra={"session_started": NOW + 10.0})
        state, _ = run(cfg(), [at(3260.0, trainer_status=first)], state)
        assert (state.trainer_pid, state.trainer_started) == (4242, NOW + 10.0)
        second = status(heartbeat=NOW + 3300, extra={"session_started": NOW + 3290.0})
        again, (decisions,) = run(cfg(), [at(3300.0, trainer_status=second)], state)
        assert kinds(decisions) == [("request", "session_limit", "checkpoint")]
        assert decisions[0].seq == 2 and again.trainer_started == NOW + 3290.0
        older = {k: v for k, v in state.to_json().items() if k != "trainer_started"}
        adopted, (quiet,) = run(cfg(), [at(3265.0, trainer_status=first)],
                                PolicyState.from_json(older))
        assert quiet == [] and adopted.trainer_started == NOW + 10.0

    def test_a_fixed_rerun_in_the_same_kernel_ends_the_runtime(self):
        """A failed Session, then a fixed re-run in the same kernel that completes: the failure
        was the first run's, so the completed run ends the runtime."""
        config = cfg(max_session=OFF, end_when_done=True, end_on_failure=False)
        ends = []
        state = PolicyState()
        for elapsed, alive, state_, started in [(0.0, True, "running", NOW - 5.0),
                                                (600.0, False, "failed", NOW - 5.0),
                                                (1200.0, True, "running", NOW + 1190.0),
                                                (4800.0, False, "completed", NOW + 1190.0)]:
            trainer = status(pid=777, state=state_, heartbeat=NOW + elapsed,
                             extra={"session_started": started})
            state, decisions = decide(config, state, at(elapsed, alive=alive, trainer_status=trainer,
                                                        notebook_idle_s=5.0))
            ends += [(elapsed, d.kind, d.reason) for d in decisions
                     if d.reason.startswith("training_")]
        assert ends == [(600.0, "warn", "training_failed"), (4800.0, "end", "training_complete")]
        assert not state.failed


class TestRamPressure:
    def test_low_available_ram_requests_a_checkpoint_once_per_episode(self):
        """Available 0.5 of 16 GiB (3.1 % < 5 %) -> warn + checkpoint; not again until it recovers."""
        low, ok = host(available=GiB // 2), host(available=8 * GiB)
        acked = status(heartbeat=NOW + 20, acked_seq=1)
        _, per_tick = run(cfg(max_session=OFF), [
            at(10.0, host_reading=low), at(15.0, host_reading=low),
            at(20.0, host_reading=ok, trainer_status=acked), at(25.0, host_reading=low, trainer_status=acked)])
        assert [kinds(d) for d in per_tick] == [
            [("warn", "ram_pressure", None), ("request", "ram_pressure", "checkpoint")],
            [], [("ack", "request_acked", "checkpoint")],
            [("warn", "ram_pressure", None), ("request", "ram_pressure", "checkpoint")]]

    def test_an_unacknowledged_checkpoint_request_covers_a_new_one(self):
        """A second pressure episode while request 1 is unanswered sends no second request."""
        low, ok = host(available=GiB // 2), host(available=8 * GiB)
        _, per_tick = run(cfg(max_session=OFF), [
            at(10.0, host_reading=low), at(20.0, host_reading=ok), at(25.0, host_reading=low)])
        assert [kinds(d) for d in per_tick][2] == [("warn", "ram_pressure", None)]

    def test_threshold_is_strictly_below(self):
        """Exactly 5 % available is not pressure."""
        _, (decisions,) = run(cfg(max_session=OFF), [at(1.0, host_reading=host(total=100 * GiB,
                                                                                   available=5 * GiB))])
        assert decisions == []


class TestDiskLow:
    @pytest.mark.parametrize("free, level", [
        (int(5.5 * GiB), None),        # >= 2 x 2 GiB + 1 GiB margin
        (int(4.5 * GiB), "low"),       # < 2 x checkpoint + margin
        (int(1.5 * GiB), "critical"),  # < 1 x checkpoint
    ])
    def test_free_space_against_last_checkpoint_size(self, free, level):
        """free < 2 x last checkpoint + margin warns; < 1 x is critical."""
        st = status(heartbeat=NOW + 1, ckpt_at=NOW, ckpt_bytes=2 * GiB)
        disk = DiskReading("/content", free, 100 * GiB)
        _, (decisions,) = run(cfg(max_session=OFF), [at(1.0, trainer_status=st, disks=[disk])])
        assert [d.data.get("level") for d in decisions] == ([level] if level else [])

    def test_sharded_checkpoint_size_counts_all_its_files(self):
        """checkpoint_total_bytes (a sharded step directory) is the size that must fit, not the marker's."""
        st = status(heartbeat=NOW + 1, ckpt_at=NOW, ckpt_bytes=400, extra={"checkpoint_total_bytes": 2 * GiB})
        disk = DiskReading("/content", int(1.5 * GiB), 100 * GiB)
        _, (decisions,) = run(cfg(max_session=OFF), [at(1.0, trainer_status=st, disks=[disk])])
        assert [d.data.get("level") for d in decisions] == ["critical"]

    def test_without_a_checkpoint_only_the_margin_counts(self):
        """Before any checkpoint, free space under the 1 GiB margin warns."""
        disks = [DiskReading("/a", GiB - 1, 10 * GiB), DiskReading("/b", GiB, 10 * GiB)]
        _, (decisions,) = run(cfg(max_session=OFF), [at(1.0, disks=disks)])
        assert [(d.reason, d.data["path"]) for d in decisions] == [("disk_low", "/a")]


class TestGpuIdle:
    def test_all_gpus_idle_for_the_threshold_warns(self):
        """Every GPU below 5 % for 600 s warns once."""
        idle = [gpu(0, util=2.0), gpu(1, util=4.9)]
        _, per_tick = run(cfg(max_session=OFF), [at(e, gpus=idle) for e in (0.0, 599.0, 600.0, 700.0)])
        assert [kinds(d) for d in per_tick] == [[], [], [("warn", "gpu_idle", None)], []]

    def test_an_unknown_reading_is_not_idle_and_resets_the_timer(self):
        """A None utilisation resets the idle clock: the warning comes 600 s after it, not before."""
        idle, unknown = [gpu(0, util=1.0)], [gpu(0, util=None)]
        _, per_tick = run(cfg(max_session=OFF), [
            at(0.0, gpus=idle), at(300.0, gpus=unknown), at(600.0, gpus=idle),
            at(1199.0, gpus=idle), at(1200.0, gpus=idle)])
        assert [kinds(d) for d in per_tick] == [[], [], [], [], [("warn", "gpu_idle", None)]]

    def test_one_busy_gpu_means_not_idle(self):
        """One GPU at 50 % keeps the machine out of the idle state."""
        state, _ = run(cfg(max_session=OFF), [at(0.0, gpus=[gpu(0, util=0.0), gpu(1, util=50.0)])])
        assert state.gpu_idle_since is None

    def test_no_gpus_is_unknown_not_idle(self):
        """No NVML (no GPUs listed) never counts as idle."""
        state, _ = run(cfg(max_session=OFF), [at(0.0, gpus=[]), at(10_000.0, gpus=[])])
        assert state.gpu_idle_since is None

    def test_a_tick_that_changes_nothing_returns_the_same_state(self):
        """A steady busy tick rebuilds no state: decide() hands back the very object it got."""
        busy = [gpu(0, util=90.0)]
        state, _ = run(cfg(max_session=OFF), [at(0.0, gpus=busy), at(5.0, gpus=busy)])
        again, decisions = decide(cfg(max_session=OFF), state, at(5.0, gpus=busy))
        assert decisions == [] and again is state


class TestPeriodicAndStall:
    def test_periodic_checkpoint_every_interval(self):
        """checkpoint_every 1800 s: a request at 1800 s, then 1800 s after that request."""
        c = cfg(max_session=OFF, checkpoint_every=1800.0)

        def acked(e):
            return at(e, trainer_status=status(heartbeat=NOW + e, acked_seq=1))
        _, per_tick = run(c, [at(0.0), at(1799.0), at(1800.0), acked(1810.0), acked(3599.0), acked(3600.0)])
        assert [kinds(d) for d in per_tick] == [
            [], [], [("request", "periodic", "checkpoint")], [("ack", "request_acked", "checkpoint")],
            [], [("request", "periodic", "checkpoint")]]

    def test_a_checkpoint_the_trainer_made_itself_resets_the_period(self):
        """A checkpoint at 1000 s (trainer's own) moves the next periodic request to 2800 s."""
        c = cfg(max_session=OFF, checkpoint_every=1800.0)

        def saved(e):
            return at(e, trainer_status=status(heartbeat=NOW + e, ckpt_at=NOW + 1000))
        _, per_tick = run(c, [at(0.0), saved(1000.0), saved(2799.0), saved(2800.0)])
        assert [kinds(d) for d in per_tick][-2:] == [[], [("request", "periodic", "checkpoint")]]

    def test_stalled_heartbeat_warns(self):
        """A heartbeat 601 s old warns trainer_stalled once."""
        old = status(heartbeat=NOW)
        _, per_tick = run(cfg(max_session=OFF), [at(600.0, trainer_status=old),
                                                 at(601.0, trainer_status=old), at(700.0, trainer_status=old)])
        assert [kinds(d) for d in per_tick] == [[], [("warn", "trainer_stalled", None)], []]


class TestNotebookIdle:
    def test_idle_warning_then_checkpoint_before_reclaim(self):
        """idle_warn 30 m warns; at idle_limit 90 m - lead 420.5 s a checkpoint is requested."""
        c = cfg(max_session=OFF, idle_warn=1800.0, idle_limit=5400.0)
        _, per_tick = run(c, [at(1.0, notebook_idle_s=1799.0), at(2.0, notebook_idle_s=1800.0),
                              at(3.0, notebook_idle_s=4979.4), at(4.0, notebook_idle_s=4979.5),
                              at(5.0, notebook_idle_s=4985.0)])
        assert [kinds(d) for d in per_tick] == [
            [], [("warn", "idle_reclaim", None)], [], [("request", "idle_reclaim", "checkpoint")], []]

    def test_a_running_cell_resets_the_idle_episode(self):
        """After a cell ran (idle 0), a new idle stretch warns again."""
        c = cfg(max_session=OFF, idle_warn=1800.0, idle_limit=5400.0)
        _, per_tick = run(c, [at(1.0, notebook_idle_s=1800.0), at(2.0, notebook_idle_s=0.0),
                              at(3.0, notebook_idle_s=1800.0)])
        assert [len(d) for d in per_tick] == [1, 0, 1]

    def test_one_idle_period_gets_one_checkpoint_request_even_when_the_lead_shrinks(self):
        """A fast first checkpoint shrinks the lead (430 -> 310.5 s) and moves the threshold past
        the idle time; the same idle period must not request a second checkpoint (issue 16)."""
        c = cfg(max_session=OFF, idle_limit=5400.0)
        fast = dict(step_time_s=0.5, ckpt_at=NOW + 80.0, ckpt_duration_s=5.0, acked_seq=1)

        def tick(elapsed: float, idle: float, **kw):
            return at(elapsed, notebook_idle_s=idle,
                      trainer_status=status(heartbeat=NOW + elapsed, **kw))

        _, per_tick = run(c, [
            tick(70.0, 4970.0, step_time_s=None),  # lead 300 + 2 x 60 + 10 = 430: request
            tick(85.0, 4985.0, **fast),            # acked; lead 310.5, threshold 5089.5
            tick(190.0, 5090.0, **fast),           # same idle period: no second request
            tick(200.0, 5100.0, **fast),
        ])
        assert [kinds(d) for d in per_tick] == [
            [("request", "idle_reclaim", "checkpoint")], [("ack", "request_acked", "checkpoint")],
            [], []]

    def test_a_new_idle_period_after_a_request_gets_its_own_request(self):
        """A cell that ran between two ticks starts a new idle period: it may be asked again."""
        c = cfg(max_session=OFF, idle_limit=5400.0)

        def tick(elapsed: float, idle: float, acked: int = 0):
            return at(elapsed, notebook_idle_s=idle,
                      trainer_status=status(heartbeat=NOW + elapsed, step_time_s=None,
                                            acked_seq=acked))

        _, per_tick = run(c, [tick(70.0, 4970.0), tick(80.0, 4980.0, 1), tick(90.0, 5.0, 1),
                              tick(5055.0, 4970.0, 1)])
        assert [[k for k, _, _ in kinds(d)] for d in per_tick] == [
            ["request"], ["ack"], [], ["request"]]


class TestNoTrainer:
    """A watched command that never builds a Session is named once, early (issue 11)."""

    @staticmethod
    def _child(elapsed: float, alive: bool = False, running: bool = True):
        import dataclasses

        return dataclasses.replace(at(elapsed, alive=alive, trainer_status=None),
                                   child_running=running)

    @pytest.mark.parametrize("timeline, warned_at", [
        # (elapsed, trainer alive) per tick: the window counts from the first sight of the child
        ([(100, False), (160, False), (219, False), (220, False), (400, False)], [220]),
        ([(0, False), (60, True), (300, False)], []),  # connected once: never warned
        ([(0, False), (119, False), (121, True)], []),  # connected inside the window
    ])
    def test_warned_once_after_the_window(self, timeline, warned_at):
        """No run.lock holder 120 s after the command started: one no_trainer warning."""
        _, out = run(cfg(), [self._child(e, alive=a) for e, a in timeline])
        warned = [e for (e, _), decisions in zip(timeline, out)
                  for d in decisions if d.reason == "no_trainer"]
        assert warned == warned_at

    def test_the_warning_says_what_is_lost_and_where_to_look(self):
        """The message says the watchdog cannot ask for a checkpoint and points to the README."""
        _, out = run(cfg(), [self._child(0), self._child(150)])
        (decision,) = [d for d in out[1] if d.reason == "no_trainer"]
        assert (decision.kind, dict(decision.data)) == ("warn", {"waited_s": 150.0})
        assert decision.message == (
            "no trainer has connected in 2m30s: the watchdog can end the runtime but cannot ask "
            "the command for a checkpoint before a limit; build a session_watchdog.trainer.Session "
            'in the training script (README: "In your training loop")')

    def test_no_warning_without_a_watched_command(self):
        """Plain `run` or a notebook (no child): no trainer is expected, nothing is said."""
        _, out = run(cfg(), [self._child(e, running=False) for e in (0, 200, 400)])
        assert not [d for ds in out for d in ds if d.reason == "no_trainer"]

    def test_a_new_command_is_given_its_own_window(self):
        """The window restarts when the command is seen again after it ended."""
        state, _ = run(cfg(), [self._child(0), self._child(50, running=False)])
        assert state.child_since is None
        _, out = run(cfg(), [self._child(60), self._child(170), self._child(180)], state)
        assert [len([d for d in ds if d.reason == "no_trainer"]) for ds in out] == [0, 0, 1]

    def test_the_state_round_trips(self):
        """child_since survives a daemon restart (state.json)."""
        state, _ = run(cfg(), [self._child(42)])
        assert PolicyState.from_json(state.to_json()).child_since == 42.0
