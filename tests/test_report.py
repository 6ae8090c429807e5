"""report: golden summaries of logs written by the real daemon (scripted probe, fake clock)."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import structlog
from fakes import FakeClock

from session_watchdog import channel, log, platforms, report
from session_watchdog.config import Config
from session_watchdog.daemon import Watchdog
from session_watchdog.probes import DiskReading, GpuReading, HostReading, Sample, Times, TrainerReading

GiB = 2**30
WALL0 = 1_800_000_000.0
FIRST_S = 2400.0  # the daemon starts 40 min into a 1 h session
START = WALL0 - FIRST_S  # session start, epoch seconds
TICKS = 240  # one every 5 s: elapsed 2400 .. 3595


def report_clock() -> FakeClock:
    """The shared fake clock, started at this file's wall-clock origin."""
    return FakeClock(wall=WALL0, mono=500.0)


def ckpt(name: str, at_s: float, step: int, duration_s: float, size: int) -> channel.CheckpointInfo:
    return channel.CheckpointInfo(path=f"/ckpt/{name}.pt", seq=None, step=step, at=START + at_s,
                                  duration_s=duration_s, bytes=size, sha256="ab" * 32)


class SessionProbe:
    """The golden session, tick k at elapsed 2400 + 5k (see TestGoldenSession for the phases).

    k 0-143   training, GPU0 30 % / GPU1 20 % (input-bound), checkpoint A from before the log
    k 144-223 GPU0 90 % / GPU1 80 %; GPU0 memory 20 GiB at k 150; RAM 2 GiB available at k 100;
              one OOM kill from k 120; checkpoint request (seq 1) acked at k 173, checkpoint B
              seen from k 177; /content down to 6 GiB free from k 200; stop request (seq 2) at
              k 222, acked at k 223 (state stopping)
    k 224-239 GPUs idle (2 % / 1 %) except GPU1 unknown at k 230; trainer stopped with
              checkpoint C from k 226, exited from k 228; RAM unknown at k 5.
    """

    def __init__(self) -> None:
        self.k = 0

    def sample(self, times: Times) -> Sample:
        k = self.k
        self.k += 1
        high = k >= 144
        idle = k >= 224
        u0, u1 = (2.0, 1.0) if idle else (90.0, 80.0) if high else (30.0, 20.0)
        gpus = (
            GpuReading(0, "NVIDIA Test", "GPU-0", u0, (20 if k == 150 else 10) * GiB, 80 * GiB, 60.0, 300.0),
            GpuReading(1, "NVIDIA Test", "GPU-1", None if k == 230 else u1, 12 * GiB, 80 * GiB, 61.0, 290.0),
        )
        host = None if k == 5 else HostReading(16 * GiB, (2 if k == 100 else 8) * GiB, "cgroup2", 0, 0,
                                              50.0, 1 if k >= 120 else 0)
        disks = (DiskReading("/content", 6 * GiB if k >= 200 else 50 * 10**9, 100 * 10**9),
                 DiskReading("/ckpt", None, None, "timeout"))
        last = (ckpt("c", 3530.0, 2115, 40.0, 3 * GiB) if k >= 226 else
                ckpt("b", 3285.0, 1865, 30.0, 3 * GiB) if k >= 177 else
                ckpt("a", 2300.0, 1000, 20.0, 2 * GiB))
        state = "running" if k <= 222 else "stopping" if k <= 225 else "stopped"
        status = channel.TrainerStatus(
            pid=4242, start_time=1.0, state=state, step=min(1000 + 5 * k, 2115), epoch=1 + k // 100,
            step_time_s=1.0, acked_seq=2 if k >= 223 else 1 if k >= 173 else 0,
            last_checkpoint=last, heartbeat=times.now)
        return Sample(now=times.now, elapsed_s=times.elapsed_s, gpus=gpus, nvml="ok", host=host,
                      disks=disks, trainer=TrainerReading(k < 228, False, status))


def run_daemon(tmp: Path, probe: Any, ticks: int, *, stop: bool = True, max_bytes: int = 20 * 2**20,
               name: str = "log.jsonl", compress: bool = False) -> Path:
    """Drive the real Watchdog ``ticks`` times, 5 s apart; return the JSONL log it wrote."""
    path = tmp / name
    log.configure(path, console=None, max_bytes=max_bytes, backups=100, compress=compress)
    try:
        config = Config.build(run_dir=str(tmp / "run"), max_session="1h", interval="5s",
                              checkpoint_every="off", log_file=str(path))
        clock = report_clock()
        watchdog = Watchdog(config, platform=platforms.Platform("generic", ("test",)), probe=probe,
                            clock=clock, session_start=START)
        watchdog.acquire()
        for _ in range(ticks):
            watchdog.tick()
            clock.advance(5.0)
        if stop:
            watchdog.release()
    finally:
        log.close()
        structlog.reset_defaults()
    return path


@pytest.fixture(scope="module")
def golden_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_daemon(tmp_path_factory.mktemp("golden"), SessionProbe(), TICKS)


@pytest.fixture
def golden(golden_log: Path, tmp_path: Path) -> Path:
    """A private copy of the golden log (tests may append to it)."""
    return Path(shutil.copy(golden_log, tmp_path / "log.jsonl"))


def summary_of(*paths: Path, **kw: Any) -> Dict[str, Any]:
    return report.load(list(paths), **kw).summary


def without_files(summary: Dict[str, Any]) -> Dict[str, Any]:
    out = json.loads(json.dumps(summary))
    out["input"].pop("files")
    return out


def events(summary: Dict[str, Any]) -> List[tuple]:
    return [(e["at_s"], e["event"], e["kind"], e["reason"], e["action"], e["seq"])
            for e in summary["events"]]


# --------------------------------------------------------------------------------------------


class TestGoldenSession:
    def test_session_clock_and_budget(self, golden):
        """Start/end come from the session clock: 40 min in, last sample at 59m55s of 1 h."""
        s = summary_of(golden)["session"]
        assert s == {
            "platform": "generic", "start": START, "start_utc": "2027-01-15T07:20:00+00:00",
            "end": START + 3595, "end_utc": "2027-01-15T08:19:55+00:00", "first_sample_s": 2400.0,
            "elapsed_s": 3595.0, "budget_s": 3600.0, "used_pct": 99.86, "remaining_s": 5.0,
            "daemon_starts": 1, "daemon_stops": 1, "ticks_failed": 0, "ticks_missed": 0,
        }

    def test_gpu_statistics_leave_unknown_readings_out(self, golden):
        """Mean/p50/p95 over known readings only; a null utilisation is not 0 %."""
        assert summary_of(golden)["gpus"] == [
            # (144 x 30 + 80 x 90 + 16 x 2) / 240
            {"index": 0, "name": "NVIDIA Test", "samples": 240, "unknown_samples": 0,
             "util_mean_pct": 48.13, "util_p50_pct": 30.0, "util_p95_pct": 90.0,
             "mem_peak_bytes": 20 * GiB, "mem_total_bytes": 80 * GiB},
            # (144 x 20 + 80 x 80 + 15 x 1) / 239: the unknown reading at k 230 is left out
            {"index": 1, "name": "NVIDIA Test", "samples": 239, "unknown_samples": 1,
             "util_mean_pct": 38.89, "util_p50_pct": 20.0, "util_p95_pct": 80.0,
             "mem_peak_bytes": 12 * GiB, "mem_total_bytes": 80 * GiB},
        ]

    def test_gpu_idle_time_and_cost(self, golden):
        """Idle = every GPU known and < 5 %: 14 intervals of 5 s (k 224-238 but 230) = 70 s."""
        assert summary_of(golden, price_per_hour=3.6)["gpu_idle"] == {
            "threshold_pct": 5.0, "idle_s": 70.0, "known_s": 1190.0, "price_per_hour": 3.6,
            "price_source": "flag", "cost": 0.07,
        }

    def test_gpu_idle_without_a_price_shows_time_only(self, golden):
        """The generic platform has no default price: the cost is null, the time is there."""
        idle = summary_of(golden)["gpu_idle"]
        assert (idle["idle_s"], idle["price_per_hour"], idle["price_source"], idle["cost"]) == \
            (70.0, None, None, None)

    def test_ram_peak_and_oom_kills(self, golden):
        """Peak used = limit - available (14 of 16 GiB at k 100); the OOM counter rose by one."""
        assert summary_of(golden)["ram"] == {
            "source": "cgroup2", "limit_bytes": 16 * GiB, "peak_used_bytes": 14 * GiB,
            "peak_used_pct": 87.5, "peak_at_s": 2900.0, "oom_kills": 1, "oom_kills_counter": 1,
        }

    def test_disk_minimum_free_per_path(self, golden):
        """The first time the minimum was reached; a disk never read has nulls."""
        assert summary_of(golden)["disks"] == [
            {"path": "/content", "min_free_bytes": 6 * GiB, "total_bytes": 100 * 10**9,
             "min_free_at_s": 3400.0},
            {"path": "/ckpt", "min_free_bytes": None, "total_bytes": None, "min_free_at_s": None},
        ]

    def test_checkpoints_are_distinct_path_and_time(self, golden):
        """Three distinct checkpoints (one from before the log), durations 20/30/40 s."""
        ck = summary_of(golden)["checkpoints"]
        assert {k: v for k, v in ck.items() if k != "list"} == {
            "count": 3, "duration_mean_s": 30.0, "duration_max_s": 40.0, "bytes_last": 3 * GiB,
            "bytes_max": 3 * GiB, "reasons": {"session_limit": 2, "by the trainer itself": 1}}
        assert [(c["path"], c["at_s"], c["step"]) for c in ck["list"]] == [
            ("/ckpt/a.pt", 2300.0, 1000), ("/ckpt/b.pt", 3285.0, 1865), ("/ckpt/c.pt", 3530.0, 2115)]

    def test_every_decision_and_action_at_its_tick(self, golden):
        """Warnings at 20 and 15 min left, checkpoint at lead 341 s, stop at 91 s, acks, disk."""
        assert events(summary_of(golden)) == [
            (2400.0, "decision", "warn", "session_limit", None, None),
            (2700.0, "decision", "warn", "session_limit", None, None),
            (3260.0, "decision", "request", "session_limit", "checkpoint", 1),
            (3260.0, "action", "request_written", "session_limit", "checkpoint", 1),
            (3265.0, "decision", "ack", "request_acked", "checkpoint", 1),
            (3400.0, "decision", "warn", "disk_low", None, None),
            (3510.0, "decision", "request", "session_limit", "stop", 2),
            (3510.0, "action", "request_written", "session_limit", "stop", 2),
            (3515.0, "decision", "ack", "request_acked", "stop", 2),
            (3530.0, "decision", "warn", "trainer_finished", None, None),
            (3540.0, "decision", "info", "training_stopped", None, None),
        ]

    def test_input_bound_hint(self, golden):
        """12 min of training at 25 % mean GPU utilisation is flagged with the DataLoader hint."""
        ib = summary_of(golden)["input_bound"]
        hint = ib.pop("hint")
        assert ib == {
            "suspected": True, "threshold_pct": 40.0, "window_s": 600.0,
            "training_s": 1115.0,  # k 0-222, 5 s each
            "training_util_mean_pct": 46.26,  # (144 x 25 + 79 x 85) / 223
            "first_at_s": 2400.0, "worst_window_util_pct": 25.0,
            "worst_window_from_s": 2400.0, "worst_window_to_s": 3000.0,
        }
        assert "num_workers" in hint and "pin_memory" in hint and "25%" in hint

    def test_how_the_session_ended(self, golden):
        """A clean daemon stop after the trainer acknowledged the stop request."""
        assert summary_of(golden)["ended"] == {
            "code": "daemon_stopped", "at_s": 3595.0, "trainer_state": "stopped",
            "trainer_step": 2115, "stop_acked": "session_limit",
            "text": "the watchdog stopped cleanly; trainer stopped at step 2115 after "
                    "acknowledging a stop request (session_limit)",
        }

    def test_input_counts(self, golden):
        """Every line was read: start, 240 samples, 11 decisions/actions, stop."""
        inp = summary_of(golden)["input"]
        assert inp == {"files": [str(golden)], "lines": 253, "events": 253, "samples": 240,
                       "torn_lines": 0, "invalid_lines": 0, "unknown_events": 0,
                       "unknown_event_names": {}, "bad_events": 0, "sessions": 1, "session": 1}


class TestRobustInput:
    def test_torn_last_line_means_the_runtime_died(self, golden):
        """A partial last line is skipped and counted; the numbers are unchanged."""
        clean = without_files(summary_of(golden))
        with open(golden, "a") as fh:
            fh.write('{"schema":1,"ts":1800001200.0,"event":"sample","elapsed_s":36')
        torn = without_files(summary_of(golden))
        assert torn["input"]["torn_lines"] == 1
        assert torn["ended"]["code"] == "torn"
        assert torn["ended"]["text"].startswith("the log ends mid-line")
        for key in ("session", "gpus", "gpu_idle", "ram", "disks", "checkpoints", "events"):
            assert torn[key] == clean[key]

    def test_unknown_events_and_bad_lines_are_counted(self, golden):
        """Newer event types, garbage, non-objects and field-less samples: counted, not fatal."""
        with open(golden, "a") as fh:
            fh.write('{"schema":2,"ts":1,"event":"gpu_reset","index":0}\n')
            fh.write('{"schema":2,"ts":2,"event":"gpu_reset","index":1}\n')
            fh.write('{"schema":2,"ts":3,"event":"notebook_cell"}\n')
            fh.write("not json at all\n")
            fh.write("[1, 2, 3]\n")
            fh.write('{"schema":1,"event":"sample"}\n')  # no elapsed_s, no ts
            fh.write('{"schema":1,"ts":5}\n')  # no event name
            fh.write('{"schema":1,"event":"decision","reason":"x"}\n')  # no kind
        s = summary_of(golden)
        inp = s["input"]
        assert (inp["lines"], inp["events"], inp["invalid_lines"], inp["unknown_events"],
                inp["bad_events"]) == (261, 259, 2, 3, 3)
        assert inp["unknown_event_names"] == {"gpu_reset": 2, "notebook_cell": 1}
        assert s["session"]["elapsed_s"] == 3595.0 and len(s["events"]) == 11

    def test_wrong_types_and_nulls_are_unknown(self, tmp_path):
        """Strings, booleans and nulls where numbers belong read as unknown, never as 0."""
        path = tmp_path / "odd.jsonl"
        lines = [
            {"schema": 1, "ts": 10.0, "event": "daemon_started", "session_start": 0.0,
             "budget_s": None, "interval_s": 5.0, "platform": "colab"},
            {"schema": 1, "ts": 10.0, "event": "sample", "elapsed_s": 10.0, "gpus": "none",
             "ram": [], "disks": None, "trainer": None},
            {"schema": 1, "ts": 15.0, "event": "sample", "elapsed_s": 15.0,
             "gpus": [{"index": 0, "util_pct": "abc", "mem_used_bytes": True}, 7],
             "ram": {"total_bytes": 100, "available_bytes": None}, "trainer": {"alive": "yes"}},
            {"schema": 1, "ts": 20.0, "event": "sample", "elapsed_s": 20.0,
             "gpus": [{"index": 0, "util_pct": 1.0, "mem_used_bytes": 5}], "ram": None},
        ]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        s = summary_of(path)
        assert s["gpus"] == [{"index": 0, "name": None, "samples": 1, "unknown_samples": 2,
                              "util_mean_pct": 1.0, "util_p50_pct": 1.0, "util_p95_pct": 1.0,
                              "mem_peak_bytes": 5, "mem_total_bytes": None}]
        # Only the sample at 20 s has every GPU known and idle, and it is the last: no interval.
        assert (s["gpu_idle"]["idle_s"], s["gpu_idle"]["known_s"]) == (0.0, 0.0)
        assert s["ram"]["peak_used_bytes"] is None and s["ram"]["limit_bytes"] == 100
        assert s["input"]["bad_events"] == 0 and s["ended"]["code"] == "log_stops"
        assert s["session"]["budget_s"] is None and s["session"]["used_pct"] is None

    def test_empty_files(self, tmp_path):
        """Empty and blank files give an empty summary, not a traceback."""
        (tmp_path / "a.jsonl").write_text("")
        (tmp_path / "b.jsonl").write_text("\n\n  \n")
        s = summary_of(tmp_path / "a.jsonl", tmp_path / "b.jsonl", rotated=False)
        assert (s["input"]["lines"], s["input"]["samples"], s["gpus"], s["events"]) == (0, 0, [], [])
        assert s["ended"]["code"] == "empty"
        assert "0 samples" in report.render_text(s)

    def test_log_that_stops_without_a_stop_event(self, tmp_path):
        """No daemon_stopped at the end: the runtime or the watchdog died."""
        path = run_daemon(tmp_path, SessionProbe(), 20, stop=False)
        ended = summary_of(path)["ended"]
        assert (ended["code"], ended["at_s"], ended["trainer_state"]) == ("log_stops", 2495.0, "running")

    def test_gap_in_the_log_is_unknown_time(self, tmp_path):
        """An interval longer than 3 nominal intervals (the watchdog was down) is not idle time."""
        path = tmp_path / "gap.jsonl"
        gpus = [{"index": 0, "util_pct": 0.0}]
        rows = [{"schema": 1, "ts": 0, "event": "daemon_started", "session_start": 0.0,
                 "interval_s": 5.0}]
        rows += [{"schema": 1, "ts": t, "event": "sample", "elapsed_s": t, "gpus": gpus}
                 for t in (0.0, 5.0, 10.0, 100.0, 105.0)]
        path.write_text("".join(json.dumps(x) + "\n" for x in rows))
        assert summary_of(path)["gpu_idle"]["idle_s"] == 15.0  # 0-5, 5-10, 100-105


def write_lines(path: Path, rows: List[Dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def tick(elapsed: float) -> Dict[str, Any]:
    return {"schema": 1, "ts": elapsed, "event": "sample", "elapsed_s": elapsed,
            "remaining_s": 100.0 - elapsed, "trainer": {"alive": True, "state": "completed", "step": 7}}


class TestEnding:
    START_ROW = {"schema": 1, "ts": 0.0, "event": "daemon_started", "session_start": 0.0,
                 "budget_s": 100.0, "interval_s": 5.0}
    END_ROW = {"schema": 1, "ts": 50.0, "event": "action", "step": "end_done",
               "reason": "training_complete"}
    STOP_ROW = {"schema": 1, "ts": 60.0, "event": "daemon_stopped"}

    @pytest.mark.parametrize("rows, tail, code, text", [
        ([START_ROW, tick(45.0), END_ROW, tick(50.0)], "", "end_action",
         "the watchdog's end transaction: end_done (training_complete); trainer completed at step 7"),
        ([START_ROW, tick(45.0), END_ROW, tick(50.0), tick(55.0), STOP_ROW], "", "daemon_stopped",
         "the watchdog stopped cleanly; trainer completed at step 7"),
        ([START_ROW, tick(90.0), tick(95.0)], "", "log_stops",
         "the log stops without a stop event: the runtime or the watchdog died at the session "
         "limit; trainer completed at step 7"),
        ([START_ROW, tick(10.0)], '{"schema":1,"ev', "torn",
         "the log ends mid-line: the runtime died while the watchdog was writing; "
         "trainer completed at step 7"),
        ([START_ROW, tick(10.0), STOP_ROW, tick(15.0)], "", "log_stops",
         "the log stops without a stop event: the runtime or the watchdog died; "
         "trainer completed at step 7"),
    ])
    def test_ending_from_the_last_events(self, tmp_path, rows, tail, code, text):
        """The last events decide: an end step, a torn line, a clean stop, or silence."""
        ended = summary_of(write_lines(tmp_path / "e.jsonl", rows, tail))["ended"]
        assert (ended["code"], ended["text"]) == (code, text)


class TestLogFiles:
    def test_rotated_and_gzipped_files_read_as_one(self, golden_log, tmp_path):
        """A base path brings its rotated siblings (.gz too), oldest first: same summary."""
        path = run_daemon(tmp_path, SessionProbe(), TICKS, max_bytes=50_000)
        rotated = sorted(tmp_path.glob("log.jsonl.*"))
        assert len(rotated) >= 3
        oldest = rotated[-1]
        with open(oldest, "rb") as src, gzip.open(str(oldest) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        oldest.unlink()
        got = summary_of(path)
        assert without_files(got) == without_files(summary_of(golden_log))
        assert got["input"]["files"][0].endswith(".gz") and got["input"]["files"][-1] == str(path)

    def test_logs_the_daemon_rotated_and_gzipped_itself_report_the_whole_session(
            self, golden_log, tmp_path, capsys):
        """``report`` over a log whose rotated files the log itself gzipped (.N.gz) gives the
        summary of the unrotated log, every rotated file read, oldest first."""
        path = run_daemon(tmp_path, SessionProbe(), TICKS, max_bytes=50_000, compress=True)
        rotated = sorted(p.name for p in tmp_path.glob("log.jsonl.*"))
        assert len(rotated) >= 3 and all(name.endswith(".gz") for name in rotated)
        assert report.run(parse(["report", str(path), "--json"])) == 0
        got = json.loads(capsys.readouterr().out)
        assert without_files(got) == without_files(summary_of(golden_log))
        oldest_first = [str(tmp_path / f"log.jsonl.{i}.gz") for i in range(len(rotated), 0, -1)]
        assert got["input"]["files"] == oldest_first + [str(path)]

    def test_glob_order_is_put_in_rotation_order(self, tmp_path):
        """``x.jsonl x.jsonl.1 x.jsonl.2`` (a shell glob) is read as .2, .1, base."""
        for name in ("x.jsonl", "x.jsonl.1", "x.jsonl.2.gz", "x.jsonl.10", "other.jsonl"):
            (tmp_path / name).write_text("")
        names = [p.name for p in report.expand_paths(
            [tmp_path / "x.jsonl", tmp_path / "x.jsonl.1"], rotated=False)]
        assert names == ["x.jsonl.1", "x.jsonl"]
        names = [p.name for p in report.expand_paths([tmp_path / "x.jsonl"])]
        assert names == ["x.jsonl.10", "x.jsonl.2.gz", "x.jsonl.1", "x.jsonl"]
        names = [p.name for p in report.expand_paths([tmp_path / "x.jsonl.1"])]
        assert names == ["x.jsonl.1"]  # a rotated file named on its own is read on its own

    def test_truncated_gzip_counts_as_torn(self, golden_log, tmp_path):
        """A gzip file cut short: what was readable counts, the rest is one torn line."""
        data = gzip.compress(golden_log.read_bytes())
        path = tmp_path / "cut.jsonl.gz"
        path.write_bytes(data[: len(data) // 2])
        s = summary_of(path)
        assert s["input"]["torn_lines"] >= 1 and 0 < s["input"]["samples"] < TICKS
        assert s["ended"]["code"] == "torn"

    def test_two_sessions_in_one_log(self, golden_log, tmp_path):
        """A new session_start begins a new session; the last is reported unless --session says."""
        first = [{"schema": 1, "ts": 1.0, "event": "daemon_started", "session_start": 1.0,
                  "platform": "colab", "budget_s": 43200.0, "interval_s": 5.0},
                 {"schema": 1, "ts": 11.0, "event": "sample", "elapsed_s": 10.0, "gpus": []}]
        path = tmp_path / "both.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in first) + golden_log.read_text())
        last = summary_of(path)
        assert (last["input"]["sessions"], last["input"]["session"]) == (2, 2)
        assert without_files(last)["session"] == without_files(summary_of(golden_log))["session"]
        one = summary_of(path, session=1)
        assert (one["session"]["platform"], one["session"]["elapsed_s"], one["input"]["samples"]) == \
            ("colab", 10.0, 1)
        with pytest.raises(report.ReportError, match="out of range"):
            summary_of(path, session=3)

    def test_missing_file_is_a_user_error(self, tmp_path):
        """A path that does not exist: one line, no traceback."""
        with pytest.raises(report.ReportError, match="no such log file"):
            report.expand_paths([tmp_path / "nope.jsonl"])


class TestPercentile:
    @pytest.mark.parametrize("values, pct, expected", [
        ([], 50, None),
        ([7.0], 95, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8),
        ([5.0, 1.0, 3.0], 0, 1.0),
    ])
    def test_linear_interpolation(self, values, pct, expected):
        """Linear interpolation between closest ranks, like numpy's default."""
        got = report.percentile(values, pct)
        assert got == expected if expected is None else got == pytest.approx(expected)


class TestInputBound:
    @pytest.mark.parametrize("low_samples, low_pct, busy_pct, expected", [
        # exactly 10 min at 30 % from 200 s; the earliest low window takes in 18 busy samples
        # before it: (18 x 95 + 102 x 30) / 120 = 39.75 %
        (120, 30.0, 95.0, (110.0, 200.0, 30.0)),
        # 9m55s at 30 % + 5 s at 100 % still averages (119 x 30 + 100) / 120 = 30.58 % over 10 min
        (119, 30.0, 100.0, (115.0, 195.0, 30.58)),
        (60, 0.0, 100.0, None),  # a 5-minute stall: every 10-min window averages >= 50 %
        (200, 40.0, 40.0, None),  # 40 % is not under 40 %
    ])
    def test_mean_over_any_ten_minutes(self, low_samples, low_pct, busy_pct, expected):
        """Flagged when some 10-minute stretch of training averages under 40 % (5 s samples)."""
        el = [5.0 * i for i in range(200)]
        util = [low_pct if 40 <= i < 40 + low_samples else busy_pct for i in range(200)]
        got = report.input_bound(el, [5.0] * 199 + [0.0], [True] * 200, util)
        assert got["suspected"] is (expected is not None)
        assert (got["hint"] is None) is (expected is None)
        if expected is not None:
            assert (got["first_at_s"], got["worst_window_from_s"], got["worst_window_util_pct"]) == expected
            assert got["worst_window_to_s"] == got["worst_window_from_s"] + 600.0

    def test_unknown_readings_do_not_make_a_window_low(self):
        """A window where most readings are unknown is not judged."""
        el = [5.0 * i for i in range(200)]
        util: List[Optional[float]] = [None if i % 3 else 10.0 for i in range(200)]
        got = report.input_bound(el, [5.0] * 199 + [0.0], [True] * 200, util)
        assert got["suspected"] is False and got["training_util_mean_pct"] == 10.0

    def test_not_training_is_not_input_bound(self):
        """Low utilisation while the trainer is not running is idle time, not a hint."""
        el = [5.0 * i for i in range(200)]
        got = report.input_bound(el, [5.0] * 199 + [0.0], [False] * 200, [1.0] * 200)
        assert (got["suspected"], got["training_s"]) == (False, 0.0)


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="session-watchdog")
    sub = parser.add_subparsers(dest="command")
    report.add_parser(sub)
    report.add_tail_parser(sub)
    return parser.parse_args(argv)


class TestReportCommand:
    def test_json_output_is_the_summary(self, golden, capsys):
        """``report LOG --json`` prints the summary dict as JSON, exit 0."""
        assert report.run(parse(["report", str(golden), "--json", "--price-per-hour", "3.6"])) == 0
        assert json.loads(capsys.readouterr().out) == summary_of(golden, price_per_hour=3.6)

    def test_text_output_has_compact_tables(self, golden, capsys):
        """The text view names the key figures in short tables."""
        assert report.run(parse(["report", str(golden)])) == 0
        text = capsys.readouterr().out
        for needle in ("59m55s of 1h00m00s (99.9%)", "48.1%", "20.0 GiB", "request_written",
                       "Hint: input-bound", "the watchdog stopped cleanly", "/content"):
            assert needle in text

    def test_png_is_written(self, golden, tmp_path, capsys):
        """``--out report.png`` writes a non-empty PNG."""
        out = tmp_path / "report.png"
        assert report.run(parse(["report", str(golden), "--out", str(out)])) == 0
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    def test_html_embeds_tables_and_figure(self, golden, tmp_path, capsys):
        """``--out report.html`` is one self-contained file: tables and a base64 PNG."""
        out = tmp_path / "report.html"
        assert report.run(parse(["report", str(golden), "--out", str(out)])) == 0
        page = out.read_text()
        assert page.count("<table>") >= 4 and "<th>util mean</th>" in page
        assert '<img alt="session timeline" src="data:image/png;base64,iVBORw0KGgo' in page
        assert "num_workers" in page and "<td>request_written</td>" in page
        assert "http" not in page.split("<body>", 1)[1]  # nothing fetched from elsewhere

    def test_missing_matplotlib_is_one_line_exit_2(self, golden, tmp_path, capsys, monkeypatch):
        """Without matplotlib a plot is refused with one line; --json still works."""
        for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
            monkeypatch.setitem(__import__("sys").modules, name, None)
        assert report.run(parse(["report", str(golden), "--out", str(tmp_path / "r.png")])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'session-watchdog[plot]'" in err
        assert report.run(parse(["report", str(golden), "--json"])) == 0

    @pytest.mark.parametrize("content, message", [
        ("", "empty, nothing to report"),
        ("\n  \n", "empty, nothing to report"),
        ("step,loss\n1,0.5\n", "not a JSONL log (2 lines, none a JSON object)"),
        ('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.4}\n',
         "no session-watchdog event in 2 JSON lines"),
    ])
    def test_a_file_that_is_not_a_log_is_exit_2(self, tmp_path, capsys, content, message):
        """An empty file or one that is not a watchdog JSONL log is exit 2 with one line, not an
        empty report with exit 0."""
        path = tmp_path / "notes.jsonl"
        path.write_text(content)
        assert report.run(parse(["report", str(path)])) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (f"session-watchdog: error: {path}: {message}; give the watchdog's "
                                "JSONL log (`session-watchdog status` prints its path)\n")

    @pytest.mark.parametrize("argv, message", [
        (["report", "/nonexistent/x.jsonl"], "no such log file: /nonexistent/x.jsonl"),
        (["report", "GOLDEN", "--out", "r.pdf"], "expected a .png or .html file name"),
        (["report", "GOLDEN", "--session", "0"], "--session 0 is invalid"),
        (["report", "GOLDEN", "--out", "/nonexistent/dir/r.png"], "cannot write"),
    ])
    def test_user_errors_exit_2(self, golden, capsys, argv, message):
        """Bad input is exit code 2 and one line naming it."""
        argv = [str(golden) if a == "GOLDEN" else a for a in argv]
        assert report.run(parse(argv)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def sample_line(elapsed: float, util: Optional[float] = 50.0, step: int = 10) -> str:
    return json.dumps({
        "schema": 1, "ts": WALL0 + elapsed, "event": "sample", "elapsed_s": elapsed,
        "remaining_s": 3600 - elapsed,
        "gpus": [{"index": 0, "util_pct": util, "mem_used_bytes": 3 * GiB, "mem_total_bytes": 16 * GiB}],
        "ram": {"total_bytes": 16 * GiB, "available_bytes": 6 * GiB},
        "trainer": {"alive": True, "state": "running", "step": step}}) + "\n"


class TestTail:
    def test_compact_sample_line(self):
        """Elapsed, time left, GPU util/memory, RAM available, trainer state and step."""
        line = report.format_sample(json.loads(sample_line(3542.0, util=None, step=1200)))
        assert line.split() == ["+59m02s", "left", "58s", "GPU0", "?%", "3.0/16G", "RAM",
                                "6.0G", "avail", "trainer", "running", "step", "1200"]

    def test_last_lines_of_a_finished_log(self, golden):
        """Without --follow: the last N lines (samples and decisions), then exit."""
        out = io.StringIO()
        assert report.tail(golden, lines=3, out=out) == 0
        lines = out.getvalue().splitlines()
        assert len(lines) == 3 and lines[-1].split()[0] == "+59m55s"
        assert "trainer stopped step 2115 (exited)" in lines[-1]

    def test_follow_prints_appended_lines_until_the_bound(self, tmp_path):
        """--follow prints each appended sample once, waits for torn lines to complete,
        follows a rotation to the new file, and stops after --for."""
        path = tmp_path / "live.jsonl"
        path.write_text(sample_line(5.0))
        now = [0.0]
        script = [
            lambda: path.open("a").write(sample_line(10.0) + sample_line(15.0)[:30]),
            lambda: path.open("a").write(sample_line(15.0)[30:]),
            lambda: (path.rename(tmp_path / "live.jsonl.1"), path.write_text(sample_line(20.0))),
            lambda: path.open("a").write('{"event":"future_thing"}\n' + sample_line(25.0)),
        ]

        def sleep(seconds: float) -> None:
            now[0] += seconds
            if script:
                script.pop(0)()

        out, err = io.StringIO(), io.StringIO()
        report.tail(path, follow=True, for_s=3.0, lines=5, out=out, err=err, poll_s=0.5,
                    clock=lambda: now[0], sleep=sleep)
        assert [line.split()[0] for line in out.getvalue().splitlines()] == \
            ["+5s", "+10s", "+15s", "+20s", "+25s"]
        assert now[0] == 3.0
        assert err.getvalue() == "session-watchdog tail: skipped 1 unknown events\n"

    def test_tail_command_with_a_real_clock(self, tmp_path, capsys):
        """``tail LOG --follow --for 0.3s`` returns by itself (usable in tests and scripts)."""
        path = tmp_path / "live.jsonl"
        path.write_text(sample_line(5.0) + sample_line(10.0)[:20])
        assert report.run_tail(parse(["tail", str(path), "--follow", "--for", "0.3s"])) == 0
        captured = capsys.readouterr()
        assert captured.out.split()[0] == "+5s"
        assert "1 torn line" in captured.err

    def test_bad_duration_is_exit_2(self, tmp_path, capsys):
        """``--for soon`` is refused with one line."""
        path = tmp_path / "live.jsonl"
        path.write_text("")
        assert report.run_tail(parse(["tail", str(path), "-f", "--for", "soon"])) == 2
        assert "--for 'soon' is invalid" in capsys.readouterr().err

