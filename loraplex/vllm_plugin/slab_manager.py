"""LoraplexLoRAModelManager: vLLM's LRU LoRA model manager whose GPU slots are filled from slabs.

vLLM's activate_adapter copies an adapter into a slot module by module on the compute stream: for a
Llama-3-8B adapter on every linear module, 448 host->device copies and 452 zero fills, queued behind
the running step. Here an adapter whose weights live in the worker's slab cache (slab_cache.py) is
activated with one copy of its slab on a side stream (slab_upload.py), ordered by events: only the
steps whose batch uses that slot wait for it, and the slot is overwritten only after the last step
that read it. vLLM's own CPU cache (max_cpu_loras) holds a "shell" of such an adapter (its id and the
weights of modules the slab does not cover, none for common models), never a second copy.

Adapters without a slab (vLLM's warm-up dummies, classification heads) keep vLLM's own path; the
uploader then forgets what it knew of that slot, so the next slab upload there zeroes it whole.

In merged mode (worker_merge.py) every upload appends the merged adapter's correction, a shell whose
entry has no slab (the base-model slot) gets the correction alone, and a switch refills every slot.
"""

from __future__ import annotations

from vllm.lora.model_manager import LRUCacheLoRAModelManager

from ..kernels.checks import capturing

SHELL = "_loraplex_key"  # attribute of a shell LoRAModel: the slab cache key of its weights


class LoraplexLoRAModelManager(LRUCacheLoRAModelManager):
    # set by LoraplexWorkerLoRAManager.create_lora_manager
    uploader = None  # SlabUploader
    lease_slab = None  # shell -> SlabEntry with its slab leased (loaded now if needed), or raises

    def _add_adapter(self, lora) -> None:
        if getattr(lora, SHELL, None) is not None and not lora.loras:
            self._registered_adapters[lora.id] = lora  # nothing for vLLM to pack: the slab holds it all
            return
        super()._add_adapter(lora)

    def activate_adapter(self, lora_id: int) -> bool:
        lora = self._registered_adapters.get(lora_id)
        key = getattr(lora, SHELL, None)
        if key is None or self.uploader is None:
            done = super().activate_adapter(lora_id)
            if done and self.uploader is not None:
                self.uploader.forget(self.lora_index_to_id.index(lora_id))
                self.slot_ranks.pop(lora_id, None)
            return done
        if lora_id in self._active_adapters:
            self._active_adapters.touch(lora_id)
            return False
        entry = self.lease_slab(lora)  # before any slot changes: a failure leaves vLLM's state as it was
        try:
            if len(self._active_adapters) >= self.lora_slots:
                self._active_adapters.remove_oldest()
            index = self.lora_index_to_id.index(None)
            self._active_adapters[lora_id] = None
            self.lora_index_to_id[index] = lora_id
            self.uploads.append((key, self.uploader.upload(entry.slab, index, wait_compute=self.between_steps)))
            self.slot_ranks[lora_id] = self._rank(entry)
            if self.uploader.uncovered:
                self._place_heads(lora, index)
                self.uploader.place_uncovered(lora, index)
        except BaseException:
            self.release_slab(key)
            raise
        self._active_adapters.touch(lora_id)
        return True

    def _rank(self, entry) -> int:
        """The rank of what an upload of `entry` leaves in its slot (the correction's ranks included)."""
        return self.uploader.slot_rank(None if entry.slab is None else entry.slab.layout)

    def _place_heads(self, lora, index: int) -> None:
        """Classification heads replaced per adapter (modules_to_save), as vLLM's activate_adapter
        places them; their LoRA weights, if any, go with the other uncovered modules."""
        from vllm.lora.layers import ClassificationHeadWithLoRA

        for name in self.uploader.uncovered:
            module = self.modules[name]
            if isinstance(module, ClassificationHeadWithLoRA):
                full = self._get_module_to_save_weights(lora, name)
                if full is None:
                    module.reset_module_to_save(index)
                else:
                    module.set_module_to_save(index, full.weight, full.bias)

    # ---- bookkeeping the worker manager drives ----------------------------------------------------
    uploads: list  # (key, UploadHandle) whose copies may still read the host slab
    slot_ranks: dict  # lora id -> the rank its slot holds (set by each slab upload)
    release_slab = None  # key -> None: unlease
    between_steps = True  # an upload outside a step waits for everything enqueued (its slot's last reader
    # may be the step in flight, recorded by no event yet)

    def reclaim(self) -> int:
        """Return the leases of finished uploads (their copies no longer read the host slab)."""
        left, done = [], 0
        for key, handle in self.uploads:
            if handle.query():
                self.release_slab(key)
                done += 1
            else:
                left.append((key, handle))
        self.uploads[:] = left
        return done

    def slots_of(self, lora_ids) -> list[int]:
        return [i for i, lora_id in enumerate(self.lora_index_to_id) if lora_id is not None and lora_id in lora_ids]

    step_slots: list  # the slots the last step read

    def step_begins(self) -> None:
        """Before a step's adapters are applied: the previous step (enqueued by now) is the last reader
        of the slots it used."""
        if self.uploader is not None and not capturing():
            self.uploader.steps_enqueued(self.step_slots)
        self.reclaim()

    def step_ready(self, lora_ids) -> None:
        """After a step's adapters are applied: its stream waits for the uploads of its own slots."""
        self.step_slots = self.slots_of(lora_ids)
        if self.uploader is not None and not capturing():
            self.uploader.make_ready(self.step_slots)

    def refill(self) -> list[int]:
        """Upload every occupied slot again, in place (merged mode switched: a slot holds its adapter
        minus the merged one). Slots filled by vLLM's own path cannot carry a correction: they are
        emptied. Returns the lora ids refilled."""
        done = []
        for index, lora_id in enumerate(self.lora_index_to_id):
            if lora_id is None:
                continue
            lora = self._registered_adapters.get(lora_id)
            key = getattr(lora, SHELL, None)
            if key is None or self.uploader is None:
                self.deactivate_adapter(lora_id)
                continue
            entry = self.lease_slab(lora)
            try:
                self.uploads.append((key, self.uploader.upload(entry.slab, index, wait_compute=True)))
                self.slot_ranks[lora_id] = self._rank(entry)
            except BaseException:
                self.release_slab(key)
                raise
            done.append(lora_id)
        return done

    def remove_all_adapters(self):
        super().remove_all_adapters()
        if self.uploader is not None:
            self.uploader.forget()
