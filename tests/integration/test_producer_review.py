"""Review of the producer path: create_generation inside a caller's session with ORM work of its
own, numbers no float holds, and JobSpecs made past the door, on a real SQLite file and the real
PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import dgxqueue
from dgxqueue.cli import main as cli_main
from dgxqueue.errors import ValidationError
from dgxqueue.storage import (
    JobSpec,
    Prompt,
    complete_generation,
    create_generation,
    create_generations,
    track_prompt_usage,
    validate_job,
)
from dgxqueue.storage.models import utcnow

HUGE = 10**400


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DGXQUEUE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)


def _uses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {text: count for text, count in conn.execute(sa.text("SELECT text, used_count FROM prompts"))}


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM generations")).scalar_one())


def test_create_generation__flushes_the_callers_pending_objects_first(engine: Engine) -> None:
    """As session.execute does: the caller's own pending objects reach the database before the
    insert. Here the caller adds the prompt's row itself; the insert then counts a second use,
    instead of inserting it too and the caller's commit failing on the unique index."""
    with Session(engine) as session:
        now = utcnow()
        session.add(Prompt(text="by hand", used_count=1, first_used_at=now, last_used_at=now))
        create_generation(session, "by hand")
        create_generations(session, [{"prompt": "by hand"}])
        session.commit()
    assert _uses(engine) == {"by hand": 3}


def test_create_generation__a_count_the_caller_reset_is_not_undone(engine: Engine) -> None:
    """The caller resets a prompt's count, then queues it: the count is 1, not the reset written
    over the insert's increment at the caller's commit."""
    with Session(engine) as session:
        prompt_id = track_prompt_usage(session, "reset me").id
        create_generation(session, "reset me")
        session.commit()
    with Session(engine) as session:
        prompt = session.get_one(Prompt, prompt_id)
        prompt.used_count = 0
        create_generation(session, "reset me")
        session.commit()
    assert _uses(engine) == {"reset me": 1}


def test_create_generation__no_autoflush_is_respected(engine: Engine) -> None:
    """A caller that turned autoflush off keeps its pending objects pending."""
    with Session(engine) as session, session.no_autoflush:
        now = utcnow()
        session.add(Prompt(text="later", used_count=1, first_used_at=now, last_used_at=now))
        create_generation(session, "other")
        assert len(session.new) == 1
        session.rollback()


def test_producer_paths__an_integer_no_float_holds_is_refused_by_name(engine: Engine, db_url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        dgxqueue.enqueue("beat", duration_seconds=HUGE, database_url=db_url)
    assert caught.value.field == "duration_seconds"
    with Session(engine) as session:
        with pytest.raises(ValidationError) as caught:
            create_generation(session, "beat", metadata={"guidance_scale": HUGE})
        assert caught.value.field == "metadata.guidance_scale"
        job = create_generation(session, "beat")
        session.flush()
        with pytest.raises(ValidationError) as caught:
            complete_generation(session, job.id, generation_time=HUGE, file_size_bytes=10)
        assert caught.value.field == "generation_time"
        session.rollback()
    assert _count(engine) == 0


def test_enqueue_many__a_jobspec_made_past_the_door_is_refused(engine: Engine, db_url: str) -> None:
    """enqueue_many and create_generations trust a JobSpec as validated, so one made by hand, or
    changed with dataclasses.replace, must not come to exist: it would be written unchecked."""
    good = validate_job("beat")
    fields = {field.name: getattr(good, field.name) for field in dataclasses.fields(JobSpec)}
    with pytest.raises((TypeError, ValueError)):
        dgxqueue.enqueue_many([dataclasses.replace(good, file_path="../escape.wav")], database_url=db_url)
    with pytest.raises(TypeError), Session(engine) as session:
        create_generations(session, [JobSpec(**{**fields, "id": "not-a-uuid", "duration_seconds": -5.0})])
        session.commit()
    assert _count(engine) == 0


@pytest.mark.parametrize("line", [
    '{"prompt": "beat", "duration_seconds": 1' + "0" * 5000 + "}",  # past Python's int digits limit
    '{"prompt": "beat", "duration_seconds": 1' + "0" * 400 + "}",
    '{"prompt": "beat", "metadata": {"temperature": 1' + "0" * 400 + "}}",
], ids=["5000 digits", "400 digits", "400 digits in metadata"])
def test_cli_jsonl__a_number_too_long_is_bad_input(sqlite_db_url: str, tmp_path: Any, line: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A line with a number Python cannot read or no float holds is refused naming the line
    (exit 65), not an internal error (exit 70)."""
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    monkeypatch.setenv("DATABASE_URL", sqlite_db_url)
    capsys.readouterr()
    code = cli_main(["enqueue", "--jsonl", str(tmp_path / "jobs.jsonl")])
    err = capsys.readouterr().err
    assert code == 65 and err.startswith("dgxqueue: error: line 2: "), err
    code = cli_main(["enqueue", "beat", "--metadata", '{"bpm": 1' + "0" * 5000 + "}"])
    err = capsys.readouterr().err
    assert code == 65 and "metadata" in err, err
