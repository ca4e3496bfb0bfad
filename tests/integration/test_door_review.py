"""Hostile input through the library's door, on both engines: what a review found getting past it."""

from __future__ import annotations

from typing import Any

import pytest

import dgxqueue
from dgxqueue.config import JobSettings
from dgxqueue.errors import ValidationError
from dgxqueue.storage import get_engine, get_generation, init_db, session_scope
from dgxqueue.storage.validation import MAX_METADATA_DEPTH, validate_metadata


def _nested(depth: int) -> dict[str, Any]:
    """Objects nested ``depth`` deep, the outermost counted."""
    document: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        document = {"a": document}
    return document


def _deep_call(levels: int, depth: int) -> dict[str, Any] | None:
    """validate_metadata called from ``levels`` frames further down the stack."""
    if levels:
        return _deep_call(levels - 1, depth)
    return validate_metadata(_nested(depth), JobSettings())


def test_metadata__depth_bound_is_fixed_and_stored_on_each_engine(db_url: str) -> None:
    """Metadata at the depth bound is stored and read back; one level deeper is refused, naming the bound."""
    init_db(db_url)  # producers create only the default database
    job_id = dgxqueue.enqueue("deep", metadata=_nested(MAX_METADATA_DEPTH), database_url=db_url)
    with session_scope(get_engine(db_url)) as session:
        job = get_generation(session, job_id)
        assert job is not None and job.meta == _nested(MAX_METADATA_DEPTH)
    with pytest.raises(ValidationError, match=f"nested more than {MAX_METADATA_DEPTH} deep") as refused:
        dgxqueue.enqueue("deeper", metadata=_nested(MAX_METADATA_DEPTH + 1), database_url=db_url)
    assert refused.value.field == "metadata"


def test_metadata__the_same_answer_at_any_stack_depth() -> None:
    """What the door accepts does not depend on how deep in the stack it is called: a document the
    door encoded shallow once failed with RecursionError at the insert, deeper down."""
    for levels in (0, 400):
        with pytest.raises(ValidationError, match="nested more than"):
            _deep_call(levels, 500)


def test_metadata__shared_lists_are_refused_at_once() -> None:
    """One list shared at every level (2**40 values once expanded) is refused, not encoded forever."""
    shared: list[Any] = []
    for _ in range(40):
        shared = [shared, shared]
    with pytest.raises(ValidationError, match="more values than"):
        validate_metadata({"x": shared}, JobSettings())
