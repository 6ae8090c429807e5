"""Helpers for tests that run real processes: a real daemon wrapping a real training script,
reaping a child's process group, and waiting on a condition with a generous deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

from session_watchdog.actions import verify_checkpoint
from session_watchdog.channel import RunDir
from session_watchdog.integrations._core import COMMIT_MARKER

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ROOT = Path(__file__).resolve().parent.parent
START_S = 120.0  # importing transformers/lightning on a loaded machine takes a while
WAIT_S = 120.0  # generous: the machine running the tests may be shared and very busy

T = TypeVar("T")


def child_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_WATCHDOG_")}
    # One intra-op thread: identical float reductions in every run, and no oversubscription.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def watchdog_argv(base: Path, run: str, session_s: float, *, end: bool = False) -> List[str]:
    """A compressed session for the generic platform (the demo's schedule, session_watchdog/demo.py)."""
    argv = [
        sys.executable, "-m", "session_watchdog", "run",
        "--platform", "generic", "--max-session", f"{session_s:g}s", "--interval", "0.5s",
        "--margin", f"{session_s * 0.2:g}s", "--stop-margin", f"{session_s * 0.1:g}s",
        "--default-checkpoint-time", "1s", "--default-step-time", "0.5s",
        "--warn-before", f"{session_s * 0.75:g}s,{session_s * 0.4:g}s", "--checkpoint-every", "off",
        "--resend-after", "10s", "--grace", "1s", "--end-command", "shutdown -h now",
        "--run-dir", str(base / run), "--log-file", str(base / f"{run}.jsonl"),
    ]
    if end:
        argv += ["--end-when-done", "--dry-run"]
    return argv


def spawn(argv: List[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(**env), start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 240.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        reap(proc)
        out, err = proc.communicate()
        raise AssertionError(f"child did not finish in {timeout} s\n{out[-3000:]}\n{err[-3000:]}") from None
    return proc.returncode, out, err


def run_to_end(argv: List[str], timeout: float = 240.0, **env: str) -> tuple[int, str, str]:
    """:func:`spawn` ``argv`` and :func:`finish` it; its process group is reaped either way."""
    proc = spawn(argv, **env)
    try:
        return finish(proc, timeout)
    finally:
        reap(proc)


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill the child's whole process group (it was started in a session of its own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def wait_for(condition: Callable[[], T], what: str = "the condition", *, timeout: float = WAIT_S,
             poll: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy and return that value; raise
    AssertionError naming ``what`` when it is still falsy after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:  # checked after a last look, so a late success counts
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"child exited with {proc.returncode} before {path} appeared\n"
                                 f"{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def events(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def session_clock(evs: List[Dict[str, Any]], event: Dict[str, Any]) -> float:
    """Session-clock seconds of an event: elapsed_s of the nearest sample before it."""
    before = [e for e in evs[:evs.index(event)] if e["event"] == "sample"]
    return float(before[-1]["elapsed_s"]) if before else 0.0


def requests_and_acks(evs: List[Dict[str, Any]]) -> tuple[list, list]:
    requests = [e for e in evs if e["event"] == "decision" and e.get("kind") == "request"]
    acks = [e for e in evs if e["event"] == "decision" and e.get("kind") == "ack"]
    return requests, acks


def end_steps(evs: List[Dict[str, Any]]) -> List[Optional[str]]:
    return [e.get("step") for e in evs if e["event"] == "action"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- scenarios every framework integration must pass (test_integrations_hf / _lightning) ----

SESSION_S = 40.0
STEPS = 240  # 0.25 s per step in the first runtime: 60 s of steps, longer than its session


def check_stop_then_resume(tmp_path: Path, script: List[str], *, extra: Sequence[str] = (),
                           watchdog_resume: Callable[[Path], Optional[str]],
                           resume_target: Callable[[Path], Path], resume_arg: str) -> None:
    """A 40 s session: checkpoint and stop requested and acked before the limit, the script exits
    75 with a committed checkpoint-N; the next runtime resumes from it (``watchdog_resume`` gives
    ``resume_target(checkpoint-N)``, printed after ``resume_arg``), completes, the end
    transaction verifies the final committed checkpoint, and the weights equal an uninterrupted
    run's bit for bit. ``extra`` goes to every run of ``script``."""
    import torch  # only the framework tests need it: the other users of this module stay light
    from torch_helpers import assert_same

    out, ref = tmp_path / "out", tmp_path / "ref"
    reference = spawn([*script, "--out", str(ref), "--steps", str(STEPS), *extra, "--no-watchdog"],
                      SESSION_WATCHDOG_RUN_DIR=str(tmp_path / "ref-run"))
    first = spawn([*watchdog_argv(tmp_path, "run-1", SESSION_S), "--", *script, "--out",
                   str(out), "--steps", str(STEPS), *extra, "--step-sleep", "0.25"])
    try:
        code, stdout, stderr = finish(first)
        assert code == 75, stdout[-3000:] + stderr[-3000:]
        evs = events(tmp_path / "run-1.jsonl")
        requests, acks = requests_and_acks(evs)
        assert [r["action"] for r in requests] == ["checkpoint", "stop"]
        assert sorted(a["seq"] for a in acks) == [r["seq"] for r in requests]
        assert max(session_clock(evs, e) for e in requests + acks) < SESSION_S
        status = RunDir(tmp_path / "run-1").read_status()
        assert status is not None and (status.state, status.acked_seq) == (
            "stopped", requests[-1]["seq"])
        ckpt = status.last_checkpoint
        assert ckpt is not None and ckpt.seq == requests[-1]["seq"]
        assert ckpt.path == str(out / f"checkpoint-{ckpt.step}" / COMMIT_MARKER)
        assert verify_checkpoint(ckpt.path, ckpt.sha256, ckpt.bytes) is None
        assert 0 < ckpt.step < STEPS and f"stopped at step {ckpt.step}" in stdout
        assert status.step_time_s is not None and status.step_time_s > 0.2  # 0.25 s sleeps
        target = resume_target(out / f"checkpoint-{ckpt.step}")
        assert watchdog_resume(out) == str(target)

        second = spawn([*watchdog_argv(tmp_path, "run-2", 3 * SESSION_S, end=True), "--",
                        *script, "--out", str(out), "--steps", str(STEPS), *extra])
        code, stdout, stderr = finish(second)
        assert code == 0, stdout[-3000:] + stderr[-3000:]
        assert f"{resume_arg}={target}" in stdout
        final = RunDir(tmp_path / "run-2").read_status()
        assert final is not None and final.state == "completed" and final.step == STEPS
        assert final.last_checkpoint is not None
        assert final.last_checkpoint.path == str(out / f"checkpoint-{STEPS}" / COMMIT_MARKER)
        evs2 = events(tmp_path / "run-2.jsonl")
        verified = [e for e in evs2 if e.get("step") == "end_verify"]
        assert verified and verified[0]["ok"] is True
        assert verified[0]["path"] == final.last_checkpoint.path
        assert end_steps(evs2).index("end_verify") < end_steps(evs2).index("end_dry_run")

        code, stdout, stderr = finish(reference)
        assert code == 0, stderr[-3000:]
        assert_same(torch.load(out / "final.pt"), torch.load(ref / "final.pt"), "weights")
    finally:
        for proc in (reference, first):
            reap(proc)


def check_failed_run_is_not_ended(tmp_path: Path, script: List[str]) -> None:
    """The script raises at step 7 under a daemon with --end-when-done: exit 1 with the
    traceback, state=failed with the error in trainer.json, and no end step at all."""
    proc = spawn([*watchdog_argv(tmp_path, "run", 60.0, end=True), "--", *script, "--out",
                  str(tmp_path / "out"), "--steps", "50", "--raise-at", "7"])
    try:
        code, stdout, stderr = finish(proc)
    finally:
        reap(proc)
    assert code == 1, stdout[-3000:] + stderr[-3000:]
    assert "RuntimeError: boom at step 7" in stderr
    status = RunDir(tmp_path / "run").read_status()
    assert status is not None and status.state == "failed"
    assert "boom at step 7" in status.extra["error"]
    steps = end_steps(events(tmp_path / "run.jsonl"))
    assert not [s for s in steps if s and s.startswith("end_")], steps
