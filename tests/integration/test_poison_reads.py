"""Rows written by plain SQL with values no job can use: every read survives them, on both engines,
and an outcome the database refuses fails its own job instead of the batch."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from dgxqueue.storage import (
    complete_generation,
    get_all_generations,
    get_database_stats,
    get_generation,
    get_pending_generations,
    init_db,
    queue,
    reads,
    session_scope,
)
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.storage.results import Completed, Failed, Retried
from dgxqueue.storage.rowvalues import Unreadable
from tests.support import poison

LEASE = timedelta(seconds=60)


def _poisons(engine: sa.Engine) -> list[poison.Poison]:
    return poison.COMMON + (poison.SQLITE if engine.dialect.name == "sqlite" else poison.POSTGRES)


def test_reads__survive_every_poison_row_and_show_raw_values(engine: sa.Engine, db_url: str) -> None:
    """get_generation, the lists, stats, queue depth, has_work, next_due and the rescue all read
    poison rows without raising; a value that is not of its column's type comes back as its text."""
    poisons = _poisons(engine)
    sqlite = engine.dialect.name == "sqlite"
    poison.insert(db_url, [
        *poison.poison_rows(poisons),
        poison.row("lease-bad", status="processing", lease_expires_at="tomorrow" if sqlite else "infinity"),
        poison.row("not-due", run_after="9999-12-31 00:00:00" if sqlite else "infinity"),
    ])
    with session_scope(engine) as s:
        everyone = get_all_generations(s, limit=1000)
        assert {g.id for g in everyone} >= {p.job_id for p in poisons}
        assert len(get_pending_generations(s, limit=1000)) == len(poisons) + 1
        stats = get_database_stats(s)
        assert stats["total_generations"] == len(poisons) + 2
        depth = reads.queue_depth(s)
        assert depth.by_status["pending"] == len(poisons) + 1
        assert queue.has_work(s, ["synth"])
        due = queue.next_due(s, ["synth"])
        # SQLite's far-off text is a time; PostgreSQL's 'infinity' is no time to wake at.
        assert (due is not None and due > timedelta(days=365 * 7000)) if sqlite else due is None
        if sqlite:
            quotes = get_generation(s, "metadata-quotes")
            words = get_generation(s, "created-words")
            assert quotes is not None and isinstance(quotes.meta, Unreadable) and quotes.meta == "{'bpm': 90}"
            assert words is not None and str(words.created_at) == "tomorrow 10:00"
            assert stats["oldest_pending_created_at"] == "1733480000"  # sorts first, shown as stored
        else:
            minus = get_generation(s, "created-minus-infinity")
            assert minus is not None and str(minus.created_at) == "-infinity"
            assert stats["oldest_pending_created_at"] == "-infinity"
        requeued, failed = queue.rescue_expired(s)
    # A lease that is not a time is held by nobody (SQLite); PostgreSQL's infinity is a time, far off.
    assert (requeued, failed) == ((["lease-bad"], []) if sqlite else ([], []))


def test_rescue_and_claim__sqlite_text_shaped_like_a_time_that_names_none_is_no_time(sqlite_db_url: str) -> None:
    """Text that starts as a time does but names none ('2026-13-45 99:99:99', a month 13) was
    compared as text: a lease of it held its job 'processing' until the text sorted before the
    clock (next year; '9999-99-99' never), and a run_after of it kept its job waiting as long,
    where FAULTS says a lease that is not a time is held by nobody and a run_after that is not a
    time is due (so the claim fails the job naming it). SQLite's own parser says which is a time."""
    engine = init_db(sqlite_db_url)
    poison.insert(sqlite_db_url, [
        poison.row("lease-month-13", status="processing", worker_id="gone", lease_expires_at="2026-13-45 99:99:99"),
        poison.row("lease-stored-form", status="processing", worker_id="gone",
                   lease_expires_at="9999-99-99 00:00:00.000000"),
        poison.row("lease-ahead", status="processing", worker_id="alive", lease_expires_at="9999-12-31 00:00:00"),
        poison.row("run-after-month-13", run_after="2026-13-45 00:00:00"),
    ])
    with session_scope(engine) as s:
        requeued, failed = queue.rescue_expired(s)
    assert (sorted(requeued), failed) == (["lease-month-13", "lease-stored-form"], [])
    link = HeldConnection(engine)
    jobs = {job.id: job for job in queue.claim(link, worker_id="w", models=["synth"], limit=10, lease=LEASE)}
    link.close()
    defect = jobs["run-after-month-13"].defect
    assert defect is not None and defect.startswith("run_after"), defect


def test_claim__each_poison_row_becomes_a_job_whose_defect_names_the_column(engine: sa.Engine, db_url: str) -> None:
    """The claim returns every poison row as a job with a defect naming the column and quoting the
    value, and the good rows of the same claim as usual, whichever claim the row falls in."""
    poisons = _poisons(engine)
    # Channels are the backend's to judge; metadata JSON holds but the column cannot is refused
    # before the render (the executor): neither is a defect of the row itself.
    defective = [p for p in poisons if p.column != "channels" and not p.named.startswith("metadata.")]
    poison.insert(db_url, [*poison.poison_rows(poisons), poison.row("good-1"), poison.row("good-2")])
    half = len(poisons) // 2
    link = HeldConnection(engine)
    first = queue.claim(link, worker_id="w", models=["synth"], limit=half, lease=LEASE)
    rest = queue.claim(link, worker_id="w", models=["synth"], limit=100, lease=LEASE)
    link.close()
    jobs = {job.id: job for job in first + rest}
    assert len(jobs) == len(poisons) + 2
    for bad in defective:
        defect = jobs[bad.job_id].defect
        assert defect is not None and defect.startswith(bad.column), (bad, defect)
    fine = {"good-1", "good-2"} | {p.job_id for p in poisons if p not in defective}
    assert {job_id for job_id, job in jobs.items() if job.defect is None} == fine


def test_claim__attempts_at_the_integer_limit_never_stop_the_claim(engine: sa.Engine, db_url: str) -> None:
    """Plain SQL can leave ``attempts`` at PostgreSQL's largest integer: the claim's
    ``attempts + 1`` raised "integer out of range" for the whole claim, and a real daemon exited
    70 at each start, claiming none of its models' jobs. The count stays where it cannot move (the
    attempt is spent, so the job runs once more and a failure is final); the rest is claimed."""
    most = 2**31 - 1
    poison.insert(db_url, [poison.row("attempts-most", attempts=most), poison.row("good-1")])
    link = HeldConnection(engine)
    jobs = {job.id: job for job in queue.claim(link, worker_id="w", models=["synth"], limit=10, lease=LEASE)}
    link.close()
    assert sorted(jobs) == ["attempts-most", "good-1"]
    assert (jobs["attempts-most"].attempt, jobs["good-1"].attempt) == (most, 1)


def test_finish__a_timeout_of_a_job_whose_lease_losses_are_at_the_integer_limit_is_retried(
        engine: sa.Engine, db_url: str) -> None:
    """Plain SQL can leave ``lease_losses`` at PostgreSQL's largest integer (the rescue keeps it
    there): a backend call that then overran its time limit wrote ``lease_losses + 1``, which raised
    "integer out of range", and the job was recorded failed ("the outcome could not be stored")
    instead of retried. The count stays where it is, on both engines; the retry is written."""
    most = 2**31 - 1
    poison.insert(db_url, [poison.row("losses-most", lease_losses=most)])
    link = HeldConnection(engine)
    [job] = queue.claim(link, worker_id="w", models=["synth"], limit=1, lease=LEASE)
    written = queue.finish(link, worker_id="w", results=[
        (job, Retried(timedelta(seconds=30), "it overran its time limit", timed_out=True))])
    link.close()
    assert written == {"losses-most"}
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT status, lease_losses, error_message FROM generations")).one()
    assert tuple(row) == ("pending", most, "it overran its time limit")


def test_finish__a_value_the_database_refuses_fails_only_its_job(engine: sa.Engine, db_url: str) -> None:
    """An outcome the database cannot store (an integer past 64 bits) makes the batch be written one
    outcome at a time: that job is recorded failed naming the error, the others as they were."""
    poison.insert(db_url, [poison.row(f"j{i}", metadata='{"bpm": 90}') for i in range(3)])
    link = HeldConnection(engine)
    a, b, c = queue.claim(link, worker_id="w", models=["synth"], limit=3, lease=LEASE)
    now = utcnow()
    written = queue.finish(link, worker_id="w", results=[
        (a, Completed(now, 1.0, 2**70, {"peak": 0.5})),
        (b, Completed(now, 1.0, 10, {"peak": 0.5})),
        (c, Failed(now, "boom")),
    ])
    link.close()
    assert written == {b.id, c.id}, "a job recorded failed instead is not reported as written"
    with session_scope(engine) as s:
        ra, rb, rc = (get_generation(s, job.id) for job in (a, b, c))
        assert ra is not None and ra.status == "failed" and ra.meta == {"bpm": 90}
        assert ra.error_message is not None and ra.error_message.startswith("the outcome could not be stored")
        assert rb is not None and (rb.status, rb.file_size_bytes, rb.meta) == ("completed", 10, {"peak": 0.5})
        assert rc is not None and (rc.status, rc.error_message) == ("failed", "boom")


def test_finish_and_claim__a_refused_outcome_leaves_the_claim_for_the_next_round(engine: sa.Engine,
                                                                                  db_url: str) -> None:
    """With the claim in the same transaction, a refused outcome rolls the claim back too: the
    outcomes are written one at a time and nothing is claimed (the next round claims)."""
    poison.insert(db_url, [poison.row(f"j{i}") for i in range(4)])
    link = HeldConnection(engine)
    a, b = queue.claim(link, worker_id="w", models=["synth"], limit=2, lease=LEASE)
    now = utcnow()
    written, claimed = queue.finish_and_claim(link, worker_id="w", results=[
        (a, Completed(now, 1.0, 2**70, {})),
        (b, Completed(now, 1.0, 10, {})),
    ], models=["synth"], limit=2, lease=LEASE)
    assert (written, claimed) == ({b.id}, [])
    assert len(queue.claim(link, worker_id="w", models=["synth"], limit=10, lease=LEASE)) == 2
    link.close()
    with session_scope(engine) as s:
        assert [getattr(get_generation(s, job.id), "status", None) for job in (a, b)] == ["failed", "completed"]


def test_finish__postgresql_refuses_infinity_and_nul_in_metadata(pg_db_url: str) -> None:
    """The last line of defence on PostgreSQL, where json cannot hold an infinity and jsonb no NUL:
    the outcome is recorded failed and the stored metadata stays as it was."""
    from dgxqueue.storage import init_db

    engine = init_db(pg_db_url)
    poison.insert(pg_db_url, [poison.row(f"j{i}", metadata='{"bpm": 90}') for i in range(3)])
    link = HeldConnection(engine)
    jobs = queue.claim(link, worker_id="w", models=["synth"], limit=3, lease=LEASE)
    now = utcnow()
    metadata: list[dict[str, object]] = [{"x": float("inf")}, {"a": "\x00"}, {"fine": 1}]
    written = queue.finish(link, worker_id="w", results=[
        (job, Completed(now, 1.0, 10, meta)) for job, meta in zip(jobs, metadata)
    ])
    link.close()
    assert written == {jobs[2].id}
    rows = poison.execute(pg_db_url, "SELECT id, status, metadata::text FROM generations ORDER BY id")
    assert [(status, meta) for _, status, meta in rows] == [
        ("failed", '{"bpm": 90}'), ("failed", '{"bpm": 90}'), ("completed", '{"fine": 1}')]


def test_finish__odd_progress_stored_by_plain_sql_never_stops_a_completion(engine: sa.Engine, db_url: str) -> None:
    """A completion copies progress_total into progress_done: whatever plain SQL left there (text
    in SQLite, a negative, done past total) is copied as stored, and every outcome is written,
    in a batch, one by one (a sibling's refused outcome) and through complete_generation."""
    odd: list[tuple[object, object]] = [(40, -5), (-3, 50), (90, 50), (None, 7)]
    if engine.dialect.name == "sqlite":
        odd += [(40, "fifty"), ("forty", 50), (1.5, 2.5), (40, b"\x00")]
    ids = [f"odd-{i}" for i in range(len(odd))]
    batches = {"batch": ids, "alone": [f"{i}-alone" for i in ids], "api": [f"{i}-api" for i in ids]}
    poison.insert(db_url, [poison.row(job_id, progress_done=done, progress_total=total)
                           for chosen in batches.values() for job_id, (done, total) in zip(chosen, odd, strict=True)]
                  + [poison.row("refused")])
    link = HeldConnection(engine)
    jobs = {job.id: job for job in queue.claim(link, worker_id="w", models=["synth"], limit=100, lease=LEASE)}
    now = utcnow()
    assert queue.finish(link, worker_id="w", results=[
        (jobs[job_id], Completed(now, 1.0, 10, {})) for job_id in batches["batch"]]) == set(batches["batch"])
    assert queue.finish(link, worker_id="w", results=[(jobs["refused"], Completed(now, 1.0, 2**70, {})), *[
        (jobs[job_id], Completed(now, 1.0, 10, {})) for job_id in batches["alone"]]]) == set(batches["alone"])
    link.close()
    with session_scope(engine) as s:
        for job_id in batches["api"]:
            complete_generation(s, job_id, 1.0, 10)
    rows = {job_id: (status, done, total) for job_id, status, done, total in poison.execute(
        db_url, "SELECT id, status, progress_done, progress_total FROM generations WHERE id LIKE 'odd-%'")}
    for chosen in batches.values():
        for job_id, (done, total) in zip(chosen, odd, strict=True):
            assert rows[job_id] == ("completed", done if total is None else total, total), job_id


def test_enqueue__a_prompt_counted_to_the_integer_limit_still_enqueues(engine: sa.Engine, db_url: str) -> None:
    """Plain SQL can leave a prompt's ``used_count`` at PostgreSQL's largest integer: the enqueue's
    upsert adding one raised "integer out of range", and every enqueue of that prompt failed. The
    count stays where it is (on both engines); the job is queued, and another prompt counts on."""
    from dgxqueue import api
    from dgxqueue.config import load_settings

    most = 2**31 - 1
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO prompts (text, used_count, first_used_at, last_used_at) "
                             "VALUES ('worn out', :most, '2026-01-01', '2026-01-01')"), {"most": most})
    settings = load_settings(env={})
    job = api.enqueue("worn out", database_url=db_url, settings=settings)
    api.enqueue_many([{"prompt": text} for text in ("worn out", "fresh", "fresh")], database_url=db_url,
                     settings=settings)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM generations WHERE id = :id"), {"id": job}).scalar() == "pending"
        assert dict(conn.execute(sa.text("SELECT text, used_count FROM prompts")).all()) == {
            "worn out": most, "fresh": 2}
