"""The command's door and job commands: ``enqueue --jsonl``, id prefixes, failed jobs' errors in
``list``, missing files in ``show``, escaped control characters, and the unserved-model warning."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.cli.common import CliError, resolve_id
from dgxqueue.errors import JobNotFoundError, ValidationError
from dgxqueue.storage import (
    complete_generation,
    create_generations,
    fail_generation,
    get_engine,
    init_db,
    session_scope,
)
from dgxqueue.storage.models import G
from tests.acceptance.test_cli import UUID, Cli, assert_error
from tests.support import zygote

# A prompt that would retitle the terminal window and clear the screen if printed as it is.
HOSTILE = "calm piano \x1b]0;pwned\x07 then \x1b[2J"
# What the terminal must never receive from a prompt or an error message.
RAW_CONTROLS = ("\x1b", "\x07", "\r", "\u202e", "\x9b")


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _rename(url: str, ids: list[str], new_ids: list[str]) -> None:
    """Give jobs chosen ids (plain SQL), to make prefixes collide on purpose."""
    engine = get_engine(url)
    with engine.begin() as conn:
        for old, new in zip(ids, new_ids, strict=True):
            conn.execute(sa.update(G).where(G.c.id == old).values(id=new))


# --- enqueue --jsonl ---------------------------------------------------------------------------


def test_enqueue__jsonl_queues_every_line_in_one_batch(cli: Cli) -> None:
    """Each non-blank line becomes a job with its fields; the ids are printed in order, one a line."""
    cli.add()  # a configured database is never created by enqueue
    jobs = _write(cli.folder / "jobs.jsonl",
                  '{"prompt": "first", "duration_seconds": 2, "metadata": {"seed": 7}, "priority": 5}',
                  "",
                  '{"prompt": "second", "model_name": "synth", "run_after": "2030-01-01T00:00+00:00"}')
    ids = cli.here("enqueue", "--jsonl", str(jobs)).stdout.split()
    assert len(ids) == 2 and all(UUID.match(i) for i in ids)
    with sqlite3.connect(cli.db) as conn:
        rows = conn.execute("SELECT id, prompt, duration_seconds, priority, metadata, run_after FROM generations "
                            "ORDER BY prompt").fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(ids[0], "first", 2.0, 5), (ids[1], "second", 8.0, 0)]
    assert json.loads(rows[0][4]) == {"seed": 7} and rows[1][5].startswith("2030-01-01")


def test_enqueue__jsonl_reads_stdin_and_prints_rows_as_json(cli: Cli) -> None:
    """``--jsonl -`` reads standard input; with --json the rows come back as a list."""
    cli.add()  # a configured database is never created by enqueue
    done = zygote.run(cli.command("enqueue", "--jsonl", "-", "--json"), cwd=cli.folder, env=cli.env,
                      input='{"prompt": "a"}\n{"prompt": "b"}\n', capture_output=True, text=True,
                      timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert [row["prompt"] for row in json.loads(done.stdout)] == ["a", "b"]


@pytest.mark.parametrize(("line", "words"), [
    ('{"prompt": "x", "metadata": {"seed": "abc"}}', ("line 3", "metadata.seed")),
    ('{"prompt": "x", "metadata": {"note": "\\udc80"}}', ("line 3", "metadata", "lone surrogate")),
    ('{"prompt": "x", "metadata": {"gain": 1e400}}', ("line 3", "metadata.gain is inf")),
    ('{"prompt": "x", "duration_seconds": -1}', ("line 3", "duration_seconds")),
    ('{"prompt": "x", "durration": 2}', ("line 3", "durration")),
    ('{"prompt": "x", "run_after": "soon"}', ("line 3", "run_after")),
    ('{"prompt": "x",', ("line 3", "not a JSON object")),
    ('["x"]', ("line 3", "expected a JSON object")),
], ids=lambda v: str(v)[:40])
def test_enqueue__jsonl_one_bad_line_refuses_the_batch(cli: Cli, line: str, words: tuple[str, ...]) -> None:
    """A bad line: exit 65, one line naming its number and field, and nothing written."""
    cli.add("already here")
    before = cli.snapshot()
    jobs = _write(cli.folder / "jobs.jsonl", '{"prompt": "good"}', '{"prompt": "fine"}', line)
    assert_error(cli.here("enqueue", "--jsonl", str(jobs)), 65, *words)
    assert cli.snapshot() == before


def test_enqueue__jsonl_refuses_bytes_that_are_not_utf8(cli: Cli) -> None:
    """Undecodable bytes name their line (exit 65); nothing is written."""
    jobs = cli.folder / "jobs.jsonl"
    jobs.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert_error(cli.here("enqueue", "--jsonl", str(jobs)), 65, "line 2", "UTF-8")
    assert cli.snapshot() is None


def test_enqueue__jsonl_usage_errors(cli: Cli) -> None:
    """--jsonl with a prompt or a per-job flag, or neither given: exit 2; a missing file: exit 74."""
    jobs = _write(cli.folder / "jobs.jsonl", '{"prompt": "a"}')
    assert_error(cli.here("enqueue", "x", "--jsonl", str(jobs)), 2, "prompt")
    assert_error(cli.here("enqueue", "--jsonl", str(jobs), "--duration", "3"), 2, "--duration")
    assert_error(cli.here("enqueue"), 2, "prompt")
    assert_error(cli.here("enqueue", "--jsonl", str(cli.folder / "missing.jsonl")), 74, "missing.jsonl")
    assert cli.snapshot() is None


# --- the door, from the command ---------------------------------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    (("--metadata", '{"note": "\\udc80"}'), ("metadata", "lone surrogate")),
    (("--metadata", '{"seed": 1.5}'), ("metadata.seed",)),
    (("--metadata", '{"temperature": 0}'), ("metadata.temperature", "> 0")),
    (("--file-path", "outputs/" + "n" * 260 + ".wav"), ("file_path", "255 bytes")),
], ids=lambda v: str(v)[:40])
def test_enqueue__refuses_what_the_daemon_would_refuse(cli: Cli, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    """Metadata PostgreSQL or the generator would refuse, or a file name too long: exit 65, no row."""
    cli.add("already here")
    before = cli.snapshot()
    assert_error(cli.here("enqueue", "x", *args), 65, *words)
    assert cli.snapshot() == before


# --- unserved models --------------------------------------------------------------------------


def test_enqueue__warns_when_no_generator_serves_the_model(cli: Cli) -> None:
    """An unserved model is queued with a warning on stderr; configured or registered ones, with no
    daemon running, with the warning that no live daemon serves them (one line either way)."""
    cli.add()  # a configured database is never created by enqueue
    done = cli.here("enqueue", "x", "--model", "musicgen-huge")
    assert done.returncode == 0 and UUID.match(done.stdout.strip())
    assert "warning" in done.stderr and "'musicgen-huge'" in done.stderr and len(done.stderr.splitlines()) == 1
    assert "generator serves" in done.stderr
    for model in ("synth", "musicgen-small", "silence"):  # the configured one and registered defaults
        done = cli.here("enqueue", "x", "--model", model)
        assert done.stderr.splitlines() == [f"dgxqueue: warning: no live daemon serves model '{model}' now; the job "
                                            "waits until one starts ('dgxqueue workers' lists the live daemons)"]
    configured = {"DGXQUEUE_GENERATOR_MODELS": "house-model,other"}  # generator.models, configured here
    assert "no live daemon" in cli.here("enqueue", "x", "--model", "house-model", env=configured).stderr


def test_enqueue__a_model_the_configured_generator_serves_imports_no_other_backend(cli: Cli) -> None:
    """The warning's check stops at the first backend that serves the model: enqueueing for the
    configured synth does not import the MusicGen backend (its import is most of a bare enqueue's
    start-up); a model no backend serves still looks at every one."""
    cli.add()
    probe = ("import sys; from dgxqueue.cli import run; sys.argv = ['dgxqueue', *sys.argv[1:]]\n"
             "try:\n    run()\nfinally:\n    print('workers.musicgen' in sys.modules, file=sys.stderr)")
    for model, imported in (("synth", "False"), ("musicgen-huge", "True")):
        done = subprocess.run([sys.executable, "-c", probe, "enqueue", "x", "--model", model], cwd=cli.folder,
                              env=cli.env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines()[-1] == imported, (model, done.stderr)


def test_enqueue__a_file_another_job_writes_to_is_refused_naming_that_job(cli: Cli) -> None:
    """enqueue --file-path naming a file another job holds: exit 65 naming file_path and the
    holder's id, no row; in a JSON-lines batch, the whole batch is refused."""
    cli.add()  # a configured database is never created by enqueue
    holder = cli.here("enqueue", "first", "--file-path", "outputs/song.wav")
    assert holder.returncode == 0, holder.stderr
    before = cli.snapshot()
    assert_error(cli.here("enqueue", "second", "--file-path", "outputs/song.wav"), 65, "file_path",
                 holder.stdout.strip(), "each job's WAV its own")
    lines = cli.folder / "jobs.jsonl"
    lines.write_text('{"prompt": "a", "file_path": "outputs/new.wav"}\n'
                     '{"prompt": "b", "file_path": "outputs/song.wav"}\n')
    assert_error(cli.here("enqueue", "--jsonl", str(lines)), 65, "file_path", holder.stdout.strip())
    assert cli.snapshot() == before


def test_enqueue__library_call_never_warns(sqlite_db_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    """dgxqueue.enqueue stays quiet about models: the warning is the command's."""
    import dgxqueue

    init_db(sqlite_db_url)
    dgxqueue.enqueue("x", model_name="musicgen-huge", database_url=sqlite_db_url)
    assert capfd.readouterr() == ("", "")


# --- ids: a unique prefix, as git ---------------------------------------------------------------

CHOSEN = ["abcd0000-0000-4000-8000-000000000001", "abcd0000-0000-4000-8000-000000000002",
          "abcf1111-0000-4000-8000-000000000000", "abd00000-0000-4000-8000-000000000000",
          "ffff2222-0000-4000-8000-000000000000"]


def test_resolve_id__a_unique_prefix_on_each_engine(db_url: str) -> None:
    """A prefix finds its one job through a range on the key (carry past 'f' included); several: 65."""
    engine = init_db(db_url)
    with session_scope(engine) as session:
        ids = create_generations(session, [{"prompt": str(i)} for i in range(len(CHOSEN))])
    _rename(db_url, ids, CHOSEN)
    assert resolve_id(engine, "abcf") == CHOSEN[2]  # not abd0...: the range stops at 'abd'
    assert resolve_id(engine, "ABD0") == CHOSEN[3]
    assert resolve_id(engine, "ffff") == CHOSEN[4]  # no upper bound above ffff
    assert resolve_id(engine, CHOSEN[1]) == CHOSEN[1]
    assert resolve_id(engine, CHOSEN[1].upper()) == CHOSEN[1]
    with pytest.raises(CliError) as ambiguous:
        resolve_id(engine, "abcd0000-")
    assert ambiguous.value.code == 65 and CHOSEN[0] in str(ambiguous.value) and CHOSEN[1] in str(ambiguous.value)
    for missing in ("abce", "0000", "abcd0000-0000-4000-8000-000000000003", "zzzz", "abcd0000_", "%"):
        with pytest.raises(JobNotFoundError):
            resolve_id(engine, missing)
    with pytest.raises(ValidationError):
        resolve_id(engine, "abc")  # too short to look up


def test_show_cancel_retry_wait__accept_the_short_id_wait_prints(cli: Cli) -> None:
    """The 8 characters 'wait' shows are enough for show, cancel, retry and wait; ambiguity is 65."""
    ids = cli.add("one", "two", "three")
    _rename(cli.url, ids, CHOSEN[:3])
    short = CHOSEN[2][:8]
    assert json.loads(cli.here("show", short, "--json").stdout)["id"] == CHOSEN[2]
    assert cli.here("cancel", short).stdout.strip() == f"cancelled {CHOSEN[2]}"
    assert cli.here("retry", short).stdout.strip() == f"requeued {CHOSEN[2]}"
    assert cli.here("cancel", short).returncode == 0
    assert cli.here("wait", short, "--quiet").stdout.startswith(f"failed  {CHOSEN[2]}")
    before = cli.snapshot()
    assert_error(cli.here("cancel", "abcd0000"), 65, "ambiguous", CHOSEN[0], CHOSEN[1])
    assert_error(cli.here("show", "abce0000"), 3, "abce0000")
    assert cli.snapshot() == before


# --- list and show: errors and missing files ------------------------------------------------------


def test_list__shows_failed_jobs_errors_cut_to_the_terminal(cli: Cli) -> None:
    """A failed job's error has a column; long prompts and errors are both cut to fit the width."""
    [ok, bad] = cli.add("fine " * 40, "broken " * 40)
    with session_scope(init_db(cli.url)) as session:
        fail_generation(session, bad, "CUDA out of memory while rendering " * 10)
    lines = cli.here("list", env={"COLUMNS": "160"}).stdout.splitlines()
    assert lines[0].split()[-1] == "ERROR"
    assert all(len(line) <= 160 for line in lines), lines
    row = next(line for line in lines if line.startswith(bad))
    assert "CUDA out of memory" in row and row.endswith("…")
    assert not next(line for line in lines if line.startswith(ok)).endswith("memory …")


def test_show__says_when_a_completed_jobs_file_is_missing(cli: Cli) -> None:
    """A completed job whose WAV is gone says so; once the file exists it says yes (--json: a bool)."""
    [job_id] = cli.add("done")
    with session_scope(init_db(cli.url)) as session:
        complete_generation(session, job_id, 1.0, 44)
    text = cli.here("show", job_id).stdout
    assert "output_exists" in text and "does not exist" in text
    assert json.loads(cli.here("show", job_id, "--json").stdout)["output_exists"] is False
    (cli.folder / "outputs").mkdir()
    (cli.folder / "outputs" / f"{job_id}.wav").write_bytes(b"RIFF")
    assert json.loads(cli.here("show", job_id, "--json").stdout)["output_exists"] is True
    [pending] = cli.add("pending")
    assert "output_exists" not in json.loads(cli.here("show", pending, "--json").stdout)


# --- terminal safety ----------------------------------------------------------------------------


def _assert_escaped(text: str) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in text, (raw, text)


def test_outputs__escape_terminal_control_characters(cli: Cli) -> None:
    """Prompts, errors and statuses from the database reach the terminal escaped, in every view."""
    cli.add()  # a configured database is never created by enqueue
    done = cli.here("enqueue", HOSTILE)  # the door stores it: it is text, only printing it is unsafe
    job_id = done.stdout.strip()
    [other] = cli.add("plain")
    with session_scope(init_db(cli.url)) as session:
        fail_generation(session, job_id, "boom\r\x1b[31m fake \u202eevil\x9b")
    with get_engine(cli.url).begin() as conn:  # a status written by plain SQL
        conn.execute(sa.update(G).where(G.c.id == other).values(status="odd\x1b[2J"))
    for args in (("list",), ("list", "--status", "failed"), ("show", job_id), ("stats",),
                 ("wait", job_id), ("wait", job_id, "--quiet")):
        done = cli.here(*args)
        _assert_escaped(done.stdout)
        _assert_escaped(done.stderr)
    listed = cli.here("list", env={"COLUMNS": "300"}).stdout
    assert "\\x1b]0;pwned\\x07" in listed and "\\x1b[2J" in listed and "\\u202e" in cli.here("show", job_id).stdout
    assert "odd\\x1b[2J" in cli.here("stats").stdout
    shown = json.loads(cli.here("show", job_id, "--json").stdout)  # JSON escapes on its own
    assert shown["prompt"] == HOSTILE
