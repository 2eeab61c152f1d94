"""python -m deqlite.data download NAME [--root FOLDER]: fetch a real dataset into the data folder
(for imagenet: check the manually downloaded folders)."""
from __future__ import annotations

import argparse

from .._files import data_root
from . import DATASETS, OFFLINE, is_text, load_dataset
from .images import IMAGE_SPLITS
from .text import TEXT_SPLITS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deqlite.data",
                                     description="Download a real dataset into the data folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download a dataset (needs a network); for imagenet, "
                                         "check the manually downloaded folders")
    dl.add_argument("name", choices=[n for n in DATASETS if n not in OFFLINE])
    dl.add_argument("--root", default=None, help="data folder (default: $DEQLITE_DATA or data/)")
    args = parser.parse_args(argv)
    text = is_text(args.name)
    for split in TEXT_SPLITS if text else IMAGE_SPLITS:
        try:
            ds = load_dataset(args.name, split, root=args.root, download=True)
        except (FileNotFoundError, OSError) as e:
            raise SystemExit(str(e)) from None
        what = f"{len(ds):,} tokens" if text else f"{len(ds)} images"
        print(f"{args.name} {split}: {what} in {data_root(args.root)}")


if __name__ == "__main__":
    main()
