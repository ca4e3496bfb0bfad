"""Idempotent enqueue (``dedupe_key``) on SQLite and PostgreSQL: one job per key while it is
unfinished, concurrent producers included; the key is free again once the job has finished."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dgxqueue import api
from dgxqueue.config import Settings, load_settings
from dgxqueue.errors import ValidationError
from dgxqueue.storage import create_generations, init_db, queue, session_scope
from dgxqueue.storage.precompiled import HeldConnection
from tests.support.daemons import make_settings
from tests.support.producers import enqueue_keyed_batches, enqueue_with_key, run_in_processes

_LEASE = timedelta(seconds=30)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    init_db(db_url)
    return make_settings(db_url, tmp_path / "outputs")


def _count(engine: Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


def test_dedupe__an_unfinished_holder_is_returned_and_its_prompt_not_counted_again(
        db_url: str, settings: Settings, engine: Engine) -> None:
    first = api.enqueue("beat", dedupe_key="user-1:click-9", database_url=db_url, settings=settings)
    again = api.enqueue("other words", dedupe_key="user-1:click-9", database_url=db_url, settings=settings)
    assert again == first
    assert _count(engine, "SELECT count(*) FROM generations") == 1
    assert _count(engine, "SELECT coalesce(sum(used_count), 0) FROM prompts") == 1
    [job] = queue.claim(HeldConnection(engine), worker_id="w", models=[settings.jobs.default_model], limit=1,
                        lease=_LEASE)
    assert job.id == first  # running, it still holds the key
    assert api.enqueue("beat", dedupe_key="user-1:click-9", database_url=db_url, settings=settings) == first


def test_dedupe__a_finished_holder_frees_the_key(db_url: str, settings: Settings, engine: Engine) -> None:
    """Once the holder has completed or failed, the same key makes a new job."""
    first = api.enqueue("beat", dedupe_key="k", database_url=db_url, settings=settings)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE generations SET status = 'failed' WHERE id = :id"), {"id": first})
    second = api.enqueue("beat", dedupe_key="k", database_url=db_url, settings=settings)
    assert second != first
    assert _count(engine, "SELECT count(*) FROM generations WHERE dedupe_key = 'k'") == 2
    assert _count(engine, "SELECT used_count FROM prompts") == 2


def test_dedupe__a_pending_holder_past_its_expiry_frees_the_key(
        db_url: str, settings: Settings, engine: Engine) -> None:
    """A pending holder whose expires_at has passed will never run (no claim takes it); until a
    rescuer's sweep marked it, an enqueue with its key returned it: the user's new request got a
    job that could only end failed as expired. The enqueue now expires it and makes a new job;
    a holder still in time, or running past its expiry (it finishes), is still returned."""
    first = api.enqueue("beat", dedupe_key="k", ttl=60, database_url=db_url, settings=settings)
    with engine.begin() as conn:  # the first holder expired a minute ago; no daemon swept it
        conn.execute(sa.text("UPDATE generations SET expires_at = :t WHERE id = :id"),
                     {"t": datetime.now(UTC) - timedelta(minutes=1), "id": first})
    second = api.enqueue("beat", dedupe_key="k", ttl=60, database_url=db_url, settings=settings)
    assert second != first
    with engine.connect() as conn:
        status, expired_at, message = conn.execute(sa.text(
            "SELECT status, expired_at, error_message FROM generations WHERE id = :id"), {"id": first}).one()
    assert (status, message) == ("failed", queue.EXPIRED_MESSAGE) and expired_at is not None
    assert api.enqueue("beat", dedupe_key="k", database_url=db_url, settings=settings) == second
    [job] = queue.claim(HeldConnection(engine), worker_id="w", models=[settings.jobs.default_model], limit=1,
                        lease=_LEASE)
    with engine.begin() as conn:  # running past its expiry: it finishes, so it holds the key
        conn.execute(sa.text("UPDATE generations SET expires_at = :t WHERE id = :id"),
                     {"t": datetime.now(UTC) - timedelta(minutes=1), "id": second})
    assert job.id == second
    assert api.enqueue("beat", dedupe_key="k", database_url=db_url, settings=settings) == second


def test_dedupe__within_one_batch_and_through_the_specifications_call(
        db_url: str, settings: Settings, engine: Engine) -> None:
    ids = api.enqueue_many([{"prompt": "a", "dedupe_key": "x"}, {"prompt": "b"}, {"prompt": "c", "dedupe_key": "x"}],
                           database_url=db_url, settings=settings)
    assert ids[0] == ids[2] != ids[1]
    with session_scope(engine) as session:
        assert create_generations(session, [{"prompt": "d", "dedupe_key": "x"}]) == [ids[0]]
    assert _count(engine, "SELECT count(*) FROM generations") == 2


@pytest.mark.parametrize("key", ["", "   ", "k" * 201, 5])
def test_dedupe__a_bad_key_is_refused_naming_it(db_url: str, settings: Settings, key: object) -> None:
    with pytest.raises(ValidationError) as caught:
        api.enqueue("beat", dedupe_key=key, database_url=db_url, settings=settings)  # type: ignore[arg-type]
    assert caught.value.field == "dedupe_key"


def test_dedupe__eight_concurrent_producers_one_key_make_one_job(db_url: str, engine: Engine) -> None:
    """8 processes enqueue with one key at once (5 times each): exactly one job, every one of
    them given its id, and the prompt counted once."""
    init_db(db_url)
    results = run_in_processes(enqueue_with_key, [(db_url, "double-click", 5)] * 8)
    returned = {job_id for ids in results for job_id in ids}
    assert len(returned) == 1
    assert _count(engine, "SELECT count(*) FROM generations") == 1
    assert _count(engine, "SELECT used_count FROM prompts") == 1


def test_dedupe__concurrent_batches_with_keys_in_opposite_orders(db_url: str, engine: Engine) -> None:
    """Two producers each enqueue batches holding the same keys, one in the other's reverse
    order: neither fails (on PostgreSQL each keyed insert waits for the other transaction's
    uncommitted holder, so opposite orders deadlocked) and each key ends with one job."""
    keys = [f"k{i}" for i in range(8)]
    answers = run_in_processes(enqueue_keyed_batches, [(db_url, keys, 30), (db_url, keys[::-1], 30)])
    first, second = answers
    for i in range(30):
        assert first[i] == second[i][::-1]
    assert _count(engine, "SELECT count(*) FROM generations") == 8 * 30


def test_dedupe__eight_concurrent_producers_meet_an_expired_holder(db_url: str, engine: Engine) -> None:
    """The key's holder expired and no daemon swept it; 8 processes enqueue with the key at once
    (the insert path expires the holder): it ends failed as expired, exactly one new job holds
    the key, and every producer is given that job's id."""
    init_db(db_url)
    settings = load_settings(env={})
    first = api.enqueue("deduplicated", dedupe_key="double-click", database_url=db_url, settings=settings)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE generations SET expires_at = :t WHERE id = :id"),
                     {"t": datetime.now(UTC) - timedelta(minutes=1), "id": first})
    results = run_in_processes(enqueue_with_key, [(db_url, "double-click", 3)] * 8)
    returned = {job_id for ids in results for job_id in ids}
    assert len(returned) == 1 and first not in returned
    assert _count(engine, "SELECT count(*) FROM generations") == 2
    assert _count(engine, "SELECT count(*) FROM generations WHERE id = :id AND status = 'failed'"
                  " AND expired_at IS NOT NULL", id=first) == 1
