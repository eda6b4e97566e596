"""Content-addressed blobs (sha256 -> bytes), for uploads, images and model weights.

``BlobStore`` is the small interface an S3-compatible store can implement later; ``LocalBlobStore``
keeps blobs on disk at ``<root>/<aa>/<bb>/<sha256>``. Writes go to a temp file and are renamed
into place, so a crash never leaves a half-written blob under its final name, and the same
content uploaded twice is stored once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from openft.errors import PayloadTooLarge

CHUNK = 1024 * 1024


class BlobStore(Protocol):
    def writer(self, *, max_bytes: int | None = None) -> BlobWriter: ...
    def put_stream(self, src: BinaryIO, *, max_bytes: int | None = None) -> tuple[str, int]: ...
    def put_bytes(self, data: bytes) -> str: ...
    def exists(self, key: str) -> bool: ...
    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]: ...
    def read_bytes(self, key: str) -> bytes: ...
    def put_dir(self, directory: Path) -> str: ...
    def materialize_dir(self, key: str) -> Path: ...
    def dir_members(self, key: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


class LocalBlobStore:
    def __init__(self, root: Path, *, dir_cache: Path | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        # Stored directories (model weights) are recreated here for loaders that want a folder.
        self.dir_cache = dir_cache or root.parent / "cache" / "weights"

    def _path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:4] / key

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
            fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            self._commit(Path(tmp_name), key)
        return key

    def _commit(self, tmp: Path, key: str) -> None:
        final = self._path(key)
        if final.exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)  # blobs are immutable; materialized dirs hard-link to them
        os.replace(tmp, final)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        with open(self._path(key), "rb") as f:
            yield f

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

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
        self._path(key).unlink(missing_ok=True)
        shutil.rmtree(self.dir_cache / key, ignore_errors=True)

    def materialize_dir(self, key: str) -> Path:
        """Recreate a stored directory under the cache (hard links where possible); idempotent.

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
            try:
                os.link(self._path(blob), target)
            except OSError:
                shutil.copyfile(self._path(blob), target)
        (tmp / ".complete").touch()
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (dest / ".complete").exists():  # not "another process got there first"
                raise
        return dest


class BlobWriter:
    """Bytes written in pieces to a temp file while hashing; ``commit()`` files them under their
    sha256. Past ``max_bytes`` a write raises 413 and nothing is kept; leaving the ``with``
    block without ``commit()`` (an error, a client gone) removes the temp file."""

    def __init__(self, store: LocalBlobStore, *, max_bytes: int | None) -> None:
        self._store, self.max_bytes = store, max_bytes
        self._digest = hashlib.sha256()
        self.size = 0
        fd, name = tempfile.mkstemp(dir=store.root / "tmp")
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
