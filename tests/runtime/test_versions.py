"""Versions: rewritten adapters are served new after a refresh; plans built before keep the old one."""

import shutil
import time

import pytest

from loraplex.errors import AdapterNotFound

from .helpers import Reference, check_plan, write_weights


def _rewrite(root, name, seed):
    w = root / name / "adapter_model.safetensors"
    write_weights(w, w, seed=seed)


def test_rewrite_then_refresh_serves_new_weights(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    cat = rt.catalog
    old = cat.get("a01").key
    with rt.step(["a01"]) as plan:
        check_plan(rt, plan, {old: Reference(cat, "a01")})
    _rewrite(many_dir, "a01", seed=7)
    diff = cat.refresh()
    assert diff.changed == ("a01",)
    new = cat.get("a01").key
    assert new != old and old not in rt.host and rt.slot_of("a01") is None
    with rt.step(["a01", "a02"], [2, 1]) as plan:
        assert plan.adapters["a01"][0] == new
        check_plan(rt, plan, {new: Reference(cat, "a01"), cat.get("a02").key: Reference(cat, "a02")})


def test_plan_started_before_keeps_its_version(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    cat = rt.catalog
    old_ref = Reference(cat, "a00")
    p_old = rt.plan(["a00", None], [3, 1])
    _rewrite(many_dir, "a00", seed=8)
    cat.refresh()
    new_ref = Reference(cat, "a00")
    p_new = rt.plan(["a00"], [2])
    assert p_old.adapters["a00"][1] != p_new.adapters["a00"][1]  # the old slot is still being read
    check_plan(rt, p_old, {old_ref.entry.key: old_ref})  # untouched by the new version's upload
    check_plan(rt, p_new, {new_ref.entry.key: new_ref})
    # only one slot left for others while both are held: the old one is not free yet
    assert rt.stats()["gpu"]["in_use"] == 2
    rt.release(p_old)
    p3 = rt.plan(["a05"])  # the stale slot is the first to be reused
    assert p3.adapters["a05"][1] == p_old.adapters["a00"][1]
    rt.release(p_new)
    rt.release(p3)
    assert old_ref.entry.key not in rt.host.keys()


def test_change_during_load_refreshes_and_retries(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    cat = rt.catalog
    stale = cat.get("a04").key
    _rewrite(many_dir, "a04", seed=9)  # the catalog has not seen it yet: the load raises AdapterChanged
    with rt.step(["a04"]) as plan:
        key = plan.adapters["a04"][0]
        assert key != stale and key == cat.get("a04").key
        check_plan(rt, plan, {key: Reference(cat, "a04")})
    assert stale not in rt.host.keys()


def test_stale_loads_are_not_kept(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2, load_workers=1)
    cat = rt.catalog
    names = [f"a{i:02d}" for i in range(8)]
    stale = cat.get("a07").key
    rt.ensure(names)  # a07 is queued behind seven loads on one worker
    _rewrite(many_dir, "a07", seed=10)
    cat.refresh()
    deadline = time.monotonic() + 20
    while rt.poll() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.ensure(names) == dict.fromkeys(names, "ready")
    assert stale not in rt.host.keys() and cat.get("a07").key in rt.host.keys()
    assert rt.stats()["host"]["reserved_bytes"] == 0


def test_removed_adapter(make_runtime, many_dir):
    rt = make_runtime(many_dir, max_loras=2)
    rt.release(rt.plan(["a03"]))
    shutil.rmtree(many_dir / "a03")
    rt.catalog.refresh()
    assert rt.host.keys() == [] and rt.slot_of("a03") is None
    with pytest.raises(AdapterNotFound):
        rt.plan(["a03"])
    assert rt.ensure(["a03"]) == {"a03": "failed"}
