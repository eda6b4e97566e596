"""Content-addressed blobs (sha256 -> bytes), for uploads, images and model weights.

Two stores behind one interface (:class:`BlobStore`):

- :class:`LocalBlobStore` (the embedded default) keeps blobs on disk at ``<root>/<aa>/<bb>/<sha256>``.
- :class:`S3BlobStore` (``OPENFT_BLOB_URL=s3://bucket/prefix``) keeps them in any S3-compatible
  object store (AWS, MinIO, R2, ...), so workers and API servers on several machines share
  them; each process keeps a local cache of what it reads (training files, model weights).

Either way a write goes to a local temp file while it is hashed and is then filed under its
hash in one step (rename, or one upload), so a crash never leaves a half-written blob under
its final name, and the same content uploaded twice is stored once. A stored directory (model
weights) is a JSON manifest blob naming its files' blobs; ``materialize_dir`` recreates it as
a folder for loaders that want one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from openft.errors import PayloadTooLarge

if TYPE_CHECKING:
    from openft.settings import Settings

CHUNK = 1024 * 1024


class BlobStore(Protocol):
    def writer(self, *, max_bytes: int | None = None) -> BlobWriter: ...
    def put_stream(self, src: BinaryIO, *, max_bytes: int | None = None) -> tuple[str, int]: ...
    def put_bytes(self, data: bytes) -> str: ...
    def exists(self, key: str) -> bool: ...
    def open(self, key: str) -> Any: ...  # a context manager yielding a binary file
    def read_bytes(self, key: str) -> bytes: ...
    def put_dir(self, directory: Path) -> str: ...
    def materialize_dir(self, key: str) -> Path: ...
    def dir_members(self, key: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a blob key: {key!r}")
    return f"{key[:2]}/{key[2:4]}/{key}"


class _ContentAddressed(ABC):
    """What both stores share: hashing writes, stored directories, their materialization.
    A store says where bytes live through ``_commit``, ``_place``, ``exists``, ``open`` and
    ``_remove``."""

    tmp_dir: Path
    dir_cache: Path

    def writer(self, *, max_bytes: int | None = None) -> BlobWriter:
        """A blob written piece by piece (e.g. as an upload arrives); see :class:`BlobWriter`."""
        return BlobWriter(self, max_bytes=max_bytes)

    def put_stream(self, src: BinaryIO, *, max_bytes: int | None = None) -> tuple[str, int]:
        """Copy ``src`` in chunks while hashing; refuses (413) past ``max_bytes`` without keeping anything."""
        with self.writer(max_bytes=max_bytes) as w:
            while chunk := src.read(CHUNK):
                w.write(chunk)
            return w.commit()

    def put_bytes(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        if not self.exists(key):
            with self.writer() as w:
                w.write(data)
                w.commit()
        return key

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def put_dir(self, directory: Path) -> str:
        """Store every file of a directory as a blob, plus a JSON manifest blob; returns the manifest key."""
        manifest: dict[str, str] = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                key, _ = self.put_stream(f)
            manifest[path.relative_to(directory).as_posix()] = key
        return self.put_bytes(json.dumps({"files": manifest}, sort_keys=True).encode())

    def dir_members(self, key: str) -> list[str]:
        """Blob keys of the files of a stored directory (not the manifest itself)."""
        return list(json.loads(self.read_bytes(key))["files"].values())

    def delete(self, key: str) -> None:
        """Remove a blob (and a directory materialized from it). Callers decide what is
        unreferenced (see ``repo.delete_unreferenced``)."""
        self._remove(key)
        shutil.rmtree(self.dir_cache / key, ignore_errors=True)

    def materialize_dir(self, key: str) -> Path:
        """Recreate a stored directory under the cache; idempotent.

        Built in a temp folder beside ``dest`` (same filesystem, so the final rename is atomic
        whatever ``TMPDIR`` is) and renamed into place; of racing processes, the first wins.
        """
        dest = self.dir_cache / key
        if (dest / ".complete").exists():
            return dest
        manifest = json.loads(self.read_bytes(key))["files"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".mat-"))
        for rel, blob in manifest.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._place(blob, target)
        (tmp / ".complete").touch()
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (dest / ".complete").exists():  # not "another process got there first"
                raise
        return dest

    # What each store provides.
    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def open(self, key: str) -> Any:
        """A context manager yielding the blob as a binary file."""

    @abstractmethod
    def _commit(self, tmp: Path, key: str) -> None:
        """File the finished temp file ``tmp`` under ``key`` (it may already be there)."""

    @abstractmethod
    def _place(self, key: str, target: Path) -> None:
        """Put blob ``key``'s bytes at ``target`` (a path inside the cache)."""

    @abstractmethod
    def _remove(self, key: str) -> None: ...


class LocalBlobStore(_ContentAddressed):
    def __init__(self, root: Path, *, dir_cache: Path | None = None) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Stored directories (model weights) are recreated here for loaders that want a folder.
        self.dir_cache = dir_cache or root.parent / "cache" / "weights"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        with open(self._path(key), "rb") as f:
            yield f

    def _commit(self, tmp: Path, key: str) -> None:
        final = self._path(key)
        if final.exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)  # blobs are immutable; materialized dirs hard-link to them
        os.replace(tmp, final)

    def _place(self, key: str, target: Path) -> None:
        try:
            os.link(self._path(key), target)
        except OSError:
            shutil.copyfile(self._path(key), target)

    def _remove(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3BlobStore(_ContentAddressed):
    """Blobs as objects ``<prefix>/<aa>/<bb>/<sha256>`` in an S3-compatible bucket.

    The client is boto3's, configured by the standard AWS environment (``AWS_ENDPOINT_URL``
    for MinIO/R2/..., ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``);
    its transfer manager streams large objects in parts both ways. Reads go through a local
    cache under ``cache`` (immutable content, so a cached copy never goes stale).
    """

    def __init__(self, url: str, *, cache: Path, client: Any = None) -> None:
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.cache = cache
        self.tmp_dir = cache / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.dir_cache = cache / "weights"
        if client is None:
            import boto3  # the optional 's3' extra; imported only when S3 is configured

            client = boto3.client("s3")
        self._s3 = client

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)

    def _local(self, key: str) -> Path:
        return self.cache / "objects" / _check_key(key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._object(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        local = self._local(key)
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tmp_dir)
            os.close(fd)
            try:
                self._s3.download_file(self.bucket, self._object(key), name)
                os.replace(name, local)
            finally:
                Path(name).unlink(missing_ok=True)
        with open(local, "rb") as f:
            yield f

    def _commit(self, tmp: Path, key: str) -> None:
        if not self.exists(key):
            self._s3.upload_file(str(tmp), self.bucket, self._object(key))

    def _place(self, key: str, target: Path) -> None:
        with self.open(key):  # fills the local cache
            pass
        try:
            os.link(self._local(key), target)
        except OSError:
            shutil.copyfile(self._local(key), target)

    def _remove(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._object(key))
        self._local(key).unlink(missing_ok=True)


def open_blob_store(settings: Settings) -> LocalBlobStore | S3BlobStore:
    """The store a process uses: ``OPENFT_BLOB_URL`` if set (S3), else ``$OPENFT_HOME/blobs``."""
    if settings.blob_url:
        return S3BlobStore(settings.blob_url, cache=settings.resolved_home / "cache")
    return LocalBlobStore(settings.blob_dir)


class BlobWriter:
    """Bytes written in pieces to a temp file while hashing; ``commit()`` files them under their
    sha256. Past ``max_bytes`` a write raises 413 and nothing is kept; leaving the ``with``
    block without ``commit()`` (an error, a client gone) removes the temp file."""

    def __init__(self, store: _ContentAddressed, *, max_bytes: int | None) -> None:
        self._store, self.max_bytes = store, max_bytes
        self._digest = hashlib.sha256()
        self.size = 0
        fd, name = tempfile.mkstemp(dir=store.tmp_dir)
        self._tmp = Path(name)
        self._out = os.fdopen(fd, "wb")

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._out.close()
        self._tmp.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise PayloadTooLarge(
                f"File is larger than the {self.max_bytes}-byte upload limit; split it or raise "
                "OPENFT_MAX_UPLOAD_BYTES.",
                param="file",
            )
        self._digest.update(data)
        self._out.write(data)

    def commit(self) -> tuple[str, int]:
        """Store the bytes written so far; returns (sha256 key, size)."""
        self._out.close()
        key = self._digest.hexdigest()
        self._store._commit(self._tmp, key)
        return key, self.size
