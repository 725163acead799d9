"""Launchers reject wrong shapes, dtypes, devices and layouts with a LaunchError naming the argument,
before anything is launched or written."""

import pytest
import torch

from loraplex.errors import LaunchError
from loraplex.kernels import ops
from loraplex.kernels.embedding import launch_embedding
from loraplex.kernels.sgmv_expand import launch_expand
from loraplex.kernels.sgmv_fused import launch_fused
from loraplex.kernels.sgmv_shrink import launch_shrink

from .cases import plan_for

T, K, R, L, N = 4, 32, 16, 3, 24


@pytest.fixture
def good():
    slots = torch.tensor([0, 1, -1, 2], dtype=torch.int32)
    plan = plan_for(slots, torch.full((L,), R, dtype=torch.int32), L)
    return dict(
        plan=plan, x=torch.randn(T, K).half(), A=[torch.randn(L, R, K).half()], B=[torch.randn(L, N, R).half()],
        h=torch.zeros(1, T, R), y=torch.zeros(T, N).half(), ids=torch.zeros(T, dtype=torch.int64),
        Ae=torch.randn(L, 50, R).half(), Be=torch.randn(L, N, R).half(),
    )


def _shrink(g, **kw):
    a = dict(x=g["x"], A=g["A"], plan=g["plan"], out=g["h"]) | kw
    launch_shrink(a["x"], a["A"], a["plan"], a["out"], ranks=kw.get("ranks"))


def _expand(g, **kw):
    a = dict(h=g["h"], B=g["B"], plan=g["plan"], y=g["y"]) | kw
    launch_expand(a["h"], a["B"], a["plan"], a["y"])


SHRINK_BAD = {
    "x must be fp16 or bf16 or fp32|x must be float16": dict(x=torch.randint(0, 3, (T, K))),
    "A\\[0\\] must be float16": dict(A=[torch.randn(L, R, K)]),
    "A\\[0\\] must have shape": dict(A=[torch.randn(L, R, K + 1).half()]),
    "A must be a list of 1 to 3": dict(A=[torch.randn(L, R, K).half()] * 4),
    "A\\[0\\] must be contiguous": dict(A=[torch.randn(L, K, R).half().transpose(1, 2)]),
    "out must be float32": dict(out=torch.zeros(1, T, R).half()),
    "out must have shape": dict(out=torch.zeros(2, T, R)),
    "x must have a unit stride": dict(x=torch.randn(K, T).half().t()),
    "plan was built for 4 tokens": dict(x=torch.randn(T + 1, K).half(), out=torch.zeros(1, T + 1, R)),
    "ranks must be int32": dict(ranks=torch.full((L,), R)),
    "ranks must have one entry per slot": dict(ranks=torch.full((L - 1,), R, dtype=torch.int32)),
    "A has 2 slots but the plan addresses 3": dict(A=[torch.randn(L - 1, R, K).half()]),
}


@pytest.mark.parametrize("msg", list(SHRINK_BAD))
def test_shrink_errors(good, msg):
    with pytest.raises(LaunchError, match=f"sgmv_shrink: .*({msg})"):
        _shrink(good, **SHRINK_BAD[msg])


EXPAND_BAD = {
    "h must be float32": dict(h=torch.zeros(1, T, R).half()),
    "y has 20 columns but the slices of B add up to 24": dict(y=torch.zeros(T, 20).half()),
    "h has 2 slices but B has 1": dict(h=torch.zeros(2, T, R)),
    "B\\[0\\] must be float16": dict(B=[torch.randn(L, N, R)]),
    "B\\[1\\] must have shape": dict(B=[torch.randn(L, 12, R).half(), torch.randn(L, 12, R + 1).half()],
                                     h=torch.zeros(2, T, R)),
    "y must have a unit stride": dict(y=torch.zeros(N, T).half().t()),
    "y must be 2-D": dict(y=torch.zeros(T, N, 1).half()),
}


@pytest.mark.parametrize("msg", list(EXPAND_BAD))
def test_expand_errors(good, msg):
    with pytest.raises(LaunchError, match=f"sgmv_expand: {msg}"):
        _expand(good, **EXPAND_BAD[msg])


def test_device_mismatch(good):
    meta = torch.randn(T, K, device="meta").half()
    with pytest.raises(LaunchError, match="sgmv_shrink: the plan is on cpu but the tensors are on meta"):
        launch_shrink(meta, good["A"], good["plan"], good["h"])
    with pytest.raises(LaunchError, match="y is on meta but the other tensors are on cpu"):
        launch_expand(good["h"], good["B"], good["plan"], torch.zeros(T, N, device="meta").half())


def test_fused_and_linear_errors(good):
    g = good
    with pytest.raises(LaunchError, match="sgmv_fused: y must be float16"):
        launch_fused(g["y"].float(), g["x"], g["A"], g["B"], g["plan"])
    with pytest.raises(LaunchError, match="A_list and B_list must be lists"):
        ops.add_lora_linear(g["y"], g["x"], g["A"], g["B"] * 2, g["plan"])
    with pytest.raises(LaunchError, match="buffer must be"):
        ops.add_lora_linear(g["y"], g["x"], g["A"], g["B"], g["plan"], buffer=torch.zeros(1, T - 1, R))
    with pytest.raises(LaunchError, match="y has 3 rows but x has 4"):
        ops.add_lora_linear(g["y"][:3], g["x"], g["A"], g["B"], g["plan"])


def test_embedding_errors(good):
    g = good
    with pytest.raises(LaunchError, match="token_ids must be int32 or int64"):
        launch_embedding(g["y"], g["ids"].float(), g["Ae"], g["Be"], g["plan"])
    with pytest.raises(LaunchError, match="token_ids must have shape \\[4\\]"):
        launch_embedding(g["y"], g["ids"][:3], g["Ae"], g["Be"], g["plan"])
    with pytest.raises(LaunchError, match="B_emb must have shape"):
        launch_embedding(g["y"], g["ids"], g["Ae"], g["Be"][:, :5].contiguous(), g["plan"])


def test_nothing_written_on_error(good):
    y = torch.full((T, N), 3.0).half()
    with pytest.raises(LaunchError):
        launch_expand(torch.zeros(1, T, R), [torch.randn(L, N, R)], good["plan"], y)
    assert y.eq(3).all()


def test_cpu_without_interpreter_is_a_clear_error(good, monkeypatch):
    from loraplex.kernels import common

    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(LaunchError, match="TRITON_INTERPRET=1"):
        launch_shrink(good["x"], good["A"], good["plan"], good["h"])
