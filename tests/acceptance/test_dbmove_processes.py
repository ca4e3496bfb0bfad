"""``dgxqueue db copy`` and ``dgxqueue archive`` as processes: SQLite to a real PostgreSQL, killed
with SIGKILL part-way and run again; a real daemon finishing the copied queue; refusals that write
nothing."""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import sqlalchemy as sa

from dgxqueue.cli import main
from dgxqueue.storage import create_engine, create_generations, dispose_engines, session_scope, track_prompt_usage
from dgxqueue.storage.models import PAUSED, G, P, utcnow
from dgxqueue.storage.transfer import COPIED
from tests.support.db import postgres_database_url, postgres_schema_url, sqlite_url
from tests.support.processes import start_worker, stop, wait_until, worker_config
from tests.support.transfer import (
    dgxqueue_env,
    fill_queue,
    popen_dgxqueue,
    register_daemon,
    run_dgxqueue,
    table_rows,
)


@pytest.fixture
def pg_target() -> Iterator[str]:
    """An empty database on the PostgreSQL server: the copy or archive migrates it."""
    with postgres_database_url() as url:
        yield url
        dispose_engines()


def _same_tables(source: str, target: str) -> None:
    for table in COPIED:
        assert table_rows(target, table) == table_rows(source, table), table.name


def _copied_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("copied ")]


def test_db_copy__every_status_to_postgres_then_a_daemon_finishes_the_pending(tmp_path: Path, pg_target: str) -> None:
    """Every state crosses over exactly (ids, attempts, leases, times, metadata, prompt counts,
    paused models); a second run copies nothing; the prompts' sequence is past the copied ids; a
    daemon process on the target finishes the pending, retrying and abandoned jobs."""
    source = sqlite_url(tmp_path)
    roles = fill_queue(source)
    register_daemon(source, "long-gone")
    engine = create_engine(source)
    with engine.begin() as conn:  # stale: its lease ran out, so it no longer counts as live
        conn.execute(sa.text("UPDATE daemons SET expires_at = '2000-01-01 00:00:00.000000'"))
    engine.dispose()

    first = run_dgxqueue(source, "db", "copy", "--to", pg_target, "--batch-size", "3")
    assert first.returncode == 0, first.stderr
    assert "done: the queue is copied" in first.stdout
    _same_tables(source, pg_target)
    assert table_rows(pg_target, G)[roles["leased"]] == table_rows(source, G)[roles["leased"]]
    assert table_rows(pg_target, PAUSED), "paused models travel"
    target = create_engine(pg_target)
    with target.connect() as conn:  # the registry does not: its entries are the source's processes
        assert conn.execute(sa.text("SELECT count(*) FROM daemons")).scalar_one() == 0

    again = run_dgxqueue(source, "db", "copy", "--to", pg_target, "--batch-size", "3")
    assert again.returncode == 0, again.stderr
    assert _copied_lines(again.stdout) and all(line.endswith(" 0 new") for line in _copied_lines(again.stdout))
    _same_tables(source, pg_target)

    top = max(table_rows(source, P))
    with session_scope(target) as session:  # a new prompt takes an id past the copied ones
        assert track_prompt_usage(session, "a prompt first used on PostgreSQL").id > top

    config = worker_config(tmp_path, pg_target, generator="synth", rescue_interval_seconds=0.2)
    worker = start_worker(config, tmp_path / "worker.log")
    unfinished = [roles[name] for name in ("pending", "retrying", "leased", "late")]

    def finished() -> bool:
        with target.connect() as conn:
            statuses = conn.execute(sa.select(G.c.status).where(G.c.id.in_(unfinished))).scalars().all()
        return sorted(statuses) == ["completed"] * len(unfinished)

    try:
        wait_until(finished, 90, "the daemon on the target to finish the copied jobs", alive=worker)
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    target.dispose()
    after, before = table_rows(pg_target, G), table_rows(source, G)
    for name in ("cancelled", "completed", "failed", "expired"):
        assert after[roles[name]] == before[roles[name]], name


def test_db_copy__killed_after_its_first_batch_then_rerun_gives_the_same_result(
        tmp_path: Path, pg_target: str) -> None:
    """SIGKILL once the first batch of generations is reported committed: the rerun copies the
    rest, duplicating nothing, and verifies."""
    source = sqlite_url(tmp_path)
    fill_queue(source, extra=120)
    process = popen_dgxqueue(source, "db", "copy", "--to", pg_target, "--batch-size", "4")
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("copied generations:"):
            process.send_signal(signal.SIGKILL)
            break
    process.stdout.close()
    assert process.wait(60) == -signal.SIGKILL, "".join(seen)
    partial = len(table_rows(pg_target, G))
    assert 4 <= partial < len(table_rows(source, G))

    rerun = run_dgxqueue(source, "db", "copy", "--to", pg_target, "--batch-size", "4")
    assert rerun.returncode == 0, rerun.stderr
    new = sum(int(line.split(", ")[1].split()[0]) for line in _copied_lines(rerun.stdout)
              if line.startswith("copied generations:"))
    assert new == len(table_rows(source, G)) - partial
    _same_tables(source, pg_target)


def test_db_copy__refuses_live_daemons_naming_them_and_writes_nothing(tmp_path: Path) -> None:
    """Live on the source: refused before the target is even created; live on the target: refused
    before a row is copied."""
    source = sqlite_url(tmp_path)
    fill_queue(source)
    register_daemon(source, "gpu-host:4242")
    target = tmp_path / "target.db"
    done = run_dgxqueue(source, "db", "copy", "--to", f"sqlite:///{target}")
    assert done.returncode == 75
    assert "gpu-host:4242" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not target.exists()
    engine = create_engine(source)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM daemons"))
    engine.dispose()
    fill_queue(f"sqlite:///{target}")  # only to migrate it: a daemon of its own serves it
    engine = create_engine(f"sqlite:///{target}")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM generations"))
        conn.execute(sa.text("DELETE FROM prompts"))
    engine.dispose()
    register_daemon(f"sqlite:///{target}", "target-host:7")
    done = run_dgxqueue(source, "db", "copy", "--to", f"sqlite:///{target}")
    assert done.returncode == 75 and "target-host:7" in done.stderr and "target" in done.stderr
    assert table_rows(f"sqlite:///{target}", G) == {}


def test_db_copy__refuses_a_target_holding_other_jobs_and_writes_nothing(tmp_path: Path) -> None:
    source = sqlite_url(tmp_path)
    fill_queue(source)
    target = f"sqlite:///{tmp_path / 'other.db'}"
    fill_queue(target)  # another queue: same prompts, other ids
    before = {table.name: table_rows(target, table) for table in COPIED}
    done = run_dgxqueue(source, "db", "copy", "--to", target)
    assert done.returncode == 65
    assert "nothing was copied" in done.stderr and len(done.stderr.splitlines()) == 1
    assert {table.name: table_rows(target, table) for table in COPIED} == before


def _here(source: str, *args: str) -> tuple[int, str]:
    """``main(ARGS)`` in this process (a subprocess costs a second of start-up per case): the exit
    code and stderr."""
    err = io.StringIO()
    with mock.patch.dict(os.environ, dgxqueue_env(source), clear=True), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(err):
        code = main(list(args))
    dispose_engines()
    return code, err.getvalue()


def test_db_copy_and_archive__bad_input_names_the_field_and_writes_nothing(tmp_path: Path) -> None:
    source = sqlite_url(tmp_path)
    fill_queue(source)
    before = table_rows(source, G)
    target = tmp_path / "target.db"
    done = run_dgxqueue(source, "db", "copy", "--to", "postgresql://u@host:notaport/db")  # one as a process
    assert (done.returncode, len(done.stderr.splitlines())) == (65, 1) and "to=" in done.stderr
    cases = [
        (("db", "copy", "--to", "mysql://u@host/db"), "to="),
        (("db", "copy", "--to", "sqlite://"), "to="),
        (("db", "copy", "--to", source), "a database other than the source"),
        (("db", "copy", "--to", f"sqlite:///{target}", "--batch-size", "0"), "batch_size="),
        (("archive", "--older-than", "30x", "--to", f"sqlite:///{target}"), "older_than="),
        (("archive", "--older-than", "30d", "--to", "not a url"), "to="),
        (("archive", "--older-than", "30d", "--to", f"sqlite:///{target}", "--batch-size", "many"), "batch_size="),
    ]
    for args, field in cases:
        code, err = _here(source, *args)
        assert code == 65, (args, err)
        assert field in err and len(err.splitlines()) == 1, (args, err)
    assert not target.exists()
    assert table_rows(source, G) == before


# --- archive -------------------------------------------------------------------------------------


def _archive_queue(url: str, *, old: int) -> tuple[set[str], dict[str, tuple[object, ...]]]:
    """``old`` jobs finished 40 days ago (completed, failed, cancelled, expired), and the jobs no
    archive takes: every state of fill_queue, finished recently or not at all. Returns the old ids
    and the rows of the others."""
    roles = fill_queue(url)
    engine = create_engine(url)
    then = utcnow() - timedelta(days=40)
    try:
        with session_scope(engine) as session:
            ids = create_generations(session, [{"prompt": f"archived tune {i % 4}", "model_name": "synth",
                                                "duration_seconds": 0.5, "metadata": {"n": i}} for i in range(old)])
            for i, job_id in enumerate(ids):
                ended = then - timedelta(minutes=i)
                values: dict[str, object] = {"created_at": ended - timedelta(minutes=3), "completed_at": ended,
                                             "attempts": 1 + i % 3}
                outcomes: list[dict[str, object]] = [
                    {"status": "completed", "file_size_bytes": 1000 + i, "generation_time_seconds": 1.5},
                    {"status": "failed", "error_message": "the backend broke"},
                    {"status": "failed", "error_message": "cancelled by request", "cancelled_at": ended},
                    {"status": "failed", "error_message": "expired", "expired_at": ended},
                ]
                values.update(outcomes[i % 4])
                session.execute(sa.update(G).where(G.c.id == job_id).values(**values))
    finally:
        engine.dispose()
    rows = table_rows(url, G)
    assert set(roles.values()) <= set(rows)
    return set(ids), {job_id: row for job_id, row in rows.items() if job_id not in ids}


def _in_one_or_both_identical(source: str, target: str, old: set[str], kept: dict[str, tuple[object, ...]],
                              originals: dict[str, tuple[object, ...]]) -> set[str]:
    """Every old job is somewhere, unchanged, and where it is twice the copies are identical (a
    kill between the archive's commit and the source's); the others are untouched. Returns the
    ids found at both."""
    here, there = table_rows(source, G), table_rows(target, G)
    assert set(there) <= old, "only old finished jobs reach the archive"
    for job_id in old:
        assert job_id in here or job_id in there, f"{job_id} lost"
        assert (here.get(job_id) or there[job_id]) == originals[job_id]
        if job_id in here and job_id in there:
            assert here[job_id] == there[job_id]
    assert {job_id: row for job_id, row in here.items() if job_id not in old} == kept
    return {job_id for job_id in old if job_id in here and job_id in there}


def _archive_counts_match(target: str) -> None:
    """The archive's prompts count its generations: never twice, whatever was killed when."""
    engine = create_engine(target)
    try:
        with engine.connect() as conn:
            used: dict[str, int] = dict(conn.execute(sa.select(G.c.prompt, sa.func.count()).group_by(G.c.prompt)).all())
            counted: dict[str, int] = dict(conn.execute(sa.select(P.c.text, P.c.used_count)).all())
    finally:
        engine.dispose()
    assert counted == used


def test_archive__sigkill_at_random_points_every_finished_job_in_exactly_one_database(
        tmp_path: Path, pg_target: str) -> None:
    """Killed at the step between the archive's commit and the source's, then at random points of
    several runs: nothing is lost, nothing doubled; the last run leaves each old finished job in
    exactly one database, and the unfinished and recent ones where they were, unchanged."""
    source = sqlite_url(tmp_path)
    old, kept = _archive_queue(source, old=60)
    originals = {job_id: row for job_id, row in table_rows(source, G).items() if job_id in old}
    prompts_before = table_rows(source, P)
    args = ("archive", "--older-than", "30d", "--to", pg_target, "--batch-size", "4")

    died = run_dgxqueue(source, *args, DGXQ_TEST_KILL_AT="archive-committed")
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert len(_in_one_or_both_identical(source, pg_target, old, kept, originals)) == 4

    seed = random.randrange(1 << 30)
    chance = random.Random(seed)
    killed_mid_run = 0
    for _ in range(6):
        process = popen_dgxqueue(source, *args)
        assert process.stdout is not None
        reported = 0
        for _line in range(chance.randrange(4)):
            if not process.stdout.readline():
                break
            reported += 1
        # Not a wait for anything: a random point inside the next batch, where the kill lands.
        threading.Event().wait(chance.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        killed_mid_run += process.wait(60) == -signal.SIGKILL and reported > 0
        process.stdout.close()
        _in_one_or_both_identical(source, pg_target, old, kept, originals)
        _archive_counts_match(pg_target)

    assert killed_mid_run, f"no run was killed after a batch (seed {seed}): the test tested nothing"
    last = run_dgxqueue(source, *args)
    assert last.returncode == 0, (seed, last.stderr)
    assert not _in_one_or_both_identical(source, pg_target, old, kept, originals), seed
    assert set(table_rows(pg_target, G)) == old, seed
    _archive_counts_match(pg_target)
    assert table_rows(source, P) == prompts_before, "the source's prompts keep their counts"


def test_archive__dry_run_counts_and_writes_nothing(tmp_path: Path) -> None:
    source = sqlite_url(tmp_path)
    old, kept = _archive_queue(source, old=8)
    target = tmp_path / "archive.db"
    done = run_dgxqueue(source, "archive", "--older-than", "30d", "--to", f"sqlite:///{target}", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would archive 8 generations" in done.stdout and "2 completed, 6 failed" in done.stdout
    assert not target.exists()
    assert len(table_rows(source, G)) == len(old) + len(kept)


def test_archive__a_row_the_archive_holds_differently_stays_here_and_exits_65(tmp_path: Path) -> None:
    """Never overwritten, never deleted here; the rest of the batch moves."""
    (tmp_path / "src").mkdir()
    (tmp_path / "arc").mkdir()
    source, target = sqlite_url(tmp_path / "src"), sqlite_url(tmp_path / "arc")
    old, kept = _archive_queue(source, old=6)
    clash = sorted(old)[2]
    engine = create_engine(source)
    with engine.begin() as conn:  # the archive holds a copy that was changed since
        row = conn.execute(sa.select(*G.columns).where(G.c.id == clash)).mappings().one()
    engine.dispose()
    fill_queue(target)
    engine = create_engine(target)
    with engine.begin() as conn:
        conn.execute(sa.insert(G).values({**row, "error_message": "edited in the archive"}))
    engine.dispose()

    done = run_dgxqueue(source, "archive", "--older-than", "30d", "--to", target, "--batch-size", "4")
    assert done.returncode == 65
    assert clash in done.stderr and "error_message" in done.stderr
    assert set(table_rows(source, G)) - set(kept) == {clash}
    assert old - {clash} <= set(table_rows(target, G))


def _alias_of(url: str) -> str:
    """The same PostgreSQL database under a URL that names the server otherwise: a host name
    libpq only uses for authentication, the address given as ``hostaddr`` (as a connection
    pooler or a second DNS name would also look)."""
    parsed = sa.engine.make_url(url)
    address = socket.gethostbyname(parsed.host or "127.0.0.1")
    return parsed.set(host="the-queue-server", query={**parsed.query, "hostaddr": address}) \
        .render_as_string(hide_password=False)


def test_db_copy_and_archive__refuse_the_source_itself_under_another_url(pg_target: str) -> None:
    """Archive into its own database would find each row 'already archived' there and delete it:
    both commands ask the servers, not the URLs, whether the target is the source."""
    old, kept = _archive_queue(pg_target, old=6)
    before = table_rows(pg_target, G)
    alias = _alias_of(pg_target)
    for args in (("archive", "--older-than", "30d", "--to", alias), ("db", "copy", "--to", alias)):
        done = run_dgxqueue(pg_target, *args)
        assert done.returncode == 65, (args, done.stdout, done.stderr)
        assert "a database other than the source" in done.stderr, done.stderr
    assert table_rows(pg_target, G) == before
    assert old <= set(before) and set(kept) <= set(before)


def test_db_copy__a_daemon_that_started_on_the_source_during_the_copy_is_refused(tmp_path: Path) -> None:
    """The check before the copy is not enough: a daemon that starts meanwhile and has changed
    nothing yet lets the verification pass, then works on the old queue (a job both queues hold
    runs twice). The copy waits on a lock the test holds at the target while the daemon starts."""
    source = sqlite_url(tmp_path)
    fill_queue(source)
    with postgres_database_url(at_head=True) as target:
        engine = create_engine(target)
        try:
            with engine.connect() as hold:
                holder = hold.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
                hold.execute(sa.text("LOCK TABLE paused_models IN ACCESS EXCLUSIVE MODE"))
                process = popen_dgxqueue(source, "db", "copy", "--to", target)
                activity = sa.table("pg_stat_activity", sa.column("pid"))
                blocked = sa.select(sa.func.count()).select_from(activity).where(
                    sa.func.array_position(sa.func.pg_blocking_pids(activity.c.pid), holder).is_not(None))

                def waiting() -> bool:
                    with engine.connect() as watcher:  # a new snapshot of pg_stat_activity each time
                        return bool(watcher.execute(blocked).scalar_one())

                wait_until(waiting, 60, "the copy waiting for the held lock", alive=process)  # type: ignore[arg-type]
                register_daemon(source, "late-host:99")
                hold.commit()
            output, _ = process.communicate(timeout=120)
        finally:
            engine.dispose()
            dispose_engines()
    assert process.returncode == 75, output
    assert "late-host:99" in output and "done" not in output, output


def test_archive__a_row_whose_id_is_not_text_is_reported_and_the_run_ends(tmp_path: Path) -> None:
    """Plain SQL can key a SQLite row by a blob: the archive refuses it (not a str), and must
    then leave it out of the next batch, not choose and refuse it forever under the write lock."""
    (tmp_path / "src").mkdir()
    (tmp_path / "arc").mkdir()
    source, target = sqlite_url(tmp_path / "src"), sqlite_url(tmp_path / "arc")
    old, kept = _archive_queue(source, old=3)
    engine = create_engine(source)
    with engine.begin() as conn:
        row = conn.execute(sa.select(*G.columns).where(G.c.id == sorted(old)[0])).mappings().one()
        conn.execute(sa.insert(G).values({**row, "id": b"\x00\xff", "file_path": "outputs/blob.wav"}))
    engine.dispose()
    done = run_dgxqueue(source, "archive", "--older-than", "30d", "--to", target, timeout=60)
    assert done.returncode == 65, done.stderr
    assert "not a str" in done.stderr, done.stderr
    assert set(table_rows(target, G)) == old
    assert set(table_rows(source, G)) == set(kept) | {b"\x00\xff"}


def test_db_copy__to_another_schema_of_the_same_postgres_database() -> None:
    """Two queues in one database, apart by ``search_path``: the target is not the source
    (the servers say so), and the copy goes through."""
    with postgres_schema_url() as source, postgres_schema_url() as target:
        fill_queue(source)
        done = run_dgxqueue(source, "db", "copy", "--to", target)
        assert done.returncode == 0, done.stderr
        _same_tables(source, target)
        dispose_engines()
