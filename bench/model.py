"""A small Llama-style decoder for benchmarks: RMSNorm, RoPE, grouped-query attention through torch
SDPA over a static KV cache, SwiGLU MLP, random weights, sizes from tiny to Llama-3-8B.

Its linear layers are "sites" that a LoRA implementation wraps: fused qkv and gate_up (several
slices, one launch) and o, down (one slice), optionally lm_head. `set_lora(wrap)` swaps the wrappers
while the base weights stay shared, so one model serves the base, loraplex and the peers' ops.

The decode step can be captured in a CUDA graph: token i of a step is request i and lives in KV-cache
row i; every shape is static (the attention reads the whole cache under a mask computed on the
device), the cache is written with index_copy_ and nothing syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.runtime.targets import SliceSpec


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float = 500000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def param_bytes(self, dtype_bytes: int = 2) -> int:
        kv = self.kv_heads * self.head_dim
        layer = self.hidden * (self.hidden + 2 * kv) + self.hidden * self.hidden + 3 * self.hidden * self.intermediate
        return dtype_bytes * (self.layers * layer + 2 * self.vocab * self.hidden)


PRESETS = {
    # the toy.tiny_config shape: head_dim 32
    "tiny": ModelConfig(vocab=256, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
    "small": ModelConfig(vocab=32000, hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=4096),
    "1b": ModelConfig(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192),
    "llama3-8b": ModelConfig(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **kw))
        self.eps = eps

    def forward(self, x):
        # computed in fp32 like HF Llama, rounded back once
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(x, cos, sin):
    """x [T, heads, D]; cos/sin [T, D] (HF Llama's rotate-half convention)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Site:
    """One wrappable linear: where it sits (parent module, attribute), its base, its PEFT slices."""

    def __init__(self, name, parent, attr, base, slices):
        self.name, self.parent, self.attr, self.base, self.slices = name, parent, attr, base, slices


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        super().__init__()
        d = cfg.head_dim
        self.h, self.kv, self.d = cfg.heads, cfg.kv_heads, d
        self.qkv = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * d, bias=False, **kw)
        self.o = nn.Linear(cfg.heads * d, cfg.hidden, bias=False, **kw)

    def decode(self, x, cos, sin, cache_k, cache_v, flat_index, mask, row0=0):
        """x [T, hidden]: token t of the request in cache row row0 + t, at the position encoded in
        flat_index/cos/sin; cache_* [B, S, kv, D]; mask [T, 1, 1, S] True where a position is visible.
        mask None: no attention (linear-only benchmark), q goes straight to o."""
        T = x.shape[0]
        q, k, v = self.qkv(x).split([self.h * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
        if mask is None:  # q stands in for the attention output, which is contiguous (SGLang's op asserts it)
            return self.o(q.contiguous())
        q = _rope(q.view(T, self.h, self.d), cos, sin)
        k = _rope(k.view(T, self.kv, self.d), cos, sin)
        B, S = cache_k.shape[:2]
        cache_k.view(B * S, self.kv, self.d).index_copy_(0, flat_index, k)
        cache_v.view(B * S, self.kv, self.d).index_copy_(0, flat_index, v.view(T, self.kv, self.d))
        # GQA for a single query per request: the heads of one kv group are that group's queries, so
        # SDPA runs on [T, kv, heads/kv, D] against [T, kv, S, D] with no K/V expansion at all
        qg = q.view(T, self.kv, self.h // self.kv, self.d)
        kc = cache_k[row0:row0 + T].transpose(1, 2)
        vc = cache_v[row0:row0 + T].transpose(1, 2)
        out = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask)
        return self.o(out.reshape(T, self.h * self.d))

    def prefill(self, x, cos, sin, cache_k, cache_v, row):
        """x [L, hidden]: one request's prompt at positions 0..L-1, written into cache row `row`."""
        L = x.shape[0]
        q, k, v = self.qkv(x).split([self.h * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
        q = _rope(q.view(L, self.h, self.d), cos, sin)
        k = _rope(k.view(L, self.kv, self.d), cos, sin)
        v = v.view(L, self.kv, self.d)
        cache_k[row, :L] = k
        cache_v[row, :L] = v
        rep = self.h // self.kv
        kk = k.repeat_interleave(rep, dim=1).transpose(0, 1)
        vv = v.repeat_interleave(rep, dim=1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, is_causal=True)
        return self.o(out.transpose(0, 1).reshape(L, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden, 2 * cfg.intermediate, bias=False, **kw)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False, **kw)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg, **kw):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps, **kw)
        self.attn = Attention(cfg, **kw)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.eps, **kw)
        self.mlp = MLP(cfg, **kw)


class DecoderModel(nn.Module):
    """Random-weight Llama-style decoder with a static KV cache of max_batch rows x max_seq positions.

    decode(ids[T], pos[T]) -> logits [T, vocab]: token t continues the request in cache row t, at
    position pos[t] (the number of tokens it already has). prefill(ids[L], row) -> logits [vocab]."""

    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq: int, dtype=torch.bfloat16, device="cpu",
                 seed: int = 0, attention: bool = True):
        super().__init__()
        # attention=False: the linear modules only (q feeds o directly, no KV cache), the setup of the
        # peer figures in TARGETS.md; the LoRA work is the same, only the base is lighter
        self.attention = attention
        kw = dict(dtype=dtype, device=device)
        self.cfg, self.max_batch, self.max_seq, self.dtype = cfg, max_batch, max_seq, dtype
        self.device = torch.device(device)
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden, **kw)
        self.layers = nn.ModuleList(Block(cfg, **kw) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps, **kw)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, **kw)
        self._init_weights(seed)
        shape = (cfg.layers, max_batch, max_seq if attention else 1, cfg.kv_heads, cfg.head_dim)
        self.cache_k = torch.zeros(shape, **kw)
        self.cache_v = torch.zeros(shape, **kw)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float64), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(**kw)
        self.sin = emb.sin().to(**kw)
        self._positions = torch.arange(max_seq, device=self.device)
        self._row_base = torch.arange(max_batch, device=self.device) * max_seq
        self.sites = self._sites()
        self.lora_modules = {}

    @torch.no_grad()
    def _init_weights(self, seed):
        # std 1/sqrt(fan_in) keeps every layer's output at unit scale, so 32 layers stay finite in bf16
        g = torch.Generator(device=self.device).manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features), generator=g)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0, generator=g)

    def _sites(self) -> dict:
        cfg, d = self.cfg, self.cfg.head_dim
        sites = {}
        for i, blk in enumerate(self.layers):
            p = f"model.layers.{i}"
            qkv = [SliceSpec(f"{p}.self_attn.q_proj", cfg.hidden, cfg.heads * d),
                   SliceSpec(f"{p}.self_attn.k_proj", cfg.hidden, cfg.kv_heads * d),
                   SliceSpec(f"{p}.self_attn.v_proj", cfg.hidden, cfg.kv_heads * d)]
            gu = [SliceSpec(f"{p}.mlp.gate_proj", cfg.hidden, cfg.intermediate),
                  SliceSpec(f"{p}.mlp.up_proj", cfg.hidden, cfg.intermediate)]
            for name, parent, attr, slices in (
                (f"{p}.self_attn.q_proj+k_proj+v_proj", blk.attn, "qkv", qkv),
                (f"{p}.self_attn.o_proj", blk.attn, "o", [SliceSpec(f"{p}.self_attn.o_proj", cfg.hidden, cfg.hidden)]),
                (f"{p}.mlp.gate_proj+up_proj", blk.mlp, "gate_up", gu),
                (f"{p}.mlp.down_proj", blk.mlp, "down",
                 [SliceSpec(f"{p}.mlp.down_proj", cfg.intermediate, cfg.hidden)]),
            ):
                sites[name] = Site(name, parent, attr, getattr(parent, attr), slices)
        sites["lm_head"] = Site("lm_head", self, "lm_head", self.lm_head,
                                [SliceSpec("lm_head", cfg.hidden, cfg.vocab)])
        return sites

    def lora_sites(self, lm_head: bool = False) -> list[Site]:
        return [s for n, s in self.sites.items() if lm_head or n != "lm_head"]

    def set_lora(self, wrap=None, lm_head: bool = False) -> None:
        """Wrap every linear site with wrap(base, name, slices) -> nn.Module (None: the plain base).
        lm_head is wrapped only if lm_head=True. The base weights are shared, never copied."""
        self.lora_modules = {}
        for s in self.sites.values():
            mod = s.base
            if wrap is not None and (lm_head or s.name != "lm_head"):
                mod = wrap(s.base, s.name, s.slices)
                self.lora_modules[s.name] = mod
            # assigning a module that is already registered elsewhere keeps it shared, not copied
            setattr(s.parent, s.attr, mod)

    def decode(self, ids, pos, row0: int = 0):
        """ids [T] int64, pos [T] int64; token t continues the request of cache row row0 + t (a
        per-request loop passes T=1 and its row). Returns logits [T, vocab]."""
        T = ids.shape[0]
        x = self.embed(ids)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        flat = self._row_base[row0:row0 + T] + pos
        mask = None
        if self.attention:
            mask = (self._positions[None, :] <= pos[:, None]).view(T, 1, 1, self.max_seq)
        for i, blk in enumerate(self.layers):
            x = x + blk.attn.decode(blk.attn_norm(x), cos, sin, self.cache_k[i], self.cache_v[i], flat, mask, row0)
            x = x + blk.mlp(blk.mlp_norm(x))
        return self.lm_head(self.norm(x))

    def prefill(self, ids, row: int):
        """ids [L] int64: one request's prompt into cache row `row`; returns the last logits [1, vocab]."""
        if not self.attention:
            raise ValueError("prefill needs a model built with attention=True")
        L = ids.shape[0]
        x = self.embed(ids)
        cos, sin = self.cos[:L], self.sin[:L]
        for i, blk in enumerate(self.layers):
            x = x + blk.attn.prefill(blk.attn_norm(x), cos, sin, self.cache_k[i], self.cache_v[i], row)
            x = x + blk.mlp(blk.mlp_norm(x))
        return self.lm_head(self.norm(x[-1:]))


class DecodeGraph:
    """The decode step for T tokens over static input buffers, captured in a CUDA graph on a GPU
    (eager elsewhere, or with graph=False). Fill .ids/.pos (or pass them to run) and run(); logits
    and next_ids (greedy) are static outputs. Set the LoRA plan (the same static buffers) before
    capture and before each run: kernels capture the plan's buffers, not its values."""

    def __init__(self, model: DecoderModel, num_tokens: int, graph: bool | None = None, warmup: int = 2):
        self.model, self.T = model, num_tokens
        dev = model.device
        self.ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        self.pos = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        self.graph = None
        self.logits = None
        self.next_ids = None
        use_graph = dev.type == "cuda" if graph is None else graph
        if use_graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm up off the capture: Triton compiles, peers build pointer tables
                for _ in range(warmup):
                    self._eager()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._eager()

    def _eager(self):
        with torch.no_grad():
            self.logits = self.model.decode(self.ids, self.pos)
            self.next_ids = self.logits.argmax(-1)

    def run(self, ids=None, pos=None):
        if ids is not None:
            self.ids.copy_(ids, non_blocking=True)
        if pos is not None:
            self.pos.copy_(pos, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager()
        return self.logits
