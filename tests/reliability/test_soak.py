"""Churn soak, CI length (LORAPLEX_RELIABILITY_SOAK_S, default 30 s; bench/reliability.py runs the
long one): 32 adapters over 4 GPU slots and a host budget of 5, rewritten (atomically and in place)
every 15 ms while steps run, the catalog refreshes, adapters are pinned and unpinned and prefetched.
Zero mismatched rows, no stuck thread, budgets held, memory flat."""

from __future__ import annotations

import os

import pytest

from .soak import Soak

SOAK_S = float(os.environ.get("LORAPLEX_RELIABILITY_SOAK_S", "30"))
RSS_GROWTH = 96 << 20  # allocator arenas settle in the first seconds; a leak of slabs grows on and on


@pytest.fixture
def soak_env(monkeypatch):
    monkeypatch.setenv("LORAPLEX_BACKEND", "torch")  # the ops' torch path: the Triton interpreter is too slow


def test_churn_soak(soak_env, tmp_path, adapter_source):
    root = tmp_path / "soak"
    root.mkdir()
    bases = {b: str(adapter_source / b) for b in ("alpha-r4", "beta-r8", "gamma-r16")}
    soak = Soak(root, bases)
    r = soak.run(SOAK_S)
    summary = {k: v for k, v in r.items() if k != "rss_samples"}
    print(f"\nsoak: {summary}")
    assert not r["stuck_threads"], f"threads stuck (deadlock?): {r['stuck_threads']}"
    assert not r["failures"], r["failures"]
    assert r["mismatches"] == 0, summary
    assert r["requests"] >= 5 * SOAK_S and r["rows"] >= 50 * SOAK_S, summary  # it really ran
    assert r["rewrites_atomic"] + r["rewrites_in_place"] >= 10 * SOAK_S and r["host_evictions"] > 0, summary
    assert r["host_peak_bytes"] <= r["host_cache_bytes"]
    assert r["gpu_in_use_after"] == 0 and r["host_reserved_after"] == 0
    rss = [s[1] for s in r["rss_samples"]]
    half = len(rss) // 2
    assert half > 2 and max(rss[half:]) <= max(rss[:half]) + RSS_GROWTH, rss
    soak.rt.close()
