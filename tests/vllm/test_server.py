"""`loraplex serve` end to end: vLLM's OpenAI server in a subprocess on 127.0.0.1, serving catalog
adapters by name. Completions must give the transformers + PEFT greedy tokens; unknown and unsafe
names are refused; /v1/models lists the catalog. Waits are bounded and the server is always killed."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from .conftest import GEN_TOKENS, PROMPTS, poisoned_copy
from .server import http as _http
from .server import metrics_text, serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_source, tmp_path_factory):
    # LORAPLEX_REFRESH_INTERVAL keeps its default: a new adapter must be found without re-listing
    yield from serve(tiny_model_dir, adapter_source, tmp_path_factory.mktemp("server"),
                     ["--max-model-len", "64", "--max-loras", "2", "--max-num-seqs", "4", "--max-num-batched-tokens",
                      "256"], env={"LORAPLEX_PIN_ADAPTERS": "beta-r8"})


def _complete(server, model, prompt):
    status, body = _http(server.url + "/v1/completions", {
        "model": model, "prompt": list(prompt), "max_tokens": GEN_TOKENS, "temperature": 0.0,
        "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True})
    if status != 200:
        return status, body
    tokens = body["choices"][0]["logprobs"]["tokens"]  # "token_id:123"
    return status, [int(t.split(":", 1)[1]) for t in tokens]


def test_models_lists_the_catalog(server):
    status, body = _http(server.url + "/v1/models")
    assert status == 200
    cards = {card["id"]: card for card in body["data"]}
    assert server.model in cards
    for name in ("alpha-r4", "beta-r8", "gamma-r16"):
        assert cards[name]["parent"] == server.model
        assert os.path.samefile(cards[name]["root"], server.catalog / name)


@pytest.mark.parametrize("name, prompt", [("alpha-r4", PROMPTS[0]), ("beta-r8", PROMPTS[1]),
                                          ("gamma-r16", PROMPTS[2]), (None, PROMPTS[3])])
def test_completions_by_adapter_name(server, reference, name, prompt):
    status, tokens = _complete(server, name or server.model, prompt)
    assert status == 200, tokens
    assert tokens == reference(None if name is None else server.catalog / name, prompt)
    if name is not None:
        # served under its version's deterministic id (the same in every replica), not a counter
        from loraplex.catalog import Catalog
        from loraplex.vllm_plugin.identity import version_id, version_token

        lora_id = version_id(name, version_token(Catalog(server.catalog).get(name).version))
        assert f"serving adapter '{name}' (id {lora_id})" in server.log.read_text()


@pytest.mark.parametrize("name", ["no-such-adapter", "../alpha-r4", "alpha-r4/../beta-r8", ".hidden"])
def test_unknown_and_unsafe_names_are_refused(server, name):
    status, body = _complete(server, name, PROMPTS[0])
    assert status in (400, 404), body


def test_adapter_added_after_start(server, reference):
    shutil.copytree(server.catalog / "gamma-r16", server.catalog / ".staging-late")
    os.rename(server.catalog / ".staging-late", server.catalog / "late-gamma")
    status, tokens = _complete(server, "late-gamma", PROMPTS[0])
    assert status == 200, tokens
    assert tokens == reference(server.catalog / "late-gamma", PROMPTS[0])
    ids = {card["id"] for card in _http(server.url + "/v1/models")[1]["data"]}
    assert "late-gamma" in ids


def test_adapter_changed_in_place(server, reference, tmp_path):
    shutil.copytree(server.catalog / "alpha-r4", server.catalog / "swap")
    assert _complete(server, "swap", PROMPTS[1])[1] == reference(server.catalog / "alpha-r4", PROMPTS[1])
    shutil.copytree(server.catalog / "beta-r8", tmp_path / "new")
    os.rename(server.catalog / "swap", tmp_path / "old")
    os.rename(tmp_path / "new", server.catalog / "swap")
    status, tokens = _complete(server, "swap", PROMPTS[1])  # the first request after the rename
    assert status == 200, tokens
    assert tokens == reference(server.catalog / "beta-r8", PROMPTS[1])


def _publish(server, src, name, staging):
    """Copy adapter `src` into the catalog as `name`, appearing at once (a rename)."""
    shutil.copytree(src, staging / name)
    os.rename(staging / name, server.catalog / name)


def test_new_adapters_are_found_by_their_first_request(server, reference, tmp_path):
    # a miss (a typo) must not stop the next new name from being looked up
    assert _complete(server, "not-yet-published", PROMPTS[0])[0] == 404
    _publish(server, server.catalog / "beta-r8", "pub-one", tmp_path)
    time.sleep(0.1)
    _publish(server, server.catalog / "gamma-r16", "pub-two", tmp_path)
    for name, src in (("pub-one", "beta-r8"), ("pub-two", "gamma-r16")):
        status, tokens = _complete(server, name, PROMPTS[2])
        assert status == 200, tokens
        assert tokens == reference(server.catalog / src, PROMPTS[2])
    _publish(server, server.catalog / "alpha-r4", "not-yet-published", tmp_path)
    assert _complete(server, "not-yet-published", PROMPTS[0]) == (200, reference(server.catalog / "alpha-r4",
                                                                                  PROMPTS[0]))


def test_nan_adapter_is_refused_by_name_and_harms_no_one(server, reference, tmp_path):
    os.rename(poisoned_copy(server.catalog / "alpha-r4", tmp_path / "poisoned"), server.catalog / "poisoned")
    log_before = server.log.read_text()
    for _ in range(3):
        status, body = _complete(server, "poisoned", PROMPTS[0])
        assert status == 400, body
        message = body["error"]["message"]
        assert "'poisoned'" in message and "NaN" in message, message
    # everyone else is served as before, the base model included, and the bad adapter is not listed
    for name, prompt in ((None, PROMPTS[3]), ("alpha-r4", PROMPTS[0]), ("gamma-r16", PROMPTS[1]), (None, PROMPTS[0])):
        status, tokens = _complete(server, name or server.model, prompt)
        assert status == 200 and tokens == reference(None if name is None else server.catalog / name, prompt)
    ids = {card["id"] for card in _http(server.url + "/v1/models")[1]["data"]}
    assert "poisoned" not in ids and "alpha-r4" in ids
    new_log = server.log.read_text()[len(log_before):]
    lines = [ln for ln in new_log.splitlines() if "poisoned" in ln]
    assert len(lines) == 3, "one concise line per refused request:\n" + "\n".join(lines)
    assert "Traceback" not in new_log


def test_load_api_takes_catalog_names_only(server, reference, tmp_path, tiny_model_dir):
    from loraplex import toy

    outside = toy.make_adapter(tiny_model_dir, tmp_path / "outside", r=4, alpha=8, seed=5, targets=("q_proj",))
    load = server.url + "/v1/load_lora_adapter"
    status, body = _http(load, {"lora_name": "outsider", "lora_path": str(outside)})
    assert status == 403, body
    assert "only catalog adapters" in body["error"]["message"]
    assert _complete(server, "outsider", PROMPTS[0])[0] == 404
    # a catalog name with another path: refused; by name (its own directory or no path): loaded
    status, body = _http(load, {"lora_name": "alpha-r4", "lora_path": str(outside)})
    assert status == 403, body
    assert _http(load, {"lora_name": "beta-r8", "lora_path": str(server.catalog / "beta-r8")})[0] == 200
    assert _http(load, {"lora_name": "gamma-r16", "lora_path": ""})[0] == 200
    status, tokens = _complete(server, "alpha-r4", PROMPTS[0])
    assert status == 200 and tokens == reference(server.catalog / "alpha-r4", PROMPTS[0])


def _residency(server):
    """{adapter name: labels} of vllm:lora_adapter_loaded, and the other LoRA gauges, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    loaded, values = {}, {}
    for family in text_string_to_metric_families(metrics_text(server)):
        for sample in family.samples:
            if sample.name == "vllm:lora_adapter_loaded":
                assert sample.value == 1.0
                loaded[sample.labels["adapter_name"]] = sample.labels
            elif sample.name.startswith(("vllm:num_", "vllm:max_gpu", "vllm:lora_adapter_load_seconds",
                                         "loraplex_host_cache", "loraplex_queue", "loraplex_versions",
                                         "loraplex_requests")):
                values[sample.name + ("" if "le" not in sample.labels else "{" + sample.labels["le"] + "}")] = \
                    sample.value
    return loaded, values


def _residency_when(server, check, timeout=5.0):
    """_residency() once check(loaded, values) holds: workers publish within milliseconds of a change,
    and /metrics may be scraped in between (as any scraper may)."""
    deadline = time.monotonic() + timeout
    while True:
        loaded, values = _residency(server)
        try:
            check(loaded, values)
            return loaded, values
        except (AssertionError, KeyError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_residency_metrics_follow_loads_evictions_pins_and_unloads(server):
    def pinned_beta(loaded, values):
        assert values["vllm:max_gpu_lora_adapters"] == 2
        assert loaded["beta-r8"]["pinned"] == "true"  # LORAPLEX_PIN_ADAPTERS: resident before any request

    _residency_when(server, pinned_beta)
    # two GPU slots: alpha, then gamma, then beta leaves alpha in host memory only
    for name in ("alpha-r4", "gamma-r16", "beta-r8"):
        assert _complete(server, name, PROMPTS[0])[0] == 200

    def after_three(loaded, values):
        assert {n: loaded[n]["level"] for n in ("alpha-r4", "gamma-r16", "beta-r8")} == {
            "alpha-r4": "cpu", "gamma-r16": "gpu", "beta-r8": "gpu"}
        assert loaded["beta-r8"]["pinned"] == "true" and loaded["gamma-r16"]["pinned"] == "false"
        assert loaded["gamma-r16"]["rank"] == "16" and loaded["alpha-r4"]["rank"] == "4"
        assert values["vllm:num_gpu_loaded_lora_adapters"] == 2
        assert values["vllm:num_cpu_loaded_lora_adapters"] == len(loaded) - 2
        assert values["vllm:lora_adapter_load_seconds_count"] >= 3
        assert values["loraplex_host_cache_entries"] >= 3 and values["loraplex_host_cache_pinned"] >= 1
        assert values["loraplex_queue_prefetches_total"] >= 0  # reported (its effect: test_engine_safety)

    _residency_when(server, after_three)
    # unloading frees every tier: the series is gone, a GPU slot is free
    status, body = _http(server.url + "/v1/unload_lora_adapter", {"lora_name": "gamma-r16"})
    assert status == 200, body

    def unloaded(loaded, values):
        assert "gamma-r16" not in loaded and values["vllm:num_gpu_loaded_lora_adapters"] == 1

    _residency_when(server, unloaded)
    status, tokens = _complete(server, "gamma-r16", PROMPTS[1])  # and it comes back on request
    assert status == 200
    _residency_when(server, lambda loaded, values: assert_level(loaded, "gamma-r16", "gpu"))


def assert_level(loaded, name, level):
    assert loaded[name]["level"] == level


@pytest.mark.parametrize("name, why", [("too-wide", "max_lora_rank 16"), ("odd-target", "cannot apply LoRA to")])
def test_what_vllm_would_refuse_is_refused_by_name(server, tmp_path, tiny_model_dir, name, why):
    """vLLM's own limits are checked before the engine is asked: a 400 naming the adapter and the
    reason, one log line, the engine untouched (the server runs --max-lora-rank 16)."""
    from loraplex import toy

    if name == "too-wide":
        staged = toy.make_adapter(tiny_model_dir, tmp_path / name, r=32, alpha=32, seed=9, targets=("q_proj",))
    else:  # a module this model does not have: the catalog cannot know, the worker's module list does
        staged = toy.write_adapter(tmp_path / name, {"model.layers.0.mlp.router_proj": (64, 64)}, r=4)
    os.rename(staged, server.catalog / name)
    log_before = server.log.read_text()
    status, body = _complete(server, name, PROMPTS[0])
    assert status == 400, body
    assert f"'{name}'" in body["error"]["message"] and why in body["error"]["message"], body
    new_log = server.log.read_text()[len(log_before):]
    assert len([ln for ln in new_log.splitlines() if name in ln]) == 1 and "Traceback" not in new_log
    assert name not in {card["id"] for card in _http(server.url + "/v1/models")[1]["data"]}
