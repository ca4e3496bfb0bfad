"""Hostile input at the command's door: what a review found getting past it, each pinned here."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import sqlalchemy as sa

from dgxqueue.storage import complete_generation, dispose_engines, init_db, session_scope
from dgxqueue.storage.models import G
from tests.acceptance.test_cli import Cli, assert_error

# What the terminal must never receive raw, whatever a file, argv or the database holds.
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e")


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_errors__echoed_input_is_escaped_on_stderr(cli: Cli) -> None:
    """Error messages that echo an id, a JSON key or a metadata path show control characters escaped."""
    cli.add("already here")
    unknown_key = _write(cli.folder / "key.jsonl", '{"prompt": "x", "\\u001b]0;pwned\\u0007": 1}')
    nul_in_key = _write(cli.folder / "meta.jsonl", '{"prompt": "x", "metadata": {"\\u001b[2J\\u009b": "a\\u0000"}}')
    for args, code in ((("show", "abcd\x1b]0;pwned\x07"), 3), (("wait", "\u202eabcd", "-q"), 3),
                       (("enqueue", "--jsonl", str(unknown_key)), 65), (("enqueue", "--jsonl", str(nul_in_key)), 65),
                       (("enqueue", "x", "--metadata", '{"\\u001b[2J": "a\\u0000"}'), 65)):
        done = cli.here(*args)
        assert_error(done, code)
        assert not [raw for raw in RAW_CONTROLS if raw in done.stderr], done.stderr
        assert "\\x1b" in done.stderr or "\\u202e" in done.stderr, done.stderr


def test_resolve_id__undecodable_argv_is_not_found(cli: Cli) -> None:
    """An id of bytes that are not UTF-8 (lone surrogates in argv) is not found (3), on every command."""
    cli.add("already here")
    before = cli.snapshot()
    for command in ("show", "cancel", "retry", "wait"):
        done = cli.here(command, "\udcff\udcfeabcd")
        assert_error(done, 3, "not found", "\\udcff")
    assert cli.snapshot() == before


def test_enqueue__jsonl_from_a_closed_stdin(cli: Cli) -> None:
    """``--jsonl -`` with standard input closed (``<&-``): exit 74 saying so, nothing written."""
    done = subprocess.run(cli.command("enqueue", "--jsonl", "-"), cwd=cli.folder, env=cli.env, stdin=None,
                          capture_output=True, text=True, timeout=60, check=False,
                          preexec_fn=lambda: os.close(0))
    assert_error(done, 74, "standard input is closed")
    assert cli.snapshot() is None


def test_prune__file_paths_it_keeps_are_escaped(cli: Cli) -> None:
    """prune names the files it leaves alone (outside the outputs folder, written by plain SQL)
    with controls escaped."""
    [old, outside] = cli.add("old", "outside")
    engine = init_db(cli.url)
    with session_scope(engine) as session:
        complete_generation(session, old, 1.0, 44)
    with engine.begin() as conn:  # paths written by plain SQL, one of them outside the outputs folder
        conn.execute(sa.update(G).where(G.c.id == old).values(file_path="outputs/\x1b]0;pwned\x07\u202e.wav"))
        conn.execute(sa.update(G).where(G.c.id == outside)
                     .values(file_path="/tmp/\x1b]0;pwned\x07\u202e\x1b[2J.wav", status="completed"))
    dispose_engines()
    done = cli.here("prune", "--older-than", "0s", "--delete-files")
    assert done.returncode == 0, done.stderr
    assert "/tmp/\\x1b]0;pwned\\x07\\u202e\\x1b[2J.wav" in done.stdout, done.stdout
    assert not [raw for raw in RAW_CONTROLS if raw in done.stdout], done.stdout


def test_enqueue__jsonl_first_line_may_start_with_a_bom(cli: Cli) -> None:
    """A UTF-8 byte order mark before the first line (Windows editors write one) is not part of the JSON."""
    jobs = cli.folder / "jobs.jsonl"
    jobs.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\r\n{"prompt": "second"}\r\n')
    cli.ok("db", "upgrade")  # producers create only the built-in default database
    done = cli.here("enqueue", "--jsonl", str(jobs), "--json")
    assert done.returncode == 0, done.stderr
    assert [row["prompt"] for row in json.loads(done.stdout)] == ["first", "second"]


def test_enqueue__jsonl_huge_line_is_refused_without_reading_it_whole(cli: Cli) -> None:
    """A line far longer than any job (metadata of 200 MB) is refused with exit 65 in bounded memory,
    where reading it whole ran out of a 600 MiB address space (internal error)."""
    jobs = cli.folder / "jobs.jsonl"
    with jobs.open("w") as out:
        out.write('{"prompt": "ok"}\n{"prompt": "x", "metadata": {"k": "')
        for _ in range(200):
            out.write("a" * 1_000_000)
        out.write('"}}\n')
    limit = 600 * 1024 * 1024
    done = subprocess.run(cli.command("enqueue", "--jsonl", str(jobs)), cwd=cli.folder, env=cli.env,
                          capture_output=True, text=True, timeout=60, check=False,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert_error(done, 65, "line 2", "longer than")
    assert cli.snapshot() is None
