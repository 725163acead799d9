"""A failure inside vLLM's code, through `loraplex serve`: what a vLLM release that changed an
internal the plugin calls looks like to a client (0.33 removed 0.32's classification-head checks, and
every catalog adapter answered 400 "found but could not be loaded"). The server here runs with one
such internal removed in every one of its processes (a sitecustomize on its PYTHONPATH); a request
for an adapter must get a 500 naming loraplex and the vLLM version, the adapter must stay listed and
servable once fixed, and the base model must keep serving."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from .server import http as _http
from .server import serve

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
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {"PYTHONPATH": os.pathsep.join([str(root / "site"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    for server in serve(tiny_model_dir, adapter_source, root, ["--max-model-len", "64", "--max-loras", "2",
                                                                "--max-num-seqs", "4", "--max-num-batched-tokens",
                                                                "256"], env=env):
        yield server.url, tiny_model_dir


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
