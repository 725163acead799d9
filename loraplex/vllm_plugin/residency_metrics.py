"""Adapter residency on the API server's /metrics, for LoRA-affinity routers (llm-d's LoRA
residency scorer), under the names proposed upstream (vLLM #51433 / #54830 / #54833):

  vllm:lora_adapter_loaded{adapter_name, level="gpu"|"cpu", pinned, rank}  1 while resident (the series
                                                   is gone once evicted); level: in a GPU slot, or
                                                   in host memory (vLLM's CPU cache or loraplex's)
  vllm:num_gpu_loaded_lora_adapters / vllm:num_cpu_loaded_lora_adapters
  vllm:max_gpu_lora_adapters                        GPU slots (--max-loras)
  vllm:lora_adapter_load_seconds                    histogram: storage -> adapter ready in host memory
  loraplex_host_cache_{bytes,max_bytes,entries,pinned,loading}, loraplex_host_cache_{hits,misses,
  loads,evictions,failures}_total                   the host cache under vLLM's
  loraplex_queue_prefetches_total                   loads started for queued requests (engine_core.py)
  loraplex_versions_held                            adapter versions held by unfinished requests (ledger.py)
  loraplex_versions_in_one_step_max                 most versions of one adapter name seen in one step
  loraplex_requests_failed_total                    requests failed because their adapter version was lost
  loraplex_merged_adapter{adapter_name}             1 for the adapter merged into the base weights (merged mode)
  loraplex_merge_switches_total, loraplex_merge_pristine_bytes   merged mode's switches and pristine copies

A collector reads the snapshots the workers write (residency.py) at every scrape.
"""

from __future__ import annotations

import logging
import os

from .residency import ENV_STATE_DIR, newest_snapshot

log = logging.getLogger("loraplex.vllm_plugin")

_registered: set[int] = set()  # id() of the registries holding our collector


class ResidencyCollector:
    def __init__(self, directory: str):
        self.directory = directory

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        state = newest_snapshot(self.directory)
        if state is None:
            return
        loaded = GaugeMetricFamily("vllm:lora_adapter_loaded", "LoRA adapter resident in a cache tier (1 while "
                                   "loaded)", labels=["adapter_name", "level", "pinned", "rank"])
        counts = {"gpu": 0, "cpu": 0}
        for a in state.get("adapters", []):
            loaded.add_metric([a["name"], a["level"], str(bool(a["pinned"])).lower(), str(a.get("rank", 0))], 1)
            counts[a["level"]] = counts.get(a["level"], 0) + 1
        yield loaded
        yield GaugeMetricFamily("vllm:num_gpu_loaded_lora_adapters", "LoRA adapters in GPU slots",
                                value=counts["gpu"])
        yield GaugeMetricFamily("vllm:num_cpu_loaded_lora_adapters", "LoRA adapters in host memory only",
                                value=counts["cpu"])
        yield GaugeMetricFamily("vllm:max_gpu_lora_adapters", "GPU slots for LoRA adapters (--max-loras)",
                                value=state.get("max_gpu", 0))
        h = state.get("load_seconds")
        if h:
            cumulative, buckets = 0, []
            for bound, n in zip([*h["buckets"], float("inf")], h["counts"], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            yield HistogramMetricFamily("vllm:lora_adapter_load_seconds", "Time to load a LoRA adapter from "
                                        "storage into host memory", buckets=buckets, sum_value=h["sum"])
        host = state.get("host", {})
        for key, help_text in (("bytes", "Bytes of adapters in loraplex's host cache"),
                               ("max_bytes", "Byte budget of loraplex's host cache"),
                               ("entries", "Adapters in loraplex's host cache"),
                               ("pinned", "Adapters pinned in loraplex's host cache"),
                               ("loading", "Adapter loads in flight")):
            yield GaugeMetricFamily(f"loraplex_host_cache_{key}", help_text, value=host.get(key) or 0)
        for key in ("hits", "misses", "loads", "evictions", "failures"):
            yield CounterMetricFamily(f"loraplex_host_cache_{key}", f"Host cache {key}", value=host.get(key, 0))
        yield CounterMetricFamily("loraplex_queue_prefetches", "Adapter loads started for requests still waiting "
                                  "in the scheduler", value=host.get("queue_prefetches", 0))
        versions = state.get("versions", {})
        yield GaugeMetricFamily("loraplex_versions_held", "Adapter versions held by unfinished requests",
                                value=versions.get("held", 0))
        yield GaugeMetricFamily("loraplex_versions_in_one_step_max", "Most versions of one adapter name in one step",
                                value=versions.get("max_in_step", 0))
        yield CounterMetricFamily("loraplex_requests_failed", "Requests failed because the adapter version they "
                                  "started with could not be loaded", value=versions.get("failed_requests", 0))
        merge = state.get("merge")
        if merge:
            merged = GaugeMetricFamily("loraplex_merged_adapter", "The LoRA adapter merged into the base weights "
                                       "(merged mode; no series when none is)", labels=["adapter_name"])
            if merge.get("merged"):
                merged.add_metric([merge["merged"][0]], 1)
            yield merged
            yield CounterMetricFamily("loraplex_merge_switches", "Switches of the merged adapter (merges and "
                                      "unmerges)", value=merge.get("switches", 0))
            yield GaugeMetricFamily("loraplex_merge_pristine_bytes", "Host bytes of the base weights' pristine "
                                    "copies kept while an adapter is merged", value=merge.get("pristine_bytes", 0))


def register_collector(registry, directory: str | None = None) -> None:
    """Add the residency collector to a prometheus registry (once per registry)."""
    directory = directory or os.environ.get(ENV_STATE_DIR, "").strip()
    if not directory or id(registry) in _registered:
        return
    registry.register(ResidencyCollector(directory))
    _registered.add(id(registry))
