"""Every python block in docs/*.md runs, in order, as a reader would run it.

Each page is played in a folder of its own:

- a ```python block whose first line is ``# name.py`` is written to that file
  (a later block of the same name replaces it, as a reader edits the file). It
  is run on the spot, unless a later ``$ python name.py`` runs it; a module
  that sets ``asyncsql_*`` names has them validated as a worker would;
- any other ```python block is run as a script, beside the worker;
- in ```console blocks, ``$ celery ... worker ...`` starts the page's worker
  (stopping the one before, warm) and waits until it is ready; ``$ celery ...``
  and ``$ python ...`` run and must succeed; ``$ pip ...`` is skipped.

The pages name ``redis://127.0.0.1:6379/0`` and the database ``app``; the test
runs them on Redis database 7 and a PostgreSQL database of its own, made afresh.
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from celery_asyncpool.pytest_plugin import start_worker

from .conftest import PG_DSN, ROOT, Worker

DOCS = ROOT / "docs"
DOCS_DATABASE = "celery_asyncpool_docs"
REWRITES = {
    "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/7",
    "postgres@127.0.0.1:5432/app": f"postgres@127.0.0.1:5432/{DOCS_DATABASE}",
}
FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```$", re.S | re.M)
FILE_HEADER = re.compile(r"#\s*([\w/]+\.py)\s*$")
SKIPPED_COMMANDS = ("pip ",)
VALIDATE = """
import runpy, sys
from celery_asyncpool.config import Settings
from celery_asyncpool.databases.engines import Sizing, check_engine_options
found = runpy.run_path(sys.argv[1], run_name="__docs__")
conf = {k: v for k, v in found.items() if k.startswith("asyncsql_")}
if conf:
    check_engine_options(Settings.from_conf(conf), Sizing(10, 2, 80))
"""


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int

    @property
    def file_name(self) -> str | None:
        first = self.text.splitlines()[0] if self.text.strip() else ""
        found = FILE_HEADER.fullmatch(first)
        return found.group(1) if found else None


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    for old, new in REWRITES.items():
        text = text.replace(old, new)
    return [Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def commands(block: Block) -> list[str]:
    """The ``$ ...`` lines of a console block, continuation lines joined."""
    joined = block.text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        if line.startswith("$ "):
            found.append(line[2:].split("  #")[0].strip())
    return found


class PagePlayer:
    """Plays one page's blocks in a folder, with at most one worker at a time."""

    def __init__(self, page: Path, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.worker: Worker | None = None
        self.all_blocks = blocks(page)

    def play(self) -> None:
        try:
            for index, block in enumerate(self.all_blocks):
                if block.language == "python":
                    self.python(block, later=self.all_blocks[index + 1:])
                elif block.language == "console":
                    for command in commands(block):
                        self.console(command, block)
        finally:
            self.stop_worker()

    def where(self, block: Block) -> str:
        return f"{self.page.name}:{block.line}"

    def python(self, block: Block, later: list[Block]) -> None:
        name = block.file_name
        if name is None:
            script = self.folder / f"_block_{block.line}.py"
            script.write_text(block.text)
            self.run([sys.executable, script.name], block)
            return
        (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(block.text)
        run_later = any(f"python {name}" in command for other in later
                        if other.language == "console" for command in commands(other))
        if not run_later:
            self.run([sys.executable, "-c", VALIDATE, name], block, label=f"run {name}")

    def console(self, command: str, block: Block) -> None:
        if command.startswith(SKIPPED_COMMANDS):
            return
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "celery":
            argv[:1] = [sys.executable, "-m", "celery"]
        else:
            pytest.fail(f"{self.where(block)}: the docs test cannot run {command!r}")
        if "worker" in argv:
            self.start_worker(argv + ["--without-gossip", "--without-mingle"], block)
        else:
            self.run(argv, block)

    def run(self, argv: list[str], block: Block, label: str = "") -> None:
        label = label or " ".join(argv[1:])
        done = subprocess.run(argv, cwd=self.folder, capture_output=True, text=True, timeout=90)
        print(f"{self.where(block)}: {label}\n{done.stdout}")
        worker_log = self.worker.logs()[-3000:] if self.worker else ""
        assert done.returncode == 0, (
            f"{self.where(block)}: {label} failed\n{done.stdout}\n{done.stderr}\n"
            f"worker log:\n{worker_log}")

    def start_worker(self, argv: list[str], block: Block) -> None:
        self.stop_worker()
        log_path = self.folder / f"worker-{block.line}.log"
        self.worker = start_worker(argv, hostname=f"celery@{socket.gethostname()}",
                                   log_path=log_path, cwd=self.folder, worker_class=Worker,
                                   queue="celery", app_name="docs")
        self.worker.wait_for_log(" ready.", timeout_s=60)

    def stop_worker(self) -> None:
        if self.worker is not None:
            code = self.worker.stop(signal.SIGTERM, timeout_s=60)
            assert code == 0, f"{self.page.name}: the worker exited {code}:\n{self.worker.logs()}"
            self.worker = None


@pytest.fixture(scope="module")
def docs_services() -> None:
    """A fresh database and an empty Redis database for the pages."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DOCS_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DOCS_DATABASE}")
    redis.Redis.from_url(REWRITES["redis://127.0.0.1:6379/0"]).flushdb()


PAGES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[page.stem for page in PAGES])
def test_page_runs_as_written(page: Path, tmp_path: Path, docs_services: None) -> None:
    PagePlayer(page, tmp_path).play()


def test_pages_use_only_fences_the_test_knows() -> None:
    """Python must be tagged ``python`` to be run; other code is text, console, ini or yaml."""
    for page in PAGES:
        for block in blocks(page):
            assert block.language in {"python", "console", "text", "ini", "yaml"}, (
                f"{page.name}:{block.line}: tag code blocks python (run by this test), "
                f"or console, text, ini or yaml (not run): found {block.language!r}")
