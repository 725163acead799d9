"""Merged mode through `loraplex serve` (LORAPLEX_MERGE pins catalog adapter "main"; HTTP on 127.0.0.1,
one server for every test here): concurrent requests for the merged adapter, other adapters and the base
model; republishing the merged adapter twice during streamed generations (each new version is merged
again); an adapter above the rank merged mode leaves to served adapters is refused by the API server with
the reason. Tokens are checked against transformers + PEFT (fp32)."""

from __future__ import annotations

import shutil
import threading

import pytest

from .server import Stream, complete, http, metrics_text, serve
from .test_server_versions import publish, ref, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ([1, 17, 42, 99, 7], [1, 50, 60, 70], [1, 5, 6], [1, 200, 3, 14, 15, 92])


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_source, tmp_path_factory):
    source = tmp_path_factory.mktemp("merged-source") / "adapters"
    shutil.copytree(adapter_source, source)
    shutil.copytree(adapter_source / "alpha-r4", source / "main")
    yield from serve(tiny_model_dir, source, tmp_path_factory.mktemp("merged-server"),
                     ["--max-model-len", "192", "--max-loras", "3", "--max-cpu-loras", "4", "--max-num-seqs", "4",
                      "--max-lora-rank", "32"], env={"LORAPLEX_MERGE": "main"})


def _metric(server, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text(server)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_concurrent_requests_of_every_kind_are_exact(server):
    assert _metric(server, "loraplex_merged_adapter", adapter_name="main") == 1
    jobs = [(server.model, None), ("main", "main"), ("beta-r8", "beta-r8"), ("gamma-r16", "gamma-r16")] * 2
    answers = {}

    def send(i, model):
        answers[i] = complete(server, model, PROMPTS[i % 4], 8)

    threads = [threading.Thread(target=send, args=(i, model)) for i, (model, _) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for i, (_, src) in enumerate(jobs):
        assert answers[i] == (200, ref(server, src, 8, PROMPTS[i % 4])), f"request {i} for {src}"


def test_republishing_the_merged_adapter_merges_each_new_version(server, tmp_path):
    before = _metric(server, "loraplex_merge_switches_total") or 0
    streams = [(Stream(server, "main", PROMPTS[0], 64), "alpha-r4"),
               (Stream(server, server.model, PROMPTS[1], 64), None),
               (Stream(server, "gamma-r16", PROMPTS[2], 64), "gamma-r16")]
    for s, _ in streams:
        assert s.status == 200
        s.next_tokens(3)
    for n, src in enumerate(("gamma-r16", "alpha-r4")):  # two new versions of "main", each merged in turn
        publish(server, src, "main", tmp_path)
        assert complete(server, "main", PROMPTS[3], 8) == (200, ref(server, src, 8, PROMPTS[3]))
        wait_for(lambda n=n: (_metric(server, "loraplex_merge_switches_total") or 0) >= before + n + 1, timeout=60,
                 what="the new version to be merged")
    for s, src in streams:
        assert s.finish() == ref(server, src, 64, s_prompt(streams, s)) and not s.errors, src
    assert _metric(server, "loraplex_merged_adapter", adapter_name="main") == 1


def s_prompt(streams, stream):
    return PROMPTS[[s for s, _ in streams].index(stream)]


def test_rank_above_the_served_limit_is_refused_with_the_reason(server):
    from loraplex import toy

    toy.make_adapter(server.model, server.catalog / "wide-r24", r=24, alpha=16, seed=21)
    status, body = complete(server, "wide-r24", PROMPTS[0], 4)
    assert status == 400, body
    message = body["error"]["message"]
    assert "wide-r24" in message and "LORAPLEX_MERGE_RANK" in message and "16" in message, message
    assert http(server.url + "/health")[0] == 200
    assert complete(server, "main", PROMPTS[0], 4)[0] == 200
