"""Compile every kernel variant to a cubin for a GPU architecture, on a machine without a GPU.

The interpreter accepts code that the real compiler rejects (type unification in branches, dot
shapes, constexpr misuse); this catches those on CPU. Run in a process WITHOUT TRITON_INTERPRET:
    python -m tests.kernels.aot_compile [arch]
Prints one line per variant and exits non-zero on the first failure.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "compile checks need the real compiler, not the interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from loraplex.kernels.config import _heuristic_gpu  # noqa: E402
from loraplex.kernels.embedding import _lora_embedding_kernel  # noqa: E402
from loraplex.kernels.sgmv_expand import _sgmv_expand_kernel  # noqa: E402
from loraplex.kernels.sgmv_fused import _sgmv_fused_kernel  # noqa: E402
from loraplex.kernels.sgmv_shrink import _sgmv_shrink_kernel  # noqa: E402

_INDEX_PTRS = {"sorted_ids_ptr", "slot_start_ptr", "slot_count_ptr", "active_ptr", "num_active_ptr", "ranks_ptr"}


def _signature(kernel, model_dtype, constexprs, fp32_ptrs=(), float_args=("scale",), ids_dtype="i64"):
    sig, consts = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            consts[(i,)] = constexprs[name]
        elif name == "ids_ptr":
            sig[name] = "*" + ids_dtype
        elif name in _INDEX_PTRS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32_ptrs else "*" + model_dtype
        elif name in float_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return ASTSource(kernel, sig, consts)


def variants():
    """(label, ASTSource, num_warps, num_stages) for the configurations serving uses."""
    prec = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}
    for dt, ns, T, even in (("bf16", 3, 1, True), ("fp16", 1, 4096, False), ("fp32", 2, 64, True)):
        c = _heuristic_gpu("sgmv_shrink", T, 4096, 0, 64)
        yield (f"shrink {dt} slices={ns} T={T}", _signature(_sgmv_shrink_kernel, dt, dict(
            NUM_SLICES=ns, BLOCK_M=c["BLOCK_M"], BLOCK_R=c["BLOCK_R"], BLOCK_K=c["BLOCK_K"], EVEN_K=even,
            UPCAST=False, DOT_PREC=prec[dt]), fp32_ptrs=("out_ptr",)), c["num_warps"], c["num_stages"])
    for dt, ns, T, add in (("bf16", 3, 64, True), ("fp16", 1, 4096, False), ("fp32", 2, 1, True)):
        c = _heuristic_gpu("sgmv_expand", T, 0, 4096, 16)
        yield (f"expand {dt} slices={ns} T={T} add={add}", _signature(_sgmv_expand_kernel, dt, dict(
            NUM_SLICES=ns, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_R=c["BLOCK_R"], ADD=add,
            UPCAST=False, DOT_PREC=prec[dt]), fp32_ptrs=("h_ptr",)), c["num_warps"], c["num_stages"])
    for dt, ns, R, even in (("bf16", 3, 16, True), ("fp16", 2, 128, False), ("fp32", 1, 64, True)):
        c = _heuristic_gpu("sgmv_fused", 8, 4096, 6144, R)
        yield (f"fused {dt} slices={ns} R={R}", _signature(_sgmv_fused_kernel, dt, dict(
            NUM_SLICES=ns, SPLIT_N=4, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
            BLOCK_R=max(16, triton.next_power_of_2(R)), EVEN_K=even, UPCAST=False, DOT_PREC=prec[dt])),
            c["num_warps"], c["num_stages"])
    for dt, ids in (("bf16", "i64"), ("fp16", "i32")):
        c = _heuristic_gpu("lora_embedding", 256, 0, 4096, 16)
        yield (f"embedding {dt} ids={ids}", _signature(_lora_embedding_kernel, dt, dict(
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_R=c["BLOCK_R"], UPCAST=False,
            DOT_PREC=prec[dt]), ids_dtype=ids), c["num_warps"], c["num_stages"])


def main(arch: int = 90) -> int:
    target = GPUTarget("cuda", arch, 32)
    for label, src, warps, stages in variants():
        compiled = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
        assert "cubin" in compiled.asm, label
        print(f"ok  sm_{arch}  {label}  shared={compiled.metadata.shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
