"""Public ops: backend choice, both backends agree, fused vs unfused dispatch, scratch buffer use,
custom-op registration and tracing by torch.compile."""

import pytest
import torch

from loraplex.kernels import ops, reference

from .cases import POISON, TOL, assert_rows, plan_for, random_ranks, stacked_A, stacked_B, token_slots


def _linear_data(T, dtype=torch.float16, K=40, widths=(24, 8), R=16, L=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots("uniform", T, L, gen, 0.25)
    ranks = random_ranks(L, R, gen)
    plan = plan_for(slots, ranks, L, max_tokens=64)
    x = torch.randn(T, K, generator=gen).to(dtype)
    A = stacked_A(L, R, K, ranks, dtype, gen, len(widths))
    B = stacked_B(L, widths, R, ranks, dtype, gen)
    y0 = torch.randn(T, sum(widths), generator=gen).to(dtype)
    return slots, ranks, plan, x, A, B, y0


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("LORAPLEX_BACKEND", raising=False)
    assert ops.backend("cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend("cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("cpu") == "torch"
    monkeypatch.setenv("LORAPLEX_BACKEND", "Torch")
    assert ops.backend("cuda") == "torch"
    monkeypatch.setenv("LORAPLEX_BACKEND", "cuda-graphs")
    with pytest.raises(ValueError, match="LORAPLEX_BACKEND"):
        ops.backend()


@pytest.mark.parametrize("T", [3, 40], ids=["fused", "shrink+expand"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_add_lora_linear_backends(monkeypatch, backend, T):
    monkeypatch.setenv("LORAPLEX_BACKEND", backend)
    assert ops.use_fused(T, "cpu") == (T <= 16)
    slots, ranks, plan, x, A, B, y0 = _linear_data(T)
    y = ops.add_lora_linear(y0.clone(), x, A, B, plan, scale=0.5)
    ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks, None, 0.5)
    assert_rows(y, ref, slots, torch.float16, y0, f"add_lora_linear {backend}")


def test_add_lora_linear_uses_the_given_buffer(monkeypatch):
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    T = 40  # above the fused threshold: goes through the scratch buffer
    slots, ranks, plan, x, A, B, y0 = _linear_data(T, dtype=torch.float32)
    buf = torch.full((3, 64, 16), POISON)
    y = ops.add_lora_linear(y0.clone(), x, A, B, plan, buffer=buf)
    h = reference.sgmv_shrink(x, A, plan, torch.full((2, T, 16), POISON), 1.0, ranks)
    assert_rows(buf[:2, :T], h, slots, torch.float32, torch.full_like(h, POISON), "buffer contents")
    assert buf[2].isnan().all() and buf[:, T:].isnan().all()
    ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks)
    assert_rows(y, ref, slots, torch.float32, y0, "with buffer")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shrink_expand_embedding_ops(monkeypatch, backend):
    monkeypatch.setenv("LORAPLEX_BACKEND", backend)
    slots, ranks, plan, x, A, B, y0 = _linear_data(9, dtype=torch.bfloat16)
    h = ops.sgmv_shrink(x, A, plan, torch.full((2, 9, 16), POISON), 0.5)
    h_ref = reference.sgmv_shrink(x, A, plan, torch.full((2, 9, 16), POISON), 0.5, ranks)
    assert_rows(h, h_ref, slots, torch.float32, torch.full_like(h, POISON), "shrink op")
    y = ops.sgmv_expand(h_ref, B, plan, y0.clone(), add=False)
    y_ref = reference.sgmv_expand(h_ref, B, plan, y0.clone(), False, ranks)
    assert_rows(y, y_ref, slots, torch.bfloat16, y0, "expand op")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(30, (9,), generator=gen)
    Ae, Be = torch.randn(4, 30, 16, generator=gen), torch.randn(4, 12, 16, generator=gen)
    ye0 = torch.randn(9, 12, generator=gen)
    ye = ops.add_lora_embedding(ye0.clone(), ids, Ae, Be, plan)
    ye_ref = reference.add_lora_embedding(ye0.clone(), ids, Ae, Be, plan, ranks)
    assert_rows(ye, ye_ref, slots, torch.float32, ye0, "embedding op")


def test_zero_tokens_is_a_no_op(monkeypatch):
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    plan = plan_for(torch.zeros(0, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 2, max_tokens=4)
    x, y = torch.zeros(0, 8), torch.zeros(0, 6)
    A, B = [torch.zeros(2, 4, 8)], [torch.zeros(2, 6, 4)]
    assert ops.add_lora_linear(y, x, A, B, plan).shape == (0, 6)
    assert ops.sgmv_shrink(x, A, plan, torch.zeros(1, 0, 4)).shape == (1, 0, 4)


def test_custom_ops_registered_and_traced_by_compile(monkeypatch):
    monkeypatch.setenv("LORAPLEX_BACKEND", "triton")
    from loraplex.kernels import embedding, sgmv_expand, sgmv_fused, sgmv_shrink  # noqa: F401 - registers

    for name in ("sgmv_shrink", "sgmv_expand", "sgmv_fused", "lora_embedding"):
        op = getattr(torch.ops.loraplex, name).default
        assert any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments), name

    slots, ranks, plan, x, A, B, y0 = _linear_data(20, dtype=torch.float32)

    def step(y, x):
        ops.add_lora_linear(y, x, A, B, plan)
        return y

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y = compiled(y0.clone(), x)
    ref = reference.add_lora_linear(y0.clone(), x, A, B, plan, ranks)
    torch.testing.assert_close(y[slots >= 0], ref[slots >= 0], **TOL[torch.float32])
    assert torch.equal(y[slots < 0], y0[slots < 0])


def test_opcheck_shrink():
    """torch.library.opcheck: schema (mutation declared), fake impl, functionalization."""
    from loraplex.kernels import sgmv_shrink  # noqa: F401

    slots, ranks, plan, x, A, _, _ = _linear_data(5, dtype=torch.float32, widths=(8,))
    out = torch.zeros(1, 5, 16)
    args = (x, A, out, plan.sorted_token_ids, plan.tiles, plan.n_tiles, ranks, plan.split_partials,
            plan.split_counters, plan.max_active, 1.0)
    torch.library.opcheck(torch.ops.loraplex.sgmv_shrink.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_first_use_in_a_fresh_process():
    """The ops import their kernel modules lazily; nothing else imported them first here."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import torch
from loraplex.kernels import ops
from loraplex.runtime.plan import PlanBuffers
i32 = torch.int32
plan = PlanBuffers(32, 2).build(torch.tensor([0, 1, -1] * 7, dtype=i32), torch.tensor([4, 2], dtype=i32))
x, A, B = torch.randn(21, 8), [torch.randn(2, 4, 8)], [torch.randn(2, 6, 4)]
for T in (21, 2):
    p = plan if T == 21 else PlanBuffers(4, 2).build(torch.tensor([1, 0], dtype=i32), plan.slot_ranks)
    ops.add_lora_linear(torch.zeros(T, 6), x[:T], A, B, p)
ops.add_lora_embedding(torch.zeros(21, 6), torch.zeros(21, dtype=torch.int64), torch.randn(2, 5, 4), B[0], plan)
h = ops.sgmv_shrink(x, A, plan, torch.zeros(1, 21, 4))
ops.sgmv_expand(h, B, plan, torch.zeros(21, 6))
print("ok", ops.backend("cpu"))
"""
    env = {"TRITON_INTERPRET": "1", "LORAPLEX_BACKEND": "triton", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok triton" in proc.stdout, proc.stderr[-3000:]
