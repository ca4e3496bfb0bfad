"""Migrations on real SQLite and PostgreSQL: round trips, no drift, init_db's cases, the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine

import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.errors import SchemaError
from dgxqueue.storage import get_engine, get_generation, init_db, session_scope
from dgxqueue.storage.database import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    migrations_dir,
    upgrade,
)
from dgxqueue.storage.engines import profile_of
from tests.support.producers import init_db_at_once, run_in_processes

REPO = Path(__file__).resolve().parents[2]
ALEMBIC = Path(sys.executable).parent / "alembic"
QUEUE_COLUMNS = {"priority", "attempts", "max_attempts", "run_after", "worker_id", "claimed_at",
                 "lease_expires_at"}
ISOLATION_COLUMNS = {"started_at", "lease_losses"}
FEATURE_COLUMNS = {"progress_done", "progress_total", "cancel_requested_at", "cancelled_at", "expires_at",
                   "expired_at", "dedupe_key"}
FEATURE_INDEXES = {"uq_generations_dedupe_key", "idx_generations_expires_at"}
PATH_INDEX = "uq_generations_file_path"  # migration 007
SPEC_INDEXES = {"idx_generations_status", "idx_generations_created_at", "idx_generations_model_name",
                "idx_generations_completed_at"}
SPEC_ROW = (
    "INSERT INTO generations VALUES ('a1b2c3d4-e5f6-7890-abcd-ef1234567890', "
    "'trap beat with heavy 808 bass at 140 BPM', 'musicgen-small', NULL, 16.0, 32000, 2, "
    "'outputs/a1b2c3d4.wav', NULL, 'pending', '2025-11-07 10:00:00', NULL, NULL, NULL, NULL)"
)
# The specification's tables as its diagram writes them, made by hand before dgxqueue existed.
LEGACY_SQLITE_SCHEMA = [
    """CREATE TABLE generations (
        id TEXT PRIMARY KEY, prompt TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT,
        duration_seconds REAL NOT NULL, sample_rate INTEGER NOT NULL, channels INTEGER NOT NULL,
        file_path TEXT NOT NULL, file_size_bytes INTEGER, status TEXT NOT NULL,
        created_at TIMESTAMP NOT NULL, completed_at TIMESTAMP, generation_time_seconds REAL,
        error_message TEXT, metadata TEXT)""",
    "CREATE INDEX idx_generations_status ON generations (status)",
    "CREATE INDEX idx_generations_created_at ON generations (created_at DESC)",
    "CREATE INDEX idx_generations_model_name ON generations (model_name)",
    "CREATE INDEX idx_generations_completed_at ON generations (completed_at DESC)",
    """CREATE TABLE prompts (
        id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL UNIQUE, used_count INTEGER DEFAULT 1,
        first_used_at TIMESTAMP NOT NULL, last_used_at TIMESTAMP NOT NULL)""",
    "CREATE INDEX idx_prompts_text ON prompts (text)",
]


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return current_revision(conn)


def _tables(engine: Engine) -> set[str]:
    return {name for name in sa.inspect(engine).get_table_names()
            if name != "alembic_version" and not name.startswith("generations_search")}


def _search_objects(engine: Engine) -> set[str]:
    """Migration 006's objects: the FTS5 table and its triggers, or the index and its functions."""
    with engine.connect() as conn:
        if profile_of(engine.dialect).is_file:
            return set(conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE name LIKE 'generations_search%' "
                "AND type IN ('table', 'trigger')").scalars())
        return set(conn.exec_driver_sql(
            "SELECT relname FROM pg_class WHERE relname = 'idx_generations_prompt_search' "
            "UNION ALL SELECT proname FROM pg_proc "
            "WHERE proname IN ('dgxqueue_prompt_words', 'dgxqueue_prompt_query')").scalars())


SQLITE_SEARCH = {"generations_search", "generations_search_data", "generations_search_idx",
                 "generations_search_docsize", "generations_search_config", "generations_search_insert",
                 "generations_search_delete", "generations_search_update"}
PG_SEARCH = {"idx_generations_prompt_search", "dgxqueue_prompt_words", "dgxqueue_prompt_query"}


def _columns(engine: Engine) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns("generations")}


def _indexes(engine: Engine) -> set[str]:
    return {str(i["name"]) for i in sa.inspect(engine).get_indexes("generations")} - PG_SEARCH


def _assert_at(engine: Engine, revision: str | None) -> None:
    """The database is at ``revision`` with exactly that revision's tables, columns and indexes."""
    engine.dispose()  # fresh connections: no cached schema state
    assert _revision(engine) == revision
    search = revision is not None and revision >= "006"
    assert _search_objects(engine) == (set() if not search else SQLITE_SEARCH if profile_of(engine.dialect).is_file
                                       else PG_SEARCH)
    if revision is None:
        assert _tables(engine) == set()
        return
    operator = revision not in ("001", "002", "003", "004")
    assert _tables(engine) == {"generations", "prompts"} | ({"paused_models", "daemons"} if operator else set())
    if revision == "001":
        assert not _columns(engine) & QUEUE_COLUMNS and _indexes(engine) == SPEC_INDEXES
    else:
        isolation = ISOLATION_COLUMNS if revision not in ("002", "003") else set()
        features = FEATURE_COLUMNS if operator else set()
        assert (_columns(engine) & (QUEUE_COLUMNS | ISOLATION_COLUMNS | FEATURE_COLUMNS)
                == QUEUE_COLUMNS | isolation | features)
        assert _indexes(engine) == SPEC_INDEXES | {"idx_generations_claim", "idx_generations_lease"} | (
            FEATURE_INDEXES if operator else set()) | ({PATH_INDEX} if revision >= "007" else set())


def _alembic_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run([str(ALEMBIC), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_migrations__round_trip_through_the_command_api(db_url: str) -> None:
    """upgrade head, downgrade -1, downgrade base, upgrade head: each step leaves its exact schema."""
    engine = get_engine(db_url)
    assert head_revision() == "007"
    upgrade(engine, "head")
    _assert_at(engine, "007")
    downgrade(engine, "-1")
    _assert_at(engine, "006")
    downgrade(engine, "-1")
    _assert_at(engine, "005")
    downgrade(engine, "-1")
    _assert_at(engine, "004")
    downgrade(engine, "-1")
    _assert_at(engine, "003")
    downgrade(engine, "-1")
    _assert_at(engine, "002")
    downgrade(engine, "-1")
    _assert_at(engine, "001")
    downgrade(engine, "base")
    _assert_at(engine, None)
    upgrade(engine, "head")
    _assert_at(engine, "007")
    command.check(alembic_config(db_url))  # raises AutogenerateDiffsDetected on drift


def test_migrations__round_trip_through_the_alembic_cli(db_url: str) -> None:
    """The real `alembic` command from the repository root, reading $DATABASE_URL, round trips:
    a relative step, then every other downgrade in one run, then every upgrade again. (Each
    revision's own step and schema are checked one by one through the command API above; a
    process per step here only repeated them, at a second's start-up each.)"""
    engine = get_engine(db_url)
    for args, expected in ((("upgrade", "head"), "007"), (("downgrade", "-1"), "006"),
                           (("downgrade", "base"), None), (("upgrade", "head"), "007")):
        done = _alembic_cli(db_url, *args)
        assert done.returncode == 0, done.stderr
        _assert_at(engine, expected)
    done = _alembic_cli(db_url, "check")
    assert done.returncode == 0, done.stderr
    assert "No new upgrade operations detected" in done.stdout + done.stderr


def test_migrations__check_detects_drift(db_url: str) -> None:
    """`alembic check` fails when the database differs from the models (so it can catch drift)."""
    engine = init_db(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX idx_generations_model_name")
    done = _alembic_cli(db_url, "check")
    assert done.returncode != 0 and "idx_generations_model_name" in done.stdout + done.stderr


def test_init_db__creates_a_new_database_at_head(db_url: str) -> None:
    """init_db on an empty database creates the schema at head."""
    engine = init_db(db_url)
    _assert_at(engine, head_revision())
    assert init_db(db_url) is engine  # a second call is a no-op on the same engine


def test_init_db__upgrades_an_older_database_keeping_its_rows(db_url: str) -> None:
    """A database at 001 holding a row is upgraded to head; the row is kept and gets 002's defaults."""
    engine = get_engine(db_url)
    upgrade(engine, "001")
    with engine.begin() as conn:
        conn.exec_driver_sql(SPEC_ROW)
    init_db(db_url)
    _assert_at(engine, head_revision())
    with session_scope(engine) as session:
        gen = get_generation(session, "a1b2c3d4-e5f6-7890-abcd-ef1234567890")
        assert gen is not None and gen.prompt == "trap beat with heavy 808 bass at 140 BPM"
        assert (gen.status, gen.priority, gen.attempts, gen.max_attempts) == ("pending", 0, 0, 3)
        assert (gen.started_at, gen.lease_losses) == (None, 0)


def test_init_db__refuses_a_database_from_a_newer_dgxqueue(db_url: str) -> None:
    """A database stamped with a revision this code does not know raises SchemaError, untouched."""
    engine = init_db(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '099_from_the_future'")
    with pytest.raises(SchemaError) as caught:
        init_db(db_url)
    message = str(caught.value)
    assert "'099_from_the_future'" in message and "newer dgxqueue" in message and "'007'" in message
    assert _revision(engine) == "099_from_the_future"


def test_init_db__adopts_a_legacy_database_without_alembic_version(sqlite_db_url: str) -> None:
    """A SQLite database made from the spec's tables by hand is adopted as 001 and upgraded."""
    engine = get_engine(sqlite_db_url)
    with engine.begin() as conn:
        for statement in LEGACY_SQLITE_SCHEMA:
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql(SPEC_ROW)
        conn.exec_driver_sql("INSERT INTO prompts (text, first_used_at, last_used_at) VALUES "
                             "('trap beat with heavy 808 bass at 140 BPM', '2025-11-07 09:00:00', "
                             "'2025-11-07 11:30:00')")
    init_db(sqlite_db_url)
    _assert_at(engine, head_revision())
    dgxqueue.enqueue("trap beat with heavy 808 bass at 140 BPM", database_url=sqlite_db_url,
                     settings=load_settings(env={}))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM generations").scalar() == 2
        assert conn.exec_driver_sql("SELECT used_count FROM prompts").scalar() == 2


def test_init_db__concurrent_processes_on_a_new_database(db_url: str) -> None:
    """Three processes running init_db at once on one new database all succeed; it ends at head."""
    revisions = run_in_processes(init_db_at_once, [(db_url,)] * 3)
    assert revisions == [head_revision()] * 3
    _assert_at(get_engine(db_url), head_revision())


def _run(*args: str | Path, **kwargs: object) -> str:
    """Run a command to completion; its stdout (CalledProcessError with its stderr on failure)."""
    try:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=180,
                              check=True, **kwargs)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"{exc.cmd} failed:\n{exc.stdout}\n{exc.stderr}") from None
    return str(done.stdout)


@pytest.mark.slow
def test_wheel__installed_package_finds_its_migrations(tmp_path: Path) -> None:
    """Installed from a wheel and run outside the checkout, init_db finds the bundled migrations."""
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, REPO)
    [wheel] = wheels.glob("dgxqueue-*.whl")
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # Reuse this environment's dependencies, but not its editable dgxqueue: a folder named in a
    # .pth file joins sys.path without the .pth files inside it being processed.
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    database = elsewhere / "db" / "generations.db"
    probe = (
        "import dgxqueue\n"
        "from dgxqueue.storage import init_db\n"
        "from dgxqueue.storage.database import current_revision, migrations_dir\n"
        "engine = init_db()\n"
        "with engine.connect() as conn:\n"
        "    print(dgxqueue.__file__, migrations_dir(), current_revision(conn), sep='\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    output = _run(python, "-c", probe, cwd=elsewhere, env={**env, "DATABASE_URL": f"sqlite:///{database}"})
    package_file, found, revision = output.split()
    assert Path(package_file).is_relative_to(venv), package_file
    assert Path(found) == Path(package_file).parent / "_alembic"
    assert revision == head_revision() and database.is_file()
    assert migrations_dir() == REPO / "alembic"  # this checkout still uses its own alembic/


def test_head_revision__constant_matches_the_scripts() -> None:
    """HEAD_REVISION, which lets a daemon skip loading alembic, names the newest migration script."""
    from dgxqueue.storage.database import HEAD_REVISION, head_revision

    assert head_revision() == HEAD_REVISION


_SPEC_COLUMNS = ("id, prompt, model_name, model_version, duration_seconds, sample_rate, channels, file_path, "
                 "file_size_bytes, status, created_at, completed_at, generation_time_seconds, error_message, metadata")
_OLD_ROWS = [
    f"INSERT INTO generations ({_SPEC_COLUMNS}) VALUES ('a1b2c3d4-e5f6-7890-abcd-ef1234567890', "
    "'trap beat with heavy 808 bass at 140 BPM', 'musicgen-small', NULL, 16.0, 32000, 2, "
    "'outputs/a1b2c3d4.wav', NULL, 'pending', '2025-11-07 10:00:00', NULL, NULL, NULL, NULL)",
    f"INSERT INTO generations ({_SPEC_COLUMNS}) VALUES ('b2c3d4e5-f6a7-8901-bcde-f12345678901', "
    "'chill lo-fi hip hop with piano', 'musicgen-small', '1.0', 30.0, 32000, 2, 'outputs/b2c3d4e5.wav', "
    "5242880, 'completed', '2025-11-07 09:00:00', '2025-11-07 09:00:22', 22.3, NULL, NULL)",
]


def test_migration_006__indexes_existing_rows_and_downgrade_removes_the_index(db_url: str) -> None:
    """Rows written before 006 are found by a search once it runs; 006's downgrade keeps every row and
    removes the index; upgrading again indexes them again."""
    from dgxqueue.storage.search import search_ids

    engine = get_engine(db_url)
    upgrade(engine, "005")
    with engine.begin() as conn:
        for statement in _OLD_ROWS:
            conn.exec_driver_sql(statement)

    def found() -> tuple[list[str], list[str], list[str]]:
        with session_scope(engine) as session:
            return (search_ids(session, "808 TRAP"), search_ids(session, "lo piano"), search_ids(session, "bpm"))

    trap, chill = "a1b2c3d4-e5f6-7890-abcd-ef1234567890", "b2c3d4e5-f6a7-8901-bcde-f12345678901"
    upgrade(engine, "006")
    assert found() == ([trap], [chill], [trap])
    downgrade(engine, "005")
    _assert_at(engine, "005")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM generations").scalar() == 2
    upgrade(engine, "006")
    _assert_at(engine, "006")
    assert found() == ([trap], [chill], [trap])


def test_migration_007__refuses_rows_sharing_a_file_and_names_them(db_url: str) -> None:
    """A database at 006 where two jobs share a file_path (the later one's audio replaced the
    earlier's finished file) is not migrated: the error names the path and both jobs, and nothing
    changes. Once each row has its own path, it upgrades."""
    engine = get_engine(db_url)
    upgrade(engine, "006")
    with engine.begin() as conn:
        for statement in _OLD_ROWS:
            conn.exec_driver_sql(statement.replace("outputs/b2c3d4e5.wav", "outputs/a1b2c3d4.wav"))
    with pytest.raises(SchemaError) as caught:
        init_db(db_url)
    message = str(caught.value)
    assert "'outputs/a1b2c3d4.wav'" in message and "a1b2c3d4-e5f6-7890-abcd-ef1234567890" in message
    assert "b2c3d4e5-f6a7-8901-bcde-f12345678901" in message and "own file_path" in message
    _assert_at(engine, "006")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE generations SET file_path = 'outputs/b2c3d4e5.wav' WHERE status = 'completed'")
    init_db(db_url)
    _assert_at(engine, "007")


@pytest.mark.parametrize("length", [12, 4000])
def test_migration_007__a_plain_sql_row_naming_a_taken_file_is_refused(db_url: str, length: int) -> None:
    """After 007 the database itself refuses a second row with a job's file_path, and an update
    that would make two share one, however long the path (PostgreSQL indexes its md5: a b-tree entry
    cannot hold 4,000 bytes); a path of its own, as long, is stored."""
    engine = init_db(db_url)
    path = "outputs/" + "d/" * ((length - 12) // 2) + "x.wav"
    with engine.begin() as conn:
        conn.exec_driver_sql(_OLD_ROWS[0].replace("outputs/a1b2c3d4.wav", path))
        conn.exec_driver_sql(_OLD_ROWS[1].replace("outputs/b2c3d4e5.wav", path[:-5] + "y.wav"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.exec_driver_sql(_OLD_ROWS[1].replace("b2c3d4e5-f6a7", "c3d4e5f6-a7b8").replace(
            "outputs/b2c3d4e5.wav", path))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE generations SET file_path = :path WHERE status = 'completed'"), {"path": path})
    with engine.connect() as conn:
        assert sorted(conn.exec_driver_sql("SELECT file_path FROM generations").scalars()) == [
            path, path[:-5] + "y.wav"]


def test_migration_007__failed_rows_sharing_a_file_migrate(db_url: str) -> None:
    """A failed job never wrote its file: failed rows sharing a path with each other or with a job
    that completed do not stop migration 007, and after it a failed row may still name a path."""
    engine = get_engine(db_url)
    upgrade(engine, "006")
    shared = "outputs/b2c3d4e5.wav"
    with engine.begin() as conn:
        conn.exec_driver_sql(_OLD_ROWS[1])  # completed, at the shared path
        for row in (_OLD_ROWS[0], _OLD_ROWS[0].replace("a1b2c3d4-e5f6", "a1b2c3d4-0000")):
            conn.exec_driver_sql(row.replace("outputs/a1b2c3d4.wav", shared).replace("'pending'", "'failed'"))
    init_db(db_url)
    _assert_at(engine, "007")
    with engine.begin() as conn:
        conn.exec_driver_sql(_OLD_ROWS[0].replace("a1b2c3d4-e5f6", "a1b2c3d4-1111")
                             .replace("outputs/a1b2c3d4.wav", shared).replace("'pending'", "'failed'"))
        assert conn.exec_driver_sql("SELECT count(*) FROM generations").scalar() == 4

