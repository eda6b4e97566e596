"""Storage: migrations, atomic job claims, leases, blobs."""

from __future__ import annotations

import io
import tempfile
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from openft.errors import PayloadTooLarge
from openft.storage import repo
from openft.storage.blobs import LocalBlobStore
from openft.storage.db import Database
from openft.storage.migrations import MIGRATIONS, migrate


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """The same repository behaviour on both supported databases."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database(url)
    if request.param == "postgresql":  # one cluster per session: start each test on an empty schema
        with database.engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    migrate(database.engine)
    yield database
    database.dispose()


def _job(db: Database, project: str = "p") -> str:
    with db.session() as s:
        repo.create_api_key(s, project_name=project)
        pid = s.execute(text("SELECT id FROM projects WHERE name=:n"), {"n": project}).scalar_one()
        f = repo.create_file(
            s, project_id=pid, filename="t.jsonl", purpose="fine-tune", size=1, sha256="0" * 64
        )
        job = repo.create_job(
            s,
            project_id=pid,
            model="m",
            base_model="m",
            init_model=None,
            training_file=f.id,
            validation_file=None,
            suffix=None,
            seed=1,
            job_metadata=None,
            integrations=None,
            method_type="supervised",
            hyperparameters={},
            options={},
        )
        return job.id


def test_migrations_are_recorded_and_idempotent(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'm.sqlite'}")
    assert migrate(database.engine) == [name for name, _ in MIGRATIONS]
    assert migrate(database.engine) == []
    with database.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_migrations_build_exactly_the_orm_schema(db):
    """Schema drift: the database the migrations build (fresh) is the one ``tables.py`` describes,
    on SQLite and PostgreSQL, so a model change without its migration fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from openft.storage.tables import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diff if not _is_bookkeeping(d)] == []


def _is_bookkeeping(d: object) -> bool:
    """The migrations' own record table is not an ORM model."""
    return isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "_openft_migrations"


def test_an_event_with_a_key_is_recorded_once_per_job(db):
    """What a resumed run records again (a step's metrics, start-up lines) stays one event."""
    job_id, other = _job(db), _job(db, "q")
    added = []
    for jid in (job_id, job_id, other):
        with db.session() as s:
            added.append(
                repo.append_event(s, job_id=jid, message="Step 3/9", type="metrics", once="metrics:3")
            )
    with db.session() as s:
        for _ in range(2):  # events without a key may repeat
            repo.append_event(s, job_id=job_id, message="Job resumed at step 3 of 9")
    assert added == [True, False, True]
    with db.session() as s:
        rows, _ = repo.list_events(s, job_id=job_id, limit=50, after=None)
        messages = [r.message for r in rows]
    assert messages.count("Step 3/9") == 1 and messages.count("Job resumed at step 3 of 9") == 2


def test_two_workers_never_claim_the_same_job(db):
    job_ids = {_job(db, f"p{i}") for i in range(6)}
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with db.session() as s:
                job = repo.claim_next_job(s, worker_id=name, lease_seconds=60)
            if job is None:
                return
            with lock:
                claims.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [job for _, job in claims]
    assert sorted(claimed) == sorted(job_ids)  # every job once, none twice


def test_expired_lease_is_reclaimed_and_the_old_owner_loses_it(db):
    job_id = _job(db)
    now = [1_000.0]
    clock = lambda: now[0]  # noqa: E731 - a settable clock: leases expire without sleeping
    with db.session() as s:
        assert repo.claim_next_job(s, worker_id="dead", lease_seconds=30, clock=clock).id == job_id
    now[0] += 29
    with db.session() as s:  # lease still live
        assert repo.claim_next_job(s, worker_id="other", lease_seconds=60, clock=clock) is None
    now[0] += 2
    with db.session() as s:
        assert repo.claim_next_job(s, worker_id="other", lease_seconds=60, clock=clock).id == job_id
    with db.session() as s:
        assert repo.heartbeat(s, job_id=job_id, worker_id="dead", lease_seconds=60) is None
        assert repo.heartbeat(s, job_id=job_id, worker_id="other", lease_seconds=60) == "validating_files"


def test_transition_does_not_overwrite_a_cancel(db):
    job_id = _job(db)
    with db.session() as s:
        job = repo.claim_next_job(s, worker_id="w", lease_seconds=60)
        pid = job.project_id
    with db.session() as s:
        repo.cancel_job(s, project_id=pid, job_id=job_id)
    with db.session() as s:
        assert not repo.transition(
            s, job_id=job_id, worker_id="w", frm=("validating_files", "queued", "running"), status="succeeded"
        )
    with db.session() as s:
        assert repo.get_job(s, project_id=pid, job_id=job_id).status == "cancelled"


def test_blobs_are_content_addressed_and_size_limited(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    k1, n1 = store.put_stream(io.BytesIO(b"hello"))
    k2 = store.put_bytes(b"hello")
    assert k1 == k2 and n1 == 5 and store.read_bytes(k1) == b"hello"
    with pytest.raises(PayloadTooLarge):
        store.put_stream(io.BytesIO(b"x" * 100), max_bytes=10)
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []  # nothing half-written left behind


def test_directories_round_trip(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "b.json").write_text("{}")
    key = store.put_dir(src)
    out = store.materialize_dir(key)
    assert (out / "a.bin").read_bytes() == b"\x00\x01" and (out / "sub" / "b.json").read_text() == "{}"
    assert store.materialize_dir(key) == out  # idempotent


def test_an_existing_database_is_upgraded_in_order(tmp_path):
    """A database made by an older openft (only m001) gets the later migrations, data kept."""
    from sqlalchemy import inspect

    from openft.storage.migrations import m001_initial

    database = Database(f"sqlite:///{tmp_path / 'old.sqlite'}")
    with database.engine.begin() as conn:
        m001_initial(conn)
        conn.execute(
            text("CREATE TABLE _openft_migrations (name VARCHAR(128) PRIMARY KEY, applied_at BIGINT)")
        )
        conn.execute(text("INSERT INTO _openft_migrations VALUES ('m001_initial', 0)"))
        conn.execute(text("INSERT INTO projects VALUES ('proj-old', 'old', 0)"))
    assert not inspect(database.engine).has_table("step_metrics")
    assert migrate(database.engine) == ["m002_step_metrics", "m003_event_dedup_key"]
    assert inspect(database.engine).has_table("step_metrics")
    with database.session() as s:
        assert repo.get_project(s, project_id="proj-old").name == "old"  # data kept
    job_id = _job(database)
    with database.session() as s:
        repo.record_step(s, job_id=job_id, step=1, data={"train_loss": 2.0})
        repo.record_step(s, job_id=job_id, step=1, data={"train_loss": 1.5})  # a replayed step overwrites
        assert repo.step_metrics(s, job_id=job_id) == [{"step": 1, "train_loss": 1.5}]


def test_a_checkpoint_reported_twice_is_recorded_once(db):
    job_id = _job(db)
    with db.session() as s:
        job = repo.claim_next_job(s, worker_id="w", lease_seconds=60)
    created = []
    for weights in ("a" * 64, "b" * 64):
        with db.session() as s:
            _, new = repo.add_checkpoint(
                s,
                job=job,
                step=5,
                metrics={"train_loss": 1.0},
                model_name="ft:x:ckpt-step-5",
                weights=weights,
            )
            created.append(new)
    assert created == [True, False]
    with db.session() as s:
        rows, _ = repo.list_checkpoints(s, job_id=job_id, limit=10, after=None)
        assert [r.step_number for r in rows] == [5]
        assert repo.get_model(s, project_id=job.project_id, model_id="ft:x:ckpt-step-5").weights == "b" * 64


def test_pruned_weights_leave_storage_but_shared_blobs_stay(db, tmp_path):
    """Checkpoints share content (processor files): pruning one removes only what nothing else uses."""
    store = LocalBlobStore(tmp_path / "blobs")
    dirs = []
    for step in (1, 2):
        d = tmp_path / f"step-{step}"
        d.mkdir()
        (d / "weights.bin").write_bytes(f"weights {step}".encode())
        (d / "tokenizer.json").write_text("{}")  # identical in both
        dirs.append(store.put_dir(d))
    job_id = _job(db)
    with db.session() as s:
        job = repo.claim_next_job(s, worker_id="w", lease_seconds=60)
    for step, key in zip((1, 2), dirs, strict=True):
        with db.session() as s:
            repo.add_checkpoint(
                s, job=job, step=step, metrics={}, model_name=f"ft:m:ckpt-step-{step}", weights=key
            )
    old_files = store.dir_members(dirs[0])
    store.materialize_dir(dirs[0])
    with db.session() as s:
        removed = repo.prune_checkpoints(s, job_id=job_id, keep=1)
        assert removed == [dirs[0]]
        assert repo.delete_unreferenced(s, store, weights=removed) == 2  # its weights file + its manifest
    shared = set(old_files) & set(store.dir_members(dirs[1]))
    assert shared and all(store.exists(k) for k in shared)
    assert not store.exists(dirs[0]) and not any(store.exists(k) for k in set(old_files) - shared)
    assert not (store.dir_cache / dirs[0]).exists()
    assert (store.materialize_dir(dirs[1]) / "weights.bin").read_bytes() == b"weights 2"


def test_materialize_dir_works_when_the_temp_dir_is_on_another_filesystem(tmp_path, monkeypatch):
    """TMPDIR on another filesystem (e.g. /dev/shm) must not break the first materialize."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's temp dir")
    other = Path(tempfile.mkdtemp(dir=shm))
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"weights")
    (src / "sub" / "b.json").write_text("{}")
    store = LocalBlobStore(tmp_path / "blobs")
    key = store.put_dir(src)
    out = store.materialize_dir(key)
    assert (out / "a.bin").read_bytes() == b"weights" and (out / "sub" / "b.json").read_text() == "{}"
    assert store.materialize_dir(key) == out
    assert list(other.iterdir()) == []  # nothing built (or left) in TMPDIR


def test_blob_writer_keeps_nothing_unless_committed(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    with store.writer(max_bytes=10) as w:
        w.write(b"12345")
    with pytest.raises(PayloadTooLarge), store.writer(max_bytes=10) as w:
        w.write(b"123456")
        w.write(b"789012")
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
    with store.writer() as w:
        w.write(b"abc")
        key, size = w.commit()
    assert store.read_bytes(key) == b"abc" and size == 3
