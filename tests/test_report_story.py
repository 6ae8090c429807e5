"""The report tells the story (issue 16): a headline first, training progress in the timeline,
monitoring gaps, one training across sessions, human units, and a page a real browser renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from session_watchdog import report
from session_watchdog.report.summary import human_bytes, human_duration

GiB = 2**30
KiB = 2**10


def write_log(path: Path, rows: List[Dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(dict(row, schema=1)) + "\n" for row in rows))
    return path


def started(start: float, interval: float = 1.0, budget: Optional[float] = None) -> Dict[str, Any]:
    return {"event": "daemon_started", "ts": start, "session_start": start, "platform": "colab",
            "interval_s": interval, "budget_s": budget}


def sample(start: float, elapsed: float, *, step: Optional[int] = None, state: str = "running",
           util: Optional[float] = None, ckpt: Optional[Dict[str, Any]] = None,
           alive: bool = True) -> Dict[str, Any]:
    trainer: Dict[str, Any] = {} if step is None else {
        "alive": alive, "state": state, "step": step, "epoch": 0, "step_time_s": 0.25,
        "checkpoint": ckpt}
    return {"event": "sample", "ts": start + elapsed, "elapsed_s": elapsed,
            "gpus": [] if util is None else [{"index": 0, "util_pct": util,
                                              "mem_used_bytes": 2 * GiB,
                                              "mem_total_bytes": 16 * GiB}],
            "ram": {"total_bytes": 12 * GiB, "available_bytes": 9 * GiB},
            "disks": [{"path": "/content", "free_bytes": 40 * GiB, "total_bytes": 100 * GiB}],
            "trainer": trainer}


def checkpoint(start: float, at_s: float, step: int, size: int = 17 * KiB) -> Dict[str, Any]:
    return {"path": f"/ckpt/step-{step}.pt", "at": start + at_s, "step": step,
            "duration_s": 0.05, "bytes": size}


class TestKnownEvents:
    def test_config_not_applied_is_not_unknown_input(self, tmp_path):
        """This version's own config_not_applied event is known, not counted as unknown."""
        path = write_log(tmp_path / "log.jsonl", [
            started(1000.0), sample(1000.0, 0.0),
            {"event": "config_not_applied", "ts": 1001.0, "keys": ["interval"], "message": "m"}])
        inp = report.load([path]).summary["input"]
        assert (inp["unknown_events"], inp["unknown_event_names"]) == (0, {})


    def test_every_event_the_watchdog_writes_is_known(self):
        """Each event name the daemon side logs (found in its source) is handled or known, so the
        report of this version's own log never lists it as unknown input."""
        import ast

        package = Path(report.__file__).resolve().parent.parent
        written = set()
        for path in package.rglob("*.py"):
            if {"trainer", "integrations"} & set(path.relative_to(package).parts):
                continue  # the trainer logs through the stdlib, not into the watchdog's log
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("debug", "info", "warning", "error", "critical")
                        and node.args and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str)
                        and re.fullmatch(r"[a-z][a-z0-9_]+", node.args[0].value)):
                    written.add(node.args[0].value)
        known = report.HANDLED_EVENTS | report.QUIET_EVENTS | report.SUPERVISE_EVENTS
        assert len(written) > 50 and sorted(written - known) == []


class TestMonitoringGaps:
    def test_ticks_held_up_are_gaps_in_the_summary_and_the_headline(self, tmp_path):
        """At a 1 s interval, samples 30 s and 45 s apart are two gaps, with ticks_missed 0."""
        times = [0.0, 1.0, 2.0, 32.0, 33.0, 78.0, 79.0]
        path = write_log(tmp_path / "log.jsonl",
                         [started(1000.0)] + [sample(1000.0, t, step=int(t)) for t in times])
        summary = report.load([path]).summary
        assert summary["monitoring_gaps"] == {
            "count": 2, "total_s": 75.0, "ticks_missed": 0,
            "list": [{"from_s": 2.0, "to_s": 32.0, "duration_s": 30.0},
                     {"from_s": 33.0, "to_s": 78.0, "duration_s": 45.0}]}
        assert "Monitoring gaps: 2, 1 min 15 s without readings" in summary["headline"]["lines"]
        assert "Monitoring gaps (no readings)" in report.render_text(summary)


class TestHumanUnits:
    @pytest.mark.parametrize("value, text", [
        (0, "0 B"), (512, "512 B"), (17 * KiB, "17.0 KiB"), (3 * 2**20 + 2**19, "3.5 MiB"),
        (3 * GiB, "3.0 GiB"), (2048 * GiB, "2.0 TiB"), (None, "-")])
    def test_sizes(self, value, text):
        """Sizes print in B/KiB/MiB/GiB/TiB, never as 0.0 GiB for 17 KiB."""
        assert human_bytes(value) == text

    @pytest.mark.parametrize("value, text", [
        (0.05, "50 ms"), (2.5, "2.5 s"), (42.0, "42 s"), (125.0, "2 min 05 s"),
        (7300.0, "2 h 01 min"), (None, "-")])
    def test_durations(self, value, text):
        """Durations print in ms, s, min and h."""
        assert human_duration(value) == text

    def test_a_small_checkpoint_reads_in_kib_and_ms(self, tmp_path):
        """A 17 KiB checkpoint saved in 50 ms shows as such in the text report."""
        start = 1000.0
        ck = checkpoint(start, 5.0, 5)
        path = write_log(tmp_path / "log.jsonl", [started(start)] + [
            sample(start, float(t), step=t, ckpt=ck if t >= 5 else None) for t in range(10)])
        text = report.render_text(report.load([path]).summary)
        assert "last 17.0 KiB" in text and "duration mean 50 ms" in text
        assert re.search(r"(?<![\d.])0\.0 GiB", text) is None


class TestHeadline:
    def test_completed_training_released_runtime_and_idle_cost(self, tmp_path):
        """Completed at step 9, two checkpoints (one requested), runtime released 3 s after."""
        start = 5000.0
        rows: List[Dict[str, Any]] = [started(start)]
        for t in range(10):
            ck = checkpoint(start, 7.0, 7) if t >= 7 else checkpoint(start, 3.0, 3) if t >= 3 else None
            rows.append(sample(start, float(t), step=t, util=90.0, ckpt=ck))
            if t == 6:
                rows.append({"event": "decision", "ts": start + t, "kind": "ack",
                             "reason": "request_acked", "action": "checkpoint", "seq": 1,
                             "request_reason": "periodic", "message": "acked"})
        for t in (10, 11, 12, 13):
            rows.append(sample(start, float(t), step=9, state="completed", alive=False, util=0.0,
                               ckpt=checkpoint(start, 7.0, 7)))
        rows.append({"event": "action", "ts": start + 13, "step": "end_action",
                     "reason": "training_complete", "message": "runtime released"})
        path = write_log(tmp_path / "log.jsonl", rows)
        summary = report.load([path], price_per_hour=3.6).summary
        lines = summary["headline"]["lines"]
        assert lines[:3] == ["Training completed at step 9", "Steps lost: 0",
                             "Checkpoints: 2 (1 requested (periodic), 1 by the trainer itself)"]
        assert lines[3].startswith("Ended: the watchdog's end transaction: end_action")
        assert lines[4] == "Training completed -> runtime released: 3.0 s"
        assert lines[5] == "GPU idle: 3.0 s, cost 0.00 at 3.6/h"

    def test_a_runtime_that_died_loses_the_steps_since_the_last_checkpoint(self, tmp_path):
        """The log stops at step 9 with the last checkpoint at step 5: 4 steps lost."""
        start = 5000.0
        rows = [started(start)] + [
            sample(start, float(t), step=t, ckpt=checkpoint(start, 5.0, 5) if t >= 5 else None)
            for t in range(10)]
        summary = report.load([write_log(tmp_path / "log.jsonl", rows)]).summary
        assert summary["headline"]["steps_lost"] == 4
        assert "GPU idle: no GPU readings" in summary["headline"]["lines"]


class TestStitching:
    def _two_runtimes(self, tmp_path: Path) -> List[Path]:
        a, b = 10_000.0, 50_000.0
        first = [started(a, budget=3600.0)] + [
            sample(a, float(t), step=10 * t, util=0.0 if t < 2 else 95.0,
                   ckpt=checkpoint(a, 10.0, 100) if t >= 10 else None) for t in range(16)]
        second = [started(b, budget=3600.0)] + [
            sample(b, float(t), step=100 + 10 * t, util=95.0 if t < 8 else 0.0,
                   state="running" if t < 10 else "completed", alive=t < 10,
                   ckpt=checkpoint(b, 9.0, 190) if t >= 9 else None) for t in range(12)]
        return [write_log(tmp_path / "second.jsonl", second),
                write_log(tmp_path / "first.jsonl", first)]

    def test_logs_of_two_runtimes_are_one_training(self, tmp_path):
        """Two runtimes' logs (named newest first): 2 sessions, 50 steps lost at the boundary
        (step 150 reached, resumed from 100), total steps 210, idle time summed over both."""
        rep = report.load(self._two_runtimes(tmp_path), price_per_hour=36.0)
        training = rep.summary["training"]
        assert (training["sessions"], training["total_steps"], training["steps_lost"],
                training["checkpoints"]) == (2, 210, 50, 2)
        assert [(r["first_step"], r["last_step"], r["steps_lost"]) for r in training["list"]] == [
            (0, 150, 50), (100, 210, 0)]
        assert training["gpu_idle_s"] == 2.0 + 3.0
        assert training["gpu_idle_cost"] == round(2.0 / 3600 * 36 + 3.0 / 3600 * 36, 4)
        assert rep.summary["headline"]["lines"][0] == "Training completed at step 210, over 2 sessions"
        assert rep.stitched and len(rep.sessions) == 2
        text = report.render_text(rep.summary)
        assert "Training across sessions" in text

    def test_two_short_runtimes_less_than_a_minute_apart_are_two_sessions(self, tmp_path):
        """The demo's runtimes (40 s each) start 45 s apart: two sessions, the checkpoint that
        the second one's first reading repeats counted once."""
        a, b = 10_000.0, 10_045.0
        first = [started(a)] + [sample(a, float(t), step=t, ckpt=checkpoint(a, 20.0, 20)
                                       if t >= 20 else None) for t in range(40)]
        second = [started(b)] + [sample(b, float(t), step=20 + t, ckpt=checkpoint(a, 20.0, 20))
                                 for t in range(10)]
        path = write_log(tmp_path / "log.jsonl", first + second)
        training = report.load([path]).summary["training"]
        assert (training["sessions"], training["checkpoints"]) == (2, 1)
        # 39 reached, resumed from 20; then the log stops at 29 with the checkpoint at 20
        assert [r["steps_lost"] for r in training["list"]] == [19, 9]

    def test_the_figure_is_one_timeline_over_both_sessions(self, tmp_path):
        """One figure: the step line spans both runtimes on one wall-clock axis."""
        pytest.importorskip("matplotlib")
        rep = report.load(self._two_runtimes(tmp_path))
        fig = report.timeline_figure(rep)
        axes = fig.axes
        assert axes[0].get_title().startswith("Training timeline over 2 sessions")
        x, y = axes[0].lines[0].get_data()
        finite = [(a, b) for a, b in zip(x, y) if a == a and b == b]
        assert finite[0][1] == 0 and finite[-1][1] == 210
        assert finite[-1][0] > 40_000 / 3600  # the second runtime starts 40,000 s later (hours)


class TestFigure:
    def test_no_gpu_readings_means_no_gpu_panels_and_readable_ram_and_disk(self, tmp_path):
        """Without GPU readings: progress, RAM and disk panels only, said once in the title; the
        flat RAM and disk lines sit below the top of their panels."""
        pytest.importorskip("matplotlib")
        start = 1000.0
        rows = [started(start, budget=18.0)] + [sample(start, float(t), step=t) for t in range(16)]
        fig = report.timeline_figure(report.load([write_log(tmp_path / "log.jsonl", rows)]))
        labels = [a.get_ylabel() for a in fig.axes]
        assert labels == ["trainer step", "RAM (GiB)", "disk free (GiB)", "step time (ms)"]
        assert fig.axes[0].get_title() == "Training timeline (no GPU readings)"
        ram, disk = fig.axes[1], fig.axes[2]
        assert ram.get_ylim() == (0.0, pytest.approx(12 * 1.15))
        assert disk.get_ylim() == (0.0, pytest.approx(40 * 1.15))
        deadline = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"
                    and list(line.get_xdata()) == [18.0 / 60, 18.0 / 60]]
        assert deadline  # the deadline at 18 s is drawn


# --------------------------------------------------------------------------------------------
# A real browser


def _chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome", "headless_shell"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed (chromium, "
                    "chromium-browser or google-chrome on PATH)")
class TestBrowser:
    def test_the_html_report_renders_in_headless_chromium(self, tmp_path):
        """Chromium loads the page without console errors; it has the headline, the tables and
        a decoded timeline image."""
        pytest.importorskip("matplotlib")
        start = 1000.0
        rows = [started(start, budget=3600.0)] + [
            sample(start, float(t), step=t, util=80.0,
                   ckpt=checkpoint(start, 5.0, 5) if t >= 5 else None) for t in range(30)]
        log = write_log(tmp_path / "log.jsonl", rows)
        page = tmp_path / "report.html"
        argv = ["report", str(log), "--out", str(page)]
        import argparse

        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        report.add_parser(sub)
        assert report.run(parser.parse_args(argv)) == 0
        # A probe script, in a copy: the page itself has no script. It reports what the browser
        # made of the page in the title, which --dump-dom prints.
        probe = page.read_text().replace("</body>", (
            "<script>window.addEventListener('load', () => {"
            "const img = document.querySelector('img');"
            "document.title = 'PROBE ' + [document.querySelectorAll('ul.headline li').length,"
            " document.querySelectorAll('table').length,"
            " img && img.complete ? img.naturalWidth : -1].join(' ');});</script></body>"))
        probe_path = tmp_path / "probe.html"
        probe_path.write_text(probe)
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
             probe_path.as_uri()], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        title = re.search(r"<title>PROBE (\d+) (\d+) (-?\d+)</title>", proc.stdout)
        assert title is not None, proc.stdout[:2000]
        headline, tables, width = (int(g) for g in title.groups())
        assert headline >= 5 and tables >= 4 and width == 1200
        console = [line for line in proc.stderr.splitlines()
                   if "CONSOLE" in line or "Uncaught" in line]
        assert console == []
        assert "Training running at step 29" in proc.stdout  # the log stops while it trains
        assert "Steps lost: 24" in proc.stdout and "session timeline" in proc.stdout
