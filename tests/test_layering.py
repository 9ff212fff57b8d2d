"""The package's layering: imports between matvlm_cli's parts (its subpackages and top-level modules) go
one way. Every import statement counts, those inside functions too: a lazy import still ties the two
parts together, it only defers the cost."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "matvlm_cli"


def _module_name(file: Path, root: Path) -> tuple[str, ...]:
    parts = file.relative_to(root.parent).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def _is_module(name: tuple[str, ...], root: Path) -> bool:
    path = root.parent.joinpath(*name)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{part: parts it imports}, a part being a subpackage or top-level module of the package at `root`;
    imports within a part, and of the package's own __init__, are left out."""
    graph: dict[str, set[str]] = {}
    for file in sorted(root.rglob("*.py")):
        name = _module_name(file, root)
        if len(name) < 2:
            continue  # the package's __init__: the public facade, importing lazily from its parts
        package = name if file.name == "__init__.py" else name[:-1]
        imported = []
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                imported += [tuple(alias.name.split(".")) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else ()
                module = base + tuple(node.module.split(".")) if node.module else base
                # `from . import x` names a module x; `from .m import f` a function of m.
                imported += [m if _is_module(m, root) else module for m in (module + (a.name,) for a in node.names)]
        part = name[1]
        graph.setdefault(part, set())
        for target in imported:
            if len(target) >= 2 and target[0] == root.name and target[1] != part:
                graph[part].add(target[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the parts along it (first == last), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path):] = "open", [node]
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_parts_of_the_package():
    cycle = find_cycle(package_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_evaluation_builds_on_the_world_never_the_reverse():
    graph = package_graph()
    assert "world" in graph["evaluate"]  # the benchmark sets are the world's
    assert "evaluate" not in graph["world"]
    # The world is data: it needs no model code.
    assert not graph["world"] & {"hybrid", "kernels", "evaluate", "distill", "teacher"}


def test_kernels_and_the_model_core_import_no_subcommand():
    graph = package_graph()
    # errors and choices are leaves (they import nothing of the package), so kernels reach nothing through them
    assert not graph["errors"] and not graph["choices"], (graph["errors"], graph["choices"])
    assert graph["kernels"] <= {"errors", "choices"}, graph["kernels"]
    subcommands = {"app", "bench", "cli", "convert", "distill", "evaluate", "export", "generate", "serve", "teacher"}
    assert not graph["hybrid"] & subcommands, graph["hybrid"]


def _write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_check_finds_a_cycle_through_relative_and_lazy_imports(tmp_path):
    """The checker itself: a planted cycle (a relative import one way, a lazy `from .. import` the other)."""
    root = tmp_path / "pkg"
    _write(root, "__init__.py", "")
    _write(root, "a/__init__.py", "")
    _write(root, "a/one.py", "from ..b.two import thing\n")
    _write(root, "b/__init__.py", "")
    _write(root, "b/two.py", "def thing():\n    from .. import c\n")
    _write(root, "c.py", "import pkg.a.one\nfrom pkg.errors import Oops\n")
    _write(root, "errors.py", "class Oops(Exception): ...\n")
    graph = package_graph(root)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a", "errors"}, "errors": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    _write(root, "c.py", "from pkg.errors import Oops\n")
    assert find_cycle(package_graph(root)) is None
