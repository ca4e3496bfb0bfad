"""Prompt search: a full-text index over ``generations.prompt`` on each engine.

Both engines index the same words, so a search finds the same rows on either (the semantics are
in :mod:`dgxqueue.storage.search`): a word is a run of letters (Unicode L*) and decimal digits
(Nd), and after its first character the combining accents FTS5 keeps in a word (its "diacritics":
25 of U+0300 to U+0331, as decomposed text writes 'é'), compared in lower case; everything else
separates words; accents count.

SQLite: an FTS5 table over the prompt column of ``generations`` (external content: it holds the
index only, no copy of the text), keyed by the generation's rowid and kept by triggers on
insert, delete and an update of the prompt; the ``unicode61`` tokenizer without diacritic
removal and with the token categories ``L* Nd``. Existing rows are indexed by a rebuild.

PostgreSQL: a GIN index on ``dgxqueue_prompt_words(prompt)``, a tsvector built from the words
themselves (``array_to_tsvector``), not by ``to_tsvector``'s parser: that one keeps hyphenated
words, versions ('1.5'), hosts and e-mail addresses whole, and FTS5 has no such tokens, so the
engines would disagree. Lower case and letters come from the ICU root collation, not the
database's locale (a database made with LC_CTYPE=C would know only ASCII letters); a server built
without ICU falls back to the database's own collation. Words are cut
to 200 characters (a tsvector word holds at most 2047 bytes, and a longer one would fail the
insert). ``dgxqueue_prompt_query(terms)`` makes the matching tsquery, every word a prefix.

Revision ID: 006
Revises: 005
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "006"
down_revision = "005"
branch_labels = None
depends_on = None

# SQLite ---------------------------------------------------------------------------------------
_FTS = """CREATE VIRTUAL TABLE generations_search USING fts5(
    prompt, content='generations', content_rowid='rowid',
    tokenize="unicode61 remove_diacritics 0 categories 'L* Nd'")"""
_FORGET = ("INSERT INTO generations_search(generations_search, rowid, prompt) "
           "VALUES ('delete', old.rowid, old.prompt);")
_LEARN = "INSERT INTO generations_search(rowid, prompt) VALUES (new.rowid, new.prompt);"
_TRIGGERS = {
    "generations_search_insert": f"AFTER INSERT ON generations BEGIN {_LEARN} END",
    "generations_search_delete": f"AFTER DELETE ON generations BEGIN {_FORGET} END",
    # Only an update of the prompt: the daemons' many status updates fire nothing.
    "generations_search_update": f"AFTER UPDATE OF prompt ON generations BEGIN {_FORGET} {_LEARN} END",
}

# PostgreSQL -----------------------------------------------------------------------------------
# A word as FTS5's unicode61 reads one: a letter or digit, then letters, digits and the combining
# accents it counts as diacritics (sqlite3Fts5UnicodeIsdiacritic; 'e' U+0301 stays one word 'é'),
# so decomposed (NFD) prompts split alike on both engines. Regex escapes: the body is $$-quoted.
_WORD = r"[[:alnum:]][[:alnum:]\u0300-\u0304\u0306-\u030c\u030f\u0311\u031b\u0323-\u0328\u032d\u032e\u0330\u0331]*"
# lower() maps a capital sigma at a word's end to the final sigma (U+03C2), which FTS5 folds to
# the plain sigma (U+03C3): both become the plain sigma.
_WORDS = r"""
    CREATE OR REPLACE FUNCTION dgxqueue_prompt_words(prompt text) RETURNS tsvector
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT array_to_tsvector(ARRAY(
            SELECT left(word[1], 200)
            FROM regexp_matches(translate(lower(prompt COLLATE "{collation}"), U&'\03C2', U&'\03C3'),
                                '{word}', 'g') AS word))
    $$"""
# Each word of the terms a prefix, all of them required. The words hold letters and digits only
# (no quote, colon or backslash), so each quoted one is read back as one lexeme. No word: NULL,
# which matches nothing (an empty tsquery literal would, folded at planning, send a NOTICE
# "doesn't contain lexemes" to the client with every search).
_QUERY = r"""
    CREATE OR REPLACE FUNCTION dgxqueue_prompt_query(terms text[]) RETURNS tsquery
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
        SELECT string_agg(quote_literal(left(word[1], 200)) || ':*', ' & ')::tsquery
        FROM unnest(terms) AS term,
             regexp_matches(translate(lower(term COLLATE "{collation}"), U&'\03C2', U&'\03C3'),
                            '{word}', 'g') AS word
    $$"""
_INDEX = "CREATE INDEX idx_generations_prompt_search ON generations USING gin (dgxqueue_prompt_words(prompt))"


def _run(statement: str) -> None:
    # As the driver reads it: sa.text() would take '[:alnum:]' for a bound parameter.
    op.get_bind().exec_driver_sql(statement)


def upgrade() -> None:
    # Engine names are tested here as migration 003 does: a migration's DDL is fixed in time.
    if op.get_context().dialect.name == "postgresql":
        # A server built without ICU has no such collation: the database's own then decides what
        # a letter and a lower case are (with LC_CTYPE=C, ASCII only), which README warns of.
        icu = op.get_bind().exec_driver_sql("SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'").first()
        collation = "und-x-icu" if icu is not None else "default"
        for statement in (_WORDS.format(collation=collation, word=_WORD),
                          _QUERY.format(collation=collation, word=_WORD), _INDEX):
            _run(statement)
        return
    # `db reset` drops dgxqueue's tables but not this one, whose rowids would then name other rows.
    op.execute("DROP TABLE IF EXISTS generations_search")
    op.execute(_FTS)
    for name, body in _TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")
    op.execute("INSERT INTO generations_search(generations_search) VALUES ('rebuild')")  # existing rows


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP INDEX idx_generations_prompt_search")
        op.execute("DROP FUNCTION IF EXISTS dgxqueue_prompt_query(text[])")
        op.execute("DROP FUNCTION IF EXISTS dgxqueue_prompt_words(text)")
        return
    for name in _TRIGGERS:
        op.execute(f"DROP TRIGGER {name}")
    op.execute("DROP TABLE generations_search")
