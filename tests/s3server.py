"""A real S3-compatible HTTP server (moto) on 127.0.0.1 for the tests, and helpers to fill it.

Import the `s3_server` fixture from tests/conftest.py; it starts once per session on a free port.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def dataset_fields(self, bucket: str, prefix: str = "") -> dict:
        """The aws_* fields of a DatasetConfig pointing at `bucket` on this server."""
        return {"type": "aws", "aws_bucket_name": bucket, "aws_data_prefix": prefix,
                "aws_endpoint_url": self.endpoint, "aws_region_name": REGION,
                "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                                 client_kwargs={"region_name": REGION}, skip_instance_cache=True)

    def make_bucket(self, name: str) -> None:
        self.filesystem().call_s3("create_bucket", Bucket=name)

    def put(self, bucket: str, files: dict[str, bytes]) -> None:
        fs = self.filesystem()
        for key, data in files.items():
            fs.pipe_file(f"{bucket}/{key}", data)


@pytest.fixture(scope="session")
def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines in test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
