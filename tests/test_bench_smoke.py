"""`make bench-smoke` inside the suite: the benchmark harness runs end to end at tiny sizes.

It asserts only that every scenario ran and that the results are well formed (JSON with the machine
recorded, rows with their repetitions and medians, a PNG chart, the under-attack rows), never a speed: speeds depend
on the machine and on whatever else runs on it. A system that cannot run here is reported as "skipped" or
"not available" by the bench itself; under CI a missing Mosquitto is an "error" and fails this test.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIO_VARIANTS = {("fanout", "burst"), ("fanout", "paced"), ("durable", "closed-loop"), ("durable", "pipelined"),
                     ("idle", "idle"), ("rooms", "mixed"), ("gc", "startup freeze only"), ("gc", "freeze policy"),
                     ("storm", "malloc defaults"), ("storm", "mmap threshold 1 MiB, 2 arenas")}
#: Metrics every measured row of a scenario carries, as numbers.
NUMERIC = {
    "fanout": ["deliveries_per_s", "cpu_us_per_delivery", "user_us_per_delivery", "sys_us_per_delivery",
               "p50_ms", "p99_ms", "p999_ms", "rss_kb", "server_util", "generator_util"],
    "durable": ["acked_per_s", "ack_p50_ms", "ack_p99_ms", "cpu_us_per_ack", "batch_mean", "server_util"],
    "idle": ["connections", "kb_per_connection", "idle_cpu_pct", "rss_kb"],
    "rooms": ["ops_per_s", "deliveries_per_s", "cpu_us_per_op", "p99_ms", "ack_p99_ms", "server_util"],
    "gc": ["connections", "storm_max_pause_ms", "service_max_pause_ms", "full_collections", "freezes", "p99_ms"],
    "storm": ["logins", "ready", "timed_out", "storm_s", "rss_growth_mb", "kb_per_connection", "cpu_ms_per_login"],
}


@pytest.mark.timeout(300)
def test_bench_smoke_runs_and_writes_well_formed_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Targets (issues 6 and 14)" in proc.stdout

    results = json.loads((tmp_path / "smoke.json").read_text())
    meta = results["meta"]
    for key in ("cpu", "cores", "python", "versions", "mosquitto", "sizes", "chorus_git", "date"):
        assert key in meta, key
    assert meta["sizes"]["reps"] == 1

    rows = results["rows"]
    assert {(r["scenario"], r["variant"]) for r in rows} == SCENARIO_VARIANTS
    for row in rows:
        where = f"{row['scenario']}/{row['variant']}/{row['system']}: {row['note']}"
        if row["system"].startswith("chorus"):
            assert row["status"] in ("ok", "not available"), where
        else:
            assert row["status"] in ("ok", "incomplete", "skipped", "not available"), where
        if row["status"] not in ("ok", "incomplete"):
            assert row["note"], where  # a row that did not run says why
            continue
        assert len(row["reps"]) == 1, where
        for key in NUMERIC[row["scenario"]]:
            value = row["median"][key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (where, key, value)
        if row["scenario"] == "fanout":
            limit = row["median"]["limit"]
            assert limit in ("server", "generator", "both", "neither", "neither (paced)") or \
                limit.startswith("other processes"), limit
    # Chorus over TCP must run every scenario: it is the system under test.
    chorus = {(r["scenario"], r["variant"]) for r in rows if r["system"] == "chorus-tcp" and r["status"] == "ok"}
    assert chorus == SCENARIO_VARIANTS

    assert len(results["targets"]) == 7
    assert all(t["met"] in (True, False, None) for t in results["targets"])

    # Under attack (issue 9, bench/attack.py): every attack ran against a live server, with numbers to judge.
    attack = results["attack"]
    assert [r["attack"] for r in attack["rows"]] == ["pong", "bigframe", "login", "slots", "timeouts"]
    for row in attack["rows"]:
        assert row["status"] == "ok", (row["attack"], row["note"])
        for window in ("baseline", "attack", "after"):
            assert math.isfinite(row["windows"][window]["p99_ms"]), (row["attack"], window)
        assert math.isfinite(row["ratio"]) and math.isfinite(row["rss_mb_per_1000"]), row["attack"]
        assert row["verdict"] in ("PASS", "FAIL")
    assert len(attack["targets"]) == 3 and "Targets (issue 9)" in proc.stdout
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
