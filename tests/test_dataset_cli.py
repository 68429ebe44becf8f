"""``klein-lora dataset check`` and ``klein-lora make-sample-dataset`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from klein_core.cli import main


def test_make_sample_dataset_then_check_it_reports_ready(tmp_path: Path, capsys):
    folder = tmp_path / "sample"
    assert main(["make-sample-dataset", str(folder), "--count", "8", "--seed", "2"]) == 0
    assert "wrote 8 images" in capsys.readouterr().out
    assert main(["dataset", "check", str(folder), "--trigger", "kleinchar", "--resolution", "128"]) == 0
    out = capsys.readouterr().out
    assert "8 images, trigger 'kleinchar'" in out
    assert "buckets at 128:" in out and "photo of kleinchar" in out
    assert "OK: ready to train (0 warning(s))" in out


def test_check_prints_every_problem_and_exits_non_zero_on_errors(tmp_path: Path, capsys):
    Image.new("RGB", (300, 300), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "good.txt").write_bytes(b"photo of [trigger] \xff")
    (tmp_path / "orphan.txt").write_text("photo of [trigger]")
    (tmp_path / "readme.md").write_text("notes")
    code = main(["dataset", "check", str(tmp_path), "--trigger", "kleinchar", "--resolution", "128"])
    out = capsys.readouterr().out
    assert code == 1
    assert "broken.jpg: not a readable image" in out
    assert "good.txt: caption is not UTF-8" in out
    assert "orphan.txt: orphan caption" in out
    assert "ignored 2 non-image entries: orphan.txt, readme.md" in out
    assert "NOT READY: 2 error(s) to fix" in out


def test_check_json_has_counts_buckets_and_problems(tmp_path: Path, capsys):
    Image.new("RGB", (400, 300), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "b.png")
    code = main(["dataset", "check", str(tmp_path), "--trigger", "kw", "--resolution", "1024,768", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["images"] == 2
    assert report["resolutions"] == [1024, 768]
    assert report["buckets"]["768"] == {"880x672": 2}
    assert {w["file"] for w in report["warnings"]} == {"a.png", "b.png"}  # upscaled; tiny and upscaled


def test_check_on_a_missing_folder_or_without_a_trigger_is_a_usage_error(tmp_path: Path, capsys):
    assert main(["dataset", "check", str(tmp_path / "nope"), "--trigger", "kw"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["dataset", "check", str(tmp_path), "--trigger", " "]) == 2
    assert "trigger word is missing" in capsys.readouterr().err
