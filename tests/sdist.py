"""A package's sdist from the index, checked against a pinned sha256, partly unpacked.

Celery's integration suite (``tests/celery_suite``) and kombu's Redis transport
tests (``tests/kombu_suite``) ship only in their sdists; both harnesses fetch
them here, so the check that the bytes are the pinned ones lives in one place.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path


def pinned_hash(pins: Path, version: str) -> str | None:
    """The sha256 ``pins`` (lines of ``version sha256``) gives for ``version``."""
    for line in pins.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[0] == version:
            return fields[1]
    return None


def fetch(package: str, version: str, cache: Path, pins: Path, keep: tuple[str, ...],
          unpinned: str) -> Path:
    """``package`` ``version``'s sdist members under ``keep`` (paths in the sdist's folder,
    a trailing ``/`` for a folder), unpacked into ``cache``; the folder they are in.

    Exits with ``unpinned`` when ``pins`` has no hash for ``version``, and when the
    downloaded file's hash is not the pinned one.
    """
    tree = cache / f"{package}-{version}"
    if all((tree / path).exists() for path in keep):
        return tree
    digest_pinned = pinned_hash(pins, version)
    if digest_pinned is None:
        sys.exit(unpinned)
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"{package}-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"{package}=={version}", "-d", str(cache)],
                       check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != digest_pinned:
        sdist.unlink()
        sys.exit(f"{sdist.name} has sha256 {digest}, not the {digest_pinned} {pins} pins: "
                 "not used.")
    prefix = f"{package}-{version}/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers()
                   if any(m.name == prefix + path or (path.endswith("/") and
                                                      m.name.startswith(prefix + path))
                          for path in keep)]
        archive.extractall(cache, members=members, filter="data")
    return tree
