"""Profile a scenario's worker with py-spy while it runs one workload (``--profile``).

Writes the collapsed stacks (``profile-SCENARIO-WORKLOAD.txt``, loadable in
speedscope) and a summary of where the children's time goes
(``profile-SCENARIO-WORKLOAD.md``): the frames with the largest inclusive and
self share of samples, per thread.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .scenarios import Scenario
from .settings import BROKER_TRANSPORT
from .worker import running_worker

TOP = 30
# Where the per-task path starts: a child's event loop (or billiard's work loop
# under prefork), the worker's consumer loop in the parent.
WORK_LOOPS = ("BaseEventLoop._run_once (asyncio/", "Worker.workloop (billiard/",
              "asynloop (celery/worker/loops.py")


def record(scenario: Scenario, workload: str, tasks: int, out: Path) -> None:
    # scripts/benchmark runs the venv's python without activating the venv.
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    out.mkdir(parents=True, exist_ok=True)
    # BENCH_BROKER_TRANSPORT in the environment runs the worker on another transport.
    name = f"profile-{scenario.name}-{workload}{'-transport' if BROKER_TRANSPORT else ''}"
    stacks = out / f"{name}.txt"
    with running_worker(scenario, 0, out / "logs") as worker:
        worker.warm_up(workload)
        spy = subprocess.Popen([py_spy, "record", "--pid", str(worker.process.pid),
                                "--subprocesses", "--threads", "--rate", "200", "--format", "raw",
                                "--output", str(stacks)], stdout=subprocess.DEVNULL)
        try:
            worker.warm_up("noop")  # gives py-spy time to attach before the batch
            batch = worker.run_batch(workload, tasks, 0, timeout_s=60 + tasks / 5)
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    collapsed = stacks.read_text()
    children = _pids(collapsed) - {worker.process.pid}
    summary = (f"# Children\n\n{summarize(collapsed, children)}\n"
               f"# Parent (the worker's main process)\n\n"
               f"{summarize(collapsed, {worker.process.pid})}")
    transport = f", broker_transport {BROKER_TRANSPORT}" if BROKER_TRANSPORT else ""
    (out / f"{name}.md").write_text(
        f"# Profile: {scenario.summary}{transport}; {workload}, {tasks} tasks at "
        f"{batch.throughput:.0f} tasks/s\n\n{summary}")
    print(summary)


def _pids(collapsed: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"(?:^|;)process (\d+):", collapsed, re.M)}


def summarize(collapsed: str, pids: set[int]) -> str:
    """Inclusive and self sample shares per thread of the processes ``pids``.

    Inclusive shares count the frames below the work loop (``WORK_LOOPS``),
    where the per-task path starts.
    """
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        # With --subprocesses a child's stack starts with its ancestors' "process" frames.
        depth = 0
        while depth < len(frames) and frames[depth].startswith("process "):
            depth += 1
        if depth == 0 or len(frames) < depth + 2:
            continue
        if int(frames[depth - 1].split()[1].rstrip(":").split(":")[0]) not in pids:
            continue
        thread = _thread_name(frames[depth])
        count = int(count_text)
        totals[thread] += count
        frames = frames[depth + 1:]
        # Only the per-task path: what sits below the work loop.
        for start, frame in enumerate(frames):
            if frame.startswith(WORK_LOOPS):
                frames = frames[start + 1:] or [frame]
                break
        for frame in set(frames):
            inclusive[thread][_short(frame)] += count
        own[thread][_short(frames[-1])] += count
    sections = []
    for thread, total in totals.most_common():
        sections.append(f"## Thread {thread}: {total} samples\n")
        for title, counter in (("inclusive", inclusive[thread]), ("self", own[thread])):
            sections.append(f"| {title} % | frame |\n|---:|---|")
            sections += [f"| {100 * n / total:.1f} | `{frame}` |"
                         for frame, n in counter.most_common(TOP)]
            sections.append("")
    return "\n".join(sections) + "\n"


def _thread_name(frame: str) -> str:
    # "thread (21755): MainThread" -> "MainThread"
    return frame.rpartition(": ")[2] or frame


def _short(frame: str) -> str:
    # "fast_trace_task (celery/app/trace.py:651)" -> "fast_trace_task (celery/app/trace.py)"
    return re.sub(r":\d+\)$", ")", re.sub(r"\(/.*?/site-packages/", "(", frame))
