"""Catalog on s3:// against a real S3-compatible server (moto) on loopback: listing, versions,
verified downloads, refresh, outages, the disk cache budget, and URL / name safety."""

from __future__ import annotations

import os
import re
import threading
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.catalog import Catalog
from loraplex.catalog.peft import MAX_CONFIG_BYTES
from loraplex.catalog.remote import RemoteStore, default_cache_dir
from loraplex.errors import (
    AdapterChanged,
    AdapterNotFound,
    CapacityError,
    CatalogError,
    InvalidAdapterName,
    StorageError,
)

from .s3server import S3Server, free_port, upload_dir

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def url(s3, adapter_source):
    """A fresh bucket holding the three conftest adapters under adapters/."""
    bucket = f"lp-{uuid.uuid4().hex[:12]}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    upload_dir(client, bucket, "adapters", adapter_source)
    return f"s3://{bucket}/adapters"


def open_remote(s3, url, tmp_path, **kw) -> Catalog:
    return Catalog(url, cache_dir=tmp_path / "cache", storage_options=s3.storage_options(), **kw)


def put(s3, url, key, body: bytes) -> None:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)


def materialized(cache) -> dict[str, list[str]]:
    """name -> version dirs on disk (hidden temp/config dirs excluded)."""
    out = {}
    for name in sorted(os.listdir(cache)):
        if not name.startswith(".") and os.listdir(cache / name):
            out[name] = sorted(os.listdir(cache / name))
    return out


def disk_bytes(cache) -> int:
    """Bytes of every materialized version: what cache_bytes bounds."""
    return sum(os.path.getsize(os.path.join(d, f)) for n in materialized(cache)
               for d, _, files in os.walk(cache / n) for f in files)


def scaled_weights(adapter_source, name, tmp_path, factor=2.0) -> tuple[bytes, dict]:
    tensors = {k: v * factor for k, v in load_file(adapter_source / name / WEIGHTS).items()}
    path = tmp_path / f"{name}-x{factor}.safetensors"
    save_file(tensors, path)
    return path.read_bytes(), tensors


def test_lists_like_the_local_catalog_without_downloading_weights(s3, url, tmp_path, adapter_source):
    remote, local = open_remote(s3, url, tmp_path), Catalog(adapter_source)
    assert remote.names() == local.names() == ["alpha-r4", "beta-r8", "gamma-r16"]
    for r, lo in zip(remote.entries(), local.entries(), strict=True):
        assert (r.id, r.spec, r.weight_format, r.size_bytes) == (lo.id, lo.spec, lo.weight_format, lo.size_bytes)
        assert r.version.count("+") == 1 and r.path.startswith(str(tmp_path / "cache" / r.name))
    assert remote.invalid() == {} and remote.root == url
    assert materialized(tmp_path / "cache") == {}  # listing reads configs only
    assert not remote.refresh()


def test_loads_the_same_tensors_as_the_local_files(s3, url, tmp_path, adapter_source):
    remote, local = open_remote(s3, url, tmp_path), Catalog(adapter_source)
    for name in remote.names():
        got, want = remote.load_tensors(name), local.load_tensors(name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        path = remote.local_path(name)
        assert path == remote.get(name).path and os.stat(os.path.join(path, WEIGHTS)).st_mode & 0o222 == 0
    assert sorted(os.listdir(tmp_path / "cache" / ".tmp")) == []


def test_changed_adapter_serves_the_new_version_only(s3, url, tmp_path, adapter_source):
    cat = open_remote(s3, url, tmp_path)
    old = cat.get("alpha-r4")
    cat.load_tensors("alpha-r4")
    body, want = scaled_weights(adapter_source, "alpha-r4", tmp_path)
    put(s3, url, f"alpha-r4/{WEIGHTS}", body)
    put(s3, url, "gamma-r16/adapter_config.json",
        (adapter_source / "gamma-r16" / "adapter_config.json").read_bytes() + b"\n")
    with pytest.raises(AdapterChanged):  # not downloaded yet, and storage no longer holds that version
        cat.load_tensors("gamma-r16")
    diff = cat.refresh()
    assert diff.changed == ("alpha-r4", "gamma-r16") and not diff.added and not diff.removed
    new = cat.get("alpha-r4")
    assert new.version != old.version and new.path != old.path
    got = cat.load_tensors("alpha-r4")
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(AdapterChanged):
        cat.load_tensors("alpha-r4", old)  # an entry from before the refresh is never served
    # A config-only change (same weights) is a new version too, with the new spec.
    cfg = (adapter_source / "alpha-r4" / "adapter_config.json").read_text().replace('"lora_alpha": 8',
                                                                                     '"lora_alpha": 12')
    put(s3, url, "alpha-r4/adapter_config.json", cfg.encode())
    assert cat.refresh().changed == ("alpha-r4",)
    assert cat.get("alpha-r4").lora_alpha == 12 and cat.load_tensors("alpha-r4").keys() == want.keys()


def test_deleted_adapter_is_removed(s3, url, tmp_path):
    cat = open_remote(s3, url, tmp_path)
    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/beta-r8/")["Contents"]
    for obj in listed:  # every object of the adapter, as `aws s3 rm --recursive` does
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    diff = cat.refresh()
    assert diff.removed == ("beta-r8",) and not diff.changed
    with pytest.raises(AdapterNotFound):
        cat.get("beta-r8")
    assert cat.names() == ["alpha-r4", "gamma-r16"]


def test_refresh_of_named_adapters_lists_only_their_prefixes(s3, url, tmp_path, adapter_source, monkeypatch):
    """A request for a name published a moment ago: one prefix listing, not the whole catalog."""
    cat = open_remote(s3, url, tmp_path)
    for f in ("adapter_config.json", WEIGHTS):
        put(s3, url, f"fresh/{f}", (adapter_source / "beta-r8" / f).read_bytes())
    put(s3, url, "half/adapter_config.json", (adapter_source / "beta-r8" / "adapter_config.json").read_bytes())
    listed = []
    find = type(cat._store.fs).find
    monkeypatch.setattr(type(cat._store.fs), "find", lambda fs, path, **kw: listed.append(path) or find(fs, path, **kw))
    diff = cat.refresh(["fresh", "half", "never-published"])
    assert diff.added == ("fresh",) and cat.get("fresh").r == cat.get("beta-r8").r
    assert "missing adapter_model" in cat.invalid()["half"]
    assert sorted(p.rsplit("/", 1)[-1] for p in listed) == ["fresh", "half", "never-published"]
    assert cat.load_tensors("fresh").keys() == cat.load_tensors("beta-r8").keys()


def test_invalid_adapters_and_strays(s3, url, tmp_path, adapter_source):
    cfg = (adapter_source / "alpha-r4" / "adapter_config.json").read_bytes()
    put(s3, url, "no-weights/adapter_config.json", cfg)
    put(s3, url, f"no-config/{WEIGHTS}", b"x")
    put(s3, url, "bad:name/adapter_config.json", cfg)
    put(s3, url, "README.md", b"stray object at the root")
    put(s3, url, ".hidden/adapter_config.json", cfg)
    put(s3, url, "../evil/adapter_config.json", cfg)  # S3 keeps '..' as a literal key segment
    put(s3, url, "alpha-r4/checkpoint-1/notes.txt", b"deeper objects are ignored")
    put(s3, url, "huge/adapter_config.json", b" " * (MAX_CONFIG_BYTES + 1))
    put(s3, url, f"huge/{WEIGHTS}", b"x")
    cat = open_remote(s3, url, tmp_path)
    assert cat.names() == ["alpha-r4", "beta-r8", "gamma-r16"]
    inv = cat.invalid()
    assert inv["no-weights"] == "missing adapter_model.safetensors (or adapter_model.bin)"
    assert inv["no-config"] == "missing adapter_config.json"
    assert "':' is not allowed" in inv["bad:name"]
    assert "limit" in inv["huge"] and len(os.listdir(tmp_path / "cache" / ".configs")) == 3  # never fetched
    assert set(inv) == {"no-weights", "no-config", "bad:name", "huge"}
    with pytest.raises(InvalidAdapterName):
        cat.get("..")
    with pytest.raises(InvalidAdapterName):
        cat.get("../evil")


def test_server_down_then_back(s3, url, tmp_path):
    cat = open_remote(s3, url, tmp_path)
    want = cat.load_tensors("alpha-r4")
    s3.stop()
    try:
        with pytest.raises(StorageError, match="beta-r8"):
            cat.load_tensors("beta-r8")
        got = cat.load_tensors("alpha-r4")  # materialized before the outage: still served
        assert all(torch.equal(got[k], want[k]) for k in want)
        with pytest.raises(CatalogError, match=re.escape(url)):
            cat.refresh()
        assert cat.names() == ["alpha-r4", "beta-r8", "gamma-r16"]  # a failed refresh changes nothing
        assert os.listdir(tmp_path / "cache" / ".tmp") == []
        assert "beta-r8" not in materialized(tmp_path / "cache")
    finally:
        s3.start()
    assert not cat.refresh()
    assert cat.load_tensors("beta-r8").keys()


def test_unreachable_or_missing_store_is_a_clear_error(s3, tmp_path):
    with pytest.raises(StorageError, match="cannot list s3://lp-nowhere/adapters"):
        Catalog("s3://lp-nowhere/adapters", cache_dir=tmp_path / "c1",
                storage_options={**s3.storage_options(), "client_kwargs": {
                    "endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"}})
    with pytest.raises(CatalogError, match="does not exist"):
        open_remote(s3, "s3://lp-no-such-bucket/adapters", tmp_path)


def test_cache_budget_evicts_least_recently_used(s3, url, tmp_path):
    probe = open_remote(s3, url, tmp_path / "probe")
    size = {n: it.size_bytes + it.config_size for n, it in probe._items.items()}
    budget = sum(size.values()) - min(size.values())  # any two fit, never all three
    cat = open_remote(s3, url, tmp_path, cache_bytes=budget)
    cache = tmp_path / "cache"
    for name in ("alpha-r4", "beta-r8", "alpha-r4", "gamma-r16"):
        cat.load_tensors(name)
        assert disk_bytes(cache) <= budget
    assert set(materialized(cache)) == {"alpha-r4", "gamma-r16"}  # beta was least recently used
    cat.load_tensors("beta-r8")
    assert set(materialized(cache)) == {"gamma-r16", "beta-r8"} and disk_bytes(cache) <= budget
    # A second store on the same cache dir adopts what is there, trimmed to its (smaller) budget.
    store = RemoteStore(url, cache_dir=cache, cache_bytes=size["beta-r8"], storage_options=s3.storage_options())
    assert set(materialized(cache)) == {"beta-r8"} and store._cache._used == size["beta-r8"]


def test_adapter_larger_than_the_budget(s3, url, tmp_path):
    cat = open_remote(s3, url, tmp_path, cache_bytes=1000)
    with pytest.raises(CapacityError, match="gamma-r16.*cache_bytes"):
        cat.load_tensors("gamma-r16")
    assert materialized(tmp_path / "cache") == {} and os.listdir(tmp_path / "cache" / ".tmp") == []


def test_failed_or_torn_download_leaves_nothing(s3, url, tmp_path, adapter_source, monkeypatch):
    cat = open_remote(s3, url, tmp_path)
    fs, real_get = cat._store.fs, cat._store.fs.get_file

    def broken(rpath, lpath, **kw):
        with open(lpath, "wb") as f:
            f.write(b"partial")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(fs, "get_file", broken)
    with pytest.raises(StorageError, match="gamma-r16.*connection reset"):
        cat.load_tensors("gamma-r16")
    body, _ = scaled_weights(adapter_source, "gamma-r16", tmp_path)

    def overwritten_meanwhile(rpath, lpath, **kw):
        real_get(rpath, lpath, **kw)
        if rpath.endswith(WEIGHTS):
            put(s3, url, f"gamma-r16/{WEIGHTS}", body)

    monkeypatch.setattr(fs, "get_file", overwritten_meanwhile)
    with pytest.raises(AdapterChanged):  # the HEAD after the download no longer matches
        cat.load_tensors("gamma-r16")
    assert materialized(tmp_path / "cache") == {} and os.listdir(tmp_path / "cache" / ".tmp") == []
    monkeypatch.setattr(fs, "get_file", real_get)
    assert cat.refresh().changed == ("gamma-r16",)
    assert cat.load_tensors("gamma-r16").keys()


def test_concurrent_loads_share_one_download(s3, url, tmp_path, monkeypatch):
    cat = open_remote(s3, url, tmp_path)
    fs, real_get, calls = cat._store.fs, cat._store.fs.get_file, []

    def counting(rpath, lpath, **kw):
        calls.append(rpath)
        return real_get(rpath, lpath, **kw)

    monkeypatch.setattr(fs, "get_file", counting)
    errors = []

    def load():
        try:
            cat.load_tensors("beta-r8")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 2  # config + weights, once


def test_configs_are_fetched_in_one_batch_then_cached_by_etag(s3, url, tmp_path, monkeypatch):
    import s3fs

    def refuse(*a, **kw):
        raise AssertionError("unexpected config download")

    with monkeypatch.context() as m:
        m.setattr(s3fs.S3FileSystem, "cat_file", refuse)  # no one-by-one GETs on a cold start
        first = open_remote(s3, url, tmp_path)
    assert len(os.listdir(tmp_path / "cache" / ".configs")) == 3
    monkeypatch.setattr(s3fs.S3FileSystem, "cat_file", refuse)
    monkeypatch.setattr(s3fs.S3FileSystem, "cat", refuse)
    again = open_remote(s3, url, tmp_path)  # a restart: same cache dir, nothing downloaded again
    assert [e.spec for e in again.entries()] == [e.spec for e in first.entries()]


def test_url_traversal_is_refused(s3, tmp_path):
    for bad in ("s3://bucket/../other", "s3://bucket/a/%2E%2E/b", "s3://bucket/./a", "s3://bucket\\..\\x", "s3://"):
        with pytest.raises(CatalogError):
            Catalog(bad, cache_dir=tmp_path / "c", storage_options=s3.storage_options())


def test_generic_fsspec_memory_store(tmp_path, adapter_source):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/lp-{uuid.uuid4().hex[:8]}"
    for name in ("alpha-r4", "beta-r8"):
        for f in ("adapter_config.json", WEIGHTS):
            fs.pipe(f"{root}/{name}/{f}", (adapter_source / name / f).read_bytes())
    cat = Catalog(f"memory://{root}", cache_dir=tmp_path / "mem")
    want = Catalog(adapter_source).load_tensors("beta-r8")
    got = cat.load_tensors("beta-r8")
    assert cat.names() == ["alpha-r4", "beta-r8"] and all(torch.equal(got[k], want[k]) for k in want)
    cfg = (adapter_source / "beta-r8" / "adapter_config.json").read_bytes()
    fs.pipe(f"{root}/beta-r8/adapter_config.json", cfg.replace(b'"lora_alpha": 16', b'"lora_alpha": 4'))
    assert cat.refresh().changed == ("beta-r8",) and cat.get("beta-r8").lora_alpha == 4
    # another adapter's config over these weights: the weights check refuses the pair
    fs.pipe(f"{root}/beta-r8/adapter_config.json", (adapter_source / "alpha-r4" / "adapter_config.json").read_bytes())
    assert cat.refresh().removed == ("beta-r8",) and "target_modules does not select it" in cat.invalid()["beta-r8"]


def test_default_cache_dir_is_per_url(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = default_cache_dir("s3://bucket/a"), default_cache_dir("s3://bucket/b")
    assert a != b and a.startswith(str(tmp_path / "loraplex"))
    assert RemoteStore("memory://lp-default/x/").cache_dir == default_cache_dir("memory://lp-default/x")
