"""The kit as a newcomer meets it: dependency lists in step, notebooks clean and well formed."""
import json
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
STUDENT = sorted((ROOT / "notebooks" / "student").glob("[0-9][0-9]_*.ipynb"))
# words of a project's tracker, which a learner cannot follow
TRACKER = re.compile(r"\b(the issue|issues?'s?|an issue's|tracker|the review(er)?|TODO|FIXME)\b"
                     r"|\bthe author measured\b", re.I)
# the start of a line of code that would run only in a code cell
CODE_LINE = re.compile(r"^\s*(import \w|from \w[\w.]* import |def \w+\(|class \w+[(:]|"
                       r"(widgets\.)?interact(_manual)?\(|plt\.|print\()")
CONDA_NAMES = {"pytorch": "torch"}   # conda package name -> PyPI name


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    conda = set()
    text = (ROOT / "environment.yml").read_text()
    for line in text.split("dependencies:", 1)[1].splitlines():
        m = re.match(r"\s*-\s+([A-Za-z][\w.-]*)", line)
        if m and m.group(1) not in ("python", "pip"):
            conda.add(CONDA_NAMES.get(m.group(1).lower(), m.group(1).lower()))
    assert conda == pip_names


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    for nb in NOTEBOOKS:
        assert nb.name in readme, f"README's notebook map misses {nb.name}"


def test_there_are_notebooks():
    assert [nb.name[:2] for nb in NOTEBOOKS][:3] == ["01", "02", "03"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_follows_the_conventions(nb):
    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), \
        "commit notebooks without outputs"
    sources = ["".join(c["source"]) for c in cells]
    text = "\n".join(sources)
    assert 'os.environ.get("DEQLITE_FAST") == "1"' in text, "parameters cell with FAST missing"
    assert "### BEGIN SOLUTION" in text and "### END SOLUTION" in text
    assert "checks.check_" in text
    assert any("Exercises" in s for s, c in zip(sources, cells) if c["cell_type"] == "markdown")
    # every solution block is followed (in a later cell) by a check
    for i, s in enumerate(sources):
        if "### BEGIN SOLUTION" in s:
            assert any("checks.check_" in t for t in sources[i:i + 3]), \
                f"cell {i}: an exercise without a check right after it"


def prose_outside_fences(markdown: str) -> list[str]:
    """The lines of a markdown cell outside its fenced code blocks (```)."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def markdown_problems(cells) -> list[str]:
    """What a learner must never meet in a notebook's markdown: tracker words, code that sits in
    a markdown cell (so it never runs), and no summary before the exercises."""
    problems, headings = [], []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        for line in prose_outside_fences(text):
            if TRACKER.search(line):
                problems.append(f"cell {i} speaks of a tracker: {line.strip()[:80]!r}")
            if CODE_LINE.match(line):
                problems.append(f"cell {i} holds code in markdown (it never runs): {line.strip()[:80]!r}")
            if line.startswith("## "):
                headings.append(line[3:].strip())
    if "Summary" not in headings:
        problems.append("no '## Summary' section")
    elif "Exercises" in headings and headings.index("Summary") > headings.index("Exercises"):
        problems.append("the '## Summary' comes after '## Exercises'")
    return problems


@pytest.mark.parametrize("nb", NOTEBOOKS + STUDENT, ids=lambda p: p.parent.name + "/" + p.name)
def test_notebook_prose_has_no_tracker_words_no_code_and_a_summary(nb):
    assert markdown_problems(json.loads(nb.read_text())["cells"]) == []


def test_the_prose_check_catches_what_it_is_for():
    def notebook(*texts):
        return [{"cell_type": "markdown", "source": [t]} for t in texts]
    good = notebook("# Title", "Move the slider:\n```python\ninteract(draw)\n```", "## Summary\n* a",
                    "## Exercises")
    assert markdown_problems(good) == []
    bad = notebook("As the issue's target says", "widgets.interact(draw, scale=1.0);",
                   "import torch", "## Exercises", "## Summary")
    found = " ".join(markdown_problems(bad))
    assert "tracker" in found and found.count("code in markdown") == 2 and "after" in found
    assert markdown_problems(notebook("## 1. Text")) == ["no '## Summary' section"]
