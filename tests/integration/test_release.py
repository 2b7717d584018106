"""The release artefacts: ``python -m build`` gives an sdist and a wheel that install in a clean
virtual environment and run the README's quickstart there, outside the checkout."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

import celery_asyncpool

from .conftest import ROOT


def run(command, **options):
    done = subprocess.run(command, capture_output=True, text=True, **options)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel ``python -m build`` makes (the wheel built from the sdist)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout=240)
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return sdists[0], wheels[0]


def test_both_carry_the_one_version(dist):
    version = celery_asyncpool.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(\w+\d*)?", version)
    sdist, wheel = dist
    assert sdist.name == f"celery_asyncpool-{version}.tar.gz"
    assert wheel.name.startswith(f"celery_asyncpool-{version}-py3-none-any")


def test_the_wheel_ships_py_typed_and_the_plugin_entry_point_but_no_tests(dist):
    names = zipfile.ZipFile(dist[1]).namelist()
    assert "celery_asyncpool/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(dist[1]).read(entry_points).decode()
    assert "[celery.commands]" in text and "asyncsql = celery_asyncpool.cli:asyncsql" in text


def test_the_sdist_carries_what_it_takes_to_test_and_try_it(dist):
    with tarfile.open(dist[0]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in ("pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in",
                   "celery_asyncpool/py.typed", "tests/integration/conftest.py",
                   "examples/quickstart/main.py", "examples/runner.py", "docs/uvloop.md"):
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n or n.startswith("benchmarks/results")]


def test_the_wheel_installs_in_a_clean_venv_and_runs_the_quickstart(dist, tmp_path):
    """No site-packages of the test run: pip installs the wheel and its dependencies (from its
    cache when it can); the quickstart runs from a copy of examples/ outside the checkout."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{dist[1]}[aiosqlite]"], env=environment, timeout=300)
    examples = shutil.copytree(ROOT / "examples", tmp_path / "elsewhere" / "examples",
                               ignore=shutil.ignore_patterns("var", "__pycache__"))
    out = run([python, str(examples / "quickstart" / "main.py"), "--tasks", "4"],
              cwd=tmp_path / "elsewhere", env={**environment, "QUICKSTART_VAR": str(tmp_path / "var")},
              timeout=180)
    assert "4 tasks done by a -P asyncsql worker" in out, out
    where = run([python, "-c", "import celery_asyncpool; print(celery_asyncpool.__file__, "
                               "celery_asyncpool.__version__)"],
                cwd=tmp_path, env=environment)
    assert where.startswith(str(env_dir)) and celery_asyncpool.__version__ in where, where
