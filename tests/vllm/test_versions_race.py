"""The race that used to stop the engine: a queued request's adapter version pushed out of every cache
by other adapters, then replaced on storage before the request runs. One GPU slot, one adapter in
vLLM's CPU cache, one in the host cache, one running request: the queued request still runs on the
version it was resolved to, and the engine and every other request go on."""

from __future__ import annotations

import pytest

from .conftest import in_process_engine
from .test_versions import Stepper, publish, ref, tokens

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = [1, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_source, tmp_path_factory):
    yield from in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, "race",
                                 env={"LORAPLEX_HOST_CACHE_ENTRIES": "1"}, max_loras=1, max_cpu_loras=1,
                                 max_num_seqs=1, max_model_len=128, max_num_batched_tokens=256)


def test_queued_request_keeps_a_version_evicted_and_replaced_meanwhile(engine, tmp_path):
    from loraplex.vllm_plugin import lora_request

    run = Stepper(engine, track_batches=False)
    running = run.add("alpha-r4", PROMPT, n=16)
    run.step(2)
    publish(engine, engine.catalog / "beta-r8", "x", tmp_path)
    queued = []
    for name in ("x", "gamma-r16"):  # as the API server does: resolve, add_lora, then the request
        req = lora_request(name)
        run.llm_engine.add_lora(req)
        queued.append(run.add(req, PROMPT))
    publish(engine, engine.catalog / "gamma-r16", "x", tmp_path)  # x's resolved version is gone from storage
    outs = run.run(running, *queued)
    assert tokens(outs[0]) == ref(engine, "alpha-r4", PROMPT, 16)
    assert tokens(outs[1]) == ref(engine, "beta-r8", PROMPT), "x was not served by the version it was resolved to"
    assert tokens(outs[2]) == ref(engine, "gamma-r16", PROMPT)
    # alive, and new requests for x get its new version
    assert tokens(run.run(run.add("x", PROMPT))[0]) == ref(engine, "gamma-r16", PROMPT)
