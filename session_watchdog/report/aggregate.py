"""Streaming aggregates: a session's statistics and its plot columns in memory that does not grow
with the log's length (issue 17: a week of an 8-GPU log is 121k samples).

- :class:`Distribution`: percentiles from value counts instead of every value;
- :class:`Column`: a plot column as the min and max of buckets of consecutive samples;
- :class:`SampleFlow`: each sample's duration (up to the next sample), and what needs it: GPU-idle
  and known time, monitoring gaps, the input-bound windows (:class:`InputBound`).

Pure: values in, figures out; no file, clock or plotting library.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from typing import Deque, Dict, Iterable, List, Optional, Tuple

GAP_FACTOR = 3.0  # an interval longer than this many nominal intervals is a gap (watchdog down)
INPUT_BOUND_PCT = 40.0  # issue 6: training under 40 % mean GPU utilisation ...
INPUT_BOUND_WINDOW_S = 600.0  # ... for 10+ minutes suggests a data-loading bottleneck
# Plot buckets: a column keeps between BUCKETS and 2 x BUCKETS (min, max) pairs; more points than
# pixels only cost drawing time.
BUCKETS = 1000
# Distinct values a Distribution counts exactly; past this it counts values rounded to 0.01 (the
# report prints percentiles to 0.01). GPU utilisation from NVML is a whole percent: 101 values.
MAX_DISTINCT = 20_000
# Without a nominal interval in the log (no daemon_started, e.g. rotated away), the median of the
# intervals of this many first samples stands for it.
NOMINAL_PROBE = 256
NAN = math.nan


# --------------------------------------------------------------------------------------------
# Percentiles


def percentile_of_counts(counts: Dict[float, int], pct: float) -> Optional[float]:
    """``percentile`` of the values ``counts`` holds (value -> how often): linear interpolation
    between closest ranks (numpy's default, Excel's PERCENTILE.INC)."""
    n = sum(counts.values())
    if not n:
        return None
    pos = (n - 1) * pct / 100.0
    low = int(math.floor(pos))
    high = min(low + 1, n - 1)
    low_value: Optional[float] = None
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if low_value is None and seen > low:
            low_value = value
        if seen > high:
            assert low_value is not None
            return low_value + (value - low_value) * (pos - low)
    raise AssertionError("unreachable: high < n")


class Distribution:
    """Counts of the values seen, for exact percentiles in bounded memory (:data:`MAX_DISTINCT`)."""

    __slots__ = ("counts", "digits")

    def __init__(self) -> None:
        self.counts: Dict[float, int] = {}
        self.digits: Optional[int] = None  # rounding once there were too many distinct values

    def add(self, value: float) -> None:
        if self.digits is not None:
            value = round(value, self.digits)
        counts = self.counts
        counts[value] = counts.get(value, 0) + 1
        if self.digits is None and len(counts) > MAX_DISTINCT:
            self.digits = 2
            coarse: Dict[float, int] = {}
            for v, k in counts.items():
                coarse[round(v, 2)] = coarse.get(round(v, 2), 0) + k
            self.counts = coarse

    def percentile(self, pct: float) -> Optional[float]:
        return percentile_of_counts(self.counts, pct)


# --------------------------------------------------------------------------------------------
# Plot columns


def _fmin(a: float, b: float) -> float:
    """min of two, NaN (unknown) only when both are."""
    return b if a != a or b < a else a


def _fmax(a: float, b: float) -> float:
    return b if a != a or b > a else a


class Column:
    """One plot column: (min, max) of each closed bucket, and the raw values of the open one.

    NaN is unknown; a bucket with no known value stays NaN (a gap in the line stays a gap).
    """

    __slots__ = ("lo", "hi", "raw")

    def __init__(self, closed: int = 0, open_: int = 0) -> None:
        self.lo: array[float] = array("d", [NAN]) * closed
        self.hi: array[float] = array("d", [NAN]) * closed
        self.raw: array[float] = array("d", [NAN]) * open_

    def close(self) -> None:
        raw = self.raw
        if len(raw) == 1:
            self.lo.append(raw[0])
            self.hi.append(raw[0])
        else:
            known = [v for v in raw if v == v]
            self.lo.append(min(known) if known else NAN)
            self.hi.append(max(known) if known else NAN)
        del raw[:]

    def halve(self) -> None:
        """Merge pairs of closed buckets (an even number of them)."""
        lo, hi = self.lo, self.hi
        self.lo = array("d", map(_fmin, lo[0::2], lo[1::2]))
        self.hi = array("d", map(_fmax, hi[0::2], hi[1::2]))

    def peak(self) -> Optional[float]:
        """The largest known value."""
        known = [v for v in self.hi if v == v]
        known += [v for v in self.raw if v == v]
        return max(known) if known else None

    def known(self) -> bool:
        return any(v == v for v in self.hi) or any(v == v for v in self.raw)


class Buckets:
    """The bucket clock of a set of columns: after each sample's values are appended to every
    column's ``raw``, :meth:`sampled`, and :meth:`close` when it says the bucket is full. Buckets
    double in width to stay under 2 x ``limit``."""

    def __init__(self, limit: int = BUCKETS) -> None:
        self.limit = limit
        self.width = 1  # samples per closed bucket (the last one may hold fewer)
        self.x: array[float] = array("d")  # elapsed of each closed bucket's first sample
        self.open = 0  # samples in the open bucket
        self._open_x = NAN

    def sampled(self, elapsed: float) -> bool:
        """Count a sample in the open bucket; True when the bucket is full (close it)."""
        if not self.open:
            self._open_x = elapsed
        self.open += 1
        return self.open >= self.width

    def close(self, columns: Iterable[Column]) -> None:
        """Close the open bucket (also a partial one, at the end of the log)."""
        if not self.open:
            return
        every = list(columns)
        for column in every:
            column.close()
        self.x.append(self._open_x)
        self.open = 0
        if len(self.x) >= 2 * self.limit:
            self.x = self.x[0::2]
            for column in every:
                column.halve()
            self.width *= 2


# --------------------------------------------------------------------------------------------
# Durations, GPU-idle time, gaps, input-bound windows


class InputBound:
    """Is training input-bound (issue 6: under 40 % mean GPU utilisation for 10+ minutes)?

    Fed one sample at a time: ``add(elapsed, dt, training, mean_util)``. A window is a run of
    training samples without a gap covering at least ``window_s`` (sample *i* covers ``dt``, up to
    the next sample). It is low when its time-weighted mean GPU utilisation, over the samples
    with a known reading (at least half its time), is under ``threshold_pct``. The lowest window
    is reported. Memory: the samples of one window.
    """

    def __init__(self, threshold_pct: float = INPUT_BOUND_PCT,
                 window_s: float = INPUT_BOUND_WINDOW_S) -> None:
        self.threshold_pct = threshold_pct
        self.window_s = window_s
        self.training_s = 0.0
        self.weighted = 0.0  # sum of util x dt over training samples with a known reading
        self.known_s = 0.0  # ... and of their dt
        self.worst: Optional[Tuple[float, float, float]] = None  # (mean, from_s, to_s)
        self.first_at: Optional[float] = None
        # The window's samples: (elapsed, cover, area, known) with the segment's sums before each.
        self._window: Deque[Tuple[float, float, float, float]] = deque()
        self._cover = self._area = self._known = 0.0  # sums since the segment started
        self._linked = False  # the previous sample was training, with dt > 0: same segment

    def add(self, elapsed: float, dt: float, training: bool, mean_util: Optional[float]) -> None:
        u = None if mean_util is None or mean_util != mean_util else mean_util  # NaN: unknown
        if training:
            self.training_s += dt
            if u is not None:
                self.weighted += u * dt
                self.known_s += dt
        if not training:
            self._linked = False
            return
        if not self._linked:  # a new segment: consecutive training samples, no gap between them
            self._window.clear()
            self._cover = self._area = self._known = 0.0
        window = self._window
        window.append((elapsed, self._cover, self._area, self._known))
        self._cover += dt
        self._area += u * dt if u is not None else 0.0
        self._known += dt if u is not None else 0.0
        self._linked = dt > 0
        # The shortest window ending here that still covers window_s.
        while len(window) > 1 and self._cover - window[1][1] >= self.window_s:
            window.popleft()
        start, cover0, area0, known0 = window[0]
        span = self._cover - cover0
        seen = self._known - known0
        if span < self.window_s or seen <= 0 or 2 * seen < span:
            return
        mean = (self._area - area0) / seen
        if mean < self.threshold_pct:
            if self.first_at is None:
                self.first_at = start
            if self.worst is None or mean < self.worst[0]:
                self.worst = (mean, start, start + span)


class SampleFlow:
    """Each sample's duration, streamed: up to the next sample, 0 for the last one and across a
    gap (more than GAP_FACTOR nominal intervals: the watchdog was down).

    The nominal interval is the one the watchdog logged at its start (:meth:`set_interval`, in
    force from then on); a log without one uses the median interval of its first
    :data:`NOMINAL_PROBE` samples. A sample is accounted when the next one arrives: GPU-idle time
    (every GPU known and below ``gpu_idle_pct``), time with known GPU readings, monitoring gaps
    and the input-bound windows.
    """

    def __init__(self, gpu_idle_pct: float) -> None:
        self.gpu_idle_pct = gpu_idle_pct
        self.nominal_s: Optional[float] = None
        self._probed = False  # the median of the first intervals was taken (no nominal logged)
        self._held: List[Tuple[float, float, float, bool]] = []
        self.idle_s = 0.0
        self.known_s = 0.0
        self.gaps: List[Tuple[float, float]] = []
        self.bound = InputBound()

    def set_interval(self, interval_s: float) -> None:
        self.nominal_s = interval_s
        self._probed = True

    def add(self, elapsed: float, max_util: float, mean_util: float, training: bool) -> None:
        """One sample: its elapsed time, the max and mean GPU utilisation (NaN: unknown)."""
        held = self._held
        held.append((elapsed, max_util, mean_util, training))
        if not self._probed:
            if len(held) <= NOMINAL_PROBE:
                return
            self._probe()
        self._account(len(held) - 1)

    def finish(self) -> None:
        """The log ended: account every sample held, the last one with a duration of 0."""
        if not self._probed:
            self._probe()
        self._account(len(self._held) - 1)
        if self._held:
            elapsed, max_util, mean_util, training = self._held.pop()
            self._one(elapsed, 0.0, max_util, mean_util, training)

    def _probe(self) -> None:
        held = self._held
        positive = sorted(d for d in (b[0] - a[0] for a, b in zip(held, held[1:])) if d > 0)
        self.nominal_s = positive[len(positive) // 2] if positive else None
        self._probed = True

    def _account(self, upto: int) -> None:
        """Account the held samples before index ``upto`` (each knows its next sample)."""
        held = self._held
        nominal = self.nominal_s
        cap = GAP_FACTOR * nominal if nominal else math.inf
        for k in range(upto):
            elapsed, max_util, mean_util, training = held[k]
            nxt = held[k + 1][0]
            d = nxt - elapsed
            if d > cap:
                self.gaps.append((elapsed, nxt))
            self._one(elapsed, d if 0 < d <= cap else 0.0, max_util, mean_util, training)
        del held[:upto]

    def _one(self, elapsed: float, dt: float, max_util: float, mean_util: float,
             training: bool) -> None:
        if max_util < self.gpu_idle_pct:  # NaN (a GPU unknown): False
            self.idle_s += dt
        if max_util == max_util:
            self.known_s += dt
        self.bound.add(elapsed, dt, training, mean_util)
