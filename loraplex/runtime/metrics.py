"""prometheus_client collectors for the runtime's two cache tiers, loads and uploads.

Every Runtime registers into its own CollectorRegistry unless given one, so several runtimes (tests,
one process serving two models) never collide; pass prometheus_client.REGISTRY to join the global one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# storage reads take ms to s, packs and uploads us to ms: one bucket set covers the three phases
_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIERS = ("host", "gpu")
PHASES = ("read", "pack", "upload")


class RuntimeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "loraplex"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, namespace
        self.hits = Counter("cache_hits", "Adapter lookups served by the tier", ["tier"], namespace=ns, registry=r)
        self.misses = Counter("cache_misses", "Adapter lookups the tier could not serve", ["tier"],
                              namespace=ns, registry=r)
        self.evictions = Counter("cache_evictions", "Adapters evicted from the tier", ["tier"],
                                 namespace=ns, registry=r)
        self.load_seconds = Histogram("load_seconds", "Time to make an adapter usable, by phase", ["phase"],
                                      namespace=ns, registry=r, buckets=_BUCKETS)
        self.load_failures = Counter("load_failures", "Adapter loads that failed", namespace=ns, registry=r)
        self.uploaded_bytes = Counter("upload_bytes", "Bytes copied host -> device for adapters",
                                      namespace=ns, registry=r)
        self.host_bytes = Gauge("host_cache_bytes", "Bytes of slabs held in the host cache", namespace=ns,
                                registry=r)
        self.slots_occupied = Gauge("gpu_slots_occupied", "GPU slots holding an adapter", namespace=ns, registry=r)
        self.slots_total = Gauge("gpu_slots", "GPU slots (max_loras)", namespace=ns, registry=r)
        self.pinned = Gauge("pinned_adapters", "Adapters pinned in both tiers", namespace=ns, registry=r)
        self.loads_in_flight = Gauge("loads_in_flight", "Adapter loads running or queued", namespace=ns,
                                     registry=r)
        for t in TIERS:  # export zeros from the start so dashboards see every series
            self.hits.labels(t)
            self.misses.labels(t)
            self.evictions.labels(t)
        for p in PHASES:
            self.load_seconds.labels(p)

    def hit(self, tier: str, n: int = 1) -> None:
        self.hits.labels(tier).inc(n)

    def miss(self, tier: str, n: int = 1) -> None:
        self.misses.labels(tier).inc(n)

    def evicted(self, tier: str, n: int = 1) -> None:
        self.evictions.labels(tier).inc(n)

    def phase(self, phase: str, seconds: float) -> None:
        self.load_seconds.labels(phase).observe(seconds)

    def value(self, name: str, **labels) -> float:
        """A sample's current value (tests, stats): e.g. value("loraplex_cache_hits_total", tier="gpu")."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None):
    """Serve /metrics of `registry` (a Runtime's: runtime.metrics.registry) over HTTP on `port`.
    Returns prometheus_client's (server, thread); call server.shutdown() to stop it."""
    kwargs = {} if registry is None else {"registry": registry}
    return start_http_server(port, addr, **kwargs)


__all__ = ["RuntimeMetrics", "start_metrics_server"]
