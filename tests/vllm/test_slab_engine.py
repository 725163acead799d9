"""One runtime under vLLM: the worker's host tier is the runtime's slab arena and a miss reaches its GPU
slot in one copy of its slab. Through vllm.LLM in this process with two slots, two shells in vLLM's CPU
cache and a host budget of about two adapters, so steps miss in every tier; tokens are checked against
transformers + PEFT (fp32), and the copies out of host memory are counted on the tensors themselves."""

from __future__ import annotations

import pytest

from .conftest import PROMPTS, in_process_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HOST_BYTES = 128 << 10  # the arena: the three test adapters (31, 34 and 90 KiB) do not fit at once


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_source, tmp_path_factory):
    yield from in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, "slabs",
                                 env={"LORAPLEX_HOST_CACHE_BYTES": str(HOST_BYTES)}, max_loras=2, max_cpu_loras=2,
                                 max_num_seqs=2)


def _manager(engine, method, *args):
    from loraplex.vllm_plugin.worker_manager import call_worker_manager

    (result,) = call_worker_manager(engine.llm, method, *args)
    return result


def _generate(engine, names, prompts):
    from vllm import SamplingParams

    from loraplex.vllm_plugin import lora_request

    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    reqs = [None if n is None else lora_request(n) for n in names]
    outs = engine.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, lora_request=reqs,
                               use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


class HostCopies:
    """Counts the copies whose source lies in the worker's host arena (the only host memory slabs live
    in): on CUDA the host-to-device transfers, on CPU the same calls of the same code path."""

    def __init__(self, arena):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        buf = arena.buffer
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
        copies = self.copies = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.copy_.default:
                    dst, src = args[0], args[1]
                    if lo <= src.data_ptr() < hi and not lo <= dst.data_ptr() < hi:
                        copies.append(src.numel() * src.element_size())
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _worker(engine):
    from loraplex.vllm_plugin.worker_manager import LoraplexWorkerLoRAManager

    runner = engine.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    assert isinstance(runner.lora_manager, LoraplexWorkerLoRAManager)
    return runner.lora_manager


def test_a_miss_is_one_copy_of_the_slab(engine, reference, capsys):
    worker = _worker(engine)
    names = ("alpha-r4", "beta-r8", "gamma-r16")
    stock = {}
    for name in names:  # every adapter cold in every tier: evict all, then one request each
        _manager(engine, "set_cache_policy", 1)
        _manager(engine, "set_cache_policy", HOST_BYTES)
        for lora_id in list(worker._adapter_manager.list_adapters()):
            worker.remove_adapter(lora_id)
        with HostCopies(worker._host.arena) as seen:
            assert _generate(engine, [name], [PROMPTS[0]]) == [reference(engine.catalog / name, PROMPTS[0])]
        (entry,) = [e for k, e in worker._host.items() if k[0] == name]
        layout = entry.slab.layout
        assert seen.copies == [layout.nbytes], f"{name}: {seen.copies} copies out of host memory, want one"
        # vLLM's own set_lora: one host->device copy per piece (A and B per slice per module), plus zero
        # fills (counted op by op in test_slab_upload.py)
        stock[name] = (len(layout.pieces), layout.rank, layout.nbytes)
    with capsys.disabled():
        for name, (copies, rank, nbytes) in stock.items():
            print(f"\n{name}: 1 copy of {nbytes} bytes at rank {rank}; stock vLLM's set_lora: {copies} copies")


def test_host_budget_counts_what_is_allocated(engine):
    worker = _worker(engine)
    for names in (["alpha-r4", "beta-r8"], ["gamma-r16", None], ["beta-r8", "gamma-r16"], ["alpha-r4", None]):
        _generate(engine, names, PROMPTS[:2])
    stats = worker._host.stats()
    assert stats["arena_bytes"] <= HOST_BYTES  # the one allocation the host tier makes
    assert stats["peak_bytes"] <= stats["arena_bytes"], stats
    assert stats["evictions"] > 0, "the budget never made the cache evict: the test proves nothing"
    # vLLM's CPU cache holds shells: no LoRA weights of the covered modules
    for lora in worker._adapter_manager.list_adapters().values():
        assert not lora.loras, "vLLM's CPU cache holds a second copy of an adapter's weights"


def test_mixed_batches_with_a_miss_every_step(engine, reference):
    """Two slots, three adapters and the base model: every call brings an adapter the slots do not hold."""
    rotation = [["alpha-r4", "beta-r8", None], ["gamma-r16", "alpha-r4", None], ["beta-r8", "gamma-r16", None],
                ["alpha-r4", None, "gamma-r16"], ["beta-r8", "alpha-r4", "beta-r8"]]
    for names in rotation:
        got = _generate(engine, names, PROMPTS[:3])
        want = [reference(None if n is None else engine.catalog / n, p)
                for n, p in zip(names, PROMPTS[:3], strict=True)]
        assert got == want, names


def test_queued_adapter_is_uploaded_before_its_request_runs(engine, reference):
    """Two sequences busy with one adapter, a third request queued for another whose slab is in host
    memory: it reaches the free GPU slot while its request still waits."""
    from loraplex.vllm_plugin import lora_request

    from .test_versions import Stepper, tokens

    run = Stepper(engine, track_batches=False)
    _manager(engine, "prefetch_adapter", "gamma-r16")
    busy = [run.add("alpha-r4", PROMPTS[0], n=24) for _ in range(2)]
    run.step(2)
    gamma = lora_request("gamma-r16").lora_int_id
    worker = _worker(engine)
    for lora_id in list(worker._adapter_manager.list_adapters()):  # room in vLLM's CPU cache and a free slot
        if lora_id != lora_request("alpha-r4").lora_int_id:
            worker.remove_adapter(lora_id)
    queued = run.add("gamma-r16", PROMPTS[1], n=6)
    scheduler = run.llm_engine.engine_core.engine_core.scheduler
    assert len(scheduler.waiting) == 1, "the request must still be waiting for the test to show anything"
    assert gamma in _manager(engine, "cache_sizes")["gpu_ids"]
    outs = run.run(*busy, queued)
    assert tokens(outs[2]) == reference(engine.catalog / "gamma-r16", PROMPTS[1])
