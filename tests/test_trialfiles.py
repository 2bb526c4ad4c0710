"""Shipping a trial's files from a worker without the driver's disk (unit tests, no engine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unison import trialfiles


def test_logs_first_then_small_files_first_within_the_limit(tmp_path: Path) -> None:
    (tmp_path / "stdout.log").write_text("out\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"a" * 40)
    (tmp_path / "b.bin").write_bytes(b"b" * 60)
    (tmp_path / "c.bin").write_bytes(b"c" * 10)
    os.symlink(tmp_path / "b.bin", tmp_path / "link.bin")  # links are not followed
    files, notes = trialfiles.collect(tmp_path, limit=4 + 12 + 10 + 40 + 5)
    assert set(files) == {"stdout.log", "metrics.jsonl", "c.bin", "sub/a.bin", "stderr.log"}
    assert files["sub/a.bin"] == b"a" * 40 and files["c.bin"] == b"c" * 10
    assert notes == ["b.bin (60 bytes): not shipped"]
    assert "b.bin (60 bytes): not shipped" in files["stderr.log"].decode()
    assert "at most 71 bytes per trial" in files["stderr.log"].decode()


def test_a_log_over_the_limit_keeps_its_last_whole_lines(tmp_path: Path) -> None:
    (tmp_path / "stdout.log").write_text("".join(f"line {i}\n" for i in range(1000)))
    files, notes = trialfiles.collect(tmp_path, limit=30)
    kept = files["stdout.log"].decode()
    assert kept.endswith("line 999\n") and kept.startswith("line 99") and len(kept) <= 30
    assert notes and notes[0].startswith("stdout.log (") and "last" in notes[0]


def test_nothing_to_note_when_everything_fits(tmp_path: Path) -> None:
    (tmp_path / "stderr.log").write_text("warning\n")
    files, notes = trialfiles.collect(tmp_path)
    assert files == {"stderr.log": b"warning\n"} and notes == []


def test_written_files_land_in_the_trial_folder_and_logs_append(tmp_path: Path) -> None:
    (tmp_path / "stdout.log").write_text("attempt 0\n")
    trialfiles.write(tmp_path, {"stdout.log": b"attempt 1\n", "ckpt/w.bin": b"\x00\x01"})
    assert (tmp_path / "stdout.log").read_text() == "attempt 0\nattempt 1\n"
    assert (tmp_path / "ckpt" / "w.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", ""])
def test_names_that_would_leave_the_trial_folder_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="refusing"):
        trialfiles.write(tmp_path / "trial", {name: b"x"})
    assert not (tmp_path / "escape.txt").exists()
