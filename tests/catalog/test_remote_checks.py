"""The weights check on s3:// (a real S3-compatible server on loopback): ranged reads of the header
before an adapter is listed, nothing downloaded; local copies; what stays unchecked, and until when."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from loraplex.catalog import check
from loraplex.errors import InvalidAdapter

from .helpers import lora_tensors, peft_config, write_adapter
from .test_remote import WEIGHTS, materialized, open_remote, put, s3, url  # noqa: F401 - fixtures

TRUNCATED = ("adapter_model.safetensors is corrupt: tensors cover 3584 bytes but the file holds 3484 data bytes "
             "(truncated, or trailing bytes)")
WRONG_RANK = ("module model.layers.0.self_attn.q_proj: lora_A is [8, 64] and lora_B is [64, 8], but the config "
              "says rank 4")


def _upload(s3, url, tmp_path, name, *, cut=0, config=None, tensors=None):  # noqa: F811 - s3, url are fixtures
    d = write_adapter(tmp_path / "src" / name, config=config, tensors=tensors)
    w = os.path.join(d, WEIGHTS)
    if cut:
        os.truncate(w, os.path.getsize(w) - cut)
    for f in ("adapter_config.json", WEIGHTS):
        with open(os.path.join(d, f), "rb") as fh:
            put(s3, url, f"{name}/{f}", fh.read())
    return d


def _refused(cat, name, reason):
    assert name not in cat.names() and cat.invalid()[name] == reason
    with pytest.raises(InvalidAdapter, match=f"LoRA adapter '{name}' is invalid"):
        cat.get(name)


def test_first_listing_checks_headers_by_ranged_reads_without_downloading(s3, url, tmp_path):  # noqa: F811
    _upload(s3, url, tmp_path, "cut", cut=100)
    _upload(s3, url, tmp_path, "wrong-rank", config=peft_config(r=4), tensors=lora_tensors(r=8))
    cat = open_remote(s3, url, tmp_path)
    assert cat.names() == ["alpha-r4", "beta-r8", "gamma-r16"] and cat.unchecked() == []
    _refused(cat, "cut", TRUNCATED)
    _refused(cat, "wrong-rank", WRONG_RANK)
    assert materialized(tmp_path / "cache") == {}  # headers only: no adapter was downloaded


def test_published_later_is_checked_before_it_is_listed(s3, url, tmp_path, monkeypatch):  # noqa: F811
    cat = open_remote(s3, url, tmp_path)
    monkeypatch.setattr(check, "FIRST_READ", 24)  # every header needs the second ranged read
    _upload(s3, url, tmp_path, "cut", cut=100)
    good = _upload(s3, url, tmp_path, "fresh", tensors=lora_tensors(seed=3))
    diff = cat.refresh(["cut", "fresh"])
    assert diff.added == ("fresh",) and not diff.removed
    _refused(cat, "cut", TRUNCATED)
    got, want = cat.load_tensors("fresh"), load_file(os.path.join(good, WEIGHTS))
    assert all(torch.equal(got[k], want[k]) for k in want)
    _upload(s3, url, tmp_path, "fresh", cut=100)  # republished broken: dropped by the next full refresh
    assert cat.refresh().removed == ("fresh",)
    _refused(cat, "fresh", TRUNCATED)


def test_large_first_listing_is_unchecked_until_downloaded(s3, url, tmp_path):  # noqa: F811
    _upload(s3, url, tmp_path, "cut", cut=100)
    cat = open_remote(s3, url, tmp_path, sync_checks=0)
    assert cat.wait_checks(timeout=30)
    # the background made no ranged reads: nothing local, so everything is listed unchecked
    assert cat.unchecked() == cat.names() == ["alpha-r4", "beta-r8", "cut", "gamma-r16"]
    cat.load_tensors("alpha-r4")
    assert "alpha-r4" not in cat.unchecked()
    seen = []
    cat.subscribe(seen.append)
    with pytest.raises(InvalidAdapter, match="LoRA adapter 'cut' is invalid: adapter_model.safetensors is corrupt"):
        cat.load_tensors("cut")  # downloaded (sizes match the listing), then refused by the check
    _refused(cat, "cut", TRUNCATED)
    assert [d.removed for d in seen] == [("cut",)]
    # a restart over the same cache dir checks the local copies in the background
    again = open_remote(s3, url, tmp_path, sync_checks=0)
    assert again.wait_checks(timeout=30)
    assert again.unchecked() == ["beta-r8", "gamma-r16"] and again.names() == ["alpha-r4", "beta-r8", "gamma-r16"]
    assert again.invalid() == {"cut": TRUNCATED}


def test_object_replaced_under_the_check_is_a_change_not_corruption(s3, url, tmp_path, monkeypatch):  # noqa: F811
    cat = open_remote(s3, url, tmp_path)
    _upload(s3, url, tmp_path, "fresh")
    fs = cat._store.fs
    real = fs.cat_ranges  # fsspec's sync wrapper of the async call, an attribute of the instance
    replaced = []

    def replace_then_read(*a, **kw):
        if not replaced:  # the listing saw the good version; a wrong-rank one lands before the read
            replaced.append(_upload(s3, url, tmp_path, "fresh", config=peft_config(r=4), tensors=lora_tensors(r=8)))
        return real(*a, **kw)

    monkeypatch.setattr(fs, "cat_ranges", replace_then_read)
    diff = cat.refresh(["fresh"])
    assert replaced and not diff  # neither listed nor refused: that version is gone
    assert "fresh" not in cat.names() and "fresh" not in cat.invalid()
    cat.refresh(["fresh"])  # the new version, read and refused
    _refused(cat, "fresh", WRONG_RANK)
