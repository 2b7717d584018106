"""The tree's rules: the direction of imports (import-linter contracts in pyproject.toml), and
``_compat`` as the one module that names an internal of celery, kombu, billiard or asyncio."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import celery_asyncpool
from celery_asyncpool import _compat

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(celery_asyncpool.__file__).parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
HOSTS = ("celery", "kombu", "billiard", "asyncio", "sys", "ctypes")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(cwd), "PATH": ""})


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("child/runtime.py", "from ..parent import supervisor", "never import the parent"),
    ("databases/engines.py", "from ..child import leftovers", "never imports the job server"),
    ("config.py", "from . import wire", "import nothing of the package"),
    ("task.py", "from .parent.pool import TaskPool", "never imports the pool"),
    ("wire.py", "from . import context", "only from the layers below"),
])
def test_a_change_that_breaks_a_contract_fails(tmp_path, module, line, contract):
    shutil.copytree(PACKAGE, tmp_path / "celery_asyncpool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    broken = tmp_path / "celery_asyncpool" / module
    broken.write_text(broken.read_text() + f"\n{line}  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert contract in result.stdout and "BROKEN" in result.stdout


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_compat.py")


def _own_names() -> set[str]:
    """Functions and classes the package defines itself (``JobServer._run``, say)."""
    return {node.name for path in _modules() for node in ast.walk(ast.parse(
        path.read_text())) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.ClassDef))}


def _internal_names() -> set[str]:
    """The last part of each internal's path, and each private part, but for names the
    package defines itself and ``worker``, which is everywhere."""
    names = set()
    for internal in _compat.INTERNALS:
        parts = internal.path.split(".")
        names.add(parts[-1])
        names.update(part for part in parts if part.startswith("_"))
    return (names | {_compat.AUTORETRY_BODY}) - _own_names() - {"worker"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_but_compat_names_an_internal(path):
    tree = ast.parse(path.read_text())
    internal = _internal_names()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in HOSTS:
            module_parts = (node.module or "").split(".")
            found += [f"from {node.module} import {alias.name}" for alias in node.names
                      if alias.name in internal or alias.name.startswith("_")
                      or any(part.startswith("_") for part in module_parts)]
        elif (isinstance(node, ast.Attribute) and node.attr in internal
              and not (isinstance(node.value, ast.Name) and node.value.id == "_compat")):
            found.append(f".{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Constant) and node.value in internal:
            found.append(f"{node.value!r} (line {node.lineno})")
    assert found == [], f"{path.name} reaches internals outside _compat: {found}"


def test_the_internals_list_names_where_each_one_lives():
    for internal in _compat.INTERNALS:
        assert internal.package in HOSTS, internal
        assert internal.where and internal.why, internal
