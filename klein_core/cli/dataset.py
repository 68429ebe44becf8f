"""``klein-lora dataset check`` (summary and every problem of a dataset folder) and ``klein-lora make-sample-dataset``.

``dataset check`` exits 0 when the folder can be trained on (warnings allowed), 1 when it has errors or the identity
check calls it NOT READY (most images flagged), and 2 when the folder or an option is unusable (folder not found,
no trigger word, a contact sheet path inside the dataset folder).
"""

from __future__ import annotations

from pathlib import Path

from ..data.buckets import parse_resolutions
from ..data.captions import TRIGGER_POLICIES
from ..data.scan import inspect_dataset
from ..errors import DatasetError
from ..health.contact_sheet import write_contact_sheet
from ..health.identity import check_identity
from ..preset import PRESET
from ._common import print_json


def register(sub) -> None:
    dataset = sub.add_parser("dataset", help="inspect a dataset folder")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    check = dataset_sub.add_parser(
        "check",
        help="print the summary and every problem of a dataset folder (exit 1 on errors)",
        description="Scan a dataset folder the way training will (nothing is written into it) and print the "
        "images, captions, aspect buckets, ignored files and every problem.",
    )
    check.add_argument("folder", metavar="DIR", help="the dataset folder (images + optional same-stem .txt captions)")
    check.add_argument("--trigger", required=True, help="the trigger word that replaces [trigger] in captions")
    check.add_argument(
        "--resolution",
        action="append",
        metavar="R",
        help=f"training resolution, repeatable or comma-separated (default {PRESET.resolution}; 768 optional)",
    )
    check.add_argument("--default-caption", default=PRESET.default_caption, help="caption of images without a .txt")
    check.add_argument(
        "--trigger-policy",
        choices=TRIGGER_POLICIES,
        default="prepend",
        help="what to do with a caption lacking the trigger word (default: prepend it); 'exclude' checks a "
        "regularization folder: no caption may contain the word",
    )
    check.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images with a warning")
    check.add_argument("--captions", type=int, default=5, help="how many captions to show (default 5)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument(
        "--sheet",
        metavar="PATH",
        help="write a contact sheet PNG: every image with its face box and flags, the odd ones first (not inside "
        "the dataset folder)",
    )
    check.add_argument(
        "--no-identity",
        action="store_true",
        help="skip the identity check (faces, same person, face size and sharpness, near-duplicates)",
    )
    check.set_defaults(func=run_check)

    sample = sub.add_parser(
        "make-sample-dataset",
        help="write a small synthetic character dataset (for the demo and the tests)",
        description="Write N images of one procedurally drawn character (red hat, yellow scarf, blue body) in "
        "varied poses and scenes, with .txt captions using [trigger]. Same seed, same files.",
    )
    sample.add_argument("folder", metavar="DIR", help="a new or empty folder")
    sample.add_argument("--count", type=int, default=10, help="number of images (default 10)")
    sample.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    sample.add_argument("--size", type=int, default=384, help="long side of each image in pixels (default 384)")
    sample.set_defaults(func=run_make_sample)


def run_check(args) -> int:
    resolutions = parse_resolutions(",".join(args.resolution) if args.resolution else PRESET.resolution)
    sheet = _sheet_path(args.sheet, args.folder)
    scan = inspect_dataset(
        args.folder,
        args.trigger,
        default_caption=args.default_caption,
        trigger_policy=args.trigger_policy,
        skip_corrupt=args.skip_corrupt,
        resolutions=resolutions,
    )
    identity = None
    if not args.no_identity or sheet is not None:
        identity = check_identity(scan, face=not args.no_identity)
    if sheet is not None:
        write_contact_sheet(identity, sheet, title=f"{scan.folder.name}: {len(scan.items)} images")
    ready = scan.ok and (identity is None or identity.ready)
    if args.json:
        report = scan.as_dict()
        report["identity"] = None if identity is None else identity.as_dict()
        report["ready"] = ready
        report["sheet"] = None if sheet is None else str(sheet)
        print_json(report)
        return 0 if ready else 1
    print(scan.summary(max_captions=args.captions))
    if identity is not None:
        print("\n".join(identity.summary_lines()))
    if sheet is not None:
        print(f"contact sheet: {sheet}")
    counts = f"{len(scan.warnings)} warning(s)"
    if identity is not None and identity.flagged:
        counts += f", {len(identity.flagged)} image(s) flagged by the identity check"
    if not scan.ok:
        print(f"NOT READY: {len(scan.errors)} error(s) to fix ({counts})")
    elif not ready:
        print(f"{identity.verdict()} ({counts})")
    else:
        print(f"OK: ready to train ({counts})")
    return 0 if ready else 1


def _sheet_path(sheet: str | None, folder: str) -> Path | None:
    """The contact sheet's path, refused before any work when it would land inside the dataset folder."""
    if sheet is None:
        return None
    path = Path(sheet).expanduser().resolve()
    dataset = Path(folder).expanduser().resolve()
    if path == dataset or dataset in path.parents:
        raise DatasetError(
            f"--sheet {sheet} is inside the dataset folder {dataset}, which is never written to: "
            "write the sheet elsewhere"
        )
    return path


def run_make_sample(args) -> int:
    from ..tools.sample_data import make_sample_dataset

    paths = make_sample_dataset(Path(args.folder), count=args.count, seed=args.seed, size=args.size)
    print(f"wrote {len(paths)} images with captions to {Path(args.folder).expanduser()}")
    print(f"check it: klein-lora dataset check {args.folder} --trigger kleinchar")
    return 0
