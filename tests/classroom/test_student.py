"""The classroom kit: student notebooks generated from the solution notebooks (and in step with
them), every exercise cleared and followed by its check, enough graded exercises per notebook; the
nbgrader metadata written into the solution notebooks (``deqlite.classroom.grading``)."""
import json
import re
from pathlib import Path

import pytest

from deqlite.classroom import checks, grading
from deqlite.classroom import student as classroom

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = classroom.solution_notebooks()
MIN_EXERCISES = {"01": 2, "02": 2, "03": 2, "04": 2, "05": 2, "08": 2}     # others: 1


def cells(path):
    return json.loads(path.read_text())["cells"]


def exercises(path):
    """(index, function name, index of its check) for each solution cell of a notebook."""
    found, nb = [], cells(path)
    for i, cell in enumerate(nb):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and classroom.BEGIN in source:
            name = re.search(r"^def (\w+)\(", source, re.M).group(1)
            check = next((j for j in range(i + 1, min(i + 4, len(nb)))
                          if f"checks.check_{name}({name})" in "".join(nb[j]["source"])), None)
            found.append((i, name, check))
    return found


def test_the_student_notebooks_are_up_to_date():
    assert classroom.out_of_date() == [], "run `make student` and commit notebooks/student/"
    assert sorted(p.name for p in classroom.STUDENT.glob("*.ipynb")) == [p.name for p in SOLUTIONS]


def test_the_solution_notebooks_carry_their_nbgrader_metadata():
    assert classroom.metadata_out_of_date() == [], "run `make student` and commit notebooks/"


def test_out_of_date_notices_an_edit_and_a_missing_copy(tmp_path):
    src, out = tmp_path / "solutions", tmp_path / "student"
    src.mkdir()
    for path in SOLUTIONS[:2]:
        (src / path.name).write_text(path.read_text())
    classroom.write_student(out, src)
    assert classroom.out_of_date(out, src) == []
    edited = json.loads((src / SOLUTIONS[0].name).read_text())
    edited["cells"][0]["source"] = ["# a new title\n"]
    (src / SOLUTIONS[0].name).write_text(json.dumps(edited))
    (out / SOLUTIONS[1].name).unlink()
    assert classroom.out_of_date(out, src) == sorted([SOLUTIONS[0].name, SOLUTIONS[1].name])


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name[:2])
def test_every_exercise_is_cleared_in_the_student_version_and_checked(path):
    found = exercises(path)
    assert len(found) >= MIN_EXERCISES.get(path.name[:2], 1), f"{path.name}: too few exercises"
    student = cells(classroom.STUDENT / path.name)
    solution = json.loads(classroom.with_metadata(path))["cells"]    # as `make student` writes it
    for i, name, check in found:                 # the hidden test is the student version's only cut
        block = "\n" + grading.hidden_tests(name)
        assert block in "".join(solution[check]["source"])
        solution[check]["source"] = "".join(solution[check]["source"]).replace(block, "")
        solution[check]["source"] = solution[check]["source"].splitlines(keepends=True)
    assert len(student) == len(solution)
    for i, name, check in found:
        assert check is not None, f"{path.name}: {name} is not followed by checks.check_{name}"
        assert hasattr(checks, f"check_{name}") and callable(checks.reference(name))
        source = "".join(solution[i]["source"])
        # exactly the solution cell with each solution region replaced by the stub, indented
        stub = re.sub(rf"^([ \t]*){classroom.BEGIN}\n.*?{classroom.END}",
                      r"\1# YOUR CODE HERE\n\1raise NotImplementedError()", source, flags=re.M | re.S)
        assert stub != source and "".join(student[i]["source"]) == stub
    other = [j for j, c in enumerate(solution) if j not in {i for i, _, _ in found}]
    assert all(student[j]["source"] == solution[j]["source"] for j in other)


def test_the_workspace_copies_the_notebooks_and_never_overwrites_a_learners_file(tmp_path, capsys):
    from deqlite.classroom.__main__ import main
    work = tmp_path / "work"
    assert main(["workspace", str(work)]) == 0
    names = [p.name for p in SOLUTIONS]
    assert sorted(p.name for p in work.glob("*.ipynb")) == names
    assert sorted(p.name for p in (work / "solutions").glob("*.ipynb")) == names
    assert (work / names[0]).read_text() == (classroom.STUDENT / names[0]).read_text()
    mine = work / names[0]
    mine.write_text("my own work")                       # the learner edits a notebook ...
    (work / "solutions" / names[1]).unlink()             # ... and deletes a solution
    assert main(["workspace", str(work)]) == 0
    assert mine.read_text() == "my own work"             # kept as it is
    assert (work / "solutions" / names[1]).exists()      # the missing one comes back
    assert "Copied 1 new notebook(s); kept " in capsys.readouterr().out


# --- the nbgrader metadata (deqlite.classroom.grading): no kernel, no nbgrader course ------------

def notebook(*cells):
    """A small notebook: each cell given as ("markdown" | "code", source, cell id)."""
    return {"cells": [{"cell_type": kind, "id": cid, "metadata": {}, "source": text,
                       **({"execution_count": None, "outputs": []} if kind == "code" else {})}
                      for kind, text, cid in cells],
            "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                        "display_name": "Python 3"}},
            "nbformat": 4, "nbformat_minor": 5}


SOLVED = 'def double(x):\n    """2 x."""\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION'
CHECK = "double = checks.check_double(double)"
TINY = notebook(("markdown", "# Title", "intro"), ("code", "import torch", "imports"),
                ("code", SOLVED, "ex"), ("code", CHECK, "chk"), ("markdown", "The end.", "end"))


def meta(nb):
    return [cell["metadata"]["nbgrader"] for cell in nb["cells"]]


def test_each_kind_of_cell_gets_its_nbgrader_metadata():
    nb = grading.with_nbgrader_metadata(TINY, points={"double": 3})
    locked = dict(grade=False, locked=True, schema_version=3, solution=False, task=False)
    assert meta(nb) == [
        dict(locked, grade_id="cell-intro"),
        dict(locked, grade_id="cell-imports"),
        dict(grade=False, grade_id="double", locked=False, schema_version=3, solution=True,
             task=False),
        dict(grade=True, grade_id="double-test", locked=True, points=3, schema_version=3,
             solution=False, task=False),
        dict(locked, grade_id="cell-end"),
    ]
    assert meta(grading.with_nbgrader_metadata(TINY, points={}))[3]["points"] == 1   # the default
    assert TINY["cells"][3]["metadata"] == {} and TINY["cells"][3]["source"] == CHECK  # a copy


def test_the_check_cell_gets_the_hidden_test_right_after_the_check_once():
    nb = grading.with_nbgrader_metadata(TINY)
    assert nb["cells"][3]["source"] == (CHECK + '\n### BEGIN HIDDEN TESTS\n'
                                        'checks.graded("double")\n### END HIDDEN TESTS')
    again = grading.with_nbgrader_metadata(nb)
    assert grading.notebook_text(again) == grading.notebook_text(nb)        # idempotent
    # a check spread over lines, followed by more code, stored as a list of lines
    cell = ["double = checks.check_double(\n", "    double)\n", "print(double(1))\n"]
    nb = grading.with_nbgrader_metadata(notebook(("code", SOLVED, "a"), ("code", cell, "b")))
    assert grading.with_nbgrader_metadata(nb) == nb
    assert nb["cells"][1]["source"] == cell[:2] + [
        "### BEGIN HIDDEN TESTS\n", 'checks.graded("double")\n', "### END HIDDEN TESTS\n",
        cell[2]]


def test_the_metadata_is_deterministic_and_other_cell_metadata_is_kept():
    tiny = json.loads(json.dumps(TINY))
    tiny["cells"][1]["metadata"] = {"lines_to_next_cell": 1}
    first = grading.notebook_text(grading.with_nbgrader_metadata(tiny))
    assert first == grading.notebook_text(grading.with_nbgrader_metadata(json.loads(first)))
    assert json.loads(first)["cells"][1]["metadata"]["lines_to_next_cell"] == 1
    # a new cell leaves every other grade_id as it was (ids come from names and cell ids)
    tiny["cells"].insert(1, notebook(("markdown", "new", "fresh"))["cells"][0])
    ids = [m["grade_id"] for m in meta(grading.with_nbgrader_metadata(tiny))]
    assert ids == ["cell-intro", "cell-fresh", "cell-imports", "double", "double-test", "cell-end"]


@pytest.mark.parametrize("cells, message", [
    ([("code", SOLVED, "a"), ("code", "x = 1", "b")], "'double' has no check after it"),
    ([("code", CHECK, "b"), ("code", SOLVED, "a")], "no solution cell before it"),
    ([("code", SOLVED, "a"), ("code", CHECK, "b"), ("code", SOLVED, "c"), ("code", CHECK, "d")],
     "a second exercise named 'double'"),
    ([("code", SOLVED, "a"), ("code", CHECK, "b"), ("code", CHECK, "c")], "a second check"),
    ([("code", SOLVED + "\n" + CHECK, "a")], "share a cell"),
    ([("code", "### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "a")], "inside the body"),
    ([("markdown", "### BEGIN SOLUTION\nwords\n### END SOLUTION", "a")], "in a markdown cell"),
    ([("code", SOLVED, "a"), ("code", CHECK + "\ny = checks.check_other(y)", "b")],
     "several exercises"),
    ([("code", SOLVED, "a"), ("code", "%time " + CHECK, "b")], "not plain Python"),
    ([("code", SOLVED + "\n\ndef triple(x):\n    ### BEGIN SOLUTION\n    return 3 * x\n"
       "    ### END SOLUTION", "a"), ("code", CHECK, "b"), ("code", "triple = checks.check_triple("
       "triple)", "c")], "double, triple are each checked later"),
])
def test_a_notebook_off_the_pattern_fails_loudly_naming_notebook_and_cell(cells, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        grading.with_nbgrader_metadata(notebook(*cells), where="99_mine.ipynb")
    assert str(error.value).startswith("99_mine.ipynb, cell ")


@pytest.mark.parametrize("points", [{"double": 0}, {"double": -1}, {"double": True},
                                    {"double": "2"}])
def test_points_must_be_positive_numbers(points):
    with pytest.raises(ValueError, match="positive number"):
        grading.with_nbgrader_metadata(TINY, points=points)


def test_the_exercise_is_the_checked_one_of_the_cells_functions_and_classes():
    cell = ('def double(x):\n    return Doubler()(x)\n\n\nclass Doubler:\n    def __call__(self, x):'
            '\n        ### BEGIN SOLUTION\n        return 2 * x\n        ### END SOLUTION')
    nb = grading.with_nbgrader_metadata(notebook(("code", cell, "a"), ("code", CHECK, "b")))
    assert [m["grade_id"] for m in meta(nb)] == ["double", "double-test"]
    with pytest.raises(ValueError, match=r"'double' has no check after it; .* \(or check one of "
                                         r"Doubler\)"):
        grading.with_nbgrader_metadata(notebook(("code", cell, "a")))


def test_something_else_than_a_notebook_is_refused():
    with pytest.raises(TypeError, match="a list of cells"):
        grading.with_nbgrader_metadata(json.dumps(TINY))


def test_a_clashing_grade_id_is_refused():
    nb = notebook(("markdown", "a", "same"), ("markdown", "b", "same"))
    with pytest.raises(ValueError, match="grade_id 'cell-same' is also cell 0's"):
        grading.with_nbgrader_metadata(nb, where="x.ipynb")


def test_the_points_table_names_real_exercises():
    names = {e.name for path in SOLUTIONS
             for e in grading.exercises(json.loads(path.read_text()), path.name)}
    assert set(grading.POINTS) <= names


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name[:2])
def test_nbgrader_accepts_the_metadata_and_the_student_version_hides_the_tests(path):
    import nbformat
    from nbgrader.nbgraderformat import MetadataValidator
    solution = nbformat.reads(classroom.with_metadata(path), as_version=4)
    MetadataValidator().validate_nb(solution)                     # nbgrader's own schema checks
    kinds = [(c.metadata.nbgrader["solution"], c.metadata.nbgrader["grade"]) for c in solution.cells]
    found = exercises(path)
    assert kinds.count((True, False)) == kinds.count((False, True)) == len(found)
    for _, name, check in found:
        assert grading.hidden_tests(name) in solution.cells[check].source
        assert solution.cells[check].metadata.nbgrader["points"] == grading.POINTS.get(name, 1)
    text = classroom.student_version(path)
    assert "HIDDEN TESTS" not in text and "checks.graded" not in text and '"nbgrader"' not in text


def test_write_metadata_writes_only_what_changed_and_the_student_version_follows(tmp_path):
    src, out = tmp_path / "solutions", tmp_path / "student"
    src.mkdir()
    for path in SOLUTIONS[:2]:
        (src / path.name).write_text(path.read_text())
    first, second = (src / SOLUTIONS[0].name), (src / SOLUTIONS[1].name)
    bare = json.loads(first.read_text())                          # the metadata not written yet
    for cell in bare["cells"]:
        cell["metadata"].pop("nbgrader", None)
    first.write_text(grading.notebook_text(bare))
    second.write_text(classroom.with_metadata(second))            # already up to date
    before = second.stat().st_mtime_ns
    assert classroom.metadata_out_of_date(src) == [first.name]
    assert classroom.write_metadata(src) == [first]
    assert classroom.metadata_out_of_date(src) == [] and classroom.write_metadata(src) == []
    assert second.stat().st_mtime_ns == before
    # the student version is the same whether the metadata is in the file yet or not
    assert classroom.student_version(first) == classroom.student_version(
        classroom.SOLUTIONS / first.name)
    written, removed = classroom.write_student(out, src)
    assert written == [out / first.name, out / second.name] and removed == []
    assert classroom.write_student(out, src) == ([], [])
    (out / "00_gone.ipynb").write_text("{}")
    assert classroom.write_student(out, src) == ([], [out / "00_gone.ipynb"])


def test_write_metadata_writes_nothing_when_one_notebook_is_off_the_pattern(tmp_path):
    good, bad = tmp_path / "01_good.ipynb", tmp_path / "02_bad.ipynb"
    good.write_text(grading.notebook_text(TINY))
    bad.write_text(grading.notebook_text(notebook(("code", SOLVED, "a"))))     # no check
    with pytest.raises(ValueError, match=r"02_bad.ipynb, cell 0: exercise 'double' has no check"):
        classroom.write_metadata(tmp_path)
    assert good.read_text() == grading.notebook_text(TINY)
