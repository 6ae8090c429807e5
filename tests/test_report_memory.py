"""report in memory that does not grow with the log (issue 17): statistics are streamed, the
timeline is downsampled while reading, and the figures stay exact."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

from session_watchdog import report
from session_watchdog.report.aggregate import (
    BUCKETS,
    MAX_DISTINCT,
    NOMINAL_PROBE,
    Buckets,
    Column,
    Distribution,
)

GiB = 2**30


def write_log(path: Path, n: int, *, interval_s: Optional[float] = 5.0, seed: int = 3,
              hole_at: Optional[int] = None) -> List[Dict[str, Any]]:
    """A synthetic log of ``n`` samples (2 GPUs, RAM, one disk, a trainer), 5 s apart; one
    sample is 600 s late after sample ``hole_at``. Returns the samples written."""
    rng = random.Random(seed)
    rows: List[Dict[str, Any]] = []
    if interval_s is not None:
        rows.append({"schema": 1, "ts": 0.0, "event": "daemon_started", "session_start": 0.0,
                     "interval_s": interval_s, "platform": "generic"})
    elapsed = 0.0
    for k in range(n):
        idle = k % 500 < 40  # every GPU idle in these
        gpus = [{"index": i, "util_pct": None if rng.random() < 0.01 else
                 (rng.choice([0, 1, 2, 3]) if idle else rng.randint(20, 100)),
                 "mem_used_bytes": rng.randint(1, 70) * GiB, "mem_total_bytes": 80 * GiB}
                for i in range(2)]
        rows.append({"schema": 1, "ts": elapsed, "event": "sample", "elapsed_s": elapsed,
                     "gpus": gpus,
                     "ram": {"total_bytes": 64 * GiB, "available_bytes": rng.randint(1, 60) * GiB},
                     "disks": [{"path": "/data", "free_bytes": rng.randint(5, 900) * GiB,
                                "total_bytes": 1000 * GiB}],
                     "trainer": {"alive": True, "state": "running", "step": 3 * k,
                                 "step_time_s": 1.5}})
        elapsed += 600.0 if k == hole_at else 5.0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r for r in rows if r["event"] == "sample"]


def exact_percentile(values: List[float], pct: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100.0
    low = int(math.floor(pos))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class TestBoundedTimeline:
    def test_a_long_log_keeps_a_bounded_number_of_timeline_points(self, tmp_path):
        """12,000 samples leave at most 2 x BUCKETS points per column, nothing per sample."""
        write_log(tmp_path / "log.jsonl", 12_000)
        tl = report.load([tmp_path / "log.jsonl"]).timeline
        assert tl.samples == 12_000
        assert BUCKETS <= len(tl.buckets.x) < 2 * BUCKETS and tl.buckets.width == 8
        for column in tl.columns():
            assert len(column.lo) == len(column.hi) == len(tl.buckets.x)
            assert len(column.raw) == 0

    def test_the_point_count_does_not_grow_with_the_log(self, tmp_path):
        """Logs of 5,000 and 20,000 samples give timelines of the same size (bucket count)."""
        sizes = []
        for n in (5_000, 20_000):
            write_log(tmp_path / f"{n}.jsonl", n)
            tl = report.load([tmp_path / f"{n}.jsonl"]).timeline
            sizes.append((len(tl.buckets.x), tl.buckets.width))
        assert sizes == [(1250, 4), (1250, 16)]

    def test_a_short_log_is_drawn_sample_by_sample(self, tmp_path):
        """Under 2 x BUCKETS samples every bucket is one sample: the figure shows each reading."""
        samples = write_log(tmp_path / "log.jsonl", 300)
        tl = report.load([tmp_path / "log.jsonl"]).timeline
        assert tl.buckets.width == 1
        assert list(tl.buckets.x) == [s["elapsed_s"] for s in samples]
        assert list(tl.step.lo) == [float(s["trainer"]["step"]) for s in samples]

    def test_the_figure_of_a_long_log_draws_the_envelope(self, tmp_path):
        """The figure of a long log draws every column's min/max envelope (2 points a bucket)."""
        write_log(tmp_path / "log.jsonl", 5_000)
        rep = report.load([tmp_path / "log.jsonl"])
        fig = report.timeline_figure(rep)
        step_line = fig.axes[0].get_lines()[0]
        assert len(step_line.get_xdata()) == 2 * len(rep.timeline.buckets.x) + 1  # + NaN break


class TestStreamedStatistics:
    def test_figures_equal_those_of_every_sample(self, tmp_path):
        """GPU mean/p50/p95/peak memory, RAM peak, disk minimum and idle time are exact."""
        samples = write_log(tmp_path / "log.jsonl", 6_000)
        s = report.load([tmp_path / "log.jsonl"]).summary
        for gpu in s["gpus"]:
            i = gpu["index"]
            utils = [float(x["gpus"][i]["util_pct"]) for x in samples
                     if x["gpus"][i]["util_pct"] is not None]
            assert gpu["samples"] == len(utils)
            assert gpu["unknown_samples"] == 6_000 - len(utils)
            assert gpu["util_mean_pct"] == round(sum(utils) / len(utils), 2)
            assert gpu["util_p50_pct"] == round(exact_percentile(utils, 50), 2)
            assert gpu["util_p95_pct"] == round(exact_percentile(utils, 95), 2)
            assert gpu["mem_peak_bytes"] == max(x["gpus"][i]["mem_used_bytes"] for x in samples)
        used = [x["ram"]["total_bytes"] - x["ram"]["available_bytes"] for x in samples]
        assert s["ram"]["peak_used_bytes"] == max(used)
        assert s["ram"]["peak_at_s"] == samples[used.index(max(used))]["elapsed_s"]
        free = [x["disks"][0]["free_bytes"] for x in samples]
        assert s["disks"][0]["min_free_bytes"] == min(free)
        assert s["disks"][0]["min_free_at_s"] == samples[free.index(min(free))]["elapsed_s"]
        idle = sum(5.0 for x in samples[:-1]
                   if all(g["util_pct"] is not None and g["util_pct"] < 5 for g in x["gpus"]))
        assert s["gpu_idle"]["idle_s"] == idle

    def test_a_log_without_its_start_takes_the_interval_from_its_first_samples(self, tmp_path):
        """Without daemon_started (rotated away), a 600 s hole after more than NOMINAL_PROBE
        samples is still a monitoring gap, measured against the first samples' 5 s interval."""
        write_log(tmp_path / "log.jsonl", 2 * NOMINAL_PROBE, interval_s=None,
                  hole_at=NOMINAL_PROBE + 10)
        gaps = report.load([tmp_path / "log.jsonl"]).summary["monitoring_gaps"]
        start = (NOMINAL_PROBE + 10) * 5.0
        assert gaps["list"] == [{"from_s": start, "to_s": start + 600.0, "duration_s": 600.0}]

    def test_a_restart_with_a_shorter_interval_keeps_the_earlier_samples(self, tmp_path):
        """A watchdog restarted with a 5 s interval does not turn the 60 s samples logged before
        it into gaps: each interval counts from its own start."""
        rows: List[Dict[str, Any]] = [{"schema": 1, "ts": 0.0, "event": "daemon_started",
                                       "session_start": 0.0, "interval_s": 60.0}]
        rows += [{"schema": 1, "ts": t, "event": "sample", "elapsed_s": t,
                  "gpus": [{"index": 0, "util_pct": 0.0}]} for t in (0.0, 60.0, 120.0)]
        rows.append({"schema": 1, "ts": 125.0, "event": "daemon_started", "session_start": 0.0,
                     "interval_s": 5.0})
        rows += [{"schema": 1, "ts": t, "event": "sample", "elapsed_s": t,
                  "gpus": [{"index": 0, "util_pct": 0.0}]} for t in (125.0, 130.0)]
        path = tmp_path / "log.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        s = report.load([path]).summary
        assert s["monitoring_gaps"]["count"] == 0
        assert s["gpu_idle"]["idle_s"] == 130.0


class TestAggregates:
    def test_distribution_percentiles_are_exact(self):
        """Percentiles from value counts equal those of the sorted values."""
        rng = random.Random(1)
        values = [float(rng.randint(0, 100)) for _ in range(5_001)]
        dist = Distribution()
        for v in values:
            dist.add(v)
        assert len(dist.counts) == 101
        for pct in (0, 5, 50, 95, 99.9, 100):
            assert dist.percentile(pct) == exact_percentile(values, pct)
        assert report.percentile(values, 95) == exact_percentile(values, 95)

    def test_distribution_of_too_many_distinct_values_stays_bounded(self):
        """Past MAX_DISTINCT distinct values the counts are kept at 0.01 resolution."""
        rng = random.Random(2)
        values = [rng.uniform(0, 100) for _ in range(3 * MAX_DISTINCT)]
        dist = Distribution()
        for v in values:
            dist.add(v)
        assert len(dist.counts) <= 10_001 and dist.digits == 2
        for pct in (50, 95):
            got = dist.percentile(pct)
            assert got is not None and abs(got - exact_percentile(values, pct)) <= 0.01

    def test_buckets_keep_each_buckets_min_and_max_and_unknown_stays_unknown(self):
        """Halved buckets hold the min and max of their samples; an all-unknown bucket is NaN."""
        clock = Buckets(limit=4)
        column = Column()
        nan = math.nan
        values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, nan, nan, nan, nan, 5.0, 8.0, 9.0, 7.0,
                  9.0, 3.0]
        for k, v in enumerate(values):
            column.raw.append(v)
            if clock.sampled(float(k)):
                clock.close([column])
        clock.close([column])  # the partial last bucket
        assert clock.width == 4
        assert list(clock.x) == [0.0, 4.0, 8.0, 12.0, 16.0]
        lo, hi = list(column.lo), list(column.hi)
        assert lo[2] != lo[2] and hi[2] != hi[2]  # NaN: no known value in samples 8-11
        assert lo[:2] + lo[3:] == [1.0, 2.0, 5.0, 3.0] and hi[:2] + hi[3:] == [4.0, 9.0, 9.0, 9.0]
        late = Column(2, 0)  # first seen after two buckets: unknown before
        assert all(v != v for v in late.lo) and len(late.hi) == 2
