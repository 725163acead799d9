"""Argument checks shared by the launchers and the torch backend: every wrong shape, dtype, device
or layout becomes a LaunchError that names the argument, before anything is launched or written.

Plain Python on tensor metadata only (no device sync), so they are cheap enough to run per call.
"""

from __future__ import annotations

import torch

from ..errors import LaunchError

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(op, msg):
    raise LaunchError(f"{op}: {msg}")


def tensor(op, name, t, *, dim=None, dtype=None, device=None, contiguous=False, last_stride_one=False):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            _fail(op, f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        _fail(op, f"{name} is on {t.device} but the other tensors are on {device}")
    if contiguous and not t.is_contiguous():
        _fail(op, f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    if last_stride_one and t.numel() and t.stride(-1) != 1:
        _fail(op, f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")
    return t


def shape(op, name, t, expected):
    """expected: a tuple with ints or None (any size) per dimension."""
    got = tuple(t.shape)
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got, strict=True)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        _fail(op, f"{name} must have shape {want}, got {list(got)}")


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def plan(op, p, num_tokens, device):
    if p.num_tokens != num_tokens:
        _fail(op, f"the plan was built for {p.num_tokens} tokens but the activations have {num_tokens} rows")
    if p.device != device:
        _fail(op, f"the plan is on {p.device} but the tensors are on {device}")
    if getattr(p, "tiles", None) is None:
        _fail(op, "the plan has no work list (build it with PlanBuffers.build)")
    # A graph replays the grid sized at capture: bounded by this step's adapters, it would silently skip
    # the tokens of any adapter beyond them in a later plan written into the same buffers.
    if p.max_active < p.max_loras and not getattr(p, "graph_bucket", False) and capturing():
        _fail(op, f"a CUDA graph is being captured with a plan bounded to {p.max_active} of {p.max_loras} slots; "
                  "build plans for capture with max_active=None (Runtime.plan(..., static=True) does)")


def ranks(op, r, p, device):
    r = p.slot_ranks if r is None else r
    tensor(op, "ranks", r, dim=1, dtype=torch.int32, device=device, contiguous=True)
    if r.shape[0] < p.max_loras:
        _fail(op, f"ranks must have one entry per slot ({p.max_loras}), got {r.shape[0]}")
    return r


def weight_list(op, name, ws, dtype, device, n_slots, dims):
    """ws: a non-empty list of 1..3 contiguous [n_slots, *dims] tensors; dims entries may be None."""
    if not isinstance(ws, (list, tuple)) or not 1 <= len(ws) <= 3:
        _fail(op, f"{name} must be a list of 1 to 3 tensors (one per slice), got {type(ws).__name__}"
              + (f" of {len(ws)}" if isinstance(ws, (list, tuple)) else ""))
    for i, w in enumerate(ws):
        tensor(op, f"{name}[{i}]", w, dim=1 + len(dims), dtype=dtype, device=device, contiguous=True)
        shape(op, f"{name}[{i}]", w, (n_slots, *dims))
    return ws


def shrink(op, x, A, p, out, ranks_):
    tensor(op, "x", x, dim=2, dtype=MODEL_DTYPES, last_stride_one=True)
    dev = x.device
    plan(op, p, x.shape[0], dev)
    weight_list(op, "A", A, x.dtype, dev, None, (None, x.shape[1]))
    S, R = A[0].shape[0], A[0].shape[1]
    for i, a in enumerate(A):
        shape(op, f"A[{i}]", a, (S, R, x.shape[1]))
    if p.max_loras > S:
        _fail(op, f"A has {S} slots but the plan addresses {p.max_loras}")
    tensor(op, "out", out, dim=3, dtype=torch.float32, device=dev, last_stride_one=True)
    shape(op, "out", out, (len(A), x.shape[0], R))
    return ranks(op, ranks_, p, dev)


def expand(op, h, B, p, y, ranks_):
    tensor(op, "h", h, dim=3, dtype=torch.float32, last_stride_one=True)
    dev = h.device
    tensor(op, "y", y, dim=2, dtype=MODEL_DTYPES, device=dev, last_stride_one=True)
    plan(op, p, y.shape[0], dev)
    n_slices, R = h.shape[0], h.shape[2]
    weight_list(op, "B", B, y.dtype, dev, None, (None, R))
    if len(B) != n_slices:
        _fail(op, f"h has {n_slices} slices but B has {len(B)}")
    shape(op, "h", h, (n_slices, y.shape[0], R))
    S = B[0].shape[0]
    for i, b in enumerate(B):
        shape(op, f"B[{i}]", b, (S, None, R))
    if p.max_loras > S:
        _fail(op, f"B has {S} slots but the plan addresses {p.max_loras}")
    width = sum(b.shape[1] for b in B)
    if y.shape[1] != width:
        _fail(op, f"y has {y.shape[1]} columns but the slices of B add up to {width}")
    return ranks(op, ranks_, p, dev)


def linear(op, y, x, A, B, p, buffer, ranks_):
    tensor(op, "x", x, dim=2, dtype=MODEL_DTYPES, last_stride_one=True)
    tensor(op, "y", y, dim=2, dtype=x.dtype, device=x.device, last_stride_one=True)
    if y.shape[0] != x.shape[0]:
        _fail(op, f"y has {y.shape[0]} rows but x has {x.shape[0]}")
    if not isinstance(A, (list, tuple)) or not isinstance(B, (list, tuple)) or len(A) != len(B):
        _fail(op, "A_list and B_list must be lists with one tensor per slice, of the same length")
    weight_list(op, "A_list", A, x.dtype, x.device, None, (None, x.shape[1]))
    R = A[0].shape[1]
    weight_list(op, "B_list", B, x.dtype, x.device, None, (None, R))
    if buffer is not None:
        tensor(op, "buffer", buffer, dim=3, dtype=torch.float32, device=x.device, last_stride_one=True)
        if buffer.shape[0] < len(A) or buffer.shape[1] < x.shape[0] or buffer.shape[2] != R:
            _fail(op, f"buffer must be [>= {len(A)}, >= {x.shape[0]}, {R}], got {list(buffer.shape)}")
    for i, b in enumerate(B):
        if b.shape[0] != A[0].shape[0]:
            _fail(op, f"B_list[{i}] has {b.shape[0]} slots but A_list[0] has {A[0].shape[0]}")
    for i, a in enumerate(A):
        shape(op, f"A_list[{i}]", a, tuple(A[0].shape))
    if A[0].shape[0] < p.max_loras:
        _fail(op, f"A_list has {A[0].shape[0]} slots but the plan addresses {p.max_loras}")
    if y.shape[1] != sum(b.shape[1] for b in B):
        _fail(op, f"y has {y.shape[1]} columns but the slices of B_list add up to {sum(b.shape[1] for b in B)}")
    plan(op, p, x.shape[0], x.device)
    return ranks(op, ranks_, p, x.device)


def embedding(op, y, token_ids, A_emb, B_emb, p, ranks_):
    tensor(op, "y", y, dim=2, dtype=MODEL_DTYPES, last_stride_one=True)
    dev = y.device
    plan(op, p, y.shape[0], dev)
    tensor(op, "token_ids", token_ids, dim=1, dtype=INDEX_DTYPES, device=dev, contiguous=True)
    shape(op, "token_ids", token_ids, (y.shape[0],))
    tensor(op, "A_emb", A_emb, dim=3, dtype=y.dtype, device=dev, contiguous=True)
    S, _, R = A_emb.shape
    tensor(op, "B_emb", B_emb, dim=3, dtype=y.dtype, device=dev, contiguous=True)
    shape(op, "B_emb", B_emb, (S, y.shape[1], R))
    if p.max_loras > S:
        _fail(op, f"A_emb has {S} slots but the plan addresses {p.max_loras}")
    return ranks(op, ranks_, p, dev)
