"""Keeping a catalog current: refresh() diffs, versions, consumers holding an old entry, watch()."""

import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.catalog import Catalog, CatalogDiff
from loraplex.errors import AdapterChanged, InvalidAdapter

from .helpers import edit_config, publish, python_opens, replace_file, wait_for


def test_nothing_changed(catalog_dir):
    cat = Catalog(catalog_dir)
    before = {e.name: e for e in cat.entries()}
    with python_opens() as opened:
        diff = cat.refresh()
    assert diff == CatalogDiff() and not diff
    assert all(cat.get(n) is e for n, e in before.items())  # the same objects: nothing rebuilt
    assert not [p for p in opened if p.startswith(str(catalog_dir))]  # stat only, no config re-read


def test_add_remove_change(catalog_dir, adapter_source):
    cat = Catalog(catalog_dir)
    seen = []
    cat.subscribe(seen.append)
    shutil.copytree(adapter_source / "alpha-r4", catalog_dir / "delta")
    shutil.rmtree(catalog_dir / "beta-r8")
    old = cat.get("gamma-r16")
    edit_config(catalog_dir / "gamma-r16", lora_alpha=64)
    with python_opens() as opened:
        diff = cat.refresh()
    assert diff == CatalogDiff(added=("delta",), removed=("beta-r8",), changed=("gamma-r16",))
    assert seen == [diff]
    # only what changed was read: its config, and its weights' header for the weights check
    read = sorted(os.path.relpath(p, catalog_dir) for p in opened if p.startswith(str(catalog_dir)))
    assert read == ["delta/adapter_config.json", "delta/adapter_model.safetensors",
                    "gamma-r16/adapter_config.json", "gamma-r16/adapter_model.safetensors"]
    new = cat.get("gamma-r16")
    assert new.version != old.version and new.key != old.key
    assert (old.lora_alpha, new.lora_alpha) == (32.0, 64.0)
    assert new.id == old.id  # same name, same id
    assert cat.names() == ["alpha-r4", "delta", "gamma-r16"]
    assert cat.get_adapter_name(cat.get_adapter_id("delta")) == "delta"


def _rewrite_weights(adapter_dir, scale):
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    t = {k: v * scale for k, v in load_file(path).items()}
    tmp = path + ".new"
    save_file(t, tmp)
    os.replace(tmp, path)
    return t


def test_consumer_holding_the_old_version(catalog_dir):
    cat = Catalog(catalog_dir)
    held = cat.get("alpha-r4")
    old_tensors = cat.load_tensors("alpha-r4", held)
    new_tensors = _rewrite_weights(catalog_dir / "alpha-r4", 2.0)
    # Not refreshed yet: a read for the held entry sees the files moved on and refuses.
    with pytest.raises(AdapterChanged) as ei:
        cat.load_tensors("alpha-r4")
    assert ei.value.old_version == held.version and ei.value.new_version not in (None, held.version)
    assert cat.refresh() == CatalogDiff(changed=("alpha-r4",))
    # The held entry is still the old version, and it never returns the new weights.
    assert cat.get("alpha-r4").version != held.version and held.lora_alpha == 8.0
    with pytest.raises(AdapterChanged, match="LoRA adapter 'alpha-r4' changed while it was read"):
        cat.load_adapter("alpha-r4", held)
    fresh = cat.load_tensors("alpha-r4")
    assert all(torch.equal(fresh[k], new_tensors[k]) for k in new_tensors)
    assert not all(torch.equal(fresh[k], old_tensors[k]) for k in old_tensors)


def test_removed_while_held(catalog_dir):
    cat = Catalog(catalog_dir)
    held = cat.get("beta-r8")
    shutil.rmtree(catalog_dir / "beta-r8")
    assert cat.refresh() == CatalogDiff(removed=("beta-r8",))
    with pytest.raises(AdapterChanged) as ei:
        cat.load_adapter("beta-r8", held)
    assert ei.value.new_version is None


def test_weights_deleted_under_the_catalog_is_a_change(catalog_dir):
    cat = Catalog(catalog_dir)
    os.remove(catalog_dir / "beta-r8" / "adapter_model.safetensors")
    with pytest.raises(AdapterChanged):
        cat.load_tensors("beta-r8")


def test_valid_to_invalid_and_back(catalog_dir):
    cat = Catalog(catalog_dir)
    cfg = (catalog_dir / "alpha-r4" / "adapter_config.json").read_bytes()
    replace_file(catalog_dir / "alpha-r4" / "adapter_config.json", b"{oops")
    assert cat.refresh() == CatalogDiff(removed=("alpha-r4",))
    assert list(cat.invalid()) == ["alpha-r4"]
    with pytest.raises(InvalidAdapter, match="LoRA adapter 'alpha-r4' is invalid: adapter_config.json is not valid"):
        cat.get("alpha-r4")
    replace_file(catalog_dir / "alpha-r4" / "adapter_config.json", cfg)
    assert cat.refresh() == CatalogDiff(added=("alpha-r4",))
    assert cat.invalid() == {}


def test_in_place_rewrite_with_a_new_size_is_a_new_version(catalog_dir):
    # Not every publisher renames: an in-place rewrite changes mtime and (here) size.
    cat = Catalog(catalog_dir)
    before = cat.get("gamma-r16").version
    with open(catalog_dir / "gamma-r16" / "adapter_config.json", "a") as f:
        f.write("\n")
    assert cat.refresh() == CatalogDiff(changed=("gamma-r16",)) and cat.get("gamma-r16").version != before


def test_a_failing_listener_does_not_stop_refresh(catalog_dir, adapter_source):
    cat = Catalog(catalog_dir)
    got = []
    cat.subscribe(lambda d: 1 / 0)
    cat.subscribe(got.append)
    shutil.copytree(adapter_source / "beta-r8", catalog_dir / "epsilon")
    assert cat.refresh().added == ("epsilon",) and got[0].added == ("epsilon",)


@pytest.mark.parametrize("events", [True, False], ids=["events", "polling"])
def test_watch(catalog_dir, adapter_source, events):
    cat = Catalog(catalog_dir)
    diffs, lock = [], threading.Lock()

    def on_diff(d):
        with lock:
            diffs.append(d)

    # With events the polling interval is far beyond the test's patience: only events can make it.
    w = cat.watch(on_diff, interval=120 if events else 0.1, events=events, rescan=120)
    try:
        assert w.uses_events is events
        publish(adapter_source / "alpha-r4", catalog_dir, "zeta")
        assert wait_for(lambda: "zeta" in cat, timeout=10)
        shutil.rmtree(catalog_dir / "zeta")
        assert wait_for(lambda: "zeta" not in cat, timeout=10)
        edit_config(catalog_dir / "beta-r8", lora_alpha=3)
        assert wait_for(lambda: cat.get("beta-r8").lora_alpha == 3.0, timeout=10)
    finally:
        w.stop()
    assert not w._thread.is_alive()
    with lock:
        added = [n for d in diffs for n in d.added]
        removed = [n for d in diffs for n in d.removed]
        changed = [n for d in diffs for n in d.changed]
    assert added == ["zeta"] and removed == ["zeta"] and changed == ["beta-r8"]
    # stopped: later changes are no longer picked up
    shutil.copytree(adapter_source / "alpha-r4", catalog_dir / "eta")
    assert not wait_for(lambda: "eta" in cat, timeout=0.5)


def test_reads_do_not_wake_the_watcher(catalog_dir):
    # Opening files (a consumer loading weights) is not a change; only the poll would refresh.
    cat = Catalog(catalog_dir)
    calls = []
    real = cat.refresh
    cat.refresh = lambda *names: calls.append(names) or real(*names)  # count them (the real one still runs)
    w = cat.watch(None, interval=120, events=True)
    try:
        for name in cat.names():
            cat.load_tensors(name)
        assert not wait_for(lambda: calls, timeout=0.6)
        edit_config(catalog_dir / "alpha-r4", lora_alpha=5)
        assert wait_for(lambda: calls, timeout=10)  # while a write does, and only its adapter is re-read
        assert calls[0] == ({"alpha-r4"},)
    finally:
        w.stop()


def test_refresh_of_named_adapters(catalog_dir, adapter_source):
    # What filesystem events drive: only the named directories are looked at.
    cat = Catalog(catalog_dir)
    edit_config(catalog_dir / "gamma-r16", lora_alpha=1)
    edit_config(catalog_dir / "beta-r8", lora_alpha=1)
    publish(adapter_source / "alpha-r4", catalog_dir, "theta")
    shutil.rmtree(catalog_dir / "alpha-r4")
    (catalog_dir / "bad:name").mkdir()
    diff = cat.refresh({"gamma-r16", "theta", "alpha-r4", "bad:name", ".theta.tmp", "never-existed"})
    assert diff == CatalogDiff(added=("theta",), removed=("alpha-r4",), changed=("gamma-r16",))
    assert cat.get("beta-r8").lora_alpha == 16.0  # not named: not looked at
    assert cat.invalid() == {"bad:name": "':' is not allowed (it could be read as a URL scheme)"}
    # a full refresh finds the rest, and agrees with a fresh listing
    assert cat.refresh() == CatalogDiff(changed=("beta-r8",))
    fresh = Catalog(catalog_dir)
    assert cat.entries() == fresh.entries() and cat.invalid() == fresh.invalid()
