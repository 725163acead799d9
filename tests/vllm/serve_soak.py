"""Churn soak through `loraplex serve`: concurrent clients over many adapters while adapters are
republished faster than once a second, under cache pressure. Every answer must equal exactly one
version's transformers + PEFT reference: the version current when the request was sent, or one
published while it was in flight (a request is bound to a version when the server resolves it); an
answer to a request sent after a publish settled is never the old version. No errors; the engine
alive at the end."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field

from .server import complete, http

SOURCES = ("alpha-r4", "beta-r8", "gamma-r16")
PROMPTS = ([1, 17, 42, 99, 7], [1, 50, 60, 70])
GEN = 8


@dataclass
class SoakResult:
    requests: int = 0
    republishes: int = 0
    errors: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.requests} requests served, {self.republishes} republishes survived, "
                f"{len(self.errors)} errors, {len(self.mismatches)} mismatches")


class ServeSoak:
    def __init__(self, server, reference, staging, n_adapters=6, clients=4, publish_every_s=0.4, seed=0):
        """staging: a directory on the catalog's filesystem (for the symlink swaps)."""
        self.server = server
        self.reference = reference  # reference(src or None, prompt, n) -> tokens
        self.staging = staging
        self.names = [f"churn-{i}" for i in range(n_adapters)]
        self.clients = clients
        self.publish_every_s = publish_every_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.history: dict[str, list[tuple[float, float, str]]] = {}  # name -> (start, end, source) of publishes
        self.result = SoakResult()
        self._n = 0

    def _publish(self, name, src) -> None:
        """Atomically, the way Kubernetes volumes and deploy tools publish: the new version's directory
        is written beside the old one and a symlink is swapped to it (the old files stay in place)."""
        with self.lock:
            self._n += 1
            n = self._n
        versions = self.server.catalog / ".versions"  # hidden: not an adapter of the catalog
        versions.mkdir(exist_ok=True)
        shutil.copytree(self.server.catalog / src, versions / f"{name}-{n}")
        link = self.staging / f"link-{n}"
        os.symlink(f".versions/{name}-{n}", link)
        start = time.monotonic()
        os.replace(link, self.server.catalog / name)
        with self.lock:
            self.history.setdefault(name, []).append((start, time.monotonic(), src))

    def _sources_between(self, name, sent, received) -> set[str]:
        """Sources a request for `name` sent at `sent` and answered at `received` may have been served by."""
        with self.lock:
            events = list(self.history[name])
        ok = set()
        for start, end, src in events:
            if end <= sent:
                ok = {src}  # the newest publish that settled before the request
            elif start < received:
                ok.add(src)  # published while in flight
        return ok

    def _client(self, deadline, seed) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            name = rng.choice([*self.names, None])
            prompt = rng.choice(PROMPTS)
            sent = time.monotonic()
            status, got = complete(self.server, name or self.server.model, prompt, GEN)
            received = time.monotonic()
            with self.lock:
                self.result.requests += 1
            if status != 200:
                with self.lock:
                    self.result.errors.append((name, status, got))
                continue
            allowed = {None} if name is None else self._sources_between(name, sent, received)
            if not any(got == self.reference(src, prompt, GEN) for src in allowed):
                with self.lock:
                    self.result.mismatches.append((name, sorted(map(str, allowed)), got))

    def run(self, seconds: float) -> SoakResult:
        for i, name in enumerate(self.names):
            self._publish(name, SOURCES[i % len(SOURCES)])
        for src in SOURCES:  # the references, before the clock starts
            for prompt in PROMPTS:
                self.reference(src, prompt, GEN)
        for prompt in PROMPTS:
            self.reference(None, prompt, GEN)
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(deadline, i), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        hot = self.names[0]
        while time.monotonic() < deadline:
            time.sleep(self.publish_every_s)
            name = hot if self.rng.random() < 0.6 else self.rng.choice(self.names)  # one adapter churns hardest
            current = self.history[name][-1][2]
            self._publish(name, self.rng.choice([s for s in SOURCES if s != current]))
            self.result.republishes += 1
        for t in threads:
            t.join(timeout=300)
        assert http(self.server.url + "/health")[0] == 200, "the engine died"
        return self.result
