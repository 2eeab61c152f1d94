"""python -m deqlite.classroom student [--check]: (re)write notebooks/student/ from the solution
notebooks, or (--check) fail if it is out of date.
python -m deqlite.classroom workspace [DIR]: a learner's working copy of the notebooks in DIR
(default work/), never overwriting what is there (``make lab`` opens it)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .student import ROOT, make_workspace, out_of_date, solution_notebooks, write_student


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deqlite.classroom",
                                     description="Student versions of the notebooks, for classes.")
    sub = parser.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write notebooks/student/ from the solution notebooks")
    student.add_argument("--check", action="store_true",
                         help="write nothing; exit 1 if notebooks/student/ is out of date")
    workspace = sub.add_parser("workspace", help="copy the notebooks into a working folder of your "
                                                 "own, never overwriting a file already there")
    workspace.add_argument("folder", nargs="?", default="work", type=Path,
                           help="the working copy's folder (default: work/)")
    args = parser.parse_args(argv)
    if args.command == "workspace":
        copied, kept = make_workspace(args.folder)
        print(f"{args.folder}/: your working copy of the notebooks (the exercises to write; the "
              f"solutions in {args.folder}/solutions/). Copied {len(copied)} new notebook(s); "
              f"kept {len(kept)} already there as they are.")
        return 0
    if args.check:
        problems = out_of_date()
        if problems:
            print("notebooks/student/ is out of date for: " + ", ".join(problems)
                  + ". Run `make student` and commit the result.", file=sys.stderr)
            return 1
        print(f"notebooks/student/ is up to date ({len(solution_notebooks())} notebooks).")
        return 0
    for path in write_student():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
