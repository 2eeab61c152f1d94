"""python -m deqlite.data download NAME [--root FOLDER]: fetch a real dataset into the data folder
and read it back; for imagenet (which cannot be downloaded for you), check the folders you laid
out: the classes, the images per class, and a random sample of the images actually decoded.

The exit status says whether the data is usable: 0 when every split was read (and, for
ImageNet, every sampled image decoded), non-zero with a message that names the file or folder
that is wrong, what is wrong with it and what to do.
"""
from __future__ import annotations

import argparse

from .._files import data_root
from . import DATASETS, OFFLINE, is_text, load_dataset
from .images import IMAGE_SPLITS, check_imagenet
from .text import TEXT_SPLITS


def _check_imagenet(root, sample: int) -> None:
    """Print the check of both ImageNet splits; exit non-zero if either has a problem."""
    checks = check_imagenet(root, sample=sample)
    for check in checks:
        print(check.report())
    unreadable = sum(len(c.unreadable) for c in checks)
    problems = sum(len(c.problems) for c in checks)
    if unreadable or problems:
        raise SystemExit(
            f"imagenet: {unreadable} unreadable images and {problems} layout problems (listed "
            f"above). Extract the unreadable files again from the archives of image-net.org (or "
            f"delete them), fix the layout, and run this check again.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deqlite.data",
                                     description="Download a real dataset into the data folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download a dataset (needs a network); for imagenet, "
                                         "check the manually downloaded folders")
    dl.add_argument("name", choices=[n for n in DATASETS if n not in OFFLINE])
    dl.add_argument("--root", default=None, help="data folder (default: $DEQLITE_DATA or data/)")
    dl.add_argument("--sample", type=int, default=50,
                    help="imagenet: how many images of each split to decode (default 50)")
    args = parser.parse_args(argv)
    if args.sample < 1:
        parser.error(f"--sample must be at least 1, got {args.sample}")
    text = is_text(args.name)
    try:
        if args.name == "imagenet":
            return _check_imagenet(args.root, args.sample)
        for split in TEXT_SPLITS if text else IMAGE_SPLITS:
            ds = load_dataset(args.name, split, root=args.root, download=True)
            what = f"{len(ds):,} tokens" if text else f"{len(ds)} images"
            print(f"{args.name} {split}: {what} in {data_root(args.root)}")
    except (OSError, ValueError) as e:      # missing, damaged (DataFileError), wrong layout
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
