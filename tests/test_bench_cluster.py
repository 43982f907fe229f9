"""`make bench-cluster --quick`: the cluster bench's whole path (assets, store, workers, router, open-loop load,
the router's metrics, a worker killed mid-run) on the CPU with a tiny model, so the GPU run does not rot."""

from __future__ import annotations

import json

import pytest

from benchmarks import cluster


@pytest.mark.slow
def test_quick_cluster_run_reports_every_setup_and_loses_nothing(tmp_path):
    out = tmp_path / "out"
    rc = cluster.main(["--quick", "--setups", "2,3", "--seconds", "2", "--rates", "4",
                       "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    report = json.loads((out / "cluster.json").read_text())
    assert rc == 0
    assert [r["setup"] for r in report["results"]] == ["2 workers, round-robin", "2 workers, affinity"]
    for r in report["results"]:
        assert r["sent"] > 0 and r["finished"] == r["sent"] and r["out_tok_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["cold_loads"] >= 1
    failover = report["failover"]
    assert failover["lost_before_first_token"] == 0 and failover["sent"] > 0
    assert failover["finished"] + failover["cut_mid_stream"] == failover["sent"]
