"""The package passes mypy --strict (configuration in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path


def test_package_passes_mypy_strict():
    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
