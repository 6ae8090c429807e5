"""The daemon never imports torch (DESIGN.md); only session_watchdog/trainer/ may.

Nor a training framework: transformers, lightning, accelerate and torchdata belong to
session_watchdog/integrations/ (and torchdata to the trainer side).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "session_watchdog"
TRAINER_SIDE = ("trainer", "integrations")


def _daemon_modules() -> list:
    """Every module of the package outside the trainer side, found on disk (a new one is covered
    the day it is added)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[1:2] and parts[1] in TRAINER_SIDE or parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


DAEMON_MODULES = _daemon_modules()
BANNED = {"torch", "transformers", "lightning", "pytorch_lightning", "accelerate", "torchdata"}


def imported_names(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


class TestNoTorchInTheDaemon:
    def test_no_daemon_source_file_imports_torch(self):
        """No module outside trainer/ and integrations/ imports torch or a framework, even lazily."""
        offenders = [(str(p.relative_to(PACKAGE)), sorted(BANNED & imported_names(p)))
                     for p in PACKAGE.rglob("*.py")
                     if not set(TRAINER_SIDE) & set(p.relative_to(PACKAGE).parts)
                     and BANNED & imported_names(p)]
        assert offenders == []

    def test_importing_the_daemon_loads_no_torch(self):
        """Importing every daemon module in a fresh interpreter leaves torch out of sys.modules."""
        code = ("import sys, importlib\n"
                f"for m in {DAEMON_MODULES!r}: importlib.import_module(m)\n"
                "import session_watchdog.trainer\n"
                f"print(sorted(m for m in {sorted(BANNED)!r} if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"

    def test_the_daemon_loads_apprise_only_when_notify_is_set(self, tmp_path):
        """A watchdog without notify never imports apprise, nor session_watchdog.notify (issue 15)."""
        code = ("import sys\n"
                "from session_watchdog import platforms\n"
                "from session_watchdog.config import Config\n"
                "from session_watchdog.daemon import Watchdog\n"
                f"for m in {DAEMON_MODULES!r}:\n"
                "    if m != 'session_watchdog.notify' and not m.startswith('session_watchdog.notify.'):\n"
                "        __import__(m)\n"
                f"c = Config.build(run_dir={str(tmp_path / 'r')!r})\n"
                "dog = Watchdog(c, platform=platforms.Platform('generic', ('t',)), session_start=1.0)\n"
                "print('apprise' in sys.modules, 'session_watchdog.notify' in sys.modules)\n"
                f"c = Config.build(run_dir={str(tmp_path / 'r2')!r}, notify='json://127.0.0.1:9/x')\n"
                "dog = Watchdog(c, platform=platforms.Platform('generic', ('t',)), session_start=1.0)\n"
                "print('apprise' in sys.modules)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["False", "False", "True"]

    @pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install ruff)")
    def test_ruff_banned_api_rule_holds(self):
        """ruff's banned-api table (pyproject.toml) passes: torch, pynvml, subprocess stay in their modules."""
        out = subprocess.run(["ruff", "check", "--select", "TID251", str(PACKAGE)],
                             capture_output=True, text=True, cwd=PACKAGE.parent)
        assert out.returncode == 0, out.stdout


    @pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install ruff)")
    def test_ruff_bans_the_frameworks_outside_the_trainer_side(self):
        """An import of a training framework fails ruff in a daemon module, and passes in
        integrations/ (frameworks) and trainer/ (torchdata)."""

        def banned(module: str, path: str) -> bool:
            out = subprocess.run(["ruff", "check", "--select", "TID251", "--stdin-filename",
                                  str(PACKAGE / path), "-"], input=f"import {module}\n",
                                 capture_output=True, text=True, cwd=PACKAGE.parent)
            return out.returncode != 0 and "TID251" in out.stdout

        frameworks = ["transformers", "lightning", "pytorch_lightning", "accelerate", "torchdata"]
        assert [m for m in frameworks if banned(m, "policy.py")] == frameworks
        assert [m for m in frameworks if banned(m, "integrations/hf.py")] == []
        assert not banned("torchdata", "trainer/data.py")


class TestTypes:
    @pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is not installed (pip install mypy)")
    def test_mypy_strict_passes_on_the_package(self):
        """mypy --strict (configured in pyproject.toml) finds no error in session_watchdog."""
        out = subprocess.run(["mypy", "session_watchdog"], capture_output=True, text=True,
                             cwd=PACKAGE.parent)
        assert out.returncode == 0, out.stdout[-3000:]
