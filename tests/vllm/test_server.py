"""`loraplex serve` end to end: vLLM's OpenAI server in a subprocess on 127.0.0.1, serving catalog
adapters by name. Completions must give the transformers + PEFT greedy tokens; unknown and unsafe
names are refused; /v1/models lists the catalog. Waits are bounded and the server is always killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from .conftest import GEN_TOKENS, PROMPTS, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

START_TIMEOUT_S = 240


def _http(url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    catalog = root / "catalog"
    shutil.copytree(adapter_source, catalog)
    port = free_port()
    env = dict(os.environ, LORAPLEX_BACKEND="torch", LORAPLEX_REFRESH_INTERVAL="0",
               VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    env.pop("LORAPLEX_CATALOG", None)
    cmd = [sys.executable, "-m", "loraplex.vllm_plugin.serve", tiny_model_dir,
           "--lora-catalog-type", "storage", "--lora-catalog-path", str(catalog),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "64", "--max-loras", "2", "--max-lora-rank", "16", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "256", "--seed", "0"]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if _http(base + "/health", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield SimpleNamespace(url=base, catalog=catalog, model=tiny_model_dir, log=log_path)
    finally:
        _stop(proc)


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
        # served under the catalog's deterministic id (the same in every replica), not a counter
        from loraplex.catalog import Catalog

        lora_id = Catalog(server.catalog).get_adapter_id(name)
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
    _http(server.url + "/v1/models")  # any listing (or LORAPLEX_CATALOG_WATCH) notices the change
    status, tokens = _complete(server, "swap", PROMPTS[1])
    assert status == 200, tokens
    assert tokens == reference(server.catalog / "beta-r8", PROMPTS[1])
