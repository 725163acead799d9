"""LORAPLEX_OVERLAP in vLLM (vllm_plugin/overlap.py): the wrapper's two halves (shrink on the side
stream, expand after the join) must add exactly what add_lora_linear adds, on vLLM's own QKV layer;
the switch is off by default, and on a machine without CUDA it changes nothing."""

from __future__ import annotations

import os

import pytest
import torch

from .test_punica_layers import IDS, MAX_LORAS, TOKENS, _adapters, _prepare, _rand, _remap, _wrapper

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_sources]  # no engine: also run on 0.33's sources


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_split_halves_equal_add_lora_linear(vllm_dist, backend, monkeypatch):
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import MergedQKVParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import QKVParallelLinear

    monkeypatch.setenv("LORAPLEX_BACKEND", backend)
    lora_config = LoRAConfig(max_lora_rank=8, max_loras=MAX_LORAS, lora_dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    base = QKVParallelLinear(64, 32, 2, 1, bias=False, params_dtype=torch.float32)
    _prepare(base, gen)
    layer = MergedQKVParallelLinearWithLoRA(base)
    layer.create_lora_weights(MAX_LORAS, lora_config)
    w = _wrapper(lora_config)
    layer.set_mapping(w)
    adapters = _adapters(64, (64, 32, 32), gen)
    for slot, lid in enumerate(IDS):
        layer.set_lora(slot, *adapters[lid])
    _remap(w, TOKENS)
    x = _rand(len(TOKENS), 64, scale=1.0, gen=gen)
    want = layer(x)[0]
    base_out = layer._get_quant_method().apply(layer.base_layer, x, None)
    h = w.lora_shrink(x, layer.lora_a_stacked, 1.0)
    got = w.lora_expand(base_out, h, layer.lora_b_stacked, layer.output_slices)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (want - layer._get_quant_method().apply(layer.base_layer, x, None)).abs().max() > 1e-2
    _remap(w, (0,) * len(TOKENS))  # no adapter in the batch: nothing to shrink
    assert w.lora_shrink(x, layer.lora_a_stacked, 1.0) is None


def test_overlap_switch(monkeypatch):
    from loraplex.vllm_plugin import overlap
    from loraplex.vllm_plugin.plugin import wanted_parts

    assert "overlap" not in wanted_parts({"LORAPLEX_CATALOG": "/x"})  # off by default
    assert "overlap" in wanted_parts({"LORAPLEX_CATALOG": "/x", "LORAPLEX_OVERLAP": "1"})
    assert "overlap" not in wanted_parts({"LORAPLEX_CATALOG": "/x", "LORAPLEX_OVERLAP": "1", "LORAPLEX_KERNELS": "0"})
    monkeypatch.delenv(overlap.ENV_VLLM_DUAL, raising=False)
    if not torch.cuda.is_available():
        assert overlap.install() is False  # no CUDA streams: vLLM's layers stay as they are
        assert overlap.ENV_VLLM_DUAL not in os.environ


@pytest.mark.gpu
def test_dual_stream_equals_sequential_eager_and_replayed(vllm_dist, monkeypatch):
    """vLLM's dual stream with LORAPLEX_OVERLAP: our split of BaseLinearLayerWithLoRA._apply_async_impl
    (shrink on the layer's auxiliary stream under the base GEMM, expand after the join) equals the
    sequential path, eager and replayed from a CUDA graph with other mappings. Needs vLLM on CUDA."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import MergedQKVParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from loraplex.vllm_plugin.overlap import _wrap

    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    lora_config = LoRAConfig(max_lora_rank=8, max_loras=MAX_LORAS, lora_dtype=torch.float32)
    gen = torch.Generator().manual_seed(9)
    base = QKVParallelLinear(64, 32, 2, 1, bias=False, params_dtype=torch.float32)
    _prepare(base, gen)
    base.cuda()
    layer = MergedQKVParallelLinearWithLoRA(base)
    layer.create_lora_weights(MAX_LORAS, lora_config)
    from loraplex.vllm_plugin.punica import LoraplexPunicaWrapper

    w = LoraplexPunicaWrapper(64, 8, "cuda", lora_config=lora_config)
    layer.set_mapping(w)
    adapters = _adapters(64, (64, 32, 32), gen)
    for slot, lid in enumerate(IDS):
        layer.set_lora(slot, *[[t.cuda() for t in part] for part in adapters[lid]])
    layer._lora_stream = torch.cuda.Stream()
    layer._events = [torch.cuda.Event(), torch.cuda.Event()]
    split = _wrap(lambda self, x, bias=None: None)
    x = _rand(len(TOKENS), 64, scale=1.0, gen=gen).cuda()
    mappings = (TOKENS, tuple(reversed(TOKENS)), (IDS[1],) * len(TOKENS))
    for tokens in mappings:
        _remap(w, tokens)
        torch.testing.assert_close(split(layer, x), layer._apply_sync(x), rtol=0, atol=1e-5)
    _remap(w, TOKENS)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = split(layer, x)
    for tokens in mappings[1:]:
        _remap(w, tokens)
        graph.replay()
        torch.testing.assert_close(static, layer._apply_sync(x), rtol=0, atol=1e-5)
