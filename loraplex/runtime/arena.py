"""HostArena: one host buffer of host_cache_bytes (pinned on CUDA) that the host cache carves slabs from.

Why not a pinned tensor per slab: torch's caching host allocator rounds every pinned allocation up to
a power of two (an 84 MB slab takes 128 MB), so the pinned memory really used could reach twice the
budget; and a fresh cudaHostAlloc costs milliseconds per miss. The arena pins once, at first use, and
the budget is then exactly the memory used. Ranges are handed out first-fit and coalesced on free;
the cache evicts until a contiguous range fits.
"""

from __future__ import annotations

import bisect
import threading

import torch

ALIGN = 512  # bytes: every slab starts on a cache-line and DMA-friendly boundary


class HostArena:
    def __init__(self, nbytes: int, pin: bool):
        self.nbytes = nbytes - nbytes % ALIGN
        self.pin = pin
        self._buffer: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._free_offs = [0] if self.nbytes else []  # sorted free ranges: offsets and their sizes
        self._free_size = {0: self.nbytes} if self.nbytes else {}

    @staticmethod
    def rounded(n: int) -> int:
        return max(ALIGN, -(-n // ALIGN) * ALIGN)

    @property
    def buffer(self) -> torch.Tensor:
        with self._lock:
            if self._buffer is None:  # pinned once, on the first load rather than at startup
                self._buffer = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin)
            return self._buffer

    def alloc(self, n: int) -> int | None:
        """Offset of a free range of rounded(n) bytes (first fit), or None if no range is large enough."""
        n = self.rounded(n)
        with self._lock:
            for i, off in enumerate(self._free_offs):
                size = self._free_size[off]
                if size >= n:
                    del self._free_offs[i]
                    del self._free_size[off]
                    if size > n:
                        bisect.insort(self._free_offs, off + n)
                        self._free_size[off + n] = size - n
                    return off
        return None

    def free(self, off: int, n: int) -> None:
        n = self.rounded(n)
        with self._lock:
            i = bisect.bisect_left(self._free_offs, off)
            if i < len(self._free_offs) and self._free_offs[i] < off + n:
                raise RuntimeError(f"host arena: range {off}+{n} freed twice or overlaps a free range")
            if i and self._free_offs[i - 1] + self._free_size[self._free_offs[i - 1]] > off:
                raise RuntimeError(f"host arena: range {off}+{n} freed twice or overlaps a free range")
            nxt = off + n
            if i < len(self._free_offs) and self._free_offs[i] == nxt:  # merge with the range after
                n += self._free_size.pop(nxt)
                del self._free_offs[i]
            if i and self._free_offs[i - 1] + self._free_size[self._free_offs[i - 1]] == off:  # and before
                self._free_size[self._free_offs[i - 1]] += n
            else:
                self._free_offs.insert(i, off)
                self._free_size[off] = n

    def largest_free(self) -> int:
        with self._lock:
            return max(self._free_size.values(), default=0)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(self._free_size.values())

    def view(self, off: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of `dtype` at byte offset `off` (a view: no copy, shares the pinning)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.buffer[off:off + max(numel, 1) * itemsize].view(dtype)


__all__ = ["ALIGN", "HostArena"]
