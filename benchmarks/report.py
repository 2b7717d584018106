"""Turn the batches of one run into medians, same-round ratios, target checks, Markdown, JSON and a chart."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from .scenarios import BASELINE, WORKLOADS, Scenario
from .worker import Batch


@dataclass(frozen=True)
class Target:
    """``scenario`` on ``workload`` against ``versus`` on ``versus_workload``: its throughput
    at least ``bound`` times theirs, or (``metric="peak_pss_mb"``) its memory at most that."""

    scenario: str
    workload: str
    versus: str
    versus_workload: str
    bound: float
    metric: str = "throughput"

    def met(self, ratio: float) -> bool:
        return ratio >= self.bound if self.metric == "throughput" else ratio <= self.bound


# -P asyncsql -c 2 (one task per child), then many tasks per child on the I/O-bound task.
TARGETS = (
    Target("asyncsql", "tiny", "hand-loop", "tiny", 1.0),
    Target("asyncsql", "orm", "hand-loop", "orm", 1.0),
    Target("asyncsql", "tiny", "sync-psycopg", "tiny", 0.9),
    Target("asyncsql", "orm", "sync-psycopg", "orm", 0.9),
    Target("asyncsql", "tiny", "prefork-noop", "noop", 0.6),
    Target("asyncsql", "noop", "prefork-noop", "noop", 0.95),
    Target("asyncsql-100", "io", "common", "io", 6.0),
    Target("asyncsql-100", "io", "threads-8", "io", 3.0),
    Target("asyncsql-100", "io", "prefork-noop", "noop", 0.7),
    Target("asyncsql-100", "io", "common", "io", 1.5, metric="peak_pss_mb"),
)


class Run:
    """Every batch of one run, looked up by scenario, workload and round."""

    def __init__(self, scenarios: tuple[Scenario, ...], batches: list[Batch]) -> None:
        self.scenarios = scenarios
        self.batches = batches
        self._by_key = {(b.scenario, b.workload, b.round): b for b in batches}
        self.rounds = sorted({b.round for b in batches})

    def of(self, scenario: str, workload: str) -> list[Batch]:
        return [b for b in self.batches if (b.scenario, b.workload) == (scenario, workload)]

    def ratio(self, scenario: str, workload: str, versus: str, versus_workload: str,
              metric: str = "throughput") -> float | None:
        """The median over rounds of the ratio of ``metric`` measured within each round."""
        ratios = []
        for round_ in self.rounds:
            mine = self._by_key.get((scenario, workload, round_))
            theirs = self._by_key.get((versus, versus_workload, round_))
            if mine and theirs:
                ratios.append(getattr(mine, metric) / getattr(theirs, metric))
        return statistics.median(ratios) if ratios else None

    def rows(self) -> list[dict[str, object]]:
        rows = []
        for workload in WORKLOADS:
            for scenario in self.scenarios:
                batches = self.of(scenario.name, workload)
                if not batches:
                    continue
                baseline = BASELINE[workload]
                rows.append({
                    "workload": workload,
                    "scenario": scenario.name,
                    "rounds": len(batches),
                    "tasks_per_round": batches[0].tasks,
                    "throughput": statistics.median(b.throughput for b in batches),
                    "ratio_to_baseline": self.ratio(scenario.name, workload, baseline, workload),
                    "baseline": baseline,
                    "failures": sum(b.failures for b in batches),
                    "peak_connections": max(b.peak_connections for b in batches),
                    "children": {"threads": 1, "asyncsql": 2}.get(scenario.pool,
                                                                  scenario.concurrency),
                    "peak_pss_mb": statistics.median(b.peak_pss_mb for b in batches),
                    "cpu_ms_per_task": statistics.median(b.cpu_ms_per_task for b in batches),
                })
        return rows

    def targets(self) -> list[dict[str, object]]:
        checks = []
        for target in TARGETS:
            ratio = self.ratio(target.scenario, target.workload, target.versus,
                               target.versus_workload, target.metric)
            if ratio is not None:
                checks.append({**asdict(target), "ratio": ratio, "met": target.met(ratio)})
        return checks


def machine() -> str:
    memory_gib = psutil.virtual_memory().total / 2**30
    return (f"{platform.node()}: {psutil.cpu_count()} CPUs, {memory_gib:.0f} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def write(run: Run, out: Path, settings: dict[str, object]) -> None:
    """``results.md``, ``results.json`` and ``throughput.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    document = {"date": when, "machine": machine(), "settings": settings,
                "scenarios": [asdict(s) for s in run.scenarios], "rows": run.rows(),
                "targets": run.targets(), "batches": [asdict(b) for b in run.batches]}
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "results.md").write_text(markdown(run, when, settings))
    chart(run, out / "throughput.png", when)


def markdown(run: Run, when: str, settings: dict[str, object]) -> str:
    lines = [f"# Benchmark results, {when}", "", f"Machine: {machine()}.", "",
             f"Run: `{settings['command']}`; {len(run.rounds)} interleaved rounds; "
             "figures are medians over rounds. Each ratio is taken within a round, to the "
             "baseline measured in that same round (`common` for the database workloads, "
             "`prefork-noop` for `noop`), then the median is quoted.", "",
             "| workload | scenario | tasks/s | ratio | failures | peak PG conns "
             "| peak PSS MB | CPU ms/task |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in run.rows():
        ratio = row["ratio_to_baseline"]
        lines.append(
            f"| {row['workload']} | {row['scenario']} | {row['throughput']:.0f} "
            f"| {'' if ratio is None else f'{ratio:.2f}x'} | {row['failures']} "
            f"| {row['peak_connections']} | {row['peak_pss_mb']:.0f} "
            f"| {row['cpu_ms_per_task']:.2f} |")
    targets = run.targets()
    if targets:
        lines += ["", "## Targets", "", "| check | ratio | target | met |", "|---|---:|---:|---|"]
        for t in targets:
            what = "tasks/s" if t["metric"] == "throughput" else "peak PSS"
            bound = f"{'>=' if t['metric'] == 'throughput' else '<='} {t['bound']}x"
            lines.append(f"| {what}: {t['scenario']} {t['workload']} vs {t['versus']} "
                         f"{t['versus_workload']} | {t['ratio']:.2f}x | {bound} "
                         f"| {'yes' if t['met'] else 'NO'} |")
    lines += ["", "## Scenarios", ""]
    lines += [f"- `{s.name}`: {s.summary}." for s in run.scenarios]
    return "\n".join(lines) + "\n"


def chart(run: Run, path: Path, when: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run.rows()
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    figure, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 4),
                                squeeze=False)
    for axis, workload in zip(axes[0], workloads):
        mine = [r for r in rows if r["workload"] == workload]
        names = [str(r["scenario"]) for r in mine]
        values = [float(r["throughput"]) for r in mine]  # type: ignore[arg-type]
        colours = ["tab:green" if n.startswith("asyncsql") else "tab:grey" for n in names]
        axis.barh(names, values, color=colours)
        axis.invert_yaxis()
        axis.set_title(f"{workload}: tasks/s")
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:.0f}", va="center", fontsize=8)
        axis.set_xlim(0, max(values) * 1.25)
    figure.suptitle(f"Celery throughput per scenario (medians, {when})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
