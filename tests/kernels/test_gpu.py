"""Real shapes on a CUDA GPU: Llama-3-8B widths, ranks 8..128, tokens 1..8192, 1..128 slots, and
CUDA-graph capture + replay with changing plans, bit-equal to eager. Skipped without a GPU."""

import pytest
import torch

from loraplex.kernels import ops, reference
from loraplex.runtime.plan import PlanBuffers

from .cases import POISON, TOL, assert_rows, random_ranks, stacked_A, stacked_B, token_slots

pytestmark = pytest.mark.gpu

# (name, in_features, slice widths) of one Llama-3-8B layer
LAYERS = {
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}


def _poisoned(shape, scale, ranks, rank_dim, dtype, gen):
    """cases.stacked_A/B drawn on the GPU (the real shapes are ~10^8 values: seconds per test on the
    host, milliseconds here): entries past each slot's rank along rank_dim hold NaN."""
    w = torch.randn(shape, generator=gen, device="cuda") * scale
    r = torch.arange(shape[rank_dim], device="cuda")
    pad = r[None, :] >= ranks.to("cuda")[:, None]  # [L, R]
    w.masked_fill_(pad[:, :, None] if rank_dim == 1 else pad[:, None, :], POISON)
    return w.to(dtype)


def _case(layer, T, L, R, dtype, mix, seed, none_frac=0.1):
    K, widths = LAYERS[layer]
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots(mix, T, L, gen, none_frac)
    ranks = random_ranks(L, R, gen)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    A = [_poisoned((L, R, K), K ** -0.5, ranks, 1, dtype, g) for _ in widths]
    B = [_poisoned((L, n, R), R ** -0.5, ranks, 2, dtype, g) for n in widths]
    x = torch.randn(T, K, generator=g, device=dev).to(dtype)
    y0 = torch.randn(T, sum(widths), generator=g, device=dev).to(dtype)
    plan = PlanBuffers(T, L, dev).build(slots.to(dev), ranks.to(dev))
    return slots.to(dev), ranks.to(dev), plan, x, A, B, y0


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")


# first in the file: the GPU run's test stage has a time limit, and this is the check nothing else makes.
# Captured with one adapter ("identical") and replayed with plans of up to 16: the grid must come from
# a bound fixed at capture (every slot), the fused column split and the split-K count from the device.
@pytest.mark.parametrize("capture_mix", ["identical", "uniform"])
@pytest.mark.parametrize("T", [4, 64, 512], ids=["fused", "split-K", "shrink+expand"])
def test_cuda_graph_replay_with_changing_plans_is_bit_equal(T, capture_mix):
    L, R, dtype = 16, 32, torch.bfloat16
    K, widths = LAYERS["qkv"]
    gen = torch.Generator().manual_seed(7)
    ranks = random_ranks(L, R, gen).cuda()
    A = [a.cuda() for a in stacked_A(L, R, K, ranks.cpu(), dtype, gen, 3)]
    B = [b.cuda() for b in stacked_B(L, widths, R, ranks.cpu(), dtype, gen)]
    bufs = PlanBuffers(T, L, "cuda")
    x = torch.zeros(T, K, dtype=dtype, device="cuda")
    y = torch.zeros(T, sum(widths), dtype=dtype, device="cuda")
    scratch = torch.zeros(3, T, R, device="cuda")
    plan = bufs.build(token_slots(capture_mix, T, L, gen).cuda(), ranks)
    ops.add_lora_linear(y, x, A, B, plan, buffer=scratch)  # compile the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.add_lora_linear(y, x, A, B, plan, buffer=scratch)
    for step, (mix, none_frac) in enumerate([("distinct", 0.2), ("identical", 0), ("zipf", 0.5), ("uniform", 1.0),
                                             ("skewed", 0.1), ("uniform", 0.0)]):
        slots = token_slots(mix, T, L, gen, none_frac).cuda()
        new_plan = bufs.build(slots, ranks)  # same static storage the graph captured
        x.copy_(torch.randn(T, K, generator=gen).to(dtype))
        y0 = torch.randn(T, sum(widths), generator=gen).to(dtype).cuda()
        y.copy_(y0)
        graph.replay()
        eager = ops.add_lora_linear(y0.clone(), x, A, B, new_plan, buffer=torch.zeros_like(scratch))
        torch.cuda.synchronize()
        assert torch.equal(y, eager), f"replay {step} ({mix}) differs from eager"
        ref = reference.add_lora_linear(y0.clone(), x, A, B, new_plan, ranks)
        torch.testing.assert_close(y[slots >= 0].float(), ref[slots >= 0].float(), **TOL[dtype])
        assert not bufs.split_counters.any(), "split-K counters must be back at zero after every replay"


def test_capture_with_a_bound_below_the_slots_is_refused():
    """A plan bounded by its own adapter count (eager steps) must not be captured: replays with more
    adapters would skip them silently."""
    from loraplex.errors import LaunchError

    L, K, widths = 8, 4096, (4096,)
    plan = PlanBuffers(4, L, "cuda").build(torch.zeros(4, dtype=torch.int32, device="cuda"),
                                           torch.full((L,), 16, dtype=torch.int32, device="cuda"), max_active=1)
    A = [torch.zeros(L, 16, K, dtype=torch.bfloat16, device="cuda")]
    B = [torch.zeros(L, widths[0], 16, dtype=torch.bfloat16, device="cuda")]
    x = torch.zeros(4, K, dtype=torch.bfloat16, device="cuda")
    y = torch.zeros(4, widths[0], dtype=torch.bfloat16, device="cuda")
    ops.add_lora_linear(y, x, A, B, plan)  # eager: fine
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(LaunchError, match="bounded"), torch.cuda.graph(graph):
        ops.add_lora_linear(y, x, A, B, plan)


@pytest.mark.parametrize("R", [8, 16, 32, 64, 128, 256, 320, 512])
def test_every_rank_vllm_allows_launches(R):
    """Decode (fused up to fused_max_rank, shrink+expand above it) and a split-K batch at each rank."""
    for T, mix in ((1, "identical"), (48, "zipf")):
        slots, ranks, plan, x, A, B, y0 = _case("qkv", T, 8, R, torch.bfloat16, mix, seed=R + T)
        y = ops.add_lora_linear(y0.clone(), x, A, B, plan)
        ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks)
        assert_rows(y, ref, slots, torch.bfloat16, y0, f"qkv T={T} R={R}")


def test_pdl_changes_no_bit():
    """Programmatic dependent launch only overlaps launches: a chain of four modules' launches (each
    one's metadata read before the previous one finished) gives the same bits with it as without it."""
    from loraplex.kernels import config

    T, L, R = 32, 8, 16
    cases = [_case(layer, T, L, R, torch.bfloat16, "uniform", seed=i) for i, layer in enumerate(LAYERS)]
    plan = cases[0][2]
    outs = []
    for pdl in (True, False):
        table = {op: {"default": {"PDL": pdl}} for op in config.OPS}
        load = config.load
        config.load = lambda name, t=table: t
        try:
            ys = [c[6].clone() for c in cases]
            for c, y in zip(cases, ys, strict=True):
                ops.add_lora_linear(y, c[3], c[4], c[5], plan)
            torch.cuda.synchronize()
            outs.append(ys)
        finally:
            config.load = load
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("T,L,R,mix", [
    (1, 1, 16, "identical"), (8, 8, 8, "distinct"), (64, 32, 16, "uniform"), (256, 128, 64, "zipf"),
    (1024, 8, 128, "skewed"), (8192, 32, 16, "uniform"),
])
def test_add_lora_linear_real_shapes(layer, T, L, R, mix):
    dtype = torch.bfloat16
    slots, ranks, plan, x, A, B, y0 = _case(layer, T, L, R, dtype, mix, seed=T + L)
    y = ops.add_lora_linear(y0.clone(), x, A, B, plan)
    ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks)
    assert_rows(y, ref, slots, dtype, y0, f"{layer} T={T} L={L} R={R}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("T", [16, 300])
def test_shrink_expand_dtypes(dtype, T):
    slots, ranks, plan, x, A, B, y0 = _case("qkv", T, 16, 32, dtype, "zipf", seed=3)
    h = ops.sgmv_shrink(x, A, plan, torch.full((3, T, 32), POISON, device="cuda"))
    h_ref = reference.sgmv_shrink(x, A, plan, torch.full((3, T, 32), POISON, device="cuda"), 1.0, ranks)
    assert_rows(h, h_ref, slots, torch.float32 if dtype == torch.float32 else dtype,
                torch.full_like(h, POISON), "shrink")
    y = ops.sgmv_expand(h_ref, B, plan, torch.full_like(y0, POISON), add=False)
    y_ref = reference.sgmv_expand(h_ref, B, plan, torch.full_like(y0, POISON), False, ranks)
    assert_rows(y, y_ref, slots, dtype, torch.full_like(y0, POISON), "expand")


def test_lm_head_vocab_128k():
    gen = torch.Generator().manual_seed(5)
    T, L, R, V = 32, 4, 16, 128256
    slots = token_slots("uniform", T, L, gen, 0.1).cuda()
    ranks = random_ranks(L, R, gen).cuda()
    plan = PlanBuffers(T, L, "cuda").build(slots, ranks)
    A = [a.cuda() for a in stacked_A(L, R, 4096, ranks.cpu(), torch.bfloat16, gen)]
    B = [b.cuda() for b in stacked_B(L, (V,), R, ranks.cpu(), torch.bfloat16, gen)]
    x = torch.randn(T, 4096, generator=gen).bfloat16().cuda()
    y0 = torch.randn(T, V, generator=gen).bfloat16().cuda()
    y = ops.add_lora_linear(y0.clone(), x, A, B, plan)
    ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks)
    assert_rows(y, ref, slots, torch.bfloat16, y0, "lm_head")


def test_embedding_real_shapes():
    gen = torch.Generator().manual_seed(6)
    T, L, R, V, D = 512, 16, 64, 128256, 4096
    slots = token_slots("zipf", T, L, gen, 0.1).cuda()
    ranks = random_ranks(L, R, gen).cuda()
    plan = PlanBuffers(T, L, "cuda").build(slots, ranks)
    g = torch.Generator(device="cuda").manual_seed(6)
    Ae = _poisoned((L, V, R), R ** -0.5, ranks, 2, torch.bfloat16, g)  # stacked_B's layout, 131M values
    Be = _poisoned((L, D, R), R ** -0.5, ranks, 2, torch.bfloat16, g)
    ids = torch.randint(V, (T,), generator=gen).cuda()
    y0 = torch.randn(T, D, generator=gen).bfloat16().cuda()
    y = ops.add_lora_embedding(y0.clone(), ids, Ae, Be, plan)
    ref = reference.add_lora_embedding(y0.clone(), ids, Ae, Be, plan, ranks)
    assert_rows(y, ref, slots, torch.bfloat16, y0, "embedding")


# ---- GPU-only hazards (issue 19): 64-bit slot offsets, PDL against a late writer, the overlap paths,
# a step's host syncs, graphs captured per adapter-count bucket ------------------------------------
def test_int64_slot_offsets_of_the_last_slot():
    """S=512 slots of rank 512 over K=14336: slot 511 starts 511*512*14336 > 2^31 elements into A. Only
    slot 511 is used, every other slot holds NaN: a 32-bit offset reads some other slot and poisons the
    rows. The fused kernel (rank <= 128) the same way with 2048 slots of rank 128."""
    from loraplex.kernels.sgmv_fused import launch_fused

    gen = torch.Generator(device="cuda").manual_seed(11)
    T, K, N = 8, 14336, 4096
    for S, R, fused in ((512, 512, False), (2048, 128, True)):
        A = torch.full((S, R, K), POISON, dtype=torch.bfloat16, device="cuda")
        B = torch.full((S, N, R), POISON, dtype=torch.bfloat16, device="cuda")
        A[S - 1] = (torch.randn(R, K, generator=gen, device="cuda") * K ** -0.5).bfloat16()
        B[S - 1] = (torch.randn(N, R, generator=gen, device="cuda") * R ** -0.5).bfloat16()
        slots = torch.tensor([S - 1, -1] * (T // 2), dtype=torch.int32, device="cuda")
        ranks = torch.zeros(S, dtype=torch.int32, device="cuda")
        ranks[S - 1] = R
        plan = PlanBuffers(T, S, "cuda").build(slots, ranks)
        x = torch.randn(T, K, generator=gen, device="cuda").bfloat16()
        y0 = torch.randn(T, N, generator=gen, device="cuda").bfloat16()
        ref = y0.float() + (x.float() @ A[S - 1].float().t() @ B[S - 1].float().t()) * (slots >= 0)[:, None]
        h = ops.sgmv_shrink(x, [A], plan, torch.full((1, T, R), POISON, device="cuda"))
        y = ops.sgmv_expand(h, [B], plan, y0.clone())
        if fused:
            y = launch_fused(y0.clone(), x, [A], [B], plan)
        torch.cuda.synchronize()
        assert_rows(y, ref.bfloat16(), slots, torch.bfloat16, y0, f"S={S} R={R} fused={fused}")
        del A, B
        torch.cuda.empty_cache()


@pytest.mark.parametrize("T", [4, 64, 512], ids=["fused", "split-K", "shrink+expand"])
def test_pdl_after_a_writer_that_signals_first_and_writes_late(T):
    """The kernel before a LoRA launch lets it start at once and writes late: the activations, and the
    step's slots and ranks that the plan is built from. Eager and replayed from a CUDA graph, the LoRA
    output equals a run with the host synchronized in between, and the split-K counters end at zero."""
    from loraplex.kernels.sgmv_fused import launch_fused

    from .gpu_helpers import late_copy

    L, R, dtype = 8, 16, torch.bfloat16
    K, widths = LAYERS["qkv"]
    gen = torch.Generator().manual_seed(T)
    ranks_new = random_ranks(L, R, gen, zero_slot=True).cuda()
    A = [a.cuda() for a in stacked_A(L, R, K, ranks_new.cpu(), dtype, gen, 3)]
    B = [b.cuda() for b in stacked_B(L, widths, R, ranks_new.cpu(), dtype, gen)]
    bufs = PlanBuffers(T, L, "cuda")
    x, slots, ranks = (torch.zeros(T, K, dtype=dtype, device="cuda"), torch.full((T,), -1, dtype=torch.int32,
                       device="cuda"), torch.zeros(L, dtype=torch.int32, device="cuda"))
    y = torch.zeros(T, sum(widths), dtype=dtype, device="cuda")
    scratch = torch.zeros(3, T, R, device="cuda")

    def lora(plan):
        if T <= 16:
            launch_fused(y, x, A, B, plan)
        else:
            ops.add_lora_linear(y, x, A, B, plan, buffer=scratch)

    def step(x_src, slots_src, ranks_src):  # every input of the step written late by the launch before
        late_copy(x, x_src)
        late_copy(slots, slots_src)
        late_copy(ranks, ranks_src)
        lora(bufs.build(slots, ranks))

    def inputs(mix):
        return (torch.randn(T, K, generator=gen).to(dtype).cuda(), token_slots(mix, T, L, gen, 0.2).cuda(),
                ranks_new)

    def expected(x_src, slots_src, y0):
        plan = PlanBuffers(T, L, "cuda").build(slots_src, ranks_new)
        out = y0.clone()
        torch.cuda.synchronize()
        if T <= 16:
            launch_fused(out, x_src, A, B, plan)
        else:
            ops.add_lora_linear(out, x_src, A, B, plan, buffer=torch.zeros_like(scratch))
        return out

    for mix in ("uniform", "identical", "zipf"):
        args = inputs(mix)
        y0 = torch.randn(T, sum(widths), generator=gen).to(dtype).cuda()
        y.copy_(y0)
        step(*args)
        assert torch.equal(y, expected(args[0], args[1], y0)), f"eager {mix}"
        assert not bufs.split_counters.any()
    # a graph of the activations' late writer and the LoRA launches, replayed with plans built between
    x_src = torch.zeros_like(x)
    plan = bufs.build(slots, ranks)
    late_copy(x, x_src)
    lora(plan)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        late_copy(x, x_src)
        lora(plan)
    for mix in ("distinct", "skewed", "identical"):
        new_x, new_slots, _ = inputs(mix)
        x_src.copy_(new_x)
        bufs.build(new_slots, ranks_new)
        y0 = torch.randn(T, sum(widths), generator=gen).to(dtype).cuda()
        y.copy_(y0)
        graph.replay()
        assert torch.equal(y, expected(new_x, new_slots, y0)), f"replay {mix}"
        assert not bufs.split_counters.any()


@pytest.mark.parametrize("T", [4, 64, 300])
def test_overlap_context_equals_sequential_eager_and_replayed(T):
    """LoraContext(overlap=True): the shrink on a side stream under the base GEMM, the expand after the
    join, for a merged LoraLinear and a q/k/v SliceGroup (its shrink pending across the three
    layers). Eager, and replayed from a graph with new plans, it equals the sequential path."""
    from loraplex.layers import LoraContext, LoraLinear
    from loraplex.layers.linear import LoraSliceLinear, SliceGroup

    from .gpu_helpers import layer_case

    target, base, parts, x = layer_case(T)
    L = target.max_loras
    gen = torch.Generator().manual_seed(T)

    def layers(ctx):
        group = SliceGroup(target, ctx)
        sliced = [LoraSliceLinear(p, group, i) for i, p in enumerate(parts)]
        merged = LoraLinear(base, target, ctx)
        return lambda inp: (merged(inp), torch.cat([s(inp) for s in sliced], dim=1))

    bufs = PlanBuffers(T, L, "cuda")
    ovl_ctx, seq_ctx = LoraContext(T, L, 16, "cuda", overlap=True), LoraContext(T, L, 16, "cuda", overlap=False)
    ovl, seq = layers(ovl_ctx), layers(seq_ctx)
    plans = [token_slots(m, T, L, gen, 0.2).cuda() for m in ("uniform", "identical", "zipf", "distinct")]
    with torch.no_grad():
        for slots in plans:  # eager
            with ovl_ctx.use(bufs.build(slots, target.ranks)):
                got = ovl(x)
            with seq_ctx.use(PlanBuffers(T, L, "cuda").build(slots, target.ranks)):
                want = seq(x)
            for g_, w_ in zip(got, want, strict=True):
                torch.testing.assert_close(g_, w_, **TOL[torch.bfloat16])
        ovl_ctx.set(bufs.build(plans[0], target.ranks))
        ovl(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = ovl(x)
        for slots in plans[1:]:
            ovl_ctx.set(bufs.build(slots, target.ranks))
            graph.replay()
            with seq_ctx.use(PlanBuffers(T, L, "cuda").build(slots, target.ranks)):
                want = seq(x)
            torch.cuda.synchronize()
            for g_, w_ in zip(static, want, strict=True):
                torch.testing.assert_close(g_, w_, **TOL[torch.bfloat16])


def test_a_graph_captured_per_adapter_bucket_replays_every_count_in_it():
    """vLLM's graphs per adapter-count bucket: a plan bounded by its bucket (graph_bucket=True) may be
    captured, and the graph replays right for every adapter count up to the bucket."""
    L, R, T, dtype = 16, 16, 64, torch.bfloat16
    K, widths = LAYERS["o"]
    gen = torch.Generator().manual_seed(3)
    ranks = random_ranks(L, R, gen).cuda()
    A = [a.cuda() for a in stacked_A(L, R, K, ranks.cpu(), dtype, gen)]
    B = [b.cuda() for b in stacked_B(L, widths, R, ranks.cpu(), dtype, gen)]
    bufs = PlanBuffers(T, L, "cuda")
    x = torch.randn(T, K, generator=gen).to(dtype).cuda()
    y = torch.zeros(T, widths[0], dtype=dtype, device="cuda")

    def slots_of(n):  # n distinct adapters
        return torch.randperm(L, generator=gen)[:n][torch.randint(n, (T,), generator=gen)].to(torch.int32).cuda()

    plan = bufs.build(slots_of(4), ranks, max_active=4, graph_bucket=True)
    ops.add_lora_linear(y, x, A, B, plan)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.add_lora_linear(y, x, A, B, plan)
    for n in (1, 3, 4):
        slots = slots_of(n)
        new = bufs.build(slots, ranks, max_active=4, graph_bucket=True)
        y0 = torch.randn(T, widths[0], generator=gen).to(dtype).cuda()
        y.copy_(y0)
        graph.replay()
        ref = reference.add_lora_linear(y0.clone(), x, A, B, new, ranks)
        assert_rows(y, ref, slots, dtype, y0, f"bucket 4, {n} adapters")


def test_steps_with_misses_never_sync_the_host(tiny_model_dir, catalog_dir):
    """Runtime steps on the GPU where every step misses (3 adapters cycling through 2 slots: loads,
    uploads, new ranks), through the injected LoRA layers of a model: nothing in them may make the
    host wait for the device (torch.cuda.set_sync_debug_mode("error") raises on any such call)."""
    from transformers import LlamaForCausalLM

    from loraplex import Catalog, Runtime, RuntimeConfig
    from loraplex.layers import inject

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).cuda().eval()
    rt = Runtime(Catalog(catalog_dir), RuntimeConfig(max_loras=2, max_rank=16, dtype="float16", device="cuda",
                                                     host_cache_bytes=64 << 20))
    lm = inject(model, rt)
    layer = model.model.layers[0]
    hidden = model.config.hidden_size
    names = [["alpha-r4", "beta-r8"], ["gamma-r16", None], ["alpha-r4", "gamma-r16"], ["beta-r8", "alpha-r4"]]
    rt.load_many(["alpha-r4", "beta-r8", "gamma-r16"])  # storage aside: the host side has no device to wait for

    def run(batch):
        with torch.no_grad(), lm.step(batch, [3, 2]):
            x = torch.randn(5, hidden, device="cuda", dtype=torch.float16)
            layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)
            layer.self_attn.o_proj(x)
            layer.mlp.down_proj(layer.mlp.gate_proj(x) * layer.mlp.up_proj(x))

    for batch in names:  # compile and allocate everything once
        run(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            for batch in names:
                run(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert rt.stats()["gpu"]["evictions"] > 0, "the steps were meant to miss"
