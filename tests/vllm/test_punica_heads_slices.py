"""The punica ops vLLM's less common LoRA layers call, on LoraplexPunicaWrapper: classification heads
(0.33's token-level head passes the whole head to add_shrink), layers with more slices than one
kernel launch takes, and fully sharded layers (add_shrink + add_expand). Each against fp32 torch
computed here from the same weights."""

from __future__ import annotations

import pytest
import torch

from .test_punica_layers import (
    BACKENDS,
    IDS,
    MAX_LORAS,
    MAX_RANK,
    RANKS,
    TOKENS,
    _adapters,
    _check_linear,
    _prepare,
    _rand,
    _remap,
    _wrapper,
)

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_sources]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LORAPLEX_BACKEND", request.param)
    return request.param


@pytest.fixture
def lora_config():
    from vllm.config.lora import LoRAConfig

    return LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=torch.float32)


def test_more_slices_than_one_launch_takes(vllm_dist, lora_config, backend):
    """A merged column layer passes one slice per output (0.33's Step5 qkv+indexer layer passes 7;
    its model module cannot be imported on CPU, the merged layer is the same path)."""
    from vllm.lora.layers import MergedColumnParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    widths = (8, 16, 8, 24, 8, 8, 16)
    gen = torch.Generator().manual_seed(21)
    base = MergedColumnParallelLinear(64, list(widths), bias=False, params_dtype=torch.float32)
    w0 = _prepare(base, gen)
    layer = MergedColumnParallelLinearWithLoRA(base)
    assert layer.n_slices == 7
    _check_linear(layer, w0, _adapters(64, widths, gen), lora_config, False, 64, gen)


@pytest.mark.parametrize("kind", ["column", "merged", "qkv", "row"])
def test_fully_sharded_layers(vllm_dist, backend, kind):
    """fully_sharded_loras: vLLM's layers call add_shrink, gather, add_expand (tensor parallel 1 here)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora import layers
    from vllm.model_executor.layers import linear

    config = LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=torch.float32,
                        fully_sharded_loras=True)
    gen = torch.Generator().manual_seed(22)
    if kind == "column":
        base, cls, widths, k = linear.ColumnParallelLinear(64, 40, bias=False), "ColumnParallelLinear", (40,), 64
    elif kind == "merged":
        base, cls, widths, k = linear.MergedColumnParallelLinear(64, [24, 24], bias=False), "MergedColumnParallel" \
            "Linear", (24, 24), 64
    elif kind == "qkv":
        base, cls, widths, k = linear.QKVParallelLinear(64, 32, 2, 1, bias=False), "MergedQKVParallelLinear", \
            (64, 32, 32), 64
    else:
        base, cls, widths, k = linear.RowParallelLinear(48, 64, bias=False), "RowParallelLinear", (64,), 48
    w0 = _prepare(base, gen)
    layer = getattr(layers, f"{cls}WithShardedLoRA")(base)
    _check_linear(layer, w0, _adapters(k, widths, gen), config, len(widths) == 1, k, gen)


def _head_reference(x, w0, lora, full, slots, width):
    """Per row: the full head of the row's slot if it has one (weight @ x + bias, zero past its labels),
    else the base head plus the row's LoRA delta, zero past the base's labels."""
    out = torch.zeros(x.shape[0], width)
    for t, slot in enumerate(slots):
        if slot >= 0 and slot in full:
            W, b = full[slot]
            out[t, : W.shape[0]] = x[t] @ W.t() + b
        else:
            row = x[t] @ w0.t()
            if slot >= 0:
                A, B = lora[IDS[slot]]
                row = row + x[t] @ A[0].t() @ B[0].t()
            out[t, : w0.shape[0]] = row
    return out


def test_token_classification_head(vllm_dist, backend):
    """0.33's TokenClassificationHeadWithLoRA passes the whole head [labels, hidden] to add_shrink:
    every label is computed, however small the adapter's rank (here 3 < 6 labels)."""
    from vllm.lora import layers

    head_cls = getattr(layers, "TokenClassificationHeadWithLoRA", None)
    if head_cls is None:
        pytest.skip("this vLLM has no token-level classification head (added in 0.33)")
    from vllm.config.lora import LoRAConfig
    from vllm.model_executor.layers.linear import ReplicatedLinear

    config = LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=torch.float32, max_lora_cls_labels=6)
    gen = torch.Generator().manual_seed(23)
    base = ReplicatedLinear(64, 3, bias=False, params_dtype=torch.float32)
    w0 = _prepare(base, gen)
    layer = head_cls(base)
    layer.create_lora_weights(MAX_LORAS, config, None)
    w = _wrapper(config)
    layer.set_mapping(w)
    lora = _adapters(64, (3,), gen)
    full = {0: (_rand(6, 64, gen=gen), _rand(6, gen=gen)), 2: (_rand(4, 64, gen=gen), _rand(4, gen=gen))}
    for slot, lid in enumerate(IDS):
        A, B = lora[lid]
        layer.set_lora(slot, A[0], B[0])
        if slot in full:
            layer.set_module_to_save(slot, *full[slot])
        else:
            layer.reset_module_to_save(slot)
    x = _rand(len(TOKENS), 64, scale=1.0, gen=gen)
    slots = [IDS.index(lid) if lid else -1 for lid in TOKENS]
    ref = _head_reference(x, w0, lora, full, slots, 6)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    w.adapter_ranks = dict(RANKS)  # as the worker manager publishes them: ranks 3, 8, 5
    _remap(w, TOKENS)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_sequence_classification_head(vllm_dist, backend):
    """The request-level head (0.32 and 0.33) goes through apply_lora_full_linear: one row per request."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers.classifier import ClassificationHeadWithLoRA
    from vllm.model_executor.layers.linear import ReplicatedLinear

    config = LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=torch.float32, max_lora_cls_labels=6)
    gen = torch.Generator().manual_seed(24)
    base = ReplicatedLinear(64, 6, bias=False, params_dtype=torch.float32)
    w0 = _prepare(base, gen)
    layer = ClassificationHeadWithLoRA(base)
    layer.create_lora_weights(MAX_LORAS, config, None)
    requests = (22, 0, 11, 33, 11)
    w = _wrapper(config, tokens=requests, samples=requests)
    w.adapter_ranks = dict(RANKS)
    _remap(w, requests, samples=requests)
    layer.set_mapping(w)
    lora = _adapters(64, (6,), gen)
    full = {0: (_rand(6, 64, gen=gen), _rand(6, gen=gen)), 2: (_rand(6, 64, gen=gen), _rand(6, gen=gen))}
    for slot, lid in enumerate(IDS):
        A, B = lora[lid]
        layer.set_lora(slot, A[0], B[0])
        if slot in full:
            layer.set_module_to_save(slot, *full[slot])
    slots = tuple(IDS.index(lid) if lid else -1 for lid in requests)
    layer.set_output_mapping(slots)
    x = _rand(len(requests), 64, scale=1.0, gen=gen)
    torch.testing.assert_close(layer(x), _head_reference(x, w0, lora, full, slots, 6), rtol=1e-5, atol=1e-5)
