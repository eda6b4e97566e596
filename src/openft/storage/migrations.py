"""Ordered, named schema migrations (``m00N_...``), recorded in ``_openft_migrations``.

Every database, fresh or old, is built by running the migrations it has not seen, in order.
Each migration is frozen: it spells out its own tables and statements instead of reading
``tables.py``, so changing a model never changes what an old migration does. A schema-drift
test builds a database from these migrations and compares it with the ORM, so a model change
without its migration fails CI.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

Migration = Callable[[Connection], None]


def m001_initial(conn: Connection) -> None:
    """Projects, API keys, files, jobs, events, checkpoints and fine-tuned models."""
    md = MetaData()
    Table(
        "projects",
        md,
        Column("id", String(64), primary_key=True),
        Column("name", String(255), nullable=False),
        Column("created_at", BigInteger, nullable=False),
        UniqueConstraint("name"),
    )
    Table(
        "api_keys",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
        Column("key_hash", String(64), nullable=False),
        Column("prefix", String(32), nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("revoked", Boolean, nullable=False),
        UniqueConstraint("key_hash"),
        Index("ix_api_keys_project_id", "project_id"),
    )
    Table(
        "files",
        md,
        Column("id", String(64), primary_key=True),
        Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
        Column("filename", String(1024), nullable=False),
        Column("purpose", String(32), nullable=False),
        Column("bytes", BigInteger, nullable=False),
        Column("sha256", String(64), nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("created_ns", BigInteger, nullable=False),
        Column("expires_at", BigInteger),
        Column("deleted", Boolean, nullable=False),
        Index("ix_files_project_id", "project_id"),
        Index("ix_files_created_ns", "created_ns"),
    )
    Table(
        "jobs",
        md,
        Column("id", String(64), primary_key=True),
        Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
        Column("model", String(512), nullable=False),
        Column("base_model", String(512), nullable=False),
        Column("init_model", String(512)),
        Column("training_file", String(64), nullable=False),
        Column("validation_file", String(64)),
        Column("suffix", String(64)),
        Column("seed", BigInteger, nullable=False),
        Column("metadata", JSON),
        Column("integrations", JSON),
        Column("method_type", String(16), nullable=False),
        Column("hyperparameters", JSON, nullable=False),
        Column("options", JSON, nullable=False),
        Column("status", String(32), nullable=False),
        Column("error", JSON),
        Column("fine_tuned_model", String(512)),
        Column("result_files", JSON, nullable=False),
        Column("trained_tokens", BigInteger),
        Column("created_at", BigInteger, nullable=False),
        Column("created_ns", BigInteger, nullable=False),
        Column("started_at", BigInteger),
        Column("finished_at", BigInteger),
        Column("estimated_finish", BigInteger),
        Column("worker_id", String(128)),
        Column("lease_expires_at", Float),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_created_ns", "created_ns"),
        Index("ix_jobs_claim", "status", "created_ns"),
        Index("ix_jobs_project_id", "project_id"),
    )
    Table(
        "checkpoints",
        md,
        Column("id", String(64), primary_key=True),
        Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("step_number", Integer, nullable=False),
        Column("metrics", JSON, nullable=False),
        Column("model_name", String(512), nullable=False),
        Index("ix_checkpoints_job_id", "job_id"),
    )
    Table(
        "events",
        md,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(64), nullable=False),
        Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
        Column("created_at", BigInteger, nullable=False),
        Column("level", String(8), nullable=False),
        Column("message", Text, nullable=False),
        Column("type", String(16), nullable=False),
        Column("data", JSON),
        UniqueConstraint("id"),
        Index("ix_events_job_id", "job_id"),
        Index("ix_events_job_seq", "job_id", "seq"),
    )
    Table(
        "fine_tuned_models",
        md,
        Column("id", String(512), primary_key=True),
        Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
        Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
        Column("base_model", String(512), nullable=False),
        Column("weights", String(64), nullable=False),
        Column("checkpoint_id", String(64)),
        Column("created_at", BigInteger, nullable=False),
        Column("deleted", Boolean, nullable=False),
        Index("ix_fine_tuned_models_project_id", "project_id"),
        Index("ix_fine_tuned_models_job_id", "job_id"),
    )
    md.create_all(conn)


def m002_step_metrics(conn: Connection) -> None:
    """Per-step metrics in the database, so results survive pause/resume and worker restarts."""
    md = MetaData()
    Table("jobs", md, Column("id", String(64), primary_key=True))  # the referenced table, as it is
    step_metrics = Table(
        "step_metrics",
        md,
        Column("job_id", String(64), ForeignKey("jobs.id"), primary_key=True),
        Column("step", Integer, primary_key=True, autoincrement=False),
        Column("data", JSON, nullable=False),
    )
    step_metrics.create(conn, checkfirst=True)


def m003_event_dedup_key(conn: Connection) -> None:
    """Events that must appear once per job (a step's metrics, the validation report, start-up
    lines) carry a key; a unique (job, key) index makes recording them again after a resume a
    no-op. Events without a key (NULL) are not constrained: NULLs never collide in a unique
    index on SQLite or PostgreSQL."""
    conn.execute(text("ALTER TABLE events ADD COLUMN dedup_key VARCHAR(128)"))
    conn.execute(text("CREATE UNIQUE INDEX ux_events_job_dedup_key ON events (job_id, dedup_key)"))


MIGRATIONS: list[tuple[str, Migration]] = [
    ("m001_initial", m001_initial),
    ("m002_step_metrics", m002_step_metrics),
    ("m003_event_dedup_key", m003_event_dedup_key),
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
        applied: list[str] = []
        for name, fn in MIGRATIONS:
            if name in done:
                continue
            fn(conn)
            conn.execute(
                text("INSERT INTO _openft_migrations (name, applied_at) VALUES (:n, :t)"),
                {"n": name, "t": int(time.time())},
            )
            applied.append(name)
        return applied
