"""GPU-only hazards of LoraplexPunicaWrapper, checked on CPU by logging what really runs:

- with programmatic dependent launch a LoRA kernel reads its metadata (work list, token ids, rank
  vector) before its grid-dependency wait, so every such tensor must have been written before the
  last plan build's fence, never by the launch right before the kernel;
- a step's uploads (the per-slot ranks) must not make the host wait for the device;
- an adapter id outside the wrapper's slots, and vLLM's micro-batching, are refused by name.

Writes are logged with a TorchDispatchMode (every tensor an aten op writes or creates), launches by
wrapping the kernel objects the launchers call; both share one sequence counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraplex.errors import LaunchError

pytestmark = pytest.mark.vllm

MAX_LORAS, MAX_RANK = 3, 16
IDS = [11, 22, 33]
PRE_WAIT = {"sorted_ids_ptr", "tiles_ptr", "n_tiles_ptr", "ranks_ptr"}  # read before gdc_wait (kernels/common.py)


def _span(t: torch.Tensor):
    p = t.untyped_storage().data_ptr()
    return p, p + t.untyped_storage().nbytes()


class _Log(TorchDispatchMode):
    """Sequence-numbered writes (storage spans) and kernel launches."""

    def __init__(self):
        super().__init__()
        self.seq = 0
        self.writes: list[tuple[int, tuple]] = []
        self.copies: list[tuple] = []  # (dst, src, non_blocking) of aten.copy_
        self.launches: list[tuple[int, str, dict]] = []
        self.in_launch = False

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_launch:  # the interpreter's own copies of a launch's arguments
            return out
        n = self.tick()
        written = [a for a, arg in zip(args, func._schema.arguments, strict=False)
                   if arg.alias_info is not None and arg.alias_info.is_write and isinstance(a, torch.Tensor)]
        written += [v for k, v in kwargs.items() if k == "out" and isinstance(v, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        # created tensors (a view's return aliases its input: nothing is written)
        written += [o for o, ret in zip(outs, func._schema.returns, strict=False)
                    if isinstance(o, torch.Tensor) and ret.alias_info is None]
        for t in written:
            if t.device.type != "meta" and t.numel():
                self.writes.append((n, _span(t)))
        if func is torch.ops.aten.copy_.default:
            self.copies.append((args[0], args[1], bool(args[2]) if len(args) > 2 else False))
        return out

    def hook_kernels(self, monkeypatch):
        from loraplex.kernels import embedding, sgmv_expand, sgmv_fused, sgmv_shrink

        log = self
        for mod, name in ((sgmv_shrink, "_sgmv_shrink_kernel"), (sgmv_expand, "_sgmv_expand_kernel"),
                          (sgmv_fused, "_sgmv_fused_kernel"), (embedding, "_lora_embedding_kernel")):
            fn = getattr(mod, name)

            class _Hooked:
                def __init__(self, fn=fn, name=name):
                    self.fn, self.name = fn, name

                def __getitem__(self, grid):
                    def launch(*args, **kw):
                        named = dict(zip(self.fn.arg_names, args, strict=False))
                        log.launches.append((log.tick(), self.name, named))
                        log.in_launch = True
                        try:
                            return self.fn[grid](*args, **kw)
                        finally:
                            log.in_launch = False

                    return launch

            monkeypatch.setattr(mod, name, _Hooked())

    def last_write(self, t, before):
        lo, hi = _span(t)
        return max((n for n, (a, b) in self.writes if n < before and a < hi and lo < b), default=0)


def _wrapper(lora_config):
    from loraplex.vllm_plugin.punica import LoraplexPunicaWrapper

    return LoraplexPunicaWrapper(64, 8, "cpu", lora_config=lora_config)


def _mapping(tokens, samples):
    from vllm.lora.layers import LoRAMapping

    return LoRAMapping(tuple(tokens), tuple(samples), is_prefill=True)


@pytest.fixture
def lora_config():
    from vllm.config.lora import LoRAConfig

    return LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=torch.float32)


def _stacked(gen, R, K, N):
    A = torch.randn(MAX_LORAS, 1, R, K, generator=gen) * 0.3
    B = torch.randn(MAX_LORAS, 1, N, R, generator=gen) * 0.3
    return A, B


def _reference(x, A, B, slots, ranks, R):
    y = torch.zeros(x.shape[0], B.shape[2])
    for t, s in enumerate(slots):
        if s >= 0:
            r = min(ranks[s], R)
            y[t] = x[t] @ A[s, 0, :r].t() @ B[s, 0, :, :r].t()
    return y


def test_pre_wait_inputs_are_written_before_the_plan_fence(lora_config, monkeypatch):
    """Two steps with changed ranks; in each: a full-rank layer, a layer of half the padded rank (what
    fully sharded LoRA gives each tensor-parallel rank) and a classification head. Each LoRA launch's
    pre-wait tensors were last written before the last fence, and every result is right."""
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    gen = torch.Generator().manual_seed(0)
    K, N, T = 32, 24, 6
    tokens, samples = [11, 11, 0, 22, 33, 33], [11, 0, 22, 33, 33, 11]
    w = _wrapper(lora_config)
    fences = [b._fence for b in w._bufs.values()] + ([w._fence] if hasattr(w, "_fence") else [])
    log = _Log()
    log.hook_kernels(monkeypatch)
    head = torch.randn(MAX_LORAS, 1, 5, K, generator=gen)  # a classification head per slot: 5 labels
    with log:
        for step, ranks in enumerate(({11: 16, 22: 5, 33: 8}, {11: 3, 22: 12, 33: 16})):
            w.adapter_ranks = dict(ranks)
            w.update_metadata(_mapping(tokens, samples), IDS, MAX_LORAS + 1, 256)
            x = torch.randn(T, K, generator=gen)
            slots = [IDS.index(i) if i else -1 for i in tokens]
            per_slot = [ranks[i] for i in IDS]
            for R in (MAX_RANK, MAX_RANK // 2):
                A, B = _stacked(gen, R, K, N)
                y = torch.zeros(T, N)
                w.add_lora_linear(y, x, (A,), (B,), 1.0, (N,))
                torch.testing.assert_close(y, _reference(x, A, B, slots, per_slot, R), rtol=1e-4, atol=1e-4,
                                           msg=f"step {step} R={R}")
            out = torch.zeros(T, 5)
            w.apply_lora_full_linear(out, x, head, torch.zeros(MAX_LORAS, 5), torch.ones(MAX_LORAS,
                                                                                           dtype=torch.bool))
            rows = [IDS.index(i) if i else -1 for i in samples]
            want = torch.stack([x[t] @ head[s, 0].t() if s >= 0 else torch.zeros(5) for t, s in enumerate(rows)])
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert log.launches, "no LoRA kernel ran"
    fence_spans = [_span(f) for f in fences]
    fence_writes = [n for n, span in log.writes if span in fence_spans]
    for n, name, args in log.launches:
        last_fence = max((f for f in fence_writes if f < n), default=0)
        assert last_fence, f"{name} launched before any plan was built"
        for arg in PRE_WAIT & args.keys():
            written = log.last_write(args[arg], n)
            assert written < last_fence, (f"{name}'s {arg} (read before its grid-dependency wait) was written "
                                          f"after the last fence (write #{written}, fence #{last_fence}, launch #{n})")


def test_slot_ranks_go_up_without_blocking(lora_config):
    """Each change of the per-slot ranks is one copy into the wrapper's device vector, issued
    non-blocking from a fresh host block (pinned where there is CUDA): a blocking copy from pageable
    memory makes the host wait for the step in flight."""
    w = _wrapper(lora_config)
    w.update_metadata(_mapping([11, 22], [11, 22]), IDS, MAX_LORAS + 1, 256)
    mine = {id(t.untyped_storage()) for t in (w._slot_ranks, *w._clamped_ranks.values())}
    log = _Log()
    for ranks in ({11: 4, 22: 8, 33: 2}, {11: 16, 22: 1, 33: 2}):
        w.adapter_ranks = ranks
        with log:
            w.update_metadata(_mapping([11, 22, 33], [11, 22, 33]), IDS, MAX_LORAS + 1, 256)
        assert w._slot_ranks.tolist() == [ranks[i] for i in IDS]
    uploads = [(dst, src, nb) for dst, src, nb in log.copies
               if id(dst.untyped_storage()) in mine and id(src.untyped_storage()) not in mine]
    assert len(uploads) == 2, uploads
    assert all(nb for _, _, nb in uploads), "the ranks were copied with a blocking copy"


def test_an_adapter_outside_the_slots_is_named(lora_config):
    w = _wrapper(lora_config)
    with pytest.raises(LaunchError, match=r"adapter id 44 of a token .* in no slot"):
        w.update_metadata(_mapping([11, 44], [11, 11]), IDS, MAX_LORAS + 1, 256)
    with pytest.raises(LaunchError, match=r"adapter id 33 of a sampled row .* slot 2; .* slots 0..1"):
        from vllm.config.lora import LoRAConfig

        small = _wrapper(LoRAConfig(max_lora_rank=MAX_RANK, max_loras=2, lora_dtype=torch.float32))
        small.update_metadata(_mapping([11, 22], [11, 33]), IDS, MAX_LORAS + 1, 256)


def test_micro_batching_is_refused(lora_config):
    """vLLM's dual-batch overlap would run two micro-batches through one wrapper's plans at once."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from loraplex.errors import ConfigError

    config = VllmConfig()
    config.parallel_config.enable_dbo = True
    with set_current_vllm_config(config), pytest.raises(ConfigError, match="micro-batch"):
        _wrapper(lora_config)


@pytest.mark.parametrize("max_loras", [1, 3, 4, 6, 8, 32])
def test_graph_buckets_are_vllms(max_loras):
    """The kernels' grid follows vLLM's capture buckets only where vLLM captures per bucket, and the
    buckets are exactly vLLM's own (the bound must hold every step a bucket's graph replays)."""
    from vllm.config import VllmConfig
    from vllm.lora.utils import get_captured_lora_counts

    from loraplex.vllm_plugin.step_modes import graph_buckets

    config = VllmConfig()
    assert graph_buckets(config, max_loras) is None
    config.lora_config = type("L", (), {"specialize_active_lora": True})()
    config.compilation_config.cudagraph_specialize_lora = True
    assert graph_buckets(config, max_loras) == get_captured_lora_counts(max_loras, True)


def test_plans_take_the_bucket_bound(lora_config, monkeypatch):
    """Where graphs are captured per adapter-count bucket the plan's grid bound is the step's bucket
    (3 adapters of 3 slots -> 4, capped at the slots: 3; 1 adapter -> 1), marked as such so that a
    capture with it is allowed; everywhere else on CUDA every slot."""
    from vllm.config.lora import LoRAConfig

    w = _wrapper(LoRAConfig(max_lora_rank=MAX_RANK, max_loras=8, lora_dtype=torch.float32))
    ids8 = [11, 22, 33, 44, 55, 66, 77, 88]
    w._buckets, w._bound = [1, 2, 4, 8, 9], "bucket"  # what __init__ picks on CUDA under vLLM's per-bucket capture
    for tokens, bound in (([11, 11], 1), ([11, 22, 33], 4), ([11, 22, 33, 44, 55], 8), (ids8, 8)):
        w.update_metadata(_mapping(tokens, tokens), ids8, 9, 256)
        assert (w.token_plan.max_active, w.token_plan.graph_bucket) == (bound, True), tokens
    w._bound = "all"
    w.update_metadata(_mapping([11, 22, 33], [11, 22, 33]), ids8, 9, 256)
    assert (w.token_plan.max_active, w.token_plan.graph_bucket) == (8, False)
