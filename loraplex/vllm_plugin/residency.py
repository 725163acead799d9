"""What a worker holds, published for the API server's /metrics (residency_metrics.py).

The adapters live in the worker (the engine-core process, or one process per GPU), /metrics is
served by the API server. The worker writes a small JSON snapshot into LORAPLEX_STATE_DIR whenever
what it holds changes (an adapter enters or leaves a GPU slot or a host-memory cache, is pinned, a
load finishes), atomically (write, then rename), so a scrape always reads one whole snapshot and an
adapter's series disappears as soon as it is evicted. Only tensor-parallel rank 0 publishes: every
rank holds the same adapters.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading

log = logging.getLogger("loraplex.vllm_plugin")

ENV_STATE_DIR = "LORAPLEX_STATE_DIR"
# adapter loads: a few ms (host cache, small adapters) to tens of seconds (large adapters, slow storage)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def snapshot_path(directory: str, pid: int | None = None) -> str:
    return os.path.join(directory, f"worker-{os.getpid() if pid is None else pid}.json")


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - not initialized (unit tests): a single worker
        return 0


class LoadTimes:
    """A cumulative histogram of adapter load times (storage -> a LoRAModel in host memory)."""

    def __init__(self, buckets=LOAD_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    def state(self) -> dict:
        with self._lock:
            return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}


class ResidencyReporter:
    """Writes the snapshot of one LoraplexWorkerLoRAManager when it changed."""

    def __init__(self, manager, directory: str | None = None):
        self.manager = manager
        self.directory = directory if directory is not None else os.environ.get(ENV_STATE_DIR, "").strip()
        self.enabled = bool(self.directory) and _tp_rank() == 0
        self.path = snapshot_path(self.directory) if self.enabled else None
        self.load_times = LoadTimes()
        self._last = None
        self._signature = None
        self._lock = threading.Lock()  # the engine thread and loader threads (prefetches) publish

    def signature(self):
        """Changes whenever state() may have (a few µs: checked at every engine step)."""
        m = self.manager
        am = m._adapter_manager
        return (tuple(am.lora_index_to_id), tuple(am.list_adapters()), len(am._registered_adapters.pinned_items),
                len(am._active_adapters.pinned_items), m._host.generation, sum(self.load_times.counts))

    def state(self) -> dict:
        m = self.manager
        am = m._adapter_manager
        gpu_ids = [i for i in am.lora_index_to_id if i is not None]
        pinned = set(am._registered_adapters.pinned_items) | set(am._active_adapters.pinned_items)
        adapters = {}  # name -> (level, pinned, rank)
        for lora_id in list(am.list_adapters()):
            name = m.adapter_name(lora_id)
            if name is not None:
                level = "gpu" if lora_id in gpu_ids else "cpu"
                adapters[name] = (level, lora_id in pinned, m.adapter_rank(lora_id))
        host_pinned = m._host.pinned_keys()
        for key, rank in m.host_resident():
            adapters.setdefault(key[0], ("cpu", key in host_pinned, rank))
        return {
            "max_gpu": am.lora_slots,
            "adapters": [{"name": n, "level": lv, "pinned": p, "rank": r}
                         for n, (lv, p, r) in sorted(adapters.items())],
            "host": {**m._host.stats(), "queue_prefetches": m.queue_prefetches},
            "load_seconds": self.load_times.state(),
        }

    def publish(self) -> None:
        """Write the snapshot if anything in it changed (cheap when nothing did)."""
        if not self.enabled:
            return
        with self._lock:
            self._publish_locked()

    def _publish_locked(self) -> None:
        try:
            signature = self.signature()
            if signature == self._signature:
                return
            self._signature = signature
            state = self.state()
            if state == self._last:
                return
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.path)
            self._last = state
        except Exception:  # noqa: BLE001 - metrics must never stop serving
            log.exception("loraplex: could not publish adapter residency")
            self.enabled = False
