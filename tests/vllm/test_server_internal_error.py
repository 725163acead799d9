"""A failure inside vLLM's code, through `loraplex serve`: what a vLLM release that changed an
internal the plugin calls looks like to a client (0.33 removed 0.32's classification-head checks, and
every catalog adapter answered 400 "found but could not be loaded"). The server here runs with one
such internal removed in every one of its processes (a sitecustomize on its PYTHONPATH); a request
for an adapter must get a 500 naming loraplex and the vLLM version, the adapter must stay listed and
servable once fixed, and the base model must keep serving."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
from pathlib import Path

import pytest

from .conftest import free_port
from .test_server import START_TIMEOUT_S, _http, _stop

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]  # the server's processes import this checkout's loraplex

SITECUSTOMIZE = """
    # Stands for a vLLM release without an internal the plugin calls, in every process of the server.
    from loraplex.vllm_plugin._hooks import after_import

    def _drop(module):
        del module.LoRAModelManager._validate_moe_lora_format

    after_import("vllm.lora.model_manager", _drop)
"""


@pytest.fixture(scope="module")
def broken_server(tiny_model_dir, adapter_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-server")
    shutil.copytree(adapter_source, root / "catalog")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    port = free_port()
    env = dict(os.environ, LORAPLEX_BACKEND="torch", VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(root / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("LORAPLEX_CATALOG", None)
    cmd = [sys.executable, "-m", "loraplex.vllm_plugin.serve", tiny_model_dir,
           "--lora-catalog-type", "storage", "--lora-catalog-path", str(root / "catalog"),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "64", "--max-loras", "2", "--max-lora-rank", "16", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "256", "--seed", "0"]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if _http(url + "/health", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield url, tiny_model_dir
    finally:
        _stop(proc)


def _complete(url, model):
    return _http(url + "/v1/completions", {"model": model, "prompt": [1, 17, 42], "max_tokens": 2,
                                           "temperature": 0.0})


def test_an_internal_failure_is_the_servers_error_not_the_adapters(broken_server):
    import vllm

    url, model = broken_server
    for _ in range(2):  # the second time too: the adapter was not marked unservable
        status, body = _complete(url, "alpha-r4")
        assert status == 500, body
        message = body["error"]["message"]
        assert "loraplex internal error" in message and f"vLLM {vllm.__version__}" in message, message
        assert "loading adapter 'alpha-r4'" in message and "_validate_moe_lora_format" in message, message
        assert "could not be loaded" not in message and "is invalid" not in message, message
    status, body = _http(url + "/v1/models")
    assert status == 200 and "alpha-r4" in {card["id"] for card in body["data"]}, body
    assert _complete(url, model)[0] == 200  # the engine is alive and the base model serves
