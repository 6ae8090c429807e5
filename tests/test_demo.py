"""session-watchdog demo: its self-check, its sizing from measured figures, its messages (issue 11).

The whole demo (real trainer, real watchdog) runs in tests/test_e2e.py::TestDemo; these tests read
hand-written logs, so every number is a literal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from session_watchdog import cli, demo

DRY = "dry run: would now run shutdown -h now"


def sample(elapsed: float, step: int, *, ckpt_step: int = 0, state: str = "running",
           alive: bool = True) -> Dict[str, Any]:
    ckpt = {"path": f"/d/ckpt-{ckpt_step}.pt", "step": ckpt_step} if ckpt_step else None
    return {"event": "sample", "elapsed_s": elapsed,
            "trainer": {"alive": alive, "state": state, "step": step, "checkpoint": ckpt,
                        "step_time_s": 0.25}}


def decision(kind: str, reason: str, **kw: Any) -> Dict[str, Any]:
    return {"event": "decision", "kind": kind, "reason": reason, **kw}


def first_session(stop_acked: bool = True, outcome: str = "training_stopped") -> List[Dict[str, Any]]:
    return [
        {"event": "daemon_started", "budget_s": 40.0},
        sample(1.0, 10),
        decision("request", "ram_pressure", action="checkpoint", seq=0),  # no lead: not the limit's
        sample(30.0, 100),
        decision("request", "session_limit", action="checkpoint", seq=1, lead_s=10.1),
        sample(31.0, 104, ckpt_step=104),
        decision("ack", "request_acked", action="checkpoint", seq=1),
        sample(36.0, 120, ckpt_step=104),
        decision("request", "session_limit", action="stop", seq=2),
        sample(37.0, 124, ckpt_step=124, state="stopped"),
        *([decision("ack", "request_acked", action="stop", seq=2)] if stop_acked else []),
        sample(38.0, 124, ckpt_step=124, state="stopped", alive=False),
        decision("info" if outcome == "training_stopped" else "warn", outcome),
    ]


def completing_session(budget: float, first_step: int = 125) -> List[Dict[str, Any]]:
    return [
        {"event": "daemon_started", "budget_s": budget},
        sample(1.0, first_step, ckpt_step=124),
        decision("request", "ram_pressure", action="checkpoint", seq=1),
        {"event": "action", "step": "request_written", "reason": "ram_pressure"},  # not an end step
        sample(9.0, 480, ckpt_step=480, state="completed", alive=False),
        decision("end", "training_complete"),
        *({"event": "action", "step": step, "reason": "training_complete"}
          for step in ("end_verify", "end_persist", "end_locks", "end_grace")),
        {"event": "action", "step": "end_dry_run", "reason": "training_complete", "message": DRY},
    ]


def write_log(path: Path, *sessions: List[Dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for session in sessions for e in session))
    return path


class TestSelfCheck:
    def test_a_complete_log_is_told_step_by_step(self, tmp_path):
        """Checkpoint, stop, planned-stop note, resume at the stopped step, completion, dry-run end."""
        log = write_log(tmp_path / "w.jsonl", first_session(), completing_session(60.0))
        assert demo.summarize(log, 40.0, [75, 0]) == [
            "session 1: checkpoint requested at 30.0s of 40s (lead 10.1s), stop requested at 36.0s, "
            "acknowledged; the trainer stopped at step 124 with exit code 75 (logged as a planned "
            "stop, not a failure)",
            "session 2 (1m00s budget): resumed from the checkpoint at step 124 (first step seen 125), "
            "completed at step 480",
            f"end of runtime: end_verify -> end_persist -> end_locks -> end_grace -> end_dry_run; {DRY}",
        ]

    def test_a_runtime_stopped_again_is_followed_by_the_next(self, tmp_path):
        """A middle runtime that was stopped too: told as such, and the last one resumes from it."""
        middle = [{"event": "daemon_started", "budget_s": 50.0}, sample(1.0, 125, ckpt_step=124),
                  sample(40.0, 300, ckpt_step=300, state="stopped", alive=False)]
        log = write_log(tmp_path / "w.jsonl", first_session(), middle, completing_session(70.0, 301))
        lines = demo.summarize(log, 40.0, [75, 75, 0])
        assert lines[1:3] == [
            "session 2 (50s budget): resumed from the checkpoint at step 124 (first step seen 125), "
            "stopped again at step 300 (the machine slowed down); a fresh runtime went on",
            "session 3 (1m10s budget): resumed from the checkpoint at step 300 (first step seen 301), "
            "completed at step 480",
        ]

    @pytest.mark.parametrize("sessions, codes, message", [
        ([first_session(stop_acked=False), completing_session(60.0)], [75, 0],
         "the trainer did not acknowledge the stop request"),
        ([first_session(outcome="training_failed"), completing_session(60.0)], [75, 0],
         "the first session did not log the planned stop as training_stopped (decisions: "
         "['ram_pressure', 'session_limit', 'request_acked', 'session_limit', 'request_acked', "
         "'training_failed'])"),
        ([first_session(), completing_session(60.0, first_step=100)], [75, 0],
         "session 2 did not resume from step 124"),
        ([first_session(), completing_session(60.0)[:-1]], [75, 0],
         "no dry-run end action in session 2 (steps: ['end_verify', 'end_persist', 'end_locks', "
         "'end_grace'])"),
        ([first_session(), completing_session(60.0)], [0, 0], "the first trainer exited 0, expected 75"),
        ([first_session()], [75, 0], "expected 2 watchdog sessions in the log, found 1"),
    ])
    def test_a_missing_step_is_named(self, tmp_path, sessions, codes, message):
        """The self-check raises naming the first step the log does not show."""
        log = write_log(tmp_path / "w.jsonl", *sessions)
        with pytest.raises(AssertionError) as err:
            demo.summarize(log, 40.0, codes)
        assert str(err.value) == message


class TestSizing:
    def test_the_pace_is_measured_over_the_session(self):
        """Seconds per step between the first and last live samples: (31 - 1) s / (110 - 10) steps."""
        assert demo.measured_step_s([sample(1.0, 10), sample(31.0, 110),
                                     sample(33.0, 110, alive=False)]) == pytest.approx(0.3)

    def test_too_few_steps_fall_back_to_the_trainers_own_figure(self):
        """Under 5 steps measured: the step_time_s the trainer reported."""
        assert demo.measured_step_s([sample(1.0, 10), sample(2.0, 12)]) == 0.25

    @pytest.mark.parametrize("left, step_s, expected", [
        (300, 0.15, 180.0),   # 4 x 300 x 0.15 = 180
        (301, 0.15, 190.0),   # 180.6, up to the next 10 s
        (10, 0.15, 40.0),     # never less than one session
        (300, 0.001, 40.0),   # the 0.02 s floor: 24 s -> one session
        (300, None, 600.0),   # nothing measured: 0.5 s per step
    ])
    def test_a_later_budget_is_four_times_the_remaining_work(self, left, step_s, expected):
        """Budget = max(session, 4 x steps left x measured time per step), rounded up to 10 s."""
        assert demo.next_budget(40.0, left, step_s) == expected


class TestCommandLine:
    @pytest.mark.parametrize("argv, message", [
        (["--steps", "0"], "session-watchdog: error: --steps must be at least 1"),
        (["--step-sleep", "-1"], "session-watchdog: error: --step-sleep must be 0 or more seconds"),
        (["--session", "10s"], "session-watchdog: error: --session must be at least 20s (the margins "
                               "need room)"),
    ])
    def test_bad_arguments_are_one_line_and_exit_2(self, capsys, argv, message):
        """Bad input: one line naming the problem, exit code 2, nothing started."""
        assert cli.main(["demo", *argv]) == 2
        assert capsys.readouterr().err.splitlines() == [message]

    def test_a_failure_says_what_went_wrong_and_what_to_do(self, tmp_path, capsys, monkeypatch):
        """Exit 1 and three lines on stderr: what went wrong, what to do, where the log is."""
        def runtimes(base, session_s, steps, step_sleep):
            write_log(base / "watchdog.jsonl", first_session(stop_acked=False), completing_session(60.0))
            return [75, 0]

        monkeypatch.setattr(demo, "_train", runtimes)  # the runtimes themselves run in test_e2e
        assert cli.main(["demo", "--dir", str(tmp_path)]) == 1
        log = tmp_path / "watchdog.jsonl"
        assert capsys.readouterr().err.strip().splitlines() == [
            "demo failed: the trainer did not acknowledge the stop request (trainer exit codes [75, 0])",
            "  what to do: this is a bug: please report it with the log file",
            f"  log: {log} (session-watchdog report {log})",
        ]

    def test_a_directory_the_demo_did_not_make_is_never_cleared(self, tmp_path, capsys):
        """A non-empty --dir without the demo's marker: exit 2, the files stay."""
        (tmp_path / "ckpt.pt").write_bytes(b"weights")
        assert cli.main(["demo", "--dir", str(tmp_path)]) == 2
        assert (tmp_path / "ckpt.pt").read_bytes() == b"weights"
        assert capsys.readouterr().err.splitlines() == [
            f"session-watchdog: error: {tmp_path} is not empty and was not made by the demo; give "
            "an empty or new --dir"]
