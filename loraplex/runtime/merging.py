"""Merged mode in the Runtime: bind base weights, switch the merged adapter, ask for automatic switches.
Mixed into Runtime (uses its catalog, loader, host, pool, targets, config, steps). The pieces (checks,
correction packing, pristine copies) are in merged.py; the policy in merge_policy.py.

A switch (merge(name), merge(None), or an automatic one) is, in order:
  1. prepare, with steps still running: M's slab from the host cache or storage; checks of every base
     module M targets (plain float nn.Linear / nn.Embedding, bound, not tied); the negated copy.
  2. close the step gate (gate.py): no plan active, new ones wait. On CUDA, a device sync, so no
     kernel of an earlier step still reads the weights.
  3. every slice changed by the previous merge is copied back from its pristine copy (bit-exact); the
     slices of M get a pristine copy (if they have none) and W += ΔW_M; the slot pool forgets every slot
     (each holds a correction packed against the previous merged adapter); the state is swapped.
  4. open the gate; pinned adapters are made resident again (their slots were forgotten).
If step 3 fails, every slice is restored and the runtime is left unmerged.

Who switches: merge() explicitly (it waits up to load_timeout_s for running steps, and turns the
automatic policy off); the policy and a republished merged adapter (a new version in the catalog is
merged again, a removed one unmerged) only ask: their switch runs at the next step boundary where no
plan is active (the start of a plan, or the release that leaves none), never waiting. Until then
nothing is wrong, only slower: every (name, version) other than the merged one is served through its
correction, including a new version of the merged adapter's own name.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

import torch

from ..errors import AdapterChanged, CapacityError, ConfigError, LoraplexError, StorageError
from .gate import StepGate
from .merge_policy import MergePolicy
from .merged import BaseWeight, MergeState, Pristine, check_mergeable, merged_delta, negated

if TYPE_CHECKING:
    from .targets import LoraTarget

log = logging.getLogger("loraplex.runtime")
ENV_MERGE = "LORAPLEX_MERGE"


class _Pending:
    """An automatic switch asked for: to `name` (None: unmerge), ready once its state is prepared."""

    def __init__(self, name):
        self.name = name
        self.key = None
        self.state: MergeState | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()


class MergeMixin:
    def _init_merge(self) -> None:
        cfg = self.config
        self._gate = StepGate()
        self._bases: dict = {}  # target name -> [BaseWeight | None per slice]
        self._pristine = Pristine(pin=self.device.type == "cuda")
        self._merge: MergeState | None = None
        self._switch_lock = threading.Lock()  # one switch (prepare + apply) at a time
        self._pending: _Pending | None = None
        self.configured_merge = cfg.merge_adapter or os.environ.get(ENV_MERGE, "").strip() or None
        if self.configured_merge and cfg.merge_auto is not None:
            raise ConfigError(f"${ENV_MERGE}={self.configured_merge!r} pins the merged adapter but merge_auto "
                              f"asks for the automatic policy: set one of them")
        self._policy = MergePolicy(cfg.merge_auto) if cfg.merge_auto is not None else None
        self.switches = 0
        self._delta_ratio = 0.0  # largest ||ΔW|| / ||W|| over the merged slices

    # ---- binding and inspection -----------------------------------------------------------------
    def bind_base(self, target: LoraTarget, bases: Iterable[BaseWeight | None]) -> None:
        """The base weight each slice of `target` adds to (BaseWeight per slice, None where unknown):
        what merged mode changes. inject() binds every target it creates."""
        bases = list(bases)
        if target not in self.targets or len(bases) != len(target.slices):
            raise ConfigError(f"bind_base: {target.name} is not registered, or {len(bases)} bases for "
                              f"{len(target.slices)} slices")
        if any(b is not None and not isinstance(b, BaseWeight) for b in bases):
            raise ConfigError("bind_base: give a BaseWeight (or None) per slice")
        self._bases[target.name] = bases

    def merged(self) -> tuple[str, object] | None:
        """(name, version) of the adapter merged into the base weights, or None."""
        m = self._merge
        return None if m is None else m.key

    def merge_stats(self) -> dict:
        m = self._merge
        return {"merged": None if m is None else list(m.key), "switches": self.switches,
                "pristine_bytes": self._pristine.nbytes, "correction_bytes": 0 if m is None else m.minus.nbytes,
                "delta_ratio": 0.0 if m is None else self._delta_ratio, "policy": self._policy is not None,
                "pending": None if self._pending is None else self._pending.name}

    # ---- explicit switch ------------------------------------------------------------------------
    def merge(self, name: str | None, *, timeout: float | None = None) -> tuple[str, object] | None:
        """Merge adapter `name` (its current version) into the base weights, or unmerge (None). Waits up
        to `timeout` (default load_timeout_s) for running steps; a thread holding a plan cannot switch.
        Turns the automatic policy off. Returns merged(). ConfigError if a module cannot be merged."""
        t = self.config.load_timeout_s if timeout is None else timeout
        self._policy = None
        self._pending = None
        with self._switch_lock:
            state = None if name is None else self._prepare(name, t)
            if not self._gate.close(t):
                raise CapacityError(f"cannot switch the merged LoRA adapter to {name!r}: steps still in flight "
                                    f"after {t:.1f}s (release every plan first; a thread holding one cannot switch)")
            try:
                self._apply(state)
            finally:
                self._gate.open()
        self._after_switch()
        return self.merged()

    def _prepare(self, name: str, timeout: float) -> MergeState:
        for attempt in range(2):
            entry = self.catalog.get(name)
            fut = self.loader.acquire(entry, claim=True)
            try:
                slab = fut.result(timeout=timeout)
                break
            except (AdapterChanged, CancelledError):
                if attempt:
                    raise AdapterChanged(name, entry.version, self._current_version(name)) from None
                self.catalog.refresh()
            except FutureTimeout:
                fut.add_done_callback(self._drop_late_lease)
                raise StorageError(name, f"load did not finish within {timeout:.0f}s") from None
        try:
            return self._state_from(slab)
        finally:
            self.host.unlease(slab.key)

    def _state_from(self, slab) -> MergeState:
        name = slab.key[0]
        if slab.layout.generation != self._generation:
            raise ConfigError(f"cannot merge '{name}': it was packed for other LoRA targets")
        if len(self._pinned - {name}) >= self.config.max_loras:
            raise CapacityError(f"cannot merge '{name}': every GPU slot is pinned, and base-model requests "
                                f"need one for their correction")
        slices = []
        for ti, t in enumerate(self.targets):
            bases = self._bases.get(t.name) or [None] * len(t.slices)
            for si, r in enumerate(slab.layout.slice_ranks[ti]):
                if r:
                    check_mergeable(name, bases[si], t.slices[si].peft_module)
                    slices.append((ti, si))
        return MergeState(slab.key, negated(slab, pin=self.device.type == "cuda"), tuple(slices))

    def _apply(self, state: MergeState | None) -> None:
        """Step 3 of a switch; the gate is closed."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)  # earlier steps' kernels may still read W and the slots
            self._reclaim()
        try:
            with torch.no_grad():
                self._merge = None
                self._pristine.restore()
                self._pristine.keep_only(() if state is None else state.slices)
                self.pool.forget_all()
                if state is not None:
                    ratio = 0.0
                    for (ti, si), a, b_neg in state.deltas():
                        w = self._bases[self.targets[ti].name][si].weight()
                        self._pristine.save((ti, si), w)
                        d = merged_delta(a, b_neg, self.targets[ti].kind, w.device)
                        w32 = w.float()
                        ratio = max(ratio, float(d.norm() / w32.norm().clamp_min(1e-30)))
                        w.copy_(w32 - d)  # W - (-ΔW): rounded once into W's dtype
                    self._merge = state
                    self._delta_ratio = ratio
                    if ratio > 0.5 and w.dtype != torch.float32:
                        log.warning("merged LoRA adapter '%s' changes a base weight by %.2f of its norm: in %s, "
                                    "requests that undo it (every other adapter, the base model) lose precision "
                                    "in proportion (docs/architecture.md, merged mode)", state.key[0], ratio, w.dtype)
        except BaseException:
            with torch.no_grad():
                self._merge = None
                self._pristine.restore()
                self._pristine.keep_only(())
            raise
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)  # steps on any stream see the new weights
            self.switches += 1
            log.info("merged LoRA adapter: %s", None if self._merge is None else self._merge.key)

    def _after_switch(self) -> None:
        for name in sorted(self._pinned):  # their slots were forgotten: load their new correction now
            self._repin(name)

    # ---- automatic switches ---------------------------------------------------------------------
    def _observe(self, names, tokens) -> None:
        p = self._policy
        if p is None:
            return
        p.observe(names, tokens)
        pending = self._pending
        current = pending.name if pending is not None else (None if self._merge is None else self._merge.key[0])
        want = p.decide(current)
        if want != current:
            p.switched()
            self._ask_switch(want)

    def _ask_switch(self, name: str | None) -> None:
        """Prepare a switch to `name` in the background (loads on the loader's threads); it runs at the
        next step boundary with no plan active."""
        pending = _Pending(name)
        self._pending = pending
        if name is None:
            pending.ready.set()
            return
        try:
            entry = self.catalog.get(name)
            pending.key = entry.key
            fut = self.loader.acquire(entry, claim=True)
        except BaseException as e:  # noqa: BLE001 - logged when the switch would run
            pending.error = e
            pending.ready.set()
            return
        fut.add_done_callback(lambda f, p=pending: self._prepared(p, f))

    def _prepared(self, pending: _Pending, fut) -> None:
        try:
            slab = fut.result()
        except BaseException as e:  # noqa: BLE001
            pending.error = e
            pending.ready.set()
            return
        try:
            pending.state = self._state_from(slab)
        except BaseException as e:  # noqa: BLE001
            pending.error = e
        finally:
            self.host.unlease(slab.key)
            pending.ready.set()

    def _maybe_switch(self) -> None:
        """Run the asked-for switch if it is prepared and no plan is active; never waits."""
        p = self._pending
        if p is None or not p.ready.is_set() or self._gate.building_here():
            return
        if not self._switch_lock.acquire(blocking=False):
            return
        switched = False
        try:
            if self._pending is not p:
                return
            if p.error is not None:
                self._pending = None
                log.warning("automatic merge of LoRA adapter '%s' not done: %s", p.name, p.error)
                return
            if not self._gate.try_close():
                return
            self._pending = None
            try:
                self._apply(p.state)
                switched = True
            except LoraplexError as e:
                log.warning("automatic merge of LoRA adapter '%s' failed; serving unmerged: %s", p.name, e)
            finally:
                self._gate.open()
        finally:
            self._switch_lock.release()
        if switched:
            self._after_switch()

    def _merge_catalog_change(self, diff) -> None:
        """A republished merged adapter is merged again; a removed one is unmerged (at the next idle point)."""
        p, m = self._pending, self._merge
        name = p.name if p is not None else (None if m is None else m.key[0])
        if name is not None and (name in diff.changed or name in diff.removed):
            self._ask_switch(None if self._current_version(name) is None else name)


__all__ = ["ENV_MERGE", "MergeMixin"]
