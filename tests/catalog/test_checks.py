"""The weights check: adapters whose weight file does not fit its header or its config are never
listed once a refresh has seen them, whether it checks them at once or in the background."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loraplex.catalog import Catalog, CatalogDiff, MemoryCatalog
from loraplex.errors import InvalidAdapter

from .helpers import (
    PREFIX,
    lora_tensors,
    names_seen,
    peft_config,
    publish,
    read_header,
    wait_for,
    write_adapter,
    write_with_header,
)

Q = "model.layers.0.self_attn.q_proj"
QA, QB = f"{PREFIX}{Q}.lora_A.weight", f"{PREFIX}{Q}.lora_B.weight"
WEIGHTS = "adapter_model.safetensors"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _truncated(d):
    write_adapter(d)
    path = d / WEIGHTS
    os.truncate(path, os.path.getsize(path) - 100)  # the header intact, the data cut


def _overlapping(d):
    write_adapter(d)
    header, data = read_header(d / WEIGHTS)
    b, e = header[QB]["data_offsets"]
    header[QB]["data_offsets"] = [b - 512, e - 512]  # half over lora_A's bytes, a gap after it
    write_with_header(d / WEIGHTS, header, data)


def _wrong_rank(d):
    write_adapter(d, config=peft_config(r=4), tensors=lora_tensors(r=8))


def _untargeted(d):
    write_adapter(d, config=peft_config(target_modules=["q_proj"]), tensors=lora_tensors(modules=("q_proj", "k_proj")))


# name -> (how to make it, the exact reason)
BAD = {
    "truncated": (_truncated, "adapter_model.safetensors is corrupt: tensors cover 3584 bytes but the file holds "
                              "3484 data bytes (truncated, or trailing bytes)"),
    "overlapping": (_overlapping, f"adapter_model.safetensors is corrupt: tensor '{QB}' data_offsets [512, 1536] "
                                  "overlap or leave a gap (expected to start at 1024)"),
    "wrong-rank": (_wrong_rank, f"module {Q}: lora_A is [8, 64] and lora_B is [64, 8], but the config says rank 4"),
    "untargeted": (_untargeted, "weights for module model.layers.0.self_attn.k_proj but target_modules does not "
                                "select it"),
}


@pytest.fixture
def staged(tmp_path):
    """Every BAD adapter and one good one, written outside the catalog, ready to publish."""
    src = tmp_path / "staging"
    for name, (make, _) in BAD.items():
        make(src / name)
    write_adapter(src / "good", tensors=lora_tensors(seed=7))
    return src


def _assert_refused(cat, name):
    reason = BAD[name][1]
    assert name not in cat.names() and name not in cat and name not in [e.name for e in cat.entries()]
    assert cat.invalid()[name] == reason
    with pytest.raises(InvalidAdapter) as ei:
        cat.get(name)
    assert str(ei.value) == f"LoRA adapter '{name}' is invalid: {reason}"


def _assert_good_loads(cat, root):
    assert "good" in cat.names()
    got, want = cat.load_tensors("good"), load_file(root / "good" / WEIGHTS)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", sorted(BAD))
def test_published_bad_adapter_is_never_listed_by_a_targeted_refresh(tmp_path, staged, name):
    root = tmp_path / "root"
    root.mkdir()
    cat = Catalog(root)
    for n in (name, "good"):
        publish(staged / n, root, n)
    diff = cat.refresh([name, "good"])
    assert diff == CatalogDiff(added=("good",))
    _assert_refused(cat, name)
    _assert_good_loads(cat, root)
    assert not cat.unchecked() and cat.checks_pending() == 0


def test_bad_adapters_never_appear_while_a_watcher_picks_them_up(tmp_path, staged):
    # A reader polls the listing while the publishes land and the watcher refreshes: no poll ever
    # sees a bad adapter (each refresh checks what it found before it lists it).
    root = tmp_path / "root"
    root.mkdir()
    cat = Catalog(root)
    with names_seen(cat) as seen, cat.watch(interval=0.05, events=False):
        for n in [*BAD, "good"]:
            publish(staged / n, root, n)
        assert wait_for(lambda: "good" in cat and len(cat.invalid()) == len(BAD), timeout=20)
    seen.update(cat.names())
    assert seen == {"good"}
    for name in BAD:
        _assert_refused(cat, name)
    _assert_good_loads(cat, root)


def test_cli_validate_reports_each(tmp_path, staged):
    root = tmp_path / "root"
    shutil.copytree(staged, root)
    for quick in ([], ["--quick"]):
        r = subprocess.run([sys.executable, "-m", "loraplex.cli", "catalog", "validate", *quick, str(root)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 1, r.stderr
        lines = r.stdout.splitlines()
        assert lines[:-1] == [f"INVALID  {n}: {BAD[n][1]}" for n in sorted(BAD)]
        assert lines[-1].startswith(f"1 valid, {len(BAD)} invalid in {root} (")


def test_republish_that_breaks_then_fixes_an_adapter(tmp_path, staged):
    root = tmp_path / "root"
    root.mkdir()
    publish(staged / "good", root, "a")
    cat = Catalog(root)
    assert cat.names() == ["a"]
    seen = []
    cat.subscribe(seen.append)
    shutil.rmtree(root / "a")
    publish(staged / "truncated", root, "a")  # a broken version replaces the listed one
    assert cat.refresh(["a"]) == CatalogDiff(removed=("a",))
    assert cat.names() == [] and cat.invalid()["a"] == BAD["truncated"][1]
    assert not cat.refresh()  # the same broken version: nothing new, still refused, not re-read
    shutil.rmtree(root / "a")
    publish(staged / "good", root, "a")
    assert cat.refresh() == CatalogDiff(added=("a",))
    assert cat.names() == ["a"] and cat.invalid() == {}
    assert seen == [CatalogDiff(removed=("a",)), CatalogDiff(added=("a",))]


def test_first_listing_of_a_large_catalog_checks_in_the_background(tmp_path, staged):
    root = tmp_path / "root"
    shutil.copytree(staged, root)
    cat = Catalog(root, sync_checks=2)  # 5 adapters: more than sync_checks, so listed unchecked
    seen = []
    cat.subscribe(seen.append)
    assert cat.wait_checks(timeout=30)
    assert cat.checks_pending() == 0 and cat.unchecked() == []
    for name in BAD:
        _assert_refused(cat, name)
    _assert_good_loads(cat, root)
    # every listed bad adapter left in a `removed` diff (the background may have run before subscribe)
    removed = {n for d in seen for n in d.removed}
    assert removed <= set(BAD) and not any(d.added or d.changed for d in seen)


def test_get_checks_an_unchecked_adapter_first(tmp_path, staged):
    # Whether or not the background got to it, get() never hands out an entry that fails the check.
    root = tmp_path / "root"
    shutil.copytree(staged, root)
    cat = Catalog(root, sync_checks=0)
    with pytest.raises(InvalidAdapter, match="LoRA adapter 'truncated' is invalid: adapter_model.safetensors is"):
        cat.get("truncated")
    assert cat.get("good").r == 4
    cat.wait_checks()


def test_mass_publish_after_the_first_listing_is_held_out_until_checked(tmp_path, staged):
    root = tmp_path / "root"
    root.mkdir()
    publish(staged / "good", root, "good")
    cat = Catalog(root, sync_checks=1)
    assert cat.names() == ["good"]
    with names_seen(cat) as seen:
        for n in BAD:
            publish(staged / n, root, n)
        for n in ("g2", "g3"):
            publish(staged / "good", root, n)
        diff = cat.refresh()  # 6 new adapters: more than sync_checks, so checked in the background
        assert diff.added == tuple(sorted([*BAD, "g2", "g3"]))
        assert cat.wait_checks(timeout=30)
    seen.update(cat.names())
    assert seen == {"good", "g2", "g3"}
    assert cat.names() == ["g2", "g3", "good"] and len(cat) == 3
    for name in BAD:
        _assert_refused(cat, name)


def test_bin_containers(tmp_path):
    import zipfile

    root = tmp_path / "root"
    write_adapter(root / "zip-ok", weights="bin")
    write_adapter(root / "zip-cut", weights="bin")
    path = root / "zip-cut" / "adapter_model.bin"
    os.truncate(path, os.path.getsize(path) - 50)  # the zip directory is at the end: it is gone
    d = write_adapter(root / "legacy", weights=None)
    torch.save(lora_tensors(), os.path.join(d, "adapter_model.bin"), _use_new_zipfile_serialization=False)
    d = write_adapter(root / "garbage", weights=None)
    with open(os.path.join(d, "adapter_model.bin"), "wb") as f:
        f.write(b"not a checkpoint at all")
    d = write_adapter(root / "compressed", weights=None)
    with zipfile.ZipFile(os.path.join(d, "adapter_model.bin"), "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * 100)
    cat = Catalog(root)
    assert cat.names() == ["legacy", "zip-ok"]  # legacy: nothing to check without unpickling; loaded fully later
    inv = cat.invalid()
    assert inv["zip-cut"].startswith("adapter_model.bin is a damaged zip archive (truncated?): ")
    assert inv["garbage"] == "adapter_model.bin is neither a zip archive (torch.save) nor a legacy torch file"
    assert inv["compressed"].startswith("adapter_model.bin refused: compressed zip entry 'archive/data.pkl'")
    for name in ("legacy", "zip-ok"):
        got = cat.load_tensors(name)
        assert all(torch.equal(got[k], v) for k, v in lora_tensors().items())


def test_memory_catalog_checks_at_register_and_refresh(tmp_path, staged):
    mem = MemoryCatalog()
    with pytest.raises(InvalidAdapter) as ei:
        mem.register("t", staged / "truncated")
    assert ei.value.reason == BAD["truncated"][1] and mem.names() == []
    d = tmp_path / "a"
    shutil.copytree(staged / "good", d)
    mem.register("a", d)
    shutil.rmtree(d)
    shutil.copytree(staged / "wrong-rank", d)
    assert mem.refresh() == CatalogDiff(removed=("a",))
    assert mem.invalid() == {"a": BAD["wrong-rank"][1]} and mem.names() == []


def test_weights_swapped_for_an_escaping_symlink_between_scan_and_check(tmp_path, staged):
    # The scan saw a regular file; before the check reads it, it becomes a symlink out of the root.
    # The check must not open the outside file: it reports a change (the next refresh refuses it).
    from loraplex.catalog.check import CHANGED, check_items

    from .helpers import inotify_opens

    root, outside = tmp_path / "root", tmp_path / "outside"
    publish(staged / "good", root.mkdir() or root, "a")
    shutil.copytree(staged / "good", outside)
    cat = Catalog(root)
    store, item, spec = cat._store, cat._items["a"], cat.get("a").spec
    os.remove(root / "a" / WEIGHTS)
    os.symlink(outside / WEIGHTS, root / "a" / WEIGHTS)
    with inotify_opens(outside) as kernel:
        assert check_items(store, [(item, spec)], network=False) == {"a": CHANGED}
    assert kernel == []
    assert cat.refresh(["a"]).removed == ("a",) and "leaves the catalog root" in cat.invalid()["a"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_checks_finish_in_a_forked_child(tmp_path, staged):
    # A process that forks while its catalog checks in the background (vLLM starts its processes so):
    # the child has no checking thread, and the catalog lock may be held at the fork. The child
    # must still finish the checks, the batch in flight at the fork included.
    root = tmp_path / "root"
    shutil.copytree(staged, root)
    for i in range(100):
        shutil.copytree(staged / "good", root / f"g{i:03d}")
    cat = Catalog(root, sync_checks=0)
    cat._lock.acquire()  # the checking thread takes its first batch, then waits for the lock
    try:
        assert wait_for(lambda: cat._checks._busy, timeout=10)
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                done = cat.wait_checks(timeout=60)
                code = 0 if done and set(cat.invalid()) == set(BAD) and len(cat) == 101 else 3
            finally:
                os._exit(code)
    finally:
        cat._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cat.wait_checks(timeout=60) and set(cat.invalid()) == set(BAD) and len(cat) == 101
