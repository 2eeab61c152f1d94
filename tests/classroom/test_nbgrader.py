"""nbgrader end to end, as an instructor runs it: each solution notebook (with the metadata that
``make student`` writes) becomes an assignment of a throwaway course, ``nbgrader
generate_assignment`` releases it, three students hand it in, ``nbgrader autograde`` grades them,
and the scores are read back from the course's gradebook:

* ``solution``:  the solution notebook itself                         → full marks;
* ``untouched``: the released notebook as handed out, nothing written  → 0 (the checks hand back
  deqlite's reference, so it runs, but the hidden ``checks.graded`` tests fail);
* ``planted``:   every exercise solved but one, whose body is ``return None`` → full marks less
  that exercise's points.

No cell other than a graded test cell may raise in the first two (so this also runs every
notebook top to bottom, solution and student version, as nbval does); in the third, only cells
after the wrong exercise's check may (they use the wrong function). Notebooks run in fast mode
(``DEQLITE_FAST=1``). Selected with ``-m nbgrader`` (deselected by default: minutes, not seconds):

    pytest -m nbgrader tests/classroom/test_nbgrader.py                            # all notebooks
    DEQLITE_NBGRADER_ONLY=01,09 pytest -m nbgrader tests/classroom/test_nbgrader.py  # a subset

Each notebook gets a course of its own (own ``nbgrader_config.py``, own gradebook), so the
courses are graded in parallel: ``DEQLITE_NBGRADER_WORKERS`` of them at once (default 2). The
seconds each course took are printed in the terminal summary.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deqlite.classroom import grading
from deqlite.classroom import student as classroom

pytestmark = pytest.mark.nbgrader

STUDENTS = ("solution", "untouched", "planted")
CELL_TIMEOUT = 240          # seconds for one cell: fast mode needs ~1-20, a loaded machine more.
# A widgets.interact cell gets less. Its reply can reach the autograder only when the wait for
# it times out: nbclient polls the shell socket with zmq's edge-triggered asyncio poll, misses the
# wake-up now and then, and finds the reply (already there) on the poll's last check at the
# deadline, so the cell passes but costs the whole timeout (jupyter/nbclient#312). Notebook 01's
# slider cell did so in the autograde of CI's first course: 899 s of a 900 s timeout, then 239 s
# of 240. These cells need about a second in fast mode.
INTERACT_TIMEOUT = 20
COURSE_TIMEOUT = 3600       # seconds for one nbgrader command


def selected(paths: list[Path]) -> list[Path]:
    """The notebooks named in ``$DEQLITE_NBGRADER_ONLY`` (comma-separated numbers, e.g.
    "01,09"), or all of them when it is unset or empty."""
    only = {n.strip() for n in os.environ.get("DEQLITE_NBGRADER_ONLY", "").split(",") if n.strip()}
    unknown = only - {p.name[:2] for p in paths}
    if unknown:
        raise ValueError(f"DEQLITE_NBGRADER_ONLY names no notebook {sorted(unknown)}; the "
                         f"notebooks are {', '.join(p.name[:2] for p in paths)}")
    return [p for p in paths if not only or p.name[:2] in only]


def workers() -> int:
    """How many courses are graded at once: ``$DEQLITE_NBGRADER_WORKERS`` (default 2)."""
    value = os.environ.get("DEQLITE_NBGRADER_WORKERS", "2")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DEQLITE_NBGRADER_WORKERS must be a positive integer, got {value!r}")
    return int(value)


NOTEBOOKS = selected(classroom.solution_notebooks())


@dataclass
class Graded:
    """What autograding one notebook of one course gave: per student, the score of each graded
    test cell (by grade_id) and the notebook's total, and the cells whose output is an error,
    as (cell index, exception name, whether it is a graded test cell); the wall seconds of the
    course's ``generate_assignment`` and ``autograde`` (all its notebooks together)."""
    exercises: list[grading.Exercise]
    planted: str
    scores: dict[str, dict[str, float]]
    totals: dict[str, float]
    max_total: float
    errors: dict[str, list[tuple[int, str, bool]]]
    seconds: dict[str, float]


# --- the course ----------------------------------------------------------------------------------

def with_path(variable: str, first: str) -> str:
    """The value of environment ``variable`` (a list of paths) with ``first`` in front."""
    return os.pathsep.join([first] + [p for p in [os.environ.get(variable)] if p])


# nbgrader's Gradebook runs the `alembic` command (beside this Python, in a virtual environment
# that may not be activated), in nbgrader's processes and in ours when we read the scores
BIN = str(Path(sys.executable).parent)


def nbgrader(course: Path, *args: str) -> None:
    """Run ``python -m nbgrader ARGS`` in ``course`` (its nbgrader_config.py), in fast mode, with
    this checkout's deqlite first on the kernel's path and no Jupyter config but the course's."""
    env = dict(os.environ, DEQLITE_FAST="1", JUPYTER_CONFIG_DIR=str(course / ".jupyter"),
               PYTHONPATH=with_path("PYTHONPATH", str(classroom.ROOT)), PATH=with_path("PATH", BIN))
    # courses graded at once share the cores: torch in each kernel takes its share, not all
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers())))
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True, timeout=COURSE_TIMEOUT)
    if done.returncode != 0:
        raise AssertionError(f"nbgrader {' '.join(args)} failed in {course} ({done.returncode}):\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def make_course(course: Path, assignment: str, paths: list[Path]) -> None:
    """A course folder with its own config and gradebook, and the notebooks (with their nbgrader
    metadata, whether or not it is written into the files yet) as ``source/<assignment>/``."""
    source = course / "source" / assignment
    source.mkdir(parents=True)
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.root = {str(course)!r}\n"
        "c.CourseDirectory.course_id = 'deqlite'\n"
        f"c.CourseDirectory.db_url = {'sqlite:///' + str(course / 'gradebook.db')!r}\n"
        f"c.Execute.timeout = {CELL_TIMEOUT}\n"
        "c.Execute.timeout_func = lambda cell: "
        f"{INTERACT_TIMEOUT} if 'interact(' in cell.source else {CELL_TIMEOUT}\n")
    for path in paths:
        (source / path.name).write_text(classroom.with_metadata(path), encoding="utf-8")


def solved(text: str) -> str:
    """A solution cell as a student who solved it hands it in: the markers gone, the code kept."""
    return "\n".join(line for line in text.split("\n")
                     if grading.BEGIN not in line and grading.END not in line)


def wrong(text: str) -> str:
    """A solution cell with its solution replaced by ``return None`` (the planted mistake)."""
    return re.sub(rf"^([ \t]*){re.escape(grading.BEGIN)}\n.*?{re.escape(grading.END)}[^\n]*",
                  r"\1return None", text, flags=re.S | re.M)


def planted_exercise(exercises: list[grading.Exercise]) -> grading.Exercise:
    """The exercise answered wrong in the third submission: the one worth most (the first of those)."""
    return max(exercises, key=lambda e: e.points)


def submit(course: Path, assignment: str, path: Path) -> str:
    """Hand in the three submissions of one notebook; returns the planted exercise's name."""
    source = json.loads((course / "source" / assignment / path.name).read_text(encoding="utf-8"))
    release = json.loads((course / "release" / assignment / path.name).read_text(encoding="utf-8"))
    exercises = grading.exercises(source, path.name)
    planted = planted_exercise(exercises)
    mistaken = json.loads(json.dumps(release))
    for e in exercises:
        answer = grading.source(source["cells"][e.answer])
        assert mistaken["cells"][e.answer]["metadata"]["nbgrader"]["grade_id"] == e.name
        mistaken["cells"][e.answer]["source"] = wrong(answer) if e is planted else solved(answer)
    for student, nb in zip(STUDENTS, (source, release, mistaken)):
        folder = course / "submitted" / student / assignment
        folder.mkdir(parents=True)
        (folder / path.name).write_text(grading.notebook_text(nb), encoding="utf-8")
    return planted.name


def read_grades(course: Path, assignment: str, path: Path, planted: str,
                seconds: dict[str, float]) -> Graded:
    """The scores from the course's gradebook (nbgrader's Gradebook API) and the error outputs of
    the autograded notebooks."""
    from nbgrader.api import Gradebook

    source = json.loads((course / "source" / assignment / path.name).read_text(encoding="utf-8"))
    exercises = grading.exercises(source, path.name)
    scores, totals, errors = {}, {}, {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        for student in STUDENTS:
            scores[student] = {
                f"{e.name}-test": gradebook.find_grade(f"{e.name}-test", path.stem, assignment,
                                                       student).score for e in exercises}
            submitted = gradebook.find_submission_notebook(path.stem, assignment, student)
            totals[student], max_total = submitted.score, submitted.max_score
    for student in STUDENTS:
        graded = json.loads((course / "autograded" / student / assignment / path.name).read_text(
            encoding="utf-8"))
        errors[student] = [(i, output.get("ename", ""),
                            cell["metadata"].get("nbgrader", {}).get("grade", False))
                           for i, cell in enumerate(graded["cells"])
                           for output in cell.get("outputs", []) if output["output_type"] == "error"]
    return Graded(exercises, planted, scores, totals, max_total, errors, seconds)


def grade_course(course: Path, assignment: str, paths: list[Path]) -> dict[str, Graded]:
    """Make a course holding ``paths`` as one assignment, release it, hand in the three
    submissions of each notebook, autograde them; returns each notebook's ``Graded`` by name."""
    make_course(course, assignment, paths)
    start = time.perf_counter()
    nbgrader(course, "generate_assignment", assignment, "--force")
    seconds = {"generate_assignment": time.perf_counter() - start}
    planted = {path.name: submit(course, assignment, path) for path in paths}
    start = time.perf_counter()
    nbgrader(course, "autograde", assignment, "--force")
    seconds["autograde"] = time.perf_counter() - start
    return {path.name: read_grades(course, assignment, path, planted[path.name], seconds)
            for path in paths}


@pytest.fixture(scope="module")
def graded(tmp_path_factory, request) -> dict[str, Graded]:
    """Every selected notebook autograded, each in a course of its own, several at once."""
    root = tmp_path_factory.mktemp("courses")
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch, \
            concurrent.futures.ThreadPoolExecutor(workers()) as pool:
        patch.setenv("PATH", with_path("PATH", BIN))    # for our Gradebook's alembic (see BIN)
        futures = {path.name: pool.submit(grade_course, root / f"course{path.name[:2]}",
                                          f"nb{path.name[:2]}", [path]) for path in NOTEBOOKS}
        results = {name: future.result()[name] for name, future in futures.items()}
    total = time.perf_counter() - start
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for name, result in results.items():
                reporter.write_line(f"nbgrader round trip {name}: generate_assignment "
                                    f"{result.seconds['generate_assignment']:.0f} s, autograde of "
                                    f"3 submissions {result.seconds['autograde']:.0f} s")
            reporter.write_line(f"nbgrader round trip, {len(results)} notebook(s), {workers()} "
                                f"at once: {total:.0f} s")
    return results


# --- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_the_solution_gets_full_marks_and_runs_without_an_error(graded, path):
    result = graded[path.name]
    assert result.scores["solution"] == {f"{e.name}-test": e.points for e in result.exercises}
    assert result.totals["solution"] == result.max_total == sum(e.points for e in result.exercises)
    assert result.errors["solution"] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_the_untouched_student_version_runs_to_the_end_and_gets_nothing(graded, path):
    result = graded[path.name]
    assert result.scores["untouched"] == {f"{e.name}-test": 0 for e in result.exercises}
    assert result.totals["untouched"] == 0
    # only the hidden checks.graded tests fail: one CheckFailed per exercise, nothing else raises
    assert result.errors["untouched"] == sorted((e.test, "CheckFailed", True)
                                                for e in result.exercises)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_one_planted_mistake_costs_exactly_that_exercises_points(graded, path):
    result = graded[path.name]
    planted = next(e for e in result.exercises if e.name == result.planted)
    assert result.scores["planted"] == {f"{e.name}-test": 0 if e is planted else e.points
                                        for e in result.exercises}
    assert result.totals["planted"] == result.max_total - planted.points
    grade_errors = [(i, name) for i, name, is_grade in result.errors["planted"] if is_grade]
    assert grade_errors == [(planted.test, "CheckFailed")]
    # other cells may fail only downstream of the wrong function (they call it)
    assert all(i > planted.test for i, _, is_grade in result.errors["planted"] if not is_grade)
