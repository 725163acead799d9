"""`loraplex serve` in a subprocess on 127.0.0.1 for the HTTP tests: start (bounded wait), plain JSON
requests, streamed completions, and a stop that always kills the server and its engine."""

from __future__ import annotations

import http.client as http_client
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

from .conftest import free_port

START_TIMEOUT_S = 240


def http(url, body=None, timeout=60):
    """(status, decoded JSON body or text) of a GET (body None) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, _body(r.read())
    except urllib.error.HTTPError as e:
        return e.code, _body(e.read())


def _body(raw: bytes):
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")  # plain-text answers (the load API's "Success: ...")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def serve(model_dir, adapter_source, root, args=(), env=()):
    """Generator for a module fixture: `loraplex serve` over a fresh copy of the test catalog; yields
    SimpleNamespace(url, catalog, model, log, port)."""
    catalog = root / "catalog"
    shutil.copytree(adapter_source, catalog)
    port = free_port()
    full_env = dict(os.environ, LORAPLEX_BACKEND="torch", VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1",
                    **dict(env))
    for leaked in ("LORAPLEX_REFRESH_INTERVAL", "LORAPLEX_CATALOG", "LORAPLEX_STATE_DIR"):  # the server's own
        full_env.pop(leaked, None)
    cmd = [sys.executable, "-m", "loraplex.vllm_plugin.serve", model_dir,
           "--lora-catalog-type", "storage", "--lora-catalog-path", str(catalog),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-lora-rank", "16", "--seed", "0", *args]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if http(base + "/health", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield SimpleNamespace(url=base, catalog=catalog, model=model_dir, log=log_path, port=port, proc=proc)
    finally:
        stop(proc)


def metrics_text(server) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        return r.read().decode()


def completion_body(model, prompt, max_tokens, stream=False):
    return {"model": model, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True, "stream": stream}


def token_ids(logprob_tokens) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in logprob_tokens]  # "token_id:123"


def complete(server, model, prompt, max_tokens, timeout=120):
    """(status, token ids or the error body) of one non-streamed greedy completion."""
    status, body = http(server.url + "/v1/completions", completion_body(model, prompt, max_tokens), timeout)
    if status != 200:
        return status, body
    return status, token_ids(body["choices"][0]["logprobs"]["tokens"])


class Stream:
    """A streamed greedy completion read chunk by chunk: next_tokens(n) blocks until n more tokens came."""

    def __init__(self, server, model, prompt, max_tokens, timeout=180):
        self.conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.conn.request("POST", "/v1/completions", json.dumps(completion_body(model, prompt, max_tokens, True)),
                          {"Content-Type": "application/json"})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.tokens: list[int] = []
        self.errors: list = []
        self.finished = False

    def _read_event(self) -> bool:
        line = self.response.readline()
        if not line:
            self.finished = True
            return False
        line = line.strip()
        if not line.startswith(b"data:"):
            return True
        data = line[5:].strip()
        if data == b"[DONE]":
            self.finished = True
            return False
        event = json.loads(data)
        if "error" in event:
            self.errors.append(event["error"])
            return True
        for choice in event.get("choices", ()):
            logprobs = choice.get("logprobs") or {}
            self.tokens.extend(token_ids(logprobs.get("tokens") or ()))
        return True

    def next_tokens(self, n) -> list[int]:
        want = len(self.tokens) + n
        while len(self.tokens) < want and self._read_event():
            pass
        return self.tokens

    def finish(self) -> list[int]:
        while self._read_event():
            pass
        self.conn.close()
        return self.tokens
