"""Shared fixtures: a real S3-protocol server (moto's server mode) on 127.0.0.1, and a local
Ray cluster for the end-to-end tests."""

import logging
import os

import pytest

def _restore_env(old: dict) -> None:
    """Put back the variables a fixture set (``old``: name -> value before, None if unset)."""
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# Environment of the end-to-end Ray tests (the driver's and, inherited, the workers').
RAY_ENV = {
    # A hang becomes an error; generous, since a loaded 2-core machine stalls reads for tens of seconds.
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "180",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "DS_ACCELERATOR": "cpu",
}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray with 2 CPUs for one test module, with :data:`RAY_ENV` set meanwhile. Ray's
    socket paths must stay under 108 bytes: ``RAY_TMPDIR`` is kept when set (give a short one),
    else a pytest temporary directory."""
    import ray

    old = {k: os.environ.get(k) for k in [*RAY_ENV, "RAY_TMPDIR"]}
    os.environ.update(RAY_ENV)
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    ray.init(address="local", num_cpus=2, logging_level=logging.WARNING, include_dashboard=False)
    yield
    ray.shutdown()
    _restore_env(old)


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
    _restore_env(old)
