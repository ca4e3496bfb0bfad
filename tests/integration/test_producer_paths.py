"""Every producer path (enqueue, enqueue_many, create_generation(s), the CLI) is one door and one insert."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import dgxqueue
from dgxqueue.cli import main as cli_main
from dgxqueue.errors import ValidationError
from dgxqueue.storage import (
    Generation,
    create_generation,
    create_generations,
    get_generation,
    get_session,
    session_scope,
)
from dgxqueue.storage.models import G

FIELDS: dict[str, Any] = {
    "model_name": "synth", "duration_seconds": 12.5, "sample_rate": 44100, "channels": 2,
    "file_path": "outputs/dub.wav", "metadata": {"bpm": 118, "key": "Am"}, "priority": 7,
    "run_after": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), "max_attempts": 5,
}
FLAGS = ["--model", "synth", "--duration", "12.5", "--sample-rate", "44100", "--channels", "2",
         "--file-path", "outputs/dub.wav", "--metadata", '{"bpm": 118, "key": "Am"}', "--priority", "7",
         "--not-before", "2030-01-02T03:04:05+00:00", "--max-attempts", "5"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test alone, not from DGXQUEUE_* variables of whoever runs pytest."""
    for name in list(os.environ):
        if name.startswith("DGXQUEUE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str,
         *argv: str) -> tuple[int, str, str]:
    """The CLI in this process (its own argument parsing and settings), on ``url``."""
    monkeypatch.setenv("DATABASE_URL", url)
    capsys.readouterr()
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _rows(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {row.id: dict(row._mapping) for row in conn.execute(sa.select(G))}


def _prompt_uses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {text: count for text, count in conn.execute(sa.text("SELECT text, used_count FROM prompts"))}


def test_producer_paths__write_identical_rows(engine: Engine, db_url: str, tmp_path: Any,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI (flags and JSON lines), enqueue, enqueue_many, create_generation(s): the same input
    makes the same row, but for its id, its creation time and its file (each job's is its own),
    and each counts one use of the prompt."""
    ids: dict[str, str] = {}
    files = {name: f"outputs/dub-{n}.wav" for n, name in enumerate(
        ("cli flags", "cli jsonl", "enqueue", "enqueue_many", "create_generation", "create_generations"))}
    flags = [files["cli flags"] if flag == FIELDS["file_path"] else flag for flag in FLAGS]
    code, out, _ = _cli(monkeypatch, capsys, db_url, "enqueue", "dub techno", *flags)
    assert code == 0
    ids["cli flags"] = out.strip()
    line = {"prompt": "dub techno", **FIELDS, "run_after": "2030-01-02T03:04:05+00:00", "file_path": files["cli jsonl"]}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    code, out, _ = _cli(monkeypatch, capsys, db_url, "enqueue", "--jsonl", str(tmp_path / "jobs.jsonl"))
    assert code == 0
    ids["cli jsonl"] = out.strip()
    ids["enqueue"] = dgxqueue.enqueue("dub techno", **{**FIELDS, "file_path": files["enqueue"]}, database_url=db_url)
    [ids["enqueue_many"]] = dgxqueue.enqueue_many(
        [{"prompt": "dub techno", **FIELDS, "file_path": files["enqueue_many"]}], database_url=db_url)
    with session_scope(engine) as session:
        ids["create_generation"] = create_generation(
            session, "dub techno", **{**FIELDS, "file_path": files["create_generation"]}).id
        [ids["create_generations"]] = create_generations(
            session, [{"prompt": "dub techno", **FIELDS, "file_path": files["create_generations"]}])
    rows = _rows(engine)
    assert sorted(rows) == sorted(ids.values())
    assert {path: rows[job_id]["file_path"] for path, job_id in ids.items()} == files
    shapes = {path: {k: v for k, v in rows[job_id].items() if k not in ("id", "created_at", "file_path")}
              for path, job_id in ids.items()}
    expected = shapes["enqueue"]
    assert expected["status"] == "pending" and expected["run_after"] == FIELDS["run_after"]
    assert {path: shape for path, shape in shapes.items() if shape != expected} == {}
    assert _prompt_uses(engine) == {"dub techno": len(ids)}


def test_create_generation__the_callers_rollback_leaves_nothing(engine: Engine, db_url: str) -> None:
    """create_generation(s) write in the caller's transaction: when the caller rolls back, neither
    the rows nor the prompts' counts remain."""
    with get_session(db_url) as session:
        create_generation(session, "kept")
    with pytest.raises(RuntimeError), get_session(db_url) as session:
        create_generation(session, "undone")
        create_generations(session, [{"prompt": "kept"}, {"prompt": "undone"}])
        raise RuntimeError("the caller changes its mind")
    assert [row["prompt"] for row in _rows(engine).values()] == ["kept"]
    assert _prompt_uses(engine) == {"kept": 1}


def test_create_generation__returns_the_row_as_stored(engine: Engine, db_url: str) -> None:
    """The Generation returned (built without reading the row back) holds what a fresh session
    reads, column for column, and is the session's own object."""
    with get_session(db_url) as session:
        made = create_generation(session, "dub techno", **FIELDS)
        assert session.get(Generation, made.id) is made
    with get_session(db_url) as session:
        stored = get_generation(session, made.id)
        assert stored is not None
        for prop in sa.inspect(Generation).column_attrs:
            assert getattr(made, prop.key) == getattr(stored, prop.key), prop.key


# (field, bad value, the CLI's flags for it): one bad field at a time.
BAD: list[tuple[str, Any, list[str]]] = [
    ("prompt", "   ", []),
    ("model_name", "", ["--model", ""]),
    ("duration_seconds", 0.0, ["--duration", "0"]),
    ("sample_rate", 100, ["--sample-rate", "100"]),
    ("channels", 9, ["--channels", "9"]),
    ("file_path", "../x.wav", ["--file-path", "../x.wav"]),
    ("file_path", "elsewhere/x.wav", ["--file-path", "elsewhere/x.wav"]),
    ("metadata", {"seed": -1}, ["--metadata", '{"seed": -1}']),
    ("priority", 5000, ["--priority", "5000"]),
    ("max_attempts", 0, ["--max-attempts", "0"]),
]


@pytest.mark.parametrize(("field", "value", "flags"), BAD, ids=lambda v: repr(v)[:24])
def test_producer_paths__refuse_bad_input_alike(sqlite_db_url: str, tmp_path: Any, field: str, value: Any,
                                                flags: list[str], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Each library path raises the same ValidationError naming the field, the CLI prints it
    (exit 65), and nothing is written by any of them."""
    from dgxqueue.storage import init_db

    engine = init_db(sqlite_db_url)
    prompt = value if field == "prompt" else "beat"
    kwargs = {} if field == "prompt" else {field: value}
    spec = {"prompt": prompt, **kwargs}
    calls: dict[str, Callable[[], object]] = {
        "enqueue": lambda: dgxqueue.enqueue(prompt, **kwargs, database_url=sqlite_db_url),
        "enqueue_many": lambda: dgxqueue.enqueue_many([spec], database_url=sqlite_db_url),
    }
    messages = {}
    for name, call in calls.items():
        with pytest.raises(ValidationError) as caught:
            call()
        messages[name] = (caught.value.field, str(caught.value))
    for name in ("create_generation", "create_generations"):
        with pytest.raises(ValidationError) as caught, get_session(sqlite_db_url) as session:
            if name == "create_generation":
                create_generation(session, prompt, **kwargs)
            else:
                create_generations(session, [spec])
        messages[name] = (caught.value.field, str(caught.value))
    [(named, message)] = set(messages.values())
    assert named.split(".")[0] == field
    code, _, err = _cli(monkeypatch, capsys, sqlite_db_url, "enqueue", prompt, *flags)
    assert (code, err) == (65, f"dgxqueue: error: {message}\n")
    line = {"prompt": prompt, **kwargs}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    code, _, err = _cli(monkeypatch, capsys, sqlite_db_url, "enqueue", "--jsonl", str(tmp_path / "jobs.jsonl"))
    assert (code, err) == (65, f"dgxqueue: error: line 1: {message}\n")
    assert _rows(engine) == {} and _prompt_uses(engine) == {}
