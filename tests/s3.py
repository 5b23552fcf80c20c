"""A loopback S3 server for tests: moto's S3 backend served on 127.0.0.1, and one fresh bucket per test.

The endpoint and fake credentials are put into the environment when this module is imported (conftest imports
it before anything starts Ray), because Ray workers take their environment from the local Ray instance, which
copies the driver's at `ray.init`: set later, a Ray Data read task would not see them. The port is chosen at
import and the server started on it only when a test asks for `s3_server`, so sessions without S3 tests pay
nothing. pyarrow (26) honours `AWS_ENDPOINT_URL` in `FileSystem.from_uri("s3://…")`, which is what our readers
and Ray Data use, so plain `s3://bucket/key` URIs reach the loopback server without any `?endpoint_override`.

Usage: `def test_x(s3_bucket): s3_bucket.put("corpus/a.jsonl", data); path = s3_bucket.uri("corpus/*.jsonl")`.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_HOST = "127.0.0.1"
S3_PORT = _free_port()
S3_ENDPOINT = f"http://{S3_HOST}:{S3_PORT}"


def configure_environment(run_dir: str) -> None:
    """Every AWS client in this process and its children (Ray workers) talks to the loopback server with fake
    credentials; nothing is read from ~/.aws and no instance-metadata lookup is tried."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        os.environ.pop(var, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=S3_ENDPOINT,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.path.join(run_dir, "aws", "config"),  # absent files: no user profile leaks in
        AWS_SHARED_CREDENTIALS_FILE=os.path.join(run_dir, "aws", "credentials"),
    )


@dataclass
class S3Bucket:
    """One bucket on the loopback server; `fs` is a pyarrow S3 filesystem rooted at the server."""

    name: str
    fs: object

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes | str) -> str:
        """Write an object; returns its s3:// URI."""
        with self.fs.open_output_stream(f"{self.name}/{key}") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        return self.uri(key)

    def upload(self, local: Path, key: str) -> str:
        return self.put(key, Path(local).read_bytes())


@pytest.fixture(scope="session")
def s3_server():
    """The loopback S3 endpoint (started once per session, on the port the environment already names)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address=S3_HOST, port=S3_PORT, verbose=False)
    server.start()
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> S3Bucket:
    """A fresh, empty bucket for one test."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key="testing", secret_key="testing", region="us-east-1", endpoint_override=s3_server,
        allow_bucket_creation=True, allow_bucket_deletion=True,
    )
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.create_dir(name)
    yield S3Bucket(name, fs)
    fs.delete_dir(name)
