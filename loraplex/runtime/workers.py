"""The loader pools: background threads that read adapters and pack slabs without taking the engine's cores.

PyTorch runs a CPU op's parallel regions with the calling thread's OpenMP thread count. A pool thread
packing a slab started an OpenMP team of its own beside the engine's; with more OpenMP threads than
cores, libgomp shortens every team's spin-wait, so each parallel region of the engine's step paid a
thread wake-up: one vllm.LLM on 2 cores, 128 adapters, uniform traffic, fell to 0.60 of the tree before
the slab cache (bench/inproc_ab.py); with one OpenMP thread per pool thread, 0.93. The pool's work
is copies bound by storage and memory anyway. Every other thread keeps its own count (OpenMP keeps it
per thread).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("loraplex.runtime")

_setter = None  # omp_set_num_threads of the OpenMP runtime shipped with torch; False: none found
_lock = threading.Lock()  # a pool's threads start together: one looks the runtime up, the others wait


def _omp_set_num_threads():
    global _setter
    with _lock:
        if _setter is None:
            import torch

            found = False
            lib = os.path.join(os.path.dirname(torch.__file__), "lib")
            for path in sorted(glob.glob(os.path.join(lib, "lib*omp*"))):  # libgomp (Linux), libomp, libiomp5
                try:
                    found = ctypes.CDLL(path).omp_set_num_threads
                    break
                except (OSError, AttributeError):
                    continue
            if not found:
                log.debug("no OpenMP runtime beside torch: loader threads keep torch's thread count")
            _setter = found
    return _setter or None


def one_thread() -> None:
    """Pool initializer: this thread's torch ops run on one OpenMP thread."""
    import torch

    torch.get_num_threads()  # torch's per-thread lazy init first: it would set the count again later
    setter = _omp_set_num_threads()
    if setter is not None:
        setter(1)


def loader_pool(workers: int) -> ThreadPoolExecutor:
    _omp_set_num_threads()
    return ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="loraplex-load", initializer=one_thread)
