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
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from concurrent.futures import CancelledError, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, fields

import torch

from ..config import RuntimeConfig
from ..errors import AdapterChanged, CapacityError, ConfigError, LoraplexError, StorageError
from .arena import HostArena
from .host_cache import HostCache
from .loader import Loader
from .metrics import RuntimeMetrics
from .plan import BatchPlan
from .policy import make_policy
from .pool import SlotPool
from .schedule import SchedulingMixin
from .slab import plan_layout
from .steps import Lease, StepTracker
from .targets import LoraTarget, SliceSpec
from .upload import Uploader

log = logging.getLogger("loraplex.runtime")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class RuntimePlan(BatchPlan):
    """A BatchPlan that also says which adapter version each slot holds, and holds those slots."""

    adapters: dict = field(default_factory=dict)  # name -> ((name, version), slot)
    request_slots: tuple = ()  # slot per request, -1 for no adapter
    lease: Lease | None = field(default=None, repr=False)
    static: bool = False


class Runtime(SchedulingMixin):
    def __init__(self, catalog, config: RuntimeConfig | None = None, *, metrics_registry=None):
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
        ref = weakref.ref(self)

        def on_change(diff, ref=ref):  # a weak link: the catalog must not keep dead runtimes alive
            rt = ref()
            if rt is not None:
                rt._on_catalog_change(diff)

        catalog.subscribe(on_change)

    # ---- targets --------------------------------------------------------------------------------
    def new_target(self, name: str, slices, kind: str = "linear") -> LoraTarget:
        """Create (with the config's max_loras, max_rank, dtype, device) and register a target."""
        slices = [s if isinstance(s, SliceSpec) else SliceSpec(*s) for s in slices]
        t = LoraTarget(name, slices, kind, self.config.max_loras, self.config.max_rank, self.dtype, self.device)
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

    def _layout_for(self, entry, modules):
        c = self.config
        return plan_layout(entry.name, entry.spec, modules, tuple(self.targets), c.max_rank, self.dtype,
                           c.unmatched_modules, self._generation)

    # ---- pins and versions ----------------------------------------------------------------------
    def _current_version(self, name: str):
        try:
            return self.catalog.get(name).version
        except LoraplexError:
            return None

    def _is_pinned(self, key) -> bool:
        return key[0] in self._pinned and self._current_version(key[0]) == key[1]

    def pin(self, name: str) -> None:
        """Keep `name` (its current version, and later versions) resident in both tiers."""
        self.catalog.get(name)
        with self._lock:
            if name not in self._pinned and len(self._pinned) >= self.config.max_loras:
                raise CapacityError(f"cannot pin LoRA adapter '{name}': max_loras={self.config.max_loras} "
                                    f"adapters are pinned already")
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

    def _on_catalog_change(self, diff) -> None:
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

    # ---- plans ----------------------------------------------------------------------------------
    def plan(self, names, tokens=None, *, static: bool = False, timeout: float | None = None,
             load_timeout: float | None = None) -> RuntimePlan:
        """A BatchPlan for requests `names` (None = no adapter) of `tokens` tokens each (default 1),
        every adapter resident; blocks on misses. Release it (release() or `with step(...)`) once the
        step that reads it has been issued. static=True builds into the primary plan buffers (what a
        captured CUDA graph reads) even if another plan still uses them: the caller orders the steps.
        timeout: how long to wait for GPU slots held by steps in flight; load_timeout: for storage
        (both default to config.load_timeout_s). Raises CapacityError, or the catalog's error."""
        c = self.config.load_timeout_s
        return self._plan(names, tokens, static, c if load_timeout is None else load_timeout,
                          c if timeout is None else timeout)

    def _plan(self, names, tokens, static: bool, load_timeout: float, slot_timeout: float) -> RuntimePlan:
        names = list(names)
        tokens = [1] * len(names) if tokens is None else [int(t) for t in tokens]
        if len(tokens) != len(names) or any(t < 0 for t in tokens):
            raise ValueError(f"tokens_per_request must be {len(names)} non-negative counts, got {tokens}")
        if sum(tokens) > self.config.max_num_tokens:
            raise CapacityError(f"step has {sum(tokens)} tokens; max_num_tokens is {self.config.max_num_tokens}")
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        for attempt in range(2):
            entries = {n: self.catalog.get(n) for n in distinct}
            try:
                slots = self._acquire(list(entries.values()), load_timeout, slot_timeout)
                break
            except AdapterChanged:
                if attempt:
                    raise
                self.catalog.refresh()  # never under our locks: listeners take them
        adapters = {n: (e.key, slots[e.key]) for n, e in entries.items()}
        request_slots = tuple(-1 if n is None else adapters[n][1] for n in names)
        lease = Lease(slots.values(), self.steps.take_plan_set(static),
                      torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)
        try:
            bp = self._build(lease, request_slots, tokens, len(distinct))
        except BaseException:
            self.steps.release(lease, static)
            raise
        return RuntimePlan(**{f.name: getattr(bp, f.name) for f in fields(BatchPlan)}, adapters=adapters,
                           request_slots=request_slots, lease=lease, static=static)

    def _build(self, lease: Lease, request_slots, tokens, n_distinct: int) -> BatchPlan:
        ps, T, L = lease.plan_set, sum(tokens), self.config.max_loras
        cuda = self.device.type == "cuda"
        # CUDA: a fresh pinned block per plan. The caching host allocator keeps it until the copy below
        # ran, so the next plan (a static one reuses the same device buffers at once) cannot overwrite
        # inputs that a still-queued copy has yet to read.
        host = torch.empty(T + L, dtype=torch.int32, pin_memory=True) if cuda else ps.host[:T + L]
        if T:
            per_token = torch.repeat_interleave(torch.tensor(request_slots, dtype=torch.int32), torch.tensor(tokens))
            host[:T].copy_(per_token)
        host[T:].copy_(torch.tensor(self.pool.slot_ranks(), dtype=torch.int32))
        src = host
        if cuda:
            src = ps.dev[:T + L]
            src.copy_(host, non_blocking=True)
            for i in set(lease.slots):  # order this step after the uploads of its slots, and only those
                fill = self.pool.slots[i].fill
                if fill is not None and not fill.ready_on_device():
                    lease.stream.wait_event(fill.upload.done)
        return ps.buffers.build(src[:T], src[T:], max_active=n_distinct)

    def release(self, plan: RuntimePlan) -> None:
        """The step reading `plan` has been issued: its slots come back once it finished."""
        if plan.lease is not None:
            self.steps.release(plan.lease, plan.static)

    @contextlib.contextmanager
    def step(self, names, tokens=None, **kw):
        plan = self.plan(names, tokens, **kw)
        try:
            yield plan
        finally:
            self.release(plan)

    @property
    def plan_buffers(self):
        """The primary PlanBuffers: what plan(..., static=True) builds into (for CUDA graph capture)."""
        return self.steps.primary.buffers

    def _reclaim(self) -> None:
        self.steps.reclaim()

    def _acquire(self, entries, timeout: float, slot_timeout: float) -> dict:
        """Slots for every entry, filled; on any error nothing stays held and the first error is raised."""
        self._reclaim()
        slots, fills, waits = self.pool.acquire([e.key for e in entries], timeout=slot_timeout,
                                                reclaim=self._reclaim)
        try:
            errors = self._fill(fills, {e.key: e for e in entries}, timeout)
            for f in waits:
                if not f.done.wait(timeout):
                    errors.append(StorageError(f.key[0], f"another step's load did not finish within {timeout:.0f}s"))
                elif f.error is not None:
                    errors.append(f.error)
            if errors:
                raise errors[0]
        except BaseException:
            self.pool.release(slots.values())
            raise
        return slots

    def _fill(self, fills, entries: dict, timeout: float) -> list:
        """Load (or take from the host cache) and upload every adapter this plan must write."""
        errors, futs = [], {}
        for f in fills:
            try:
                futs[self.loader.acquire(entries[f.key], claim=True)] = f
            except BaseException as e:  # noqa: BLE001
                self.pool.finish_fill(f, error=e)
                errors.append(e)
        try:
            for fut in as_completed(futs, timeout=timeout):
                f = futs[fut]
                try:
                    slab = fut.result()
                except CancelledError:  # a refresh cancelled the queued load of this version
                    e = AdapterChanged(f.key[0], f.key[1], self._current_version(f.key[0]))
                    self.pool.finish_fill(f, error=e)
                    errors.append(e)
                    continue
                except BaseException as e:  # noqa: BLE001 - the catalog's error, for every waiter
                    self.pool.finish_fill(f, error=e)
                    errors.append(e)
                    continue
                self._upload(f, slab, errors)
        except FutureTimeout:
            for fut, f in futs.items():
                if not f.done.is_set():
                    e = StorageError(f.key[0], f"load did not finish within {timeout:.0f}s")
                    self.pool.finish_fill(f, error=e)
                    errors.append(e)
                    fut.add_done_callback(self._drop_late_lease)
        return errors

    def _drop_late_lease(self, fut) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.host.unlease(fut.result().key)

    def _upload(self, fill, slab, errors: list) -> None:
        handle = None
        try:
            if slab.layout.generation != self._generation:
                raise RuntimeError(f"LoRA adapter '{slab.key[0]}' was packed for other targets")
            handle = self.uploader.upload(slab, fill.slot, self.pool.slots[fill.slot].ranks)
            self.pool.finish_fill(fill, upload=handle if handle.done is not None else None,
                                  slice_ranks=slab.layout.slice_ranks, rank=max(slab.layout.target_ranks, default=0))
            self.metrics.uploaded_bytes.inc(slab.nbytes)
            if handle.done is None:
                self.metrics.phase("upload", handle.seconds)
        except BaseException as e:  # noqa: BLE001
            self.pool.finish_fill(fill, error=e)
            errors.append(e)
        finally:
            if handle is not None and handle.done is not None:
                self.steps.upload_issued(handle, slab.key)
            else:
                self.host.unlease(slab.key)

    # ---- inspection and policy ------------------------------------------------------------------
    def slot_of(self, name: str):
        """The GPU slot holding the current version of `name`, or None."""
        v = self._current_version(name)
        return None if v is None else self.pool.resident((name, v))

    def set_cache_policy(self, policy, tier: str = "both") -> None:
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

    def stats(self) -> dict:
        gpu = self.pool.stats()
        gpu["bytes"] = gpu["entries"] * sum(t.nbytes_per_slot for t in self.targets)
        return {
            "host": self.host.stats(),
            "gpu": gpu,
            "loads_in_flight": self.loader.in_flight(),
            "loads_completed": self.loader.completed,
            "loads_failed": self.loader.failed,
            "pinned": self.pinned(),
            **{f"{k}_in_flight": v for k, v in self.steps.in_flight().items()},
        }

    def close(self) -> None:
        self.loader.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Runtime", "RuntimePlan"]
