"""Merged mode's automatic policy through vllm.LLM in this process (LORAPLEX_MERGE_AUTO): the engine core
merges the adapter with the largest share of the scheduled tokens once it passes the threshold over a
window of steps, and unmerges when its share falls; every request, in flight across both switches,
equals transformers + PEFT (fp32)."""

from __future__ import annotations

import pytest

from .conftest import in_process_engine
from .test_versions import LONG, SHORT, Stepper, ref, tokens

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_source, tmp_path_factory):
    yield from in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, "merge-policy",
                                 env={"LORAPLEX_MERGE_AUTO": "window=4,threshold=0.6,hysteresis=0.1"},
                                 max_lora_rank=32, max_loras=3, max_cpu_loras=4)


def test_policy_merges_the_dominant_adapter_then_unmerges_it(engine):
    from loraplex.vllm_plugin.engine_merge import merge_state

    run = Stepper(engine)
    assert merge_state(engine.llm)["merged"] is None
    # gamma dominates: merged after a window of steps, while its requests and a base one are running
    expected = {run.add("gamma-r16", p, n=16): ("gamma-r16", p, 16) for p in (SHORT, LONG, [1, 5, 6])}
    expected[run.add(None, SHORT, n=16)] = (None, SHORT, 16)
    for _ in range(12):
        run.step()
        if merge_state(engine.llm)["merged"] is not None:
            break
    state = merge_state(engine.llm)
    assert state["merged"] and state["merged"][0] == "gamma-r16", state
    assert run.engine_manager("merge_state")["merged"][0] == "gamma-r16"
    # then base traffic only: gamma's share falls under threshold - hysteresis and it is unmerged
    later = {run.add(None, p, n=24): (None, p, 24) for p in (LONG, [1, 5, 6], SHORT)}
    outs = run.run(*expected, *later)
    for _ in range(10):
        if merge_state(engine.llm)["merged"] is None:
            break
        run.add(None, SHORT, n=2)
        run.step(2)
    state = merge_state(engine.llm)
    assert state["merged"] is None and state["switches"] == 2, state
    for out, (src, prompt, n) in zip(outs, [*expected.values(), *later.values()], strict=True):
        assert tokens(out) == ref(engine, src, prompt, n), src
