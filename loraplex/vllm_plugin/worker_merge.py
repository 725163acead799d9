"""Merged mode in a vLLM worker: one adapter version M merged into the base weights, every request exact.

The engine core decides which version is merged (engine_merge.py) and tells every worker with one
collective RPC between two steps (merge_switch), so every tensor-parallel rank switches at the same
step boundary and no step sees half-merged weights. While M is merged, per step:

  rows of M's requests     lora id -> 0: no LoRA path (a batch of only M runs no LoRA kernel and
                           dispatches to vLLM's no-LoRA CUDA graphs: dispatch_count)
  rows of adapter X        X's slot holds [A_X; A_M], [B_X, -B_M] (slab_upload.py): X exactly
  rows of the base model   lora id 0 -> BASE_ID, a slot holding [A_M], [-B_M]: the base exactly

The requests keep their identities (M's requests carry M's LoRARequest, base requests none), so
vLLM's prefix cache keys their KV by their own adapter version as without a merge; every step serves
every row exactly under the weights of that step, so KV computed before a switch stays valid after it.

A switch (merge_switch): (1) prepare with steps still able to run: M's slab from the host cache (or
storage, exactly the version named), the rank and layer checks, the negated correction; (2) sync the
device: no earlier step still reads the weights or slots; (3) restore every changed weight from its
pristine copy, merge M (merge_weights.BaseMerger), copy the correction to the device, refill every
occupied slot in place with its adapter minus M, drop M's own slot (it would hold M - M) and, on an
unmerge, the base slot; (4) publish the slots' new ranks. If (3) fails the worker is left unmerged
and the error goes back to the engine core, which unmerges every worker.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from ..errors import ConfigError
from .merge_config import ENV_MERGE_RANK, settings
from .merge_weights import LINEAR_KINDS, BaseMerger, check_layers, correction_slab

log = logging.getLogger("loraplex.vllm_plugin")

BASE_ID = (1 << 31) - 1  # the base-model correction's lora id: no version id is ever this (identity.py)
BASE_NAME = "loraplex-merged-base"
BASE_KEY = (BASE_NAME,)

_merged_id: list = [None]  # this process's merged lora id, for vLLM 0.33's module-level dispatch count


def base_request():
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=BASE_NAME, lora_int_id=BASE_ID, lora_path=BASE_NAME)


def is_base(req) -> bool:
    return req is not None and req.lora_int_id == BASE_ID and req.lora_name == BASE_NAME


def dispatch_count(lora_ids, merged_id) -> int:
    """The adapter count vLLM's CUDA-graph dispatch must see for a batch of requests with these lora
    ids (0: the base model): the adapters that have a slot in the step. While `merged_id` is merged its
    rows use none, and base rows use the base correction's."""
    ids = {int(i) for i in lora_ids}
    if merged_id is None:
        return len(ids - {0})
    return len(ids - {0, merged_id}) + (0 in ids)


@dataclasses.dataclass(frozen=True)
class Merged:
    request: object  # the LoRARequest of the merged version
    key: tuple  # its host-cache key
    correction: object  # VllmSlab: its pieces in the LoRA dtype, B negated
    rank: int


class MergeMixin:
    def _init_merge(self) -> None:
        self._merge_settings = settings()
        self._merged: Merged | None = None
        self._merger: BaseMerger | None = None
        self.merge_switches = 0
        self.last_dispatch: int | None = None  # the adapter count of the last step's graph dispatch
        _merged_id[0] = None

    def _setup_merge(self) -> None:
        """At create_lora_manager: refuse merged mode now if the base weights cannot take a merge."""
        s = self._merge_settings
        if not s.enabled:
            return
        R = self.lora_config.max_lora_rank
        s.merge_rank(R)  # a bad LORAPLEX_MERGE_RANK fails here
        if self.lora_config.max_loras < 2:
            raise ConfigError("merged mode needs --max-loras >= 2: base-model requests take one slot for the "
                              "merged adapter's correction")
        check_layers(self._targets)
        self._merger = BaseMerger(self._targets, pin=self.device.type == "cuda")
        self._adapter_manager.uploader.reserve_correction(
            self._targets.max_nbytes(None, rank=s.merge_rank(R), kinds=LINEAR_KINDS))

    @property
    def merged_id(self) -> int | None:
        m = self._merged
        return None if m is None else m.request.lora_int_id

    def merge_state(self) -> dict:
        m, g = self._merged, self._merger
        return {"merged": None if m is None else [m.request.lora_name, m.request.lora_int_id, m.key[-1]],
                "rank": 0 if m is None else m.rank, "switches": self.merge_switches,
                "pristine_bytes": 0 if g is None else g.pristine_bytes,
                "correction_bytes": 0 if m is None else m.correction.nbytes,
                "delta_ratio": 0.0 if g is None else g.delta_ratio}

    # ---- the switch (an RPC from the engine core, between steps) ---------------------------------
    def merge_switch(self, request) -> dict:
        """Merge this adapter version (a LoRARequest) into the base weights, or unmerge (None)."""
        if self._merger is None:
            raise ConfigError("merged mode is off in this worker: set LORAPLEX_MERGE or LORAPLEX_MERGE_AUTO for "
                              "every vLLM process")
        t0 = time.perf_counter()
        new = None if request is None else self._prepare_merge(request)
        if new is not None and self._merged is not None and new.key == self._merged.key:
            return self.merge_state()
        manager = self._adapter_manager
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)  # steps in flight may still read the weights and slots
        manager.reclaim()
        self._merged = None
        _merged_id[0] = None
        try:
            self._merger.apply(None if new is None else new.correction)
            manager.uploader.set_correction(None if new is None else new.correction)
            self._merged = new
            _merged_id[0] = self.merged_id
        except BaseException:
            self._merged = None
            _merged_id[0] = None
            self._merger.apply(None)
            manager.uploader.set_correction(None)
            self._refill_after_switch()
            raise
        finally:
            self.merge_switches += 1
        self._refill_after_switch()
        if cuda:
            torch.cuda.synchronize(self.device)  # steps on any stream see the new weights
        self._residency.publish()
        log.info("loraplex: merged LoRA adapter: %s (switch %.1f ms, pristine copies %.1f MiB)",
                 None if new is None else f"{new.request.lora_name} (id {new.request.lora_int_id})",
                 1e3 * (time.perf_counter() - t0), self._merger.pristine_bytes / 2**20)
        return self.merge_state()

    def _prepare_merge(self, request) -> Merged:
        key = self._key(request)
        entry = self._host.lease(key)
        while entry is None:
            self._host.get(key, request)  # exactly this version, through the catalog's checked reader
            entry = self._host.lease(key)
        try:
            rank = entry.slab.layout.rank
            limit = self._merge_settings.merge_rank(self.lora_config.max_lora_rank)
            if rank > limit:
                raise ConfigError(f"cannot merge LoRA adapter '{request.lora_name}': its rank {rank} is above the "
                                  f"{limit} ranks merged mode reserves ({ENV_MERGE_RANK}); it is served unmerged")
            correction = correction_slab(entry.slab, pin=self.device.type == "cuda")
        finally:
            self._host.unlease(key)
        self._merger.check(request.lora_name, correction)
        return Merged(request, key, correction, rank)

    def _refill_after_switch(self) -> None:
        manager = self._adapter_manager
        if self._merged is not None:
            manager.deactivate_adapter(self._merged.request.lora_int_id)  # it would hold M - M
        elif BASE_ID in manager.list_adapters():
            manager.remove_adapter(BASE_ID)
        manager.refill()
        manager._last_mapping = None  # the slots' ranks changed under an unchanged mapping
        self._publish_ranks()

    # ---- every step while merged ------------------------------------------------------------------
    def _merged_step(self, requests, mapping):
        """The step's adapters and mapping as the slots serve them: M's rows take no slot, base rows
        take the base correction's."""
        mid = self.merged_id
        if mid is None:
            return requests, mapping
        requests = [r for r in requests if r.lora_int_id != mid]
        if mapping is None:
            return requests, mapping
        tokens = tuple(BASE_ID if i == 0 else (0 if i == mid else i) for i in mapping.index_mapping)
        # the logits: M merges no lm_head (merge_weights refuses it), so base rows need nothing there
        sampled = tuple(0 if i == mid else i for i in mapping.prompt_mapping)
        if BASE_ID in tokens:
            requests.append(base_request())
        return requests, dataclasses.replace(mapping, index_mapping=tokens, prompt_mapping=sampled)

    def _base_shell(self):
        from vllm.lora.lora_model import LoRAModel

        from .slab_manager import SHELL

        shell = LoRAModel(BASE_ID, 0, {})
        setattr(shell, SHELL, BASE_KEY)
        shell.loraplex_request = base_request()
        self._names[BASE_ID] = BASE_NAME
        self._keys[BASE_ID] = BASE_KEY
        return shell


# ---- vLLM's CUDA-graph dispatch: a batch of only the merged adapter runs the no-LoRA graphs ---------------
def _wrap_v1_dispatch(orig):
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        manager = getattr(self, "lora_manager", None)
        mid = getattr(manager, "merged_id", None)
        if mid is not None and kwargs.get("force_num_active_loras") is None:
            batch = self.input_batch
            n = dispatch_count(batch.request_lora_mapping[:batch.num_reqs].tolist(), mid)
            kwargs["force_num_active_loras"], kwargs["force_has_lora"] = n, n > 0
            manager.last_dispatch = n
        return orig(self, *args, **kwargs)

    return _determine_batch_execution_and_padding


def _wrap_v2_dispatch(orig):
    def get_num_active_loras_for_dispatch(lora_config, lora_state, req_ids, dummy_run):
        mid = _merged_id[0]
        if mid is None or dummy_run or not lora_config:
            return orig(lora_config, lora_state, req_ids, dummy_run)
        held = lora_state.lora_requests
        return dispatch_count([held[r].lora_int_id if r in held else 0 for r in req_ids], mid)

    return get_num_active_loras_for_dispatch


def patch_dispatch(module) -> None:
    """The model runner's adapter count for graph dispatch follows the merge (V1 runner: a method;
    vLLM 0.33's V2 runner: a module-level function it imported)."""
    from ._hooks import wrap

    runner = getattr(module, "GPUModelRunner", None)
    if runner is not None and "_determine_batch_execution_and_padding" in vars(runner):
        wrap(runner, "_determine_batch_execution_and_padding", _wrap_v1_dispatch)
    if hasattr(module, "get_num_active_loras_for_dispatch"):
        wrap(module, "get_num_active_loras_for_dispatch", _wrap_v2_dispatch)


def unpatch_dispatch(module) -> None:
    from ._hooks import unwrap

    runner = getattr(module, "GPUModelRunner", None)
    if runner is not None and "_determine_batch_execution_and_padding" in vars(runner):
        unwrap(runner, "_determine_batch_execution_and_padding")
    if hasattr(module, "get_num_active_loras_for_dispatch"):
        unwrap(module, "get_num_active_loras_for_dispatch")


__all__ = ["BASE_ID", "BASE_NAME", "MergeMixin", "base_request", "dispatch_count", "is_base", "patch_dispatch"]
