"""The dataset identity check on real public-domain photos (tests/public_photos.py): one person's jittered crops pass
clean; another person, a two-person shot, a face-less photo, a tiny face, a blurred face and a near-duplicate are
each named with their kind; the dataset folder is never changed.

Face tests need the ``[likeness]`` extra (dlib) and skip, saying so, without it; the rest always run.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from public_photos import (
    FACE_AVAILABLE,
    as_pil,
    astronaut,
    clean_astronaut_set,
    jitter,
    mixed_identity_set,
    near_duplicate,
    needs_face,
    tiny_face,
    write_photos,
)
from skimage import data

from klein_core.cli import main
from klein_core.data.images import decode_image_rgb, decode_reduced_rgb
from klein_core.data.scan import inspect_dataset
from klein_core.health.contact_sheet import sheet_order, write_contact_sheet
from klein_core.health.identity import (
    FINDING_KINDS,
    THRESHOLDS,
    IdentityThresholds,
    check_identity,
    dhash,
    leave_one_out_medoids,
)
from klein_core.health.likeness import FaceLikeness

RESOLUTION = 512  # faces are judged at training scale; 512 keeps detection cheap


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def face() -> FaceLikeness:
    return FaceLikeness()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed") / "photos"
    write_photos(folder, mixed_identity_set())
    return folder


def check_folder(folder: Path, face, resolutions=(RESOLUTION,)):
    return check_identity(inspect_dataset(folder, "kw", resolutions=resolutions), face=face)


def kinds_by_file(report) -> dict[str, set[str]]:
    return {image.name: {f.kind for f in image.findings} for image in report.images}


# --------------------------------------------------------------------------------------------------------------
# always run: thresholds, hashes, medoids, reduced decoding, the no-extra path


def test_every_threshold_has_its_reason():
    reasons = IdentityThresholds().reasons()
    assert set(reasons) == {
        "small_face_px",
        "sharpness_side",
        "blurry_below",
        "second_face_min_score",
        "different_person_distance",
        "min_faces_to_compare",
        "near_duplicate_bits",
        "not_ready_share",
    }
    assert all(len(why.split(": ", 1)[1]) > 40 for why in reasons.values()), reasons
    assert reasons["different_person_distance"].startswith("0.6: ")


def test_perceptual_hash_matches_a_resized_reencoded_copy_but_not_a_new_framing():
    shot = as_pil(jitter(astronaut(), (60, 20, 420, 400), 1.0, (1, 1, 1), 0.0))
    buffer = io.BytesIO()
    near_duplicate(shot).save(buffer, "JPEG", quality=70)
    copy = Image.open(buffer)
    other_framing = as_pil(jitter(astronaut(), (0, 0, 400, 512), 1.0, (1, 1, 1), 0.0))
    assert (dhash(shot) ^ dhash(copy)).bit_count() <= THRESHOLDS.near_duplicate_bits
    assert (dhash(shot) ^ dhash(other_framing)).bit_count() > 2 * THRESHOLDS.near_duplicate_bits


def test_leave_one_out_medoid_is_the_most_central_of_the_others():
    points = np.random.default_rng(0).normal(size=(7, 3))
    points[6] += 10.0  # an outlier
    distances = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
    medoids = leave_one_out_medoids(distances)
    for i in range(7):
        others = [j for j in range(7) if j != i]
        cost = {j: sum(distances[j, k] for k in others if k != j) for j in others}
        assert medoids[i] == min(cost, key=cost.get)
    assert medoids[6] != 6 and distances[6, medoids[6]] > 5  # the outlier is measured against the group


def test_reduced_decoding_gives_the_upright_size_asked_for(tmp_path: Path):
    photo = as_pil(astronaut()).resize((2000, 1500))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 1500 x 2000
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90, exif=exif)
    data_bytes = buffer.getvalue()
    full = decode_image_rgb(data_bytes, "sideways.jpg")
    reduced = decode_reduced_rgb(data_bytes, "sideways.jpg", 375, 500)
    assert full.size == (1500, 2000) and reduced.size == (375, 500)
    expected = np.asarray(full.resize((375, 500), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(np.asarray(reduced, dtype=np.float32) - expected).mean() < 6  # same picture, same orientation


def test_without_the_extra_near_duplicates_are_still_found_and_one_line_says_how_to_add_faces(tmp_path, monkeypatch):
    import klein_core.health.identity as identity
    from klein_core.health.likeness import FACE_EXTRA_HINT

    monkeypatch.setattr(identity, "face_backend_available", lambda: (False, "dlib is not installed: pip install x"))
    shots = clean_astronaut_set()
    shots["copy_of_1.jpg"] = near_duplicate(shots["astronaut_1.jpg"])  # named after it: the later one is flagged
    write_photos(tmp_path / "set", shots)
    report = check_folder(tmp_path / "set", face=True)
    assert not report.face_checks and "pip install" in report.note and FACE_EXTRA_HINT in report.note
    assert kinds_by_file(report) == {**{n: set() for n in clean_astronaut_set()}, "copy_of_1.jpg": {"near_duplicate"}}
    assert report.note in "\n".join(report.summary_lines())


def test_contact_sheet_puts_the_farthest_face_first_and_refuses_the_dataset_folder(tmp_path: Path, capsys):
    write_photos(tmp_path / "set", clean_astronaut_set())
    report = check_folder(tmp_path / "set", face=False)
    report.images[3].distance, report.images[1].distance = 0.9, 0.2
    assert [i.name for i in sheet_order(report)][:2] == ["astronaut_3.jpg", "astronaut_1.jpg"]
    path = write_contact_sheet(report, tmp_path / "out" / "sheet.png", title="test")
    sheet = Image.open(path)
    assert sheet.format == "PNG" and sheet.width > 3 * 192 and sheet.height > 2 * 192
    code = main(
        ["dataset", "check", str(tmp_path / "set"), "--trigger", "kw", "--sheet", str(tmp_path / "set" / "s.png")]
    )
    assert code == 2 and "inside the dataset folder" in capsys.readouterr().err
    assert not (tmp_path / "set" / "s.png").exists()


# --------------------------------------------------------------------------------------------------------------
# face checks: need the [likeness] extra


@needs_face
def test_one_persons_jittered_crops_pass_clean(tmp_path: Path, face):
    write_photos(tmp_path / "set", clean_astronaut_set())
    report = check_folder(tmp_path / "set", face)
    assert report.face_checks and report.ready and not report.flagged and not report.notes
    assert all(len(i.faces) == 1 and i.distance is not None for i in report.images)
    assert report.typical_distance < THRESHOLDS.different_person_distance


@needs_face
def test_each_problem_photo_is_named_with_its_kind(mixed_folder: Path, face):
    report = check_folder(mixed_folder, face)
    expected = {name: {kind} if kind else set() for name, (_, kind) in mixed_identity_set().items()}
    assert kinds_by_file(report) == expected
    assert set().union(*expected.values()) == set(FINDING_KINDS)  # every kind is exercised
    other = next(i for i in report.images if i.name == "other_person.jpg")
    (message,) = [f.message for f in other.findings]
    assert f"{other.distance:.2f}" in message and f"typical distance is {report.typical_distance:.2f}" in message


@needs_face
def test_cli_json_lists_each_files_findings_writes_the_sheet_and_leaves_the_folder_untouched(
    mixed_folder, tmp_path, capsys
):
    before = folder_state(mixed_folder)
    sheet = tmp_path / "sheet.png"
    code = main(
        [
            "dataset",
            "check",
            str(mixed_folder),
            "--trigger",
            "kw",
            "--resolution",
            str(RESOLUTION),
            "--json",
            "--sheet",
            str(sheet),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert folder_state(mixed_folder) == before
    files = {f["file"]: f for f in report["identity"]["files"]}
    assert [f["kind"] for f in files["two_people.jpg"]["findings"]] == ["several_faces"]
    assert files["two_people.jpg"]["faces"] == 2 and files["coffee.jpg"]["faces"] == 0
    assert all(f["message"] for entry in files.values() for f in entry["findings"])
    assert code == 0 and report["ready"] and report["identity"]["face_checks"]  # 6 of 12 flagged: not most
    assert Image.open(sheet).size[0] > 0 and report["sheet"] == str(sheet.resolve())


@needs_face
def test_a_set_where_most_images_fail_is_not_ready(tmp_path: Path, capsys):
    shots = dict(list(clean_astronaut_set().items())[:2])
    shots.update({"coffee.jpg": as_pil(data.coffee()), "rocket.jpg": as_pil(data.rocket()), "tiny.png": tiny_face()})
    write_photos(tmp_path / "set", shots)
    code = main(["dataset", "check", str(tmp_path / "set"), "--trigger", "kw", "--resolution", str(RESOLUTION)])
    out = capsys.readouterr().out
    assert code == 1
    assert "NOT READY: 3 of 5 images flagged by the identity check" in out
    assert "coffee.jpg: [no_face]" in out and "tiny.png: [small_face]" in out


@needs_face
def test_a_set_without_any_face_gets_one_note_instead_of_a_flag_per_image(tmp_path: Path, face):
    write_photos(tmp_path / "set", {"coffee.jpg": as_pil(data.coffee()), "rocket.jpg": as_pil(data.rocket())})
    report = check_folder(tmp_path / "set", face)
    assert report.ready and not report.flagged
    assert len(report.notes) == 1 and "no face found in any of the 2 images" in report.notes[0]


@needs_face
def test_face_size_is_judged_at_the_smallest_training_resolution(tmp_path: Path, face):
    write_photos(tmp_path / "set", {"tiny.png": tiny_face()})
    at_1024 = check_folder(tmp_path / "set", face, resolutions=(1024,)).images[0]
    both = check_folder(tmp_path / "set", face, resolutions=(1024, 512)).images[0]
    assert at_1024.face_px >= THRESHOLDS.small_face_px and at_1024.face_resolution == 1024
    assert both.face_resolution == 512 and both.face_px == pytest.approx(at_1024.face_px / 2, abs=2)
    assert "small_face" in {f.kind for f in both.findings} and "small_face" not in {f.kind for f in at_1024.findings}


def test_the_identity_benchmark_runs_end_to_end_on_a_few_photos(tmp_path: Path):
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "bench" / "identity_check.py"
    command = [sys.executable, str(bench), "--count", "3", "--max-side", "900", "--resolution", "256", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["photos"]["count"] == 3 and report["photos"]["max_side"] == 900
    assert {"scan_s", "identity_s", "sheet_s", "total_s"} <= report["figures"].keys()
    assert report["figures"]["face_checks"] == FACE_AVAILABLE
