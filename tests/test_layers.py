"""Layers import downward only: storage (bytes) knows nothing of the layers above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ABOVE = {"storage": {"catalog", "service", "cli"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports at run time (not under `if TYPE_CHECKING:`)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_import_runs_back_up(package: str) -> None:
    for path in sorted((REPO / package).glob("*.py")):
        upward = imported_packages(path) & ABOVE[package]
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}"
