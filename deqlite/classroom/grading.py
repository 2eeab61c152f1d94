"""nbgrader cell metadata for the solution notebooks, written from the notebooks themselves.

nbgrader grades a notebook by the metadata on its cells (``cell.metadata.nbgrader``, schema
version 3), which an instructor would otherwise set by hand in nbgrader's "Create Assignment"
toolbar. Our notebooks follow one pattern, so the metadata can be derived from their text:

* an **exercise** is a code cell defining a function (or a class) with a solution between
  ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in its body; its name is that of the function
  checked further down, e.g. ``anderson``. The cell becomes an *autograded answer* cell
  (``solution: true``), with grade_id that name;
* its **check**, the code cell after it that calls ``checks.check_anderson(...)``, becomes an
  *autograder tests* cell (``grade: true``, read-only, worth ``POINTS.get(name, 1)`` points), with
  grade_id ``anderson-test``, and gets a hidden test after the check::

      ### BEGIN HIDDEN TESTS
      checks.graded("anderson")
      ### END HIDDEN TESTS

  The check alone passes when the exercise is not written yet (it hands back deqlite's reference so
  the notebook runs on); ``checks.graded`` passes only when the student's *own* function passed, so
  an unwritten exercise scores 0. nbgrader removes the hidden block from the released notebook and
  puts it back when it autogrades;
* **every other cell** (markdown and code) becomes read-only (``locked: true``), with grade_id
  ``cell-<the cell's id>``, so nbgrader restores it if a student edits it.

The result depends only on the notebook's text, so writing it twice gives the same bytes.
"""
from __future__ import annotations

import ast
import copy
import json
import re
from dataclasses import dataclass
from typing import Mapping

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"

POINTS: dict[str, int] = {"anderson": 2, "broyden_update": 2, "attach_ift": 2, "jr_loss": 2,
                          "conv_block": 2, "augmented_map": 2, "phantom": 2}
"""Points of the exercises worth more than the default 1: the mechanisms each notebook is about
(Anderson's history and weights, Broyden's update, the IFT backward hook, the Jacobian-regularized
loss, the conv cell, JIIO's three-part augmented map, the phantom gradient)."""

SCHEMA_VERSION = 3
_CHECK = re.compile(r"\bchecks\.check_(\w+)\(")
_TOP = re.compile(r"^(?:def|class) (\w+)\b", re.M)      # a top-level function or class
_GRADE_ID = re.compile(r"^[a-zA-Z0-9_\-]+$")            # nbgrader's schema allows these only


@dataclass(frozen=True)
class Exercise:
    """One exercise of a notebook: its name, the index of its solution cell, the index of the cell
    that checks it, and its points."""
    name: str
    answer: int
    test: int
    points: float


def source(cell: dict) -> str:
    """A cell's source as one string (notebook JSON stores it as a string or a list of lines)."""
    text = cell.get("source", "")
    return text if isinstance(text, str) else "".join(text)


def hidden_tests(name: str) -> str:
    """The hidden test block that follows the check of exercise ``name``."""
    return f'{HIDDEN_BEGIN}\nchecks.graded("{name}")\n{HIDDEN_END}'


def exercises(nb: dict, where: str = "notebook",
              points: Mapping[str, float] = POINTS) -> list[Exercise]:
    """The exercises of notebook ``nb`` (notebook JSON as a dict), in order. ``where`` names the
    notebook in error messages. Raises ValueError on a solution cell without a check after it, a
    check without a solution cell before it, two exercises of one name, a cell that is both, or a
    solution region outside a function's or class's body or in a markdown cell."""
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise TypeError(f"{where}: expected notebook JSON as a dict with a list of cells, got "
                        f"{type(nb).__name__}")
    _check_points(points)
    cells = nb["cells"]
    checked = [set(_CHECK.findall(source(c))) if c.get("cell_type") == "code" else set()
               for c in cells]
    answers, tests = {}, {}
    for i, cell in enumerate(cells):
        text, at = source(cell), f"{where}, cell {i}"
        if cell.get("cell_type") != "code":
            if BEGIN in text or HIDDEN_BEGIN in text:
                raise ValueError(f"{at}: a solution or hidden-test marker in a {cell.get('cell_type')} "
                                 f"cell; exercises here are code cells.")
            continue
        if len(checked[i]) > 1:
            raise ValueError(f"{at}: checks of several exercises ({', '.join(sorted(checked[i]))}) "
                             f"in one cell; give each check a cell of its own.")
        if BEGIN in text:
            if checked[i]:
                raise ValueError(f"{at}: an exercise and its check share a cell; put "
                                 f"checks.check_{min(checked[i])}(...) in a cell after the solution.")
            name = _exercise_name(text, set().union(*checked[i + 1:]), at)
            if name in answers:
                raise ValueError(f"{at}: a second exercise named {name!r} (the first is cell "
                                 f"{answers[name]}); exercise names must be unique in a notebook.")
            answers[name] = i
        if checked[i]:
            (name,) = checked[i]
            if name not in answers:
                raise ValueError(f"{at}: checks.check_{name}(...) with no solution cell before it "
                                 f"(a code cell defining {name} with {BEGIN} in its body).")
            if name in tests:
                raise ValueError(f"{at}: a second check of exercise {name!r} (the first is cell "
                                 f"{tests[name]}).")
            tests[name] = i
    return [Exercise(name, answers[name], tests[name], points.get(name, 1)) for name in answers]


def with_nbgrader_metadata(nb: dict, where: str = "notebook",
                           points: Mapping[str, float] = POINTS) -> dict:
    """A copy of notebook ``nb`` (notebook JSON as a dict) with nbgrader metadata on every cell and
    the hidden test after each check (added once: applying this twice changes nothing). Other cell
    metadata is kept. Raises ValueError as ``exercises`` does, or on a duplicate grade_id."""
    nb = copy.deepcopy(nb)
    found = exercises(nb, where, points)
    answers = {e.answer: e for e in found}
    tests = {e.test: e for e in found}
    grade_ids = {}
    for i, cell in enumerate(nb["cells"]):
        if i in answers:
            meta = _meta(answers[i].name, solution=True)
        elif i in tests:
            exercise = tests[i]
            meta = _meta(f"{exercise.name}-test", grade=True, locked=True, points=exercise.points)
            _add_hidden_tests(cell, exercise.name, f"{where}, cell {i}")
        else:
            meta = _meta(f"cell-{cell.get('id', i)}", locked=True)
        grade_id = meta["grade_id"]
        if grade_id in grade_ids or not _GRADE_ID.match(grade_id):
            raise ValueError(f"{where}, cell {i}: grade_id {grade_id!r} is "
                             + (f"also cell {grade_ids[grade_id]}'s" if grade_id in grade_ids
                                else "not made of letters, digits, '-' and '_'") + ".")
        grade_ids[grade_id] = i
        cell.setdefault("metadata", {})["nbgrader"] = meta
    return nb


def notebook_text(nb: dict) -> str:
    """Notebook JSON text as the notebooks in this repository are stored (one-space indent,
    keys in their order, UTF-8 characters as they are, a final newline)."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def _meta(grade_id: str, *, solution: bool = False, grade: bool = False, locked: bool = False,
          points: float | None = None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked}
    if grade:
        meta["points"] = points
    meta.update(schema_version=SCHEMA_VERSION, solution=solution, task=False)
    return meta


def _exercise_name(text: str, checked_later: set[str], at: str) -> str:
    """The name of a solution cell's exercise: of the functions and classes the cell defines, the
    one checked in a later cell (``checked_later``: the names of those checks)."""
    at_begin = text.index(BEGIN)
    indent = text[text.rfind("\n", 0, at_begin) + 1:at_begin]
    defined = _TOP.findall(text)
    if not defined or not indent or indent.strip():
        raise ValueError(f"{at}: {BEGIN} must sit inside the body of a top-level function "
                         f"(`def name(...):`) or class, whose name names the exercise.")
    names = [name for name in defined if name in checked_later]
    if not names:
        name = defined[0]
        raise ValueError(f"{at}: exercise {name!r} has no check after it; add a code cell "
                         f"`{name} = checks.check_{name}({name})`"
                         + (f" (or check one of {', '.join(defined[1:])})." if defined[1:] else "."))
    if len(names) > 1:
        raise ValueError(f"{at}: {', '.join(names)} are each checked later: one exercise per "
                         f"cell, please.")
    return names[0]


def _add_hidden_tests(cell: dict, name: str, at: str) -> None:
    """Insert ``hidden_tests(name)`` after the statement that calls the check, unless it is there."""
    text = source(cell)
    block = hidden_tests(name)
    if block in text:
        return
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ValueError(f"{at}: the check cell of {name!r} is not plain Python ({e.msg}, line "
                         f"{e.lineno}); it must be, to hold the hidden test.") from None
    lines = text.split("\n")
    line = next(n for n, line in enumerate(lines, 1) if f"checks.check_{name}(" in line)
    end = next((node.end_lineno for node in tree.body if node.lineno <= line <= node.end_lineno),
               line)                                     # the statement, or a comment's own line
    lines[end:end] = block.split("\n")
    new = "\n".join(lines)
    cell["source"] = new if isinstance(cell.get("source"), str) else new.splitlines(keepends=True)


def _check_points(points: Mapping[str, float]) -> None:
    for name, value in points.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"points of exercise {name!r} must be a positive number, got {value!r}")
