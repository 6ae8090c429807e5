"""Checksums of checkpoints: the "<algorithm>:<hex>" strings, what markers and trainer.json record,
that checkpoints written before checksums (a bare sha256) still verify and resume, and the
trainer's read-back that spares the end of the runtime a cold re-read (issue 17).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from session_watchdog import channel, checksum
from session_watchdog.actions import verify_checkpoint
from session_watchdog.channel import CheckpointInfo, TrainerStatus
from session_watchdog.trainer.checkpoint import CheckpointManager

crc32c = pytest.importorskip("crc32c")


class TestChecksumStrings:
    @pytest.mark.parametrize("text, parsed", [
        ("crc32c:0a1b2c3d", ("crc32c", "0a1b2c3d")),
        ("crc32:ffffffff", ("crc32", "ffffffff")),
        ("sha256:" + "ab" * 32, ("sha256", "ab" * 32)),
        ("ab" * 32, ("sha256", "ab" * 32)),  # the sha256 field of older records
    ])
    def test_parse_accepts_the_spellings(self, text: str, parsed: tuple):
        """parse() reads "<algorithm>:<hex>" and, for old records, a bare 64-digit sha256."""
        assert checksum.parse(text) == parsed

    @pytest.mark.parametrize("text", ["", "crc32c:0a1b", "md5:" + "0" * 32, "ab" * 31,
                                      "CRC32C:0a1b2c3d", "crc32c:0A1B2C3D", "crc32c:0a1b2c3d\n"])
    def test_parse_refuses_anything_else(self, text: str):
        """Truncated, unknown, upper-case or trailing-garbage checksums are refused, never half-compared."""
        with pytest.raises(checksum.ChecksumError):
            checksum.parse(text)

    def test_of_file_for_each_algorithm_across_blocks(self, tmp_path: Path):
        """of_file() computes the named algorithm over every byte, across 8 MiB read blocks."""
        data = bytes(range(256)) * (checksum.CHUNK // 256 + 3)
        path = tmp_path / "f"
        path.write_bytes(data)
        assert checksum.of_file(path, "crc32c") == f"crc32c:{crc32c.crc32c(data):08x}"
        assert checksum.of_file(path, "crc32") == f"crc32:{zlib.crc32(data):08x}"
        assert checksum.of_file(path, "sha256") == f"sha256:{hashlib.sha256(data).hexdigest()}"
        assert checksum.of_file(path, "crc32c", cold=True) == f"crc32c:{crc32c.crc32c(data):08x}"

    def test_of_file_reads_one_byte_past_a_limit(self, tmp_path: Path):
        """With a limit, at most limit + 1 bytes are read: a file that grew does not match."""
        path = tmp_path / "f"
        path.write_bytes(b"x" * 1000)
        assert checksum.of_file(path, "crc32c", 999) == f"crc32c:{crc32c.crc32c(b'x' * 1000):08x}"
        assert checksum.of_file(path, "crc32c", 500) == f"crc32c:{crc32c.crc32c(b'x' * 501):08x}"

    def test_of_file_refuses_a_symlink_and_a_fifo(self, tmp_path: Path):
        """A symlink is never followed and a FIFO never blocks the read: both are refused."""
        (tmp_path / "real").write_bytes(b"x")
        os.symlink(tmp_path / "real", tmp_path / "link")
        os.mkfifo(tmp_path / "fifo")
        for name in ("link", "fifo"):
            with pytest.raises(OSError):
                checksum.of_file(tmp_path / name, "crc32c")

    def test_records_keep_the_old_form_for_sha256(self):
        """A sha256 is recorded as {"sha256": hex}, as before checksums; others as {"checksum": ...}."""
        assert checksum.record_fields("crc32c:0a1b2c3d") == {"checksum": "crc32c:0a1b2c3d"}
        assert checksum.record_fields("ab" * 32) == {"sha256": "ab" * 32}
        assert checksum.for_record({"sha256": "ab" * 32}) == "sha256:" + "ab" * 32
        assert checksum.for_record({"checksum": "crc32c:0a1b2c3d"}) == "crc32c:0a1b2c3d"
        assert checksum.for_record({"checksum": "crc32c:nothex!!"}) is None
        assert checksum.for_record({}) is None

    def test_new_checkpoints_use_crc32c_when_installed(self):
        """With the crc32c package (the torch extra) new checkpoints are checksummed with CRC32C."""
        assert checksum.preferred() == "crc32c"


def old_style_commit(manager: CheckpointManager, step: int) -> Path:
    """A checkpoint whose marker has the sha256 field of versions before checksums."""
    saved = manager.save({"w": torch.full((1000,), float(step))}, step=step)
    marker = Path(str(saved.path) + ".sha256")
    obj = json.loads(marker.read_text())
    del obj["checksum"]
    obj["sha256"] = hashlib.sha256(saved.path.read_bytes()).hexdigest()
    channel.write_json(marker, obj)
    return saved.path


class TestOldMarkers:
    def test_a_sha256_marker_still_verifies_and_resumes(self, tmp_path: Path):
        """A checkpoint committed with a sha256 marker is listed, verified, and picked at resume."""
        manager = CheckpointManager(tmp_path, keep=3)
        path = old_style_commit(manager, 5)
        found = CheckpointManager(tmp_path).latest()
        assert found is not None and found.path == path
        assert found.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert found.checksum == f"sha256:{found.sha256}"
        assert manager.verify(path)
        assert torch.equal(manager.load(found)["w"], torch.full((1000,), 5.0))

    def test_a_changed_file_under_a_sha256_marker_is_set_aside(self, tmp_path: Path):
        """A sha256-marked file whose bytes changed fails verification; the older one is resumed."""
        manager = CheckpointManager(tmp_path, keep=3)
        older = manager.save({"w": torch.zeros(10)}, step=1)
        path = old_style_commit(manager, 2)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        found = CheckpointManager(tmp_path).latest()
        assert found is not None and found.path == older.path
        assert (tmp_path / (path.name + ".broken")).exists()

    def test_a_crc32c_marker_with_a_flipped_byte_is_set_aside(self, tmp_path: Path):
        """A flipped byte under a CRC32C marker fails verification like any torn file."""
        manager = CheckpointManager(tmp_path, keep=3)
        older = manager.save({"w": torch.zeros(10)}, step=1)
        newer = manager.save({"w": torch.ones(10_000)}, step=2)
        data = bytearray(newer.path.read_bytes())
        data[-100] ^= 0x01
        newer.path.write_bytes(bytes(data))
        assert not manager.verify(newer.path)
        found = CheckpointManager(tmp_path).latest()
        assert found is not None and found.path == older.path

    def test_a_marker_with_both_fields_is_not_trusted(self, tmp_path: Path):
        """A marker holding both a checksum and a sha256 (that could disagree) commits nothing."""
        manager = CheckpointManager(tmp_path, keep=3)
        saved = manager.save({"w": torch.ones(10)}, step=1)
        marker = Path(str(saved.path) + ".sha256")
        obj = json.loads(marker.read_text())
        obj["sha256"] = hashlib.sha256(saved.path.read_bytes()).hexdigest()
        channel.write_json(marker, obj)
        assert manager.list() == [] and not manager.verify(saved.path)


class TestDaemonSide:
    def test_verify_checkpoint_checks_a_crc32c_report(self, tmp_path: Path):
        """The end transaction's check accepts the trainer's CRC32C and refuses a changed file."""
        saved = CheckpointManager(tmp_path).save({"w": torch.ones(5000)}, step=3)
        assert verify_checkpoint(str(saved.path), saved.checksum, saved.bytes) is None
        data = bytearray(saved.path.read_bytes())
        data[-50] ^= 0x10
        saved.path.write_bytes(bytes(data))
        assert verify_checkpoint(str(saved.path), saved.checksum, saved.bytes) == \
            f"checkpoint {saved.path} does not match its crc32c (torn or changed)"

    def test_verify_checkpoint_still_takes_a_bare_sha256(self, tmp_path: Path):
        """A trainer.json from an older trainer (a bare sha256) still verifies."""
        path = old_style_commit(CheckpointManager(tmp_path), 4)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert verify_checkpoint(str(path), digest, path.stat().st_size) is None

    def test_checkpoint_info_round_trips_a_checksum(self):
        """trainer.json's last_checkpoint carries the checksum; an old one derives it from sha256."""
        info = CheckpointInfo(path="/c/x.pt", seq=1, step=2, at=3.0, duration_s=4.0, bytes=5,
                              sha256="", checksum="crc32c:0a1b2c3d")
        status = TrainerStatus(1, 0.0, "running", 2, 0, None, 0, info, 7.0)
        obj = json.loads(json.dumps(status.to_json()))
        assert obj["last_checkpoint"]["checksum"] == "crc32c:0a1b2c3d"
        assert TrainerStatus.from_json(obj).last_checkpoint == info
        old = CheckpointInfo.from_json({"path": "/c/x.pt", "step": 2, "at": 3.0, "duration_s": 4.0,
                                        "bytes": 5, "sha256": "cd" * 32})
        assert old is not None and old.checksum == "sha256:" + "cd" * 32


class TestVerifiedRecord:
    def test_verify_remembers_a_pass_and_leaves_the_marker_alone(self, tmp_path: Path):
        """A passing verify() is remembered as (verified_at, mtime_ns); the marker stays as committed."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save({"w": torch.ones(1000)}, step=1)
        marker = Path(str(saved.path) + ".sha256")
        before = marker.read_bytes()
        assert manager.verification(saved.path) is None
        assert manager.verify(saved.path)
        verification = manager.verification(saved.path)
        assert verification is not None
        verified_at, mtime_ns = verification
        assert mtime_ns == saved.path.stat().st_mtime_ns and isinstance(verified_at, float)
        assert marker.read_bytes() == before

    def test_a_warm_verify_is_not_remembered(self, tmp_path: Path):
        """verify(cold=False) (what load() does) reads through the page cache and records nothing."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save({"w": torch.ones(1000)}, step=1)
        assert manager.verify(saved.path, cold=False)
        assert manager.verification(saved.path) is None
        assert torch.equal(manager.load(saved)["w"], torch.ones(1000))
        assert manager.verification(saved.path) is None

    def test_a_failed_verify_is_not_remembered(self, tmp_path: Path):
        """A file that fails verification has no verification to report."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save({"w": torch.ones(5000)}, step=1)
        data = bytearray(saved.path.read_bytes())
        data[-64] ^= 0x01
        saved.path.write_bytes(bytes(data))
        assert not manager.verify(saved.path)
        assert manager.verification(saved.path) is None

    def test_the_end_check_trusts_an_unchanged_verified_file_without_rereading(self, tmp_path: Path):
        """Given the mtime at which the trainer verified the file, verify_checkpoint does not re-read
        it while the mtime is unchanged (shown by a same-size change it cannot see); it re-reads
        the file once the mtime differs, and always without that mtime."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save({"w": torch.ones(5000)}, step=1)
        assert manager.verify(saved.path)
        verification = manager.verification(saved.path)
        assert verification is not None
        mtime_ns = verification[1]
        st = saved.path.stat()
        data = bytearray(saved.path.read_bytes())
        data[-64] ^= 0x01
        saved.path.write_bytes(bytes(data))
        os.utime(saved.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        mismatch = f"checkpoint {saved.path} does not match its crc32c (torn or changed)"
        assert verify_checkpoint(str(saved.path), saved.checksum, saved.bytes, mtime_ns) is None
        assert verify_checkpoint(str(saved.path), saved.checksum, saved.bytes) == mismatch
        os.utime(saved.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert verify_checkpoint(str(saved.path), saved.checksum, saved.bytes, mtime_ns) == mismatch

    def test_the_size_and_marker_are_checked_even_when_verified(self, tmp_path: Path):
        """A verified mtime never excuses a wrong size or a marker that disagrees with the report."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save({"w": torch.ones(5000)}, step=1)
        assert manager.verify(saved.path)
        verification = manager.verification(saved.path)
        assert verification is not None
        assert verify_checkpoint(str(saved.path), saved.checksum, saved.bytes + 1,
                                 verification[1]) is not None
        assert verify_checkpoint(str(saved.path), "crc32c:00000000", saved.bytes,
                                 verification[1]).endswith("does not match the trainer's report")

    def test_checkpoint_info_carries_the_verification(self):
        """trainer.json's last_checkpoint round-trips verified_at and mtime_ns, omitted when unset."""
        info = CheckpointInfo(path="/c/x.pt", seq=None, step=2, at=3.0, duration_s=4.0, bytes=5,
                              sha256="", checksum="crc32c:0a1b2c3d", verified_at=6.5,
                              mtime_ns=1_700_000_000_123_456_789)
        status = TrainerStatus(1, 0.0, "completed", 2, 0, None, 0, info, 7.0)
        obj = json.loads(json.dumps(status.to_json()))
        assert obj["last_checkpoint"]["mtime_ns"] == 1_700_000_000_123_456_789
        assert TrainerStatus.from_json(obj).last_checkpoint == info
        bare = TrainerStatus(1, 0.0, "completed", 2, 0, None, 0,
                             CheckpointInfo("/c/x.pt", None, 2, 3.0, 4.0, 5, "ab" * 32), 7.0)
        last = bare.to_json()["last_checkpoint"]
        assert set(last) == {"path", "seq", "step", "at", "duration_s", "bytes", "sha256"}


class TestWithoutTheCrc32cPackage:
    """An install without the crc32c package (no torch extra): our lookup of it answers None."""

    @pytest.fixture
    def no_crc32c(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(checksum, "_crc32c_module", lambda: None)

    def test_new_checkpoints_use_zlib_crc32_and_verify(self, tmp_path: Path, no_crc32c: None):
        """Without crc32c, saves record zlib's CRC-32, which verifies and resumes like any other."""
        manager = CheckpointManager(tmp_path)
        saved = manager.save({"w": torch.ones(1000)}, step=1)
        assert saved.checksum == f"crc32:{zlib.crc32(saved.path.read_bytes()):08x}"
        assert manager.verify(saved.path) and CheckpointManager(tmp_path).latest() == saved
        assert verify_checkpoint(str(saved.path), saved.checksum, saved.bytes) is None

    def test_a_crc32c_checkpoint_is_kept_not_set_aside(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        """A CRC32C checkpoint this install cannot check is passed over for an older one it can, but
        never renamed .broken (it may well be intact); the daemon's check names the fix."""
        manager = CheckpointManager(tmp_path, keep=3)
        older = old_style_commit(manager, 1)
        newer = manager.save({"w": torch.ones(10)}, step=2)
        monkeypatch.setattr(checksum, "_crc32c_module", lambda: None)
        found = CheckpointManager(tmp_path).latest()
        assert found is not None and found.path == older
        assert newer.path.exists() and not (tmp_path / (newer.path.name + ".broken")).exists()
        problem = verify_checkpoint(str(newer.path), newer.checksum, newer.bytes)
        assert problem is not None and "install the crc32c package" in problem
