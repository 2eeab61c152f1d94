"""The package's layout stays what the README says: a flat core, and wings (models, data, train,
classroom) that import downward only; no import circle; no import of deqlite hidden inside a
function (lazy imports of optional packages such as torchvision or nbgrader are fine); modules
short enough to read in one sitting."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deqlite"
WINGS = ("models", "data", "train", "classroom")
# what each wing may import besides the core (the core may import no wing)
ALLOWED = {"models": set(), "data": set(), "train": {"models", "data"},
           "classroom": {"models"}}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 440, 60     # "one sitting": ~400 lines, a screen


def module_name(path: Path) -> str:
    parts = ["deqlite", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# one idea many times (a notebook's exercise checks, one after another): allowed to be long
CATALOGUES = {name for name in MODULES if name.startswith("deqlite.classroom.checks.nb")}


def imports(name: str):
    """(imported deqlite module, line, inside a function?) for every import of module `name`."""
    path = MODULES[name]
    return imports_in(path.read_text(), name, is_package=path.name == "__init__.py")


def imports_in(source: str, name: str, *, is_package: bool = False):
    tree = ast.parse(source)
    package = name if is_package else name.rsplit(".", 1)[0]
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import name`, the package
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
                       for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in MODULES:
                yield t, node.lineno, id(node) in nested


def wing(name: str):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


GRAPH = {name: {t for t, _, _ in imports(name) if t != name} for name in MODULES}


def test_there_is_no_import_circle():
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name)
    assert not circles, "import circles: " + "; ".join(" → ".join(c) for c in circles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_downward_only(name):
    own = wing(name)
    for target, line, _ in imports(name):
        other = wing(target)
        if other is None or other == own:
            continue
        assert own is not None, f"{name}:{line}: the core imports the {other} wing ({target})"
        assert other in ALLOWED[own], f"{name}:{line}: the {own} wing imports {target}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_deqlite_import_is_hidden_in_a_function(name):
    lazy = [f"line {line}: {target}" for target, line, inside in imports(name) if inside]
    assert not lazy, f"{name} imports deqlite modules inside functions: {', '.join(lazy)}"


@pytest.mark.parametrize("name", sorted(set(MODULES) - CATALOGUES))
def test_modules_and_functions_fit_in_one_sitting(name):
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{name} is over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{name}.{node.name} has {length} lines"


def test_the_checks_can_fail(monkeypatch):
    """A circle, a lazy import and relative imports are seen (the checks above are not vacuous)."""
    monkeypatch.setitem(GRAPH, "deqlite.solvers", GRAPH["deqlite.solvers"] | {"deqlite.deq"})
    with pytest.raises(AssertionError, match="deqlite.solvers → deqlite.deq"):
        test_there_is_no_import_circle()
    source = "from .solvers import solve\ndef f():\n    from .models import vision, MODELS\n"
    assert list(imports_in(source, "deqlite.probe")) == [
        ("deqlite.solvers", 1, False), ("deqlite.models.vision", 3, True), ("deqlite.models", 3, True)]
    assert list(imports_in("from ..data import batches", "deqlite.train.probe")) == [
        ("deqlite.data.batches", 1, False)]
    assert wing("deqlite.train.trainer") == "train" and wing("deqlite.deq") is None
