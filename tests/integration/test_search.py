"""Prompt search on real SQLite (FTS5) and real PostgreSQL (GIN): the same rows for the same
queries, odd ones included, and the index kept by every write."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.errors import ValidationError
from dgxqueue.storage import get_engine, init_db, session_scope
from dgxqueue.storage.models import G
from dgxqueue.storage.search import MAX_WORD_CHARS, matching_rows, prompt_search_clause, search_ids

REPO = Path(__file__).resolve().parents[2]

PROMPTS = [
    "chill lo-fi hip hop with piano",
    "Lo-Fi PIANO, café",
    "LOFI piano beats 24/7",
    "trap beat with heavy 808 bass at 140 BPM",
    "andante AND strings OR NOT",
    'say "hi" NEAR(x, y) *star*',
    "prompt: col:filter ^caret {braces} +plus -minus",
    "ΟΔΟΣ Straße naïve Ñandú",
    "東京 night drive 夜",
    "emoji 🎹🎶 piano",
    "tabs\tand\nnewlines",
    "x²½ v1.5 e-mail me@example.com http://a.b/c",
    "the pianist's piano-forte",
    "under_score snake_case",
    "ÉCOLE école",
    "O'Brien's reel",
    "word" + "y" * 300 + " tail",
    # Decomposed accents (NFD, as macOS writes text): a combining accent FTS5 counts as a diacritic
    # stays in its word; one it does not (U+0305) separates; one before any letter is no word.
    "Re\u0301sume\u0301 nai\u0308ve x\u0305y \u0301lead",
]
QUERIES = [
    "lofi piano", "lo fi", "LO-FI", "pia", "piano", "AND", "OR", "NOT", "and or", "NEAR(", "NEAR(x",
    '"hi"', 'say "', "star*", "*star", "col:filter", "prompt:chill", "^caret", "{braces}", "+plus", "-minus",
    "café", "cafe", "caf", "ΟΔΟΣ", "οδοσ", "οδος", "straße", "STRASSE", "naïve", "naive", "ñandú", "東京", "夜",
    "🎹 piano", "24/7", "1.5", "me@example.com", "example com", "v1", "under_score", "snake", "école", "ÉCOLE",
    "o'brien", "brien's", "the", "a b c d", "piano piano", "wordyyy", "word" + "y" * (MAX_WORD_CHARS - 4),
    "re\u0301sume\u0301", "re\u0301s", "sume", "re", "nai\u0308ve", "nai", "ve", "x\u0305y", "y", "lead",
    "\u0301lead", "re\u0301sume\u0301 \u0301",
    # Only punctuation or symbols: no word, nothing found, no error.
    '"', "*", "🎹", "-", "()", '"" AND *',
]


#: The combining accents FTS5's unicode61 tokenizer keeps inside a word (its "diacritics").
_ACCENTS = {chr(c) for c in (*range(0x300, 0x305), *range(0x306, 0x30D), 0x30F, 0x311, 0x31B, *range(0x323, 0x329),
                             0x32D, 0x32E, 0x330, 0x331)}


def _words(text: str) -> list[str]:
    """The semantics in plain Python (storage/search.py's docstring): runs of L* and Nd (and, after
    the first, the combining accents above), lower case (a final sigma as sigma)."""
    words, current = [], ""
    for char in text + " ":
        if unicodedata.category(char)[0] == "L" or unicodedata.category(char) == "Nd" or (current and char in _ACCENTS):
            current += char
        elif current:
            words.append(current.lower().replace("\u03c2", "\u03c3"))
            current = ""
    return words


def _expected(query: str, rows: list[tuple[str, str]]) -> list[str]:
    asked = _words(query)
    return [job_id for job_id, prompt in rows
            if asked and all(any(word.startswith(term) for word in _words(prompt)) for term in asked)]


def _fill(engine: Engine, prompts: list[str]) -> list[tuple[str, str]]:
    """The prompts as rows with fixed ids, each created a second after the last; (id, prompt)
    newest first, the order a search returns them."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [{"id": f"{n:08d}-0000-4000-8000-000000000000", "prompt": prompt, "model_name": "m",
             "duration_seconds": 1.0, "sample_rate": 32000, "channels": 1, "file_path": f"outputs/{n}.wav",
             "status": "pending", "created_at": start + timedelta(seconds=n)} for n, prompt in enumerate(prompts)]
    with engine.begin() as conn:
        conn.execute(sa.insert(G), rows)
    return [(str(row["id"]), str(row["prompt"])) for row in reversed(rows)]


def _search(engine: Engine, query: str, **filters: str) -> list[str]:
    with session_scope(engine) as session:
        return search_ids(session, query, **filters)  # type: ignore[arg-type]


def test_search__same_ids_on_sqlite_and_postgresql(sqlite_db_url: str, pg_db_url: str) -> None:
    """Every query, odd ones included (FTS5 and tsquery syntax, unicode, punctuation only), finds the
    same ids on both engines, and the ids the semantics written in Python expect."""
    engines = [init_db(sqlite_db_url), init_db(pg_db_url)]
    rows = _fill(engines[0], PROMPTS)
    assert _fill(engines[1], PROMPTS) == rows
    differences = []
    for query in QUERIES:
        found = [_search(engine, query) for engine in engines]
        if not found[0] == found[1] == _expected(query, rows):
            differences.append((query, found, _expected(query, rows)))
    assert differences == []
    assert _search(engines[0], "piano") == _expected("piano", rows) != []  # the test can fail


def test_search__a_decomposed_prompt_is_found_by_its_own_words_on_both_engines(
        sqlite_db_url: str, pg_db_url: str) -> None:
    """A prompt with decomposed accents (NFD: 'e' then U+0301) is found by a query of its own text
    and not by the part after an accent, the same on SQLite (whose FTS5 keeps the accent in the
    word) and PostgreSQL."""
    prompt = "Re\u0301sume\u0301 nai\u0308ve"
    for url in (sqlite_db_url, pg_db_url):
        engine = init_db(url)
        rows = _fill(engine, [prompt, "sume ve"])
        assert _search(engine, prompt) == [rows[1][0]], url
        assert _search(engine, "re\u0301s") == [rows[1][0]], url
        assert _search(engine, "sume") == [rows[0][0]], url


def test_search__postgresql_sends_no_notice_per_search(pg_db_url: str) -> None:
    """A search on PostgreSQL plans without a NOTICE (an empty tsquery literal, folded at planning,
    sent one to the client and, with log_min_messages = notice, the server log, per search)."""
    engine = init_db(pg_db_url)
    rows = _fill(engine, ["piano"])
    notices: list[str] = []
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        raw.add_notice_handler(lambda notice: notices.append(str(notice.message_primary)))
        with Session(conn) as session:  # on the connection that listens
            assert search_ids(session, "piano") == [rows[0][0]]
    assert notices == []


def test_search__filters_by_status_and_model_and_limits(engine: Engine) -> None:
    """status and model narrow the results; limit and offset page them, newest first."""
    rows = _fill(engine, ["piano one", "piano two", "piano three", "guitar"])
    with engine.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == rows[1][0]).values(status="completed", model_name="other"))
    ids = [job_id for job_id, _ in rows]
    assert _search(engine, "piano") == ids[1:]
    assert _search(engine, "piano", status="completed") == [ids[1]]
    assert _search(engine, "piano", model="m") == [ids[2], ids[3]]
    with session_scope(engine) as session:
        assert search_ids(session, "piano", limit=1, offset=1) == [ids[2]]


@pytest.mark.parametrize("query", ["", "   ", "\t\n", "word " * 40, "x" * (MAX_WORD_CHARS + 1), "y " * 600])
def test_search__bad_queries_raise_a_typed_error_naming_the_field(engine: Engine, query: str) -> None:
    """An empty query, too many words, too long a word or query: ValidationError naming 'search'."""
    with session_scope(engine) as session, pytest.raises(ValidationError) as caught:
        search_ids(session, query)
    assert caught.value.field == "search"


@pytest.mark.parametrize("model", ["a\x00b", "\ud800", 5], ids=["nul", "lone-surrogate", "number"])
def test_search__a_model_filter_no_database_can_hold_raises_a_typed_error(engine: Engine, model: object) -> None:
    """A model filter with a NUL byte (PostgreSQL's text cannot hold one) or a lone surrogate (from
    undecodable bytes; no UTF-8): ValidationError naming 'model', not the driver's error."""
    _fill(engine, ["piano"])
    with session_scope(engine) as session, pytest.raises(ValidationError) as caught:
        search_ids(session, "piano", model=model)  # type: ignore[arg-type]
    assert caught.value.field == "model"


def test_search__index_follows_inserts_updates_and_deletes(engine: Engine) -> None:
    """A prompt updated by plain SQL is found by its new words only; a deleted row is gone; the
    library call finds what the API enqueued."""
    settings = load_settings(env={}, overrides={"database": {"url": str(engine.url.render_as_string(False))}})
    url = settings.database.url
    first = dgxqueue.enqueue("ambient drone with cello", database_url=url, settings=settings)
    second = dgxqueue.enqueue("ambient piano", database_url=url, settings=settings)
    assert [job.id for job in dgxqueue.search_generations("AMBIENT", database_url=url, settings=settings)] == [
        second, first]
    with engine.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == first).values(prompt="techno kick"))
        conn.execute(sa.update(G).where(G.c.id == second).values(status="completed"))  # not the prompt
        conn.execute(sa.delete(G).where(G.c.id == second))
    assert _search(engine, "ambient") == []
    assert _search(engine, "cello") == []
    assert _search(engine, "tech kick") == [first]


def test_prompt_search_clause__narrows_another_query(engine: Engine) -> None:
    """The clause alone, added to a list query built elsewhere (a web page's job list)."""
    rows = _fill(engine, ["lofi piano", "lofi guitar", "rock"])
    with session_scope(engine) as session:
        query = sa.select(sa.func.count()).select_from(G).where(prompt_search_clause(session, "lofi"),
                                                                G.c.status == "pending")
        assert session.execute(query).scalar_one() == 2
    assert rows


def test_list_search__cli_prints_the_matches(engine: Engine, tmp_path: Path) -> None:
    """`dgxqueue list --search` lists only matching prompts; a bad query exits 65 naming the field."""
    rows = _fill(engine, ["lofi piano night", "rock anthem"])
    env = {"DATABASE_URL": engine.url.render_as_string(hide_password=False), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "dgxqueue", "list", "--search", "LOFI pia", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert [row["id"] for row in json.loads(done.stdout)] == [rows[1][0]]
    done = subprocess.run([sys.executable, "-m", "dgxqueue", "list", "--search", " "],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 65 and "search=" in done.stderr


def test_search__db_reset_leaves_no_stale_entries(sqlite_db_url: str, tmp_path: Path) -> None:
    """`db reset` drops the tables but not the FTS5 table; migration 006 remakes it, so a row of the
    new database is not found by the words of an old row that had its rowid."""
    engine = init_db(sqlite_db_url)
    _fill(engine, ["old words here"])
    env = {"DATABASE_URL": sqlite_db_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "dgxqueue", "db", "reset", "--yes"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    engine = get_engine(sqlite_db_url)
    engine.dispose()
    rows = _fill(engine, ["new words"])
    assert _search(engine, "old") == []
    assert _search(engine, "new") == [rows[0][0]]


def test_matching_rows__a_subquery_to_sort_and_page(engine: Engine) -> None:
    """The matches as a subquery, joined and sorted by a query built elsewhere."""
    rows = _fill(engine, ["lofi piano", "lofi guitar", "rock"])
    with session_scope(engine) as session:
        matches = matching_rows(session, "lofi", status="pending")
        query = sa.select(G.c.prompt).join(matches, matches.c.id == G.c.id).order_by(matches.c.created_at)
        assert list(session.scalars(query)) == ["lofi piano", "lofi guitar"]
    assert rows


def test_search__plan_reads_the_search_index_for_a_rare_word(engine: Engine) -> None:
    """With 30,000 rows analyzed, a search for a word no row has goes through the search index (FTS5's
    virtual table, or the GIN index), not a walk of the created_at index testing every row."""
    _fill(engine, [f"lofi piano take{n}" for n in range(30_000)])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    with session_scope(engine) as session:
        matches = matching_rows(session, "take99999")
        statement = sa.select(matches.c.id).order_by(matches.c.created_at.desc()).limit(20)
        compiled = statement.compile(dialect=engine.dialect)
        explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
        plan = " ".join(str(row[-1]) for row in session.connection().exec_driver_sql(
            explain + str(compiled), compiled.params if engine.dialect.name != "sqlite" else tuple(
                compiled.params[name] for name in compiled.positiontup or ())))
    expected = "VIRTUAL TABLE INDEX" if engine.dialect.name == "sqlite" else "idx_generations_prompt_search"
    assert expected in plan, plan
    assert _search(engine, "take99999") == [] and len(_search(engine, "take29999")) == 1
