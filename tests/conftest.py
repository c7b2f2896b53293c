"""Shared fixtures: a real S3-protocol server (moto's server mode) on 127.0.0.1."""

import os

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on a free local port for the whole session, with ``AWS_*`` and
    ``AWS_ENDPOINT_URL`` set in this process (subprocesses and the Ray workers it starts inherit
    them). Yields a function that creates a fresh bucket and returns its name."""
    import itertools

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    counter = itertools.count()

    def bucket() -> str:
        name = f"conure-test-{next(counter)}"
        client.create_bucket(Bucket=name)
        return name

    bucket.endpoint = endpoint
    bucket.client = client
    yield bucket
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
