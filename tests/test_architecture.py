"""Structure of the code base: no import cycle between samed's modules, no oversized module.

The import graph is read from the source (``ast``), never by importing: an edge A -> B means that
importing A runs ``import B`` (or ``from B import ...``) at module level -- in the module body,
in a class body or under a module-level ``if``/``try``, but not inside a function and not under
``if TYPE_CHECKING:`` or ``if __name__ == "__main__":``. Importing ``samed.x.y`` also runs the package ``samed.x``'s ``__init__``,
so that is an edge too, unless ``samed.x`` is a package the importer itself lives in (Python has
it initialised already by then).
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import samed

ROOT = Path(samed.__file__).resolve().parent.parent
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module under ``samed``, found on disk with pkgutil (nothing is imported)."""
    found = {"samed": Path(samed.__file__).resolve()}
    todo = [("samed", Path(samed.__file__).resolve().parent)]
    while todo:
        pkg, folder = todo.pop()
        for info in pkgutil.iter_modules([str(folder)]):
            name = f"{pkg}.{info.name}"
            if info.ispkg:
                found[name] = folder / info.name / "__init__.py"
                todo.append((name, folder / info.name))
            else:
                found[name] = folder / f"{info.name}.py"
    return found


def _never_on_import(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` bodies do not run on import."""
    if isinstance(test, ast.Name | ast.Attribute):
        return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.append(node)
            elif isinstance(node, ast.If):
                if not _never_on_import(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try | ast.TryStar):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With | ast.For | ast.While):
                visit(node.body)
                visit(getattr(node, "orelse", []))
            elif isinstance(node, ast.ClassDef):  # a class body runs at import time
                visit(node.body)

    visit(tree.body)
    return out


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    """Module-level import edges among samed's own modules (see the module docstring)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = _package_of(module, path)
        targets: set[str] = set()
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            targets.add(base_name)
            for alias in node.names:  # ``from pkg import submodule``
                if f"{base_name}.{alias.name}" in modules:
                    targets.add(f"{base_name}.{alias.name}")
        edges: set[str] = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the target and the packages above it
                name = ".".join(parts[:i])
                if name not in modules or name == module:
                    continue
                if i < len(parts) and (module == name or module.startswith(name + ".")):
                    continue  # an ancestor package of the importer: already initialised
                edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)) is not None:
            return cycle
    return None


def test_the_module_walk_sees_every_samed_file_and_real_edges():
    modules = _modules()
    on_disk = {p.resolve() for p in (ROOT / "samed").rglob("*.py")}
    assert set(modules.values()) == on_disk
    graph = import_graph()
    # edges that exist today at module level: a relative import, one from a package's
    # __init__, one two levels up
    assert "samed.registry" in graph["samed.cli"]  # from .registry import ...
    assert "samed.batch.run" in graph["samed.batch"]  # from .run import ... (in __init__)
    assert "samed.registry" in graph["samed.batch.cli"]  # from ..registry import ...
    # an import inside a function is not an edge: samed.cli imports its sub-commands lazily
    assert "samed.batch.cli" not in graph["samed.cli"]
    assert "samed.io.volume" not in graph["samed.io.cli"]  # under ``if TYPE_CHECKING:``


def test_only_imports_that_run_on_import_count():
    source = """
import a
from .b import x
try:
    import c
except ImportError:
    import d
if TYPE_CHECKING:
    import e
if typing.TYPE_CHECKING:
    import f
class K:
    import g
    def m(self):
        import h
def fn():
    import i
if __name__ == "__main__":
    import j
else:
    import k
"""
    nodes = _module_level_imports(ast.parse(source))
    names = [n.names[0].name if isinstance(n, ast.Import) else n.module for n in nodes]
    assert names == ["a", "b", "c", "d", "g", "k"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_samed_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def _sizes() -> dict[str, int]:
    files = [*(ROOT / "samed").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    return {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in files
    }


def test_no_module_over_600_lines():
    over = {f: n for f, n in _sizes().items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_one_list_of_readable_suffixes_used_by_every_reader():
    from samed import datasets, registry
    from samed.batch import cases
    from samed.io import nifti, readers, writers

    assert readers.SUPPORTED_SUFFIXES is registry.READABLE_SUFFIXES
    assert nifti.NIBABEL_SUFFIXES is registry.NIBABEL_SUFFIXES
    assert datasets._SUFFIXES is registry.VOLUME_SUFFIXES
    assert writers._NIFTI_SUFFIXES is registry.NIFTI_SUFFIXES
    assert set(cases.IMAGE_SUFFIXES) == set(registry.NIBABEL_SUFFIXES + registry.ITK_SUFFIXES)
    for name, stem in [
        ("ct.nii.gz", "ct"),
        ("CT.NII.GZ", "CT"),
        ("brain.mgz", "brain"),
        ("a.b.nrrd", "a.b"),
        ("slice.dcm", "slice"),
        ("notes.txt", "notes"),
        ("noext", "noext"),
        (".nii.gz", ".nii"),
    ]:
        assert registry.strip_volume_suffix(name) == stem, name
