"""Ordered, named schema migrations (``m00N_...``), recorded in ``_openft_migrations``.

A fresh database gets the current schema from ``tables.py`` in one step and every migration
marked as applied; an existing one runs the migrations it has not seen, in order. So a
migration only ever has to move a database from the previous version to its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, inspect, text

from openft.storage.tables import Base, StepMetric

Migration = Callable[[Connection], None]


def m001_initial(conn: Connection) -> None:
    """Projects, API keys, files, jobs, events, checkpoints and fine-tuned models."""
    Base.metadata.create_all(
        conn, tables=[t for t in Base.metadata.sorted_tables if t.name != "step_metrics"]
    )


def m002_step_metrics(conn: Connection) -> None:
    """Per-step metrics in the database, so results survive pause/resume and worker restarts."""
    StepMetric.__table__.create(conn, checkfirst=True)


MIGRATIONS: list[tuple[str, Migration]] = [
    ("m001_initial", m001_initial),
    ("m002_step_metrics", m002_step_metrics),
]


def migrate(engine: Engine) -> list[str]:
    """Bring the schema up to date; returns the names of migrations applied now."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS _openft_migrations (name VARCHAR(128) PRIMARY KEY, applied_at BIGINT)"
            )
        )
        done = {row[0] for row in conn.execute(text("SELECT name FROM _openft_migrations"))}
        fresh = not done and not inspect(conn).has_table("jobs")
        applied: list[str] = []
        if fresh:
            Base.metadata.create_all(conn)
        for name, fn in MIGRATIONS:
            if name in done:
                continue
            if not fresh:
                fn(conn)
            conn.execute(
                text("INSERT INTO _openft_migrations (name, applied_at) VALUES (:n, :t)"),
                {"n": name, "t": int(time.time())},
            )
            applied.append(name)
        return applied
