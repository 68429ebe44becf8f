"""Atomic writes: the whole new file or the old one, readable as any file the user writes."""

from __future__ import annotations

import os

import pytest

from klein_core.atomic import atomic_write_bytes, atomic_write_json


def test_a_written_file_gets_the_mode_a_plain_write_would_give_not_mkstemps_private_one(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    written = atomic_write_json(tmp_path / "run.json", {"ok": True})
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = atomic_write_bytes(tmp_path / "lora.safetensors", b"old")

    def failing(_tmp: str) -> None:
        raise OSError("disk full")

    from klein_core.atomic import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
