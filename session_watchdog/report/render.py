"""The timeline figure (PNG) and the one-file HTML page; matplotlib is imported only here, to draw."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Dict, Iterable, List, Optional

from session_watchdog.report.aggregate import Column
from session_watchdog.report.reading import ReportError
from session_watchdog.report.summary import Report, _clock, tables

# --------------------------------------------------------------------------------------------
# Figure and HTML (matplotlib only here)


class PlotUnavailable(ReportError):
    pass


def _figure_class() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(
            "the timeline needs matplotlib: pip install 'session-watchdog[plot]' "
            "(--json and the text summary work without it)") from None
    return Figure, FigureCanvasAgg


# Markers: dashed lines plus a symbol above the top panel, in colours outside matplotlib's default
# line cycle so that a marker never reads as a GPU's line. (colour, symbol) by kind.
_MARKER_STYLE = {"request": ("crimson", "v"), "resend": ("crimson", "1"),
                 "warn": ("goldenrod", "o"), "ack": ("seagreen", "^"), "action": ("navy", "s"),
                 "end": ("black", "X")}


def _byte_unit(peak: float) -> Any:
    """(divisor, name) so that ``peak`` reads as a number between 1 and 1024."""
    for div, name in ((2.0**40, "TiB"), (2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB")):
        if peak >= div:
            return div, name
    return 1.0, "B"


def render_png(report: Report, dpi: int = 100) -> bytes:
    """The timeline figure (:func:`timeline_figure`) as PNG bytes."""
    buf = io.BytesIO()
    timeline_figure(report, dpi).savefig(buf, format="png")
    return buf.getvalue()


def timeline_figure(report: Report, dpi: int = 100) -> Any:
    """The timeline as a matplotlib Figure (issue 16: training progress first).

    Panels, top to bottom: the trainer's step and step time with checkpoints, the deadline and
    decision markers; GPU utilisation and memory (only with GPU readings; "no GPU readings" said
    once otherwise); RAM used against its limit; free disk space. Monitoring gaps (no readings)
    are shaded. Several sessions of one training (``report.stitched``) share one wall-clock
    axis, with their boundaries marked.
    """
    Figure, Canvas = _figure_class()
    import numpy as np  # a dependency of matplotlib

    if report.stitched and report.sessions:
        parts = report.sessions
    else:
        start = next((s for s, tl in report.sessions if tl is report.timeline), None)
        parts = [(start, report.timeline)]
    origin = next((s for s, _ in parts if s is not None), None)
    offsets = [0.0 if s is None or origin is None else s - origin for s, _ in parts]
    last = max([off + (tl.last_s or 0.0)
                for off, (_, tl) in zip(offsets, parts)] + [0.0])
    budget_end = max([off + (tl.budget_s or 0.0) for off, (_, tl) in zip(offsets, parts)] + [0.0])
    hours = max(last, budget_end if budget_end <= 1.25 * max(last, 1.0) else 0.0) > 3 * 3600
    scale, unit = (3600.0, "h") if hours else (60.0, "min")

    def series(get: Any, div: float = 1.0) -> Any:
        """x and y over every part, NaN between parts (a line never bridges two sessions).

        The columns come downsampled (:class:`.aggregate.Column`): a bucket of one sample is a
        point, a wider one its min and max at its first sample's time (an envelope).
        """
        xs, ys = [], []
        for off, (_, tl) in zip(offsets, parts):
            x = (np.asarray(tl.buckets.x, dtype=float) + off) / scale
            column = get(tl)
            if column is None:  # a GPU or disk this session never saw
                y = np.full(len(x), math.nan)
            elif tl.buckets.width == 1:
                y = np.frombuffer(column.lo, dtype=float) / div if len(x) else np.empty(0)
            else:
                y = np.empty(2 * len(x))
                y[0::2] = np.frombuffer(column.lo, dtype=float) / div
                y[1::2] = np.frombuffer(column.hi, dtype=float) / div
                x = np.repeat(x, 2)
            xs += [x, np.array([math.nan])]
            ys += [y, np.array([math.nan])]
        return np.concatenate(xs), np.concatenate(ys)

    def peak(columns: Iterable[Column]) -> Optional[float]:
        """The largest known value of the columns."""
        known = [p for p in (column.peak() for column in columns) if p is not None]
        return max(known) if known else None

    gpu_indices = sorted({i for _, tl in parts for i in tl.gpu_util})
    has_gpu = any(column.known() for _, tl in parts
                  for column in (*tl.gpu_util.values(), *tl.gpu_mem.values()))
    names = ["progress"] + (["gpu_util", "gpu_mem"] if has_gpu else []) + ["ram", "disk"]
    heights = {"progress": 1.6, "gpu_util": 1.0, "gpu_mem": 1.0, "ram": 0.8, "disk": 0.8}
    fig = Figure(figsize=(12, 2.2 + 2.0 * sum(heights[n] for n in names)), dpi=dpi)
    # Fixed margins: constrained_layout re-measures every label and costs a second on a long log.
    fig.subplots_adjust(left=0.07, right=0.84, top=0.93, bottom=0.07, hspace=0.14)
    Canvas(fig)
    axes_list = fig.subplots(len(names), 1, sharex=True,
                             gridspec_kw={"height_ratios": [heights[n] for n in names]})
    ax = dict(zip(names, axes_list))

    # Training progress: step over time, step time on a second axis, checkpoints on the line.
    prog = ax["progress"]
    x, steps = series(lambda tl: tl.step)
    prog.plot(x, steps, lw=1.4, color="tab:blue", label="step")
    prog.set_ylabel("trainer step")
    step_peak = peak(tl.step_time_s for _, tl in parts)
    if step_peak is not None:
        twin = prog.twinx()
        st_div, st_unit = (1e-3, "ms") if step_peak < 1.0 else (1.0, "s")
        x2, st = series(lambda tl: tl.step_time_s, st_div)
        twin.plot(x2, st, lw=0.8, color="tab:orange", alpha=0.8)
        twin.set_ylabel(f"step time ({st_unit})", color="tab:orange")
        twin.set_ylim(0, step_peak / st_div * 1.15)
        prog.plot([], [], lw=0.8, color="tab:orange", label="step time")
    ck_x, ck_y = [], []
    for off, (_, tl) in zip(offsets, parts):
        for at_s, step in tl.checkpoints:
            ck_x.append((at_s + off) / scale)
            ck_y.append(math.nan if step is None else float(step))
    if ck_x:
        # A line per checkpoint through every panel while they are few; hundreds (a week of
        # periodic saves) would hide the data, so then only the marks on the step line.
        for a in axes_list if len(ck_x) <= 40 else []:
            a.vlines(ck_x, 0, 1, transform=a.get_xaxis_transform(), colors="seagreen", lw=0.9,
                     alpha=0.6, zorder=1)
        prog.plot(ck_x, ck_y, ls="", marker="D", ms=6, color="seagreen", zorder=5,
                  label="checkpoint")
    if peak(tl.step for _, tl in parts) is None:
        prog.text(0.5, 0.5, "no trainer step reported", transform=prog.transAxes,
                  ha="center", va="center", color="gray")

    if has_gpu:
        for index in gpu_indices:
            x, util = series(lambda tl, i=index: tl.gpu_util.get(i))
            ax["gpu_util"].plot(x, util, lw=0.9, label=f"GPU{index}")
        ax["gpu_util"].set_ylabel("GPU util (%)")
        ax["gpu_util"].set_ylim(-2, 102)
        mem_peak = peak(column for _, tl in parts for column in tl.gpu_mem.values())
        div, name = _byte_unit(mem_peak or 2.0**30)
        for index in gpu_indices:
            x, mem = series(lambda tl, i=index: tl.gpu_mem.get(i), div)
            ax["gpu_mem"].plot(x, mem, lw=0.9, label=f"GPU{index}")
        ax["gpu_mem"].set_ylabel(f"GPU memory ({name})")
        ax["gpu_mem"].set_ylim(0, (mem_peak / div if mem_peak else 1.0) * 1.15)

    ram_peak = peak(column for _, tl in parts for column in (tl.ram_total, tl.ram_used))
    div, name = _byte_unit(ram_peak or 2.0**30)
    x, used = series(lambda tl: tl.ram_used, div)
    ax["ram"].plot(x, used, lw=1.0, color="tab:purple", label="RAM used")
    x, limit = series(lambda tl: tl.ram_total, div)
    ax["ram"].plot(x, limit, lw=1.0, ls="--", color="gray", label="RAM limit")
    ax["ram"].set_ylabel(f"RAM ({name})")
    # Limits after the data, from the data: a flat line must not sit on the top border.
    ax["ram"].set_ylim(0, (ram_peak / div if ram_peak else 1.0) * 1.15)

    disk_paths = sorted({p for _, tl in parts for p in tl.disk_free})
    free_peak = peak(column for _, tl in parts for column in tl.disk_free.values())
    div, name = _byte_unit(free_peak or 2.0**30)
    for path in disk_paths:
        x, free = series(lambda tl, p=path: tl.disk_free.get(p), div)
        ax["disk"].plot(x, free, lw=1.0, label=path)
    ax["disk"].set_ylabel(f"disk free ({name})")
    ax["disk"].set_ylim(0, (free_peak / div if free_peak else 1.0) * 1.15)
    axes_list[-1].set_xlabel(("time since the first session started" if len(parts) > 1
                              else "session time") + f" ({unit})")

    # Monitoring gaps: no readings between two samples far apart (shaded, said once).
    shaded = False
    for off, gaps in zip(offsets, [tl.gaps for _, tl in parts]):
        for a_s, b_s in gaps:
            for a in axes_list:
                a.axvspan((a_s + off) / scale, (b_s + off) / scale, color="0.85", zorder=0)
            shaded = True
    if shaded:
        prog.fill_between([], [], color="0.85", label="no readings")

    # Session boundaries and deadlines.
    if len(parts) > 1:
        for off in offsets[1:]:
            for a in axes_list:
                a.axvline(off / scale, color="0.3", lw=1.0, ls=":")
        prog.plot([], [], color="0.3", ls=":", label="new session")
    off_chart = []
    deadline_drawn = False
    for off, (_, tl) in zip(offsets, parts):
        if not tl.budget_s:
            continue
        end = tl.last_s or 0.0
        if tl.budget_s <= 1.25 * max(end, 1.0):
            for a in axes_list:
                a.axvline((tl.budget_s + off) / scale, color="black", lw=1.2, ls="--")
            deadline_drawn = True
        else:
            off_chart.append(tl.budget_s)
    if deadline_drawn:
        prog.plot([], [], color="black", ls="--", label="deadline")

    # Decisions and actions: a symbol above the top panel; requests above actions (never hidden).
    by_key: Dict[str, List[float]] = {}
    for off, (_, tl) in zip(offsets, parts):
        for mark in tl.markers:
            if mark.at_s is not None:
                key = "end" if mark.kind.startswith("end_") else (
                    "action" if mark.event == "action" else mark.kind)
                by_key.setdefault(key, []).append((mark.at_s + off) / scale)
    level = {"request": 1.10, "resend": 1.10, "warn": 1.06, "ack": 1.06, "action": 1.02,
             "end": 1.02}
    for key, xs in by_key.items():
        color, symbol = _MARKER_STYLE.get(key, ("dimgray", "."))
        prog.plot(xs, [level.get(key, 1.02)] * len(xs), marker=symbol, color=color, ms=6, ls="",
                  clip_on=False, transform=prog.get_xaxis_transform(),
                  zorder=6 if key in ("request", "resend") else 4, label=key)

    title = "Training timeline"
    if len(parts) > 1:
        title += f" over {len(parts)} sessions"
    if not has_gpu:
        title += " (no GPU readings)"
    if off_chart:
        title += f" (deadline at {_clock(min(off_chart), sign=True)}, off the chart)"
    prog.set_title(title, pad=34)
    for a in axes_list:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="upper left", bbox_to_anchor=(1.06 if a is prog else 1.005, 1.0),
                     fontsize=7, frameon=False)
    return fig


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px;vertical-align:top}
th{background:#f3f3f3}
img{max-width:100%}
.hint{background:#fff7e0;border:1px solid #e8c060;padding:0.6em 1em}
.headline{font-size:15px;line-height:1.6;background:#f4f8ff;border:1px solid #b8cdf0;
padding:0.6em 1em 0.6em 2em}
"""


def render_html(summary: Dict[str, Any], png: Optional[bytes]) -> str:
    """One self-contained HTML page: the headline, the timeline (a base64 data URI), the tables."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<title>session-watchdog report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>session-watchdog report</h1>"]
    figure = []
    if png:
        data = base64.b64encode(png).decode("ascii")
        figure = ["<h2>Timeline</h2>",
                  f"<img alt=\"session timeline\" src=\"data:image/png;base64,{data}\">"]
    all_tables = tables(summary)
    if not all_tables or all_tables[0][0] != "What happened":
        parts += figure
        figure = []
    for title, headers, rows in all_tables:
        parts.append(f"<h2>{esc(title)}</h2>")
        if title == "What happened":  # the headline, then the picture: first on the page
            parts.append("<ul class=\"headline\">" + "".join(
                f"<li>{esc(row[0])}</li>" for row in rows) + "</ul>")
            parts += figure
            continue
        if title.startswith("Hint"):
            parts.append(f"<p class=\"hint\">{esc(rows[0][0])}</p>")
            continue
        if not rows:
            parts.append("<p>none</p>")
            continue
        parts.append("<table>")
        if any(headers):
            parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append(f"<p>{summary['input']['samples']} samples from "
                 f"{esc(', '.join(summary['input']['files']))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


