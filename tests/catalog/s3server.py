"""A real S3-compatible server (moto's standalone server) on loopback, started and stopped by tests."""

from __future__ import annotations

import logging
import os
import socket
import time

KEY, SECRET, REGION = "loraplex-test-key", "loraplex-test-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's threaded server on one fixed port, so that a restart comes back at the same endpoint.
    Its buckets live in the process's moto backend, so they survive stop() / start()."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        deadline = time.monotonic() + 10
        while True:  # serving once it accepts connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

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
