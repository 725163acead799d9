"""Adversarial inputs: names and paths that try to leave the catalog root (traversal, symlinks swapped
in after the scan, URL tricks, percent-encoding, unicode lookalikes, NUL), pickled payloads in
adapter_model.bin, and files sized to exhaust memory. Nothing outside the root is ever read into an
adapter, no payload runs, and every refusal is one of our errors with a reason."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from loraplex.catalog import Catalog
from loraplex.catalog.peft import MAX_CONFIG_BYTES
from loraplex.catalog.weights import MAX_HEADER_BYTES, MAX_TENSORS, read_tensors
from loraplex.errors import (
    AdapterChanged,
    AdapterNotFound,
    CatalogError,
    InvalidAdapter,
    InvalidAdapterName,
    LoraplexError,
)

from .common import CONFIG, WEIGHTS, join_safetensors, outcome, peak_rss_bytes, same_tensors
from .runtime_util import new_runtime


@pytest.fixture
def layout_dirs(tmp_path, adapter_source):
    """tmp/root (catalog: adapter "ok"), tmp/secret (an adapter outside it), tmp/root2 (a sibling whose
    name extends the root's: a prefix check without a separator would let it in)."""
    root = tmp_path / "root"
    shutil.copytree(adapter_source / "alpha-r4", root / "ok")
    shutil.copytree(adapter_source / "gamma-r16", tmp_path / "secret")
    shutil.copytree(adapter_source / "gamma-r16", tmp_path / "root2" / "secret")
    return root, tmp_path / "secret"


def secret_tensors(secret):
    return load_file(secret / WEIGHTS)


PIECES = ["..", ".", "/", "\\", "%2e", "%2E%2E", "%2f", "%5c", "\uff0f", "\uff0e", "\u2024", "\u2025", "\u2215",
          "\u2044", "\x00", ":", "~", "secret", "ok", "root2", "file:", "s3:", " ", "\u200b", "\u0338", "\n"]


@settings(max_examples=200, derandomize=True, deadline=2000, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join))
def test_names_never_leave_the_root(name, layout_dirs):
    """Any name: the adapter "ok" itself, or AdapterNotFound / InvalidAdapterName; never an entry or a
    read outside the root (the secret adapter has another rank: reading it would show)."""
    root, _ = layout_dirs
    cat = Catalog(root)
    kind, res = outcome(cat.get, name)
    if kind == "ok":
        assert name == "ok" and os.path.realpath(res.path).startswith(str(root.resolve()) + os.sep)
    else:
        assert isinstance(res, (AdapterNotFound, InvalidAdapterName)), res
        if any(c in name for c in "/\\\x00:\n") or name in (".", "..") or name.startswith("."):
            assert isinstance(res, InvalidAdapterName)
    kind, res = outcome(cat.load_adapter, name)
    assert kind == "error" or (name == "ok" and res[0].r == 4)


def test_symlinks_out_of_the_root_are_refused(layout_dirs, adapter_source):
    root, secret = layout_dirs
    os.symlink(secret, root / "dirlink")  # a whole adapter dir elsewhere
    os.symlink("../secret", root / "rellink")  # relative, through the parent
    for fname in (CONFIG, WEIGHTS):  # one file of an otherwise local adapter
        d = root / f"file-{fname.split('.')[0]}"
        shutil.copytree(adapter_source / "gamma-r16", d)
        os.unlink(d / fname)
        os.symlink(secret / fname, d / fname)
    chain = root / "chain"  # a link to a link inside the root that points out
    shutil.copytree(adapter_source / "gamma-r16", chain)
    os.symlink(secret / WEIGHTS, root / ".hop")
    os.unlink(chain / WEIGHTS)
    os.symlink(root / ".hop", chain / WEIGHTS)
    inside = root / "alias"  # a link that stays inside the root is fine
    os.symlink(root / "ok", inside)
    cat = Catalog(root)
    assert cat.names() == ["alias", "ok"]
    bad = cat.invalid()
    assert set(bad) == {"dirlink", "rellink", "file-adapter_config", "file-adapter_model", "chain"}
    assert all("outside" in r or "leaves" in r for r in bad.values()), bad
    for name in bad:
        with pytest.raises(InvalidAdapter):
            cat.load_adapter(name)
    assert same_tensors(cat.load_tensors("alias"), cat.load_tensors("ok"))


@pytest.mark.parametrize("swap", ["weights-file", "config-file", "directory"])
def test_symlink_swapped_in_after_the_scan_is_never_read(layout_dirs, swap):
    """The scan saw regular files; a symlink out of the root replaces them before the load. The load
    fails (the version changed) through the Catalog and through the runtime, and no slot holds the
    secret weights; the next refresh lists the adapter as invalid."""
    root, secret = layout_dirs
    cat = Catalog(root)
    rt = new_runtime(cat, max_loras=2)
    ok = root / "ok"
    if swap == "directory":
        os.rename(ok, root / ".ok-old")
        os.symlink(secret, ok)
    else:
        fname = WEIGHTS if swap == "weights-file" else CONFIG
        os.unlink(ok / fname)
        os.symlink(secret / fname, ok / fname)
    with pytest.raises((AdapterChanged, InvalidAdapter)):
        cat.load_adapter("ok", cat.get("ok"))
    with pytest.raises(LoraplexError):
        rt.plan(["ok"])
    wanted = secret_tensors(secret)
    for t in rt.targets:  # no slot of any target holds a secret matrix
        for stack in (*t.A, *t.B):
            for w in wanted.values():
                for slot in stack:
                    if slot.shape[-2:] == w.shape:
                        assert not torch.equal(slot.float(), w.float())
    cat.refresh()
    assert "ok" not in cat and "ok" in cat.invalid()
    rt.close()


def _bin_with_payload(path, marker, how: str):
    """An adapter_model.bin whose unpickling would create `marker` (builtins.open(marker, "w"))."""
    import pickle
    import zipfile

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    if how == "plain-pickle":
        with open(path, "wb") as f:
            pickle.dump({"x": Payload(), **tensors}, f, protocol=2)
        return
    torch.save(tensors, path)  # a genuine torch zip; then its data.pkl is replaced by the payload
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"x": Payload()} if how == "zip-payload" else [Payload(), tensors], protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


@pytest.mark.parametrize("how", ["plain-pickle", "zip-payload", "zip-nested"])
def test_pickled_payloads_never_run(tmp_path, adapter_source, how):
    root = tmp_path / "root"
    d = root / "evil"
    d.mkdir(parents=True)
    shutil.copy(adapter_source / "alpha-r4" / CONFIG, d / CONFIG)
    marker = tmp_path / "pwned"
    _bin_with_payload(d / "adapter_model.bin", marker, how)
    cat = Catalog(root)
    assert cat.get("evil").weight_format == "bin"
    with pytest.raises(InvalidAdapter, match="refused"):
        cat.load_adapter("evil")
    rt = new_runtime(cat, max_loras=2)
    with pytest.raises(InvalidAdapter):
        rt.plan(["evil"])
    assert rt.ensure(["evil"]) == {"evil": "failed"}
    rt.close()
    assert not marker.exists(), "the pickled payload ran"


def test_a_genuine_bin_still_loads(tmp_path, adapter_source):
    """The control for the payload tests: torch.save'd tensors load, equal to the safetensors copy."""
    d = tmp_path / "root" / "plain"
    d.mkdir(parents=True)
    shutil.copy(adapter_source / "alpha-r4" / CONFIG, d / CONFIG)
    want = load_file(adapter_source / "alpha-r4" / WEIGHTS)
    torch.save(want, d / "adapter_model.bin")
    assert same_tensors(Catalog(tmp_path / "root").load_tensors("plain"), want)


def test_zip_bomb_bin_is_refused(tmp_path, adapter_source):
    """A .bin whose 16 KiB-tensor storage is 32 MiB of zeros, deflated to ~32 KiB: torch.load would
    inflate all of it (the control below); the catalog refuses the compressed entry first."""
    import zipfile

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    storage = torch.zeros(32 << 20, dtype=torch.uint8)
    stored = tmp_path / "stored.bin"
    torch.save({key: storage[:1024].view(torch.float32).view(4, 64)}, stored)
    del storage
    d = tmp_path / "root" / "bomb"
    d.mkdir(parents=True)
    shutil.copy(adapter_source / "alpha-r4" / CONFIG, d / CONFIG)
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(d / "adapter_model.bin", "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    size = os.path.getsize(d / "adapter_model.bin")
    inflated = torch.load(d / "adapter_model.bin", weights_only=True)[key].untyped_storage().nbytes()
    assert inflated > 500 * size  # the control: torch.load alone inflates it
    with pytest.raises(InvalidAdapter, match="compressed zip entry"):
        Catalog(tmp_path / "root").load_adapter("bomb")


# ---- resource limits --------------------------------------------------------------------------

def _bounded(fn, *, rss=64 << 20, seconds=5.0):
    """fn() must raise a LoraplexError quickly, without growing the peak RSS by more than `rss`."""
    before, t0 = peak_rss_bytes(), time.monotonic()
    kind, err = outcome(fn)
    assert kind == "error", "accepted"
    assert time.monotonic() - t0 < seconds and peak_rss_bytes() - before < rss
    return err


def test_config_size_limit(tmp_path, adapter_source):
    """Exactly MAX_CONFIG_BYTES is read; one byte more is refused; a 4 GiB (sparse) config is refused
    without being read."""
    root = tmp_path / "root"
    cfg = (adapter_source / "alpha-r4" / CONFIG).read_bytes()
    for name, size in (("at-limit", MAX_CONFIG_BYTES), ("over", MAX_CONFIG_BYTES + 1)):
        shutil.copytree(adapter_source / "alpha-r4", root / name)
        (root / name / CONFIG).write_bytes(cfg + b" " * (size - len(cfg)))  # JSON allows trailing blanks
    shutil.copytree(adapter_source / "alpha-r4", root / "huge")
    os.truncate(root / "huge" / CONFIG, 4 << 30)
    cat = _bounded_catalog(root)
    assert cat.names() == ["at-limit"]
    assert set(cat.invalid()) == {"over", "huge"}
    assert all(f"limit {MAX_CONFIG_BYTES}" in r for r in cat.invalid().values()), cat.invalid()


def _bounded_catalog(root):
    before, t0 = peak_rss_bytes(), time.monotonic()
    cat = Catalog(root)
    assert time.monotonic() - t0 < 5 and peak_rss_bytes() - before < 64 << 20
    return cat


def _spec(adapter_source):
    return Catalog(adapter_source).get("alpha-r4").spec


def test_tensor_count_limit(tmp_path, adapter_source):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    path = tmp_path / WEIGHTS
    path.write_bytes(join_safetensors(header, b""))
    err = _bounded(lambda: read_tensors("many", str(path), "safetensors", _spec(adapter_source)))
    assert f"{MAX_TENSORS + 1} tensors (limit {MAX_TENSORS})" in err.reason


def test_header_size_limit(tmp_path, adapter_source):
    """A header length past the limit is refused before the header is read (the file is sparse)."""
    path = tmp_path / WEIGHTS
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
    os.truncate(path, 8 + MAX_HEADER_BYTES + 1)
    err = _bounded(lambda: read_tensors("hdr", str(path), "safetensors", _spec(adapter_source)))
    assert f"limit {MAX_HEADER_BYTES}" in err.reason


def test_terabyte_tensor_is_refused_before_allocating(tmp_path, adapter_source):
    """A header that is a valid LoRA layout but declares 1 TiB of weights, in a (sparse) file really
    that long: refused from the header, through the catalog and the runtime, with bounded memory."""
    root = tmp_path / "root"
    d = root / "tera"
    d.mkdir(parents=True)
    cfg = json.loads((adapter_source / "alpha-r4" / CONFIG).read_bytes())
    cfg.update(rank_pattern={}, target_modules=["q_proj"])
    (d / CONFIG).write_text(json.dumps(cfg))
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    a_bytes, b_bytes = 4 * (1 << 36) * 4, 64 * 4 * 4
    header = {f"{m}.lora_A.weight": {"dtype": "F32", "shape": [4, 1 << 36], "data_offsets": [0, a_bytes]},
              f"{m}.lora_B.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": [a_bytes, a_bytes + b_bytes]}}
    hb = join_safetensors(header, b"")
    try:
        with open(d / WEIGHTS, "wb") as f:
            f.write(hb)
        os.truncate(d / WEIGHTS, len(hb) + a_bytes + b_bytes)
    except OSError as e:  # a filesystem without 1 TiB sparse files
        pytest.skip(f"cannot create a sparse 1 TiB file here: {e}")
    cat = Catalog(root)
    err = _bounded(lambda: cat.load_adapter("tera"))
    assert "per-adapter limit" in err.reason
    rt = new_runtime(cat, max_loras=2)
    err = _bounded(lambda: rt.plan(["tera"]))
    assert isinstance(err, InvalidAdapter) and "limit" in str(err)
    rt.close()


def test_url_tricks_are_refused():
    for url in ("s3://bucket/../other", "s3://bucket/a/%2e%2e/other", "s3://bucket/a/.%2E/b", "s3://bucket/./a",
                "s3://bucket/a\\..\\b", "s3://", "s3:///", "memory://x/%2E/y"):
        with pytest.raises(CatalogError):
            Catalog(url)


def test_remote_names_and_url_tricks_stay_inside(tmp_path, adapter_source):
    """On a real S3 server: object keys whose adapter part is a traversal, a lookalike or a separator
    never become paths outside the cache dir; URLs that smuggle a '..' past the prefix list nothing
    of the bucket's other prefix."""
    from ..catalog.s3server import S3Server, upload_dir

    s3 = S3Server().start()
    try:
        client = s3.client()
        client.create_bucket(Bucket="lp-sec")
        upload_dir(client, "lp-sec", "secret/gamma", adapter_source / "gamma-r16")
        names = ["good", "..", "%2e%2e", "\uff0e\uff0e", "a\\b", "ok:x", ".hidden", "\uff0fetc"]
        for n in names:
            upload_dir(client, "lp-sec", f"adapters/{n}", adapter_source / "alpha-r4")
        cache = tmp_path / "sandbox" / "cache"
        cache.parent.mkdir()
        opts = s3.storage_options()
        cat = Catalog("s3://lp-sec/adapters", cache_dir=cache, storage_options=opts)
        assert cat.names() == sorted(["good", "%2e%2e", "\uff0e\uff0e", "\uff0fetc"])
        assert set(cat.invalid()) == {"a\\b", "ok:x"}
        want = load_file(adapter_source / "alpha-r4" / WEIGHTS)
        for n in cat.names():
            assert same_tensors(cat.load_tensors(n), want)
        for dirpath, _, files in os.walk(tmp_path / "sandbox"):  # every byte written stays in the cache
            for f in files:
                assert os.path.realpath(os.path.join(dirpath, f)).startswith(str(cache.resolve()) + os.sep)
        for url in ("s3://lp-sec/adapters/..%2Fsecret", "s3://lp-sec/adapters/..%2fsecret/",
                    "s3://lp-sec/adapters/\uff0e\uff0e/secret", "s3://lp-sec/adapters/..\uff0fsecret"):
            kind, res = outcome(Catalog, url, cache_dir=tmp_path / "c2", storage_options=opts)
            assert kind == "error" or not any("gamma" in n for n in res.names()), (url, res)
    finally:
        s3.stop()


def test_backtracking_target_regex_is_refused_in_bounded_time(tmp_path):
    """target_modules is a regex from someone else's config, matched against module names from the
    weight file: a catastrophic pattern must fail that adapter quickly, not stall the process."""
    from safetensors.torch import save_file

    d = tmp_path / "cat" / "evil"
    d.mkdir(parents=True)
    module = "a" * 40 + "!"
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "(a|aa)+", "bias": "none"}))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.ones(2, 4),
               f"base_model.model.{module}.lora_B.weight": torch.ones(4, 2)}, str(d / "adapter_model.safetensors"))
    cat = Catalog(tmp_path / "cat")
    t0 = time.monotonic()
    with pytest.raises(InvalidAdapter, match="took over"):
        cat.load_tensors("evil")
    assert time.monotonic() - t0 < 5  # `re` would take hours on 40 characters
