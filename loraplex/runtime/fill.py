"""Slots for a plan's adapters: take them from the pool, load what the host cache lacks, upload what
the slots lack. Mixed into Runtime (uses its catalog, pool, loader, uploader, host, steps, metrics).

On any error nothing stays held: the pool gets every slot back, failed fills are marked failed (so
other plans waiting on them see the error) and host-cache leases taken for uploads are returned.
"""

from __future__ import annotations

from concurrent.futures import CancelledError, as_completed
from concurrent.futures import TimeoutError as FutureTimeout

from ..errors import AdapterChanged, StorageError
from .merged import correction_ranks


class FillMixin:
    def _acquire(self, entries, timeout: float, slot_timeout: float, base_key=None) -> dict:
        """Slots for every entry (and, merged mode, for base_key: the base-model requests' correction),
        filled; on any error nothing stays held and the first error is raised."""
        self._reclaim()
        entries = {e.key: e for e in entries}
        keys = list(entries) if base_key is None else [*entries, base_key]
        slots, fills, waits = self.pool.acquire(keys, timeout=slot_timeout, reclaim=self._reclaim)
        try:
            errors = self._fill(fills, entries, timeout)
            for f in waits:
                if not f.done.wait(timeout):
                    errors.append(StorageError(f.key[0], f"another step's load did not finish within {timeout:.0f}s"))
                elif f.error is not None:
                    errors.append(f.error)
            if errors:
                raise errors[0]
        except BaseException:
            self.pool.release(slots.values())
            raise
        return slots

    def _fill(self, fills, entries: dict, timeout: float) -> list:
        """Load (or take from the host cache) and upload every adapter this plan must write."""
        if not fills:  # every adapter was resident: the common case of a step, skip as_completed's waiters
            return []
        errors, futs = [], {}
        for f in fills:
            if f.key[0] is None:  # merged mode's base-model slot: the merged adapter's correction alone
                self._upload(f, None, errors)
                continue
            try:
                futs[self.loader.acquire(entries[f.key], claim=True)] = f
            except BaseException as e:  # noqa: BLE001
                self.pool.finish_fill(f, error=e)
                errors.append(e)
        try:
            for fut in as_completed(futs, timeout=timeout):
                f = futs[fut]
                try:
                    slab = fut.result()
                except CancelledError:  # a refresh cancelled the queued load of this version
                    e = AdapterChanged(f.key[0], f.key[1], self._current_version(f.key[0]))
                    self.pool.finish_fill(f, error=e)
                    errors.append(e)
                    continue
                except BaseException as e:  # noqa: BLE001 - the catalog's error, for every waiter
                    self.pool.finish_fill(f, error=e)
                    errors.append(e)
                    continue
                self._upload(f, slab, errors)
        except FutureTimeout:
            for fut, f in futs.items():
                if not f.done.is_set():
                    e = StorageError(f.key[0], f"load did not finish within {timeout:.0f}s")
                    self.pool.finish_fill(f, error=e)
                    errors.append(e)
                    fut.add_done_callback(self._drop_late_lease)
        return errors

    def _drop_late_lease(self, fut) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.host.unlease(fut.result().key)

    def _upload(self, fill, slab, errors: list) -> None:
        """slab: the adapter's (host-leased) slab; None for merged mode's base-model slot. Merged mode
        packs the merged adapter's negated slab after it (merged.py); the state cannot change while a
        plan is being filled (the step gate)."""
        handle = None
        merge = self._merge
        minus = None if merge is None else merge.minus
        try:
            for s in (slab, minus):
                if s is not None and s.layout.generation != self._generation:
                    raise RuntimeError(f"LoRA adapter '{s.key[0]}' was packed for other targets")
            ranks = correction_ranks(slab, minus, self.targets, self.config.max_rank)
            handle = self.uploader.upload(slab, fill.slot, self.pool.slots[fill.slot].ranks, minus, ranks)
            self.pool.finish_fill(fill, upload=handle if handle.done is not None else None,
                                  slice_ranks=ranks, rank=max((max(r, default=0) for r in ranks), default=0))
            self.metrics.uploaded_bytes.inc(handle.nbytes)
            if handle.done is None:
                self.metrics.phase("upload", handle.seconds)
        except BaseException as e:  # noqa: BLE001
            self.pool.finish_fill(fill, error=e)
            errors.append(e)
        finally:
            if slab is None:
                pass  # the negated slab is the runtime's own, outside the host cache: no lease
            elif handle is not None and handle.done is not None:
                self.steps.upload_issued(handle, slab.key)
            else:
                self.host.unlease(slab.key)


__all__ = ["FillMixin"]
