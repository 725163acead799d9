"""Storage faults injected while a real load runs, through the Runtime (plans and ensure/poll) and the
Catalog: files truncated, rewritten, replaced (atomically and by a directory) or deleted mid-read;
downloads that break midway, fill the disk, crawl, or lose the S3 server. The standard: the fault
fails only the requests for that adapter, with one of our errors; nothing partial stays in the local
cache; the budgets are whole again; and the first request after the fault clears gets the right
weights (checked against the fp32 reference of the files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import fsspec
import pytest

from loraplex.catalog import Catalog
from loraplex.catalog.weights import SafetensorsFile
from loraplex.errors import AdapterChanged, AdapterNotFound, InvalidAdapter, LoraplexError, StorageError

from ..runtime.helpers import Reference, check_plan, clone_adapter
from .common import WEIGHTS, outcome, same_tensors
from .faults import FlakyFS, cache_leftovers, on_first_call, put_dir
from .runtime_util import new_runtime

fsspec.register_implementation("flaky", FlakyFS, clobber=True)
VICTIM, OTHERS = "v", ("o1", "o2")
OUTCOMES: list[dict] = []  # one per fault that ran to the end (bench/reliability.py reports them)


def record(fault: str, where: str, ended: str) -> None:
    """Called last: everything asserted before it held (bystanders served, no partial files, the
    first request after the fault got the right weights)."""
    OUTCOMES.append({"fault": fault, "where": where, "request_ended": ended, "bystanders": "served",
                     "partial_files_left": 0, "next_request_after_fault": "served, weights checked"})


@pytest.fixture
def adapters(tmp_path, adapter_source):
    """A local catalog dir: the victim (rank 16, every MLP module) and two bystanders."""
    root = tmp_path / "adapters"
    clone_adapter(adapter_source / "gamma-r16", root / VICTIM, seed=1)
    clone_adapter(adapter_source / "alpha-r4", root / "o1", seed=2)
    clone_adapter(adapter_source / "beta-r8", root / "o2", seed=3)
    return root


def served_right(rt, names) -> None:
    """A plan for `names` succeeds and every row matches the reference of the version it names."""
    cat = rt.catalog
    with rt.step(list(names)) as plan:
        refs = {key: Reference(cat, n, cat.get(n)) for n, (key, _) in plan.adapters.items()}
        assert check_plan(rt, plan, refs) > 0


def budgets_whole(rt) -> None:
    s = rt.stats()
    assert s["host"]["reserved_bytes"] == 0 and s["gpu"]["in_use"] == 0, s
    assert s["host"]["peak_bytes"] <= rt.config.host_cache_bytes


def _truncate(d, new):
    os.truncate(d / WEIGHTS, os.path.getsize(d / WEIGHTS) // 2)


def _rewrite_in_place(d, new):
    with open(d / WEIGHTS, "r+b") as f:  # same inode, same size: only mtime tells
        f.write(new)


def _atomic_replace(d, new):
    (d / ".new.st").write_bytes(new)
    os.replace(d / ".new.st", d / WEIGHTS)


def _replace_by_directory(d, new):
    os.unlink(d / WEIGHTS)
    os.mkdir(d / WEIGHTS)


LOCAL_FAULTS = {
    # fault -> (what happens to the victim's files at its first tensor read, what the plan raises
    # after its one refresh-and-retry; None: the new version is served)
    "truncate-in-place": (_truncate, InvalidAdapter),
    "rewrite-in-place": (_rewrite_in_place, None),
    "atomic-replace": (_atomic_replace, None),
    "replaced-by-directory": (_replace_by_directory, InvalidAdapter),
    "directory-deleted": (lambda d, new: shutil.rmtree(d), AdapterNotFound),
}


@pytest.mark.parametrize("fault", list(LOCAL_FAULTS))
def test_local_file_fault_during_load(fault, adapters, tmp_path):
    act, raises = LOCAL_FAULTS[fault]
    victim = adapters / VICTIM
    original = {f: (victim / f).read_bytes() for f in os.listdir(victim)}
    clone_adapter(victim, tmp_path / "clone", seed=99)  # same keys and shapes, other values
    new = (tmp_path / "clone" / WEIGHTS).read_bytes()
    cat = Catalog(adapters)
    rt = new_runtime(cat, max_loras=3, load_workers=2)
    with on_first_call(lambda: act(victim, new), code=SafetensorsFile.tensor.__code__) as fired:
        kind, res = outcome(rt.plan, [VICTIM])
    assert fired.is_set()
    if raises is None:  # the change was noticed, the catalog refreshed, the new version served
        assert kind == "ok", res
        assert res.adapters[VICTIM][0] == cat.get(VICTIM).key
        assert (victim / WEIGHTS).read_bytes() == new
        assert check_plan(rt, res, {cat.get(VICTIM).key: Reference(cat, VICTIM)}) > 0
        rt.release(res)
    else:
        assert kind == "error" and isinstance(res, raises), res
        assert rt.ensure([VICTIM]) == {VICTIM: "failed"} and isinstance(rt.error(VICTIM), LoraplexError)
    served_right(rt, OTHERS)  # bystanders are untouched, also while the victim is broken
    # the fault clears: the original files come back; a refresh (what watch() does) sees them
    if victim.is_dir() and (victim / WEIGHTS).is_dir():
        os.rmdir(victim / WEIGHTS)
    victim.mkdir(exist_ok=True)
    for f, b in original.items():
        (victim / f"{f}.restore").write_bytes(b)
        os.replace(victim / f"{f}.restore", victim / f)
    cat.refresh()
    served_right(rt, [VICTIM, *OTHERS])
    budgets_whole(rt)
    rt.close()
    record(fault, "local dir, at the first tensor read of Runtime.plan",
           f"served the new version {res.adapters[VICTIM][0][1][:12]}..." if raises is None else type(res).__name__)


@pytest.mark.parametrize("fault", list(LOCAL_FAULTS))
def test_local_file_fault_during_catalog_load(fault, adapters, tmp_path):
    """Catalog.load_adapter under the same faults: always AdapterChanged (never a torn mix, never a
    crash); bystanders load; after the files come back and a refresh, the original tensors."""
    from safetensors.torch import load

    act, _ = LOCAL_FAULTS[fault]
    victim = adapters / VICTIM
    original = {f: (victim / f).read_bytes() for f in os.listdir(victim)}
    clone_adapter(victim, tmp_path / "clone", seed=98)
    cat = Catalog(adapters)
    with on_first_call(lambda: act(victim, (tmp_path / "clone" / WEIGHTS).read_bytes()),
                       code=SafetensorsFile.tensor.__code__) as fired:
        kind, err = outcome(cat.load_adapter, VICTIM)
    assert fired.is_set() and kind == "error" and isinstance(err, AdapterChanged), err
    for n in OTHERS:
        cat.load_adapter(n)
    shutil.rmtree(victim, ignore_errors=True)
    victim.mkdir()
    for f, b in original.items():
        (victim / f).write_bytes(b)
    cat.refresh()
    assert same_tensors(cat.load_tensors(VICTIM), load(original[WEIGHTS]))
    record(fault, "local dir, at the first tensor read of Catalog.load_adapter", "AdapterChanged")


@pytest.fixture
def flaky(adapters, tmp_path):
    """The same adapters on flaky:// (an fsspec object store that fails on demand), cached in tmp."""
    FlakyFS.reset()
    FlakyFS.only = f"/{VICTIM}/"  # faults hit the victim's weights only
    root = f"/lp-{uuid.uuid4().hex[:10]}/adapters"
    put_dir(root, adapters)
    cat = Catalog(f"flaky://{root}", cache_dir=tmp_path / "cache")
    yield cat, tmp_path / "cache"
    FlakyFS.reset()
    FlakyFS().rm(root, recursive=True)


def _ensure_until_final(rt, names, timeout=20.0) -> dict:
    status = rt.ensure(names)
    deadline = time.monotonic() + timeout
    while "loading" in status.values() and time.monotonic() < deadline:
        time.sleep(0.01)
        status.update(rt.poll())
    return status


@pytest.mark.parametrize("fault", ["connection-drop", "disk-full"])
def test_download_fault(fault, flaky):
    """A download that breaks midway fails the victim only (plan and ensure), leaves no partial file,
    and the next request once the store behaves again downloads it whole and serves it right."""
    cat, cache = flaky
    rt = new_runtime(cat, max_loras=3, load_workers=2)
    if fault == "connection-drop":
        FlakyFS.fail_after = 5000
    else:
        FlakyFS.enospc_after = 5000
    with pytest.raises(StorageError, match="injected"):
        rt.plan([VICTIM])
    assert _ensure_until_final(rt, [VICTIM, *OTHERS]) == {VICTIM: "failed", "o1": "ready", "o2": "ready"}
    assert isinstance(rt.error(VICTIM), StorageError)
    tries = FlakyFS.downloads  # while the fault lasts, each new request tries storage once more
    assert _ensure_until_final(rt, [VICTIM]) == {VICTIM: "failed"} and FlakyFS.downloads == tries + 1
    assert cache_leftovers(cache) == []
    served_right(rt, OTHERS)
    FlakyFS.reset(only=FlakyFS.only)  # the fault clears: same version, nothing changes in the catalog
    assert _ensure_until_final(rt, [VICTIM]) == {VICTIM: "ready"}, rt.error(VICTIM)
    served_right(rt, [VICTIM, *OTHERS])
    assert cache_leftovers(cache) == []
    budgets_whole(rt)
    rt.close()
    record(fault, "fsspec store: " + ("EIO after 5000 bytes of the weights download" if fault == "connection-drop"
                                      else "ENOSPC after 5000 bytes written to the cache"), "StorageError")


def test_slow_store_times_out_within_the_bound(flaky):
    cat, cache = flaky
    rt = new_runtime(cat, max_loras=3, load_workers=2, load_timeout_s=0.5)
    served_right(rt, OTHERS)  # downloaded before the store slows down
    FlakyFS.delay_s = 0.1  # per 4 KiB chunk: the victim's download takes seconds
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="within"):
        rt.plan([VICTIM])
    assert time.monotonic() - t0 < 0.5 + 1.0
    t0 = time.monotonic()
    served_right(rt, OTHERS)  # not stuck behind the slow load
    assert time.monotonic() - t0 < 0.5
    FlakyFS.delay_s = 0.0
    deadline = time.monotonic() + 30
    while rt.ensure([VICTIM])[VICTIM] != "ready" and time.monotonic() < deadline:
        time.sleep(0.02)
    served_right(rt, [VICTIM])
    assert cache_leftovers(cache) == []
    budgets_whole(rt)
    rt.close()
    record("slow-store", "fsspec store, 0.1 s per 4 KiB, load_timeout_s=0.5", "StorageError (timeout)")


def test_disk_full_on_a_real_tmpfs(adapters, tmp_path):
    """The cache dir on a 1 MiB tmpfs, nearly filled by another file: the download fails with ENOSPC
    (StorageError), no partial file remains, and once room is made the next request succeeds."""
    from ..catalog.s3server import S3Server, upload_dir

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    cache = mnt / "cache"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); test_download_fault[disk-full] covers ENOSPC")
    s3 = S3Server().start()
    try:
        client = s3.client()
        client.create_bucket(Bucket="lp-full")
        upload_dir(client, "lp-full", "adapters", adapters)
        cat = Catalog("s3://lp-full/adapters", cache_dir=cache, storage_options=s3.storage_options())
        rt = new_runtime(cat, max_loras=3)
        served_right(rt, OTHERS)
        free = shutil.disk_usage(cache).free
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * max(0, free - 16 * 1024))  # leaves less than the victim's weights
        with pytest.raises(StorageError, match="No space left|ENOSPC|Errno 28"):
            rt.plan([VICTIM])
        assert cache_leftovers(cache) == []
        served_right(rt, OTHERS)  # cached: unaffected
        filler.unlink()
        served_right(rt, [VICTIM, *OTHERS])
        budgets_whole(rt)
        rt.close()
        record("disk-full", "S3 download into a 1 MiB tmpfs cache", "StorageError (ENOSPC)")
    finally:
        s3.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_s3_server_stopped_mid_download_and_restarted(adapters, tmp_path):
    from ..catalog.s3server import S3Server, upload_dir

    s3 = S3Server().start()
    try:
        client = s3.client()
        client.create_bucket(Bucket="lp-outage")
        upload_dir(client, "lp-outage", "adapters", adapters)
        cache = tmp_path / "cache"
        cat = Catalog("s3://lp-outage/adapters", cache_dir=cache, storage_options=s3.storage_options())
        rt = new_runtime(cat, max_loras=3, load_workers=2)  # its loader threads start inside the trigger
        for n in OTHERS:
            cat.local_path(n)  # downloaded before the outage
        # the config is fetched and made read-only (chmod), then the server goes: weights never arrive
        with on_first_call(s3.stop, builtin=os.chmod) as fired:
            kind, err = outcome(rt.plan, [VICTIM])
        assert fired.is_set() and kind == "error" and isinstance(err, StorageError), err
        assert cache_leftovers(cache) == []
        served_right(rt, OTHERS)  # materialized before the outage: still served
        s3.start()
        served_right(rt, [VICTIM, *OTHERS])
        assert cache_leftovers(cache) == []
        budgets_whole(rt)
        rt.close()
        record("s3-server-stopped", "S3 (moto) stopped after the config, restarted", "StorageError")
    finally:
        s3.stop()
