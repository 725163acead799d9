"""Runtime end to end on CPU: plans against the fp32 reference of each adapter's own files."""

import json
import time
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry

import loraplex
from loraplex.errors import AdapterNotFound, CapacityError, InvalidAdapter

from .helpers import Reference, check_plan


def _refs(cat, names=None):
    return {cat.get(n).key: Reference(cat, n) for n in (names or cat.names())}


def test_public_import():
    assert loraplex.Runtime is loraplex.runtime.Runtime


def test_plan_matches_reference_per_token(make_runtime, catalog_dir):
    rt = make_runtime(catalog_dir, max_loras=4)
    refs = _refs(rt.catalog)
    names = ["alpha-r4", None, "beta-r8", "gamma-r16", "alpha-r4", None]
    tokens = [3, 2, 1, 4, 2, 0]
    with rt.step(names, tokens) as plan:
        assert plan.num_tokens == 12 and plan.max_active == 3
        assert plan.token_slots.tolist()[3:5] == [-1, -1]
        assert len(plan.request_slots) == 6 and plan.request_slots[1] == -1
        assert plan.request_slots[0] == plan.request_slots[4]
        ranks = plan.slot_ranks.tolist()
        assert [ranks[plan.adapters[n][1]] for n in ("alpha-r4", "beta-r8", "gamma-r16")] == [4, 8, 16]
        assert check_plan(rt, plan, refs) == 12 * len(rt.targets)
    assert rt.stats()["gpu"]["in_use"] == 0


@pytest.mark.parametrize("dtype,tol", [("float16", 3e-3), ("bfloat16", 2e-2)])
def test_plan_in_half_precision(make_runtime, catalog_dir, dtype, tol):
    rt = make_runtime(catalog_dir, max_loras=3, dtype=dtype)
    refs = _refs(rt.catalog)
    with rt.step(["gamma-r16", "beta-r8", "alpha-r4"], [2, 2, 2]) as plan:
        check_plan(rt, plan, refs, atol=1e-3, rtol=tol, row_tol=tol)


def test_hits_misses_and_lru_eviction(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    for n in ("a00", "a01", "a00", "a02"):  # a02 evicts a01 (a00 was used more recently)
        rt.release(rt.plan([n]))
    assert rt.slot_of("a00") is not None and rt.slot_of("a02") is not None and rt.slot_of("a01") is None
    s = rt.stats()
    assert (s["gpu"]["hits"], s["gpu"]["misses"], s["gpu"]["evictions"]) == (1, 3, 1)
    assert (s["host"]["hits"], s["host"]["misses"]) == (0, 3)
    rt.release(rt.plan(["a01"]))  # back from the host cache: a host hit, no storage read
    s = rt.stats()
    assert s["host"]["hits"] == 1 and s["loads_completed"] == 3


def test_too_many_adapters_for_the_slots(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    with pytest.raises(CapacityError, match="3 distinct LoRA adapters but there are only max_loras=2"):
        rt.plan(["a00", "a01", "a02"])
    rt.pin("a03")
    with pytest.raises(CapacityError, match="only 1 of max_loras=2 GPU slots are not pinned"):
        rt.plan(["a00", "a01"])
    rt.release(rt.plan(["a00", "a03"]))  # the pinned adapter itself is fine


def test_busy_slots_are_not_taken(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    p1 = rt.plan(["a00"])
    p2 = rt.plan(["a01"])
    with pytest.raises(CapacityError, match="no free GPU slot within"):
        rt.plan(["a02"], timeout=0.1)
    rt.release(p1)
    p3 = rt.plan(["a02"])
    assert p3.adapters["a02"][1] == p1.adapters["a00"][1]  # reused once released
    assert rt.slot_of("a01") == p2.adapters["a01"][1]
    rt.release(p2)
    rt.release(p3)
    rt.release(p3)  # idempotent


def test_ensure_poll_prefetch_load_many(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2, load_workers=2)
    st = rt.ensure(["a00", "a01", None, "nope"])
    assert st["nope"] == "failed" and isinstance(rt.error("nope"), AdapterNotFound)
    assert st["a00"] in ("loading", "ready")
    deadline = time.monotonic() + 20
    while rt.poll() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.ensure(["a00", "a01"]) == {"a00": "ready", "a01": "ready"}
    rt.prefetch(["a02"])
    assert rt.load_many(["a02", "a03", "a04"]) == {"a02": "ready", "a03": "ready", "a04": "ready"}
    s = rt.stats()
    assert s["host"]["entries"] == 5 and s["gpu"]["entries"] == 0 and s["loads_in_flight"] == 0
    loads = s["loads_completed"]
    rt.release(rt.plan(["a03"]))  # no storage read for a prefetched adapter
    assert rt.stats()["loads_completed"] == loads


def test_pins_survive_both_tiers(make_runtime, many_dir):
    probe = make_runtime(many_dir, targets=True)
    probe.load_many(["a00"])
    one = probe.stats()["host"]["bytes"]
    rt = make_runtime(many_dir, max_loras=2, host_cache_bytes=3 * one)  # a00/a03/a06... share a shape
    rt.pin("a00")
    assert rt.pinned() == ["a00"] and rt.stats()["gpu"]["pinned"] == 1
    for n in ("a03", "a06", "a09", "a03"):
        rt.release(rt.plan([n]))
    assert rt.slot_of("a00") is not None and ("a00", rt.catalog.get("a00").version) in rt.host
    assert rt.stats()["host"]["evictions"] >= 1
    rt.unpin("a00")
    for n in ("a06", "a09"):
        rt.release(rt.plan([n]))
    assert rt.slot_of("a00") is None
    with pytest.raises(AdapterNotFound):
        rt.pin("nope")


def test_set_cache_policy_lfu(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    rt.set_cache_policy("lfu")
    for _ in range(5):
        rt.release(rt.plan(["a00"]))
    rt.release(rt.plan(["a01"]))
    rt.release(rt.plan(["a02"]))  # LFU evicts a01 (used once), where LRU would evict a00
    assert rt.slot_of("a00") is not None and rt.slot_of("a01") is None
    rt.set_cache_policy("lru", tier="gpu")
    assert rt.pool.policy.name == "lru" and rt.host.policy.name == "lfu"
    with pytest.raises(ValueError):
        rt.set_cache_policy("lru", tier="disk")


def test_failing_loads_fail_only_their_requests(make_runtime, catalog_dir):
    rt = make_runtime(catalog_dir, max_loras=3)
    refs = _refs(rt.catalog, ["alpha-r4"])
    wfile = catalog_dir / "beta-r8" / "adapter_model.safetensors"
    with open(wfile, "r+b") as f:  # a NaN in a lora_B: the header is fine (the catalog lists it), the load fails
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        key = next(k for k in sorted(header) if k.endswith("lora_B.weight"))
        f.seek(8 + n + header[key]["data_offsets"][0])
        f.write(b"\xff" * 4)
    rt.catalog.refresh()
    assert "beta-r8" in rt.catalog.names()
    for _ in range(2):  # fails every time, caches nothing
        with pytest.raises(InvalidAdapter, match="beta-r8.*NaN"):
            rt.plan(["beta-r8"])
    with rt.step(["alpha-r4", None], [2, 1]) as plan:
        check_plan(rt, plan, refs)
    assert rt.ensure(["beta-r8"]) == {"beta-r8": "failed"}
    assert isinstance(rt.error("beta-r8"), InvalidAdapter)
    (catalog_dir / "gamma-r16" / "adapter_model.safetensors").unlink()  # not refreshed yet
    with pytest.raises(InvalidAdapter, match="gamma-r16.*missing adapter_model"):
        rt.plan(["gamma-r16"])  # AdapterChanged -> refresh -> the catalog's own verdict
    s = rt.stats()
    assert s["host"]["entries"] == 1 and s["gpu"]["in_use"] == 0 and s["loads_failed"] >= 3
    with rt.step(["alpha-r4"]) as plan:
        check_plan(rt, plan, refs)


def test_rank_above_max_rank_fails_clearly(make_runtime, catalog_dir):
    rt = make_runtime(catalog_dir, max_loras=2, max_rank=8)
    with pytest.raises(InvalidAdapter, match="gamma-r16.*larger than max_rank=8"):
        rt.plan(["gamma-r16"])
    rt.release(rt.plan(["beta-r8"]))


def test_metrics(make_runtime, many_dir):
    reg = CollectorRegistry()
    rt = make_runtime(many_dir, max_loras=2, registry=reg)
    for n in ("a00", "a01", "a00", "a02"):
        rt.release(rt.plan([n]))
    rt.pin("a00")
    m = rt.metrics
    assert m.value("loraplex_cache_hits_total", tier="gpu") == 2
    assert m.value("loraplex_cache_misses_total", tier="gpu") == 3
    assert m.value("loraplex_cache_misses_total", tier="host") == 3
    assert m.value("loraplex_cache_evictions_total", tier="gpu") == 1
    assert m.value("loraplex_load_seconds_count", phase="read") == 3
    assert m.value("loraplex_load_seconds_count", phase="pack") == 3
    assert m.value("loraplex_load_seconds_count", phase="upload") == 3
    assert m.value("loraplex_upload_bytes_total") > 0
    assert m.value("loraplex_gpu_slots_occupied") == 2 and m.value("loraplex_pinned_adapters") == 1
    assert m.value("loraplex_host_cache_bytes") == rt.stats()["host"]["bytes"] > 0
    from loraplex.runtime import start_metrics_server

    server, thread = start_metrics_server(0, "127.0.0.1", registry=reg)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'loraplex_cache_hits_total{tier="gpu"} 2.0' in body
    make_runtime(many_dir, max_loras=2)  # a second runtime registers without colliding


def test_targets_must_match_config(make_runtime, catalog_dir):
    from loraplex.errors import ConfigError
    from loraplex.runtime import LoraTarget, SliceSpec

    rt = make_runtime(catalog_dir, targets=False, max_loras=2)
    with pytest.raises(ConfigError, match="max_loras=3"):
        rt.register_target(LoraTarget("x", [SliceSpec("lm_head", 64, 256)], "linear", 3, 16, torch.float32))
    rt.new_target("lm_head", [("lm_head", 64, 256)])
    with pytest.raises(ConfigError, match="already registered"):
        rt.new_target("lm_head2", [("lm_head", 64, 256)])
    with pytest.raises(InvalidAdapter, match="none of its modules"):
        rt.plan(["gamma-r16"])
    refs = _refs(rt.catalog, ["beta-r8"])
    with rt.step(["beta-r8"]) as plan:
        check_plan(rt, plan, refs)


@pytest.mark.parametrize("where", ["take_plan_set", "build"])
def test_plan_failing_after_acquire_gives_the_slots_back(make_runtime, catalog_dir, monkeypatch, where):
    rt = make_runtime(catalog_dir, max_loras=2)
    rt.release(rt.plan(["alpha-r4", "beta-r8"]))  # resident: the failing plan takes hits only

    def fail(*a, **kw):
        raise MemoryError("injected")

    if where == "build":
        monkeypatch.setattr(rt.steps.primary.buffers, "build", fail)
    else:
        monkeypatch.setattr(rt.steps, "take_plan_set", fail)
    with pytest.raises(MemoryError):
        rt.plan(["alpha-r4", "beta-r8"])
    assert rt.stats()["gpu"]["in_use"] == 0
    monkeypatch.undo()
    with rt.step(["beta-r8", None], [1, 2]) as plan:  # the plan buffers are usable again
        assert plan.token_slots.tolist() == [plan.adapters["beta-r8"][1], -1, -1]
