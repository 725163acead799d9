"""LoRA kernels: punica-style SGMV shrink/expand, a fused decode kernel and embedding LoRA in Triton,
with fp32 torch references. The public entry points are in `loraplex.kernels.ops` (the kernel
modules share names with the ops, so nothing is re-exported here; Triton modules load on first use)."""
