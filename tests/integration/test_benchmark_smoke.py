"""The benchmark runs end to end with tiny batches: every scenario, every output, no failures."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

# The benchmark's own check, run by .ci/run as a part of its own: its -c 100 scenario takes
# up to 80 of PostgreSQL's connections, and it would load the machine under other tests.
pytestmark = pytest.mark.benchmark

SMOKE_ENV = {"BENCH_DATABASE": "postgres@127.0.0.1:5432/asyncsql_bench_smoke",
             "BENCH_BROKER": "redis://127.0.0.1:6379/9",
             "BENCH_BACKEND": "redis://127.0.0.1:6379/10"}


def test_benchmark_runs_every_scenario_and_writes_its_report(tmp_path):
    env = {**os.environ, **SMOKE_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tasks", "12", "--rounds", "1", "--out",
         str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads((tmp_path / "results.json").read_text())
    measured = {(row["scenario"], row["workload"]) for row in report["rows"]}
    expected = {(s["name"], w) for s in report["scenarios"] for w in s["workloads"]}
    assert measured == expected and len(report["scenarios"]) == 9
    for row in report["rows"]:
        assert row["failures"] == 0, row
        assert row["throughput"] > 0 and row["cpu_ms_per_task"] >= 0, row  # 10 ms CPU ticks
        assert row["ratio_to_baseline"] is not None, row
    peaks = {(r["scenario"], r["workload"]): r["peak_connections"] for r in report["rows"]}
    # One connection per slot on two children, within the default cap of 80.
    assert {peaks["asyncsql", w] for w in ("tiny", "orm", "io")} == {2}
    assert max(peaks["asyncsql-100", w] for w in ("tiny", "orm", "io")) <= 80
    assert {t["scenario"] for t in report["targets"]} == {"asyncsql", "asyncsql-100"}
    assert "| tiny | asyncsql |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "throughput.png").read_bytes().startswith(b"\x89PNG")


def test_loop_lag_measurement_runs_and_prints_its_figures():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.loop_lag", "--rounds", "1", "--seconds", "0.5",
         "--switch-intervals", "0.001"], cwd=ROOT, env={**os.environ, **SMOKE_ENV},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "publish from a coroutine: first call" in done.stdout, done.stdout
    lag = [line for line in done.stdout.splitlines() if line.startswith("| SELECT 1 per second")]
    assert lag and float(lag[0].split("|")[-2].strip().rstrip("x")) > 0, done.stdout


def test_remote_benchmark_runs_and_counts_one_script_call_per_result(tmp_path):
    """``benchmarks.remote`` end to end, one short round: every scenario, the command counts."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.remote", "--rounds", "1", "--tasks", "12",
         "--lag-seconds", "0.5", "--out", str(tmp_path)], cwd=ROOT,
        env={**os.environ, **SMOKE_ENV}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "remote.json").read_text())
    assert 0.5 < report["proxy_rtt_ms"] < 10, report["proxy_rtt_ms"]
    for row in report["rows"]:
        assert row["failures"] == 0 and row["throughput"] > 0, row
    per_task = report["commands_per_task"]
    assert (per_task["far"]["evalsha"], per_task["far"]["get"]) == (1.0, 0.0), per_task
    assert (per_task["far-sync"]["evalsha"], per_task["far-sync"]["get"]) == (0.0, 1.0)
    assert set(report["timer_lag"]) == {"lag", "lag+stores", "lag-sync", "lag-sync+stores"}
    assert "| tasks/s: far io vs near io |" in (tmp_path / "remote.md").read_text()
    assert (tmp_path / "remote.png").read_bytes().startswith(b"\x89PNG")


def test_broker_benchmark_runs_and_counts_fewer_round_trips_on_our_transport(tmp_path):
    """``benchmarks.broker`` end to end, one short round: every scenario, the command counts."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.broker", "--rounds", "1", "--tasks", "12",
         "--out", str(tmp_path)], cwd=ROOT, env={**os.environ, **SMOKE_ENV},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "broker.json").read_text())
    for row in report["rows"]:
        assert row["failures"] == 0 and row["throughput"] > 0, row
    per_task = report["commands_per_task"]
    assert per_task["far-100-stock"]["brpop"] >= 1 and per_task["far-100-stock"]["exec"] >= 2
    assert per_task["far-100"]["exec"] < 0.01 and per_task["far-100"]["brpop"] < 1, per_task
    assert "| tasks/s: far-100 io vs far-100-stock io |" in (tmp_path / "broker.md").read_text()
    assert (tmp_path / "broker.png").read_bytes().startswith(b"\x89PNG")


def test_peers_benchmark_runs_taskiq_and_dramatiq_beside_ours(tmp_path):
    """``benchmarks.peers`` end to end, one short round: three workers, both placements."""
    env = {**os.environ, **SMOKE_ENV, "BENCH_PEER_BROKER": "redis://127.0.0.1:6379/1",
           "BENCH_PEER_BACKEND": "redis://127.0.0.1:6379/13"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--rounds", "1", "--tasks", "50",
         "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "peers.json").read_text())
    measured = {(r["placement"], r["system"], r["workload"]) for r in report["rows"]}
    assert measured == {(p, s, w) for p in ("loopback", "far")
                        for s in ("asyncsql", "taskiq", "dramatiq") for w in ("noop", "io")}
    for row in report["rows"]:
        assert row["missing"] == 0 and row["tasks_per_s"] > 0, row
    assert "| far | io | taskiq |" in (tmp_path / "peers.md").read_text()
