"""Student versions of the notebooks, and the nbgrader metadata of the solution notebooks.

The solution notebooks in ``notebooks/`` are the only ones written by hand. Each exercise's
solution sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION``, and the cell after it checks
it. From that pattern ``deqlite.classroom.grading`` derives nbgrader's cell metadata (answer cell,
autograder test cell with a hidden ``checks.graded`` test, every other cell read-only), which is
written into the solution notebooks, so they drop into an nbgrader course with no toolbar work.

The student version is made from the solution notebook with that metadata by nbgrader's
``ClearSolutions`` and ``ClearHiddenTests`` preprocessors run through nbconvert: each solution
region becomes

    # YOUR CODE HERE
    raise NotImplementedError()

(the function's signature and docstring stay), the hidden tests go, and so does all the metadata.
Until the student writes it, the check that follows the exercise says so and hands back deqlite's
reference implementation, so the rest of the notebook still runs (see ``deqlite.classroom.checks``).

    python -m deqlite.classroom student            # (re)write the metadata and notebooks/student/
    python -m deqlite.classroom student --check    # fail if either is out of date
    python -m deqlite.classroom workspace work     # a learner's working copy (``make lab``)

``make student`` runs the first; the test suite runs the equivalent of the second. The first
writes only a solution notebook whose metadata changes, and the student folder. The third
copies the student notebooks into a folder of the learner's own (and the solution notebooks into
its ``solutions/``), never overwriting a file that is already there: the learner works in that
copy, which git ignores and ``make test`` never reads, so neither a test run nor a
``git checkout`` touches their work.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .grading import BEGIN, END, notebook_text, with_nbgrader_metadata  # noqa: F401 (BEGIN, END: for callers)

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = ROOT / "notebooks"
STUDENT = SOLUTIONS / "student"


def solution_notebooks(folder: Path = SOLUTIONS) -> list[Path]:
    """The numbered notebooks of the series (``NN_name.ipynb``)."""
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def with_metadata(path: Path) -> str:
    """The solution notebook at ``path`` with its nbgrader metadata (``grading``), as JSON text:
    what ``write_metadata`` leaves in the file."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return notebook_text(with_nbgrader_metadata(nb, where=Path(path).name))


def write_metadata(folder: Path = SOLUTIONS) -> list[Path]:
    """Write the nbgrader metadata into every solution notebook in ``folder`` whose metadata is
    missing or stale (the others are not touched); returns the paths written. Nothing is written
    unless every notebook follows the pattern (``grading.exercises`` raises ValueError otherwise),
    and each file is replaced in one step (a temporary file renamed over it)."""
    texts = {path: with_metadata(path) for path in solution_notebooks(folder)}
    written = [path for path, text in texts.items() if path.read_text(encoding="utf-8") != text]
    for path in written:
        _replace(path, texts[path])
    return written


def metadata_out_of_date(folder: Path = SOLUTIONS) -> list[str]:
    """Names of the solution notebooks in ``folder`` whose nbgrader metadata is missing or stale."""
    return [path.name for path in solution_notebooks(folder)
            if path.read_text(encoding="utf-8") != with_metadata(path)]


def student_version(path: Path) -> str:
    """The student version of one solution notebook, as notebook JSON text (stripped: no outputs,
    no execution counts, no cell metadata, only the kernelspec in the notebook's metadata, as the
    solution notebooks). Made from the notebook with its nbgrader metadata, whether or not that is
    in the file yet, so it does not depend on the order in which the two are written."""
    try:
        import nbformat
        from nbconvert.exporters import NotebookExporter
        from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions
    except ImportError as e:                                      # pragma: no cover
        raise ImportError(f"making student notebooks needs nbgrader ({e}); install the kit's "
                          f"dev extra: pip install -e '.[dev]'") from None
    notebook = nbformat.reads(with_metadata(path), as_version=4)
    # With the metadata in place, both preprocessors enforce it: a solution region outside an
    # answer cell, or a hidden test outside a test cell, is an error.
    exporter = NotebookExporter(preprocessors=[ClearSolutions(), ClearHiddenTests()])
    text, _ = exporter.from_notebook_node(notebook)
    student = json.loads(text)
    student["metadata"] = {key: student["metadata"][key] for key in ("kernelspec",)
                           if key in student["metadata"]}
    for cell in student["cells"]:
        cell["metadata"] = {}
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return notebook_text(student)


def write_student(out: Path = STUDENT, folder: Path = SOLUTIONS) -> tuple[list[Path], list[Path]]:
    """Write the student version of every solution notebook in ``folder`` into ``out`` (only those
    that are missing or stale), and remove the notebooks of ``out`` that have no solution notebook
    any more (renamed or removed upstream). Returns ``(written, removed)``, two lists of paths."""
    out.mkdir(parents=True, exist_ok=True)
    wanted, written = set(), []
    for path in solution_notebooks(folder):
        target = out / path.name
        wanted.add(target.name)
        text = student_version(path)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            _replace(target, text)
            written.append(target)
    removed = sorted(p for p in out.glob("*.ipynb") if p.name not in wanted)
    for path in removed:
        path.unlink()
    return written, removed


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


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
