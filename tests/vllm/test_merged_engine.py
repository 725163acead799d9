"""Merged mode through vllm.LLM in this process, stepped by hand: one adapter merged into the base weights
(LORAPLEX_MERGE at startup, then explicit switches between steps), mixed batches of the merged adapter,
other adapters and the base model; greedy tokens equal transformers + PEFT (fp32) for every request,
including those in flight across two switches, a republish of the merged adapter and prefix-cache hits
across switches; a batch of only the merged adapter runs no LoRA op and dispatches as a batch without
adapters; switching under load loses no request."""

from __future__ import annotations

import pytest

from .conftest import in_process_engine
from .test_versions import BLOCK, GEN, LONG, SHORT, Stepper, publish, ref, tokens

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# max_lora_rank 32: half of it (LORAPLEX_MERGE_RANK's default) for the merged adapter's correction
ENGINE = dict(max_lora_rank=32, max_loras=3, max_cpu_loras=4, max_model_len=160, max_num_batched_tokens=512,
              enable_prefix_caching=True, block_size=BLOCK)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_source, tmp_path_factory):
    yield from in_process_engine(tmp_path_factory, tiny_model_dir, adapter_source, "merged",
                                 env={"LORAPLEX_MERGE": "alpha-r4"}, **ENGINE)


def _merge(engine, name):
    from loraplex.vllm_plugin import merge_adapter

    return merge_adapter(engine.llm, name)


def _merged(run):
    m = run.engine_manager("merge_state")["merged"]
    return None if m is None else m[0]


def _check(engine, run, expected: dict, outs=None):
    """expected: request id -> (adapter directory name or None, prompt, tokens wanted)."""
    outs = run.run(*expected) if outs is None else outs
    for out, (rid, (src, prompt, n)) in zip(outs, expected.items(), strict=True):
        assert out.outputs[0].finish_reason != "error", f"{rid} ({src}) failed"
        assert tokens(out) == ref(engine, src, prompt, n), f"{rid} ({src}): tokens differ from transformers + PEFT"


def test_mixed_batches_exact_across_two_switches(engine):
    """Started merged (LORAPLEX_MERGE): base, the merged adapter and two others in flight while the
    merged adapter changes twice (alpha -> gamma -> none)."""
    from loraplex.vllm_plugin.worker_merge import BASE_ID

    run = Stepper(engine)
    if _merged(run) != "alpha-r4":
        _merge(engine, "alpha-r4")
    assert _merged(run) == "alpha-r4"
    plan = [(None, LONG), ("alpha-r4", SHORT), ("gamma-r16", LONG), ("beta-r8", SHORT), ("alpha-r4", LONG)]
    expected = {run.add(src, p, n=GEN + 4): (src, p, GEN + 4) for src, p in plan}
    run.step(3)
    # while alpha is merged: its rows take no slot, base rows take the correction slot, beside gamma's
    alpha_id = run.engine_manager("merge_state")["merged"][1]
    assert any(BASE_ID in b and alpha_id not in b for b in run.batches), run.batches
    _merge(engine, "gamma-r16")  # switch 1, every request mid-generation
    run.step(3)
    assert _merged(run) == "gamma-r16"
    _merge(engine, None)  # switch 2
    _check(engine, run, expected)
    assert _merged(run) is None
    # and new requests after both switches
    _check(engine, run, {run.add(src, p): (src, p, GEN) for src, p in plan[:4]})


def test_only_the_merged_adapter_runs_no_lora_op(engine, monkeypatch):
    """The dispatch decision on the CPU: a batch of only the merged adapter counts no adapter for vLLM's
    graph dispatch (its no-LoRA graphs on CUDA) and launches no LoRA op; a base request beside it counts
    one (the correction slot) and does."""
    from loraplex.kernels import ops

    calls = []
    for name in ("sgmv_shrink", "sgmv_expand", "add_lora_linear"):
        orig = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=orig, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    _merge(engine, "gamma-r16")
    run = Stepper(engine)
    only = {run.add("gamma-r16", p): ("gamma-r16", p, GEN) for p in (SHORT, LONG)}
    run.step(4)
    assert calls == [] and run.engine_manager("last_dispatch") == 0
    assert run.batches[-1] == set()
    base = run.add(None, SHORT, n=4)
    run.step(2)
    assert calls and run.engine_manager("last_dispatch") == 1
    _check(engine, run, {**only, base: (None, SHORT, 4)})


def test_prefix_cache_hits_across_switches_stay_exact(engine):
    """KV stays keyed by each request's own adapter version: blocks computed while merged are reused
    after an unmerge (and the other way round) for the same adapter only, and the tokens stay exact."""
    run = Stepper(engine)
    _merge(engine, "alpha-r4")
    first = {run.add(src, LONG): (src, LONG, GEN) for src in ("alpha-r4", None, "gamma-r16")}
    _check(engine, run, first)
    _merge(engine, None)
    again = {run.add(src, LONG): (src, LONG, GEN) for src in ("alpha-r4", None, "gamma-r16")}
    outs = run.run(*again)
    _check(engine, run, again, outs)
    assert all(o.num_cached_tokens >= 2 * BLOCK for o in outs), [o.num_cached_tokens for o in outs]
    _merge(engine, "alpha-r4")
    outs = run.run(*(third := {run.add(src, LONG): (src, LONG, GEN) for src in ("alpha-r4", None)}))
    _check(engine, run, third, outs)
    assert all(o.num_cached_tokens >= 2 * BLOCK for o in outs)


def test_republished_merged_adapter_is_merged_again(engine, tmp_path):
    """A request for a new version of the merged adapter's name has that version merged; a request still
    on the old version finishes exactly (it now runs old - new through its slot)."""
    run = Stepper(engine)
    publish(engine, engine.catalog / "alpha-r4", "main", tmp_path)
    _merge(engine, "main")
    old_id = run.engine_manager("merge_state")["merged"][1]
    old = run.add("main", LONG, n=GEN + 4)
    run.step(3)
    publish(engine, engine.catalog / "gamma-r16", "main", tmp_path)
    new = run.add("main", SHORT)
    run.step(2)
    state = run.engine_manager("merge_state")
    assert state["merged"][0] == "main" and state["merged"][1] != old_id, state
    outs = run.run(old, new)
    assert tokens(outs[0]) == ref(engine, "alpha-r4", LONG, GEN + 4)
    assert tokens(outs[1]) == ref(engine, "gamma-r16", SHORT)


def test_switching_under_load_loses_no_request(engine):
    """A switch every two steps while twelve requests of every kind run; an adapter that cannot be
    merged (beta-r8 also adapts the embedding and lm_head) is refused with the reason and nothing else
    changes."""
    from loraplex.errors import ConfigError

    run = Stepper(engine)
    sources = [None, "alpha-r4", "beta-r8", "gamma-r16"]
    expected = {}
    for i in range(12):
        src, prompt = sources[i % 4], (SHORT, LONG, [1, 5, 6])[i % 3]
        expected[run.add(src, prompt, n=8)] = (src, prompt, 8)
    cycle = ["gamma-r16", None, "alpha-r4", "beta-r8"]
    for i in range(8):
        run.step(2)
        target = cycle[i % 4]
        if target == "beta-r8":
            before = _merged(run)
            with pytest.raises(ConfigError, match="could not be merged"):
                _merge(engine, target)
            assert _merged(run) is None and before is not None  # unmerged, still serving
        else:
            _merge(engine, target)
    _check(engine, run, expected)
    assert run.engine_manager("merge_state")["switches"] >= 8
