"""Engine and sessions. SQLite (WAL) under $OPENFT_HOME by default; any SQLAlchemy URL works.

Two kinds of session, because SQLite needs to know up front whether a transaction will write:

- ``db.session()`` (the default, for anything that may write) starts SQLite transactions with
  ``BEGIN IMMEDIATE``: the write lock is taken at the start, so a read-then-write transaction
  (auth, then insert; select candidates, then claim) waits its turn through ``busy_timeout``
  instead of failing at once with "database is locked" when another writer committed between
  its read and its write (a deferred transaction cannot upgrade past a newer snapshot).
- ``db.session(readonly=True)`` starts a plain deferred transaction: WAL readers never wait
  for writers, so GET requests stay concurrent.

On PostgreSQL both are ordinary READ COMMITTED transactions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_BEGIN = "openft_sqlite_begin"
"""Execution option naming the SQLite BEGIN mode (DEFERRED or IMMEDIATE) of a transaction."""

BUSY_TIMEOUT_S = 30
"""How long a SQLite writer waits for the lock before giving up (then the API answers 503)."""


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """``pool_size`` bounds the connections this process holds; callers size it to the number
    of sessions they can have open at once (the API: its request threads), so no session ever
    waits on the pool."""
    if url.startswith("sqlite"):
        # Workers and the API are separate threads/processes on one file: WAL lets readers
        # run beside the writer, and busy_timeout turns lock contention into a short wait.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
            pool_size=pool_size,
            max_overflow=0,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # The driver must not open transactions itself: we emit BEGIN (below) so we can
            # choose IMMEDIATE for writers (SQLAlchemy's documented pysqlite recipe).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:  # type: ignore[no-untyped-def]
            conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get(_BEGIN, 'IMMEDIATE')}")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=0)


class Database:
    """One engine plus a session factory; ``with db.session() as s`` commits on success."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        self._read_factory = sessionmaker(
            self.engine.execution_options(**{_BEGIN: "DEFERRED"}), expire_on_commit=False
        )

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """A transaction that commits when the block ends (rolls back on error).

        ``readonly`` sessions may still write on PostgreSQL, but on SQLite a write in one may
        fail with "database is locked" under contention: use them only for reads.
        """
        with (self._read_factory if readonly else self._factory).begin() as s:
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
