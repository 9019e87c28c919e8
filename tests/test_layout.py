"""The package's shape (docs/architecture.md): layers in folders, no import cycles counting every import
(TYPE_CHECKING ones and imports inside functions too), small modules, a public API that loads lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gossipfl

PACKAGE = Path(gossipfl.__file__).parent


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the gossipfl modules it imports, from every import statement anywhere in its source."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for a in node.names:
                    deps.add(f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the walk saw the package, not an empty folder
    assert "gossipfl.serving.routes" in graph["gossipfl.node"]  # and it sees imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles_through_type_checking_and_function_imports(tmp_path):
    pkg = tmp_path / "gossipfl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gossipfl.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("from gossipfl import a\n")
    (pkg / "d.py").write_text("import gossipfl.c\n")
    graph = import_graph(pkg)
    assert graph["gossipfl.d"] == {"gossipfl.c"}
    assert cycles(graph) == [["gossipfl.a", "gossipfl.c", "gossipfl.sub.b"]]


def test_layers_are_folders_and_modules_stay_small():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"protocol", "learning", "discovery", "serving", "common", "testbed"} <= subpackages
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == [
        "__init__.py",
        "__main__.py",
        "args.py",
        "assembly.py",
        "cli.py",
        "config.py",
        "node.py",
        "report.py",
        "state.py",
        "version.py",
    ]


def test_the_layers_contract_holds_and_would_catch_a_breach(tmp_path):
    """lint-imports (import-linter, configured in pyproject.toml) passes on the package, and fails on a
    copy in which the protocol imports the peer table."""
    root = PACKAGE.parent
    lint = Path(sys.executable).parent / "lint-imports"
    ok = subprocess.run([lint, "--config", root / "pyproject.toml"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    copy = tmp_path / "gossipfl"
    subprocess.run(["cp", "-r", PACKAGE, copy], check=True)
    wire = copy / "protocol" / "wire.py"
    wire.write_text(wire.read_text() + "\nfrom gossipfl.discovery import peers  # noqa: E402,F401\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    bad = subprocess.run(
        [lint, "--config", root / "pyproject.toml", "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0
    assert "gossipfl.protocol.wire -> gossipfl.discovery.peers" in bad.stdout


def test_the_public_api_is_complete_and_lazy():
    code = (
        "import sys, gossipfl\n"
        "assert 'torch' not in sys.modules, 'import gossipfl must not import torch'\n"
        "missing = [n for n in gossipfl.__all__ if getattr(gossipfl, n, None) is None]\n"
        "assert not missing, missing\n"
        "from gossipfl.node import Node\n"
        "assert gossipfl.Node is Node\n"
        "print(gossipfl.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == gossipfl.__version__
    assert set(gossipfl.__all__) == {*gossipfl._EXPORTS, "__version__"}
    for name in ("Node", "NodeConfig", "ClassificationTask", "TaskData", "run_testbed", "TestbedOptions", "query"):
        assert name in gossipfl.__all__


def test_the_example_task_uses_only_the_public_api():
    example = PACKAGE.parent / "examples" / "iris_task.py"
    imports = [n for n in ast.walk(ast.parse(example.read_text())) if isinstance(n, ast.ImportFrom) and n.module]
    ours = [n for n in imports if n.module.startswith("gossipfl")]
    assert ours and all(n.module == "gossipfl" for n in ours)
    assert all(a.name in gossipfl.__all__ for n in ours for a in n.names)


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "gossipfl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"gossipfl {gossipfl.__version__}"
