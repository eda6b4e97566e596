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

    def put_stream(self, src: BinaryIO, *, max_bytes: int | None = None) -> tuple[str, int]:
        """Copy ``src`` in chunks while hashing; refuses (413) past ``max_bytes`` without keeping anything."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(
                            f"File is larger than the {max_bytes}-byte upload limit; split it or raise "
                            "OPENFT_MAX_UPLOAD_BYTES.",
                            param="file",
                        )
                    digest.update(chunk)
                    out.write(chunk)
            key = digest.hexdigest()
            self._commit(Path(tmp_name), key)
            return key, size
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

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
        """Recreate a stored directory under the cache (hard links where possible); idempotent."""
        dest = self.dir_cache / key
        if (dest / ".complete").exists():
            return dest
        manifest = json.loads(self.read_bytes(key))["files"]
        tmp = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None, prefix=".mat-"))
        dest.parent.mkdir(parents=True, exist_ok=True)
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
        except OSError:  # another process materialized it first
            shutil.rmtree(tmp, ignore_errors=True)
        return dest
