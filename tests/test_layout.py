"""The layout habits the codebase keeps (CONTRIBUTING.md): no module over 700 lines, no function over 80 lines outside
the model forward and sampling loops (`models/`, `sampling/`). The one-way import rules are checked by
`lint-imports` (contracts in pyproject.toml), which `.ci/run` runs before the tests."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lvstudio"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
LOOPS = ("models", "sampling")  # model forward passes and sampling loops may run longer


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_700_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not long, f"split these modules: {long}"


def test_no_function_over_80_lines_outside_models_and_sampling() -> None:
    long = []
    for p in _modules():
        if p.relative_to(PACKAGE).parts[0] in LOOPS:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"split these functions: {long}"
