"""Process plumbing for bench/serve.py: a vLLM server in its own process group on 127.0.0.1, bounded
waits for it to come up and go away, tiny HTTP helpers, and a bounded client run.

Every server gets a new session (start_new_session), so that killpg reaches the API server, the
engine core and the workers it forks; every live group is also killed at exit and on SIGTERM/SIGINT,
so that an interrupted benchmark never leaves servers holding the machine's two cores.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

_LIVE: set[int] = set()  # process-group ids of servers and clients not yet reaped


def free_port() -> int:
    """A port the OS says is free on loopback now (vLLM binds it a few seconds later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def http_text(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def kill_group(pgid: int, grace: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the group, SIGKILL whatever is left after `grace` s; returns once the group is gone
    (or after a further 10 s: a process stuck in the kernel is not worth waiting for). `proc`, the
    group leader if it is our child, is reaped on the way: a zombie leader keeps the group alive."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if proc is not None:
                proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                _LIVE.discard(pgid)
                return
            time.sleep(0.2)
    _LIVE.discard(pgid)


def kill_all() -> None:
    for pgid in list(_LIVE):
        kill_group(pgid, grace=5.0)


def _on_signal(signum, frame):
    kill_all()
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Kill every live group at interpreter exit and on SIGTERM / SIGINT (call once from main)."""
    atexit.register(kill_all)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def spawn(argv, env, log_path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after this returns
    p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    log.close()
    _LIVE.add(p.pid)  # new session: the pid is the process-group id
    return p


def run_bounded(argv, env, log_path, timeout: float) -> int:
    """Run a command in its own group, kill the group when it outlives `timeout`; its exit status
    (-9 when killed)."""
    p = spawn(argv, env, log_path)
    try:
        return p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        kill_group(p.pid, grace=2.0, proc=p)
        return -9
    finally:
        kill_group(p.pid, grace=2.0, proc=p)  # helpers it may have left behind


class Server:
    """One vLLM OpenAI server: `start()` returns once /v1/models answers, or raises."""

    def __init__(self, argv, env, log_path, port):
        self.argv, self.env, self.log_path, self.port = argv, env, log_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s = None

    def start(self, timeout: float) -> None:
        t0 = time.monotonic()
        self.proc = spawn(self.argv, self.env, self.log_path)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup: {self.log_tail()}")
            try:
                http_json(self.url + "/v1/models", timeout=5)
                self.startup_s = time.monotonic() - t0
                return
            except OSError:
                time.sleep(1.0)
        raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")

    def complete(self, model: str, max_tokens: int = 4, timeout: float = 120.0) -> dict:
        return http_json(self.url + "/v1/completions", {"model": model, "prompt": "the quick brown fox",
                                                         "max_tokens": max_tokens, "temperature": 0}, timeout)

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc.pid, proc=self.proc)
            self.proc = None


def uptime() -> str:
    """`uptime`'s line (load averages of everyone on the machine), for the result file."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
