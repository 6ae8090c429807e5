"""The summary: one session's streamed figures in, a dict out (pure), and its text tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from session_watchdog.report.aggregate import InputBound, percentile_of_counts
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
    _round,
    _Session,
    _str,
    expand_paths,
    read_events,
)

# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Report:
    """The summary, the chosen session's timeline, and every session's (for a stitched view).

    ``sessions``: (session start, columns) per session in time order; ``stitched``: draw them as
    one training on one wall-clock axis (the default when no ``--session`` was asked for).
    """

    summary: Dict[str, Any]
    timeline: Timeline
    sessions: List[Tuple[Optional[float], Timeline]] = field(default_factory=list)
    stitched: bool = False


def load(paths: Sequence[Path], *, rotated: bool = True, session: int = -1,
         price_per_hour: Optional[float] = None, gpu_idle_pct: float = GPU_IDLE_PCT) -> Report:
    """Read the logs and summarise one session (the last by default; 1-based, negative from the end)."""
    files = expand_paths(paths, rotated)
    stats = InputStats()
    sessions: List[_Session] = [_Session(None, gpu_idle_pct)]
    for event in read_events(files, stats):
        name = event.get("event")
        current = sessions[-1]
        if not isinstance(name, str):
            stats.bad_events += 1
        elif name == "sample":
            if not current.sample(event):
                stats.bad_events += 1
        elif name in ("decision", "action"):
            if not current.marker(event, name):
                stats.bad_events += 1
        elif name == "daemon_started":
            start = _num(event.get("session_start"))
            known = current.session_start()
            # A start far from the current one, or one after everything the current session
            # logged (two short runtimes, like the demo's, start less than a minute apart).
            seen_to = known + current.tl.last_s if known is not None and \
                current.tl.last_s is not None else None
            if start is not None and known is not None and not current.empty and (
                    abs(start - known) > SESSION_TOLERANCE_S
                    or (seen_to is not None and start > seen_to and start - known > 1.0)):
                current = _Session(start, gpu_idle_pct)
                sessions.append(current)
            elif start is not None and current.start is None:
                current.start = start
            current.started(event)
        elif name == "daemon_stopped":
            current.stopped(event)
        elif name in SUPERVISE_EVENTS:
            current.supervised(event, name)
        elif name == "tick_failed":
            current.ticks_failed += 1
        elif name == "tick_missed":
            current.ticks_missed += 1
        elif name not in QUIET_EVENTS:
            stats.unknown_events += 1
            stats.unknown_names[name] = stats.unknown_names.get(name, 0) + 1
    for s in sessions:  # what the figure needs besides the columns
        s.finish()
        start_s = s.session_start()
        s.tl.interval_s = s.interval_s
        s.tl.checkpoints = [(c["at"] - start_s, c["step"]) for c in s.checkpoints.values()
                            if c["at"] is not None and start_s is not None]
    if len(sessions) > 1 and sessions[0].empty:
        sessions.pop(0)
    # Logs of several runtimes may be named in any order: one training is in session-start order.
    sessions.sort(key=lambda s: (s.session_start() is None, s.session_start() or 0.0))
    count = len(sessions)
    index = session - 1 if session > 0 else count + session
    if not 0 <= index < count:
        raise ReportError(f"--session {session} is out of range: the log holds {count} "
                          f"session{'s' if count != 1 else ''}")
    chosen = sessions[index]
    torn_end = stats.torn_at_end and index == count - 1  # an earlier session ended otherwise
    summary = _summarize(chosen, stats, index + 1, count, price_per_hour, gpu_idle_pct, torn_end)
    each = [summary if s is chosen else _summarize(
        s, stats, k + 1, count, price_per_hour, gpu_idle_pct,
        stats.torn_at_end and k == count - 1) for k, s in enumerate(sessions)]
    summary["training"] = training_across(sessions, each)
    summary["headline"] = headline(summary, summary["training"])
    return Report(summary, chosen.tl, [(s.session_start(), s.tl) for s in sessions],
                  stitched=session == -1 and count > 1)


# --------------------------------------------------------------------------------------------
# One training across sessions, and the headline


def _steps_lost(s: _Session, next_first_step: Optional[int]) -> Optional[int]:
    """Steps done in ``s`` that the next session did not start from (or, for the last session,
    that no checkpoint holds unless the trainer completed or stopped with a checkpoint)."""
    last = s.trainer_step
    if last is None:
        return None
    if next_first_step is not None:
        return max(0, last - next_first_step)
    if s.trainer_state in ("completed", "stopped"):
        return 0
    saved = [c["step"] for c in s.checkpoints.values() if c["step"] is not None]
    return max(0, last - max(saved)) if saved else last


def training_across(sessions: Sequence[_Session], summaries: Sequence[Dict[str, Any]]
                    ) -> Dict[str, Any]:
    """One training over every session of the logs: steps, losses at each boundary, idle cost."""
    rows = []
    for k, (s, summ) in enumerate(zip(sessions, summaries)):
        following = sessions[k + 1].first_step if k + 1 < len(sessions) else None
        idle = summ["gpu_idle"]
        rows.append({
            "session": k + 1, "start_utc": summ["session"]["start_utc"],
            "elapsed_s": summ["session"]["elapsed_s"], "first_step": s.first_step,
            "last_step": s.trainer_step, "trainer_state": s.trainer_state,
            "checkpoints": summ["checkpoints"]["count"],
            "steps_lost": _steps_lost(s, following),
            "gpu_idle_s": idle["idle_s"] if summ["gpus"] else None, "gpu_idle_cost": idle["cost"],
            "ended": summ["ended"]["code"],
        })
    reasons: Dict[str, int] = {}
    for s in sessions:
        for reason, n in s.acked_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
    distinct = len({key for s in sessions for key in s.checkpoints})
    if distinct > sum(reasons.values()):
        reasons["by the trainer itself"] = distinct - sum(reasons.values())
    lost = [r["steps_lost"] for r in rows]
    costs = [r["gpu_idle_cost"] for r in rows]
    steps = [r["last_step"] for r in rows if r["last_step"] is not None]
    return {
        "sessions": len(rows), "total_steps": steps[-1] if steps else None,
        "steps_lost": None if any(v is None for v in lost) and all(v is None for v in lost)
        else sum(v for v in lost if v is not None),
        "gpu_idle_s": _round(sum(r["gpu_idle_s"] or 0.0 for r in rows), 3),
        "gpu_idle_cost": None if all(c is None for c in costs)
        else round(sum(c for c in costs if c is not None), 4),
        # A session's first reading repeats the checkpoint the one before took: count it once.
        "checkpoints": len({key for s in sessions for key in s.checkpoints}),
        "checkpoint_reasons": reasons,
        "list": rows,
    }


def headline(summary: Dict[str, Any], training: Dict[str, Any]) -> Dict[str, Any]:
    """What happened and what it cost, first: the lines a user reads in the morning (issue 16)."""
    ck, idle, ended, tr = (summary[k] for k in ("checkpoints", "gpu_idle", "ended", "trainer"))
    lines = []
    state = tr["state"] or "no trainer seen"
    step = "" if tr["step"] is None else f" at step {tr['step']}"
    if training["sessions"] > 1:
        lines.append(f"Training {state}{step}, over {training['sessions']} sessions")
    else:
        lines.append(f"Training {state}{step}")
    lost = training["steps_lost"]
    lines.append("Steps lost: " + ("unknown (no step reported)" if lost is None else str(lost)))
    why = ", ".join(f"{n} {reason}" if reason.startswith("by ") else f"{n} requested ({reason})"
                    for reason, n in training["checkpoint_reasons"].items())
    lines.append(f"Checkpoints: {training['checkpoints']}" + (f" ({why})" if why else ""))
    lines.append(f"Ended: {ended['text']}")
    done = summary["completion"]
    if done["completed_at_s"] is not None:
        if done["released_after_s"] is not None:
            lines.append("Training completed -> runtime released: "
                         + human_duration(done["released_after_s"]))
        else:
            lines.append("Runtime not released by the watchdog: held "
                         f"{human_duration(done['held_after_s'])} after training completed, "
                         "until the log ends")
    if not summary["gpus"]:
        lines.append("GPU idle: no GPU readings")
    else:
        cost = training["gpu_idle_cost"]
        lines.append(f"GPU idle: {human_duration(training['gpu_idle_s'])}"
                     + ("" if cost is None else
                        f", cost {cost:.2f} at {idle['price_per_hour']:g}/h")
                     + ("" if cost is not None or not training["gpu_idle_s"]
                        else " (cost: give --price-per-hour)"))
    gaps = summary["monitoring_gaps"]
    if gaps["count"]:
        lines.append(f"Monitoring gaps: {gaps['count']}, {human_duration(gaps['total_s'])} "
                     "without readings")
    return {"lines": lines, "steps_lost": lost, "completion": done}


# --------------------------------------------------------------------------------------------
# The summary (pure: columns in, dict out)


def percentile(values: Sequence[float], pct: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default, Excel's PERCENTILE.INC)."""
    counts: Dict[float, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return percentile_of_counts(counts, pct)


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _summarize(s: _Session, stats: InputStats, ordinal: int, count: int,
               price_flag: Optional[float], gpu_idle_pct: float, torn_end: bool) -> Dict[str, Any]:
    tl = s.tl
    start = s.session_start()
    last_s = tl.last_s
    budget = tl.budget_s
    remaining = s.last_remaining
    if remaining is None and budget is not None and last_s is not None:
        remaining = budget - last_s

    gpus = []
    for index in sorted(s.gpus):
        gpu = s.gpus[index]
        gpus.append({
            "index": index, "name": tl.gpu_names[index], "samples": gpu.known,
            "unknown_samples": tl.samples - gpu.known,
            "util_mean_pct": _round(gpu.util_sum / gpu.known) if gpu.known else None,
            "util_p50_pct": _round(gpu.util.percentile(50)),
            "util_p95_pct": _round(gpu.util.percentile(95)),
            "mem_peak_bytes": gpu.mem_peak,
            "mem_total_bytes": tl.gpu_mem_total[index],
        })

    idle_s, known_s = s.flow.idle_s, s.flow.known_s  # gpu_idle_pct: the session's (load())
    price: Optional[float]
    price_source: Optional[str]
    if price_flag is not None:
        price, price_source = price_flag, "flag"
    elif s.price_per_hour is not None:
        price, price_source = s.price_per_hour, "log"
    else:
        price = PLATFORM_PRICE_PER_HOUR.get(s.platform or "")
        price_source = "platform" if price is not None else None

    peak_used = int(s.ram_peak[0]) if s.ram_peak is not None else None
    limit = int(s.ram_limit) if s.ram_limit is not None else None
    peak_at = s.ram_peak[1] if s.ram_peak is not None else None

    disks = []
    for path in tl.disk_free:
        low = s.disk_low.get(path)
        disks.append({"path": path,
                      "min_free_bytes": int(low[0]) if low is not None else None,
                      "total_bytes": tl.disk_total[path],
                      "min_free_at_s": low[1] if low is not None else None})

    ckpts = list(s.checkpoints.values())
    durations = [c["duration_s"] for c in ckpts if c["duration_s"] is not None]
    sizes = [c["bytes"] for c in ckpts if c["bytes"] is not None]

    gaps = s.flow.gaps
    requested = sum(s.acked_reasons.values())
    reasons = dict(sorted(s.acked_reasons.items()))
    if len(ckpts) > requested:
        reasons["by the trainer itself"] = len(ckpts) - requested
    held = None
    if s.completed_at_s is not None and last_s is not None:
        held = (s.released_at_s if s.released_at_s is not None else last_s) - s.completed_at_s

    summary: Dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "input": {
            "files": stats.files, "lines": stats.lines, "events": stats.events,
            "samples": tl.samples, "torn_lines": stats.torn_lines,
            "invalid_lines": stats.invalid_lines, "unknown_events": stats.unknown_events,
            "unknown_event_names": dict(sorted(stats.unknown_names.items())),
            "bad_events": stats.bad_events, "sessions": count, "session": ordinal,
        },
        "session": {
            "platform": s.platform,
            "start": _round(start, 3), "start_utc": _iso(start),
            "end": _round(None if start is None or last_s is None else start + last_s, 3),
            "end_utc": _iso(None if start is None or last_s is None else start + last_s),
            "first_sample_s": _round(tl.first_s, 3),
            "elapsed_s": _round(last_s, 3), "budget_s": budget,
            "used_pct": _round(100.0 * last_s / budget) if budget and last_s is not None else None,
            "remaining_s": _round(remaining, 3),
            "daemon_starts": s.daemon_starts, "daemon_stops": s.daemon_stops,
            "ticks_failed": s.ticks_failed, "ticks_missed": s.ticks_missed,
        },
        "gpus": gpus,
        "gpu_idle": {
            "threshold_pct": gpu_idle_pct, "idle_s": _round(idle_s, 3),
            "known_s": _round(known_s, 3), "price_per_hour": price, "price_source": price_source,
            "cost": None if price is None else round(idle_s / 3600.0 * price, 4),
        },
        "ram": {
            "source": s.ram_source, "limit_bytes": limit, "peak_used_bytes": peak_used,
            "peak_used_pct": _round(100.0 * peak_used / limit) if peak_used is not None and limit
            else None,
            "peak_at_s": peak_at,
            "oom_kills": s.oom_increase if s.oom_last is not None else None,
            "oom_kills_counter": s.oom_last,
        },
        "disks": disks,
        "checkpoints": {
            "count": len(ckpts),
            "duration_mean_s": _round(sum(durations) / len(durations), 3) if durations else None,
            "duration_max_s": max(durations) if durations else None,
            "bytes_last": ckpts[-1]["bytes"] if ckpts else None,
            "bytes_max": max(sizes) if sizes else None,
            "list": [{**c, "at_s": _round(c["at"] - start, 3)
                      if c["at"] is not None and start is not None else None} for c in ckpts],
            "reasons": reasons,
        },
        "monitoring_gaps": {
            "count": len(gaps), "total_s": _round(sum(b - a for a, b in gaps), 3),
            "ticks_missed": s.ticks_missed,
            "list": [{"from_s": _round(a, 3), "to_s": _round(b, 3), "duration_s": _round(b - a, 3)}
                     for a, b in gaps],
        },
        "completion": {
            "completed_at_s": _round(s.completed_at_s, 3),
            "released_at_s": _round(s.released_at_s, 3),
            "released_after_s": _round(held, 3) if s.released_at_s is not None else None,
            "held_after_s": _round(held, 3) if s.released_at_s is None else None,
        },
        "trainer": {"state": s.trainer_state, "step": s.trainer_step, "epoch": s.trainer_epoch},
        "input_bound": _input_bound_summary(s.flow.bound),
        "events": [m.to_json() for m in tl.markers],
        "ended": _ending(s, stats, last_s, remaining, torn_end),
    }
    return summary


def input_bound(elapsed: Sequence[float], dt: Sequence[float], training: Sequence[bool],
                mean_util: Sequence[Optional[float]], threshold_pct: float = INPUT_BOUND_PCT,
                window_s: float = INPUT_BOUND_WINDOW_S) -> Dict[str, Any]:
    """Is training input-bound (issue 6: under 40 % mean GPU utilisation for 10+ minutes)?

    The columns of a session (sample *i* covers ``dt[i]``, up to the next sample) through
    :class:`.aggregate.InputBound`, which the report feeds one sample at a time.
    """
    bound = InputBound(threshold_pct, window_s)
    for row in zip(elapsed, dt, training, mean_util):
        bound.add(*row)
    return _input_bound_summary(bound)


def _input_bound_summary(bound: InputBound) -> Dict[str, Any]:
    """The lowest window, with the hint."""
    worst = bound.worst
    hint = None
    if worst is not None:
        hint = (f"training ran {_clock(worst[2] - worst[1])} at a mean GPU utilization of "
                f"{worst[0]:.0f}% (from {_clock(worst[1], sign=True)}): the GPU waits for data. "
                "Try more DataLoader workers (num_workers), pin_memory=True, "
                "persistent_workers=True, and data on the local disk")
    return {
        "suspected": worst is not None, "threshold_pct": bound.threshold_pct,
        "window_s": bound.window_s, "training_s": _round(bound.training_s, 3),
        "training_util_mean_pct": _round(bound.weighted / bound.known_s) if bound.known_s
        else None,
        "first_at_s": bound.first_at,
        "worst_window_util_pct": _round(worst[0]) if worst else None,
        "worst_window_from_s": worst[1] if worst else None,
        "worst_window_to_s": worst[2] if worst else None,
        "hint": hint,
    }


def _ending(s: _Session, stats: InputStats, last_s: Optional[float],
            remaining: Optional[float], torn_end: bool) -> Dict[str, Any]:
    """How the session ended, from the last events: a code and one sentence."""
    trainer = ""
    if s.trainer_state is not None:
        trainer = f"trainer {s.trainer_state} at step {s.trainer_step}"
        if s.stop_acked:
            trainer += f" after acknowledging a stop request ({s.stop_acked})"
    if s.empty and stats.events == 0:
        code, text = "empty", "the log holds no events"
    elif s.end_action is not None and s.samples_after_end <= 1:
        # The end transaction's last step (end_* actions; one more tick may follow it).
        mark = s.end_action
        code = "end_action"
        text = f"the watchdog's end transaction: {mark.kind} ({mark.reason or 'no reason'})"
    elif torn_end:
        code = "torn"
        text = "the log ends mid-line: the runtime died while the watchdog was writing"
    elif s.last_lifecycle == "daemon_stopped":
        code, text = "daemon_stopped", "the watchdog stopped cleanly"
    else:
        code = "log_stops"
        text = "the log stops without a stop event: the runtime or the watchdog died"
    if code in ("torn", "log_stops") and remaining is not None and s.interval_s is not None \
            and remaining <= 2 * s.interval_s:
        text += " at the session limit"
    if trainer:
        text += f"; {trainer}"
    return {"code": code, "at_s": _round(last_s, 3), "trainer_state": s.trainer_state,
            "trainer_step": s.trainer_step, "stop_acked": s.stop_acked, "text": text}


# --------------------------------------------------------------------------------------------
# Text


def _clock(seconds: Optional[float], sign: bool = False) -> str:
    """``3725`` -> ``1h02m05s``; ``sign`` adds ``+`` (a place on the session clock)."""
    if seconds is None:
        return "-"
    total = int(round(abs(seconds)))
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    text = f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")
    return ("+" if sign and seconds >= 0 else "-" if seconds < 0 else "") + text


def human_bytes(value: Optional[float]) -> str:
    """``17408`` -> ``17.0 KiB``: binary units, never "0.0 GiB" for a small size (issue 16)."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024.0 or unit == "GiB":
            break
        size /= 1024.0
    if unit == "GiB" and abs(size) >= 1024.0:
        return f"{size / 1024.0:.1f} TiB"
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def human_duration(seconds: Optional[float]) -> str:
    """``0.05`` -> ``50 ms``, ``12.3`` -> ``12.3 s``, ``125`` -> ``2 min 05 s``,
    ``7300`` -> ``2 h 01 min``."""
    if seconds is None:
        return "-"
    s = abs(float(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 1.0:
        return f"{sign}{s * 1000:.0f} ms"
    if s < 60.0:
        return f"{sign}{s:.1f} s" if s < 10.0 else f"{sign}{s:.0f} s"
    total = int(round(s))
    if total < 3600:
        return f"{sign}{total // 60} min {total % 60:02d} s"
    return f"{sign}{total // 3600} h {total % 3600 // 60:02d} min"


_gib = human_bytes  # sizes in tables: human units


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}%"


Table = Tuple[str, List[str], List[List[str]]]  # (title, headers, rows)


def tables(summary: Dict[str, Any]) -> List[Table]:
    """The summary as titled tables of strings (the text and HTML views share them)."""
    ses, idle, ram, ck, ib, inp = (summary[k] for k in (
        "session", "gpu_idle", "ram", "checkpoints", "input_bound", "input"))
    budget = ses["budget_s"]
    used = _clock(ses["elapsed_s"]) + (
        f" of {_clock(budget)} ({ses['used_pct']:.1f}%), {_clock(ses['remaining_s'])} left"
        if budget else " (no budget)")
    cost = "" if idle["cost"] is None else (
        f"; cost {idle['cost']:.2f} at {idle['price_per_hour']:g}/h")
    out: List[Table] = [
        ("Session", ["", ""], [
            ["platform", str(ses["platform"] or "-")],
            ["start", str(ses["start_utc"] or "-")],
            ["end", str(ses["end_utc"] or "-")],
            ["time used", used],
            ["ended", summary["ended"]["text"]],
            [f"GPU idle (< {idle['threshold_pct']:g}%)",
             f"{human_duration(idle['idle_s'])} of {human_duration(idle['known_s'])} with known "
             f"readings{cost}" if summary["gpus"] else "no GPU readings"],
            ["RAM peak", f"{_gib(ram['peak_used_bytes'])} of {_gib(ram['limit_bytes'])} "
             f"({_pct(ram['peak_used_pct'])}, {ram['source'] or '-'}) at "
             f"{_clock(ram['peak_at_s'], sign=True)}; OOM kills: "
             f"{'-' if ram['oom_kills'] is None else ram['oom_kills']}"],
            ["checkpoints", f"{ck['count']}, duration mean {human_duration(ck['duration_mean_s'])} "
             f"max {human_duration(ck['duration_max_s'])}, last {_gib(ck['bytes_last'])}, "
             f"largest {_gib(ck['bytes_max'])}"],
            ["trainer", f"{summary['trainer']['state'] or '-'} at step "
             f"{summary['trainer']['step'] if summary['trainer']['step'] is not None else '-'}"],
        ]),
        ("Checkpoints", ["at", "step", "duration", "size", "path"], [
            [_clock(c["at_s"], sign=True), "-" if c["step"] is None else str(c["step"]),
             human_duration(c["duration_s"]), _gib(c["bytes"]), str(c["path"] or "-")]
            for c in ck["list"]]),
        ("GPUs", ["GPU", "name", "util mean", "p50", "p95", "unknown", "mem peak", "mem total"], [
            [str(g["index"]), str(g["name"] or "-"), _pct(g["util_mean_pct"]),
             _pct(g["util_p50_pct"]), _pct(g["util_p95_pct"]), str(g["unknown_samples"]),
             _gib(g["mem_peak_bytes"]), _gib(g["mem_total_bytes"])] for g in summary["gpus"]]),
        ("Disks", ["path", "min free", "total", "at"], [
            [d["path"], _gib(d["min_free_bytes"]), _gib(d["total_bytes"]),
             _clock(d["min_free_at_s"], sign=True)] for d in summary["disks"]]),
        ("Decisions and actions", ["at", "event", "kind", "reason", "action", "seq", "message"], [
            [_clock(e["at_s"], sign=True), e["event"], e["kind"], e["reason"] or "-",
             e["action"] or "-", "-" if e["seq"] is None else str(e["seq"]), e["message"]]
            for e in summary["events"]]),
    ]
    if ib["hint"]:
        out.insert(1, ("Hint: input-bound", [""], [[ib["hint"]]]))
    head = summary.get("headline")
    if head:
        out.insert(0, ("What happened", [""], [[line] for line in head["lines"]]))
    training = summary.get("training")
    if training and training["sessions"] > 1:
        out.insert(1, ("Training across sessions", [
            "session", "start", "length", "steps", "checkpoints", "steps lost at its end",
            "GPU idle", "idle cost", "ended"], [
            [str(r["session"]), str(r["start_utc"] or "-"), human_duration(r["elapsed_s"]),
             f"{'-' if r['first_step'] is None else r['first_step']} -> "
             f"{'-' if r['last_step'] is None else r['last_step']}", str(r["checkpoints"]),
             "-" if r["steps_lost"] is None else str(r["steps_lost"]),
             human_duration(r["gpu_idle_s"]),
             "-" if r["gpu_idle_cost"] is None else f"{r['gpu_idle_cost']:.2f}", r["ended"]]
            for r in training["list"]]))
    gaps = summary.get("monitoring_gaps")
    if gaps and gaps["count"]:
        out.append(("Monitoring gaps (no readings)", ["from", "to", "length"], [
            [_clock(g["from_s"], sign=True), _clock(g["to_s"], sign=True),
             human_duration(g["duration_s"])] for g in gaps["list"]]))
    skipped = [(inp["torn_lines"], "torn lines"), (inp["invalid_lines"], "invalid lines"),
               (inp["unknown_events"], "unknown events"), (inp["bad_events"], "events missing fields")]
    rows = [[str(n), what] for n, what in skipped if n]
    rows += [[str(n), f"  {name}"] for name, n in inp["unknown_event_names"].items()]
    if inp["sessions"] > 1:
        rows.append([str(inp["sessions"]), f"sessions in the log; this is number {inp['session']}"
                                           " (--session N)"])
    if rows:
        out.append(("Skipped input", ["count", "what"], rows))
    return out


def render_text(summary: Dict[str, Any]) -> str:
    """Compact plain-text tables."""
    lines = [f"session-watchdog report: {summary['input']['samples']} samples from "
             f"{len(summary['input']['files'])} file(s)"]
    for title, headers, rows in tables(summary):
        if not rows:
            continue
        lines.append("")
        lines.append(title)
        show_headers = any(headers)
        widths = [max([len(headers[i]) if show_headers else 0] + [len(r[i]) for r in rows])
                  for i in range(len(headers))]
        if show_headers:
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


