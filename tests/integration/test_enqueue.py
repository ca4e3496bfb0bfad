"""``dgxqueue.enqueue`` / ``enqueue_many``: committed on return, validated, all-or-nothing."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import dgxqueue
from dgxqueue.api import default_settings
from dgxqueue.config import load_settings
from dgxqueue.errors import SchemaError, ValidationError
from dgxqueue.storage import (
    create_generation,
    dispose_engines,
    get_engine,
    get_generation,
    get_most_used_prompts,
    init_db,
    queue,
    session_scope,
    validate_jobs,
)
from dgxqueue.storage.queue import NOTIFY_CHANNEL
from tests.support.db import PG_ADMIN_URL
from tests.unit.test_validation import BAD_INPUTS


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test alone, not from DGXQUEUE_* variables of whoever runs pytest."""
    for name in list(os.environ):
        if name.startswith("DGXQUEUE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)


def _rows(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM generations")).scalar_one()
        uses = conn.execute(sa.text("SELECT coalesce(sum(used_count), 0) FROM prompts")).scalar_one()
    return int(rows), int(uses)


def test_enqueue__commits_a_pending_job_and_counts_its_prompt(engine: Engine, db_url: str) -> None:
    """enqueue returns a UUID v4 id whose row is committed, with the given fields and prompt count."""
    later = datetime.now(UTC) + timedelta(minutes=5)
    job_id = dgxqueue.enqueue(
        "dub techno", model_name="musicgen-small", duration_seconds=12.5, sample_rate=44100, channels=2,
        file_path="outputs/dub.wav", metadata={"bpm": 118}, priority=7, run_after=later, max_attempts=5,
        database_url=db_url,
    )
    assert uuid.UUID(job_id).version == 4
    with session_scope(get_engine(db_url)) as session:
        gen = get_generation(session, job_id)
        assert gen is not None and gen.status == "pending"
        assert (gen.prompt, gen.model_name, gen.duration_seconds, gen.sample_rate, gen.channels) == (
            "dub techno", "musicgen-small", 12.5, 44100, 2)
        assert (gen.file_path, gen.meta, gen.priority, gen.max_attempts) == (
            "outputs/dub.wav", {"bpm": 118}, 7, 5)
        assert gen.run_after is not None and abs(gen.run_after - later) < timedelta(milliseconds=1)
        assert gen.created_at.tzinfo is UTC
        assert [(p.text, p.used_count) for p in get_most_used_prompts(session)] == [("dub techno", 1)]
    assert _rows(engine) == (1, 1)


def test_enqueue__uses_configured_defaults(engine: Engine, db_url: str) -> None:
    """Left-out fields take the settings' defaults; the default file path is outputs/<id>.wav."""
    settings = load_settings(env={}, overrides={"jobs": {"default_model": "musicgen-small",
                                                          "default_duration_seconds": 4.0},
                                                 "outputs": {"dir": "/srv/renders"}})
    job_id = dgxqueue.enqueue("lo-fi", database_url=db_url, settings=settings)
    with session_scope(engine) as session:
        gen = get_generation(session, job_id)
        assert gen is not None
        assert (gen.model_name, gen.duration_seconds, gen.file_path) == (
            "musicgen-small", 4.0, f"renders/{job_id}.wav")


def test_enqueue__reads_database_url_and_settings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without arguments enqueue uses $DATABASE_URL and DGXQUEUE_* settings, reloaded when they change."""
    first, second = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    init_db(first)  # a configured database is never created by a producer
    init_db(second)
    monkeypatch.setenv("DATABASE_URL", first)
    monkeypatch.setenv("DGXQUEUE_JOBS_DEFAULT_MODEL", "model-a")
    a_id = dgxqueue.enqueue("beat")
    assert default_settings() is default_settings()  # cached while nothing changes
    monkeypatch.setenv("DATABASE_URL", second)
    monkeypatch.setenv("DGXQUEUE_JOBS_DEFAULT_MODEL", "model-b")
    b_id = dgxqueue.enqueue("beat")
    for url, job_id, model in ((first, a_id, "model-a"), (second, b_id, "model-b")):
        with session_scope(get_engine(url)) as session:
            gen = get_generation(session, job_id)
            assert gen is not None and gen.model_name == model


def test_enqueue__reloads_settings_when_the_config_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached default settings follow $DGXQUEUE_CONFIG and the file's modification."""
    config = tmp_path / "config.toml"
    config.write_text('[jobs]\ndefault_model = "one"\n')
    monkeypatch.setenv("DGXQUEUE_CONFIG", str(config))
    assert default_settings().jobs.default_model == "one"
    config.write_text('[jobs]\ndefault_model = "two"\n')
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert default_settings().jobs.default_model == "two"


def test_enqueue__bad_input_writes_nothing(engine: Engine, db_url: str) -> None:
    """Every validation rule raises ValidationError from enqueue with nothing written."""
    base = {"model_name": "m", "duration_seconds": 1.0, "sample_rate": 32000, "channels": 1,
            "file_path": "outputs/x.wav", "metadata": {"bpm": 1}}
    for field, value, _ in BAD_INPUTS:
        spec = {"prompt": "ok", **base, field: value}
        with pytest.raises(ValidationError) as caught:
            dgxqueue.enqueue(spec.pop("prompt"), database_url=db_url, **spec)  # type: ignore[arg-type]
        assert caught.value.field == field
        assert _rows(engine) == (0, 0), field


def test_enqueue_many__one_transaction_all_or_nothing(engine: Engine, db_url: str) -> None:
    """enqueue_many inserts every spec with ids in order, or none when one spec is bad."""
    ids = dgxqueue.enqueue_many([{"prompt": "a"}, {"prompt": "b", "priority": 2}, {"prompt": "a"}],
                                database_url=db_url)
    assert len(set(ids)) == 3 and _rows(engine) == (3, 3)
    with pytest.raises(ValidationError) as caught:
        dgxqueue.enqueue_many([{"prompt": "c"}, {"prompt": "d", "sample_rate": 1}], database_url=db_url)
    assert caught.value.field == "sample_rate"
    assert _rows(engine) == (3, 3)
    assert dgxqueue.enqueue_many([], database_url=db_url) == []
    with session_scope(engine) as session:
        assert [get_generation(session, i).prompt for i in ids] == ["a", "b", "a"]  # type: ignore[union-attr]


def test_enqueue__database_error_rolls_back_the_row(engine: Engine, db_url: str) -> None:
    """When the prompt upsert fails, the generation insert of the same call is rolled back too."""
    dgxqueue.enqueue("first", database_url=db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE prompts")
    with pytest.raises(sa.exc.DBAPIError):
        dgxqueue.enqueue("second", database_url=db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT prompt FROM generations")).scalars().all() == ["first"]
    with pytest.raises(sa.exc.DBAPIError):  # the pooled connection is still usable afterwards
        dgxqueue.enqueue("third", database_url=db_url)


def test_enqueue__refuses_a_database_newer_than_the_code(sqlite_db_url: str) -> None:
    """enqueue on a database stamped by a newer dgxqueue raises SchemaError and writes nothing."""
    engine = init_db(sqlite_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '999_from_the_future'")
    with pytest.raises(SchemaError, match="999_from_the_future"):
        dgxqueue.enqueue("beat", database_url=sqlite_db_url)
    assert _rows(engine) == (0, 0)


def test_enqueue__notifies_waiting_daemons_on_postgres(pg_db_url: str) -> None:
    """On PostgreSQL each enqueue sends NOTIFY dgxqueue_jobs with the model name, on commit."""
    init_db(pg_db_url)
    url = sa.engine.make_url(pg_db_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                         autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        dgxqueue.enqueue("beat", model_name="musicgen-small", database_url=pg_db_url)
        dgxqueue.enqueue_many([{"prompt": "x", "model_name": "synth"}], database_url=pg_db_url)
        received = []
        for note in listener.notifies(timeout=10, stop_after=2):
            received.append((note.channel, note.payload))
    assert received == [(NOTIFY_CHANNEL, "musicgen-small"), (NOTIFY_CHANNEL, "synth")]


def test_insert_jobs__batches_count_repeated_prompts(engine: Engine) -> None:
    """The one insert takes batches too: one row each, repeated prompts counted per use."""
    jobs = validate_jobs([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a", "metadata": {"k": 1}}])
    before = datetime.now(UTC) - timedelta(seconds=1)  # the database's clock (this host's) stamps them
    with engine.begin() as connection:
        queue.insert_jobs(connection, jobs)
        queue.insert_jobs(connection, [])
    assert _rows(engine) == (3, 3)
    with session_scope(engine) as session:
        assert {p.text: p.used_count for p in get_most_used_prompts(session)} == {"a": 2, "b": 1}
        stored = get_generation(session, jobs[2].id)
        assert stored is not None and stored.meta == {"k": 1}
        assert before <= stored.created_at <= datetime.now(UTC) + timedelta(seconds=1)


def test_enqueue__survives_a_dropped_postgres_connection(pg_db_url: str) -> None:
    """When the server ends the pooled connection, the next enqueue reconnects and succeeds once."""
    engine = init_db(pg_db_url)
    dgxqueue.enqueue("warm up", database_url=pg_db_url)
    engine.dispose()
    dgxqueue.enqueue("first", database_url=pg_db_url)  # the pool now holds this one connection
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    pooled = engine.raw_connection()
    pid = pooled.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    pooled.close()
    with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True) as admin:
        # With a timeout, pg_terminate_backend returns once the backend has exited (at most 10 s).
        ended = admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()
        assert ended == (True,)
    dgxqueue.enqueue("second", database_url=pg_db_url)
    assert _rows(engine) == (3, 3)


def _end_the_pooled_connection(engine: Engine) -> None:
    """End, at the server, the one connection ``engine``'s pool holds."""
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    pooled = engine.raw_connection()
    pid = pooled.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    pooled.close()
    with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)


def test_enqueue__with_a_file_path_survives_a_dropped_postgres_connection(pg_db_url: str) -> None:
    """A producer-chosen file_path is looked up before the insert (a keyed job's is not): a dead
    pooled connection found by that first statement has written nothing, and the enqueue
    reconnects and succeeds once, as one without a file_path does."""
    engine = init_db(pg_db_url)
    engine.dispose()
    dgxqueue.enqueue("first", database_url=pg_db_url)
    _end_the_pooled_connection(engine)
    dgxqueue.enqueue("looked up", file_path="outputs/looked-up.wav", database_url=pg_db_url)
    _end_the_pooled_connection(engine)
    dgxqueue.enqueue("keyed", file_path="outputs/keyed.wav", dedupe_key="k", database_url=pg_db_url)
    assert _rows(engine) == (3, 3)


def test_enqueue__survives_a_postgres_restart() -> None:
    """After a server restart every pooled connection is dead: enqueue and enqueue_many still succeed."""
    from tests.support.pgcluster import private_cluster

    with private_cluster() as cluster:
        url = cluster.url
        try:
            engine = init_db(url)
            dgxqueue.enqueue("before", database_url=url)
            held = [engine.raw_connection() for _ in range(3)]  # the pool keeps three connections
            for connection in held:
                connection.close()
            cluster.restart()
            dgxqueue.enqueue("after", database_url=url)
            cluster.restart()
            dgxqueue.enqueue_many([{"prompt": "many"}, {"prompt": "more"}], database_url=url)
            assert _rows(engine) == (4, 4)
        finally:
            dispose_engines()


# (metadata, the field the error names): each enqueue door, each engine, nothing written.
UNSTORABLE: list[tuple[dict[str, Any], str]] = [
    ({"note": "\udc80"}, "metadata"),  # what json.loads('{"note": "\\udc80"}') returns
    ({"deep": [{"\udc80": 1}]}, "metadata"),
    ({"gain": float("inf")}, "metadata"),
    ({"seed": "abc"}, "metadata.seed"),
    ({"seed": True}, "metadata.seed"),
    ({"guidance_scale": 0.5}, "metadata.guidance_scale"),
    ({"top_k": 1.5}, "metadata.top_k"),
]


def test_enqueue__refuses_what_the_database_or_daemon_would_refuse(engine: Engine, db_url: str) -> None:
    """enqueue, enqueue_many and create_generation refuse unstorable or unsteerable metadata, writing nothing."""
    for metadata, field in UNSTORABLE:
        with pytest.raises(ValidationError) as caught:
            dgxqueue.enqueue("ok", metadata=metadata, database_url=db_url)
        assert caught.value.field == field
        with pytest.raises(ValidationError) as caught:
            dgxqueue.enqueue_many([{"prompt": "ok"}, {"prompt": "ok", "metadata": metadata}], database_url=db_url)
        assert caught.value.field == field
        with pytest.raises(ValidationError) as caught, session_scope(engine) as session:
            create_generation(session, "ok", metadata=metadata)
        assert caught.value.field == field
        assert _rows(engine) == (0, 0), metadata


def test_enqueue__stores_text_that_only_looks_unstorable(engine: Engine, db_url: str) -> None:
    """Astral characters, an escaped-looking backslash and the seed's edges are stored as given."""
    metadata = {"mood": "\U0001f3b5 caf\u00e9", "path": "C:\\u0000", "seed": 2**31 - 1, "top_k": 0}
    job_id = dgxqueue.enqueue("ok", metadata=metadata, database_url=db_url)
    with session_scope(engine) as session:
        stored = get_generation(session, job_id)
        assert stored is not None and stored.meta == metadata
