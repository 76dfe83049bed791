"""Imports go one way (README, "Layout of the code"): every import of every module under src/apfast, read with ast.

Module-level and function-level imports both count; imports under ``if TYPE_CHECKING:`` (annotations
only) do not. Names given to ``importlib.import_module`` as strings are plug-in look-ups and are not
checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "apfast"

#: Top-level modules that form the core (with the package itself, ``apfast/__init__.py``).
CORE = {"errors", "exposure", "psf", "psfmatch_diag", "masks", "_configbase", "_jit", "_fileio", "_constants", "camera",
        "configs"}
#: Layer -> the layers its modules may import (the README's "may import" column; own layer always allowed).
ALLOWED: dict[str, set[str]] = {
    "core": {"kernels"},
    "repo": {"core"},
    "ccd": {"core", "kernels"},
    "diffim": {"core", "kernels", "ccd"},
    "dia": {"core", "kernels", "ccd", "diffim", "repo"},
}
#: Module -> extra layers it alone may import, with the README's reason.
EXTRA: dict[str, set[str]] = {
    "apfast.diffim.template": {"repo"},  # template retrieval reads through repo
}
#: Orchestration and tools on top of everything: no rule.
UNRESTRICTED = {"run", "sim", "report", "main"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the package facade (apfast/__init__.py)
    top = parts[1]
    if top in CORE:
        return "core"
    if top == "__main__":
        return "main"
    return top


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The apfast modules an ImportFrom names (``from apfast import masks`` names apfast.masks)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    if target != "apfast" and not target.startswith("apfast."):
        return []
    out = []
    for alias in node.names:
        sub = PKG.parent.joinpath(*f"{target}.{alias.name}".split("."))
        out.append(f"{target}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else target)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported apfast module) of every import in ``source`` outside ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "apfast")
        elif isinstance(node, ast.ImportFrom):
            found.extend((node.lineno, m) for m in _resolve(module, is_package, node))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _modules() -> list[Path]:
    # src/apfast/kernels is a development symlink to kernels/, which has its own rule (tools/check_jit.py)
    return sorted(p for p in PKG.rglob("*.py") if "kernels" not in p.relative_to(PKG).parts)


def _violations(path: Path) -> list[str]:
    module = _module_name(path)
    layer = _layer(module)
    if layer in UNRESTRICTED:
        return []
    allowed = ALLOWED[layer] | EXTRA.get(module, set()) | {layer}
    return [
        f"{path.relative_to(SRC)}:{line} ({layer}) imports {target} ({_layer(target)})"
        for line, target in _imports(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")
        if _layer(target) not in allowed
    ]


def test_every_module_has_a_layer() -> None:
    layers = {_layer(_module_name(p)) for p in _modules()}
    assert layers <= set(ALLOWED) | UNRESTRICTED, layers - set(ALLOWED) - UNRESTRICTED


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layers(path: Path) -> None:
    assert _violations(path) == []


def test_the_checker_sees_wrong_way_imports(tmp_path: Path) -> None:
    # the shapes the rule exists for: a function-level import of a stage in core, a module-level
    # import of apfast.run in a stage; a TYPE_CHECKING import is allowed
    code = (
        "from typing import TYPE_CHECKING\n"
        "from apfast import masks\n"
        "if TYPE_CHECKING:\n"
        "    from apfast.run.config import ApdbConfig\n"
        "def f():\n"
        "    from apfast.dia.alerts import read_alerts\n"
        "import apfast.run.pipeline\n"
    )
    names = [m for _, m in _imports(code, "apfast.repo.probe")]
    assert names == ["apfast.masks", "apfast.dia.alerts", "apfast.run.pipeline"]
    bad = [n for n in names if _layer(n) not in ALLOWED["repo"] | {"repo"}]
    assert bad == ["apfast.dia.alerts", "apfast.run.pipeline"]
