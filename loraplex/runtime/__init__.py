"""The adapter runtime: slabs, host cache, GPU slot pool, uploads and per-step plans."""

from .plan import BatchPlan, PlanBuffers
from .targets import LoraTarget, SliceSpec

__all__ = ["BatchPlan", "LoraTarget", "PlanBuffers", "SliceSpec"]
