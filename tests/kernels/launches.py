"""Test helper: record the kernels' launches (grid, arguments, compile-time constants) as the launchers
issue them, replay them verbatim, key each one the way Triton's JIT keys a compiled variant, and
(check_bounds) fail any interpreted load or store outside the tensors the launch was given.

A CUDA graph stores exactly such launches: replaying the recorded ones after writing a new plan into
the same buffers is what a graph replay does, minus the GPU. The variant key is what decides whether
a launch compiles a new kernel (constexpr values, options, dtypes, and for each int argument whether
it is 1 or divisible by 16, for each tensor whether it is 16-byte aligned).
"""

from __future__ import annotations

import numpy as np
import torch
from triton.runtime import interpreter

from loraplex.kernels import embedding, sgmv_expand, sgmv_fused, sgmv_shrink

KERNELS = ((sgmv_shrink, "_sgmv_shrink_kernel"), (sgmv_expand, "_sgmv_expand_kernel"),
           (sgmv_fused, "_sgmv_fused_kernel"), (embedding, "_lora_embedding_kernel"))


_ALLOWED: list | None = None  # byte ranges of the running launch's tensor arguments (check_bounds)


class _Recording:
    def __init__(self, fn, name, log, check_bounds):
        self.fn, self.name, self.log, self.check_bounds = fn, name, log, check_bounds

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            global _ALLOWED
            self.log.append(Launch(self.name, self.fn, grid, args, kwargs))
            if self.check_bounds:
                _ALLOWED = [_extent(a) for a in args if isinstance(a, torch.Tensor) and a.numel()]
            try:
                return self.fn[grid](*args, **kwargs)
            finally:
                _ALLOWED = None

        return launch


def _extent(t: torch.Tensor):
    """[first byte, one past the last byte] a (possibly strided) view spans."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check(ptrs, mask, what):
    """Every address a load/store really touches (mask on) lies inside one tensor argument (a view's
    own elements, not the rest of its storage)."""
    if _ALLOWED is None:
        return
    addr = np.asarray(ptrs.data).astype(np.uint64)
    on = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
    width = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in _ALLOWED:
        inside |= (addr >= lo) & (addr + width <= hi)
    bad = on & ~inside
    if bad.any():
        raise AssertionError(f"{what} outside every tensor argument at {int(bad.sum())} addresses")


class Launch:
    def __init__(self, name, fn, grid, args, kwargs):
        self.name, self.fn, self.grid, self.args, self.kwargs = name, fn, grid, args, kwargs

    def replay(self):
        """The same launch again: same grid, same tensors (whatever they hold now), same constants."""
        self.fn[self.grid](*self.args, **self.kwargs)

    def variant(self):
        """The JIT's specialization key of this launch (what selects or compiles a kernel binary)."""
        spec = []
        for a in self.args:
            if isinstance(a, torch.Tensor):
                spec.append(("tensor", a.dtype, a.data_ptr() % 16 == 0))
            elif isinstance(a, bool):
                spec.append(("bool", a))
            elif isinstance(a, int):
                spec.append(("int", 1 if a == 1 else "D" if a % 16 == 0 else "", a >= 2 ** 31))
            elif isinstance(a, float):
                spec.append(("fp32",))
            else:
                spec.append((type(a).__name__, a))
        return self.name, tuple(spec), tuple(sorted(self.kwargs.items()))


class Recorder:
    """monkeypatch the kernel objects of the kernel modules with recording wrappers (undone with the test)."""

    def __init__(self, monkeypatch, check_bounds: bool = False):
        self.launches: list[Launch] = []
        for mod, name in KERNELS:
            monkeypatch.setattr(mod, name, _Recording(getattr(mod, name), name, self.launches, check_bounds))
        if check_bounds:
            b = interpreter.InterpreterBuilder
            load, store = b.create_masked_load, b.create_masked_store

            # The builder's trailing arguments differ between Triton releases (3.6 takes a cache
            # modifier and an eviction policy, 3.9 one cache policy): pass them through as given.
            def checked_load(self_, ptrs, mask, *args, **kwargs):
                _check(ptrs, mask, "load")
                return load(self_, ptrs, mask, *args, **kwargs)

            def checked_store(self_, ptrs, value, mask, *args, **kwargs):
                _check(ptrs, mask, "store")
                return store(self_, ptrs, value, mask, *args, **kwargs)

            monkeypatch.setattr(b, "create_masked_load", checked_load)
            monkeypatch.setattr(b, "create_masked_store", checked_store)

    def clear(self):
        self.launches.clear()

    def replay(self):
        for launch in list(self.launches):
            launch.replay()

    def variants(self, name=None) -> set:
        return {launch.variant() for launch in self.launches if name is None or launch.name == name}
