"""Open an openft home (``OPENFT_HOME``): the one place that turns ``Settings`` into a migrated
database and a blob store, for the API, the worker and the CLI alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from openft.settings import Settings
from openft.storage.blobs import BlobStore, open_blob_store
from openft.storage.db import Database
from openft.storage.migrations import migrate

log = logging.getLogger("openft.storage")


@dataclass(frozen=True)
class Home:
    settings: Settings
    db: Database
    blobs: BlobStore


def open_home(settings: Settings, *, pool_size: int = 5) -> Home:
    """Create the home folder, bring the schema up to date and open the blob store
    (``OPENFT_BLOB_URL`` if set, else the home's ``blobs`` folder).
    ``pool_size``: database connections this process may hold at once (see ``make_engine``)."""
    settings.resolved_home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url, pool_size=pool_size)
    applied = migrate(db.engine)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return Home(settings=settings, db=db, blobs=open_blob_store(settings))
