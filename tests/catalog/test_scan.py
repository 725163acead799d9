"""Listing a storage root: what is listed, what is skipped (with the reason, once), what is read."""

import json
import logging
import os

import pytest

from loraplex.catalog import Catalog
from loraplex.errors import AdapterNotFound, CatalogError, InvalidAdapter

from .helpers import inotify_opens, lora_tensors, peft_config, python_opens, write_adapter

GOOD = ("alpha-r4", "beta-r8", "gamma-r16")

# directory -> (how to break it, the reason the catalog must give)
BROKEN = {
    "no-config": (lambda d: os.remove(d / "adapter_config.json"), "missing adapter_config.json"),
    "bad-json": (lambda d: (d / "adapter_config.json").write_bytes(b'{"r": 8,'), None),
    "prefix-tuning": (lambda d: _config(d, peft_type="PREFIX_TUNING"),
                      "peft_type 'PREFIX_TUNING' is not supported (only LORA)"),
    "dora": (lambda d: _config(d, use_dora=True), "DoRA (use_dora=true) is not supported"),
    "bias-all": (lambda d: _config(d, bias="all"), "bias='all' is not supported (only 'none')"),
    "no-rank": (lambda d: _config(d, r=None, drop="r"), "adapter_config.json has no 'r'"),
    "no-targets": (lambda d: _config(d, drop="target_modules"), "adapter_config.json has no 'target_modules'"),
    "no-weights": (lambda d: os.remove(d / "adapter_model.safetensors"),
                   "missing adapter_model.safetensors (or adapter_model.bin)"),
    "weights-dir": (lambda d: (os.remove(d / "adapter_model.safetensors"), os.mkdir(d / "adapter_model.safetensors")),
                    "adapter_model.safetensors is not a regular file"),
    "url:like": (lambda d: None, "':' is not allowed (it could be read as a URL scheme)"),
}


def _config(d, drop=None, **changes):
    path = d / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update({k: v for k, v in changes.items() if v is not None})
    cfg.pop(drop, None)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def mixed_dir(catalog_dir, adapter_source):
    """The three good adapters plus one broken copy of alpha-r4 per entry of BROKEN."""
    import shutil

    for name, (brk, _) in BROKEN.items():
        d = catalog_dir / name
        shutil.copytree(adapter_source / "alpha-r4", d)
        brk(d)
    return catalog_dir


def test_bad_adapters_are_skipped_with_their_reason(mixed_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="loraplex.catalog"):
        cat = Catalog(mixed_dir)
    assert cat.names() == sorted(GOOD)
    invalid = cat.invalid()
    assert sorted(invalid) == sorted(BROKEN)
    for name, (_, reason) in BROKEN.items():
        if reason is None:
            assert invalid[name].startswith("adapter_config.json is not valid JSON ("), invalid[name]
        else:
            assert invalid[name] == reason, name
        # the warning names the directory and the reason
        assert any(f"'{name}'" in r.getMessage() and invalid[name] in r.getMessage() for r in caplog.records), name
    # an unchanged bad adapter is not warned about again on every refresh
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loraplex.catalog"):
        cat.refresh()
    assert not caplog.records


def test_one_bad_adapter_does_not_stop_the_others(mixed_dir):
    cat = Catalog(mixed_dir)
    for name in GOOD:
        assert cat.load_tensors(name)  # reads and validates the weights
    with pytest.raises(InvalidAdapter) as ei:
        cat.get("dora")
    assert str(ei.value) == "LoRA adapter 'dora' is invalid: DoRA (use_dora=true) is not supported"
    with pytest.raises(InvalidAdapter, match="LoRA adapter 'no-weights' is invalid: missing adapter_model"):
        cat.load_tensors("no-weights")


def test_unknown_name_error_message(catalog_dir):
    cat = Catalog(catalog_dir)
    with pytest.raises(AdapterNotFound) as ei:
        cat.get("nope")
    assert str(ei.value) == f"LoRA adapter 'nope' not found in catalog {cat.root}"
    assert isinstance(ei.value, KeyError)  # `name in` / dict-style callers can catch it as KeyError
    with pytest.raises(AdapterNotFound):
        cat.get_adapter_id("nope")


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CatalogError) as ei:
        Catalog(missing)
    assert str(ei.value) == f"catalog path ({missing}) does not exist"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CatalogError, match=r"catalog path \(.*file\) is not a directory"):
        Catalog(tmp_path / "file")


def test_entry_fields(catalog_dir):
    cat = Catalog(catalog_dir)
    e = cat.get("gamma-r16")
    w = os.stat(catalog_dir / "gamma-r16" / "adapter_model.safetensors")
    assert e.name == "gamma-r16" and e.path == str(catalog_dir / "gamma-r16")
    assert (e.r, e.lora_alpha, e.scaling, e.max_rank) == (16, 32.0, 2.0, 16)
    assert e.alpha_pattern == {"down_proj": 8.0} and e.rank_pattern == {}
    assert (e.weight_format, e.size_bytes) == ("safetensors", w.st_size)
    assert e.key == ("gamma-r16", e.version) and format(w.st_mtime_ns, "x") in e.version
    assert 1 <= e.id < 2**31 and cat.get_adapter_name(e.id) == "gamma-r16"
    assert [x.name for x in cat.entries()] == cat.names() == list(cat) and len(cat) == 3 and "gamma-r16" in cat


def test_hidden_dirs_and_stray_files_are_not_adapters(catalog_dir, adapter_source):
    import shutil

    shutil.copytree(adapter_source / "alpha-r4", catalog_dir / ".staging")  # e.g. an atomic publisher's temp
    (catalog_dir / "README.md").write_text("not an adapter")
    cat = Catalog(catalog_dir)
    assert cat.names() == sorted(GOOD) and cat.invalid() == {}


def test_empty_root(tmp_path):
    cat = Catalog(tmp_path)
    assert len(cat) == 0 and cat.names() == [] and cat.invalid() == {}


def test_listing_reads_configs_and_weight_headers_never_tensor_data(catalog_dir, monkeypatch):
    # Every weight file is opened for its header only: the reads of each, by offset, stop at the end of
    # its header (8 + header length), and nothing else under the root is opened, by Python or by native
    # code (the kernel's open events see both). Garbage weights are not listed.
    (catalog_dir / "beta-r8" / "adapter_model.safetensors").write_bytes(b"\0garbage")
    reads = []
    preadv, pread = os.preadv, os.pread

    def spy_preadv(fd, bufs, offset, *a):
        reads.append((os.readlink(f"/proc/self/fd/{fd}"), offset, sum(len(b) for b in bufs)))
        return preadv(fd, bufs, offset, *a)

    def spy_pread(fd, n, offset):
        reads.append((os.readlink(f"/proc/self/fd/{fd}"), offset, n))
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "preadv", spy_preadv)
    monkeypatch.setattr(os, "pread", spy_pread)
    with inotify_opens(catalog_dir) as kernel, python_opens() as py:
        cat = Catalog(catalog_dir)
    monkeypatch.undo()
    assert cat.names() == ["alpha-r4", "gamma-r16"]
    assert cat.invalid()["beta-r8"].startswith("adapter_model.safetensors is corrupt: ")
    opened = {os.path.relpath(p, catalog_dir) for p in kernel + py if p.startswith(str(catalog_dir))}
    assert opened == {f"{n}/{f}" for n in GOOD for f in ("adapter_config.json", "adapter_model.safetensors")}
    for n in ("alpha-r4", "gamma-r16"):
        path = str(catalog_dir / n / "adapter_model.safetensors")
        with open(path, "rb") as f:
            header_end = 8 + int.from_bytes(f.read(8), "little")
        spans = [(off, off + k) for p, off, k in reads if p == path]
        assert spans and max(end for _, end in spans) == header_end < os.path.getsize(path), (n, spans)
    assert {p for p, _, _ in reads} <= {str(catalog_dir / n / "adapter_model.safetensors") for n in GOOD}
    with pytest.raises(InvalidAdapter, match="LoRA adapter 'beta-r8' is invalid: adapter_model.safetensors is corrupt"):
        cat.load_tensors("beta-r8")


def test_bin_weights_are_listed(tmp_path):
    write_adapter(tmp_path / "old-style", weights="bin")
    e = Catalog(tmp_path).get("old-style")
    assert e.weight_format == "bin" and e.size_bytes == os.path.getsize(tmp_path / "old-style" / "adapter_model.bin")


def test_safetensors_preferred_over_bin(tmp_path):
    import torch

    d = write_adapter(tmp_path / "both")
    torch.save(lora_tensors(), os.path.join(d, "adapter_model.bin"))
    e = Catalog(tmp_path).get("both")
    assert e.weight_format == "safetensors"


def test_config_that_is_not_a_regular_file(tmp_path):
    d = write_adapter(tmp_path / "fifo-config", config=peft_config())
    os.remove(os.path.join(d, "adapter_config.json"))
    os.mkfifo(os.path.join(d, "adapter_config.json"))  # opening it for reading must not hang the scan
    cat = Catalog(tmp_path)
    assert cat.invalid() == {"fifo-config": "adapter_config.json is not a regular file"}
