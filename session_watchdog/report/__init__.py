"""JSONL logs -> a session summary (text or JSON), a timeline figure (PNG), a one-file HTML report.

``session-watchdog report LOG... [--json] [--out report.html|report.png]`` reads one or more
JSONL files written by :mod:`session_watchdog.log` (rotated siblings and gzip included) in one
pass, keeping nothing per sample (figures streamed, the timeline downsampled while reading: a
week's log takes the memory of a day's), and summarises the session: time used against the
budget, GPU utilisation and memory, GPU-idle time and its cost, RAM, disks, checkpoints, every
decision and action, how the session ended, and an input-bound hint.
``session-watchdog tail LOG [--follow]`` prints one compact line per new sample.

Reading rules: see :mod:`.reading`.

matplotlib is imported only to draw (the optional ``plot`` extra) and only through the Agg canvas.

The package: :mod:`.reading` (files, lines, one session's streamed figures), :mod:`.aggregate`
(the streaming aggregates, pure), :mod:`.summary` (figures in, summary dict and text tables out,
pure), :mod:`.render` (figure and HTML), :mod:`.tail`; this module holds the command line and
re-exports the public names.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

# The names below are re-exported lazily (PEP 562): `session-watchdog --help` and every other
# command build this package's subparsers, and reading/summary/render/tail (gzip, html, datetime,
# the report's dataclasses) cost start-up time and RSS that only `report` and `tail` need
# (issue 17). `from session_watchdog.report import load` and `report.load` work as before.
_LAZY = {
    "reading": (
        "EXIT_OK", "EXIT_USAGE", "GAP_FACTOR", "GPU_IDLE_PCT", "HANDLED_EVENTS", "INPUT_BOUND_PCT",
        "INPUT_BOUND_WINDOW_S", "PLATFORM_PRICE_PER_HOUR", "QUIET_EVENTS", "REPORT_VERSION",
        "SESSION_TOLERANCE_S", "SUPERVISE_EVENTS", "InputStats", "Marker", "ReportError",
        "Timeline", "_dict", "_int", "_list", "_num", "_open_log", "_rotation_key", "_round",
        "_Session", "_str", "expand_paths", "read_events"),
    "render": ("PlotUnavailable", "render_html", "render_png", "timeline_figure"),
    "summary": ("Report", "Table", "_clock", "_ending", "_summarize", "input_bound", "load",
                "percentile", "render_text", "tables"),
    "tail": ("format_sample", "tail"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from session_watchdog.report.reading import (  # noqa: F401
        EXIT_OK,
        EXIT_USAGE,
        GAP_FACTOR,
        GPU_IDLE_PCT,
        HANDLED_EVENTS,
        INPUT_BOUND_PCT,
        INPUT_BOUND_WINDOW_S,
        PLATFORM_PRICE_PER_HOUR,
        QUIET_EVENTS,
        REPORT_VERSION,
        SESSION_TOLERANCE_S,
        SUPERVISE_EVENTS,
        InputStats,
        Marker,
        ReportError,
        Timeline,
        _dict,
        _int,
        _list,
        _num,
        _open_log,
        _rotation_key,
        _round,
        _Session,
        _str,
        expand_paths,
        read_events,
    )
    from session_watchdog.report.render import (  # noqa: F401
        PlotUnavailable,
        render_html,
        render_png,
        timeline_figure,
    )
    from session_watchdog.report.summary import (  # noqa: F401
        Report,
        Table,
        _clock,
        _ending,
        _summarize,
        input_bound,
        load,
        percentile,
        render_text,
        tables,
    )
    from session_watchdog.report.tail import (  # noqa: F401
        format_sample,
        tail,
    )


def _load(module: str) -> Any:
    """Import the submodule ``module`` and bind its re-exported names here.

    All of them, after the import: importing ``.tail`` sets this package's ``tail`` to the
    submodule, and the re-exported ``tail`` is the function.
    """
    import importlib

    imported = importlib.import_module(f"{__name__}.{module}")
    for name in _LAZY[module]:
        globals()[name] = getattr(imported, name)  # the next access is a plain global
    return imported


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load(module)
    return globals()[name]


# --------------------------------------------------------------------------------------------
# CLI (wired into cli.py as the `report` and `tail` subcommands)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``report LOG... [--json] [--out FILE] [--price-per-hour P] ...``."""
    parser = sub.add_parser(
        "report", help="summarise JSONL logs: tables, JSON, a timeline PNG or an HTML report",
        description="Summarise one session from JSONL logs (rotated and .gz files included).")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="JSONL log file(s)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--out", metavar="FILE",
                        help="also write report.png (timeline) or report.html (tables + timeline)")
    parser.add_argument("--price-per-hour", type=_non_negative, metavar="PRICE",
                        help="runtime price per hour for the cost of GPU-idle time "
                             "(default: from the log, else the platform's where known)")
    # The watchdog's own default (reading.GPU_IDLE_PCT is the same figure): config is imported
    # by every command already, reading is not (start-up, issue 17).
    from session_watchdog.config import Config

    idle_pct = Config.gpu_idle_pct
    parser.add_argument("--gpu-idle-pct", type=_non_negative, default=idle_pct, metavar="PCT",
                        help=f"every GPU below this is idle (default {idle_pct:g})")
    parser.add_argument("--session", type=int, default=-1, metavar="N",
                        help="which session of the log to report: 1 = first, -1 = last (default)")
    parser.add_argument("--no-rotated", dest="rotated", action="store_false",
                        help="read only the files named, not their rotated siblings (x.jsonl.1...)")


def run(args: argparse.Namespace) -> int:
    """The ``report`` subcommand: summary on stdout, the figure/HTML to ``--out``; 2 on bad input."""
    from session_watchdog.report.reading import EXIT_OK, EXIT_USAGE, ReportError
    from session_watchdog.report.render import render_html, render_png
    from session_watchdog.report.summary import load, render_text

    try:
        if args.session == 0:
            raise ReportError("--session 0 is invalid: 1 is the first session, -1 the last")
        out_kind = None
        if args.out:
            suffix = Path(args.out).suffix.lower()
            out_kind = {".png": "png", ".html": "html", ".htm": "html"}.get(suffix)
            if out_kind is None:
                raise ReportError(f"--out {args.out!r}: expected a .png or .html file name")
            if not Path(args.out).resolve().parent.is_dir():
                raise ReportError(f"cannot write {args.out}: its directory does not exist")
        report = load([Path(p) for p in args.logs], rotated=args.rotated, session=args.session,
                      price_per_hour=args.price_per_hour, gpu_idle_pct=args.gpu_idle_pct)
        _refuse_no_log(report.summary["input"])
        png = render_png(report) if out_kind is not None else None
        if out_kind is not None:
            assert png is not None
            data = png if out_kind == "png" else render_html(report.summary, png).encode("utf-8")
            try:
                Path(args.out).write_bytes(data)
            except OSError as err:
                raise ReportError(f"cannot write {args.out}: {err.strerror or err}") from None
    except ReportError as err:
        print(f"session-watchdog: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.summary, indent=2))
    else:
        print(render_text(report.summary))
    if args.out:
        print(f"session-watchdog: wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def _refuse_no_log(inp: Dict[str, Any]) -> None:
    """An empty file, or one with no watchdog event in it, is a wrong path, not an empty report
    (issue 11: `report notes.txt` said exit 0 with an empty report)."""
    from session_watchdog.report.reading import ReportError

    names = ", ".join(inp["files"]) or "the files given"
    fix = "give the watchdog's JSONL log (`session-watchdog status` prints its path)"
    if inp["lines"] == 0:
        raise ReportError(f"{names}: empty, nothing to report; {fix}")
    if inp["events"] == 0:
        raise ReportError(f"{names}: not a JSONL log ({inp['lines']} lines, none a JSON object); "
                          f"{fix}")
    if inp["unknown_events"] + inp["bad_events"] >= inp["events"]:
        raise ReportError(f"{names}: no session-watchdog event in {inp['events']} JSON lines; {fix}")


def add_tail_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tail LOG [--follow] [--for DURATION] [--lines N]``."""
    parser = sub.add_parser("tail", help="a compact live view of the newest samples of a log",
                            description="One line per sample: elapsed, GPU util/memory, RAM "
                                        "available, trainer step/state; decisions in between.")
    parser.add_argument("log", metavar="LOG", help="the JSONL log file being written")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing appended samples until Ctrl-C")
    parser.add_argument("--for", dest="tail_for", metavar="DURATION",
                        help="with --follow: stop after this long (e.g. 30s, 5m)")
    parser.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                        help="lines of history to print first (default 10)")


def run_tail(args: argparse.Namespace) -> int:
    """The ``tail`` subcommand."""
    from session_watchdog.config import parse_duration
    from session_watchdog.report.reading import EXIT_USAGE, ReportError
    from session_watchdog.report.tail import tail

    _load("tail")  # this package's `tail` is the function again, not the submodule
    try:
        for_s = None
        if args.tail_for:
            try:
                for_s = parse_duration(args.tail_for)
            except ValueError as err:
                raise ReportError(f"--for {args.tail_for!r} is invalid: {err}") from None
        return tail(Path(args.log), follow=args.follow, for_s=for_s, lines=args.lines)
    except ReportError as err:
        print(f"session-watchdog: error: {err}", file=sys.stderr)
        return EXIT_USAGE


__all__ = [
    "Report", "ReportError", "Timeline", "load", "expand_paths", "read_events", "percentile",
    "input_bound", "tables", "render_text", "render_png", "render_html", "format_sample", "tail",
    "add_parser", "run", "add_tail_parser", "run_tail",
]
