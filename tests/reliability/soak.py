"""Churn soak engine (used by test_soak.py for CI and by bench/reliability.py for the long run).

Request threads run mixed-adapter steps through Runtime.step and compute every checked target's
output with the public LoRA ops (torch backend) from the stacked weights; each row is compared with
an fp32 reference built from the tensors this soak wrote for the (name, version) the plan names, with
the scaling worked out from the config by hand (not by the package's parser). Meanwhile other threads
rewrite adapters (atomic rename and in place), refresh the catalog, pin and unpin, and prefetch via
ensure/poll. Far more adapters than GPU slots or host budget, so evictions never stop.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import math
import os
import random
import sys
import threading
import time

import torch
from safetensors import safe_open
from safetensors.torch import save

from loraplex.catalog import Catalog
from loraplex.catalog.store import LocalStore
from loraplex.errors import AdapterChanged, CapacityError, InvalidAdapter
from loraplex.kernels import ops

from .common import CONFIG, WEIGHTS, rss_bytes
from .runtime_util import new_runtime

CHECKED = ("embed_tokens", "model.layers.0.qkv", "model.layers.1.gate_up", "model.layers.1.down", "lm_head")
TOL = 1e-4  # fp32 end to end: only summation order differs from the reference


class Soak:
    def __init__(self, root, bases: dict, *, adapters=32, max_loras=4, host_adapters=5, requesters=3,
                 seed=0):
        """root: an empty dir for the catalog; bases: {base name: its PEFT adapter dir}."""
        self.root = str(root)
        self.rng = random.Random(seed)
        self.names = [f"s{i:03d}" for i in range(adapters)]
        self.base_of = {}
        self.configs = {}
        self.shapes = {}
        for i, n in enumerate(self.names):
            b = sorted(bases)[i % len(bases)]
            self.base_of[n] = b
            if b not in self.configs:
                with open(os.path.join(bases[b], CONFIG), "rb") as f:
                    self.configs[b] = f.read()
                with safe_open(os.path.join(bases[b], WEIGHTS), "pt") as f:
                    self.shapes[b] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        self.lock = threading.Lock()  # guards seeds and the files of adapters being written
        self.seeds: dict = {}  # (name, version) -> seed of the tensors written for that version
        self.last_write: dict = {}
        self.store = LocalStore(self.root)  # versions as the catalog will list them
        for n in self.names:
            os.makedirs(os.path.join(self.root, n), exist_ok=True)
            with open(os.path.join(self.root, n, CONFIG), "wb") as f:
                f.write(self.configs[self.base_of[n]])
            self._write(n, self.rng.randrange(1 << 30), atomic=True)
        self.catalog = Catalog(self.root)
        self._refs: collections.OrderedDict = collections.OrderedDict()
        self._refs_lock = threading.Lock()
        largest = max(sum(math.prod(s) for s in shapes.values()) for shapes in self.shapes.values())
        self.rt = new_runtime(self.catalog, max_loras=max_loras, load_workers=2, load_timeout_s=60,
                              host_cache_bytes=host_adapters * (largest * 4 + 64 * 128))  # fp32 + alignment
        self.requesters = requesters
        self.counts = collections.Counter()
        self._counts_lock = threading.Lock()  # += on a Counter is not atomic across threads
        self.failures: list[str] = []
        self.samples: list[tuple[float, int, int]] = []  # (t, rss, host used + reserved)
        self.stop = threading.Event()

    # ---- the adapters this soak writes ----------------------------------------------------------
    def tensors(self, name: str, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(s, generator=g) * 0.5 for k, s in sorted(self.shapes[self.base_of[name]].items())}

    def _write(self, name: str, seed: int, atomic: bool) -> None:
        data = save(self.tensors(name, seed), metadata={"format": "pt"})
        path = os.path.join(self.root, name, WEIGHTS)
        with self.lock:
            if atomic:
                tmp = os.path.join(self.root, name, f".{WEIGHTS}.{seed}")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:  # truncate and rewrite the same inode: readers may see it half written
                with open(path, "wb") as f:
                    f.write(data)
            self.seeds[(name, self.store.stat(name).version)] = seed
            self.last_write[name] = time.monotonic()

    def reference(self, key) -> dict:
        """{module: (A fp32, B fp32 with scaling folded, embedding?)} of one version."""
        with self._refs_lock:
            if key in self._refs:
                self._refs.move_to_end(key)
                return self._refs[key]
        with self.lock:
            seed = self.seeds[key]
        name = key[0]
        cfg = json.loads(self.configs[self.base_of[name]])
        out = {}
        t = self.tensors(name, seed)
        for k, a in t.items():
            for suffix, emb in ((".lora_A.weight", False), (".lora_embedding_A", True)):
                if k.endswith(suffix):
                    module = k[len("base_model.model."):-len(suffix)]
                    b = t[k[:-len(suffix)] + suffix.replace("A", "B")]
                    r = a.shape[0]
                    alpha = next((v for p, v in cfg.get("alpha_pattern", {}).items()
                                  if module == p or module.endswith("." + p)), cfg["lora_alpha"])
                    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
                    out[module] = (a.double(), b.double() * scale, emb)
        with self._refs_lock:
            self._refs[key] = out
            while len(self._refs) > 64:
                self._refs.popitem(last=False)
        return out

    # ---- threads --------------------------------------------------------------------------------
    def bump(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[key] += n

    def _guard(self, fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - any escape is a soak failure
                self.failures.append(f"{fn.__name__}: {e!r}")
                self.stop.set()
        return run

    def requester(self, seed: int):
        rng = random.Random(seed)
        targets = [t for t in self.rt.targets if t.name in CHECKED]
        weights = [1.0 / (i + 1) ** 1.1 for i in range(len(self.names))]  # zipf-like popularity
        while not self.stop.is_set():
            names = [None if rng.random() < 0.15 else rng.choices(self.names, weights)[0]
                     for _ in range(rng.randint(1, 6))]
            if len({n for n in names if n}) > self.rt.config.max_loras - 1:
                continue
            tokens = [rng.randint(0, 3) for _ in names]
            try:
                with self.rt.step(names, tokens, timeout=30) as plan:
                    self._check(plan, targets, rng)
                self.bump("requests")
            except CapacityError:
                self.bump("capacity_retry")
            except AdapterChanged:
                self.bump("changed_twice")  # rewritten again while its retry loaded
            except InvalidAdapter as e:
                if "corrupt" not in str(e) and "no tensors" not in str(e):
                    raise
                self.bump("caught_mid_rewrite")  # an in-place rewrite seen half written

    def _check(self, plan, targets, rng) -> None:
        slots = plan.token_slots.tolist()
        T = len(slots)
        if T == 0:
            return
        slot_key = {slot: key for key, slot in plan.adapters.values()}
        refs = {s: self.reference(k) for s, k in slot_key.items()}
        for t in targets:
            if t.kind == "embedding":
                x = torch.randint(0, t.slices[0].in_features, (T,), generator=torch.Generator().manual_seed(
                    rng.randrange(1 << 30)))
                y = ops.add_lora_embedding(torch.zeros(T, t.out_features), x, t.A[0], t.B[0], plan, t.ranks)
            else:
                x = torch.randn(T, t.slices[0].in_features, generator=torch.Generator().manual_seed(
                    rng.randrange(1 << 30)))
                y = ops.add_lora_linear(torch.zeros(T, t.out_features), x, t.A, t.B, plan, t.ranks)
            want = torch.zeros(T, t.out_features, dtype=torch.float64)
            for i, slot in enumerate(slots):
                if slot < 0:
                    continue  # no adapter: the row must stay zero
                off = 0
                for sl in t.slices:
                    m = refs[slot].get(sl.peft_module)
                    if m is not None:
                        a, b, emb = m
                        h = a.t()[x[i]] if emb else x[i].double() @ a.t()
                        want[i, off:off + sl.out_features] = h @ b.t()
                    off += sl.out_features
            bad = ~torch.isclose(y.double(), want, atol=TOL, rtol=TOL).all(dim=1)
            self.bump("rows", T)
            self.bump("mismatches", int(bad.sum()))

    def mutator(self):
        rng = random.Random(7)
        i = 0
        while not self.stop.is_set():
            now = time.monotonic()
            # never the same adapter twice within 100 ms: a version is (inode, mtime, size), and the
            # kernel's mtime clock ticks every few ms, so two in-place writes in one tick look alike
            ready = [n for n in self.names if now - self.last_write.get(n, 0) > 0.1]
            if not ready:
                time.sleep(0.01)
                continue
            n = rng.choice(ready)
            i += 1
            self._write(n, rng.randrange(1 << 30), atomic=i % 2 == 0)
            self.bump("rewrites_atomic" if i % 2 == 0 else "rewrites_in_place", 1)
            time.sleep(0.015)

    def refresher(self):
        while not self.stop.is_set():
            self.catalog.refresh()  # what watch() does, faster
            self.bump("refreshes")
            time.sleep(0.01)

    def pinner(self):
        rng = random.Random(9)
        current = None
        while not self.stop.is_set():
            time.sleep(0.1)
            if current is not None:
                self.rt.unpin(current)
            current = rng.choice(self.names)
            try:
                self.rt.pin(current)
                self.bump("pins")
            except (CapacityError, AdapterChanged, InvalidAdapter):
                current = None

    def prefetcher(self):
        rng = random.Random(11)
        while not self.stop.is_set():
            self.rt.ensure(rng.sample(self.names, 3))
            self.rt.poll()
            self.bump("prefetches")
            time.sleep(0.02)

    def sampler(self, t0: float):
        while not self.stop.wait(0.25):
            h = self.rt.host
            self.samples.append((time.monotonic() - t0, rss_bytes(), h.used_bytes + h.reserved_bytes))

    def run(self, seconds: float) -> dict:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._guard(lambda s=s: self.requester(s)), name=f"req{s}", daemon=True)
                   for s in range(self.requesters)]
        threads += [threading.Thread(target=self._guard(f), name=f.__name__, daemon=True)
                    for f in (self.mutator, self.refresher, self.pinner, self.prefetcher)]
        threads.append(threading.Thread(target=self.sampler, args=(t0,), name="sampler", daemon=True))
        faulthandler.dump_traceback_later(seconds + 60, exit=False, file=sys.stderr)  # shows a deadlock
        try:
            for t in threads:
                t.start()
            self.stop.wait(seconds)
            self.stop.set()
            for t in threads:
                t.join(30)
        finally:
            faulthandler.cancel_dump_traceback_later()
        s = self.rt.stats()
        return {"seconds": round(time.monotonic() - t0, 1), "adapters": len(self.names),
                "max_loras": self.rt.config.max_loras, "host_cache_bytes": self.rt.config.host_cache_bytes,
                "stuck_threads": [t.name for t in threads if t.is_alive()], "failures": self.failures,
                **self.counts, "host_peak_bytes": self.rt.host.peak_bytes, "gpu_in_use_after": s["gpu"]["in_use"],
                "host_reserved_after": s["host"]["reserved_bytes"], "gpu_evictions": s["gpu"]["evictions"],
                "host_evictions": s["host"]["evictions"], "loads": s["loads_completed"],
                "load_failures": s["loads_failed"], "rss_samples": self.samples}
