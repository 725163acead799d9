"""The adapter runtime: slabs, host cache, GPU slot pool, uploads and per-step plans."""

from .metrics import RuntimeMetrics, start_metrics_server
from .plan import BatchPlan, PlanBuffers
from .policy import EvictionPolicy, LFUPolicy, LRUPolicy
from .runtime import Runtime, RuntimePlan
from .targets import LoraTarget, SliceSpec

__all__ = ["BatchPlan", "EvictionPolicy", "LFUPolicy", "LRUPolicy", "LoraTarget", "PlanBuffers", "Runtime",
           "RuntimeMetrics", "RuntimePlan", "SliceSpec", "start_metrics_server"]
