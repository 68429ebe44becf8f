"""Benchmark of ``klein-lora dataset check`` with the identity check: 50 photos up to 4000 px on 2 cores.

    python bench/identity_check.py [--count 50] [--max-side 4000] [--resolution 1024] [--cores 2] [--json]
                                   [--mixed-sheet PATH]

The photos are built from the public-domain portraits shipped in PyPI packages (tests/public_photos.py: the NASA
astronaut portrait, Grace Hopper, coffee and rocket photos without a face): random crops and colour jitter, each
resized so its long side is drawn between 1200 (or ``--max-side`` when smaller) and ``--max-side`` px (the first
at ``--max-side``), saved as JPEG (quality 90, what phones and
cameras write) and one in ten as PNG. Then, in this process and timed phase by phase, exactly what
``dataset check DIR --trigger W --sheet PATH`` does: the scan (every image fully decoded once), loading the face
models, the identity check (reduced decoding at training scale, face detection, descriptors, near-duplicate hashes)
and drawing the contact sheet. The process is pinned to ``--cores`` cores (2 by default) where the machine has more.

Goal: the whole check under 60 s for 50 photos. Needs the ``[likeness]`` extra for the face checks (without it the
figures are for the near-duplicate check only, and say so) and the test extra for the photos (scikit-image,
matplotlib). ``--mixed-sheet PATH`` also writes the contact sheet of the test suite's mixed set and prints its CLI
report (the README and the node's doc show both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tests"):  # `python bench/x.py` puts only bench/ on the path
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

GOAL_S = 60.0


def make_photos(folder: Path, count: int, max_side: int, seed: int = 0) -> dict:
    """Write ``count`` photos (about 80% of one person, the rest another person or no face) and describe them."""
    from public_photos import as_pil, astronaut, grace_hopper, jitter
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [astronaut()] * 8 + [grace_hopper()] + [data.coffee(), data.rocket()][: 1 + (count > 20)]
    folder.mkdir(parents=True, exist_ok=True)
    sides = []
    for index in range(count):
        source = sources[index % len(sources)]
        height, width = source.shape[:2]
        crop_w, crop_h = (int(rng.uniform(0.6, 1.0) * s) for s in (width, height))
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        gains = rng.uniform(0.9, 1.1, size=3)
        photo = as_pil(jitter(source, (left, top, left + crop_w, top + crop_h), 1.0, gains, rng.uniform(-0.04, 0.04)))
        long_side = (
            int(rng.uniform(min(1200, max_side), max_side)) if index else max_side
        )  # at least one at the full size
        scale = long_side / max(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
        if index % 10 == 9:
            photo.save(folder / f"photo_{index:03d}.png", compress_level=6)
        else:
            photo.save(folder / f"photo_{index:03d}.jpg", quality=90)
        sides.append(long_side)
    megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    return {
        "count": count,
        "max_side": max(sides),
        "median_side": int(np.median(sides)),
        "megabytes": round(megabytes, 1),
    }


def pin_cores(cores: int) -> list[int]:
    """Run on ``cores`` CPU cores (the first ones this process may use); returns the cores used."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    chosen = allowed[:cores]
    if hasattr(os, "sched_setaffinity") and len(chosen) < len(allowed):
        os.sched_setaffinity(0, chosen)
    return chosen


def run_check(folder: Path, resolution: int, sheet: Path) -> dict:
    """The phases of ``dataset check --sheet``, each timed (seconds)."""
    from klein_core.health.contact_sheet import write_contact_sheet
    from klein_core.health.identity import check_identity, face_checker
    from klein_core.data.scan import inspect_dataset

    times = {}
    start = time.perf_counter()
    scan = inspect_dataset(folder, "kleinchar", resolutions=(resolution,))
    times["scan_s"] = time.perf_counter() - start
    start = time.perf_counter()
    face, note = face_checker()
    times["face_models_s"] = time.perf_counter() - start
    start = time.perf_counter()
    report = check_identity(scan, face=face if face is not None else False)
    times["identity_s"] = time.perf_counter() - start
    start = time.perf_counter()
    write_contact_sheet(report, sheet, title=f"{folder} ({len(scan.items)} images)")
    times["sheet_s"] = time.perf_counter() - start
    times["total_s"] = sum(times.values())
    kinds: dict[str, int] = {}
    for image in report.images:
        for finding in image.findings:
            kinds[finding.kind] = kinds.get(finding.kind, 0) + 1
    return {
        **{k: round(v, 2) for k, v in times.items()},
        "per_image_s": round(times["total_s"] / max(1, len(scan.items)), 3),
        "face_checks": report.face_checks,
        "note": note,
        "flagged": len(report.flagged),
        "findings": kinds,
    }


def mixed_sheet(path: Path) -> str:
    """Write the test suite's mixed set to a temporary folder, its contact sheet to ``path``; return the CLI text."""
    import contextlib
    import io

    from public_photos import mixed_identity_set, write_photos

    from klein_core.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mixed"
        write_photos(folder, mixed_identity_set())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(
                [
                    "dataset",
                    "check",
                    str(folder),
                    "--trigger",
                    "kleinchar",
                    "--resolution",
                    "512",
                    "--captions",
                    "2",
                    "--sheet",
                    str(path),
                ]
            )
        return out.getvalue().replace(str(folder), "mixed").replace(str(path), path.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--max-side", type=int, default=4000)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--mixed-sheet", type=Path, help="also write the mixed test set's contact sheet here")
    args = parser.parse_args()
    cores = pin_cores(args.cores)
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", args.count, args.max_side)
        figures = run_check(Path(tmp) / "photos", args.resolution, Path(tmp) / "sheet.png")
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {
            "cores_used": len(cores),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "photos": photos,
        "resolution": args.resolution,
        "figures": figures,
        "goal_s": GOAL_S,
        "pass": figures["total_s"] < GOAL_S,
    }
    if args.mixed_sheet is not None:
        result["mixed_report"] = mixed_sheet(args.mixed_sheet)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{photos['count']} photos, long side up to {photos['max_side']} px (median {photos['median_side']}), "
        f"{photos['megabytes']} MB; training resolution {args.resolution}; {len(cores)} cores, load "
        f"{result['machine']['load_average'][0]:.1f}"
    )
    for key in ("scan_s", "face_models_s", "identity_s", "sheet_s", "total_s", "per_image_s"):
        print(f"  {key:14s} {figures[key]:8.2f}")
    print(
        f"face checks: {figures['face_checks']} {figures['note']}; flagged {figures['flagged']}: {figures['findings']}"
    )
    print(f"goal: whole check under {GOAL_S:.0f} s -> {'pass' if result['pass'] else 'FAIL'}")
    if args.mixed_sheet is not None:
        print(f"\nmixed set ({args.mixed_sheet}):\n{result['mixed_report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
