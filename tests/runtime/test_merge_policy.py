"""The automatic merge policy, step by step (no clock): threshold, hysteresis, a full window between
switches, base-model tokens counted but never merged; and the Runtime following it at step boundaries."""

import pytest
import torch

from loraplex import RuntimeConfig
from loraplex.config import AutoMerge
from loraplex.errors import ConfigError
from loraplex.runtime.merge_policy import MergePolicy

from .test_merged import _snapshot, bind_modules


def _feed(policy, current, steps, mix):
    """Run `steps` steps of one request per name in `mix` ({name: tokens}); returns the decisions."""
    out = []
    for _ in range(steps):
        policy.observe(list(mix), list(mix.values()))
        want = policy.decide(current)
        if want != current:
            policy.switched()
            current = want
        out.append(current)
    return out


def test_merges_the_leader_above_threshold_after_a_full_window():
    p = MergePolicy(AutoMerge(window_steps=4, threshold=0.7, hysteresis=0.1))
    got = _feed(p, None, 6, {"a": 8, "b": 1, None: 1})  # a: 80 % of the tokens
    assert got == [None, None, None, "a", "a", "a"]  # no decision before 4 steps were seen
    assert p.share("a") == pytest.approx(0.8)


def test_below_threshold_nothing_is_merged():
    p = MergePolicy(AutoMerge(window_steps=3, threshold=0.7, hysteresis=0.1))
    assert _feed(p, None, 10, {"a": 6, "b": 3, None: 1}) == [None] * 10
    # base-model tokens count in the total but are never merged
    assert _feed(p, None, 10, {None: 9, "a": 1}) == [None] * 10


def test_hysteresis_keeps_the_merged_adapter_then_lets_go():
    p = MergePolicy(AutoMerge(window_steps=2, threshold=0.7, hysteresis=0.1))
    assert _feed(p, None, 2, {"a": 9, "b": 1})[-1] == "a"
    assert _feed(p, "a", 6, {"a": 65, "b": 35}) == ["a"] * 6  # 0.65: below threshold, within hysteresis
    got = _feed(p, "a", 6, {"a": 55, "b": 45})  # 0.55 < 0.6: unmerged once the window saw it
    assert got[-1] is None and got[0] == "a"


def test_switches_to_a_new_leader_only_a_window_after_the_last_switch():
    p = MergePolicy(AutoMerge(window_steps=3, threshold=0.6, hysteresis=0.1))
    assert _feed(p, None, 3, {"a": 10})[-1] == "a"
    assert _feed(p, "a", 3, {"b": 10}) == ["a", "a", "b"]  # the window must be all b-era steps first
    # traffic flips back at once: held for a full window of steps after the switch
    assert _feed(p, "b", 4, {"a": 10}) == ["b", "b", "a", "a"]
    # the last switch was 2 steps ago: the 2nd step of b completes a window since, and [a, b, b] gives b
    assert _feed(p, "a", 4, {"b": 10}) == ["a", "b", "b", "b"]
    assert _feed(p, "b", 3, {"b": 10}) == ["b"] * 3
    assert _feed(p, "b", 2, {"a": 10}) == ["b", "a"]  # [b, b, a] keeps b (2/3); [b, a, a] gives a


def test_ties_break_by_name_and_config_is_validated():
    p = MergePolicy(AutoMerge(window_steps=1, threshold=0.5, hysteresis=0.0))
    assert _feed(p, None, 1, {"a": 5, "b": 5}) == ["b"]
    for bad in (dict(window_steps=0), dict(threshold=0.0), dict(threshold=0.5, hysteresis=0.5)):
        with pytest.raises(ConfigError):
            AutoMerge(**bad)
    with pytest.raises(ConfigError, match="set one of them"):
        RuntimeConfig(merge_adapter="a", merge_auto=AutoMerge())


def test_runtime_follows_the_policy_at_step_boundaries(make_runtime, adapter_source):
    rt = make_runtime(adapter_source, max_loras=4, max_rank=24,
                      merge_auto=AutoMerge(window_steps=3, threshold=0.7, hysteresis=0.1))
    mods = bind_modules(rt)
    pristine = _snapshot(mods)
    seen = []
    for names, tokens in [(["alpha-r4", "gamma-r16"], [9, 1])] * 5 + [(["gamma-r16", None], [9, 1])] * 8:
        with rt.step(names, tokens) as plan:
            seen.append(None if plan.merged is None else plan.merged[0])
            assert (plan.request_slots[0] == -1) == (seen[-1] == names[0])  # merged: no slot
    # step 3 completes the window: alpha (0.9) is asked for, prepared at once (its slab is in the host
    # cache) and switched in at that step's release. Step 7's window [alpha, gamma, gamma] leaves alpha at
    # 0.3 and gamma at 0.63 < 0.7: unmerged. Steps 8-10 are a full gamma window: gamma from step 11.
    assert seen == [None] * 3 + ["alpha-r4"] * 4 + [None] * 3 + ["gamma-r16"] * 3, seen
    assert rt.merged() == rt.catalog.get("gamma-r16").key
    rt.merge(None)  # an explicit switch turns the policy off
    for _ in range(5):
        with rt.step(["gamma-r16"]):
            pass
    assert rt.merged() is None and rt.stats()["merge"]["policy"] is False
    assert all(torch.equal(m.weight, pristine[p]) for p, m in mods.items())
