"""The benchmark's smoke run: ``bench.py --quick`` on a small subset writes the JSON it promises.

The figures of a smoke run mean little (one repeat, small counts, a busy machine); what is
checked is that every workload in the subset ran, that zchat ended with nothing missing
after gap repair, and that the ratios against the baseline and the targets are there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench import peers, report
from bench.cases import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_bench_writes_the_promised_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--only", "throughput,latency,store",
           "--shapes", "1", "--latency-subscribers", "1", "--servers", "baseline,zchat-memory", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=80, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "targets" in proc.stdout

    results = json.loads(out.read_text())
    assert {"machine", "settings", "throughput", "latency", "store", "targets", "seconds"} <= results.keys()
    for row in results["throughput"] + results["latency"]:
        assert "error" not in row, row
    throughput = {row["server"]: row for row in results["throughput"]}
    assert set(throughput) == {"baseline", "zchat-memory"}
    zchat = throughput["zchat-memory"]
    for key in ("accepted_per_s", "delivered_per_s_sub", "loss_before", "server_cpu_s", "accepted_per_s_vs_baseline",
                "delivered_per_s_sub_vs_baseline", "repeats"):
        assert zchat[key] is not None, key
    assert zchat["worst_loss_after"] == 0
    assert zchat["fastpath_mismatches"] == 0
    assert throughput["baseline"]["loss_after"] is None  # the baseline has no history to repair from

    latency = {row["server"]: row for row in results["latency"]}
    assert latency["zchat-memory"]["samples"] > 0
    assert latency["zchat-memory"]["p99_ms"] >= latency["zchat-memory"]["p50_ms"] > 0
    assert latency["zchat-memory"]["p99_ms_vs_baseline"] is not None

    store = results["store"]
    assert store["store"]["messages"] == 20_000
    assert store["empty"]["idle_rss_mb"] > 0
    assert store["big"]["last50_p99_ms"] > 0
    assert store["writes"]["library_us"] > 0 and store["writes"]["random_us"] > 0
    assert {t["target"].split(" ")[0] for t in results["targets"]} >= {"idle", "ready", "last-50"}


def test_peers_are_skipped_with_a_note_when_their_servers_are_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no redis-server, no nats-server
    monkeypatch.setattr(peers, "SBIN", ())
    found = peers.check()
    assert set(found["skipped"]) == {"redis", "nats"}
    assert "redis-server is not on PATH" in found["skipped"]["redis"]
    assert found["versions"] == {}
    settings = Settings(repeat=1)
    throughput = peers.throughput(settings, tuple(found["versions"]))  # nothing to run, nothing started
    latency = peers.latency(settings, tuple(found["versions"]), (1,))
    assert throughput == latency == []

    results = {"machine": report.machine(), "settings": {"window": 100}, "throughput": throughput,
               "latency": latency, "peers": found}
    results["targets"] = report.targets(results)
    report.print_all(results)
    out = capsys.readouterr().out
    assert "zchat vs Redis pub/sub and NATS" in out
    assert "redis: skipped: redis-server is not on PATH" in out
    assert "nats: skipped: nats-server is not on PATH" in out


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(bool(peers.unavailable()), reason="redis-server, nats-server or their Python clients missing")
def test_quick_bench_with_peers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--peers", "--only", "throughput,latency",
           "--shapes", "1", "--latency-subscribers", "1", "--servers", "zchat-sqlite", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=80, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zchat vs Redis pub/sub and NATS" in proc.stdout

    results = json.loads(out.read_text())
    assert results["peers"]["skipped"] == {}
    for workload, key in (("throughput", "delivered_per_s_sub"), ("latency", "p99_ms")):
        rows = {row["server"]: row for row in results[workload]}
        assert set(rows) == {"zchat-sqlite", "redis", "nats"}
        for name in ("redis", "nats"):
            assert "error" not in rows[name], rows[name]
            assert rows[name]["loss_before"] == 0
            assert rows[name][key] > 0
            assert rows[name][f"{key}_zchat_vs_peer"]["zchat-sqlite"] > 0
    assert sum("1.5x what" in t["target"] for t in results["targets"]) == 2


@pytest.mark.timeout(60)
def test_bare_rss_measures_a_bare_server_with_clients() -> None:
    """bench/bare_rss.py (the floor under the scale case's RSS) runs and reports its figures."""
    cmd = [sys.executable, str(ROOT / "bench" / "bare_rss.py"), "--clients", "40"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=50, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("bare ROUTER + XPUB, 40 clients") and "after 10 rounds" in line, line
