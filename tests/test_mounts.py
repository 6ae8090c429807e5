"""Checkpoint directories on storage that is not mounted, or that cannot be written, are refused
with one line before anything is created (issue 11)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from session_watchdog import mounts
from session_watchdog.mounts import MountRoot

DRIVE = Path("/content/drive")
needs_unmounted_drive = pytest.mark.skipif(
    os.path.ismount(DRIVE), reason="Google Drive is mounted on this machine")


def fake_root(path: Path) -> MountRoot:
    return MountRoot(path, "the test storage", "mount it")


class TestUnmountedRoot:
    def test_a_path_under_an_unmounted_root_is_found(self, tmp_path: Path) -> None:
        """A plain directory in the table (an empty mount target) is not mounted: paths under it
        and the root itself are reported."""
        root = fake_root(tmp_path / "autodl-fs")
        root.path.mkdir()
        assert mounts.unmounted_root(root.path / "run1" / "ckpt", [root]) == root
        assert mounts.unmounted_root(root.path, [root]) == root

    def test_an_absent_root_is_not_mounted(self, tmp_path: Path) -> None:
        """A root that does not exist at all (Drive never mounted) is not mounted either."""
        root = fake_root(tmp_path / "drive")
        assert mounts.unmounted_root(root.path / "MyDrive" / "ckpt", [root]) == root

    def test_a_mounted_root_and_other_paths_pass(self, tmp_path: Path) -> None:
        """A real mount point (/proc) passes, and so do paths outside every root, including a
        sibling whose name only starts like a root."""
        proc = fake_root(Path("/proc"))
        other = fake_root(tmp_path / "drive")
        assert mounts.unmounted_root("/proc/self", [proc, other]) is None
        assert mounts.unmounted_root(tmp_path / "drive-backup" / "ckpt", [other]) is None
        assert mounts.unmounted_root(tmp_path / "ckpt", [other]) is None

    def test_relative_paths_are_judged_where_they_point(self, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """`Session("MyDrive/ckpt")` from inside /content/drive is on Drive too."""
        root = fake_root(tmp_path / "drive")
        root.path.mkdir()
        monkeypatch.chdir(root.path)
        assert mounts.unmounted_root("MyDrive/ckpt", [root]) == root

    def test_the_table_names_drive_and_autodl_storage(self) -> None:
        """Known roots: Colab's Drive mount and AutoDL's network storage."""
        assert [str(r.path) for r in mounts.MOUNT_ROOTS] == [
            "/content/drive", "/root/autodl-fs", "/root/autodl-nas"]


class TestCheckpointDir:
    def test_unmounted_root_is_refused_and_nothing_created(self, tmp_path: Path) -> None:
        """CheckpointManager under an unmounted root raises CheckpointDirError naming the fix,
        and creates nothing."""
        from session_watchdog.trainer.checkpoint import CheckpointDirError, CheckpointManager

        root = fake_root(tmp_path / "drive")
        with pytest.raises(CheckpointDirError) as info:
            CheckpointManager(root.path / "MyDrive" / "ckpt", mount_roots=[root])
        assert str(info.value) == (
            f"{root.path}/MyDrive/ckpt is on the test storage, but {root.path} is not mounted: "
            "checkpoints written there would land on the local disk and die with the runtime; "
            "mount it")
        assert not root.path.exists()

    @needs_unmounted_drive
    def test_session_on_unmounted_drive_is_refused(self, tmp_path: Path) -> None:
        """Session("/content/drive/MyDrive/ckpt") without Drive mounted raises before it creates
        anything (the run dir included)."""
        from session_watchdog.trainer import CheckpointDirError, Session

        existed = DRIVE.exists()
        with pytest.raises(CheckpointDirError, match=r"drive\.mount\('/content/drive'\)"):
            Session(DRIVE / "MyDrive" / "ckpt", run_dir=tmp_path / "run", handle_signals=False)
        assert DRIVE.exists() == existed and not (DRIVE / "MyDrive" / "ckpt").exists()
        assert not (tmp_path / "run").exists()

    def test_a_directory_that_cannot_be_created_is_one_line(self, tmp_path: Path) -> None:
        """mkdir refused by the OS (EACCES, EPERM, ENOTDIR) is CheckpointDirError with the
        reason and the fix, without a chained traceback."""
        from session_watchdog.trainer.checkpoint import CheckpointDirError, CheckpointManager

        blocker = tmp_path / "file"
        blocker.write_text("")
        cases = [(blocker / "sub" / "ckpt", "Not a directory"),
                 # /sys refuses mkdir even for root (EPERM), and for others (EACCES)
                 (Path("/sys/session-watchdog-test/ckpt"),
                  "(Permission denied|Operation not permitted)")]
        if os.geteuid() != 0:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            cases.append((locked / "ckpt", "Permission denied"))
        for path, reason in cases:
            with pytest.raises(CheckpointDirError,
                               match=rf"^cannot create {path}: {reason}; choose a directory you "
                                     r"can write$") as info:
                CheckpointManager(path)
            assert info.value.__cause__ is None and info.value.__suppress_context__

    def test_example_prints_one_line_and_exits_2(self, tmp_path: Path) -> None:
        """The bundled example on a directory it cannot create: one line on stderr, exit 2."""
        proc = subprocess.run(
            [sys.executable, "-m", "session_watchdog.trainer.example", "--checkpoint-dir",
             "/sys/session-watchdog-test/ckpt", "--run-dir", str(tmp_path / "run"), "--quiet"],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: cannot create /sys/session-watchdog-test/ckpt: ")


class TestWatchdogFiles:
    def test_the_default_log_skips_an_unmounted_drive(self, tmp_path: Path) -> None:
        """A writable MyDrive in a Drive root that is not mounted is a local directory: the
        default log goes to the user state dir instead."""
        from session_watchdog.log import default_log_file

        drive = fake_root(tmp_path / "drive")
        (drive.path / "MyDrive").mkdir(parents=True)
        state = tmp_path / "state"
        assert default_log_file("r1", [drive.path], env={"XDG_STATE_HOME": str(state)},
                                mount_roots=[drive]) == state / "session-watchdog" / "r1.jsonl"

    def test_the_log_is_never_created_under_an_unmounted_root(self, tmp_path: Path) -> None:
        """A log reopened after Drive was unmounted (our own flush_and_unmount): the write fails
        and nothing is created in the mount point."""
        from session_watchdog.log import RotatingJsonl

        drive = fake_root(tmp_path / "drive")
        drive.path.mkdir()
        jsonl = RotatingJsonl(drive.path / "MyDrive" / "session-watchdog" / "r1.jsonl",
                              mount_roots=[drive])
        with pytest.raises(OSError, match="not mounted"):
            jsonl.write("{}")
        assert list(drive.path.iterdir()) == []

    @needs_unmounted_drive
    @pytest.mark.parametrize("flag", ["--log-file", "--run-dir"])
    def test_run_refuses_a_log_or_run_dir_on_unmounted_drive(self, tmp_path: Path,
                                                             flag: str) -> None:
        """run --log-file/--run-dir under /content/drive while Drive is not mounted: one line
        naming the fix, exit 2, the command never started."""
        paths = {"--log-file": str(tmp_path / "log.jsonl"), "--run-dir": str(tmp_path / "run")}
        paths[flag] = "/content/drive/MyDrive/session-watchdog/x"
        marker = tmp_path / "started"
        content_existed = Path("/content").exists()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "session_watchdog", "run", "--platform", "generic",
                 "--log-file", paths["--log-file"], "--run-dir", paths["--run-dir"], "--",
                 sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                capture_output=True, text=True, timeout=120)
        finally:
            if not content_existed:  # what a failed refusal created on this machine
                shutil.rmtree("/content", ignore_errors=True)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "/content/drive is not mounted" in proc.stderr and "drive.mount(" in proc.stderr
        assert not marker.exists()
