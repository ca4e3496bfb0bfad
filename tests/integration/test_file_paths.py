"""Each job writes its own file (migration 007) on the real engines: producers racing for one file,
the specification's create_generation inside a session, and the unique index behind the door's
lookup when the holder is not yet committed."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dgxqueue import api
from dgxqueue.config import load_settings
from dgxqueue.errors import InvalidStateError, ValidationError
from dgxqueue.storage import (
    cancel_generation,
    create_engine,
    create_generation,
    create_generations,
    ensure_schema,
    fail_generation,
    retry_generation,
    session_scope,
    validate_job,
)
from dgxqueue.storage.models import G, P, utcnow
from dgxqueue.storage.queue import insert_jobs
from dgxqueue.storage.transfer import archive
from tests.support.daemons import make_daemon
from tests.support.db import sqlite_url
from tests.support.generators import ScriptedGenerator
from tests.support.processes import wait_until

SONG = "outputs/song.wav"


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(G)).scalar_one())


def _behind_an_uncommitted_holder(engine: Engine, produce: Callable[[], None],
                                  hold: Callable[[sa.Connection], None] | None = None) -> None:
    """Run ``produce`` on a thread while another transaction holds an uncommitted job for SONG
    (or whatever ``hold`` writes in it); commit that transaction once ``produce``'s write waits for
    it (PostgreSQL's unique index; on SQLite, the one writer), then wait for ``produce`` to end."""
    holder = engine.connect()
    transaction = holder.begin()
    if hold is None:
        insert_jobs(holder, [validate_job("holder", file_path=SONG)])
    else:
        hold(holder)
    late = threading.Thread(target=produce)
    late.start()
    if engine.dialect.name == "postgresql":
        # A late write that ends without waiting (it raised) ends the wait too: the caller's
        # assertion on its outcome then says what it raised, instead of a blind timeout here.
        def waiting() -> bool:
            if not late.is_alive():
                return True
            # A new transaction each time: pg_stat_activity is read once per transaction, and a
            # late session that connected after that read would never be seen waiting.
            with engine.connect() as watcher:
                return bool(watcher.execute(sa.text(
                    "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                    "WHERE NOT granted AND datname = current_database()")).scalar())

        wait_until(waiting, 30, "the late insert to wait for the holder's transaction")
    transaction.commit()
    holder.close()
    late.join(timeout=60)


def test_file_path__eight_producers_racing_for_one_file_make_one_job(engine: Engine, db_url: str) -> None:
    """Eight threads enqueue a job for one file at once: one job is made, and each of the seven
    others is refused naming file_path, whether the door's lookup or the unique index caught it."""
    settings = load_settings(env={})
    start = threading.Barrier(8)
    made: list[str] = []
    refused: list[ValidationError] = []
    other: list[BaseException] = []

    def produce(n: int) -> None:
        start.wait(timeout=30)
        try:
            made.append(api.enqueue(f"take {n}", file_path=SONG, database_url=db_url, settings=settings))
        except ValidationError as exc:
            refused.append(exc)
        except BaseException as exc:  # reported by the assertion below
            other.append(exc)

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert other == [] and len(made) == 1 and len(refused) == 7
    assert {exc.field for exc in refused} == {"file_path"}
    assert _count(engine) == 1


def test_file_path__create_generation_in_a_session_is_refused_and_the_first_kept(engine: Engine) -> None:
    """The specification's own example, called twice: the second create_generation raises
    ValidationError naming file_path and the first job, and the first job is kept."""
    spec: dict[str, Any] = {"prompt": "hip hop beat", "model_name": "musicgen-small", "duration_seconds": 16.0,
                            "sample_rate": 32000, "channels": 2, "file_path": "outputs/test.wav"}
    with session_scope(engine) as session:
        first = create_generation(session, **spec).id
    with pytest.raises(ValidationError) as caught, session_scope(engine) as session:
        create_generation(session, **{**spec, "prompt": "another beat"})
    assert caught.value.field == "file_path" and first in str(caught.value)
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(G.c.id, G.c.prompt))) == [(first, "hip hop beat")]


def test_file_path__a_holder_not_yet_committed_is_refused_by_the_index(engine: Engine, db_url: str) -> None:
    """A producer whose lookup ran before another's insert of the same file committed: its insert
    waits for that transaction (PostgreSQL's unique index, SQLite's one writer), then is refused
    naming file_path; nothing of it is written."""
    settings = load_settings(env={})
    outcome: list[BaseException | str] = []

    def produce() -> None:
        try:
            outcome.append(api.enqueue("late", file_path=SONG, database_url=db_url, settings=settings))
        except BaseException as exc:  # reported by the assertion below
            outcome.append(exc)

    _behind_an_uncommitted_holder(engine, produce)
    [result] = outcome
    assert isinstance(result, ValidationError) and result.field == "file_path", result
    assert _count(engine) == 1


def test_file_path__a_batch_the_index_refuses_in_a_session_writes_nothing_and_the_session_goes_on(
        engine: Engine) -> None:
    """A keyed job naming a taken file is refused by the unique index, not the door's lookup (its
    key's holder might have taken its place). The ValidationError says nothing of the batch was
    written, so a caller may go on in its session: no job of the batch is left behind to commit
    (SQLite kept the rows inserted before the failing one), and the session still works
    (PostgreSQL had aborted its transaction)."""
    with session_scope(engine) as session:
        create_generation(session, "held", file_path=SONG)
    with session_scope(engine) as session:
        with pytest.raises(ValidationError) as caught:
            create_generations(session, [{"prompt": "new", "file_path": "outputs/new.wav"},
                                         {"prompt": "keyed", "dedupe_key": "k", "file_path": SONG}])
        assert caught.value.field == "file_path"
        create_generation(session, "after", file_path="outputs/after.wav")
    with engine.connect() as conn:
        assert {prompt: path for prompt, path in conn.execute(sa.select(G.c.prompt, G.c.file_path))} == {
            "held": SONG, "after": "outputs/after.wav"}
        assert {text: n for text, n in conn.execute(sa.select(P.c.text, P.c.used_count))} == {"held": 1, "after": 1}


def test_file_path__create_generation_losing_a_race_leaves_the_session_usable(engine: Engine) -> None:
    """create_generation in a session whose lookup ran before another producer's insert of the
    same file committed: refused naming file_path (by the unique index on PostgreSQL, where its
    insert waited for that transaction), and the session goes on: its earlier job and a later one
    commit, as after any ValidationError."""
    outcome: list[BaseException | None] = []

    def produce() -> None:
        try:
            with session_scope(engine) as session:
                if engine.dialect.name == "postgresql":  # SQLite's one writer: it waits for the holder here
                    create_generation(session, "mine", file_path="outputs/mine.wav")
                with pytest.raises(ValidationError) as caught:
                    create_generation(session, "late", file_path=SONG)
                assert caught.value.field == "file_path"
                create_generation(session, "after", file_path="outputs/after.wav")
            outcome.append(None)
        except BaseException as exc:  # reported by the assertion below
            outcome.append(exc)

    _behind_an_uncommitted_holder(engine, produce)
    assert outcome == [None]
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(G.c.prompt)).scalars()) == (
            ["after", "holder", "mine"] if engine.dialect.name == "postgresql" else ["after", "holder"])


def test_file_path__a_retry_is_refused_while_another_job_holds_the_failed_jobs_file(engine: Engine) -> None:
    """A failed job's path is free for a new job; retrying the failed one while that job holds it
    is refused naming the holder, and nothing changes. Once the holder has failed too, the retry
    goes through."""
    with session_scope(engine) as session:
        first = create_generation(session, "first", file_path=SONG).id
        fail_generation(session, first, error_message="the model was wrong")
        second = create_generation(session, "second", file_path=SONG).id
    with pytest.raises(InvalidStateError) as caught, session_scope(engine) as session:
        retry_generation(session, first)
    assert second in str(caught.value) and "file_path" in str(caught.value)
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(G.c.id, G.c.status)).all()) == {first: "failed", second: "pending"}
    with session_scope(engine) as session:
        cancel_generation(session, second)
        assert retry_generation(session, first).status == "pending"



def scripted_jobs(engine: Engine, duration: float) -> list[str]:
    with session_scope(engine) as session:
        return create_generations(session, [{"prompt": "fine", "model_name": "scripted", "file_path": SONG,
                                             "duration_seconds": duration, "sample_rate": 8000, "channels": 1}])


def test_file_path__a_new_job_for_an_archived_jobs_file_fails_and_the_archived_wav_stays(
        engine: Engine, db_url: str, tmp_path: Path) -> None:
    """`archive` moves a completed job's row to another database, so its path is free again here: a
    new job naming it is accepted, and the daemon fails that job (naming the path) instead of
    renaming its WAV over the archived job's, which keeps its bytes and its inode."""
    outputs = tmp_path / "outputs"
    generator = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, generator)
    try:
        [archived] = scripted_jobs(engine, 0.01)
        assert daemon.run_once() == 1
        song = outputs / "song.wav"
        before = song.read_bytes(), song.stat().st_ino
        target = create_engine(sqlite_url(tmp_path / "archive"))
        ensure_schema(target)
        assert archive(engine, target, utcnow() + timedelta(days=1), batch_size=10, progress=lambda _: None).moved == 1
        target.dispose()
        [new] = scripted_jobs(engine, 0.02)
        assert daemon.run_once() == 1
        with engine.connect() as conn:
            status, error = conn.execute(sa.select(G.c.status, G.c.error_message).where(G.c.id == new)).one()
        assert status == "failed" and SONG in error and f"dgxqueue retry {new}" in error, error
        assert (song.read_bytes(), song.stat().st_ino) == before
        assert new not in generator.executions and archived in generator.executions
        assert os.listdir(outputs) == ["song.wav"]
    finally:
        daemon.shutdown()


def _failed_jobs(engine: Engine, *specs: dict[str, Any]) -> list[str]:
    ids = []
    with session_scope(engine) as session:
        for spec in specs:
            ids += insert_jobs(session.connection(), [validate_job(**spec)])
            fail_generation(session, ids[-1], error_message="the model was wrong")
    return ids


def _retry_behind(engine: Engine, job_id: str, hold: Callable[[sa.Connection], None] | None = None
                  ) -> BaseException | None:
    """Retry ``job_id`` behind an uncommitted holder (:func:`_behind_an_uncommitted_holder`): what it raised."""
    outcome: list[BaseException | None] = []

    def produce() -> None:
        try:
            with session_scope(engine) as session:
                retry_generation(session, job_id)
            outcome.append(None)
        except BaseException as exc:  # reported by the caller's assertion
            outcome.append(exc)

    _behind_an_uncommitted_holder(engine, produce, hold)
    [result] = outcome
    return result


def _retried_in(job_id: str) -> Callable[[sa.Connection], None]:
    def hold(connection: sa.Connection) -> None:
        retry_generation(Session(bind=connection), job_id)
    return hold


def test_file_path__two_retries_at_once_of_jobs_sharing_a_file_one_is_refused(engine: Engine) -> None:
    """Two failed jobs name one file and both are retried at once: the one whose retry waited for
    the other's commit is refused naming file_path and the other job (on PostgreSQL the unique
    index refused it, a bare IntegrityError), and stays failed."""
    first, second = _failed_jobs(engine, {"prompt": "first", "file_path": SONG},
                                 {"prompt": "second", "file_path": SONG})
    refused = _retry_behind(engine, second, hold=_retried_in(first))
    assert isinstance(refused, InvalidStateError), repr(refused)
    assert "file_path" in str(refused) and first in str(refused)
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(G.c.id, G.c.status)).all()) == {first: "pending", second: "failed"}


def test_file_path__a_retry_racing_an_enqueue_of_its_file_is_refused(engine: Engine) -> None:
    """A failed job is retried while a producer's job naming its file is not yet committed: the
    retry is refused naming file_path and that job, not a database error."""
    [failed] = _failed_jobs(engine, {"prompt": "failed", "file_path": SONG})
    refused = _retry_behind(engine, failed)
    assert isinstance(refused, InvalidStateError), repr(refused)
    with engine.connect() as conn:
        holder = conn.execute(sa.select(G.c.id).where(G.c.prompt == "holder")).scalar_one()
        assert conn.execute(sa.select(G.c.status).where(G.c.id == failed)).scalar_one() == "failed"
    assert "file_path" in str(refused) and holder in str(refused)


def test_retry__two_retries_at_once_of_jobs_sharing_a_dedupe_key_one_is_refused(engine: Engine) -> None:
    """Two failed jobs hold one dedupe_key and both are retried at once: the later is refused
    naming the key and the other job, not a database error (the key's index allows one holder)."""
    first, second = _failed_jobs(engine, {"prompt": "first", "dedupe_key": "K", "file_path": "outputs/1.wav"},
                                 {"prompt": "second", "dedupe_key": "K", "file_path": "outputs/2.wav"})
    refused = _retry_behind(engine, second, hold=_retried_in(first))
    assert isinstance(refused, InvalidStateError), repr(refused)
    assert "dedupe_key" in str(refused) and first in str(refused)
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(G.c.id, G.c.status)).all()) == {first: "pending", second: "failed"}


def test_file_path__a_batch_the_index_refuses_names_only_the_paths_its_producer_chose(engine: Engine) -> None:
    """The unique index refuses a batch without saying which row: the refusal named every job's
    path, so a batch of default paths and one chosen file named the new jobs' own paths first
    (ids nothing was written for) and cut the chosen one off. Only a chosen path can be taken."""
    with session_scope(engine) as session:
        create_generation(session, "held", file_path=SONG)
    with session_scope(engine) as session, pytest.raises(ValidationError) as caught:
        create_generations(session, [{"prompt": "a"}, {"prompt": "b"},
                                     {"prompt": "keyed", "dedupe_key": "k", "file_path": SONG}])
    assert caught.value.field == "file_path" and caught.value.value == SONG, caught.value
    assert repr(SONG) in str(caught.value)
