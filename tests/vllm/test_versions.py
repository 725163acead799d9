"""One adapter version per request, from its first token to its last, through vLLM's engine (in this
process, stepped by hand so every event lands mid-generation): a republish, two republishes, a delete
and a forced preemption during a request; a version lost before any worker read it fails only its own
request. Greedy tokens are checked against transformers + PEFT (fp32)."""

from __future__ import annotations

import os
import shutil

import pytest

from .conftest import hf_greedy, in_process_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 32
LONG = [1] + [(5 * i + 9) % 250 + 4 for i in range(70)]  # two full KV blocks
SHORT = [1, 17, 42, 99, 7]
GEN = 10


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_source, tmp_path_factory):
    yield from in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, "versions", max_loras=3,
                                 max_cpu_loras=3, max_model_len=160, max_num_batched_tokens=512,
                                 enable_prefix_caching=True, block_size=BLOCK)


class Stepper:
    """Requests added to vLLM's engine one by one and stepped by hand; final outputs by request id."""

    def __init__(self, engine, track_batches=True):
        self.engine = engine
        self.track_batches = track_batches
        self.llm_engine = engine.llm.llm_engine
        self.done: dict[str, object] = {}
        self.batches: list[set[int]] = []  # lora ids of each step's batch
        self._n = 0

    def add(self, name_or_request, prompt, n=GEN) -> str:
        from vllm import SamplingParams

        from loraplex.vllm_plugin import lora_request

        req = lora_request(name_or_request) if isinstance(name_or_request, str) else name_or_request
        self._n += 1
        rid = f"r{self._n}"
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        self.llm_engine.add_request(rid, {"prompt_token_ids": list(prompt)}, sp, lora_request=req)
        return rid

    def step(self, times=1) -> None:
        for _ in range(times):
            for out in self.llm_engine.step():
                if out.finished:
                    self.done[out.request_id] = out
            if self.track_batches:
                self.batches.append(set(self.engine_manager("last_step_adapters")))

    def run(self, *rids, limit=200) -> list:
        for _ in range(limit):
            if all(r in self.done for r in rids):
                return [self.done[r] for r in rids]
            self.step()
        raise AssertionError(f"requests {rids} did not finish in {limit} steps")

    def engine_manager(self, method, *args):
        from loraplex.vllm_plugin.worker_manager import call_worker_manager

        (result,) = call_worker_manager(self.engine.llm, method, *args)
        return result


def tokens(out) -> list[int]:
    return list(out.outputs[0].token_ids)


def publish(engine, src, name, tmp):
    """Replace catalog adapter `name` by a copy of `src` with renames, as sync tools publish."""
    staged = tmp / f"staged-{name}-{len(os.listdir(tmp))}"
    shutil.copytree(src, staged)
    if (engine.catalog / name).exists():
        os.rename(engine.catalog / name, tmp / f"old-{name}-{len(os.listdir(tmp))}")
    os.rename(staged, engine.catalog / name)


def ref(engine, src, prompt, n=GEN):
    return hf_greedy(engine.model, None if src is None else engine.catalog / src, prompt, n)


def test_republish_mid_request_serves_each_request_one_version(engine, tmp_path):
    run = Stepper(engine)
    publish(engine, engine.catalog / "alpha-r4", "live", tmp_path)
    v1, v2 = ref(engine, "alpha-r4", LONG), ref(engine, "gamma-r16", LONG)
    assert v1 != v2, "the versions must differ on this prompt, or the test proves nothing"
    old = run.add("live", LONG)
    run.step(3)  # prefill and two decode steps on the old version
    publish(engine, engine.catalog / "gamma-r16", "live", tmp_path)
    new = run.add("live", LONG)
    assert run.engine_manager("cache_sizes")["held_versions"] == 2
    first, second = run.run(old, new)
    assert tokens(first) == v1, "the request in flight switched versions"
    assert tokens(second) == v2
    both = [b for b in run.batches if len(b) == 2]
    assert both, f"the two versions never ran in one batch: {run.batches}"
    # the old version is let go with its last request (the workers learn of finished requests with the
    # next step): no unfinished request holds anything now
    run.step()
    sizes = run.engine_manager("cache_sizes")
    assert sizes["unfinished_requests"] == 0 and sizes["held_versions"] == 0
    # KV of the new version is reused, the old one's is never served for it
    out = run.run(run.add("live", LONG))[0]
    assert tokens(out) == v2 and out.num_cached_tokens >= 2 * BLOCK


def test_two_republishes_during_one_request(engine, tmp_path):
    run = Stepper(engine)
    sources = ["beta-r8", "alpha-r4", "gamma-r16"]
    publish(engine, engine.catalog / sources[0], "twice", tmp_path)
    rids = [run.add("twice", SHORT, n=14)]
    for src in sources[1:]:
        run.step(3)
        publish(engine, engine.catalog / src, "twice", tmp_path)
        rids.append(run.add("twice", SHORT, n=14))
    outs = run.run(*rids)
    for out, src in zip(outs, sources, strict=True):
        assert tokens(out) == ref(engine, src, SHORT, 14), src
    assert max(len(b) for b in run.batches) == 3  # three versions of one name in one batch


def test_delete_during_request_finishes_it_and_refuses_new_ones(engine, tmp_path):
    from loraplex.errors import AdapterNotFound
    from loraplex.vllm_plugin import lora_request

    run = Stepper(engine)
    publish(engine, engine.catalog / "gamma-r16", "doomed", tmp_path)
    rid = run.add("doomed", SHORT)
    run.step(2)
    shutil.rmtree(engine.catalog / "doomed")
    run.engine_manager("refresh_storage_catalog")
    run.engine_manager("set_cache_policy", None, 1)  # the smallest host cache: only held versions stay
    (out,) = run.run(rid)
    assert tokens(out) == ref(engine, "gamma-r16", SHORT)
    with pytest.raises(AdapterNotFound):
        lora_request("doomed")
    run.engine_manager("set_cache_policy", None, 64)


def test_version_lost_before_any_read_fails_only_its_request(engine, tmp_path):
    """A request resolved to a version that storage replaced before any worker read it: that request
    finishes as an error naming the adapter; the others in its batch are exact, its KV is never reused,
    and the engine keeps serving."""
    from loraplex.vllm_plugin import lora_request

    run = Stepper(engine)
    publish(engine, engine.catalog / "alpha-r4", "lost", tmp_path)
    stale = lora_request("lost")  # resolved (and checked) here; no worker has read it
    publish(engine, engine.catalog / "beta-r8", "lost", tmp_path)
    failed_before = run.engine_manager("cache_sizes")["failed_requests"]
    others = {run.add(None, SHORT): None, run.add("gamma-r16", LONG): "gamma-r16"}
    doomed = run.add(stale, LONG)
    outs = run.run(doomed, *others)
    assert outs[0].outputs[0].finish_reason == "error" and tokens(outs[0]) == []
    for out, src in zip(outs[1:], others.values(), strict=True):
        assert tokens(out) == ref(engine, src, SHORT if src is None else LONG), src
    assert run.engine_manager("cache_sizes")["failed_requests"] == failed_before + 1
    # the engine is alive, and the adapter's current version is served (no KV of the failed one)
    out = run.run(run.add("lost", LONG))[0]
    assert tokens(out) == ref(engine, "beta-r8", LONG) and out.num_cached_tokens == 0


def test_preempted_request_resumes_on_its_version(engine, tmp_path):
    """Preempted mid-generation (KV freed), its adapter republished and its host copy under pressure:
    the recomputation runs on the version the request started with."""
    import time

    run = Stepper(engine)
    publish(engine, engine.catalog / "gamma-r16", "preempted", tmp_path)
    rid = run.add("preempted", LONG, n=12)
    run.step(4)
    scheduler = run.llm_engine.engine_core.engine_core.scheduler
    (request,) = [r for i, r in scheduler.requests.items() if i.startswith(f"{rid}-")]  # vLLM adds a suffix
    scheduler.running.remove(request)
    scheduler._preempt_request(request, time.monotonic())
    publish(engine, engine.catalog / "alpha-r4", "preempted", tmp_path)
    run.engine_manager("refresh_storage_catalog")
    run.engine_manager("set_cache_policy", None, 1)
    for name in ("beta-r8", "alpha-r4"):  # other adapters through the one-entry host cache
        run.engine_manager("prefetch_adapter", name)
    (out,) = run.run(rid)
    assert tokens(out) == ref(engine, "gamma-r16", LONG, 12)
    assert request.num_preemptions == 1
    run.engine_manager("set_cache_policy", None, 64)
