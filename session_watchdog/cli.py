"""``session-watchdog`` command line: run, status, doctor (and more as the tool grows).

``main(argv) -> int``: exit codes are returned, not raised deep inside. Bad input is exit code 2
with one line naming the problem and the fix; no traceback for user errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from session_watchdog import __version__, channel
from session_watchdog.config import KEYS, Config, ConfigError, format_duration, load_config
from session_watchdog.daemon import DaemonBusyError

EXIT_OK = 0
EXIT_PROBLEM = 1  # doctor found something to fix
EXIT_USAGE = 2  # bad input


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the hint to --help), exit code 2."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# Parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with config keys")
    group = parser.add_argument_group("config keys (also SESSION_WATCHDOG_<KEY> variables)")
    for key in KEYS:
        flag = "--" + key.name.replace("_", "-")
        if key.is_flag:
            group.add_argument(flag, dest=key.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=key.help.replace("%", "%%"))
        else:
            group.add_argument(flag, dest=key.name, metavar=key.metavar,
                               default=argparse.SUPPRESS, help=key.help.replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="session-watchdog",
        description="Watch a GPU training session: checkpoint before the runtime dies, "
                    "release it when training is done.")
    parser.add_argument("--version", action="version", version=f"session-watchdog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run the watchdog (and wrap a command: run -- python train.py)")
    _add_config_flags(run)
    run.add_argument("--for", dest="run_for", metavar="DURATION",
                     help="stop the watchdog after this long (e.g. 2m)")
    run.add_argument("--detach", action="store_true",
                     help="keep running after the terminal/SSH session closes (setsid)")
    run.add_argument("child_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="-- COMMAND...: run COMMAND as a watched child; exit with its exit code")

    attach = sub.add_parser("attach", help="watch a process that is already running")
    _add_config_flags(attach)
    attach.add_argument("--pid", type=int, required=True, help="the training process")
    attach.add_argument("--end-on-exit", action="store_true",
                        help="count the process's exit as success (it does not use the trainer "
                             "Session, so its outcome is otherwise unknown)")
    attach.add_argument("--detach", action="store_true",
                        help="keep running after the terminal/SSH session closes (setsid)")
    attach.add_argument("--for", dest="run_for", metavar="DURATION", help=argparse.SUPPRESS)

    stop = sub.add_parser("stop", help="stop a (detached) watchdog")
    stop.add_argument("--run-dir", metavar="PATH")
    stop.add_argument("--run-name", metavar="NAME", default="default")

    status = sub.add_parser("status", help="show the state of a watched run")
    status.add_argument("--run-dir", metavar="PATH")
    status.add_argument("--run-name", metavar="NAME", default="default")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    cancel = sub.add_parser("cancel", help="cancel a pending end of the runtime (grace period)")
    cancel.add_argument("--run-dir", metavar="PATH")
    cancel.add_argument("--run-name", metavar="NAME", default="default")

    from session_watchdog import report

    report.add_parser(sub)
    report.add_tail_parser(sub)

    from session_watchdog import demo

    demo.add_parser(sub)

    doctor = sub.add_parser("doctor", help="check this machine and say what needs fixing")
    _add_config_flags(doctor)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    return {k.name: getattr(args, k.name) for k in KEYS if hasattr(args, k.name)}


def _load(args: argparse.Namespace) -> Config:
    config_file = Path(args.config) if getattr(args, "config", None) else None
    return load_config(config_file, os.environ, _overrides(args))


# --------------------------------------------------------------------------------------------
# run


def _prepare(args: argparse.Namespace) -> Tuple[Config, Any, Optional[float]]:
    """Config resolved for the detected platform, and --for as seconds."""
    from session_watchdog import platforms
    from session_watchdog.config import parse_duration

    config = _load(args)
    run_for = None
    if getattr(args, "run_for", None):
        try:
            run_for = parse_duration(args.run_for)
        except ValueError as err:
            raise UserError(f"--for {args.run_for!r} is invalid: {err}") from None
    platform = platforms.forced(config.platform, platforms.detect())
    resolved = platforms.resolve(config, platform)
    return resolved, platform, run_for


def _detach(args: argparse.Namespace, config: Config) -> int:
    """Re-start this very command in a new session; say where its log and run dir are."""
    from session_watchdog import wrap

    run_dir = config.run_dir or channel.default_run_dir(config.run_name)
    out = Path(f"{config.log_file}.out")
    argv = wrap.without_flag(args.argv, "--detach")
    if not any(a == "--run-dir" or a.startswith("--run-dir=") for a in wrap.without_flag(argv, "--")):
        argv = [argv[0], "--run-dir", str(run_dir), *argv[1:]]
    pid = wrap.detach(argv, run_dir, out)

    def started() -> bool:
        info = channel.read_json(run_dir / "daemon.json") if (run_dir / "daemon.json").exists() else None
        return bool(info and info.get("pid") == pid and channel.lock_held(run_dir / channel.DAEMON_LOCK))

    if not wrap.wait_until(started, 30.0):
        tail = out.read_text(errors="replace").strip().splitlines()[-1:] if out.exists() else []
        raise UserError(f"the detached watchdog did not start ({'; '.join(tail) or 'no output'}); "
                        f"see {out}")
    print(f"session-watchdog: detached (pid {pid})\n  run dir: {run_dir}\n  log:     "
          f"{config.log_file}\n  output:  {out}\n  status:  session-watchdog status --run-dir "
          f"{run_dir}\n  stop:    session-watchdog stop --run-dir {run_dir}")
    return EXIT_OK


def _configure_log(config: Config) -> None:
    from session_watchdog import log

    try:
        # APScheduler's own warnings go to the JSONL log, not raw onto the console (issue 11)
        log.configure(config.log_file, max_bytes=config.log_max_bytes, backups=config.log_backups,
                      bridge=("apscheduler",))
    except OSError as err:
        raise UserError(f"cannot write the log file {config.log_file}: {err.strerror or err}; "
                        "choose another --log-file") from None


def _signal_notice(config: Config) -> Any:
    """SLURM's `--signal=B:USR1@N`: SIGUSR1 means the job ends in N seconds (main thread only)."""
    if not config.slurm_signal_grace:
        return None, (lambda: None)
    from session_watchdog.preemption import SignalNotice

    notice = SignalNotice(config.slurm_signal_grace)
    return notice, notice.install()


def _pollers(config: Config, platform: Any, signal_notice: Any) -> List[Any]:
    from session_watchdog.preemption import build_pollers

    try:
        return build_pollers(config.preemption, slurm_job_id=platform.slurm_job_id,
                             signal_notice=signal_notice)
    except ValueError as err:
        raise UserError(f"--preemption: {err}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from session_watchdog import daemon, log, wrap

    config, platform, run_for = _prepare(args)
    command = list(args.child_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.detach:
        return _detach(args, config)
    _configure_log(config)
    notice, restore = _signal_notice(config)
    child: Optional[wrap.Child] = None
    early = wrap.EarlySignals() if command else None
    try:
        run_dir = channel.RunDir(config.run_dir or channel.default_run_dir(config.run_name))
        if command:
            child = wrap.Child(command, run_dir.path, kill_after_s=config.kill_after)
            child.install_forwarding(early)
        watchdog = daemon.Watchdog(config, platform=platform, pollers=_pollers(config, platform, notice),
                                   child_exit=child.exit_status if child else None,
                                   child_running=(lambda: child.exit_status() is None) if child else None)
        print(f"session-watchdog: watching {platform.name} session; run dir {watchdog.run_dir.path}; "
              f"log {config.log_file}", file=sys.stderr)

        def stop_when() -> bool:
            if child is None or child.exit_status() is None:
                return False
            # the child ended: stop once a tick has seen it and no end of the runtime is under way
            last = watchdog.last_sample
            return last is not None and last.child_exit is not None and not watchdog.end_running()

        watchdog.run(stop_when=stop_when, handle_signals=child is None, run_for=run_for)
        if child is not None:
            code = child.wait()
            log.get_logger().info("child_exited", pid=child.pid, exit_code=code)
            return code
        return EXIT_OK
    except wrap.WrapError as err:
        if child is not None:
            child.forward(15)
        raise UserError(str(err)) from None
    finally:
        if child is not None:
            child.restore()
        elif early is not None:
            early.restore()
        restore()
        log.close()


def cmd_attach(args: argparse.Namespace) -> int:
    from session_watchdog import daemon, log, wrap

    config, platform, run_for = _prepare(args)
    if args.detach:
        return _detach(args, config)
    run_dir = channel.RunDir(config.run_dir or channel.default_run_dir(config.run_name))
    _configure_log(config)  # before Attached: its "attached" event belongs in the log, not raw on stdout
    try:
        attached = wrap.Attached(args.pid, run_dir, end_on_exit=args.end_on_exit)
    except wrap.WrapError as err:
        log.close()
        raise UserError(str(err)) from None
    notice, restore = _signal_notice(config)
    try:
        watchdog = daemon.Watchdog(config, platform=platform, pollers=_pollers(config, platform, notice),
                                   child_exit=attached.exit_status,
                                   child_running=lambda: not attached.gone())
        print(f"session-watchdog: attached to pid {args.pid}; run dir {run_dir.path}; "
              f"log {config.log_file}", file=sys.stderr)

        def stop_when() -> bool:
            # The sample first, end_running() second: a tick starts its end transaction before it
            # publishes its sample, so a sample that saw the process gone comes with its end
            # already running (else the end thread dies with this process, mid-grace).
            last = watchdog.last_sample
            if not attached.gone() or last is None or last.child_running or watchdog.end_running():
                return False
            if last.trainer.alive:
                return False
            if attached.exit_status() is None and not last.trainer.status:
                log.get_logger().info("attached_exited", pid=args.pid,
                                      message="the process ended; its success is unknown (pass "
                                              "--end-on-exit to let its exit end the runtime)")
            return True

        return watchdog.run(stop_when=stop_when, run_for=run_for)
    finally:
        restore()
        log.close()


def cmd_stop(args: argparse.Namespace) -> int:
    from session_watchdog import wrap

    run_dir = _existing_run_dir(args)
    outcome = wrap.stop_daemon(run_dir)
    if outcome == "not-running":
        raise UserError(f"no watchdog is running for {run_dir}")
    if outcome == "still-running":
        print(f"session-watchdog: the watchdog of {run_dir} did not stop within 30s", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"session-watchdog: stopped the watchdog of {run_dir}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# status




def collect_status(run_dir: Path, now: Optional[float] = None) -> Dict[str, Any]:
    """Everything the run dir says, as one dict; unreadable files are reported, not raised."""
    from session_watchdog.policy import PolicyState

    now = time.time() if now is None else now
    out: Dict[str, Any] = {"run_dir": str(run_dir), "now": now, "errors": []}
    rd = channel.RunDir(run_dir, create=False)

    def read(name: str) -> Optional[Dict[str, Any]]:
        try:
            return channel.read_json(rd.file(name))
        except channel.ChannelError as err:
            out["errors"].append(str(err))
            return None

    def number(obj: Optional[Dict[str, Any]], key: str) -> Optional[float]:
        value = (obj or {}).get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    daemon = read("daemon.json")
    out["daemon"] = daemon
    out["daemon_running"] = channel.lock_held(rd.file(channel.DAEMON_LOCK))
    trainer = read(channel.TRAINER_FILE)
    if trainer is not None:
        try:  # the typed parser validates every field the table shows
            channel.TrainerStatus.from_json(trainer)
        except channel.ChannelError as err:
            out["errors"].append(f"{rd.file(channel.TRAINER_FILE)}: {err}")
            trainer = None
    out["trainer"] = trainer
    out["trainer_alive"] = rd.trainer_alive()
    out["trainer_saving"] = rd.trainer_saving()
    out["request"] = read(channel.REQUEST_FILE)
    state = read(channel.STATE_FILE)
    out["outstanding"] = None
    if state is not None:
        try:
            outstanding = PolicyState.from_json(state["policy"]).outstanding
            out["outstanding"] = None if outstanding is None else dataclasses.asdict(outstanding)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            out["errors"].append(f"{rd.file(channel.STATE_FILE)} is malformed ({type(err).__name__})")
    session = read(channel.SESSION_FILE)
    start = number(daemon, "session_start") or number(session, "start")
    budget = number(daemon, "budget_s")
    out["session_start"] = start
    out["elapsed_s"] = None if start is None else now - start
    out["budget_s"] = budget
    out["remaining_s"] = None if (start is None or not budget) else budget - (now - start)
    return out


def render_status(info: Dict[str, Any]) -> str:
    trainer = info.get("trainer") or {}
    ckpt = trainer.get("last_checkpoint") or {}
    daemon = info.get("daemon") or {}
    rows: List[Tuple[str, str]] = [
        ("run dir", info["run_dir"]),
        ("watchdog", f"running (pid {daemon.get('pid')}, {daemon.get('platform')})"
         if info["daemon_running"] else "not running"),
        ("session", f"{format_duration(info['elapsed_s'])} elapsed"
         + (f" of {format_duration(info['budget_s'])}, {format_duration(info['remaining_s'])} left"
            if info.get("budget_s") else ", no budget")),
        ("trainer", ("alive" if info["trainer_alive"] else "not running")
         + (", saving" if info["trainer_saving"] else "")
         + (f", {trainer.get('state')} at step {trainer.get('step')} epoch {trainer.get('epoch')}"
            if trainer else "")),
        ("last checkpoint", f"step {ckpt.get('step')}, {ckpt.get('bytes')} bytes, "
         f"{format_duration(info['now'] - ckpt['at'])} ago: {ckpt.get('path')}" if ckpt.get("at") else "-"),
        ("pending request", json.dumps(info["outstanding"]) if info.get("outstanding") else "-"),
        ("log", str(daemon.get("log_file") or "-")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"problem: {e}" for e in info["errors"]]
    return "\n".join(lines)


def _existing_run_dir(args: argparse.Namespace) -> Path:
    from session_watchdog.config import parse_abs_path

    if args.run_dir:
        try:
            run_dir = parse_abs_path(args.run_dir)
        except ValueError as err:
            raise UserError(f"--run-dir {args.run_dir!r} is invalid: {err}") from None
    else:
        run_dir = channel.default_run_dir(args.run_name)
    if not run_dir.is_dir():
        raise UserError(f"no run directory at {run_dir}; is a watchdog running? "
                        "(pass --run-dir or --run-name)")
    return run_dir


def cmd_status(args: argparse.Namespace) -> int:
    info = collect_status(_existing_run_dir(args))
    print(json.dumps(info, indent=2, default=str) if args.json else render_status(info))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from session_watchdog.actions import request_cancel

    run_dir = channel.RunDir(_existing_run_dir(args))
    request_cancel(run_dir)
    print(f"session-watchdog: asked the watchdog of {run_dir.path} not to end the runtime")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# doctor


def doctor_checks(config: Config) -> List[Dict[str, Any]]:
    """Each check: {name, ok: True|False|None (info), detail, fix}."""
    from session_watchdog import platforms, probes

    checks: List[Dict[str, Any]] = []

    def add(name: str, ok: Optional[bool], detail: str, fix: str = "") -> None:
        checks.append({"name": name, "ok": ok, "detail": detail, "fix": fix})

    detected = platforms.detect()
    platform = platforms.forced(config.platform, detected)
    resolved = platforms.resolve(config, platform)
    add("platform", None, f"{platform.name} ({'; '.join(platform.evidence)})")
    budget = resolved.max_session
    add("session budget", None, f"{format_duration(budget)}" if budget else "none (set --max-session)")

    gpu = probes.nvml_driver_summary()
    if gpu["state"] == "ok":
        add("nvml", True, f"driver {gpu.get('driver')}, GPUs: {', '.join(gpu['gpus']) or 'none'}")
    elif platform.name in ("colab", "autodl"):
        add("nvml", False, gpu["state"], "select a GPU runtime / instance, or ignore on CPU")
    else:
        add("nvml", None, gpu["state"] + " (the watchdog runs without GPU readings)")

    host = probes.read_host()
    add("memory", None, f"{host.ram_available_bytes / 2**30:.1f} GiB available of "
        f"{host.ram_total_bytes / 2**30:.1f} GiB ({host.ram_source})")

    run_dir = resolved.run_dir or channel.default_run_dir(resolved.run_name)
    if os.path.lexists(run_dir):
        st = os.lstat(run_dir)
        try:
            channel.ensure_run_dir(Path(run_dir))
            add("run dir", True, f"{run_dir} (mode {stat.S_IMODE(st.st_mode):o})")
        except channel.RunDirError as err:
            add("run dir", False, str(err), "fix the permissions or choose another --run-dir")
    else:
        add("run dir", None, f"{run_dir} (created on first run)")

    if platform.persistent_dirs:
        add("persistent storage", None, ", ".join(str(p) for p in platform.persistent_dirs))
    elif platform.name == "colab":
        add("persistent storage", None, "Google Drive not mounted: checkpoints in /content are "
            "lost with the runtime (drive.mount('/content/drive'))")
    else:
        add("persistent storage", None, "none detected")
    add("log file", None, str(resolved.log_file))

    end = platform.end_action
    if platform.enterprise:
        add("end action", None, "none: Colab Enterprise runtimes are never unassigned")
    elif end == "colab-unassign":
        add("end action", True, f"POST http://{os.environ.get('TBE_RUNTIME_ADDR')}/unassign")
    elif end == "autodl-shutdown":
        ok = os.path.exists("/usr/bin/shutdown")
        add("end action", ok, "/usr/bin/shutdown" + ("" if ok else " is missing"),
            "" if ok else "end the instance from the AutoDL console")
    elif resolved.end_command:
        exe = resolved.end_command[0]
        from shutil import which

        ok = which(exe) is not None or os.access(exe, os.X_OK)
        add("end action", ok, " ".join(resolved.end_command),
            "" if ok else f"{exe} not found; fix --end-command")
    else:
        add("end action", None, "none configured (--end-command) - the watchdog will not end "
            "this host")

    # Colab preinstalls the filesystem-events package 'watchdog'; ours is 'session_watchdog'.
    providers = _top_level_providers("session_watchdog")
    if len(providers) > 1:
        add("package name", False, f"session_watchdog is provided by {', '.join(providers)}",
            "pip uninstall the ones that are not session-watchdog")
    elif importlib.util.find_spec("watchdog") is not None:
        add("package name", True, "a 'watchdog' package is installed (filesystem events); no "
            "conflict: this tool imports as session_watchdog")
    else:
        add("package name", True, "no conflicting package")
    return checks


def _top_level_providers(name: str) -> List[str]:
    try:
        from importlib.metadata import packages_distributions
    except ImportError:  # pragma: no cover - Python 3.9
        return []
    return sorted(set(packages_distributions().get(name, [])))


def cmd_doctor(args: argparse.Namespace) -> int:
    config = _load(args)
    checks = doctor_checks(config)
    failed = [c for c in checks if c["ok"] is False]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": checks}, indent=2))
    else:
        width = max(len(c["name"]) for c in checks)
        for c in checks:
            mark = {True: "ok  ", False: "FIX ", None: "info"}[c["ok"]]
            line = f"[{mark}] {c['name']:<{width}}  {c['detail']}"
            if c["fix"]:
                line += f"  -> {c['fix']}"
            print(line)
    return EXIT_PROBLEM if failed else EXIT_OK


# --------------------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from session_watchdog import report

    return report.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from session_watchdog import demo

    return demo.run(args)


def cmd_tail(args: argparse.Namespace) -> int:
    from session_watchdog import report

    return report.run_tail(args)


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "report": cmd_report,
    "tail": cmd_tail,
    "demo": cmd_demo,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "attach": cmd_attach,
    "stop": cmd_stop,
    "doctor": cmd_doctor,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except SystemExit as exit_:  # --help, --version, usage errors: return, do not raise
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UserError, channel.ChannelError, DaemonBusyError) as err:
        print(f"session-watchdog: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
