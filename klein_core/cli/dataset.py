"""``klein-lora dataset check`` (summary and every problem of a dataset folder) and ``klein-lora make-sample-dataset``.

``dataset check`` exits 0 when the folder can be trained on (warnings allowed), 1 when it has errors, and 2 when the
folder or an option is unusable (folder not found, no trigger word).
"""

from __future__ import annotations

from pathlib import Path

from ..data.buckets import parse_resolutions
from ..data.captions import TRIGGER_POLICIES
from ..data.scan import inspect_dataset
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
    scan = inspect_dataset(
        args.folder,
        args.trigger,
        default_caption=args.default_caption,
        trigger_policy=args.trigger_policy,
        skip_corrupt=args.skip_corrupt,
        resolutions=resolutions,
    )
    if args.json:
        print_json(scan.as_dict())
    else:
        print(scan.summary(max_captions=args.captions))
        verdict = "OK: ready to train" if scan.ok else f"NOT READY: {len(scan.errors)} error(s) to fix"
        print(f"{verdict} ({len(scan.warnings)} warning(s))")
    return 0 if scan.ok else 1


def run_make_sample(args) -> int:
    from ..tools.sample_data import make_sample_dataset

    paths = make_sample_dataset(Path(args.folder), count=args.count, seed=args.seed, size=args.size)
    print(f"wrote {len(paths)} images with captions to {Path(args.folder).expanduser()}")
    print(f"check it: klein-lora dataset check {args.folder} --trigger kleinchar")
    return 0

