"""Runtime: adapters by name -> resident GPU slots and a BatchPlan per step.

    rt = Runtime(catalog, RuntimeConfig(max_loras=8, max_rank=16))
    qkv = rt.new_target("layers.0.qkv", slices, "linear")       # or rt.register_target(LoraTarget(...))
    with rt.step(["a", None, "b"], [5, 1, 3]) as plan:             # blocks on misses
        ... kernels read qkv.A / qkv.B through plan ...
    rt.ensure(["c"]) -> {"c": "loading"}; rt.poll() -> {"c": "ready"}  # non-blocking, for schedulers

Versions: everything is keyed by (name, version). A catalog refresh that changes an adapter makes new
plans load the new version, while plans built before keep reading the old one (its slot is not
reused until they are released). A load that races a change (AdapterChanged) refreshes the catalog
and retries once.

Merged mode (merging.py, merged.py): one adapter version merged into the base weights; its requests take
no slot, every other request's slot holds its correction. rt.merge(name | None) switches it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import RuntimeConfig
from ..errors import AdapterChanged, CapacityError, ConfigError, LoraplexError, StorageError
from .arena import HostArena
from .fill import FillMixin
from .host_cache import HostCache
from .loader import Loader
from .merging import MergeMixin
from .metrics import RuntimeMetrics
from .plan import BatchPlan
from .policy import make_policy
from .pool import SlotPool
from .schedule import SchedulingMixin
from .slab import plan_layout
from .steps import Lease, StepTracker
from .targets import LoraTarget, SliceSpec
from .upload import Uploader

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..catalog.base import CatalogBase
    from ..catalog.entry import AdapterEntry, CatalogDiff
    from .plan import PlanBuffers
    from .policy import EvictionPolicy

log = logging.getLogger("loraplex.runtime")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_PLAN_FIELDS = tuple(f.name for f in fields(BatchPlan))


@dataclass
class RuntimePlan(BatchPlan):
    """A BatchPlan that also says which adapter version each slot holds, and holds those slots."""

    adapters: dict = field(default_factory=dict)  # name -> ((name, version), slot)
    request_slots: tuple = ()  # slot per request, -1 for no adapter
    lease: Lease | None = field(default=None, repr=False)
    static: bool = False
    merged: tuple | None = None  # the (name, version) merged into the base weights for this step


class Runtime(SchedulingMixin, FillMixin, MergeMixin):
    """Adapters of `catalog` made resident on demand for the steps of one model (see the module doc)."""

    def __init__(self, catalog: CatalogBase, config: RuntimeConfig | None = None, *,
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.catalog = catalog
        self.config = config = config or RuntimeConfig()
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {config.device!r} asked for, but CUDA is not available")
        self.dtype = _DTYPES[config.dtype]
        self.metrics = RuntimeMetrics(metrics_registry)
        self.metrics.slots_total.set(config.max_loras)
        self.targets: list[LoraTarget] = []
        self._generation = 0
        self._pinned: set[str] = set()
        self._errors: dict[str, BaseException] = {}
        self._watched: dict[str, None] = {}
        self._lock = threading.RLock()
        self._tls = threading.local()
        self.arena = HostArena(config.host_cache_bytes, pin=self.device.type == "cuda")
        self.host = HostCache(config.host_cache_bytes, config.max_cpu_loras, make_policy(config.eviction_policy),
                              is_pinned=self._is_pinned, metrics=self.metrics, reclaim=self._reclaim,
                              wait_s=config.load_timeout_s, arena=self.arena)
        self.pool = SlotPool(config.max_loras, make_policy(config.eviction_policy), is_pinned=self._is_pinned,
                             metrics=self.metrics)
        self.loader = Loader(catalog, self.host, self._layout_for, workers=config.load_workers,
                             pin=self.device.type == "cuda", metrics=self.metrics)
        self.uploader = Uploader(self.targets, self.device, config.upload_mode)
        self.steps = StepTracker(self.pool, self.host, config.max_num_tokens, config.max_loras, self.device,
                                 self.metrics)
        self._init_merge()
        ref = weakref.ref(self)

        # a weak link: the catalog must not keep dead runtimes alive
        def on_change(diff: CatalogDiff, ref: weakref.ref[Runtime] = ref) -> None:
            rt = ref()
            if rt is not None:
                rt._on_catalog_change(diff)

        catalog.subscribe(on_change)

    # ---- targets --------------------------------------------------------------------------------
    def new_target(self, name: str, slices: Iterable[SliceSpec | tuple[str, int, int]], kind: str = "linear"
                   ) -> LoraTarget:
        """Create (with the config's max_loras, max_rank, dtype, device) and register a target."""
        specs = [s if isinstance(s, SliceSpec) else SliceSpec(*s) for s in slices]
        t = LoraTarget(name, specs, kind, self.config.max_loras, self.config.max_rank, self.dtype, self.device)
        return self.register_target(t)

    def register_target(self, target: LoraTarget) -> LoraTarget:
        c = self.config
        if (target.max_loras, target.max_rank) != (c.max_loras, c.max_rank):
            raise ConfigError(f"target {target.name} has max_loras={target.max_loras}, max_rank={target.max_rank}; "
                              f"the runtime has {c.max_loras}, {c.max_rank}")
        if target.dtype != self.dtype or target.device != self.device:
            raise ConfigError(f"target {target.name} is {target.dtype} on {target.device}; the runtime uses "
                              f"{self.dtype} on {self.device}")
        modules = {s.peft_module for t in self.targets for s in t.slices}
        dup = [s.peft_module for s in target.slices if s.peft_module in modules]
        if any(t.name == target.name for t in self.targets) or dup:
            raise ConfigError(f"target {target.name} (modules {dup}) is already registered")
        if self._merge is not None:
            raise ConfigError(f"register LoRA target {target.name} before merging an adapter (merged: "
                              f"'{self._merge.key[0]}')")
        with self.pool.lock:
            if self.loader.in_flight():
                raise RuntimeError("register LoRA targets before loading adapters (loads are in flight)")
            self.pool.add_target(len(target.slices))
            for t in (*target.A, *target.B, target.ranks):
                t.zero_()  # the pool's padding bookkeeping assumes a fresh target is all zeros
            self.targets.append(target)
            self._generation += 1
            self.host.clear()  # cached slabs were laid out for the old registry
        return target

    def _layout_for(self, entry: AdapterEntry, modules: Any) -> Any:
        c = self.config
        return plan_layout(entry.name, entry.spec, modules, tuple(self.targets), c.max_rank, self.dtype,
                           c.unmatched_modules, self._generation)

    # ---- pins and versions ----------------------------------------------------------------------
    def _current_version(self, name: str) -> str | None:
        try:
            return self.catalog.get(name).version
        except LoraplexError:
            return None

    def _is_pinned(self, key: tuple) -> bool:
        m = self._merge
        if m is not None and key == m.base_key:  # merged mode: the base-model requests' correction
            return True
        return key[0] in self._pinned and self._current_version(key[0]) == key[1]

    def pin(self, name: str) -> None:
        """Keep `name` (its current version, and later versions) resident in both tiers."""
        self.catalog.get(name)
        with self._lock:
            limit = self.config.max_loras - (self._merge is not None)  # merged: base requests hold one slot
            if name not in self._pinned and len(self._pinned) >= limit:
                why = ", one slot for the merged correction" if limit < self.config.max_loras else ""
                raise CapacityError(f"cannot pin LoRA adapter '{name}': {limit} adapters are pinned already "
                                    f"(max_loras={self.config.max_loras}{why})")
            new = name not in self._pinned
            self._pinned.add(name)
            self.metrics.pinned.set(len(self._pinned))
        try:
            self._make_resident(name, self.config.load_timeout_s)
        except BaseException:
            if new:
                self.unpin(name)
            raise

    def _make_resident(self, name: str, slot_timeout: float) -> None:
        """Host cache first (a GPU hit alone would leave the host tier without it), then a slot."""
        t = self.config.load_timeout_s
        for attempt in range(2):
            entry = self.catalog.get(name)
            try:
                self.loader.acquire(entry, claim=False).result(timeout=t)
                break
            except (AdapterChanged, CancelledError):
                if attempt:
                    raise AdapterChanged(name, entry.version, self._current_version(name)) from None
                self.catalog.refresh()
            except FutureTimeout:
                raise StorageError(name, f"load did not finish within {t:.0f}s") from None
        self.release(self._plan([name], [0], False, t, slot_timeout))

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(name)
            self.metrics.pinned.set(len(self._pinned))

    def _repin(self, name: str) -> None:
        """A pinned adapter changed: make its new version resident now, if a slot is free at once.
        Runs in the refreshing thread; a refresh triggered by this very load does not recurse."""
        if getattr(self._tls, "repinning", False):
            return
        self._tls.repinning = True
        try:
            self._make_resident(name, 0.05)
        except (LoraplexError, RuntimeError) as e:
            log.warning("pinned LoRA adapter '%s' changed; its new version is loaded on next use: %s", name, e)
        finally:
            self._tls.repinning = False

    def pinned(self) -> list[str]:
        return sorted(self._pinned)

    def _on_catalog_change(self, diff: CatalogDiff) -> None:
        for name in (*diff.changed, *diff.removed):
            current = self._current_version(name)
            self.loader.cancel_stale(name, current)
            self.host.drop_stale(name, current)
            self.pool.drop_stale(name, current)
            self._errors.pop(name, None)
            if current is not None and name in self._pinned:
                self._repin(name)
        for name in diff.added:
            self._errors.pop(name, None)
        self._merge_catalog_change(diff)

    # ---- plans ----------------------------------------------------------------------------------
    def plan(self, names: Iterable[str | None], tokens: Sequence[int] | None = None, *, static: bool = False,
             timeout: float | None = None, load_timeout: float | None = None) -> RuntimePlan:
        """A BatchPlan for requests `names` (None = no adapter) of `tokens` tokens each (default 1),
        every adapter resident; blocks on misses. Release it (release() or `with step(...)`) once the
        step that reads it has been issued. static=True builds into the primary plan buffers (what a
        captured CUDA graph reads) even if another plan still uses them: the caller orders the steps.
        timeout: how long to wait for GPU slots held by steps in flight; load_timeout: for storage
        (both default to config.load_timeout_s). Raises CapacityError, or the catalog's error."""
        c = self.config.load_timeout_s
        return self._plan(names, tokens, static, c if load_timeout is None else load_timeout,
                          c if timeout is None else timeout)

    def _plan(self, names: Iterable[str | None], tokens: Sequence[int] | None, static: bool, load_timeout: float,
              slot_timeout: float) -> RuntimePlan:
        names = list(names)
        if tokens is None:  # one token per request (decode): the per-token slots are the request slots
            n_tokens = len(names)
        else:
            tokens = [int(t) for t in tokens]
            if len(tokens) != len(names) or any(t < 0 for t in tokens):
                raise ValueError(f"tokens_per_request must be {len(names)} non-negative counts, got {tokens}")
            n_tokens = sum(tokens)
        if n_tokens > self.config.max_num_tokens:
            raise CapacityError(f"step has {n_tokens} tokens; max_num_tokens is {self.config.max_num_tokens}")
        self._maybe_switch()  # an automatic merge switch asked for runs here if no plan is active
        # active from here until release: a merge switch waits for this plan, and this plan for a switch
        self._gate.enter(slot_timeout)
        try:
            with self._gate.building():
                plan = self._plan_held(names, tokens, n_tokens, static, load_timeout, slot_timeout)
        except BaseException:
            self._gate.exit()
            raise
        self._observe(names, tokens)
        return plan

    def _plan_held(self, names: Sequence[str | None], tokens: list[int] | None, n_tokens: int, static: bool,
                   load_timeout: float, slot_timeout: float) -> RuntimePlan:
        merge = self._merge  # fixed while this plan is active (the step gate)
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        base_key = merge.base_key if merge is not None and None in names else None
        for attempt in range(2):
            entries = {n: self.catalog.get(n) for n in distinct}
            own = [e for e in entries.values() if merge is None or e.key != merge.key]  # merged: no slot
            try:
                slots = self._acquire(own, load_timeout, slot_timeout, base_key)
                break
            except AdapterChanged:
                if attempt:
                    raise
                self.catalog.refresh()  # never under our locks: listeners take them
        # from here on the slots are held: whatever fails gives them back
        lease = Lease(slots.values(), None,
                      torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)
        try:
            adapters = {n: (e.key, slots.get(e.key, -1)) for n, e in entries.items()}
            none_slot = -1 if base_key is None else slots[base_key]
            request_slots = tuple(none_slot if n is None else adapters[n][1] for n in names)
            lease.plan_set = self.steps.take_plan_set(static)
            bp = self._build(lease, request_slots, tokens, n_tokens, len(slots), static)
        except BaseException:
            self.steps.release(lease, static)
            raise
        return RuntimePlan(**{f: getattr(bp, f) for f in _PLAN_FIELDS}, adapters=adapters,
                           request_slots=request_slots, lease=lease, static=static,
                           merged=None if merge is None else merge.key)

    def _build(self, lease: Lease, request_slots: tuple[int, ...], tokens: list[int] | None, T: int,
               n_distinct: int, static: bool) -> BatchPlan:
        """The step's inputs (slot per token, rank per slot) go through one host block of T + L int32,
        written with numpy (no torch op per request); on CUDA one H2D copy into the plan set's static
        device buffer, then PlanBuffers.build runs on the device without a host sync.

        Kernel grids are sized from the plan's max_active. A static plan is what a CUDA graph captures
        and later replays with other plans written into the same buffers, so its bound is every slot,
        not this step's adapter count (which would silently skip the adapters past it on replay; the
        launchers refuse to be captured with a tighter bound)."""
        ps, L = lease.plan_set, self.config.max_loras
        assert ps is not None  # _plan gave the lease its plan set
        cuda = self.device.type == "cuda"
        # CUDA: a fresh pinned block per plan. The caching host allocator keeps it until the copy below
        # ran, so the next plan (a static one reuses the same device buffers at once) cannot overwrite
        # inputs that a still-queued copy has yet to read.
        host = torch.empty(T + L, dtype=torch.int32, pin_memory=True) if cuda else ps.host[:T + L]  # type: ignore[index]
        h = host.numpy()
        if tokens is None:
            h[:T] = request_slots
        elif T:
            h[:T] = np.repeat(np.asarray(request_slots, dtype=np.int32), tokens)
        h[T:] = self.pool.slot_ranks()
        src = host
        if cuda:
            src = ps.dev[:T + L]  # type: ignore[index]  # PlanSet: dev on CUDA, host on CPU
            src.copy_(host, non_blocking=True)
            for i in set(lease.slots):  # order this step after the uploads of its slots, and only those
                fill = self.pool.slots[i].fill
                if fill is not None and not fill.ready_on_device():
                    lease.stream.wait_event(fill.upload.done)
        bound = None if static else n_distinct
        return ps.buffers.build(src[:T], src[T:], max_active=bound)

    def release(self, plan: RuntimePlan) -> None:
        """The step reading `plan` has been issued: its slots come back once it finished."""
        if plan.lease is not None and not plan.lease.released:
            self.steps.release(plan.lease, plan.static)
            self._gate.exit()
            self._maybe_switch()

    @contextlib.contextmanager
    def step(self, names: Iterable[str | None], tokens: Sequence[int] | None = None, **kw: Any
             ) -> Iterator[RuntimePlan]:
        plan = self.plan(names, tokens, **kw)
        try:
            yield plan
        finally:
            self.release(plan)

    @property
    def plan_buffers(self) -> PlanBuffers:
        """The primary PlanBuffers: what plan(..., static=True) builds into (for CUDA graph capture)."""
        return self.steps.primary.buffers

    def _reclaim(self) -> None:
        self.steps.reclaim()

    # ---- inspection and policy ------------------------------------------------------------------
    def slot_of(self, name: str) -> int | None:
        """The GPU slot holding the current version of `name`, or None."""
        v = self._current_version(name)
        return None if v is None else self.pool.resident((name, v))

    def set_cache_policy(self, policy: str | type[EvictionPolicy] | Any, tier: str = "both") -> None:
        """policy: "lru" | "lfu" | an EvictionPolicy class or factory; tier: "host", "gpu" or "both"."""
        if tier not in ("host", "gpu", "both"):
            raise ValueError(f"tier must be host, gpu or both, got {tier!r}")
        tiers = (("host", self.host, self.host.keys), ("gpu", self.pool, lambda: list(self.pool.by_key)))
        for name, obj, keys in tiers:
            if tier not in (name, "both"):
                continue
            new = make_policy(policy)
            with obj._cond:
                for k in reversed(obj.policy.order(keys())):  # carry the recency order over
                    new.touch(k)
                obj.policy = new

    def stats(self) -> dict[str, Any]:
        gpu = self.pool.stats()
        gpu["bytes"] = gpu["entries"] * sum(t.nbytes_per_slot for t in self.targets)
        return {
            "host": self.host.stats(),
            "gpu": gpu,
            "loads_in_flight": self.loader.in_flight(),
            "loads_completed": self.loader.completed,
            "loads_failed": self.loader.failed,
            "pinned": self.pinned(),
            "merge": self.merge_stats(),
            **{f"{k}_in_flight": v for k, v in self.steps.in_flight().items()},
        }

    def close(self) -> None:
        self.loader.shutdown(wait=True)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Runtime", "RuntimePlan"]
