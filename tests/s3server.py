"""A real S3-compatible server on loopback (moto's standalone server, in its own process), for tests and the
benchmark. Nothing here can reach AWS: the endpoint is loopback and the credentials are fake sentinels."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

FAKE_KEY_ID = "AKIAFAKESENTINEL4242"
FAKE_SECRET = "fake-secret-SENTINEL-9d2c7e11"

__all__ = ["FAKE_KEY_ID", "FAKE_SECRET", "local_server", "s3_environment", "s3_server"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def local_server(command: Callable[[int], list[str]], what: str) -> Iterator[int]:
    """Start command(port) on a free loopback port, wait until it accepts connections; yields the port and
    stops the process on exit. The tests' storage servers (moto, fake-gcs-server) start so."""
    port = _free_port()
    process = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{what} did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def s3_server() -> Iterator[str]:
    """Start ``python -m moto.server`` on a free loopback port; yields its endpoint URL."""

    def moto(port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    with local_server(moto, "the moto S3 server") as port:
        yield f"http://127.0.0.1:{port}"


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point boto3 at the loopback server with fake credentials, and nowhere else."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
