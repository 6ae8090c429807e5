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
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from session_watchdog import __version__, channel
from session_watchdog.channel import DaemonBusyError  # not via daemon: --help stays light
from session_watchdog.config import KEYS, Config, ConfigError, format_duration, load_config

EXIT_OK = 0
EXIT_PROBLEM = 1  # doctor found something to fix
EXIT_USAGE = 2  # bad input
LOCK_LINGER_S = 30.0  # a wrapped run waits at most this long for run.lock after its command exits


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the hint to --help), exit code 2.

    No abbreviated long options (``--det`` for ``--detach``): a detached copy is started with
    ``--detach`` removed by its exact name, so an abbreviation would detach again, for ever.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: object) -> str:
    """``text`` with control characters escaped: an error is one line whatever the input held
    (a newline in a file name or flag value made two-line errors: issue 18)."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(text))


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
                     help="stop the watchdog after this long (e.g. 2m); with a command, stop "
                          "the command then as SIGTERM would (the trainer checkpoints and exits; "
                          "kill_after applies) and exit with its exit code")
    run.add_argument("--detach", action="store_true",
                     help="keep running after the terminal/SSH session closes (setsid)")
    run.add_argument("--new-session", action="store_true",
                     help="restart the session clock (without a platform clock it runs from the "
                          "first watchdog since boot)")
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
    attach.add_argument("--new-session", action="store_true",
                        help="restart the session clock (without a platform clock it runs from "
                             "the first watchdog since boot)")
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

    notify = sub.add_parser("notify", help="notifications: --test sends one message per channel")
    _add_config_flags(notify)
    notify.add_argument("--test", action="store_true", required=True,
                        help="send one test message through every configured channel")

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
    if getattr(args, "run_for", None) is not None:  # an empty --for is an error, not "forever"
        try:
            run_for = parse_duration(args.run_for)
        except ValueError as err:
            raise UserError(f"--for {args.run_for!r} is invalid: {err}") from None
    platform = platforms.forced(config.platform, platforms.detect())
    resolved = platforms.resolve(config, platform)
    _refuse_unmounted(resolved)
    return resolved, platform, run_for


def _refuse_unmounted(config: Config) -> None:
    """A run dir or log under Drive (or AutoDL storage) that is not mounted: files created there
    are local, die with the runtime, and make the next drive.mount() fail."""
    from session_watchdog import mounts

    for key, path in (("run_dir", config.run_dir), ("log_file", config.log_file)):
        root = mounts.unmounted_root(path) if path is not None else None
        if root is not None:
            raise UserError(f"{key} {path} is on {root.what}, but {root.path} is not mounted; "
                            f"{root.fix}, or choose another {key}")


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

    # Our own process: nobody needs rich's tracebacks here, nor asyncio's TLS unless a
    # notification channel may run it.
    log.import_structlog_without_rich(keep_ssl=bool(config.notify or config.remote))
    try:
        # APScheduler's own warnings go to the JSONL log, not raw onto the console (issue 11)
        log.configure(config.log_file, max_bytes=config.log_max_bytes, backups=config.log_backups,
                      bridge=("apscheduler",), compress=True)
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


def _refuse_beside_orphan(run_dir: channel.RunDir) -> None:
    """A trainer left running by a watchdog that was killed (kill -9) still holds run.lock: a
    second one beside it would share its checkpoints and requests (issue 18)."""
    status = None
    try:
        status = run_dir.read_status()
    except channel.ChannelError:
        pass
    if status is not None and status.state in ("starting", "running", "saving", "stopping"):
        raise UserError(f"a trainer (pid {status.pid}) still runs in {run_dir.path} without a "
                        f"watchdog; stop it, or watch it with 'session-watchdog attach --pid "
                        f"{status.pid}' instead of starting another")
    raise UserError(f"a process still holds {run_dir.file(channel.RUN_LOCK)} (a trainer left "
                    "running?); stop it before starting another command in this run dir")


def cmd_run(args: argparse.Namespace) -> int:
    from session_watchdog import daemon, log, wrap

    config, platform, run_for = _prepare(args)
    command = list(args.child_command)
    if command[:1] == ["--"]:
        command = command[1:]
        if not command:  # `-- $CMD` with CMD empty: never a watchdog alone, silently
            raise UserError("no command after '--' (an empty variable?): use `session-watchdog run "
                            "[options] -- python train.py`, or leave out '--' to watch alone")
    if args.detach:
        return _detach(args, config)
    _configure_log(config)
    notice, restore = _signal_notice(config)
    child: Any = None  # wrap.Child, or a supervise.restarts.Supervisor under --restarts
    early = wrap.EarlySignals() if command else None
    late_signals: List[str] = []  # stop signals that came after the command ended
    time_box: Optional[threading.Timer] = None  # --for with a command
    child_gone_at: Dict[str, float] = {}

    # the exit as the daemon sees it: under --restarts the supervisor's; else reported once a
    # failed command's snapshot is persisted (an end of the runtime must not come first)
    settled_exit: Any = None  # supervise.snapshots.PersistOnExit without --restarts

    def child_exit() -> Optional[int]:
        return settled_exit() if settled_exit is not None else None

    def child_running() -> bool:
        return settled_exit is not None and settled_exit() is None

    try:
        watchdog = daemon.Watchdog(config, platform=platform, pollers=_pollers(config, platform, notice),
                                   child_exit=child_exit if command else None,
                                   child_running=child_running if command else None,
                                   new_session=args.new_session,
                                   on_decisions=lambda d, s: getattr(child, "on_decisions",
                                                                     lambda *a: None)(d, s))
        # Take the run dir before the command starts: a second `run` on a watched run dir must
        # fail without leaving a training process behind (issue 18).
        if command and watchdog.run_dir.trainer_alive() \
                and not watchdog.run_dir.lock_held(channel.DAEMON_LOCK):
            _refuse_beside_orphan(watchdog.run_dir)
        watchdog.acquire()
        # Before the command starts: printed after, it could land inside the command's own
        # stderr (a traceback written at once), which we copy through as it comes.
        print(f"session-watchdog: watching {platform.name} session; run dir {watchdog.run_dir.path}; "
              f"log {config.log_file}", file=sys.stderr)
        if command:
            if config.restarts:
                from session_watchdog.supervise import restarts

                child = restarts.supervisor_for(command, watchdog)
            else:
                child = wrap.Child(command, watchdog.run_dir.path, kill_after_s=config.kill_after,
                                   capture_stderr=True)
            watchdog.child_stderr_tail = child.stderr_tail  # its traceback, for the failure message
            if config.restarts:
                settled_exit = child.exit_status
            else:
                from session_watchdog.supervise.snapshots import PersistOnExit

                # died without saving: its newest snapshot becomes a checkpoint (issue 13)
                settled_exit = PersistOnExit(watchdog.run_dir, child.exit_status,
                                             linger_s=LOCK_LINGER_S)

            def on_late_signal(signum: int) -> None:
                # The command has ended: Ctrl-C (or SIGTERM) is for us, and cancels a pending end.
                name = signal.Signals(signum).name
                late_signals.append(name)
                log.get_logger().info("signal_received", signal=name,
                                      message="the command has ended; stopping the watchdog "
                                              "without ending the runtime")
                watchdog.keep_runtime(f"signal {name}")
                # stop now, not at the next tick (a thread: this runs in a signal handler)
                threading.Thread(target=watchdog.check_stop, daemon=True).start()

            child.on_late_signal = on_late_signal
            child.install_forwarding(early)
            if run_for is not None:  # --for with a command: its time box; we watch it stop
                def time_up() -> None:
                    if child.exit_status() is None:
                        log.get_logger().info("run_for_elapsed", run_for_s=run_for,
                                              message="--for elapsed; stopping the command")
                        child.forward(signal.SIGTERM)

                time_box = threading.Timer(run_for, time_up)
                time_box.daemon = True
                time_box.start()

        def stop_when() -> bool:
            if child is None or child.exit_status() is None:
                return False
            if late_signals:
                return True
            # the child ended: stop once a tick has judged it - a sample taken wholly after the
            # exit (one taken while it ended still counts it as running) - and no end of the
            # runtime is under way
            last = watchdog.last_sample
            if last is None or last.child_exit is None or last.child_running \
                    or watchdog.end_running():
                return False
            # run.lock still held a moment after the exit (forked DataLoader workers share the
            # trainer's lock until they are gone): the end waits for that, so we do too (bounded)
            if last.trainer.alive:
                first_seen = child_gone_at.setdefault("t", time.monotonic())
                if time.monotonic() - first_seen < LOCK_LINGER_S:
                    return False
            return True

        watchdog.run(stop_when=stop_when, handle_signals=child is None,
                     run_for=None if child is not None else run_for)
        if child is not None:
            code = child.wait()
            log.get_logger().info("child_exited", pid=child.pid, exit_code=code)
            child.wait_group()  # never leave part of a stopped command behind
            if not config.restarts:
                settled_exit.wait()  # its snapshot persisted, if the loop ended before that
            if getattr(child, "gave_up", None):
                print(f"session-watchdog: gave up restarting (exit {code}): {child.gave_up}",
                      file=sys.stderr)
            return 130 if child.interrupted else code
        return EXIT_OK
    except wrap.WrapError as err:
        if child is not None:
            child.forward(15)
        else:
            watchdog.release()  # the command did not start: the run dir is free again
        raise UserError(str(err)) from None
    finally:
        if time_box is not None:
            time_box.cancel()
        if child is not None:
            child.close_output()  # the rest of its stderr, before we exit
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
                                   child_running=lambda: not attached.gone(),
                                   new_session=args.new_session)
        from session_watchdog.supervise.snapshots import AfterDeath

        # it died without saving: its newest snapshot becomes a checkpoint, as under run (#13)
        watchdog.after_tick.append(AfterDeath(watchdog.run_dir).observe)
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
    if outcome.startswith("refused: "):
        raise UserError(f"not stopping: {outcome[len('refused: '):]} (daemon.json is not "
                        f"trusted without the kernel's lock; see {run_dir / channel.DAEMON_LOCK})")
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -channel.MAX_INT <= value <= channel.MAX_INT:  # NaN fails too (#18)
            return None
        return float(value)

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
    cancel = read(channel.CANCEL_FILE)
    cancelled_at = number(cancel, "at")
    started = number(daemon, "started")
    # a cancel counts for the watchdog that was running when it was made (a new run undoes it)
    out["keep_runtime_since"] = (cancelled_at if cancelled_at is not None and out["daemon_running"]
                                 and (started is None or cancelled_at >= started) else None)
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


def mirror_rows(trainer: Dict[str, Any], now: float) -> List[Tuple[str, str]]:
    """The "mirrored" row of ``status``: the newest step verified on the trainer's mirror."""
    mirror = (trainer.get("extra") or {}).get("mirror")
    if not isinstance(mirror, dict):
        return []
    last = (trainer.get("extra") or {}).get("last_mirrored") or {}
    text = (f"step {last.get('step')}, {format_duration(now - last['at'])} ago: {last.get('path')}"
            if isinstance(last, dict) and isinstance(last.get("at"), (int, float))
            else f"nothing yet ({mirror.get('target')})")
    if mirror.get("problem"):
        text += f"; {mirror.get('state')}: {mirror.get('problem')} ({mirror.get('error')})"
    elif mirror.get("pending_step") is not None:
        text += f"; copying step {mirror.get('pending_step')}"
    return [("mirrored", text)]


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
        *mirror_rows(trainer, info["now"]),
        ("pending request", json.dumps(info["outstanding"]) if info.get("outstanding") else "-"),
        ("runtime end", "cancelled: this runtime is kept (session-watchdog cancel, "
         f"{format_duration(info['now'] - info['keep_runtime_since'])} ago; a new run undoes it)"
         if info.get("keep_runtime_since") is not None else "-"),
        ("log", str(daemon.get("log_file") or "-")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"problem: {e}" for e in info["errors"]]
    return "\n".join(lines)


def _existing_run_dir(args: argparse.Namespace) -> Path:
    from session_watchdog.config import parse_abs_path

    if args.run_dir is not None:  # an empty --run-dir is an error, not the default run dir
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
    """Keep this runtime: a pending end stands down and none starts later (issue 18).

    Recorded in the run dir (``cancel.json``), shown by ``status``; the next ``run`` undoes it.
    """
    from session_watchdog.actions import request_cancel

    run_dir = channel.RunDir(_existing_run_dir(args))
    if not channel.lock_held(run_dir.file(channel.DAEMON_LOCK)):
        raise UserError(f"no watchdog is running for {run_dir.path}; nothing to cancel")
    request_cancel(run_dir)
    print(f"session-watchdog: the watchdog of {run_dir.path} will keep this runtime (a pending "
          "end is cancelled, none starts later; the next `session-watchdog run` undoes this)")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# doctor


def doctor_checks(config: Config, nvml: Any = None) -> List[Dict[str, Any]]:
    """Each check: {name, ok: True|False|None (info), detail, fix}.

    ``nvml``: a ``probes.Nvml`` to ask instead of the system's (tests inject a fake module).
    """
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

    gpu = probes.nvml_driver_summary(nvml)
    if gpu["state"] == "ok":
        add("nvml", True, f"driver {gpu.get('driver')}, GPUs: {', '.join(gpu['gpus']) or 'none'}")
    elif platform.name in ("colab", "autodl"):
        add("nvml", False, gpu["state"], "select a GPU runtime / instance, or ignore on CPU")
    else:
        add("nvml", None, gpu["state"] + " (the watchdog runs without GPU readings)")
    if resolved.idle_end_after:
        # An unknown reading is never taken for idle (issue 18): without one the rule is inert.
        if gpu["state"] != "ok" or not gpu["gpus"] or gpu["unknown"]:
            add("idle end", None, "can never fire: no known utilisation for every GPU, so this "
                "runtime is never ended for idling (training-complete ends still work)")
        else:
            add("idle end", True, f"after {format_duration(resolved.idle_end_after)} of idle "
                "GPUs with no trainer, command or notebook cell running")

    host = probes.read_host()
    add("memory", None, f"{host.ram_available_bytes / 2**30:.1f} GiB available of "
        f"{host.ram_total_bytes / 2**30:.1f} GiB ({host.ram_source})")

    from session_watchdog.snapshot_slots import shm_summary

    add("shared memory", None, shm_summary())  # Session(snapshot_every=...) writes there

    run_dir = resolved.run_dir or channel.default_run_dir(resolved.run_name)
    if os.path.lexists(run_dir):
        st = os.lstat(run_dir)
        try:
            channel.ensure_run_dir(Path(run_dir))
            add("run dir", True, f"{run_dir} (mode {stat.S_IMODE(st.st_mode):o})")
        except channel.RunDirError as err:
            add("run dir", False, str(err), "fix the permissions or choose another --run-dir")
    else:
        try:
            channel.check_creatable(Path(run_dir))
            add("run dir", None, f"{run_dir} (created on first run)")
        except channel.RunDirError as err:
            add("run dir", False, str(err), "choose another --run-dir")

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
    if config.notify or config.remote:  # issue 15: channels (redacted) and whether reachable
        from session_watchdog import notify

        checks += notify.doctor_checks(config)
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

def cmd_notify(args: argparse.Namespace) -> int:
    """`notify --test`: one message through every channel; exit 1 when one did not work."""
    from session_watchdog import notify

    config = _load(args)
    if not config.notify:
        raise UserError("no notification channel is configured; pass --notify URL or set "
                        "SESSION_WATCHDOG_NOTIFY")
    # The sender's events (notify_sent, notify_failed) are said by the lines below; without a
    # configuration of our own, structlog's default printed each one raw onto stdout. Not into
    # the log file either: a running watchdog may be writing (and rotating) that one.
    from session_watchdog import log

    log.configure(None, console=None)
    results = notify.send_test_messages(config)
    for shown, ok, error in results:
        print(f"[{'ok  ' if ok else 'FAIL'}] {shown}" + ("" if ok else f"  {error}"))
    return EXIT_OK if all(ok for _, ok, _ in results) else EXIT_PROBLEM


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
    "notify": cmd_notify,
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
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that went away (`doctor | head -2`) shows up here
        return code
    except (ConfigError, UserError, channel.ChannelError, DaemonBusyError) as err:
        print(f"session-watchdog: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # before OSError, its base class: a closed pipe is no path error
        return _reader_gone()
    except OSError as err:
        # A path given by the user that the system refuses (a file where a directory belongs,
        # a name too long, ...): one line, not a traceback (issue 18).
        where = f"{err.filename}: " if err.filename else ""
        print(f"session-watchdog: error: {one_line(where)}{one_line(err.strerror or err)}; "
              "check the paths given (--config, --run-dir, --log-file)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """stdout's reader closed the pipe: stop quietly, like a tool killed by SIGPIPE.

    Python ignores SIGPIPE, so the write raised; point stdout at /dev/null so that the flush at
    interpreter exit does not print a second traceback (the recipe of Python's signal docs).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout file descriptor (a notebook, a test capture)
        pass
    return 128 + 13  # 141: what a shell reports for a process ended by SIGPIPE
