"""The package's layout rules, read from the source with `ast`: no import circle among lorakit's
modules (imports inside functions and under `if TYPE_CHECKING:` count too), no
`__init__.py` with more than 60 lines of logic, and no module over 600 lines."""

import ast
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The lorakit modules `name` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"
                found.add(target if target in MODULES else source)
    return {m for m in found if m in MODULES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle_of_three_and_ignores_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_resolved_relative_to_the_package():
    assert "lorakit.files" in imports_of("lorakit.config")
    assert "lorakit.kernels.ops" in imports_of("lorakit.kernels")
    assert "lorakit.tuners.lora.quantized" in imports_of("lorakit.tuners.lora.dispatch")
    assert "lorakit.tuners.lora.weighted" in imports_of("lorakit.model")  # inside a method, too


def test_no_import_circle_among_lorakit_modules():
    graph = {name: imports_of(name) for name in MODULES}
    assert cycles(graph) == []


def logic_lines(path: Path) -> int:
    """Lines of code that are not docstrings, comments, blanks, imports or `__all__`."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_all = isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "__all__" for t in node.targets
        )
        if is_docstring or is_all or isinstance(node, (ast.Import, ast.ImportFrom)):
            skipped |= set(range(node.lineno, node.end_lineno + 1))
    lines = path.read_text().splitlines()
    return sum(
        1
        for i, line in enumerate(lines, 1)
        if i not in skipped and line.strip() and not line.strip().startswith("#")
    )


def test_no_init_file_holds_more_than_60_lines_of_logic():
    heavy = {name: n for name, p in MODULES.items() if p.name == "__init__.py" and (n := logic_lines(p)) > 60}
    assert heavy == {}


def test_no_module_is_over_600_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
