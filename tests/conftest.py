"""Shared pytest configuration: hypothesis profiles (HYPOTHESIS_PROFILE=default|ci|nightly), and the local S3
server of the S3 backend's tests (``s3_server``, ``s3_url``)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=50, deadline=None)
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("nightly", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# ----------------------------------------------------------------------------- S3 (moto on loopback)

_S3_MISSING = ("needs {pkg} for the S3 backend's tests against a local S3 server: "
               "pip install 'msa-memory[test]' (make test installs it)")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in a child process on 127.0.0.1 (``msa_memory.testing.s3_server``), for the whole
    session; the AWS_* variables that point clients (and child processes) at it are set meanwhile."""
    pytest.importorskip("moto", reason=_S3_MISSING.format(pkg="moto[server]"))
    pytest.importorskip("flask", reason=_S3_MISSING.format(pkg="moto[server]"))
    pytest.importorskip("obstore", reason=_S3_MISSING.format(pkg="obstore"))
    from msa_memory.testing.s3_server import S3Server

    srv = S3Server()
    try:
        with srv.environment():
            yield srv
    finally:
        srv.stop()


@pytest.fixture
def s3_url(s3_server) -> str:
    """``s3://BUCKET/store`` on a fresh bucket of the session's server."""
    return f"s3://{s3_server.create_bucket()}/store"
