"""The cluster bench (bench/cluster_bench.py, issue 11) runs end to end at tiny sizes against real PostgreSQL and Redis.

It asserts that every scenario ran in every configuration and that the results are well formed (JSON with the
machine recorded, rows with their repetitions and medians, the markdown tables), never a speed. Without
PostgreSQL, Redis or the node-mode modules it skips, except under CI=true, where that is a failure.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import service_required

from bench import cluster_bench

REPO = Path(__file__).resolve().parent.parent
#: Numbers every measured row of a scenario carries (net figures are differences of noisy readings: any sign).
SIGNED = {"net_cpu_us_per_conn_per_s", "services_us_per_conn_per_s"}
NUMERIC = {
    "scale": ["connections", "kb_per_connection", "net_cpu_us_per_conn_per_s", "services_us_per_conn_per_s",
              "rss_kb"],
    "fanout": ["deliveries_per_s", "cpu_us_per_delivery", "with_services_us_per_delivery", "p50_ms", "p99_ms",
               "busiest_node_util", "machine_util", "redis_cpu_s", "postgresql_cpu_s"],
    "durable": ["acked_per_s", "ack_p50_ms", "ack_p99_ms", "cpu_us_per_ack", "with_services_us_per_ack",
                "busiest_node_util"],
}


@pytest.mark.timeout(180)
def test_cluster_bench_smoke_runs_every_scenario_and_writes_well_formed_results(tmp_path):
    problem = cluster_bench.node_mode_problem()
    if problem:
        service = "redis" if "Redis" in problem or "coredis" in problem or "redisbroker" in problem else "postgresql"
        service_required(service, problem)
    proc = subprocess.run([sys.executable, "-m", "bench.cluster_bench", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Connections at scale" in proc.stdout and "Cross-node fan-out" in proc.stdout

    results = json.loads((tmp_path / "cluster-smoke.json").read_text())
    meta = results["meta"]
    for key in ("cpu", "cores", "sizes", "chorus_git", "date", "command", "node_flags"):
        assert key in meta, key
    assert meta["node_mode"] == "available"
    sizes = cluster_bench.SMOKE
    expected = {("scale", f"{sizes.scale_nodes} nodes")}
    for scenario, counts in (("fanout", sizes.fanout_nodes), ("durable", sizes.durable_nodes)):
        expected |= {(scenario, "SQLite, 1 process")} | {(scenario, f"{n} node{'s' * (n > 1)}") for n in counts}
    rows = results["rows"]
    assert {(r["scenario"], r["system"]) for r in rows} == expected
    for row in rows:
        where = f"{row['scenario']}/{row['system']}: {row['note']}"
        assert row["status"] == "ok", where
        assert len(row["reps"]) == 1, where
        for key in NUMERIC[row["scenario"]]:
            value = row["median"][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (where, key, value)
            assert value >= 0 or key in SIGNED, (where, key, value)
    scale = next(r for r in rows if r["scenario"] == "scale")
    assert scale["connect"]["ready"] == sizes.scale_conns
    assert scale["resume"][0]["ready"] == sizes.scale_conns
    markdown = (tmp_path / "cluster-smoke.md").read_text()
    assert "| nodes |" in markdown and cluster_bench.END_OF_TABLES in markdown
