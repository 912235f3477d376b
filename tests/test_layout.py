"""The package's shape: files that fit on a few screens, no import cycles, and no module outside
a model family's folder that branches on a family's name."""

from __future__ import annotations

import ast
from pathlib import Path

import napari_magnet

PACKAGE = Path(napari_magnet.__file__).resolve().parent
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (late imports too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target in modules and target != name:
                found.add(target)
    return found


def test_no_source_file_is_over_600_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package importing its own submodules (its __init__ re-exporting them) is not a cycle:
    # Python finishes the package before the submodule needs it.
    graph = {
        name: {t for t in targets if not t.startswith(name + ".")}
        for name, targets in graph.items()
    }
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def _family_names() -> set[str]:
    from napari_magnet.models.family import families

    names = set()
    for family in families():
        names.add(family.architecture)
        names.update(family.configs)
    return names


def test_engine_viewer_and_cli_never_branch_on_a_family_name():
    names = _family_names()
    assert {"magnet", "ats", "magnet3"} <= names
    checked = [p for p in (PACKAGE / "engine").rglob("*.py")]
    checked += list((PACKAGE / "_napari").rglob("*.py")) + [PACKAGE / "cli.py"]
    offences = []
    for path in checked:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            strings = []
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    strings += [e.value for e in elts if isinstance(e, ast.Constant)]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
            ):
                strings += [a.value for a in node.args if isinstance(a, ast.Constant)]
            for s in strings:
                if isinstance(s, str) and (
                    s in names
                    or (
                        len(s) >= 3
                        and any(n.startswith(s) for n in names)
                        and isinstance(node, ast.Call)
                    )
                ):
                    offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {s!r}")
    assert not offences, offences


def test_ruff_lint_and_format_are_clean():
    import shutil
    import subprocess
    import sys

    root = PACKAGE.parent.parent
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[testing]'"
    paths = [str(root / p) for p in ("src", "tests", "benchmarks")]
    lint = subprocess.run([ruff, "check", *paths], cwd=root, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [ruff, "format", "--check", *paths], cwd=root, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
