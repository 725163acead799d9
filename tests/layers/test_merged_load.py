"""Merged mode under load and in bf16: steps running on several threads while another thread switches the
merged adapter lose no request and each output equals its reference; bf16 keeps the unmerged path's error.

bf16 tolerance: per row, |merged − fp32 PEFT| <= 2·|unmerged − fp32 PEFT| + 2^-8·max|reference|, i.e.
merged mode at most doubles the error the bf16 path already has, plus one bf16 step of the logits. It
holds for adapters whose ΔW is small next to W (real fine-tunes: ||ΔW||/||W|| of a few percent; here
0.1 to 0.5 for the linear modules, ~4 for the embeddings): the merge adds one rounding of W + ΔW (relative 2^-9 of
|W + ΔW|) and requests that undo it cancel ΔW·x in bf16, both proportional to 1 + ||ΔW||/||W||. With the
session's adapters (B scaled by 20: ΔW up to 15000x W) the corrected rows lose most of their precision in
bf16; the runtime warns above a ratio of 0.5 and reports it (stats()["merge"]["delta_ratio"]).
"""

import threading

import pytest
import torch

from loraplex import Catalog

from .test_inject import NAMES, _prompts, _reference_logits
from .test_merged import _ours, assert_rows_equal, refs_for

SMALL = {
    "small-a": dict(r=8, alpha=16, seed=21, b_scale=0.02),
    "small-b": dict(r=16, alpha=16, seed=22, targets=("q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens",
                                                     "lm_head"), b_scale=0.02),
    "small-c": dict(r=4, alpha=8, seed=23, targets=("gate_proj", "up_proj", "k_proj"), b_scale=0.12),
}


@pytest.fixture(scope="module")
def catalog(adapter_source):
    return Catalog(adapter_source)


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory, tiny_model_dir):
    """Adapters of realistic size next to the base weights (B scaled by 0.02 or 0.12 instead of 20)."""
    from loraplex import toy

    root = tmp_path_factory.mktemp("small")
    for name, kw in SMALL.items():
        toy.make_adapter(tiny_model_dir, root / name, **kw)
    return Catalog(root)


def test_bf16_merged_mode_keeps_the_unmerged_error(tiny_model_dir, small_catalog):
    names = [None, "small-a", "small-b", "small-c", "small-a", None, "small-b"]
    ids = _prompts(len(names), 6, seed=4)
    refs = refs_for(tiny_model_dir, small_catalog, ids, names)
    lm, rt = _ours(tiny_model_dir, small_catalog, dtype=torch.bfloat16, max_rank=32)

    def run():
        with torch.no_grad(), lm.step(names, [ids.shape[1]] * len(names)):
            return lm.model(ids).logits.float()

    unmerged = [(run()[i] - refs[n][i]).abs().max().item() for i, n in enumerate(names)]
    for merged in ("small-a", "small-b", "small-c"):
        rt.merge(merged)
        got = run()
        for i, n in enumerate(names):
            err = (got[i] - refs[n][i]).abs().max().item()
            bound = 2 * unmerged[i] + 2 ** -8 * refs[n][i].abs().max().item()
            assert err <= bound, f"merged {merged}: request {i} ({n}) error {err}, unmerged {unmerged[i]}"
        ratio = rt.stats()["merge"]["delta_ratio"]
        assert 0 < ratio < 5
    # the bound discriminates: each adapter moves the logits by far more than it allows
    for n in SMALL:
        assert (refs[n] - refs[None]).abs().max() > 4 * (2 * max(unmerged) + 2 ** -8 * refs[None].abs().max())


def test_switching_under_load_loses_no_request(tiny_model_dir, catalog):
    """Three threads run steps (plan, forward, release) while a fourth switches alpha -> gamma -> none ->
    beta -> none -> alpha -> none, each time once two steps ran under the new state. The model's forward
    is one thread at a time (one LoraContext), but plans are taken and held concurrently, so a switch
    must wait for the steps holding plans and new plans must wait for the switch."""
    batches = [["alpha-r4", None, "gamma-r16"], ["beta-r8", "alpha-r4"], [None, "gamma-r16", "beta-r8", None]]
    order = ["alpha-r4", "gamma-r16", None, "beta-r8", None, "alpha-r4", None]
    length, workers = 4, 3
    inputs = [_prompts(len(b), length, seed=10 + i) for i, b in enumerate(batches)]
    # references of every adapter on every batch: the merged one sets the tolerance (assert_rows_equal)
    refs = [refs_for(tiny_model_dir, catalog, ids, [*b, *order]) for ids, b in zip(inputs, batches, strict=True)]
    lm, rt = _ours(tiny_model_dir, catalog, max_loras=4)
    forward = threading.Lock()
    progress = threading.Condition()
    stop = threading.Event()
    results, failures, started = [], [], [0] * workers

    def worker(w):
        try:
            it = 0
            while not stop.is_set() or it < 3:
                k = (w + it) % len(batches)
                it += 1
                started[w] += 1
                plan = rt.plan(batches[k], [length] * len(batches[k]))
                try:
                    with forward, torch.no_grad(), lm.context.use(plan, [length] * len(batches[k])):
                        logits = lm.model(inputs[k]).logits
                finally:
                    rt.release(plan)
                with progress:
                    results.append((k, None if plan.merged is None else plan.merged[0], logits))
                    progress.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    def switcher():
        try:
            for name in order:
                rt.merge(name)
                with progress:
                    before = sum(1 for _, m, _ in results if m == name)
                    assert progress.wait_for(
                        lambda n=name, b=before: sum(1 for _, m, _ in results if m == n) >= b + 2 or failures, 60)
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)] + [threading.Thread(target=switcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    assert len(results) == sum(started)  # every request started was answered
    assert rt.stats()["merge"]["switches"] == len(order)
    assert {m for _, m, _ in results} == {None, "alpha-r4", "gamma-r16", "beta-r8"}
    for k, merged, logits in results:
        assert_rows_equal(logits, refs[k], batches[k], merged, what=f"batch {k}")
    assert rt._gate.active == 0 and rt.merged() is None


def test_reference_is_not_the_merged_model(tiny_model_dir, catalog):
    """Guard for the tests above: with alpha merged, a base request served without its correction would
    be off by far more than the merged-mode tolerance."""
    ids = _prompts(1, 6)
    base = _reference_logits(tiny_model_dir, catalog, None, ids, torch.float32)
    alpha = _reference_logits(tiny_model_dir, catalog, "alpha-r4", ids, torch.float32)
    assert (alpha - base).abs().max() > 100 * (1e-4 + 2e-5 * max(alpha.abs().max(), base.abs().max()))
    assert NAMES.count(None) == 2
