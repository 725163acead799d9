"""A real S3-compatible server on loopback, started and stopped by tests.

moto's standalone server runs in its own process (as a real endpoint would: nothing of it is imported
here, and its Flask globals stay out of the test process, where vLLM's kernel rebinding trips over
them). Each S3Server puts a small TCP relay of its own port in front of it: stop() closes the relay and
cuts every open connection, which clients see as the server going down, and start() brings it back on
the same port with the buckets intact, because the moto process holding them never stopped."""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

KEY, SECRET, REGION = "loraplex-test-key", "loraplex-test-secret", "us-east-1"

_backend = {"proc": None, "port": None}
_backend_lock = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _moto_port() -> int:
    """One moto process for the whole test session (buckets are per test, so sharing it is safe)."""
    with _backend_lock:
        proc = _backend["proc"]
        if proc is None or proc.poll() is not None:
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            _backend.update(proc=proc, port=port)
            atexit.register(_stop_backend)
            _wait_listening(port)
        return _backend["port"]


def _stop_backend() -> None:
    proc = _backend["proc"]
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class S3Server:
    """The S3 endpoint tests talk to: http://127.0.0.1:<port>, up between start() and stop()."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> S3Server:
        backend = _moto_port()
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst, backend), daemon=True).start()
        _wait_listening(self.port)
        return self

    def stop(self) -> None:
        """The endpoint goes down: no new connections, and the open ones are cut."""
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, lst, backend):
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(("127.0.0.1", backend), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not lst:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET)

    def storage_options(self) -> dict:
        """s3fs options for this server; one attempt per request so a stopped server fails fast."""
        return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION},
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}


def upload_dir(client, bucket: str, prefix: str, local_dir) -> None:
    """Upload every file under local_dir to s3://bucket/prefix/<relative path>."""
    local_dir = os.fspath(local_dir)
    for dirpath, _, files in os.walk(local_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as fh:
                client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}".lstrip("/"), Body=fh.read())
