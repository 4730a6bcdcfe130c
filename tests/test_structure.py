"""The package's shape: every module imports on its own, no module imports another that imports it back (function
level imports included), no block of six lines stands twice in src, and the recipe runner knows no stage kind."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "torchslim"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def test_every_module_imports_on_its_own():
    """Each module is imported in a fresh torchslim (torch stays loaded), so an import that works only after some
    other module was imported first fails here."""
    names = [name for name in _modules() if name != "torchslim.__main__"]
    script = (
        "import importlib, sys, torch\n"
        f"names = {names!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'torchslim' or m.startswith('torchslim.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed.append(f'{name}: {type(error).__name__}: {error}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=SRC, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        guarded = {
            id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test) for node in ast.walk(branch)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                if target.startswith("torchslim") and resolve(target) not in ("", name):
                    edges[name].add(resolve(target))
    return edges


def test_no_import_cycles():
    """Strongly connected components of the import graph (imports inside functions count) are single modules."""
    edges = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in edges:
        if node not in index:
            visit(node)
    assert cycles == []


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that are code: not blank, not comments, not docstrings, not imports."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(getattr(body[0], "value", None), ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            skip.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        stripped = text.strip()
        if number in skip or not stripped or stripped.startswith("#") or re.fullmatch(r"[\])},:]*", stripped):
            continue
        lines.append((number, stripped))
    return lines


def test_no_block_of_six_lines_stands_twice_in_src():
    seen: dict[tuple[str, ...], str] = {}
    repeats = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _code_lines(path)
        for start in range(len(lines) - 5):
            block = tuple(text for _, text in lines[start : start + 6])
            where = f"{path.relative_to(SRC)}:{lines[start][0]}"
            if block in seen and not seen[block].startswith(f"{path.relative_to(SRC)}:{lines[start][0]}"):
                repeats.append(f"{where} repeats {seen[block]}")
            seen.setdefault(block, where)
    assert repeats == []


def test_the_runner_knows_no_stage_kind():
    from torchslim.pipeline import STAGES

    tree = ast.parse((PACKAGE / "pipeline" / "runner.py").read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(getattr(node, "body", None), list) and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}
    assert sorted(strings & set(STAGES.names())) == []


@pytest.mark.parametrize("pattern", [r"_load_into", r"model\.train\(was", r"\.train\(was_training\)"])
def test_no_private_helpers_across_modules_and_no_mode_overwrites(pattern):
    hits = [
        f"{path.relative_to(SRC)}:{n}" for path in PACKAGE.rglob("*.py") for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)
    ]
    assert hits == []
