"""A real vLLM Llama and its LoRAModelManager in this process, without an engine (no forward pass
needed: the tests compare stacked LoRA tensors), and vLLM LoRAModels read from PEFT directories.
Used by tests/vllm/test_slab_upload.py and bench/upload_vllm.py."""

from __future__ import annotations

import os
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _init_dist(config) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        return
    with set_current_vllm_config(config):
        init = os.path.join(tempfile.mkdtemp(prefix="loraplex-dist-"), "init")
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{init}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)


def build_manager(model_dir, *, max_loras=3, max_rank=16, max_cpu_loras=8, lora_dtype=torch.bfloat16,
                  dtype="float32", device="cpu"):
    """vLLM's LRUCacheLoRAModelManager over a LlamaForCausalLM built from model_dir's config
    (weights left as allocated: only the LoRA tensors are looked at)."""
    from vllm.config import LoRAConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.lora.model_manager import LRUCacheLoRAModelManager
    from vllm.model_executor.models.llama import LlamaForCausalLM

    mc = ModelConfig(model=os.fspath(model_dir), dtype=dtype, max_model_len=64)
    lc = LoRAConfig(max_lora_rank=max_rank, max_loras=max_loras, max_cpu_loras=max_cpu_loras, lora_dtype=lora_dtype)
    config = VllmConfig(model_config=mc, lora_config=lc)
    _init_dist(config)
    with set_current_vllm_config(config), torch.device(device):
        model = LlamaForCausalLM(vllm_config=config)
        vocab = model.config.vocab_size
        manager = LRUCacheLoRAModelManager(model, 4, 256, vocab, lc, torch.device(device), config)
    return manager


def load_lora(manager, adapter_dir, lora_id: int):
    """The adapter as vLLM's worker reads it (before vLLM's packing): LoRAModel on the CPU."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from loraplex.vllm_plugin.loading import expected_modules

    helper = PEFTHelper.from_local_dir(os.fspath(adapter_dir), None)
    helper.validate_legal(manager.lora_config)
    return LoRAModel.from_local_checkpoint(
        os.fspath(adapter_dir), expected_modules(manager), helper, lora_model_id=lora_id, device="cpu",
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size)


def stock_activate(manager, lora_model) -> int:
    """vLLM's own path: add + activate; returns the slot it used."""
    manager.add_adapter(lora_model)
    manager.activate_adapter(lora_model.id)
    return manager.lora_index_to_id.index(lora_model.id)


def slot_state(manager, slot: int) -> dict:
    """Copies of every stacked LoRA tensor's slot `slot`: {(module, "A"/"B", slice): tensor}."""
    out = {}
    for name, m in manager.modules.items():
        for which, t in (("A", m.lora_a_stacked), ("B", m.lora_b_stacked)):
            for i, x in enumerate(t if isinstance(t, (tuple, list)) else [t]):
                out[(name, which, i)] = x[slot].clone()
    return out


class CopyCounter(TorchDispatchMode):
    """Counts, by intercepting the aten ops, what a code path moves into the stacked tensors:
    `transfers` are copies whose source is host memory (on CUDA: a CPU tensor; on the CPU: any tensor
    outside `device_side`, the stacked tensors and staging buffers), `fills` are zero fills."""

    _COPIES = {"aten::copy_", "aten::_foreach_copy_", "aten::_to_copy"}

    def __init__(self, device_side=()):
        super().__init__()
        self._device_ptrs = {t.untyped_storage().data_ptr() for t in device_side}
        self.transfers = self.transfer_bytes = self.fills = 0

    def _host(self, t) -> bool:
        if t.device.type != "cpu":
            return False
        return t.untyped_storage().data_ptr() not in self._device_ptrs

    def _count(self, dst, src) -> None:
        if isinstance(src, torch.Tensor) and self._host(src) and (dst is None or not self._host(dst)):
            self.transfers += 1
            self.transfer_bytes += src.numel() * src.element_size()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::copy_":
            self._count(args[0], args[1])
        elif name == "aten::_foreach_copy_":
            for d, s in zip(args[0], args[1], strict=True):
                self._count(d, s)
        elif name in ("aten::zero_", "aten::_foreach_zero_"):
            self.fills += len(args[0]) if name == "aten::_foreach_zero_" else 1
        elif name == "aten::fill_" and float(args[1]) == 0:
            self.fills += 1
        return func(*args, **kwargs)


def device_side(manager, uploader=None) -> list:
    ts = []
    for m in manager.modules.values():
        for t in (m.lora_a_stacked, m.lora_b_stacked):
            ts.extend(t if isinstance(t, (tuple, list)) else [t])
    if uploader is not None and uploader._staging is not None:
        ts.append(uploader._staging)
    return ts
