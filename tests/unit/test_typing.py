"""The package passes mypy --strict (configuration in pyproject.toml), and its public API has
the precise types that typing_public_api.py states."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def mypy(*args):
    done = subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_passes_mypy_strict():
    mypy()


def test_public_api_types_are_exact():
    mypy("--strict", "tests/unit/typing_public_api.py")


def test_each_mypy_override_is_for_untyped_third_party_modules_and_says_why():
    """An override may only silence missing types of other projects' modules, never loosen
    checks on this package, and a comment above it says why."""
    config = (ROOT / "pyproject.toml").read_text()
    blocks = re.findall(r"^\[\[tool\.mypy\.overrides\]\]\n(.*?)(?=^\[|\Z)", config, re.S | re.M)
    assert blocks
    for body in blocks:
        assert re.search(r"^#", body, re.M), f"an override without a comment saying why:\n{body}"
        modules = re.search(r"module\s*=\s*\[(.*?)\]", body, re.S).group(1)
        assert "celery_asyncpool" not in modules, body
        settings = {line.split("=")[0].strip() for line in body.splitlines()
                    if "=" in line and not line.lstrip().startswith(("module", "#"))}
        assert settings == {"ignore_missing_imports"}, body
