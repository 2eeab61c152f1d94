"""How long each notebook takes, run top to bottom, one after the other, in default mode (and,
with --fast, in the tests' fast mode too). Writes the table to benchmarks/notebook_times.md and
into notebooks/INSTRUCTORS.md (between its notebook-times markers), and exits with 1 when a
notebook takes longer than the budget.

    .venv/bin/python benchmarks/notebook_times.py                 # every notebook, ~20 minutes
    .venv/bin/python benchmarks/notebook_times.py --fast          # also the DEQLITE_FAST=1 times
    .venv/bin/python benchmarks/notebook_times.py 07 08           # only some (no files written)
    .venv/bin/python benchmarks/notebook_times.py --save /tmp/run # keep the executed notebooks

The notebooks execute in notebooks/ (their `runs/` folders appear there, git-ignored), through
nbclient, with the kernel the notebooks name. Run it on an otherwise idle machine: the load
average before and after is recorded beside the times, because another job on the same cores
inflates every number.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date, datetime
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TABLE = ROOT / "benchmarks" / "notebook_times.md"
INSTRUCTORS = NOTEBOOKS / "INSTRUCTORS.md"
BEGIN, END = "<!-- notebook-times: begin -->", "<!-- notebook-times: end -->"
BUDGET = 180.0                       # seconds, default mode, on a 2-core CPU


def run(path: Path, fast: bool, save: Path | None = None) -> tuple[float, float, int]:
    """(total seconds, seconds of the slowest cell, its index) of one top-to-bottom run; the
    executed notebook is written into the folder `save` if given."""
    nb = nbformat.read(path, as_version=4)
    env_fast = os.environ.pop("DEQLITE_FAST", None)
    if fast:
        os.environ["DEQLITE_FAST"] = "1"
    try:
        client = NotebookClient(nb, timeout=1800, resources={"metadata": {"path": str(NOTEBOOKS)}})
        start = time.perf_counter()
        client.execute()
        total = time.perf_counter() - start
    finally:
        os.environ.pop("DEQLITE_FAST", None)
        if env_fast is not None:
            os.environ["DEQLITE_FAST"] = env_fast
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, save / (path.stem + (".fast" if fast else "") + path.suffix))
    slowest, where = 0.0, -1
    for i, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        if "shell.execute_reply" in timing and "iopub.execute_input" in timing:
            seconds = (datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
                       - datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
                       ).total_seconds()
            if seconds > slowest:
                slowest, where = seconds, i
    return total, slowest, where


def table(rows: list, fast: bool, load: tuple) -> str:
    head = ["notebook", "default mode", "slowest cell"] + (["fast mode"] if fast else [])
    lines = [f"Measured {date.today().isoformat()} with `benchmarks/notebook_times.py`"
             f"{' --fast' if fast else ''}: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}, no GPU in use; load average {load[0]:.1f} before, "
             f"{load[1]:.1f} after. Budget: {BUDGET:.0f} s per notebook in default mode.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, default, slow, cell, fast_time in rows:
        over = "" if default <= BUDGET else " (over budget)"
        cells = [f"`{name}`", f"{default:.0f} s{over}", f"{slow:.0f} s (cell {cell})"]
        if fast:
            cells.append(f"{fast_time:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(text: str) -> None:
    TABLE.write_text("# Notebook run times\n\n" + text)
    doc = INSTRUCTORS.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{INSTRUCTORS} has no {BEGIN} … {END} block to fill.")
    head, rest = doc.split(BEGIN, 1)
    INSTRUCTORS.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="notebook numbers, e.g. 07 08 (default: all)")
    parser.add_argument("--fast", action="store_true", help="also time DEQLITE_FAST=1 runs")
    parser.add_argument("--save", type=Path, default=None,
                        help="write the executed notebooks into this folder (to read their outputs)")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.name[:2] in args.only]
        if not paths:
            raise SystemExit(f"no notebook numbered {', '.join(args.only)} in {NOTEBOOKS}")
    load_before = os.getloadavg()[0]
    rows = []
    for path in paths:
        default, slow, cell = run(path, fast=False, save=args.save)
        fast_time = run(path, fast=True, save=args.save)[0] if args.fast else None
        rows.append((path.name, default, slow, cell, fast_time))
        print(f"{path.name}: {default:.0f} s (slowest cell {cell}: {slow:.0f} s)"
              + (f", fast mode {fast_time:.0f} s" if args.fast else ""), flush=True)
    text = table(rows, args.fast, (load_before, os.getloadavg()[0]))
    print("\n" + text)
    if not args.only:
        write(text)
        print(f"wrote {TABLE.relative_to(ROOT)} and the table in {INSTRUCTORS.relative_to(ROOT)}")
    return 1 if any(r[1] > BUDGET for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
