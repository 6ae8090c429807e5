"""The test harness itself (tests/conftest.py): no test leaves a process behind, pass or fail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent

# A test that starts three kinds of process and then fails: a child in its own session, a child
# whose own child (like torchrun's workers) sits in that session's group, and a daemon whose
# parent exited at once (so it is no descendant of pytest any more).
LEAKY_TEST = textwrap.dedent('''
    import os, subprocess, sys, time
    from pathlib import Path

    OUT = Path(os.environ["LEAK_DIR"])
    HOLD = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
    SPAWN = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]],"
             " start_new_session=sys.argv[3] == 'detach'); "
             "sys.exit(0) if sys.argv[3] == 'detach' else __import__('time').sleep(600)")

    def test_leaks_and_fails():
        subprocess.Popen([sys.executable, "-c", HOLD, str(OUT / "session")], start_new_session=True)
        subprocess.Popen([sys.executable, "-c", SPAWN, HOLD, str(OUT / "worker"), "group"],
                         start_new_session=True)
        subprocess.run([sys.executable, "-c", SPAWN, HOLD, str(OUT / "daemon"), "detach"], check=True)
        deadline = time.monotonic() + 300
        while not all((OUT / n).exists() and (OUT / n).read_text() for n in ("session", "worker", "daemon")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert False, "fails on purpose: the processes must be reaped anyway"
''')


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TestProcessReaping:
    def test_a_failed_test_leaves_no_process_behind(self, tmp_path: Path) -> None:
        """A failing test's children, grandchildren in their own session and re-parented daemons
        are all killed when the test ends."""
        (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
        out = tmp_path / "pids"
        out.mkdir()
        env = {**os.environ, "LEAK_DIR": str(out),
               "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        # The harness is loaded as a plugin (-p conftest): the inner run has only the leaky test.
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-p", "conftest", "-c", os.devnull, "--rootdir", str(tmp_path),
                               str(tmp_path / "test_leaky.py")],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        assert "fails on purpose" in done.stdout
        pids = {name: int((out / name).read_text()) for name in ("session", "worker", "daemon")}
        deadline = time.monotonic() + 60  # SIGKILL is immediate; init may take a moment to reap
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {name: alive(pid) for name, pid in pids.items()} == {
            "session": False, "worker": False, "daemon": False}
