"""Long runs outside notebooks: wrap a command, attach to a process, detach from the terminal.

``session-watchdog run -- python train.py`` starts the command as a child in its own session
(its own process group) with the run dir in its environment; stdout passes straight through,
stderr too, or through :mod:`session_watchdog.supervise.output` (``capture_stderr``), which keeps
its tail for the failure message.
The watchdog's exit code is the child's.

Stopping (issue 18): SIGTERM or a first Ctrl-C (SIGINT) to the watchdog becomes one SIGTERM to the
trainer process only, never to its process group: DataLoader workers share that group, and a
worker killed first makes torch raise inside the stop checkpoint. The trainer checkpoints at its
next step and exits 75. Only a child still running ``kill_after`` later gets SIGTERM to its whole
group, then SIGKILL. A second Ctrl-C interrupts at once (SIGKILL to the group; exit code 130).
A signal that comes after the child ended is for the watchdog itself (``on_late_signal``): it
cancels a pending end of the runtime.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import psutil

from session_watchdog import channel
from session_watchdog.log import get_logger

log = get_logger()

NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # systemd's, for us alone


class WrapError(Exception):
    """A user error in run/attach (bad command, foreign or reused pid); exit code 2."""


def child_env(run_dir: Path, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    base = dict(os.environ if env is None else env)
    for name in NOTIFY_VARS:  # the child must not talk to systemd as if it were us
        base.pop(name, None)
    base[channel.ENV_RUN_DIR] = str(run_dir)
    return base


def exit_code(returncode: int) -> int:
    """Popen's returncode as a shell would report it (a signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})
KILL_GRACE_S = 10.0  # at most this long between SIGTERM and SIGKILL to the command's group


class Child:
    """The wrapped command: started in its own session; stopped politely, escalated after a deadline."""

    def __init__(self, argv: Sequence[str], run_dir: Path, kill_after_s: float = 30.0,
                 popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
                 capture_stderr: bool = False) -> None:
        if not argv:
            raise WrapError("no command given: use `session-watchdog run [options] -- python train.py`")
        self.argv = list(argv)
        self.run_dir = run_dir
        self.kill_after_s = kill_after_s
        # capture_stderr: its stderr passes through us and its tail is kept, so that a failure
        # message can quote the traceback (issue 15; supervise.output)
        self.output: Any = None
        extra: Dict[str, Any] = {}
        if capture_stderr:
            from session_watchdog.supervise import output

            self.output = output.capture()
            if self.output.child_fd is not None:
                extra["stderr"] = self.output.child_fd
        try:
            self.proc = popen(self.argv, env=child_env(run_dir), start_new_session=True, **extra)
        except FileNotFoundError:
            self.close_output()
            raise WrapError(f"command not found: {self.argv[0]!r}") from None
        except PermissionError:
            self.close_output()
            raise WrapError(f"command is not executable: {self.argv[0]!r}") from None
        except OSError as err:  # ENOEXEC (a script without '#!'), E2BIG, ELOOP, ...
            self.close_output()
            hint = ("; a script needs a first line such as #!/bin/bash, or run it through its "
                    "interpreter (bash script.sh)") if err.errno == errno.ENOEXEC else ""
            raise WrapError(f"command could not be executed: {self.argv[0]!r}: "
                            f"{err.strerror or err}{hint}") from None
        if self.output is not None:
            self.output.started()
        self.pid = self.proc.pid
        self._escalation: Optional[threading.Timer] = None
        self._relay: Optional[SignalRelay] = None
        self.interrupted = False  # a second Ctrl-C killed the command
        self.on_late_signal: Optional[Callable[[int], None]] = None
        log.info("child_started", argv=self.argv, pid=self.pid)

    def exit_status(self) -> Optional[int]:
        """The child's exit code once it ended (shell style), else None. Never blocks."""
        code = self.proc.poll()
        return None if code is None else exit_code(code)

    def stderr_tail(self) -> Optional[str]:
        """Once it ended: the traceback (or last lines) of its stderr, else None."""
        if self.output is None or self.proc.poll() is None:
            return None
        from session_watchdog.supervise.output import traceback_tail

        self.output.drain()  # whatever it wrote before it exited is in the pipe: read it all
        return traceback_tail(self.output.text())

    def close_output(self) -> None:
        """Copy the rest of its stderr and stop (before we exit: nothing is lost)."""
        if self.output is not None:
            self.output.close()

    def trainer_pid(self) -> int:
        """The process that gets the polite stop signal: the trainer that ``trainer.json`` names
        when the kernel shows it holding ``run.lock`` in our command's process group
        (:meth:`proven_trainer`); else our direct child, or, when that is a shell
        (``run -- bash train.sh``) waiting on a single command, that command (followed down
        through nested shells). A shell dies of SIGTERM without passing it on, which would leave
        the trainer running until the group's SIGTERM kills its DataLoader workers first.
        """
        proven = self.proven_trainer()
        if proven is not None:
            return proven
        pid = self.pid
        for _ in range(8):  # a few nested shells at most
            try:
                proc = psutil.Process(pid)
                if os.path.basename(proc.exe()) not in SHELLS:  # exe: `./train.sh` too
                    return pid
                children = [c for c in proc.children()
                            if c.status() != psutil.STATUS_ZOMBIE and os.getpgid(c.pid) == self.pid]
            except (psutil.Error, OSError):
                return pid
            if len(children) != 1:
                return pid
            pid = children[0].pid
        return pid

    def proven_trainer(self) -> Optional[int]:
        """The pid in ``trainer.json`` when it is our command's trainer, else None.

        Behind ``python train.py | tee log``, ``conda run`` or a launcher our child is not the
        trainer, and a shell with two children cannot tell which one is. The claim counts only
        with the kernel's proof (:mod:`session_watchdog.identity`): the process holds
        ``run.lock`` (never PID 1, ourselves or another uid), is in our command's process group
        and was created when ``trainer.json`` says (not a reused pid). In DDP that is the
        reporter rank, which passes the stop to the other ranks.
        """
        from session_watchdog import identity

        run_dir = channel.RunDir(self.run_dir, create=False)
        try:
            status = run_dir.read_status()
            if status is None or identity.trainer_pid_proven(run_dir, status.pid) is not None:
                return None
            proc = psutil.Process(status.pid)
            if os.getpgid(status.pid) != self.pid or abs(proc.create_time() - status.start_time) > 0.05:
                return None
        except (channel.ChannelError, psutil.Error, OSError):
            return None
        return status.pid

    def forward(self, sig: int) -> None:
        """The user asked to stop (``sig`` is SIGTERM or SIGINT): stop politely, then escalate.

        The first signal sends SIGTERM to :meth:`trainer_pid` alone and arms the escalation
        (group SIGTERM after ``kill_after``, group SIGKILL after a further ``min(kill_after, 10s)``).
        A second SIGINT (Ctrl-C twice) SIGKILLs the group at once; a repeated SIGTERM changes
        nothing (the escalation is already on its way). After the child ended, the signal goes
        to ``on_late_signal`` instead.
        """
        name = signal.Signals(sig).name
        if self.proc.poll() is not None:
            if self.on_late_signal is not None:
                self.on_late_signal(sig)
            return
        if self._escalation is not None:
            if sig == signal.SIGINT:
                self.interrupted = True
                log.warning("child_interrupted", signal=name, pid=self.pid,
                            message="second Ctrl-C: SIGKILL to the command's process group")
                self._killpg(signal.SIGKILL)
            else:
                log.info("signal_repeated", signal=name, pid=self.pid,
                         message="already stopping; escalation follows kill_after")
            return
        target = self.trainer_pid()
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            return
        log.info("child_signalled", signal=name, sent="SIGTERM", pid=target,
                 kill_after_s=self.kill_after_s,
                 message="asked the trainer to checkpoint and stop; its process group follows "
                         f"only if it still runs {self.kill_after_s:g}s from now")
        self._escalation = threading.Timer(self.kill_after_s, self._escalate)
        self._escalation.daemon = True
        self._escalation.start()

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        """Whether any process of the command's process group still exists (a shell wrapper's
        own child outlives a shell that died of the SIGTERM)."""
        self.proc.poll()  # reap our child first: a zombie still counts as a member
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def wait_group(self) -> None:
        """Once the command exited: leave nothing of its process group running.

        After a stop signal the escalation ends the group; wait for it. Otherwise processes it
        left behind (a shell's background job, a crashed trainer's helpers: still billing, still
        holding ``run.lock``) get SIGTERM, and SIGKILL ``min(kill_after, 10s)`` later.
        """
        if self._escalation is not None:
            wait_until(lambda: not self.group_alive(), self.kill_after_s + KILL_GRACE_S + 5.0, 0.1)
            return
        if not self.group_alive():
            return
        then = min(self.kill_after_s, KILL_GRACE_S)
        log.warning("child_group_ended", pid=self.pid, message="the command exited and left "
                    f"processes of its group running; SIGTERM to them, SIGKILL {then:g}s later")
        self._killpg(signal.SIGTERM)
        if not wait_until(lambda: not self.group_alive(), then, 0.1):
            self._kill()
            wait_until(lambda: not self.group_alive(), KILL_GRACE_S, 0.1)

    def _escalate(self) -> None:
        if self.group_alive():
            then = min(self.kill_after_s, KILL_GRACE_S)
            log.warning("child_escalated", pid=self.pid,
                        message=f"still running {self.kill_after_s:g}s after the signal; SIGTERM to "
                                f"its process group, SIGKILL {then:g}s later")
            self._killpg(signal.SIGTERM)
            self._escalation = threading.Timer(then, self._kill)
            self._escalation.daemon = True
            self._escalation.start()

    def _kill(self) -> None:
        if self.group_alive():
            log.warning("child_killed", pid=self.pid,
                        message="still running after SIGTERM to its process group; SIGKILL")
            self._killpg(signal.SIGKILL)

    def install_forwarding(self, early: Optional[EarlySignals] = None) -> None:
        """Handle SIGINT/SIGTERM (main thread only), and those that came before the child did."""
        if threading.current_thread() is threading.main_thread():
            self._relay = SignalRelay(self.forward, early)

    def restore(self) -> None:
        if self._relay is not None:
            self._relay.restore()
            self._relay = None
        if self._escalation is not None:
            self._escalation.cancel()

    def wait(self, timeout: Optional[float] = None) -> int:
        return exit_code(self.proc.wait(timeout))


class SignalRelay:
    """SIGINT/SIGTERM handled by ``target(signum)`` in a thread of its own, never in the handler.

    A handler runs in the main thread between two of its bytecodes, perhaps in the middle of a
    log write that holds the log's lock (or the console's): a handler that logged there waited
    for ever for a lock its own thread held, and the process then ignored every SIGTERM
    (STYLE.md #6). The handler only queues the signal (``SimpleQueue.put`` is reentrant); the
    relay thread forwards it and logs, taking locks as any thread does. Main thread only.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, target: Callable[[int], None], early: Optional[EarlySignals] = None) -> None:
        self._queue: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._relay, args=(target,), daemon=True,
                                        name="session-watchdog-signals")
        self._thread.start()
        self.previous: Dict[int, Any] = {}
        for sig in self.SIGNALS:
            previous = signal.signal(sig, lambda signum, frame: self._queue.put(signum))
            self.previous[sig] = early.previous.get(sig, previous) if early else previous
        for signum in early.received if early else ():  # those that came before the child did
            self._queue.put(signum)

    def _relay(self, target: Callable[[int], None]) -> None:
        while True:
            signum = self._queue.get()
            if signum is None:
                return
            try:
                target(signum)
            except Exception as err:  # the next signal must still be handled
                log.error("signal_failed", signal=signal.Signals(signum).name, error=repr(err))

    def restore(self, timeout_s: float = 10.0) -> None:
        """The previous handlers back; the signals already queued are handled first (bounded)."""
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous.clear()
        self._queue.put(None)
        self._thread.join(timeout_s)


class EarlySignals:
    """Hold SIGINT/SIGTERM that arrive while the child is being started, to forward them after.

    Without it a signal in that window would kill the watchdog and orphan the child.
    """

    def __init__(self) -> None:
        self.received: List[int] = []
        self.previous: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))

    def restore(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


class Attached:
    """A process we did not start: identity = pid + create time, same user or refused."""

    def __init__(self, pid: int, run_dir: channel.RunDir, end_on_exit: bool = False) -> None:
        if pid < 1:
            raise WrapError(f"--pid {pid} is not a process id (expected a number >= 1)")
        try:
            proc = psutil.Process(pid)
            created = proc.create_time()
            uid = proc.uids().real
        except psutil.NoSuchProcess:
            raise WrapError(f"no process with pid {pid}") from None
        except psutil.AccessDenied:
            raise WrapError(f"pid {pid} belongs to another user; attach as that user") from None
        if uid != os.getuid():
            raise WrapError(f"pid {pid} belongs to uid {uid}, not to us (uid {os.getuid()}); "
                            "attach as that user")
        try:
            status = run_dir.read_status()
        except channel.ChannelError:
            status = None
        if status is not None and status.pid == pid and abs(status.start_time - created) > 0.05:
            raise WrapError(f"pid {pid} is not the trainer of {run_dir.path} (that process ended and "
                            "its pid was reused)")
        self.pid = pid
        self.created = created
        self.run_dir = run_dir
        self.end_on_exit = end_on_exit
        self._gone = False
        log.info("attached", pid=pid, create_time=created, end_on_exit=end_on_exit)

    def gone(self) -> bool:
        """Exited (a zombie waiting for its parent counts: it will never run again) or replaced."""
        if not self._gone:
            try:
                proc = psutil.Process(self.pid)
                self._gone = (abs(proc.create_time() - self.created) > 0.05
                              or proc.status() == psutil.STATUS_ZOMBIE)
            except psutil.NoSuchProcess:
                self._gone = True
        return self._gone

    def exit_status(self) -> Optional[int]:
        """0 once gone when --end-on-exit vouches for success; None otherwise (unknown).

        A process that used the trainer Session says in trainer.json whether it completed; the
        policy reads that. A plain process's exit code cannot be known (it is not our child).
        """
        if not self.gone():
            return None
        return 0 if self.end_on_exit else None


def detach(argv: Sequence[str], run_dir: Path, out_path: Path) -> int:
    """Start ``session-watchdog ARGV`` in a new session, stdio to ``out_path``; return its pid.

    The new session has no controlling terminal, so closing the SSH session or the terminal
    (SIGHUP to the old session) does not reach it.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "session_watchdog", *argv],
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    return proc.pid


def without_flag(argv: Sequence[str], flag: str) -> List[str]:
    """argv with ``flag`` removed, options only: nothing after ``--`` is touched."""
    out: List[str] = []
    passthrough = False
    for item in argv:
        if item == "--":
            passthrough = True
        if not passthrough and item == flag:
            continue
        out.append(item)
    return out


def stop_daemon(run_dir: Path, timeout_s: float = 30.0) -> str:
    """SIGTERM the watchdog of ``run_dir``; only a pid the kernel shows holding daemon.lock.

    ``daemon.json`` names the pid, but it is a claim (#18): the signal goes only where
    :func:`identity.daemon_pid_proven` agrees. Returns stopped | still-running | not-running |
    ``refused: <why>``.
    """
    from session_watchdog import identity

    lock = run_dir / channel.DAEMON_LOCK
    if not channel.lock_held(lock):
        return "not-running"
    try:
        info = channel.read_json(run_dir / "daemon.json") or {}
    except channel.ChannelError as err:
        return f"refused: {err}"
    pid = info.get("pid")
    try:
        refusal = identity.send_proven(pid, signal.SIGTERM,
                                       lambda: identity.daemon_pid_proven(run_dir, pid))
    except ProcessLookupError:
        return "stopped"
    if refusal is not None:
        return f"refused: {refusal}"
    # The released lock is the kernel's word that it stopped (a pid could be reused).
    return "stopped" if wait_until(lambda: not channel.lock_held(lock), timeout_s) \
        else "still-running"


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
