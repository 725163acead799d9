"""Through `loraplex serve` (HTTP on 127.0.0.1, streaming): a request is served by one version of its
adapter from its first token to its last, a new version serves new requests as soon as it is
published, and no storage event stops the engine. Two sequences, two GPU slots, two adapters in vLLM's
CPU cache and in the host cache: every cache is under pressure. Tokens are checked against
transformers + PEFT (fp32)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from .conftest import hf_greedy
from .server import Stream, complete, http, metrics_text, serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = [1, 17, 42, 99, 7]
LONG_GEN = 96


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_source, tmp_path_factory):
    yield from serve(tiny_model_dir, adapter_source, tmp_path_factory.mktemp("versions-server"),
                     ["--max-model-len", "192", "--max-loras", "2", "--max-cpu-loras", "2", "--max-num-seqs", "2",
                      "--max-num-batched-tokens", "256"],
                     # VLLM_SERVER_DEV_MODE: vLLM's /pause and /resume, to hold requests in the queue
                     env={"LORAPLEX_HOST_CACHE_ENTRIES": "2", "VLLM_SERVER_DEV_MODE": "1"})


_refs: dict = {}


def ref(server, src, n, prompt=PROMPT):
    key = (src, n, tuple(prompt))
    if key not in _refs:
        _refs[key] = hf_greedy(server.model, None if src is None else server.catalog / src, prompt, n)
    return _refs[key]


def publish(server, src, name, tmp):
    """Replace catalog adapter `name` by a copy of `src` with renames, as sync tools publish."""
    n = len(os.listdir(tmp))
    staged = tmp / f"staged-{n}"
    shutil.copytree(server.catalog / src, staged)
    if (server.catalog / name).exists():
        os.rename(server.catalog / name, tmp / f"old-{n}")
    os.rename(staged, server.catalog / name)


def gauge(server, name) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text(server)):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is not on /metrics")


def wait_for(check, timeout=30.0, what=""):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_republish_during_a_streamed_generation(server, tmp_path):
    publish(server, "alpha-r4", "live", tmp_path)
    v1, v2 = ref(server, "alpha-r4", LONG_GEN), ref(server, "gamma-r16", 8)
    stream = Stream(server, "live", PROMPT, LONG_GEN)
    assert stream.status == 200
    stream.next_tokens(3)
    publish(server, "gamma-r16", "live", tmp_path)
    status, new = complete(server, "live", PROMPT, 8)
    assert status == 200 and new == v2, "a request sent after the publish must get the new version"
    assert stream.finish() == v1 and not stream.errors, "the streamed request switched versions"
    assert gauge(server, "loraplex_versions_in_one_step_max") >= 2, "the two versions never ran in one batch"
    wait_for(lambda: gauge(server, "loraplex_versions_held") == 0, what="the old version to be let go")


def test_two_republishes_during_one_request(server, tmp_path):
    publish(server, "beta-r8", "twice", tmp_path)
    stream = Stream(server, "twice", PROMPT, LONG_GEN)
    stream.next_tokens(3)
    for src in ("alpha-r4", "gamma-r16"):
        publish(server, src, "twice", tmp_path)
        assert complete(server, "twice", PROMPT, 8) == (200, ref(server, src, 8))
    assert stream.finish() == ref(server, "beta-r8", LONG_GEN) and not stream.errors


def test_delete_during_a_request(server, tmp_path):
    publish(server, "gamma-r16", "doomed", tmp_path)
    stream = Stream(server, "doomed", PROMPT, LONG_GEN)
    stream.next_tokens(3)
    shutil.rmtree(server.catalog / "doomed")
    assert complete(server, "doomed", PROMPT, 8)[0] == 404
    assert stream.finish() == ref(server, "gamma-r16", LONG_GEN) and not stream.errors


def test_queued_request_keeps_its_version_through_eviction_and_republish(server, tmp_path):
    """The race that used to stop the engine (EngineDeadError, then HTTP 500 for everyone): a queued
    request's version pushed out of the caches by the adapters resolved after it, then replaced on
    storage before the request runs. vLLM's /pause (mode=keep) holds the requests in the queue."""
    publish(server, "beta-r8", "x", tmp_path)
    answers = {}

    def send(name):
        answers[name] = complete(server, name, PROMPT, 8)

    # Earlier tests' versions are let go when their last requests finish: wait for that, so the count
    # below rises only with this test's requests (a release during the wait would hide a new hold).
    wait_for(lambda: gauge(server, "loraplex_versions_held") == 0, what="earlier versions to be let go")
    assert http(server.url + "/pause?mode=keep", {})[0] == 200
    try:
        threads = []
        held = gauge(server, "loraplex_versions_held")
        for i, name in enumerate(("x", "gamma-r16")):  # x bound to its version, then gamma resolved after it
            threads.append(threading.Thread(target=send, args=(name,)))
            threads[-1].start()
            wait_for(lambda i=i: gauge(server, "loraplex_versions_held") >= held + i + 1, timeout=120,
                     what=f"{name}'s request to be queued")
        publish(server, "gamma-r16", "x", tmp_path)  # x's version is gone from storage now
    finally:
        assert http(server.url + "/resume", {})[0] == 200
    for t in threads:
        t.join(timeout=180)
    assert answers["x"] == (200, ref(server, "beta-r8", 8)), "x was not served by the version it was resolved to"
    assert answers["gamma-r16"] == (200, ref(server, "gamma-r16", 8))
    assert http(server.url + "/health")[0] == 200
    assert complete(server, "x", PROMPT, 8) == (200, ref(server, "gamma-r16", 8))
    assert complete(server, server.model, PROMPT, 8) == (200, ref(server, None, 8))


SOAK_S = float(os.environ.get("LORAPLEX_SERVE_SOAK_S", "10"))
LONG_SOAK_S = float(os.environ.get("LORAPLEX_SERVE_LONG_SOAK_S", "300"))


def _soak(server, tmp_path, seconds):
    from .serve_soak import ServeSoak

    result = ServeSoak(server, lambda src, prompt, n: ref(server, src, n, prompt), tmp_path).run(seconds)
    print(f"\nserve soak {seconds:.0f}s: {result.summary()}")
    assert not result.errors, result.errors[:5]
    assert not result.mismatches, result.mismatches[:5]
    assert result.requests >= 10 and result.republishes >= seconds, result.summary()
    assert gauge(server, "loraplex_requests_failed_total") == 0


def test_churn_soak(server, tmp_path):
    _soak(server, tmp_path, SOAK_S)


@pytest.mark.soak
def test_churn_soak_long(server, tmp_path):
    _soak(server, tmp_path, LONG_SOAK_S)


def test_truncated_adapter_is_never_listed(server, tmp_path):
    """Header intact, data cut: the catalog's weights check keeps it out of /v1/models from the first
    listing that could see it, and a request for it is refused by name."""
    import struct

    staged = tmp_path / "trunc"
    shutil.copytree(server.catalog / "beta-r8", staged)
    weights = staged / "adapter_model.safetensors"
    raw = weights.read_bytes()
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    weights.write_bytes(raw[:header + (len(raw) - header) // 2])
    os.rename(staged, server.catalog / "trunc")
    for _ in range(3):  # before and after the server's re-listing interval (1 s)
        ids = {card["id"] for card in http(server.url + "/v1/models")[1]["data"]}
        assert "trunc" not in ids and "beta-r8" in ids
        time.sleep(0.6)
    status, body = complete(server, "trunc", PROMPT, 4)
    assert status == 400 and "trunc" in str(body), (status, body)
