"""Run kombu's own Redis transport unit tests against ``celery_asyncpool.broker``.

``scripts/kombu-suite`` calls this. For the kombu version installed (the one
the project pins) it fetches that version's sdist, checks it against the hash
in ``sdists.txt``, unpacks ``t/`` and runs ``t/unit/transport/test_redis.py``
twice: on kombu's own classes, then with ``plugin.py`` putting the package's
subclasses in their place. Every test that passes on kombu's classes must pass
on ours, but for those ``CHANGED`` lists: each tests a behaviour the transport
changes on purpose (docs/broker.md), and says which; on ours they run as expected
failures with that reason, and one that passes fails the run (take it out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import kombu

from tests import sdist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache" / "kombu-suite"
SUITE = "t/unit/transport/test_redis.py"
FAKE = ("the suite's fake Redis client (Client in test_redis.py) answers kombu's own "
        "commands only: a script call comes back as None")
CHANGED = {
    "test_Channel::test_brpop_start_sends_keys_and_timeout":
        "messages are asked for with the fetch script; BRPOP only after a short fetch",
    "test_Channel::test_brpop_start_prefixes_keys":
        "as above: the script's keys carry the prefix, asserted on a BRPOP here",
    "test_MultiChannelPoller::test_qos_reject":
        "a reject without requeue goes out with the pass's acks, in the ack script, not "
        "through QoS._remove_from_indices",
    "test_Redis::test_publish__consume": FAKE,
    "test_PausedBRPOP::test_removing_paused_channel_preserves_another[discard]": FAKE,
    "test_PausedBRPOP::test_removing_paused_channel_preserves_another[disconnect]": FAKE,
}


def fetch(version: str) -> Path:
    """kombu ``version``'s ``t/`` and ``setup.cfg`` (its pytest settings, which make the
    tree pytest's rootdir), unpacked from its checked sdist."""
    return sdist.fetch(
        "kombu", version, CACHE, HERE / "sdists.txt", ("t/", "setup.cfg"),
        unpinned=f"kombu-suite: kombu {version} is installed, but tests/kombu_suite/sdists.txt "
        f"has no sha256 for its sdist. Add '{version} <sha256>' (pip download --no-deps "
        f"--no-binary :all: kombu=={version}; sha256sum the file), then check CHANGED.")


def run(tree: Path, transport: str, extra: list[str]) -> dict[str, str]:
    """Each test's outcome with ``transport`` ('kombu' or 'ours')."""
    results = CACHE / f"results-{transport}.json"
    results.unlink(missing_ok=True)
    env = {**os.environ, "KOMBU_SUITE_TRANSPORT": transport, "KOMBU_SUITE_RESULTS": str(results),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(tree)])}
    subprocess.run([sys.executable, "-m", "pytest", SUITE, "-p", "tests.kombu_suite.plugin",
                    "-p", "no:cacheprovider", "-q", "-rf", "--no-header", *extra],
                   cwd=tree, env=env, check=False)
    if not results.exists():
        sys.exit(f"kombu-suite: the run on {transport}'s classes wrote no results")
    outcomes: dict[str, str] = json.loads(results.read_text())
    return {nodeid.split("::", 1)[1]: outcome for nodeid, outcome in outcomes.items()}


def main() -> int:
    started = time.monotonic()
    tree = fetch(kombu.__version__)
    stock, ours = (run(tree, transport, sys.argv[1:]) for transport in ("kombu", "ours"))
    held = [test for test, outcome in stock.items() if outcome == "passed"]
    broken = [test for test in held if ours.get(test) != "passed" and test not in CHANGED]
    stale = [test for test in CHANGED if ours.get(test) in ("passed", "xpassed")]
    missed = [test for test in CHANGED if ours.get(test) not in ("xfailed", "passed", "xpassed")]
    for test in broken:
        print(f"kombu-suite: passed on kombu's classes, {ours.get(test, 'not run')} on ours: "
              f"{test}")
    for test in stale:
        print(f"kombu-suite: {test} now passes on ours: take it out of CHANGED")
    for test in missed:
        print(f"kombu-suite: {test} in CHANGED ran as {ours.get(test, 'not run')} on ours, "
              "not as an expected failure: check its name and CHANGED")
    passed = sum(outcome == "passed" for outcome in ours.values())
    print(f"=== kombu-suite: kombu {kombu.__version__} {SUITE}: {len(held)} pass on kombu's "
          f"classes; on ours {passed} pass, {len(CHANGED)} changed on purpose, "
          f"{len(broken)} broken; {time.monotonic() - started:.0f} s")
    return 1 if broken or stale or missed or not held else 0


if __name__ == "__main__":
    sys.exit(main())
