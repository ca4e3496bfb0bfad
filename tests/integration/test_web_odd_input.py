"""The status page against what an attacker sends and what plain SQL stores: numbers that are not
finite, times at the edge of Python's range, NUL bytes (which PostgreSQL text cannot hold), Range
headers with thousands of digits, an empty file. Every answer is a page, a typed 4xx or the data;
never a 500."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from markupsafe import escape
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from dgxqueue.config import Settings
from dgxqueue.storage import session_scope
from dgxqueue.storage.validation import MAX_PAUSE_REASON_LENGTH
from dgxqueue.web import WebOptions, create_app
from tests.support.daemons import make_settings
from tests.support.web import BASE, client, csrf_token, write_wav

#: Times that parse, but whose offset carries them past year 1 or year 9999 in UTC.
EDGE_TIMES = ("0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00")


@pytest.fixture
def settings(engine: Engine, db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path / "outputs")


def _insert(engine: Engine, job_id: str, **values: Any) -> None:
    """A row as plain SQL writes it (bound values, no model checks)."""
    row: dict[str, Any] = {"id": job_id, "prompt": "odd", "model_name": "synth", "duration_seconds": 1.0,
                           "sample_rate": 8000, "channels": 1, "file_path": f"{job_id}.wav", "status": "pending",
                           "created_at": "2026-12-06T10:00:00+00:00", **values}
    # Untyped columns: the values go to the driver as they are, past the models' time and JSON types.
    table = sa.table("generations", *(sa.column(name) for name in row))
    with session_scope(engine) as session:
        session.execute(sa.insert(table).values(row))


def _strict_json(text: str) -> Any:
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the API's JSON")
    return json.loads(text, parse_constant=refuse)


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_web_odd_rows__non_finite_numbers_and_edge_times_keep_every_page_up(engine: Engine,
                                                                             settings: Settings) -> None:
    """A duration and a generation time of infinity, metadata holding a number past a float's
    range (both engines store them) and, on SQLite, a time text whose offset takes it past the
    datetime range: every page and every API read answers 200, in strict JSON."""
    _insert(engine, "inf-duration", duration_seconds=float("inf"))
    _insert(engine, "huge-metadata", status="completed", generation_time_seconds=float("-inf"),
            completed_at="2026-12-06T10:00:01+00:00", metadata='{"bpm": 1e999, "list": [1e999]}')
    ids = ["inf-duration", "huge-metadata"]
    if engine.dialect.name == "sqlite":  # PostgreSQL's timestamptz holds no such text
        _insert(engine, "edge-created", created_at=EDGE_TIMES[0])
        _insert(engine, "edge-completed", status="completed", completed_at=EDGE_TIMES[1])
        _insert(engine, "edge-running", status="processing", started_at=EDGE_TIMES[0], claimed_at=EDGE_TIMES[1])
        ids += ["edge-created", "edge-completed", "edge-running"]
    with client(settings) as browser:
        for url in ["/", "/daemons", "/jobs", *(f"/jobs/{job_id}" for job_id in ids)]:
            assert browser.get(url).status_code == 200, url
        for url in ["/api/overview", "/api/daemons", "/api/jobs", *(f"/api/jobs/{job_id}" for job_id in ids)]:
            answer = browser.get(url)
            assert answer.status_code == 200, (url, answer.text)
            _strict_json(answer.text)
        listed = _strict_json(browser.get("/api/jobs").text)["jobs"]
        assert sorted(job["id"] for job in listed) == sorted(ids)
        assert _strict_json(browser.get("/api/jobs/inf-duration").text)["duration_seconds"] == "inf"
        assert _strict_json(browser.get("/api/jobs/huge-metadata").text)["metadata"] == {"bpm": "inf",
                                                                                         "list": ["inf"]}


def test_web_odd_input__edge_times_and_nul_bytes_are_typed_refusals(engine: Engine, settings: Settings) -> None:
    """since/until/cursor past the datetime range and NUL bytes in a filter, a cursor, a job id,
    a model name or a pause reason, and a reason past its length: 400 naming the field (404 for
    a job id), nothing written."""
    _insert(engine, "a-job")
    with client(settings) as browser:
        for params, field in [({"since": EDGE_TIMES[0]}, "since"), ({"until": EDGE_TIMES[1]}, "until"),
                              ({"cursor": _cursor(f"{EDGE_TIMES[0]}|x")}, "cursor"),
                              ({"cursor": _cursor("2026-12-06T10:00:00+00:00|a\x00b")}, "cursor"),
                              ({"model": "a\x00b"}, "model"), ({"q": "a\x00b"}, "q")]:
            answer = browser.get("/api/jobs", params=params)
            assert answer.status_code == 400 and answer.json()["field"] == field, (params, answer.text)
            page = browser.get("/jobs", params=params)
            assert page.status_code == 400, params
        assert browser.get("/api/jobs/a%00b").status_code == 404
        assert browser.get("/jobs/a%00b").status_code == 404
        headers = {"X-CSRF-Token": csrf_token(browser), "Accept": "application/json"}
        for path in ["/api/jobs/a%00b/cancel", "/api/jobs/a%00b/retry"]:
            assert browser.post(path, headers=headers).status_code == 404, path
        for data, field in [({"model": "a\x00b"}, "model"), ({"model": "m" * 201}, "model"),
                            ({"model": "synth", "reason": "why\x00"}, "reason"),
                            ({"model": "synth", "reason": "r" * (MAX_PAUSE_REASON_LENGTH + 1)}, "reason")]:
            for path in ["/api/models/pause", "/api/models/resume"]:
                if path.endswith("resume") and field == "reason":
                    continue
                answer = browser.post(path, data=data, headers=headers)
                assert answer.status_code == 400 and answer.json()["field"] == field, (path, data, answer.text)
        assert _strict_json(browser.get("/api/overview").text)["models"][0]["paused"] is False


def test_web_files__huge_range_numbers_and_an_empty_file(settings: Settings) -> None:
    """A Range whose numbers have thousands of digits is a whole file or a 416, never a 500; a
    suffix range of an empty file is 416 (no byte to send), not a 206 of "bytes 0--1/0"."""
    settings.outputs_dir.mkdir(parents=True, exist_ok=True)
    data = bytes(range(256)) * 4
    (settings.outputs_dir / "a.wav").write_bytes(data)
    (settings.outputs_dir / "empty.wav").write_bytes(b"")
    many = "1" * 5000
    with client(settings) as browser:
        past = browser.get("/files/a.wav", headers={"Range": f"bytes={many}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
        tail = browser.get("/files/a.wav", headers={"Range": f"bytes=-{many}"})
        assert tail.status_code == 206 and tail.content == data
        rest = browser.get("/files/a.wav", headers={"Range": f"bytes=10-{many}"})
        assert rest.status_code == 206 and rest.content == data[10:]
        assert rest.headers["content-range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
        padded = browser.get("/files/a.wav", headers={"Range": f"bytes={'0' * 5000}5-{'0' * 30}9"})
        assert padded.status_code == 206 and padded.content == data[5:10]
        empty = browser.get("/files/empty.wav", headers={"Range": "bytes=-5"})
        assert empty.status_code == 416 and empty.headers["content-range"] == "bytes */0"


def test_web_db_busy__an_exhausted_pool_is_503_not_a_bare_500(engine: Engine, db_url: str,
                                                               settings: Settings) -> None:
    """Every connection of the pool held (pollers waiting on a slow database): the page and the
    API answer 503 "database unavailable" in one line, as for a lost connection, instead of
    Starlette's bare 500; the next request after a connection returns is served."""
    small = sa.create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    app = create_app(WebOptions(settings=settings, engine=small, overview_cache_seconds=0.0))
    try:
        with TestClient(app, base_url=BASE, follow_redirects=False) as browser:
            with small.connect():
                busy = browser.get("/api/jobs")
                assert busy.status_code == 503, busy.text
                assert busy.json()["error"].startswith("database unavailable")
                page = browser.get("/jobs")
                assert page.status_code == 503 and "database unavailable" in page.text
            assert browser.get("/api/jobs").status_code == 200
    finally:
        small.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite's readers (WAL) wait for no writer
def test_web_db_busy__a_locked_table_is_503_not_a_hang(engine: Engine, db_url: str, settings: Settings) -> None:
    """PostgreSQL: the generations table locked (a migration, VACUUM FULL): each read of the page
    and the API gives up within seconds with 503 rather than holding its connection until the
    lock goes (the pool would run dry and every later poll wait too); served again after."""
    _insert(engine, "a-job")
    with client(settings) as browser, engine.connect() as locker:
        # The server ends the locking session after 25 s idle, so that a read which waits for
        # the lock (the bug) comes back as a failure rather than hanging the test.
        locker.execute(sa.text("SET idle_in_transaction_session_timeout = '25s'"))
        locker.execute(sa.text("LOCK TABLE generations IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        for url in ["/api/jobs", "/api/jobs/a-job", "/api/overview", "/jobs"]:
            answer = browser.get(url)
            assert answer.status_code == 503, (url, answer.text)
        assert time.monotonic() - started < 20
        locker.rollback()
        for url in ["/api/jobs", "/api/jobs/a-job", "/api/overview", "/api/daemons"]:
            assert browser.get(url).status_code == 200, url


def test_web_enqueue__a_refusal_names_the_form_field(engine: Engine, settings: Settings) -> None:
    """The enqueue form's fields are prompt, model and duration_seconds: a refusal names the one
    the user typed into (model, not the column model_name), and writes nothing."""
    with client(settings) as browser:
        headers = {"X-CSRF-Token": csrf_token(browser), "Accept": "application/json"}
        for data, field in [({"prompt": "ok", "model": "m\x00"}, "model"),
                            ({"prompt": "ok", "model": "m" * 201}, "model"), ({"prompt": ""}, "prompt"),
                            ({"prompt": "ok", "duration_seconds": "1e999"}, "duration_seconds")]:
            answer = browser.post("/api/jobs", data=data, headers=headers)
            assert answer.status_code == 400 and answer.json()["field"] == field, (data, answer.text)
        assert browser.get("/api/overview").json()["total"] == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL's integer column holds no infinity
def test_web_odd_rows__a_daemon_row_holding_infinity(engine: Engine, settings: Settings) -> None:
    """SQLite: a daemon row whose pid is infinity (plain SQL; SQLite keeps a REAL in an INTEGER
    column) still lets the daemons page and its API answer, in strict JSON."""
    row = {"id": "odd-daemon", "host": "box", "pid": float("inf"), "generator": "synth", "models": '["synth"]',
           "version": "1", "started_at": "2026-12-06T10:00:00+00:00", "heartbeat_at": "2026-12-06T10:00:00+00:00",
           "expires_at": "2999-01-01T00:00:00+00:00", "holding": "[]"}
    with session_scope(engine) as session:
        session.execute(sa.insert(sa.table("daemons", *(sa.column(name) for name in row))).values(row))
    with client(settings) as browser:
        answer = browser.get("/api/daemons")
        assert answer.status_code == 200, answer.text
        assert [d["pid"] for d in _strict_json(answer.text)["daemons"]] == ["inf"]
        assert browser.get("/daemons").status_code == 200 and browser.get("/").status_code == 200


def test_web_files__rows_whose_file_leads_out_of_outputs_serve_nothing(engine: Engine, settings: Settings) -> None:
    """Completed rows written by plain SQL whose file_path is a link to a file outside the
    outputs folder, goes up with '..', or passes a folder that links outside: no audio link, and
    their files' addresses are 404 without a byte of the file; a normal WAV still plays by range."""
    outputs, outside = settings.outputs_dir, settings.outputs_dir.parent / "elsewhere"
    outside.mkdir(parents=True)
    (outside / "secret.wav").write_bytes(b"not for the page")
    size = write_wav(outputs / "good.wav", 1.0)
    data = (outputs / "good.wav").read_bytes()
    os.symlink(outside / "secret.wav", outputs / "link.wav")
    os.symlink(outside, outputs / "linked-folder")
    rows = {"link": "outputs/link.wav", "up": "outputs/../elsewhere/secret.wav",
            "folder": "outputs/linked-folder/secret.wav", "good": "outputs/good.wav"}
    for job_id, file_path in rows.items():
        _insert(engine, job_id, status="completed", completed_at="2026-12-06T10:00:01+00:00", file_path=file_path)
    with client(settings) as browser:
        for job_id in ("link", "up", "folder"):
            shown = browser.get(f"/api/jobs/{job_id}").json()
            assert shown["audio_url"] is None and shown["download_url"] is None, shown
        for url in ["/files/link.wav", "/files/link.wav?download=1", "/files/..%2Felsewhere%2Fsecret.wav",
                    "/files/%2E%2E/elsewhere/secret.wav", "/files/linked-folder/secret.wav"]:
            refused = browser.get(url, headers={"Range": "bytes=0-3"})
            assert refused.status_code == 404 and b"not for the page" not in refused.content, url
        url = browser.get("/api/jobs/good").json()["audio_url"]
        assert url == "/files/good.wav"
        part = browser.get(url, headers={"Range": "bytes=44-99"})
        assert part.status_code == 206 and part.content == data[44:100]
        assert part.headers["content-range"] == f"bytes 44-99/{size}"


#: Job ids only plain SQL writes (the API draws UUIDs): each character a URL gives a meaning to.
ODD_IDS = ("dir/job", "a/cancel", "100%", "what?x=1", "tag#1", "with space", "naïve ジョブ", '<i>"q"&/x')


def test_web_job_ids__any_id_opens_its_page_and_its_actions_target_it(engine: Engine, settings: Settings) -> None:
    """Ids holding "/", "%", "?", "#", a space, non-ASCII or HTML, written by plain SQL: the jobs
    list links each to its own page (200, the id shown escaped), and the page's cancel and then
    retry buttons change that job and no other (rows named like the parts of an id stay pending)."""
    decoys = ("dir", "job", "a", "cancel", "x")
    for job_id in (*ODD_IDS, *decoys):
        _insert(engine, job_id)
    with client(settings) as browser:
        listed = browser.get("/jobs", params={"limit": 50})
        links = re.findall(r'<tr data-job="[^"]*">\s*<td><a href="([^"]+)">', listed.text)
        assert len(links) == len(ODD_IDS) + len(decoys)
        token = csrf_token(browser)
        for job_id in ODD_IDS:
            link = f"/jobs/{quote(job_id, safe='')}"
            assert link in links, job_id
            shown = browser.get(link)
            assert shown.status_code == 200, (job_id, shown.text)
            assert f"<h2>Job <code>{escape(job_id)}</code></h2>" in shown.text
            cancel = re.search(r'<form method="post" action="([^"]+)"', shown.text)
            assert cancel is not None and cancel.group(1).endswith("/cancel")
            done = browser.post(html.unescape(cancel.group(1)), data={"csrf": token, "next": link})
            assert done.status_code == 303 and done.headers["location"] == link
            assert browser.get(f"/api/jobs/{quote(job_id, safe='')}").json()["status"] == "failed"
            failed = browser.get(link).text
            retry = re.search(r'<form method="post" action="([^"]+)"', failed)
            assert retry is not None and retry.group(1).endswith("/retry")
            assert browser.post(html.unescape(retry.group(1)), data={"csrf": token}).status_code == 303
            again = browser.get(f"/api/jobs/{quote(job_id, safe='')}").json()
            assert (again["id"], again["status"], again["attempts"]) == (job_id, "pending", 0)
        for job_id in decoys:
            assert browser.get(f"/api/jobs/{job_id}").json()["status"] == "pending", job_id


#: created_at values plain SQL can store that are no time Python reads, or a time in another text
#: form (it sorts as its text on SQLite), each sorting between 11:00 and 12:00 where it can.
ODD_CREATED_AT: dict[str, list[str | int]] = {
    "sqlite": ["2026-12-06 11:30 or so", "2026-12-06T11:30:00+00:00", "2026-12-06 11:30:00", 20261206, "not a time"],
    "postgresql": ["infinity", "-infinity", "10000-01-01 00:00:00+00"],
}


def test_web_jobs_pages__a_row_whose_created_at_is_no_time_ends_no_list(engine: Engine, settings: Settings) -> None:
    """Three rows at 10:00, 11:00 and 12:00 and one whose created_at plain SQL wrote as something
    else (text that is no time, another text form of a time, a number; PostgreSQL's infinity, a
    year past 9999): pages of one reach all four, none twice, in the order the list sorts by."""
    sqlite = engine.dialect.name == "sqlite"
    for odd in ODD_CREATED_AT[engine.dialect.name]:
        with session_scope(engine) as session:
            session.execute(sa.text("DELETE FROM generations"))
        for hour in (10, 11, 12):  # as the library stores a time
            _insert(engine, f"at-{hour}", created_at=f"2026-12-06 {hour}:00:00.000000" if sqlite
                    else f"2026-12-06T{hour}:00:00+00:00")
        _insert(engine, "odd", created_at=odd)
        with session_scope(engine) as session:
            order = session.execute(sa.text("SELECT id FROM generations ORDER BY created_at DESC, id DESC")).scalars()
            expected = list(order)
        with client(settings) as browser:
            seen: list[str] = []
            cursor = None
            for _ in range(8):  # twice the rows: a cursor that repeats a row would loop
                page = browser.get("/api/jobs", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
                assert page.status_code == 200, (odd, page.text)
                seen += [job["id"] for job in page.json()["jobs"]]
                if (cursor := page.json()["next_cursor"]) is None:
                    break
            assert seen == expected, odd
            html_next = re.search(r'<a href="([^"]+)" id="next">', browser.get("/jobs", params={"limit": 1}).text)
            assert html_next is not None


def test_web_jobs_pages__a_raw_cursor_holding_what_no_row_stores_is_a_400(engine: Engine, settings: Settings) -> None:
    """Raw cursors (JSON) holding an integer past SQLite's 64 bits or a lone surrogate (JSON's
    \\ud800 escape, which UTF-8 cannot carry to the driver) as the value or the id: 400 naming
    'cursor' on the API and the page, never the driver's OverflowError or UnicodeEncodeError."""
    _insert(engine, "a-job")
    tampered = ["~" + json.dumps([2**63, "x"]), "~" + json.dumps([-2**63 - 1, "x"]),
                '~["2026-12-06", "\\ud800"]', '~["\\udfff", "x"]']
    with client(settings) as browser:
        for text in tampered:
            params = {"cursor": _cursor(text)}
            answer = browser.get("/api/jobs", params=params)
            assert answer.status_code == 400 and answer.json()["field"] == "cursor", (text, answer.text)
            assert browser.get("/jobs", params=params).status_code == 400, text
