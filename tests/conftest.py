from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py and helpers import as top-level


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
