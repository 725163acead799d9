"""Merged mode on CUDA.

test_correction_uploads_and_graph_replay_across_switches (no vLLM needed, the GPU machine has none): a
slot uploaded under a correction holds [A_X; A_M], [B_X, -B_M] exactly; a CUDA graph that reads the slot,
captured once, replays the new contents after each switch (correction set, slot refilled) and equals the
same computation run eagerly.

test_engine_graphs_across_switches (needs vLLM on CUDA): a vLLM engine with CUDA graphs (FULL decode
graphs, no torch.compile, so graphs and eager run the same kernels) and one without run the same
requests across two switches of the merged adapter and give the same tokens; decode batches of only
the merged adapter dispatch to graphs captured without LoRA (has_lora False), base requests beside them
to graphs with LoRA.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.runtime.merged import stack_correction
from loraplex.vllm_plugin.merge_weights import correction_slab
from loraplex.vllm_plugin.slab_layout import piece_view
from loraplex.vllm_plugin.slab_upload import SlabUploader

from .test_slab_upload_gpu import PlainTargets, make_slab

pytestmark = pytest.mark.gpu


def _pieces(slab, module="m0"):
    a = next(p for p in slab.layout.pieces if p.module == module and p.which == "A")
    b = next(p for p in slab.layout.pieces if p.module == module and p.which == "B")
    dtype = slab.layout.dtype
    return piece_view(slab.buffer, a, dtype, None)[0], piece_view(slab.buffer, b, dtype, None)[0]


def test_correction_uploads_and_graph_replay_across_switches():
    up = SlabUploader(PlainTargets(torch.device("cuda")))
    x_slab, m1, m2 = make_slab(4, 11), make_slab(8, 12), make_slab(4, 13)
    up.reserve_staging(max(s.nbytes for s in (x_slab, m1, m2)))
    up.reserve_correction(max(m1.nbytes, m2.nbytes))
    up.upload(x_slab, 1)
    up.make_ready([1])
    A, B = up.targets.stacked("m0", "A")[0], up.targets.stacked("m0", "B")[0]
    x = torch.randn(8, A.shape[-1], device="cuda", dtype=A.dtype)

    def step():
        return (x @ A[1, 0].t()) @ B[1, 0].t()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for merged in (m1, m2, None, m1):  # three switches and back
        torch.cuda.synchronize()  # what a switch does before it rewrites anything
        up.set_correction(None if merged is None else correction_slab(merged, pin=True))
        up.upload(x_slab, 1, wait_compute=True)  # the refill
        up.make_ready([1])
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), "the captured graph did not read the slot's new contents"
        want_a, want_b = stack_correction(_pieces(x_slab), None if merged is None else _pieces(merged))
        r = want_a.shape[0]
        assert torch.equal(A[1, 0, :r].cpu(), want_a) and not A[1, 0, r:].any()
        assert torch.equal(B[1, 0, :, :r].cpu(), want_b) and not B[1, 0, :, r:].any()
        assert up.slot_rank(x_slab.layout) == r


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_graphs_across_switches(tiny_model_dir, adapter_source, tmp_path_factory):
    pytest.importorskip("vllm")
    graphs, dispatched = _engine_run(tiny_model_dir, adapter_source, tmp_path_factory, eager=False)
    eager, _ = _engine_run(tiny_model_dir, adapter_source, tmp_path_factory, eager=True)
    assert graphs == eager
    assert ("FULL", False) in dispatched, "no decode batch of only the merged adapter ran a no-LoRA graph"
    assert ("FULL", True) in dispatched


def _engine_run(model, adapters, tmp_path_factory, eager):
    from .conftest import in_process_engine
    from .test_versions import LONG, SHORT, Stepper, tokens

    kwargs = dict(dtype="float16", max_lora_rank=32, max_loras=3, max_cpu_loras=4, max_model_len=160,
                  enforce_eager=eager)
    if not eager:
        kwargs["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                        "cudagraph_capture_sizes": [1, 2, 4, 8]}
    gen = in_process_engine(tmp_path_factory, model, adapters, f"merged-gpu-{eager}",
                            env={"LORAPLEX_MERGE": "alpha-r4", "LORAPLEX_BACKEND": "triton"}, **kwargs)
    engine = next(gen)
    dispatched = []
    try:
        from loraplex.vllm_plugin import merge_adapter

        runner = engine.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        dispatcher = runner.cudagraph_dispatcher
        orig = dispatcher.dispatch

        def dispatch(*args, **kw):
            mode, desc = orig(*args, **kw)
            dispatched.append((mode.name, bool(desc.has_lora)))
            return mode, desc

        dispatcher.dispatch = dispatch
        run = Stepper(engine)
        rids = [run.add("alpha-r4", SHORT, n=16), run.add("alpha-r4", LONG, n=16)]
        run.step(6)  # decode steps of the merged adapter alone
        rids += [run.add(None, SHORT, n=12), run.add("gamma-r16", LONG, n=12)]
        run.step(4)
        merge_adapter(engine.llm, "gamma-r16")
        run.step(4)
        merge_adapter(engine.llm, None)
        outs = run.run(*rids)
        return [tokens(o) for o in outs], dispatched
    finally:
        gen.close()
