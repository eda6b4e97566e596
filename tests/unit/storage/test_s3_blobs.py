"""The S3 blob store against a real S3-compatible HTTP server (moto): the same contract as the local one."""

from __future__ import annotations

import io
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from openft.errors import PayloadTooLarge
from openft.storage.blobs import S3BlobStore
from tests.s3 import make_bucket


@pytest.fixture
def store(s3_env, tmp_path, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_env, bucket)
    return S3BlobStore(f"s3://{bucket}/openft/blobs", cache=tmp_path / "cache")


def objects(store: S3BlobStore) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=store.bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_blobs_are_content_addressed_objects_under_the_prefix(store):
    k1, n1 = store.put_stream(io.BytesIO(b"hello"))
    k2 = store.put_bytes(b"hello")
    assert k1 == k2 and n1 == 5 and store.read_bytes(k1) == b"hello"
    assert objects(store) == [f"openft/blobs/{k1[:2]}/{k1[2:4]}/{k1}"]
    with pytest.raises(PayloadTooLarge):
        store.put_stream(io.BytesIO(b"x" * 100), max_bytes=10)
    assert len(objects(store)) == 1 and list(store.tmp_dir.iterdir()) == []


def test_a_second_process_reads_what_the_first_stored(store, tmp_path):
    """Another machine: same bucket, its own empty cache."""
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "sub" / "config.json").write_text('{"r": 8}')
    key = store.put_dir(src)
    other = S3BlobStore(f"s3://{store.bucket}/openft/blobs", cache=tmp_path / "other-cache")
    out = other.materialize_dir(key)
    assert (out / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert (out / "sub" / "config.json").read_text() == '{"r": 8}'
    assert other.materialize_dir(key) == out


def test_delete_removes_the_object_and_the_cached_copy(store, tmp_path):
    key = store.put_bytes(b"gone soon")
    assert store.read_bytes(key) == b"gone soon"  # now cached locally too
    store.delete(key)
    assert not store.exists(key) and objects(store) == []
    other = S3BlobStore(f"s3://{store.bucket}/openft/blobs", cache=tmp_path / "c2")
    with pytest.raises(ClientError):
        other.read_bytes(key)
