"""Search generations by the words of their prompt, the same way on SQLite and PostgreSQL.

The semantics, which both engines obey (migration 006 builds their indexes):

- A *word* is a run of letters (Unicode categories L*) and decimal digits (Nd), and after its
  first character the combining accents that SQLite's FTS5 keeps in a word (:data:`ACCENTS`:
  decomposed text, as macOS writes it, spells 'é' as 'e' and U+0301). Everything else (spaces,
  punctuation, symbols, emoji, other combining marks) separates words and is otherwise
  ignored: "lo-fi" is the two words "lo" and "fi"; "x²" is "x".
- A query is split into words the same way. A generation matches when, for **every** query
  word, its prompt has a word that **starts with** it, in any order: "lofi pia" finds
  "Piano, LoFi". Case is ignored, accents are not ("cafe" does not find "café").
- Nothing in a query is syntax: quotes, ``*``, ``AND``/``OR``/``NOT``, ``NEAR(`` are
  punctuation (ignored) or plain words ("and" finds "andante").
- A query of punctuation or symbols only (``"``, ``*``, an emoji) has no word and finds nothing.
- An empty query (or only spaces), one longer than :data:`MAX_QUERY_CHARS`, with more than
  :data:`MAX_QUERY_WORDS` words or a word over :data:`MAX_WORD_CHARS` characters raises
  :class:`~dgxqueue.errors.ValidationError` naming the field ``search``.
- Results: newest first (``created_at``, then ``id``, descending), optionally of one status
  and one model.

Where the engines' own Unicode tables differ, so may the results; known cases: a Turkish dotted
capital I (PostgreSQL lowers 'İ' to 'i' and a combining dot; FTS5 keeps it), and letters added
to Unicode after version 6.1 (FTS5's tables).

Callers own the session. For a list of generations built elsewhere (a web page's job list),
:func:`matching_rows` is the matches as a subquery to sort and page, and
:func:`prompt_search_clause` the condition alone (see :func:`matching_rows` for why the subquery
is the one to sort by).
"""

from __future__ import annotations

import unicodedata

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dgxqueue.errors import ValidationError
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import G, Generation, GenerationStatus
from dgxqueue.storage.validation import validate_limit, validate_status

MAX_QUERY_CHARS = 1000
MAX_QUERY_WORDS = 32
#: PostgreSQL's index keeps a word's first 200 characters (migration 006): a longer query word
#: could not be a prefix of an indexed one there, while it could on SQLite.
MAX_WORD_CHARS = 200
_WORD_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Nd"})
#: The combining accents FTS5's unicode61 tokenizer counts as diacritics and keeps inside a word
#: (sqlite3Fts5UnicodeIsdiacritic), which migration 006's PostgreSQL functions keep too.
ACCENTS = frozenset(chr(code) for code in (*range(0x300, 0x305), *range(0x306, 0x30D), 0x30F, 0x311, 0x31B,
                                           *range(0x323, 0x329), 0x32D, 0x32E, 0x330, 0x331))


def search_words(query: object) -> list[str]:
    """The words of ``query`` (as the module docstring defines them), validated; none for a
    query of punctuation only."""
    if not isinstance(query, str):
        raise ValidationError("search", query, "a text of words to search prompts for")
    if len(query) > MAX_QUERY_CHARS:
        raise ValidationError("search", query, f"at most {MAX_QUERY_CHARS} characters")
    words: list[str] = []
    current: list[str] = []
    for char in query + " ":
        if unicodedata.category(char) in _WORD_CATEGORIES or (current and char in ACCENTS):
            current.append(char)
        elif current:
            words.append("".join(current))
            current = []
    if not query.strip():
        raise ValidationError("search", query, "words to search prompts for (it is empty)")
    if len(words) > MAX_QUERY_WORDS:
        raise ValidationError("search", query, f"at most {MAX_QUERY_WORDS} words")
    long = next((word for word in words if len(word) > MAX_WORD_CHARS), None)
    if long is not None:
        raise ValidationError("search", query, f"words of at most {MAX_WORD_CHARS} characters "
                              f"(one has {len(long)})")
    return list(dict.fromkeys(words))  # a repeated word asks nothing more


def prompt_search_clause(session: Session, query: str) -> sa.ColumnElement[bool]:
    """A condition on the ``generations`` table (not an alias of it): its prompt matches
    ``query``, through the engine's search index. Raises ValidationError for a bad query."""
    words = search_words(query)
    if not words:
        return sa.false()
    return profile_of(session.get_bind().dialect).prompt_matches(G, words)


def matching_rows(session: Session, query: str, *, status: GenerationStatus | str | None = None,
                  model: str | None = None) -> sa.Subquery:
    """The ``id`` and ``created_at`` of every generation whose prompt matches ``query`` (and
    ``status``, ``model``), as a subquery to sort, page or join (a web page's job list).

    It is fenced (``OFFSET 0``) so the planner finds the matches through the search index first:
    with the match as a bare condition beside ``ORDER BY created_at LIMIT n``, PostgreSQL may
    instead walk the created_at index testing every row's words (it cannot tell how rare a prefix
    is), which took 0.9 s on 50,000 rows for a word no row has."""
    statement = sa.select(G.c.id, G.c.created_at).where(prompt_search_clause(session, query))
    if status is not None:
        statement = statement.where(G.c.status == validate_status(status).value)
    if model is not None:
        if not isinstance(model, str):
            raise ValidationError("model", model, "a model name (text)")
        # PostgreSQL's text holds no NUL, and a lone surrogate (undecodable bytes) is no UTF-8 at
        # all: no job can have such a name, and the drivers would raise their own errors.
        allowed = "a model name (text without NUL bytes or lone surrogates)"
        if "\x00" in model:
            raise ValidationError("model", model, allowed)
        try:
            model.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("model", model, allowed) from None
        statement = statement.where(G.c.model_name == model)
    return statement.offset(0).subquery("matches")


def search_ids(session: Session, query: str, *, status: GenerationStatus | str | None = None,
               model: str | None = None, limit: int = 100, offset: int = 0) -> list[str]:
    """Ids of the generations whose prompt matches ``query``, newest first."""
    matches = matching_rows(session, query, status=status, model=model)
    statement = (sa.select(matches.c.id).order_by(matches.c.created_at.desc(), matches.c.id.desc())
                 .limit(validate_limit(limit)).offset(validate_limit(offset, "offset", 10**9)))
    return list(session.scalars(statement))


def search_jobs(session: Session, query: str, *, status: GenerationStatus | str | None = None,
                model: str | None = None, limit: int = 100, offset: int = 0) -> list[Generation]:
    """The generations whose prompt matches ``query``, newest first."""
    ids = search_ids(session, query, status=status, model=model, limit=limit, offset=offset)
    found = {job.id: job for job in session.scalars(sa.select(Generation).where(G.c.id.in_(ids)))}
    return [found[job_id] for job_id in ids if job_id in found]  # one deleted meanwhile is left out
