"""``status()``: the session clock, machine, trainer, last checkpoint and pending decisions, as an
HTML table in a notebook and aligned text in a terminal.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from session_watchdog import channel
from session_watchdog.config import ConfigError, format_duration, load_config
from session_watchdog.notebook.kernel import _TERMINAL_STATES, _running_handle, _state

if TYPE_CHECKING:
    from session_watchdog.notebook.handle import WatchdogHandle


# --------------------------------------------------------------------------------------------
# status()


def _fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "?"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


@dataclass(frozen=True)
class Status:
    """What ``status()`` returns: an HTML table in a notebook, aligned text in a terminal.

    Attributes:
        rows: (label, value, level) with level "" or "warn" (highlighted).
    """

    rows: Tuple[Tuple[str, str, str], ...]

    def value(self, label: str) -> Optional[str]:
        """The value of the first row called ``label``, or None."""
        for key, value, _ in self.rows:
            if key == label:
                return value
        return None

    def __str__(self) -> str:
        width = max((len(key) for key, _, _ in self.rows), default=0)
        return "\n".join(f"{key:<{width}}  {value}" for key, value, _ in self.rows)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        cells = []
        for key, value, level in self.rows:
            style = ' style="color:#b00020;text-align:left"' if level == "warn" else \
                ' style="text-align:left"'
            cells.append(f'<tr><th style="text-align:left">{html.escape(key)}</th>'
                         f"<td{style}>{html.escape(value)}</td></tr>")
        return ('<table class="session-watchdog-status">'
                "<caption>session-watchdog</caption>" + "".join(cells) + "</table>")


def status(run_dir: Optional[Path] = None) -> Status:
    """The session clock, GPU, RAM, disk, trainer step, last checkpoint and pending decisions.

    Without a running watchdog it shows what the run directory says (``run_dir`` or the one the
    configuration names).
    """
    handle = _running_handle()
    if handle is not None and (run_dir is None or Path(run_dir) == handle.run_dir):
        return handle.status()
    if run_dir is None and _state().get("last_run_dir") is not None:
        run_dir = _state()["last_run_dir"]  # the run dir of the watchdog stop() just stopped
    if run_dir is None:
        try:
            config = load_config()
        except ConfigError as err:
            return Status((("watchdog", "not running", ""), ("problem", str(err), "warn")))
        run_dir = config.run_dir or channel.default_run_dir(config.run_name)
    return _build_status(Path(run_dir), None)


def _build_status(run_dir: Path, handle: Optional[WatchdogHandle]) -> Status:
    from session_watchdog.cli import collect_status

    rows: List[Tuple[str, str, str]] = []

    def add(key: str, value: str, level: str = "") -> None:
        rows.append((key, value, level))

    running = handle is not None and handle.running
    now = handle.watchdog.session.times().now if running and handle else time.time()
    info: Optional[Dict[str, Any]] = collect_status(run_dir, now) if run_dir.is_dir() else None

    if handle is not None and running:
        wd = handle.watchdog
        add("watchdog", f"running in this kernel ({wd.platform.name}, every "
            f"{wd.config.interval:g}s, {wd.ticks} ticks)")
        _session_rows(add, handle)
    else:
        daemon = (info or {}).get("daemon") or {}
        if info and info.get("daemon_running"):
            add("watchdog", f"running in pid {daemon.get('pid')} ({daemon.get('platform')})")
        else:
            add("watchdog", "not running (session_watchdog.start())", "warn")
        if info and info.get("elapsed_s") is not None:
            budget = info.get("budget_s")
            add("session", f"{format_duration(info['elapsed_s'])} elapsed"
                + (f" of {format_duration(budget)}, {format_duration(info['remaining_s'])} left"
                   if budget else ", no budget"))
    if handle is not None and running:
        _machine_rows(add, handle)
    if info is None:
        add("run dir", f"{run_dir} (does not exist yet)")
        return Status(tuple(rows))
    _trainer_rows(add, info, now)
    if handle is not None and running:
        out = handle.watchdog.state.outstanding
        if out is not None and _request_settled(info, out.seq):
            add("pending request", "none")
        elif out is not None:
            elapsed = handle.watchdog.session.times().elapsed_s
            add("pending request", f"{out.action} #{out.seq} ({out.reason}), sent "
                f"{format_duration(elapsed - out.sent_elapsed)} ago, not acknowledged yet", "warn")
        else:
            add("pending request", "none")
        if handle.watchdog.end_running():
            add("runtime end", "in progress (grace period, then the end action); cancel: "
                "session-watchdog cancel", "warn")
        notices = handle.notices(5)
        handle._notices.take_unseen()  # shown here: the next cell does not print them again
        for notice in notices:
            add("notice", notice.text(), "warn" if notice.kind == "warn" else "")
    elif info.get("outstanding") and not _request_settled(info, info["outstanding"].get("seq")):
        out = info["outstanding"]
        add("pending request", f"{out.get('action')} #{out.get('seq')} ({out.get('reason')})",
            "warn")
    add("run dir", str(run_dir))
    log_file = handle.log_file if handle is not None else ((info.get("daemon") or {})
                                                           .get("log_file"))
    add("log", str(log_file or "-"))
    for problem in info.get("errors", []):
        add("problem", str(problem), "warn")
    return Status(tuple(rows))


def _request_settled(info: Dict[str, Any], seq: Any) -> bool:
    """A request the trainer acknowledged already (the watchdog notices at its next tick), or
    one no trainer will answer: it ended in a final state and holds no run.lock."""
    trainer = info.get("trainer") or {}
    acked = trainer.get("acked_seq")
    if isinstance(acked, int) and isinstance(seq, int) and acked >= seq:
        return True
    return not info.get("trainer_alive") and trainer.get("state") in _TERMINAL_STATES


def _session_rows(add: Callable[..., None], handle: WatchdogHandle) -> None:
    wd = handle.watchdog
    times = wd.session.times()
    budget = wd.config.max_session
    if budget:
        left = budget - times.elapsed_s
        add("session", f"{format_duration(times.elapsed_s)} elapsed of {format_duration(budget)}, "
            f"{format_duration(left)} left", "warn" if left <= handle.stop_lead_s() else "")
        deadline = wd.session.start_wall + budget
        clock = time.strftime("%H:%M", time.localtime(deadline))
        budget_source = ("configured" if handle.requested.max_session is not None
                         else f"{wd.platform.name} default, an upper bound")
        add("deadline", f"~{clock} (in {format_duration(left)}); session start: "
            f"{wd.session_source}; budget: {budget_source}")
    else:
        add("session", f"{format_duration(times.elapsed_s)} elapsed, no budget "
            f"(session start: {wd.session_source})")
    idle = handle.tracker.idle_s()
    if idle is not None:
        config = wd.config
        limits = []
        if config.idle_warn:
            limits.append(f"warning at {format_duration(config.idle_warn)}")
        if config.idle_limit:
            limits.append(f"reclaim ~{format_duration(config.idle_limit)}")
        before = handle.tracker.idle_before_cell_s()
        if handle.tracker.waiting:
            text = "busy (wait() runs)"
        elif before is not None:
            # status() always runs in a cell: the idle time that matters is the one before it.
            text = f"this cell runs; idle {format_duration(before)} before it"
        else:
            text = f"idle {format_duration(idle)}"
        level = "warn" if config.idle_warn and idle >= config.idle_warn else ""
        add("notebook", text + (f" ({', '.join(limits)})" if limits else ""), level)


def _machine_rows(add: Callable[..., None], handle: WatchdogHandle) -> None:
    sample = handle.watchdog.last_sample
    if sample is None:
        add("machine", "waiting for the first reading")
        return
    if sample.gpus:
        for g in sample.gpus:
            if g.error:
                add(f"GPU {g.index}", f"unreadable: {g.error}", "warn")
                continue
            util = "?" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%"
            parts = [f"{g.name or 'GPU'}: {util} util",
                     f"{_fmt_bytes(g.memory_used_bytes)} / {_fmt_bytes(g.memory_total_bytes)}"]
            if g.temperature_c is not None:
                parts.append(f"{g.temperature_c:.0f} C")
            if g.power_w is not None:
                parts.append(f"{g.power_w:.0f} W")
            add(f"GPU {g.index}", ", ".join(parts))
    else:
        add("GPU", "none" if sample.nvml == "ok" else sample.nvml)
    host = sample.host
    if host is not None:
        add("RAM", f"{_fmt_bytes(host.ram_available_bytes)} available of "
            f"{_fmt_bytes(host.ram_total_bytes)} ({host.ram_source})")
    for disk in sample.disks:
        if disk.free_bytes is None:
            add("disk", f"{disk.path}: unreadable ({disk.error})", "warn")
        else:
            add("disk", f"{disk.path}: {_fmt_bytes(disk.free_bytes)} free of "
                f"{_fmt_bytes(disk.total_bytes)}")


def _trainer_rows(add: Callable[..., None], info: Dict[str, Any], now: float) -> None:
    trainer = info.get("trainer") or {}
    if trainer:
        parts = [str(trainer.get("state")), f"step {trainer.get('step')}",
                 f"epoch {trainer.get('epoch')}"]
        if trainer.get("step_time_s"):
            parts.append(f"{trainer['step_time_s']:.3g} s/step")
        parts.append("alive" if info.get("trainer_alive") else "no live process")
        if info.get("trainer_saving"):
            parts.append("saving")
        add("trainer", ", ".join(parts), "warn" if trainer.get("state") == "failed" else "")
    else:
        add("trainer", "none yet (no trainer.json)")
    ckpt = trainer.get("last_checkpoint") or {}
    if ckpt.get("at"):
        add("last checkpoint", f"step {ckpt.get('step')}, {format_duration(now - ckpt['at'])} ago, "
            f"{_fmt_bytes(ckpt.get('bytes'))}: {ckpt.get('path')}")
    else:
        add("last checkpoint", "none")
    from session_watchdog.cli import mirror_rows

    for key, text in mirror_rows(trainer, now):
        add(key, text, "warn" if "failing" in text or "refused" in text else "")
