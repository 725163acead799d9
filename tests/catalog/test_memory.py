"""The memory catalog (adapters registered by name and path) and the catalog_type switch."""

import os
import shutil

import pytest
import torch

from loraplex.catalog import Catalog, CatalogDiff, MemoryCatalog, open_catalog
from loraplex.config import CatalogConfig
from loraplex.errors import AdapterChanged, AdapterNotFound, ConfigError, InvalidAdapter

from .helpers import edit_config, replace_file


def test_same_entries_and_ids_as_the_storage_catalog(catalog_dir):
    storage = Catalog(catalog_dir)
    mem = MemoryCatalog()
    diffs = []
    mem.subscribe(diffs.append)
    for name in storage.names():
        mem.register(name, catalog_dir / name)
    assert mem.names() == storage.names() and len(mem) == 3 and "beta-r8" in mem
    assert diffs == [CatalogDiff(added=(n,)) for n in storage.names()]
    for s in storage.entries():
        m = mem.get(s.name)
        # same files, same name: the same id and version, whichever catalog lists them
        assert (m.id, m.version, m.path, m.spec, m.weight_format, m.size_bytes) == \
            (s.id, s.version, s.path, s.spec, s.weight_format, s.size_bytes)
        assert mem.get_adapter_id(s.name) == s.id and mem.get_adapter_name(s.id) == s.name
        a, b = mem.load_tensors(s.name), storage.load_tensors(s.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registered_name_need_not_match_the_directory(catalog_dir):
    mem = MemoryCatalog()
    e = mem.register("customer-42", catalog_dir / "gamma-r16")
    assert e.name == "customer-42" and e.r == 16 and mem.local_path("customer-42") == str(catalog_dir / "gamma-r16")


def test_register_invalid_names_the_registered_name(tmp_path, catalog_dir):
    mem = MemoryCatalog()
    edit_config(catalog_dir / "beta-r8", use_dora=True)
    with pytest.raises(InvalidAdapter) as ei:
        mem.register("my-dora", catalog_dir / "beta-r8")
    assert str(ei.value) == "LoRA adapter 'my-dora' is invalid: DoRA (use_dora=true) is not supported"
    with pytest.raises(InvalidAdapter) as ei:
        mem.register("nowhere", tmp_path / "missing")
    assert str(ei.value) == f"LoRA adapter 'nowhere' is invalid: {tmp_path / 'missing'} is not a directory"
    os.remove(catalog_dir / "alpha-r4" / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter, match="'no-w' is invalid: missing adapter_model.safetensors"):
        mem.register("no-w", catalog_dir / "alpha-r4")
    assert len(mem) == 0 and mem.names() == []


def test_unregister_and_unknown(catalog_dir):
    mem = MemoryCatalog()
    mem.register("a", catalog_dir / "alpha-r4")
    held = mem.get("a")
    diffs = []
    mem.subscribe(diffs.append)
    mem.unregister("a")
    assert diffs == [CatalogDiff(removed=("a",))] and "a" not in mem
    with pytest.raises(AdapterNotFound) as ei:
        mem.get("a")
    assert str(ei.value) == "LoRA adapter 'a' not found in catalog <memory>"
    with pytest.raises(AdapterNotFound):
        mem.unregister("a")
    with pytest.raises(AdapterNotFound):
        mem.get_adapter_name(held.id)
    with pytest.raises(AdapterChanged):
        mem.load_adapter("a", held)


def test_reregister_and_refresh_give_new_versions(catalog_dir):
    mem = MemoryCatalog()
    old = mem.register("g", catalog_dir / "gamma-r16")
    edit_config(catalog_dir / "gamma-r16", lora_alpha=4)
    # files changed, not yet noticed: a read refuses rather than mixing versions
    with pytest.raises(AdapterChanged):
        mem.load_tensors("g")
    assert mem.refresh() == CatalogDiff(changed=("g",))
    new = mem.get("g")
    assert new.version != old.version and new.lora_alpha == 4.0 and new.id == old.id
    with pytest.raises(AdapterChanged):
        mem.load_adapter("g", old)
    assert mem.load_tensors("g")
    # re-registering from another directory is a change too
    assert mem.register("g", catalog_dir / "alpha-r4").r == 4
    assert mem.refresh() == CatalogDiff()


def test_refresh_drops_and_restores_a_broken_registration(catalog_dir):
    mem = MemoryCatalog()
    mem.register("b", catalog_dir / "beta-r8")
    cfg = (catalog_dir / "beta-r8" / "adapter_config.json").read_bytes()
    replace_file(catalog_dir / "beta-r8" / "adapter_config.json", b"[]")
    assert mem.refresh() == CatalogDiff(removed=("b",))
    assert mem.invalid() == {"b": "adapter_config.json must hold a JSON object"}
    with pytest.raises(InvalidAdapter, match="LoRA adapter 'b' is invalid"):
        mem.get("b")
    replace_file(catalog_dir / "beta-r8" / "adapter_config.json", cfg)
    assert mem.refresh() == CatalogDiff(added=("b",)) and mem.invalid() == {}


def test_memory_watch_polls(catalog_dir):
    from .helpers import wait_for

    mem = MemoryCatalog()
    mem.register("a", catalog_dir / "alpha-r4")
    seen = []
    with mem.watch(seen.append, interval=0.05) as w:
        assert not w.uses_events
        edit_config(catalog_dir / "alpha-r4", lora_alpha=2)
        assert wait_for(lambda: seen, timeout=10)
    assert seen[0] == CatalogDiff(changed=("a",)) and mem.get("a").lora_alpha == 2.0


def test_hugging_face_style_symlinks_are_followed(tmp_path, adapter_source):
    # A registered path is the operator's choice: snapshot files linking into ../../blobs are fine.
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_source / "alpha-r4" / f, blobs / f)
        os.symlink(f"../../blobs/{f}", snap / f)
    assert MemoryCatalog().register("hf", snap).r == 4


def test_catalog_config_types_are_exclusive(catalog_dir):
    with pytest.raises(ConfigError, match="mutually exclusive"):
        CatalogConfig(catalog_type="memory", catalog_path=str(catalog_dir))
    with pytest.raises(ConfigError, match="needs catalog_path"):
        CatalogConfig(catalog_type="storage")
    with pytest.raises(ConfigError, match="catalog_type must be one of"):
        CatalogConfig(catalog_type="s3")
    assert isinstance(open_catalog(CatalogConfig()), MemoryCatalog)
    cat = open_catalog(CatalogConfig(catalog_type="storage", catalog_path=str(catalog_dir)))
    assert isinstance(cat, Catalog) and cat.names() == ["alpha-r4", "beta-r8", "gamma-r16"]
    assert (Catalog.catalog_type, MemoryCatalog.catalog_type) == ("storage", "memory")
