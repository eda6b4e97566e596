"""A throwaway S3-compatible server for tests: moto's server mode as a real HTTP process on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

# moto accepts any credentials; these make boto3 sign requests without touching ~/.aws.
ENV = {
    "AWS_ACCESS_KEY_ID": "openft-test",
    "AWS_SECRET_ACCESS_KEY": "openft-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server(port: int) -> Iterator[dict[str, str]]:
    """Start ``moto.server`` on 127.0.0.1:``port``; yields the AWS_* environment that points at it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # readiness by polling
            if proc.poll() is not None:
                raise RuntimeError("moto server exited early")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield {**ENV, "AWS_ENDPOINT_URL": url}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_bucket(env: dict[str, str], name: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=name)
