"""Shared test fixtures."""

from s3server import s3_server  # noqa: F401  (a moto S3 server on 127.0.0.1, session-scoped)
