"""StepGate: orders merge switches with the steps that read the base weights.

A plan is *active* from the start of Runtime.plan until Runtime.release (the step that read it has
been issued). A switch of the merged adapter rewrites base weights and GPU slots, so it runs only with
no plan active: close() stops new plans and waits for the active ones (an explicit Runtime.merge),
try_close() takes the gate only if nothing is active right now (the automatic switches, which never
wait). Plans that start while the gate is closed wait until it opens. No step therefore sees
half-merged weights, nor a slot packed for another merged adapter than the weights it runs on.

A plan built inside another plan's construction on the same thread (a catalog refresh that re-pins an
adapter) does not wait: its outer plan is already counted active, so no switch can be running.
"""

from __future__ import annotations

import contextlib
import threading

from ..errors import CapacityError


class StepGate:
    def __init__(self):
        self._cond = threading.Condition()
        self.active = 0
        self._closed = False
        self._tls = threading.local()

    def enter(self, timeout: float) -> None:
        """A plan starts: wait while a switch runs (up to `timeout`), then count it active."""
        with self._cond:
            if not self.building_here() and not self._cond.wait_for(lambda: not self._closed, timeout):
                raise CapacityError(f"a switch of the merged LoRA adapter did not finish within {timeout:.1f}s")
            self.active += 1

    def exit(self) -> None:
        with self._cond:
            if self.active <= 0:
                raise RuntimeError("step gate: a plan was released more often than taken")
            self.active -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def building(self):
        """Mark this thread as building a plan (already counted active)."""
        self._tls.depth = getattr(self._tls, "depth", 0) + 1
        try:
            yield
        finally:
            self._tls.depth -= 1

    def building_here(self) -> bool:
        return getattr(self._tls, "depth", 0) > 0

    def close(self, timeout: float) -> bool:
        """Stop new plans and wait until none is active. False (the gate is open again) on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._closed, timeout):
                return False
            self._closed = True
            if self._cond.wait_for(lambda: self.active == 0, timeout):
                return True
            self._closed = False
            self._cond.notify_all()
            return False

    def try_close(self) -> bool:
        """Close only if no plan is active at this instant (never waits)."""
        with self._cond:
            if self._closed or self.active or self.building_here():
                return False
            self._closed = True
            return True

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()


__all__ = ["StepGate"]
