"""python -m deqlite.classroom student [--check]: write the nbgrader metadata into the solution
notebooks and notebooks/student/ from them, or (--check) write nothing and fail if either is out of
date.
python -m deqlite.classroom workspace [DIR]: a learner's working copy of the notebooks in DIR
(default work/), never overwriting what is there (``make lab`` opens it)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .student import (ROOT, make_workspace, metadata_out_of_date, out_of_date, solution_notebooks,
                      write_metadata, write_student)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deqlite.classroom",
                                     description="Student versions of the notebooks, for classes.")
    sub = parser.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write the nbgrader metadata into the solution "
                                             "notebooks, and notebooks/student/ from them")
    student.add_argument("--check", action="store_true",
                         help="write nothing; exit 1 if the solution notebooks' nbgrader metadata "
                              "or notebooks/student/ is out of date")
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
        stale_metadata, stale_student = metadata_out_of_date(), out_of_date()
        if stale_metadata:
            print("the nbgrader metadata of these solution notebooks is out of date: "
                  + ", ".join(stale_metadata) + ".", file=sys.stderr)
        if stale_student:
            print("notebooks/student/ is out of date for: " + ", ".join(stale_student) + ".",
                  file=sys.stderr)
        if stale_metadata or stale_student:
            print("Run `make student` and commit the result.", file=sys.stderr)
            return 1
        print(f"the solution notebooks' nbgrader metadata and notebooks/student/ are up to date "
              f"({len(solution_notebooks())} notebooks).")
        return 0
    for path in write_metadata():
        print(f"wrote nbgrader metadata into {_shown(path)}")
    written, removed = write_student()
    for path in written:
        print(f"wrote {_shown(path)}")
    for path in removed:
        print(f"removed {_shown(path)} (its solution notebook is gone)")
    print(f"the solution notebooks' nbgrader metadata and notebooks/student/ are up to date "
          f"({len(solution_notebooks())} notebooks).")
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    sys.exit(main())
