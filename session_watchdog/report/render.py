"""The timeline figure (PNG) and the one-file HTML page; matplotlib is imported only here, to draw."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Dict, Iterable, List, Optional

from session_watchdog.report.reading import (  # noqa: F401
    ReportError,
)
from session_watchdog.report.summary import (  # noqa: F401
    Report,
    _clock,
    tables,
)

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


def render_png(report: Report, dpi: int = 100) -> bytes:
    """The timeline figure as PNG bytes: GPU util and memory per GPU, RAM, disk free, markers."""
    Figure, Canvas = _figure_class()
    tl = report.timeline
    hours = bool(tl.elapsed_s) and max(tl.elapsed_s[-1], tl.budget_s or 0) > 3 * 3600
    scale, unit = (3600.0, "h") if hours else (60.0, "min")
    import numpy as np  # a dependency of matplotlib

    x = np.asarray(tl.elapsed_s, dtype=float) / scale
    # More points than pixels only costs drawing time: above 2 x 1000 samples a series is drawn
    # as its per-bucket min/max envelope (the same picture at this width; a spike stays visible).
    buckets = 1000
    starts = np.linspace(0, len(x), buckets + 1).astype(int)[:-1] if len(x) > 2 * buckets else None
    x_plot = x if starts is None else np.repeat(x[starts], 2)

    def col(values: Iterable[Optional[float]], div: float = 1.0) -> Any:
        y = np.array([math.nan if v is None else v / div for v in values], dtype=float)
        if starts is None:
            return y
        out = np.empty(2 * len(starts))
        with np.errstate(invalid="ignore"):
            out[0::2] = np.fmin.reduceat(y, starts)  # fmin/fmax skip NaN; an all-NaN bucket
            out[1::2] = np.fmax.reduceat(y, starts)  # stays NaN, so long gaps stay gaps
        return out

    fig = Figure(figsize=(12, 10), dpi=dpi)
    # Fixed margins: constrained_layout re-measures every label and costs a second on a 12 h log.
    fig.subplots_adjust(left=0.07, right=0.86, top=0.94, bottom=0.06, hspace=0.12)
    Canvas(fig)
    axes = fig.subplots(4, 1, sharex=True)
    gib = float(2**30)
    for index, util in tl.gpu_util.items():
        axes[0].plot(x_plot, col(util), lw=0.9, label=f"GPU{index}")
        axes[1].plot(x_plot, col(tl.gpu_mem[index], gib), lw=0.9, label=f"GPU{index}")
    axes[0].set_ylabel("GPU util (%)")
    axes[0].set_ylim(-2, 102)
    axes[1].set_ylabel("GPU memory (GiB)")
    axes[2].plot(x_plot, col(tl.ram_used, gib), lw=0.9, color="tab:purple", label="used")
    axes[2].plot(x_plot, col(tl.ram_total, gib), lw=0.9, ls="--", color="gray", label="limit")
    axes[2].set_ylabel("RAM (GiB)")
    for path, free in tl.disk_free.items():
        axes[3].plot(x_plot, col(free, gib), lw=0.9, label=path)
    axes[3].set_ylabel("disk free (GiB)")
    axes[3].set_xlabel(f"session time ({unit})")

    by_key: Dict[str, List[float]] = {}
    for mark in tl.markers:
        if mark.at_s is not None:
            key = "end" if mark.kind.startswith("end_") else (
                "action" if mark.event == "action" else mark.kind)
            by_key.setdefault(key, []).append(mark.at_s / scale)
    for key, xs in by_key.items():  # one collection per kind and axis: thousands stay cheap
        color, symbol = _MARKER_STYLE.get(key, ("dimgray", "."))
        for ax in axes:
            ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), colors=color, lw=0.8,
                      alpha=0.7, linestyles=(0, (4, 3)))
        axes[0].plot(xs, [108] * len(xs), marker=symbol, color=color, ms=6, ls="",
                     clip_on=False, label=key)
    title = "session-watchdog timeline"
    if tl.budget_s:
        last = tl.elapsed_s[-1] if tl.elapsed_s else 0.0
        if tl.budget_s <= 1.25 * max(last, 1.0):
            for ax in axes:
                ax.axvline(tl.budget_s / scale, color="black", lw=1.2, ls="--")
            axes[0].plot([], [], color="black", ls="--", label="deadline")
        else:
            title += f" (deadline at {_clock(tl.budget_s, sign=True)}, off the chart)"
    axes[0].set_title(title, pad=16)
    for ax in axes[1:]:
        ax.set_ylim(bottom=0)  # amounts from zero: a drop from 47 to 6 GiB must look like one
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px;vertical-align:top}
th{background:#f3f3f3}
img{max-width:100%}
.hint{background:#fff7e0;border:1px solid #e8c060;padding:0.6em 1em}
"""


def render_html(summary: Dict[str, Any], png: Optional[bytes]) -> str:
    """One self-contained HTML page: the tables and the figure as a base64 data URI."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<title>session-watchdog report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>session-watchdog report</h1>",
             f"<p>{summary['input']['samples']} samples from "
             f"{esc(', '.join(summary['input']['files']))}</p>"]
    for title, headers, rows in tables(summary):
        parts.append(f"<h2>{esc(title)}</h2>")
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
    if png:
        data = base64.b64encode(png).decode("ascii")
        parts.append("<h2>Timeline</h2>")
        parts.append(f"<img alt=\"session timeline\" src=\"data:image/png;base64,{data}\">")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


