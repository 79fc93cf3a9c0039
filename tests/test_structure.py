"""The package's shape: no import cycle among bear_ds modules, short functions, a light config layer.

Read from the source with `ast` (no import of the package), except the config check, which imports
`bear_ds.config` in a fresh interpreter and looks at what got loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from launching import REPO, launch_env

PACKAGE = REPO / "bear_ds"
MAX_FUNCTION_LINES = 100

# Import cycles tolerated, each as its modules in sorted order; an entry that no longer occurs fails
# the test too, so that it is removed here. None is left.
KNOWN_IMPORT_CYCLES: set[tuple[str, ...]] = set()


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement of the tree, at any depth (inside functions too), except the ones
    under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports: `import a.b` and `from a import b` (b a submodule too),
    relative imports resolved."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, *([base] if base else [])])
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    # importing a.b.c runs the package inits a and a.b first: edges too, except to the module's own
    # packages (already being imported when it runs)
    for name in list(found):
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if is_package:
        own_packages.add(module)
    return {name for name in found if name in known and name not in own_packages}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components with more than one module (or a self-import), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: set[tuple[str, ...]] = set()
    counter = [0]

    def visit(node: str) -> None:  # Tarjan; the package is small enough for recursion
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1 or node in graph[node]:
                components.add(tuple(sorted(members)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_sees_function_level_and_submodule_imports(tmp_path):
    # the checker itself: a cycle closed by an import inside a function, through `from pkg import mod`
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\ndef g():\n    import pkg.a\n"
    )
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = {name: imported_modules(name, pkg / f"{name.split('.')[-1]}.py", known) for name in known - {"pkg"}}
    graph["pkg"] = set()
    assert graph["pkg.a"] == {"pkg.b"}  # the package's own init is no edge of its modules
    assert graph["pkg.c"] == {"pkg.a"}  # the TYPE_CHECKING import is not an edge
    assert import_cycles(graph) == {("pkg.a", "pkg.b", "pkg.c")}


def test_no_import_cycle_among_package_modules():
    cycles = import_cycles(import_graph())
    unexpected = sorted(cycles - KNOWN_IMPORT_CYCLES)
    assert not unexpected, "import cycles (imports inside functions count):\n" + "\n".join(
        " <-> ".join(c) for c in unexpected
    )
    assert KNOWN_IMPORT_CYCLES <= cycles, (
        f"cycles listed as known no longer occur, remove them: {sorted(KNOWN_IMPORT_CYCLES - cycles)}"
    )


def long_functions(limit: int) -> list[str]:
    found = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > limit:
                    found.append(f"{module}.{node.name} ({path.relative_to(REPO)}:{node.lineno}): {lines} lines")
    return found


def test_no_function_longer_than_the_limit():
    too_long = long_functions(MAX_FUNCTION_LINES)
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def test_config_with_a_domain_does_not_import_the_data_layer():
    # validating data.domain must not load `datasets` (and pyarrow) through the data layer
    code = (
        "import json, sys\n"
        "from bear_ds.config import Config, with_overrides\n"
        "cfg = with_overrides(Config(), ['data.domain=office'])\n"
        "print(json.dumps({'domain': cfg.data.domain, 'datasets': 'datasets' in sys.modules,"
        " 'data_layer': sorted(m for m in sys.modules if m.startswith('bear_ds.data'))}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["domain"] == "office"
    assert seen["datasets"] is False, f"datasets was imported; bear_ds data modules loaded: {seen['data_layer']}"
