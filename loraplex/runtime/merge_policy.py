"""MergePolicy: which adapter to merge, from the traffic of the last steps (RuntimeConfig.merge_auto).

Time is counted in steps (plans), not seconds, so the policy is deterministic and testable without a
clock. Shares are of tokens: a long prefill weighs what it costs. Base-model tokens count in the total
but are never merged. Rules, with `current` the adapter merged now (or being switched to):

  keep current   while its share >= threshold - hysteresis
  else merge     the leader (largest share; ties by name) if its share >= threshold
  else           nothing (unmerge)

Decisions are taken only once `window_steps` steps were seen since the last switch, so the window
describes the traffic under the current choice and a switch cannot follow a switch within a window.
Keeping running totals makes a step cost O(requests in it); a decision costs O(adapters in the window).
"""

from __future__ import annotations

import threading
from collections import Counter, deque

from ..config import AutoMerge


class MergePolicy:
    def __init__(self, config: AutoMerge):
        self.config = config
        self._lock = threading.Lock()  # plans of several threads report here
        self._steps: deque = deque()
        self._totals: Counter = Counter()  # name (None: base model) -> tokens in the window
        self._all = 0
        self._since = 0  # steps since the last switch

    def observe(self, names, tokens=None) -> None:
        """One step: request i used adapter names[i] (None: base) over tokens[i] tokens (default 1)."""
        c: Counter = Counter()
        for i, n in enumerate(names):
            c[n] += 1 if tokens is None else int(tokens[i])
        with self._lock:
            self._steps.append(c)
            self._totals.update(c)
            self._all += sum(c.values())
            if len(self._steps) > self.config.window_steps:
                old = self._steps.popleft()
                self._totals.subtract(old)
                self._all -= sum(old.values())
                for n in [n for n in old if self._totals[n] <= 0]:
                    del self._totals[n]
            self._since += 1

    def share(self, name) -> float:
        with self._lock:
            return self._totals.get(name, 0) / self._all if self._all else 0.0

    def decide(self, current: str | None) -> str | None:
        """The adapter that should be merged (None: none); `current` until a full window was seen."""
        cfg = self.config
        with self._lock:
            if self._since < cfg.window_steps or not self._all:
                return current
            if current is not None and self._totals.get(current, 0) / self._all >= cfg.threshold - cfg.hysteresis:
                return current
            names = [n for n in self._totals if n is not None]
            if not names:
                return None
            leader = max(names, key=lambda n: (self._totals[n], n))
            return leader if self._totals[leader] / self._all >= cfg.threshold else None

    def switched(self) -> None:
        """A switch was asked for: the next decision waits for a full window of the new regime."""
        with self._lock:
            self._since = 0


__all__ = ["MergePolicy"]
