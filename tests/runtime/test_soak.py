"""Concurrency soak: request threads run steps on random adapters while other threads refresh the
catalog, rewrite adapter files and pin/unpin. Every output row must equal the fp32 reference of the
adapter version its plan names; nothing may deadlock (watchdog); the budgets hold throughout."""

import faulthandler
import os
import random
import shutil
import sys
import threading
import time

import pytest

from loraplex.catalog.store import LocalStore
from loraplex.errors import AdapterChanged, CapacityError

from .helpers import Reference, inputs_for, reference_delta, stacked_delta, write_weights

SOAK_S = float(os.environ.get("LORAPLEX_SOAK_S", "12"))
NAMES = [f"a{i:02d}" for i in range(8)]


@pytest.mark.slow
def test_soak(make_runtime, many_dir, tmp_path):
    rt = make_runtime(many_dir, max_loras=4, load_workers=2, host_cache_bytes=3 * 90112)
    cat, store = rt.catalog, LocalStore(many_dir)
    variants = tmp_path / "variants"
    variants.mkdir()
    vlock = threading.Lock()
    files = {}  # (name, version) -> the weight file of that version, kept aside
    for n in NAMES:
        keep = variants / f"{n}-0.safetensors"
        shutil.copy(many_dir / n / "adapter_model.safetensors", keep)
        files[(n, store.stat(n).version)] = keep
    refs, refs_lock = {}, threading.Lock()
    checked = [t for t in rt.targets if t.name in ("embed_tokens", "model.layers.0.qkv", "model.layers.1.down",
                                                    "lm_head")]
    stop = threading.Event()
    counts = {"requests": 0, "rows": 0, "mismatches": 0, "capacity": 0, "changed_twice": 0, "rewrites": 0,
              "refreshes": 0, "pins": 0}
    clock = threading.Lock()
    failures = []

    def bump(k, n=1):
        with clock:
            counts[k] += n

    specs = {n: cat.get(n).spec for n in NAMES}  # only weights change in this soak, never configs

    def ref_of(key):
        with refs_lock:
            r = refs.get(key)
        if r is None:
            with vlock:
                path = files[key]
            r = Reference.from_file(key[0], specs[key[0]], path)
            with refs_lock:
                refs[key] = r
        return r

    def requester(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            names = [rng.choice([*NAMES, None]) for _ in range(rng.randint(1, 4))]
            if len({n for n in names if n}) > 3:
                continue
            tokens = [rng.randint(0, 3) for _ in names]
            try:
                with rt.step(names, tokens, timeout=30) as plan:
                    time.sleep(rng.random() * 0.002)  # let uploads and evictions race the "kernels"
                    slot_key = {slot: key for key, slot in plan.adapters.values()}
                    ts = plan.token_slots.tolist()
                    bad = 0
                    for t in checked:
                        x = inputs_for(t, len(ts), seed)
                        for i, slot in enumerate(ts):
                            got = stacked_delta(t, slot, x[i:i + 1])
                            want = reference_delta(t, None if slot < 0 else ref_of(slot_key[slot]), x[i:i + 1])
                            if not got.sub(want).abs().le(1e-4 + 1e-4 * want.abs()).all():
                                bad += 1
                    bump("rows", len(ts) * len(checked))
                    bump("mismatches", bad)
                bump("requests")
            except CapacityError:
                bump("capacity")
            except AdapterChanged:
                bump("changed_twice")  # rewritten again while its retry loaded: the caller retries
            except BaseException as e:  # noqa: BLE001
                failures.append(repr(e))
                stop.set()

    def refresher():
        while not stop.is_set():
            cat.refresh()
            bump("refreshes")
            time.sleep(0.02)

    def mutator():
        rng = random.Random(7)
        seed = 1
        while not stop.is_set():
            n = rng.choice(NAMES)
            seed += 1
            keep = variants / f"{n}-{seed}.safetensors"
            write_weights(many_dir / n / "adapter_model.safetensors", keep, seed=seed)
            with vlock:
                tmp = many_dir / n / "adapter_model.safetensors.new"
                shutil.copy(keep, tmp)
                os.replace(tmp, many_dir / n / "adapter_model.safetensors")
                files[(n, store.stat(n).version)] = keep
            bump("rewrites")
            time.sleep(0.1)

    def pinner():
        rng = random.Random(9)
        current = None
        while not stop.is_set():
            time.sleep(0.15)
            try:
                if current is not None:
                    rt.unpin(current)
                current = rng.choice(NAMES)
                rt.pin(current)
                bump("pins")
            except (CapacityError, AdapterChanged):
                current = None
            except BaseException as e:  # noqa: BLE001
                failures.append(repr(e))
                stop.set()

    threads = [threading.Thread(target=requester, args=(s,), daemon=True) for s in range(3)]
    threads += [threading.Thread(target=f, daemon=True) for f in (refresher, mutator, pinner)]
    faulthandler.dump_traceback_later(SOAK_S + 60, exit=False, file=sys.stderr)  # watchdog: show a deadlock
    try:
        for t in threads:
            t.start()
        stop.wait(SOAK_S)
        stop.set()
        for t in threads:
            t.join(30)
        stuck = [t.name for t in threads if t.is_alive()]
    finally:
        faulthandler.cancel_dump_traceback_later()
    s = rt.stats()
    print(f"\nsoak {SOAK_S:.0f}s: {counts}; gpu evictions {s['gpu']['evictions']}, host evictions "
          f"{s['host']['evictions']}, loads {s['loads_completed']}")
    assert not stuck, f"threads stuck (deadlock?): {stuck}"
    assert not failures, failures
    assert counts["mismatches"] == 0, counts
    assert counts["requests"] > 50 and counts["rewrites"] > 10 and counts["rows"] > 1000, counts
    assert rt.host.peak_bytes <= rt.config.host_cache_bytes
    assert s["gpu"]["in_use"] == 0 and s["host"]["reserved_bytes"] == 0
