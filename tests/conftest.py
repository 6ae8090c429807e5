from __future__ import annotations

import gc
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, List, Set, Tuple

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py and helpers import as top-level


# Tests that start torchrun jobs (gloo rendezvous, ports, several ranks each) run on one xdist
# worker, one job at a time ("--dist loadgroup" in pyproject.toml): two DDP jobs of different
# tests side by side once aborted a rank at exit on a loaded machine.
TORCHRUN = pytest.mark.xdist_group("torchrun")


def heavy_n(default: int) -> int:
    """N for fault-injection loops: small by default, SW_HEAVY_N=200 for the full run."""
    return int(os.environ.get("SW_HEAVY_N", default))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own watchdog settings or writes into their home."""
    for name in list(os.environ):
        if name.startswith("SESSION_WATCHDOG_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    for name in ("COLAB_RELEASE_TAG", "COLAB_GPU", "TBE_RUNTIME_ADDR", "VERTEX_PRODUCT",
                 "AutoDLContainerUUID", "AutoDLRegion", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    from session_watchdog import log

    log.close()


REAP_TOKEN_ENV = "SW_TEST_REAP_TOKEN"  # not SESSION_WATCHDOG_*: the tests' child envs keep it


def _started_by(token: str, since: float, known: Set[Tuple[int, float]]) -> List[psutil.Process]:
    """Processes this test started: our new descendants, and any process (a detached daemon, a
    torchrun worker re-parented to init) that carries the test's token in its environment."""
    found = {}
    try:
        for proc in psutil.Process().children(recursive=True):
            try:
                if (proc.pid, proc.create_time()) not in known:
                    found[proc.pid] = proc
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    for proc in psutil.process_iter(["create_time"]):
        try:
            if proc.pid in found or (proc.info["create_time"] or 0) < since - 5:
                continue
            if proc.environ().get(REAP_TOKEN_ENV) == token:
                found[proc.pid] = proc
        except psutil.Error:
            pass  # gone, or not ours to read
    found.pop(os.getpid(), None)
    return list(found.values())


@pytest.fixture(autouse=True)
def _reap_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every process a test starts is killed when it ends, pass or fail (issue 11: failed torchrun
    tests left ``example --ddp`` workers running for 40 minutes).

    Children inherit a per-test token in their environment, so grandchildren in their own process
    groups or sessions, and processes whose parent is gone, are found too.
    """
    token = secrets.token_hex(8)
    monkeypatch.setenv(REAP_TOKEN_ENV, token)
    since = time.time()
    known = {(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)}
    yield
    left = _started_by(token, since, known)
    if left:
        # DataLoader iterators a test left behind (an interrupted epoch) shut their workers down
        # when collected; killed first, torch's SIGCHLD handler would fail the test at teardown.
        # Only then: a full collection costs ~0.25 s once torch is imported, on every test.
        gc.collect()
        left = _started_by(token, since, known)
    for proc in left:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=30)  # reaps our own children; others are waited for


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt for the test, then the previous handler is back. Python
    keeps SIGINT ignored when it starts with it ignored (nohup, `cmd &`): without this a test that
    interrupts itself would wait forever for an interrupt that never comes (issue 11)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on another filesystem than tmp_path (tmpfs /dev/shm when it is one)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="sw-mirror-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def other_fs(tmp_path: Path, shm: Path) -> bool:
    """Whether ``shm`` really is another filesystem (else tests use the testing override)."""
    return os.stat(shm).st_dev != os.stat(tmp_path).st_dev


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real InteractiveShell (history in memory: no saving thread, nothing in $HOME); the
    notebook watchdog it started is stopped and forgotten afterwards."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config as TraitletsConfig

    from session_watchdog import notebook

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    config = TraitletsConfig()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    yield ip
    notebook.stop()
    notebook._state().pop("last_run_dir", None)
    InteractiveShell.clear_instance()
