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
import time

log = logging.getLogger("loraplex.vllm_plugin")

ENV_STATE_DIR = "LORAPLEX_STATE_DIR"
# adapter loads: a few ms (host cache, small adapters) to tens of seconds (large adapters, slow storage)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def snapshot_path(directory: str, pid: int | None = None) -> str:
    return os.path.join(directory, f"worker-{os.getpid() if pid is None else pid}.json")


def newest_snapshot(directory: str) -> dict | None:
    """The most recently written worker snapshot in `directory` (None if there is none yet)."""
    import glob

    newest = None
    for path in glob.glob(os.path.join(directory, "worker-*.json")):
        try:
            with open(path) as f:
                state = json.load(f)
            mtime = os.stat(path).st_mtime_ns
        except (OSError, ValueError):
            continue  # a worker that just exited, or a snapshot being replaced
        if newest is None or mtime > newest[0]:
            newest = (mtime, state)
    return None if newest is None else newest[1]


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
    """Publishes the snapshot of one LoraplexWorkerLoRAManager when it changed.

    The engine thread only compares a signature (a few µs per step) and, when it changed, builds the
    snapshot (dict lookups; ranks are cached per adapter version); serializing and writing it happen
    on a writer thread, at most every WRITE_INTERVAL_S, always ending with the latest snapshot."""

    WRITE_INTERVAL_S = 0.02

    def __init__(self, manager, directory: str | None = None):
        self.manager = manager
        self.directory = directory if directory is not None else os.environ.get(ENV_STATE_DIR, "").strip()
        self.enabled = bool(self.directory) and _tp_rank() == 0
        self.path = snapshot_path(self.directory) if self.enabled else None
        self.load_times = LoadTimes()
        self._signature = None
        self._lock = threading.Lock()  # the engine thread and loader threads (prefetches) publish
        self._pending = None
        self._modules = None
        self._wake = threading.Event()
        self._writer = None

    def signature(self):
        """Changes whenever state() may have (a few µs: checked at every engine step)."""
        m = self.manager
        am = m._adapter_manager
        # sets, not the LRU order: vLLM touches that for every request at every step
        return (tuple(am.lora_index_to_id), frozenset(am._registered_adapters.cache),
                len(am._registered_adapters.pinned_items), len(am._active_adapters.pinned_items),
                m._host.generation, sum(self.load_times.counts), len(m.ledger.keys()), m.failed_requests,
                m.max_versions_in_step, getattr(m, "merge_switches", 0))

    def state(self) -> dict:
        m = self.manager
        am = m._adapter_manager
        gpu_ids = set(am.lora_index_to_id)
        pinned = set(am._registered_adapters.pinned_items) | set(am._active_adapters.pinned_items)
        adapters = {}  # name -> (level, pinned, rank)
        from .worker_merge import BASE_ID

        for lora_id in list(am._registered_adapters.cache):
            if lora_id == BASE_ID:  # merged mode's base-model slot: not an adapter
                continue
            name = m.adapter_name(lora_id)
            if name is not None:
                level = "gpu" if lora_id in gpu_ids else "cpu"
                adapters[name] = (level, lora_id in pinned, m.adapter_rank(lora_id))
        host_pinned = m._host.pinned_keys()
        for key, rank in m.host_resident():
            adapters.setdefault(key[0], ("cpu", key in host_pinned, rank))
        if self._modules is None:
            from .loading import expected_modules

            self._modules = sorted(expected_modules(am))
        return {
            "max_gpu": am.lora_slots,
            "lora_modules": self._modules,  # what the API server checks adapters' targets against
            "adapters": [{"name": n, "level": lv, "pinned": p, "rank": r}
                         for n, (lv, p, r) in sorted(adapters.items())],
            "host": {**m._host.stats(), "queue_prefetches": m.queue_prefetches},
            "versions": {"held": len(m.ledger.keys()), "max_in_step": m.max_versions_in_step,
                         "failed_requests": m.failed_requests},
            "load_seconds": self.load_times.state(),
            "merge": m.merge_state() if getattr(m, "_merger", None) is not None else None,  # merged mode on
        }

    def publish(self) -> None:
        """Hand the snapshot to the writer if anything in it changed (cheap when nothing did)."""
        if not self.enabled:
            return
        with self._lock:
            try:
                signature = self.signature()
                if signature == self._signature:
                    return
                self._signature = signature
                self._pending = self.state()
            except Exception:  # noqa: BLE001 - metrics must never stop serving
                log.exception("loraplex: could not read adapter residency")
                self.enabled = False
                return
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="loraplex-residency", daemon=True)
                self._writer.start()
        self._wake.set()

    def _write_loop(self) -> None:
        last = None
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                state, self._pending = self._pending, None
            if state is not None and state != last:
                try:
                    tmp = f"{self.path}.tmp"
                    with open(tmp, "w") as f:
                        json.dump(state, f)
                    os.replace(tmp, self.path)
                    last = state
                except OSError:
                    log.exception("loraplex: could not write adapter residency to %s", self.path)
            time.sleep(self.WRITE_INTERVAL_S)  # coalesce bursts; a change meanwhile sets _wake again
