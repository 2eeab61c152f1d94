"""The classroom kit: student notebooks generated from the solution notebooks (and in step with
them), every exercise cleared and followed by its check, enough graded exercises per notebook."""
import json
import re
from pathlib import Path

import pytest

from deqlite.classroom import checks
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
    solution = cells(path)
    assert len(student) == len(solution)
    for i, name, check in found:
        assert check is not None, f"{path.name}: {name} is not followed by checks.check_{name}"
        assert hasattr(checks, f"check_{name}") and hasattr(checks.references, name)
        source = "".join(solution[i]["source"])
        before, rest = source.split(classroom.BEGIN)
        after = rest.split(classroom.END)[1]
        indent = before[before.rstrip(" ").__len__():]
        # exactly the solution cell with its solution replaced by the stub: nothing else changed
        assert "".join(student[i]["source"]) == (
            before + "# YOUR CODE HERE\n" + indent + "raise NotImplementedError()" + after)
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
