"""Student versions of the notebooks, for classes.

The solution notebooks in ``notebooks/`` are the only ones written by hand. Each exercise's
solution sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION``; the student version is made
from it by nbgrader's ``ClearSolutions`` preprocessor run through nbconvert, which replaces each
such region by

    # YOUR CODE HERE
    raise NotImplementedError()

(the function's signature and docstring stay). Until the student writes it, the check that follows
the exercise says so and hands back deqlite's reference implementation, so the rest of the notebook
still runs (see ``deqlite.classroom.checks``).

    python -m deqlite.classroom student            # (re)write notebooks/student/
    python -m deqlite.classroom student --check    # fail if notebooks/student/ is out of date
    python -m deqlite.classroom workspace work     # a learner's working copy (``make lab``)

``make student`` runs the first; the test suite runs the equivalent of the second. The third
copies the student notebooks into a folder of the learner's own (and the solution notebooks into
its ``solutions/``), never overwriting a file that is already there: the learner works in that
copy, which git ignores and ``make test`` never reads, so neither a test run nor a
``git checkout`` touches their work.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = ROOT / "notebooks"
STUDENT = SOLUTIONS / "student"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def solution_notebooks(folder: Path = SOLUTIONS) -> list[Path]:
    """The numbered notebooks of the series (``NN_name.ipynb``)."""
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def student_version(path: Path) -> str:
    """The student version of one solution notebook, as notebook JSON text (stripped: no outputs,
    no execution counts, only the kernelspec in the metadata, as the solution notebooks)."""
    try:
        import nbformat
        from nbconvert.exporters import NotebookExporter
        from nbgrader.preprocessors import ClearSolutions
    except ImportError as e:                                      # pragma: no cover
        raise ImportError(f"making student notebooks needs nbgrader ({e}); install the kit's "
                          f"dev extra: pip install -e '.[dev]'") from None
    notebook = nbformat.read(path, as_version=4)
    # Our solution cells carry no nbgrader metadata (enforce_metadata off): nbgrader's `assign`
    # pipeline is not used, only its solution-clearing step.
    exporter = NotebookExporter(preprocessors=[ClearSolutions(enforce_metadata=False)])
    text, _ = exporter.from_notebook_node(notebook)
    student = json.loads(text)
    student["metadata"] = {key: student["metadata"][key] for key in ("kernelspec",)
                           if key in student["metadata"]}
    for cell in student["cells"]:
        cell["metadata"] = {}
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return json.dumps(student, indent=1, ensure_ascii=False) + "\n"


def write_student(out: Path = STUDENT, folder: Path = SOLUTIONS) -> list[Path]:
    """Write the student version of every solution notebook into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in solution_notebooks(folder):
        target = out / path.name
        target.write_text(student_version(path), encoding="utf-8")
        written.append(target)
    stale = {p.name for p in out.glob("*.ipynb")} - {p.name for p in written}
    for name in sorted(stale):                   # a notebook renamed or removed upstream
        (out / name).unlink()
    return written


def out_of_date(out: Path = STUDENT, folder: Path = SOLUTIONS) -> list[str]:
    """Names of the student notebooks that are missing, stale or extra in ``out``."""
    wanted = {path.name: student_version(path) for path in solution_notebooks(folder)}
    problems = [name for name, text in wanted.items()
                if not (out / name).exists() or (out / name).read_text(encoding="utf-8") != text]
    problems += sorted(p.name for p in out.glob("*.ipynb") if p.name not in wanted)
    return sorted(problems)


def make_workspace(dest: Path, *, student: Path = STUDENT, solutions: Path = SOLUTIONS) -> tuple:
    """Copy the student notebooks into `dest` and the solution notebooks into `dest/solutions`,
    leaving every file that exists there already as it is. Returns ``(copied, kept)``, two lists
    of the paths written and the paths left alone."""
    copied, kept = [], []
    for source, target in ((student, Path(dest)), (solutions, Path(dest) / "solutions")):
        target.mkdir(parents=True, exist_ok=True)
        for path in solution_notebooks(source):
            copy = target / path.name
            if copy.exists():
                kept.append(copy)
            else:
                shutil.copyfile(path, copy)
                copied.append(copy)
    return copied, kept
