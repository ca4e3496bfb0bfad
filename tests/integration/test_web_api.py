"""The status page's JSON API, file route and guards, in process on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from dgxqueue.config import Settings
from dgxqueue.storage import complete_generation, create_generations, fail_generation, session_scope
from dgxqueue.storage.models import G
from dgxqueue.storage.registry import DaemonEntry, register
from tests.support.daemons import make_settings
from tests.support.web import client, csrf_token, write_wav


@pytest.fixture
def settings(engine: Engine, db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path / "outputs")


def _jobs(engine: Engine, prompts: list[str], model: str = "synth") -> list[str]:
    with session_scope(engine) as session:
        return create_generations(session, [{"prompt": p, "model_name": model, "duration_seconds": 1.0,
                                             "sample_rate": 8000, "channels": 1} for p in prompts])


def _complete_with_file(engine: Engine, settings: Settings, job_id: str, seconds: float = 2.0) -> int:
    size = write_wav(settings.outputs_dir / f"{job_id}.wav", seconds)
    with session_scope(engine) as session:
        complete_generation(session, job_id, 0.5, size, metadata={"bpm": 90, "key": "Am"})
    return size


def test_web_api__overview_daemons_jobs_and_one_job(engine: Engine, settings: Settings) -> None:
    """The API's four reads hold what the database holds: counts by status and model, a daemon
    with the job it runs and its progress, every column of a job, its metadata and its player."""
    pending = _jobs(engine, ["calm piano", "fast drums"])
    done, failed, running = _jobs(engine, ["done one", "failed one", "running one"])
    other = _jobs(engine, ["other model"], model="musicgen-small")
    _complete_with_file(engine, settings, done)
    with session_scope(engine) as session:
        fail_generation(session, failed, "the GPU fell off <b>the bus</b>")
        register(session, DaemonEntry("box-1-abc", "box", 1, "synth", ("synth",), "1.0"), lease=timedelta(seconds=60))
        session.execute(sa.update(G).where(G.c.id == running).values(
            status="processing", worker_id="box-1-abc", attempts=1, progress_done=3, progress_total=10,
            lease_expires_at=sa.func.current_timestamp()))
    with client(settings) as browser:
        overview = browser.get("/api/overview").json()
        assert overview["by_status"] == {"pending": 3, "processing": 1, "completed": 1, "failed": 1}
        models = {line["model"]: line for line in overview["models"]}
        assert models["synth"]["pending"] == 2 and models["synth"]["processing"] == 1
        assert models["synth"]["live_daemons"] == 1 and models["musicgen-small"]["pending"] == 1
        assert models["synth"]["oldest_due_age_seconds"] is not None
        assert models["synth"]["finished"]["completed"]["15"] == 1
        assert models["synth"]["finished"]["failed"]["1"] == 1
        assert overview["finished"]["completed"] == {"1": 1, "5": 1, "15": 1}
        assert [(j["id"], j["worker_id"], j["progress"]) for j in overview["running"]] == [(running, "box-1-abc", 0.3)]

        daemons = browser.get("/api/daemons").json()["daemons"]
        assert [d["id"] for d in daemons] == ["box-1-abc"]
        assert [(j["id"], j["progress_done"], j["progress_total"], j["progress"]) for j in daemons[0]["jobs"]] == \
            [(running, 3, 10, 0.3)]

        job = browser.get(f"/api/jobs/{done}").json()
        assert set(c.name for c in G.columns) <= set(job)
        assert job["status"] == "completed" and job["metadata"] == {"bpm": 90, "key": "Am"}
        assert job["audio_url"] == f"/files/{done}.wav" and job["download_url"] == f"/files/{done}.wav?download=1"
        assert browser.get(f"/api/jobs/{failed}").json()["error_message"] == "the GPU fell off <b>the bus</b>"
        assert browser.get("/api/jobs/no-such-job").status_code == 404

        listed = browser.get("/api/jobs", params={"model": "synth", "status": "pending"}).json()["jobs"]
        assert sorted(j["id"] for j in listed) == sorted(pending)
        assert [j["id"] for j in browser.get("/api/jobs", params={"q": "OTHER"}).json()["jobs"]] == other
        bad = browser.get("/api/jobs", params={"status": "sleeping"})
        assert bad.status_code == 400 and bad.json()["field"] == "status"


def test_web_api__keyset_pages_cover_every_job_once_in_order(engine: Engine, settings: Settings) -> None:
    """Pages of 3 walk every job once, newest first (ties in created_at broken by id), and a
    time range and a search (words as word prefixes, as ``dgxqueue list --search``; LIKE's
    wildcards are punctuation) match only what they say; a search pages by keyset too."""
    ids = _jobs(engine, [f"prompt {i}" for i in range(7)] + ["100% _literal_"])
    with session_scope(engine) as session:  # two rows share a created_at: the cursor must not skip one
        same = session.execute(sa.select(G.c.created_at).where(G.c.id == ids[0])).scalar_one()
        session.execute(sa.update(G).where(G.c.id == ids[1]).values(created_at=same))
    with client(settings) as browser:
        seen: list[str] = []
        cursor = None
        for _ in range(10):
            page = browser.get("/api/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            seen += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids) and len(seen) == len(ids)
        with session_scope(engine) as session:
            order = session.execute(sa.select(G.c.id).order_by(G.c.created_at.desc(), G.c.id.desc())).scalars().all()
        assert seen == list(order)
        found = browser.get("/api/jobs", params={"q": "100% _lit"}).json()["jobs"]
        assert [j["id"] for j in found] == [ids[-1]]
        assert [j["id"] for j in browser.get("/api/jobs", params={"q": "0%"}).json()["jobs"]] == [ids[0]]
        assert browser.get("/api/jobs", params={"q": "_rompt"}).json()["jobs"] == []  # a prefix, not inside
        prompts = [j["id"] for j in browser.get("/api/jobs", params={"q": "PROM", "limit": 500}).json()["jobs"]]
        assert prompts == [job_id for job_id in order if job_id != ids[-1]]
        searched: list[str] = []
        cursor = None
        for _ in range(10):
            page = browser.get("/api/jobs", params={"q": "prompt", "limit": 2,
                                                    **({"cursor": cursor} if cursor else {})}).json()
            searched += [j["id"] for j in page["jobs"]]
            if (cursor := page["next_cursor"]) is None:
                break
        assert searched == prompts  # the tie in created_at neither skipped nor repeated
        assert browser.get("/api/jobs", params={"q": "x" * 2000}).json()["field"] == "q"
        assert browser.get("/api/jobs", params={"since": "2999-01-01T00:00"}).json()["jobs"] == []
        assert len(browser.get("/api/jobs", params={"until": "2999-01-01T00:00", "limit": 500}).json()["jobs"]) == 8
        assert browser.get("/api/jobs", params={"cursor": "not-a-cursor"}).json()["field"] == "cursor"
        assert browser.get("/api/jobs", params={"limit": "0"}).json()["field"] == "limit"


def test_web_files__ranges_read_back_and_escapes_refused(engine: Engine, settings: Settings, tmp_path: Path) -> None:
    """The completed job's file comes whole, by a range (206, the very bytes) and by a suffix
    range; a range past the end is 416. Paths out of the outputs folder (.., absolute,
    percent-encoded, through a symlink) and hidden temporaries are 404."""
    (job,) = _jobs(engine, ["listen to me"])
    size = _complete_with_file(engine, settings, job)
    data = (settings.outputs_dir / f"{job}.wav").read_bytes()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    os.symlink(secret, settings.outputs_dir / "escape.wav")
    os.symlink("/etc", settings.outputs_dir / "etc")
    (settings.outputs_dir / f".{job}.wav.1.tmp").write_bytes(b"temporary")
    with client(settings) as browser:
        url = browser.get(f"/api/jobs/{job}").json()["audio_url"]
        whole = browser.get(url)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["accept-ranges"] == "bytes" and whole.headers["content-type"] == "audio/wav"
        part = browser.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == data[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{size}"
        tail = browser.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        past = browser.get(url, headers={"Range": f"bytes={size}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
        download = browser.get(url + "?download=1")
        assert download.headers["content-disposition"] == f"attachment; filename*=UTF-8''{job}.wav"
        head = browser.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(size) and head.content == b""
        for escape in ["/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt", "/files/%2fetc%2fpasswd",
                       "/files//etc/passwd", "/files/escape.wav", "/files/etc/passwd", f"/files/.{job}.wav.1.tmp",
                       "/files/", "/files/nothing.wav", "/files/%00"]:
            refused = browser.get(escape)
            assert refused.status_code == 404, escape
            assert b"not for the page" not in refused.content and b"root:" not in refused.content


def test_web_actions__csrf_required_and_checked(engine: Engine, settings: Settings) -> None:
    """A POST without the CSRF token, with a wrong one, or with another client's changes nothing
    (403); with the page's token the cancel goes through."""
    (job,) = _jobs(engine, ["cancel me"])
    with client(settings) as browser:
        assert browser.post(f"/api/jobs/{job}/cancel").status_code == 403
        token = csrf_token(browser)
        assert browser.post(f"/api/jobs/{job}/cancel", data={"csrf": "0" * 64}).status_code == 403
        assert browser.get(f"/api/jobs/{job}").json()["status"] == "pending"
        with TestClient(browser.app, base_url="http://127.0.0.1:8470") as other:  # its own cookie: the token is not its
            assert other.post(f"/api/jobs/{job}/cancel", data={"csrf": token}).status_code == 403
        done = browser.post(f"/api/jobs/{job}/cancel", data={"csrf": token, "next": f"/jobs/{job}"})
        assert done.status_code == 303 and done.headers["location"] == f"/jobs/{job}"
        assert browser.get(f"/api/jobs/{job}").json()["status"] == "failed"


def test_web_actions__cancel_retry_pause_resume_enqueue(engine: Engine, settings: Settings) -> None:
    """Each action through the JSON API does what its library call does; a refused one says why
    (409 for a state that forbids it, 400 naming a bad field)."""
    (job,) = _jobs(engine, ["again and again"])
    with client(settings) as browser:
        token = csrf_token(browser)

        def post(path: str, **data: str) -> Any:
            return browser.post(path, data=data, headers={"X-CSRF-Token": token, "Accept": "application/json"})

        assert post(f"/api/jobs/{job}/retry").status_code == 409
        assert post(f"/api/jobs/{job}/cancel").json() == {"id": job, "status": "failed"}
        assert post(f"/api/jobs/{job}/cancel").status_code == 409
        assert post(f"/api/jobs/{job}/retry").json() == {"id": job, "status": "pending"}
        assert post("/api/models/pause", model="synth", reason="GPU swap").json()["paused"] is True
        assert browser.get("/api/overview").json()["models"][0]["paused_reason"] == "GPU swap"
        assert post("/api/models/resume", model="synth").json() == {"model": "synth", "paused": False,
                                                                   "was_paused": True}
        made = post("/api/jobs", prompt="queued from the page", duration_seconds="2.5").json()
        assert browser.get(f"/api/jobs/{made['id']}").json()["duration_seconds"] == 2.5
        refused = post("/api/jobs", prompt="", duration_seconds="2")
        assert refused.status_code == 400 and refused.json()["field"] == "prompt"
        assert post("/api/jobs", prompt="x", duration_seconds="long").json()["field"] == "duration_seconds"


def test_web_actions__a_json_body_is_read_as_the_form_is(engine: Engine, settings: Settings) -> None:
    """A tool posting JSON to the JSON API: its fields are read as the form's. It used to be
    ignored, so a good request was refused as "prompt='' is invalid"."""
    with client(settings) as browser:
        headers = {"X-CSRF-Token": csrf_token(browser), "Accept": "application/json"}

        def post(path: str, body: object) -> Any:
            return browser.post(path, json=body, headers=headers)

        made = post("/api/jobs", {"prompt": "posted as JSON", "duration_seconds": 2.5, "model": "synth"})
        assert made.status_code == 200, made.text
        job = browser.get(f"/api/jobs/{made.json()['id']}").json()
        assert (job["prompt"], job["duration_seconds"], job["model_name"]) == ("posted as JSON", 2.5, "synth")
        assert post("/api/models/pause", {"model": "synth", "reason": "swap"}).json()["paused"] is True
        refused = post("/api/jobs", {"prompt": ["not", "text"]})
        assert refused.status_code == 400 and refused.json()["field"] == "prompt"
        for raw in (b"[1]", b'"text"', b"null", b'{"prompt":', b"\xff"):
            refused = browser.post("/api/jobs", content=raw, headers={**headers, "Content-Type": "application/json"})
            assert refused.status_code == 400 and "JSON object" in refused.json()["error"], raw
        assert post("/api/jobs", {"prompt": "x", "duration_seconds": True}).json()["field"] == "duration_seconds"


def test_web_actions__an_empty_json_body_is_no_fields(engine: Engine, settings: Settings) -> None:
    """A tool that names JSON but sends no body (curl -H 'Content-Type: application/json' on a
    cancel, which takes no fields) is answered as before JSON bodies were read, not refused as
    "expected a JSON object"."""
    (job,) = _jobs(engine, ["cancel me"])
    with client(settings) as browser:
        headers = {"X-CSRF-Token": csrf_token(browser), "Accept": "application/json",
                   "Content-Type": "application/json"}
        cancelled = browser.post(f"/api/jobs/{job}/cancel", content=b"", headers=headers)
        assert cancelled.status_code == 200 and cancelled.json() == {"id": job, "status": "failed"}, cancelled.text
        assert browser.post(f"/api/jobs/{job}/retry", content=b" \r\n", headers=headers).status_code == 200
        refused = browser.post("/api/jobs", content=b"", headers=headers)
        assert refused.status_code == 400 and refused.json()["field"] == "prompt", refused.text


def test_web_read_only__refuses_every_action_and_shows_no_buttons(engine: Engine, settings: Settings) -> None:
    """In read-only mode a POST with a valid token is refused (403) and the pages hold no forms."""
    (job,) = _jobs(engine, ["look, don't touch"])
    with client(settings, read_only=True) as browser:
        token = csrf_token(browser)
        for path in [f"/api/jobs/{job}/cancel", "/api/models/pause", "/api/jobs"]:
            refused = browser.post(path, data={"csrf": token, "model": "synth", "prompt": "x"})
            assert refused.status_code == 403 and "read-only" in refused.text
        assert browser.get(f"/api/jobs/{job}").json()["status"] == "pending"
        assert "<form method=\"post\"" not in browser.get(f"/jobs/{job}").text
        assert "<form method=\"post\"" not in browser.get("/").text


def test_web_token__required_off_loopback(engine: Engine, settings: Settings) -> None:
    """With a token every page, API call and file needs it: no token or a wrong one is 401 (or
    the login form); a Bearer header passes; ?token= once sets a cookie and leaves the address;
    the login form sets the same cookie, which never holds the token itself."""
    secret = "s3cret-token-of-some-length"
    with client(settings, token=secret, loopback_only=False) as browser:
        refused = browser.get("/api/overview")
        assert refused.status_code == 401 and refused.headers["x-frame-options"] == "DENY"
        assert browser.get("/files/x.wav").status_code == 401
        assert browser.get("/api/overview", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert browser.get("/").headers["location"].startswith("/login")
        assert browser.get("/api/overview", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        moved = browser.get(f"/jobs?status=pending&token={secret}")
        assert moved.status_code == 303 and moved.headers["location"] == "/jobs?status=pending"
        assert secret not in moved.headers["set-cookie"]
        assert browser.get("/api/overview").status_code == 200  # the cookie now
    with client(settings, token=secret, loopback_only=False) as browser:
        assert browser.post("/login", data={"token": "wrong", "next": "/daemons"}).status_code == 401
        entered = browser.post("/login", data={"token": secret, "next": "/daemons"})
        assert entered.status_code == 303 and entered.headers["location"] == "/daemons"
        assert browser.get("/daemons").status_code == 200


def test_web_host__loopback_only_without_a_token(engine: Engine, settings: Settings) -> None:
    """Bound to loopback without a token, a request naming another host (DNS rebinding) is refused."""
    with client(settings) as browser:
        assert browser.get("/api/overview", headers={"Host": "evil.example:8470"}).status_code == 421
        assert browser.get("/api/overview", headers={"Host": "localhost:8470"}).status_code == 200
        assert browser.get("/api/overview", headers={"Host": "[::1]:8470"}).status_code == 200


def test_web_pages__escape_prompts_and_errors(engine: Engine, settings: Settings) -> None:
    """A prompt and an error holding markup are shown as text on every page, under a policy
    that runs no inline script anyway."""
    (job,) = _jobs(engine, ["<script>alert('x')</script><img src=x onerror=alert(1)>"])
    with session_scope(engine) as session:
        fail_generation(session, job, "<iframe src=javascript:alert(2)>")
    with client(settings) as browser:
        for path in [f"/jobs/{job}", "/jobs", "/", "/daemons"]:
            page = browser.get(path)
            assert page.status_code == 200
            assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<iframe" not in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
        shown = browser.get(f"/jobs/{job}").text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in shown and "&lt;iframe" in shown


def test_web_overview__read_once_per_cache_period(engine: Engine, settings: Settings) -> None:
    """Within the cache period every caller gets the same overview (one read for many open pages);
    with no cache each call reads again."""
    with client(settings, overview_cache_seconds=3600.0) as cached, client(settings) as fresh:
        before = cached.get("/api/overview").json()["by_status"]["pending"]
        _jobs(engine, ["one more"])
        assert cached.get("/api/overview").json()["by_status"]["pending"] == before
        assert fresh.get("/api/overview").json()["by_status"]["pending"] == before + 1


def test_web_api__a_database_error_is_one_line_without_sql(engine: Engine, settings: Settings,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A statement the database refuses (here: its table gone) is a 500 naming the error's kind,
    never the SQL; the page says the same in its error page. The server logs its cause (the
    database's message), which nothing recorded: the operator could not tell what failed."""
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE generations"))
    with client(settings) as browser, caplog.at_level(logging.ERROR, logger="dgxqueue.web"):
        refused = browser.get("/api/jobs")
        assert refused.status_code == 500 and refused.json()["error"].startswith("database error: ")
        assert "SELECT" not in refused.text
        page = browser.get("/jobs")
        assert page.status_code == 500 and "database error" in page.text and "SELECT" not in page.text
    causes = [r.getMessage() for r in caplog.records
              if r.name.startswith("dgxqueue.web") and r.levelno >= logging.ERROR]
    assert len(causes) == 2 and all("generations" in cause for cause in causes), causes
    assert "'/api/jobs'" in causes[0] and "'/jobs'" in causes[1]


def test_web_token__a_login_address_holding_the_token_is_left_at_once(engine: Engine, settings: Settings) -> None:
    """``/login?token=`` (a link someone was sent) sets the cookie and redirects to ``next``,
    the token left behind; a wrong one goes back to the form, without it. No Location holds a
    token; every login answer is no-store and no-referrer. A redirect out of a job page keeps
    its encoded id ("?" in it)."""
    secret = "s3cret-token-of-some-length"
    odd = f"/jobs/{quote('what?x=1', safe='')}"
    with client(settings, token=secret, loopback_only=False) as browser:
        back = parse_qs(urlsplit(browser.get(odd).headers["location"]).query)["next"][0]
        assert "?" not in back and unquote(back) == "/jobs/what?x=1"
        answers = [browser.get("/login", params={"next": "/daemons"}),
                   browser.get("/login", params={"token": "wrong-token", "next": "/daemons"}),
                   browser.post("/login", data={"token": "wrong-token", "next": "/daemons"})]
        assert [a.status_code for a in answers] == [200, 303, 401]
        assert answers[1].headers["location"] == "/login?next=%2Fdaemons"
        assert browser.get("/daemons").status_code == 303  # no cookie from a wrong token
        answers.append(browser.get("/login", params={"token": secret, "next": "/daemons"}))
        assert answers[-1].status_code == 303 and answers[-1].headers["location"] == "/daemons"
        assert browser.get("/daemons").status_code == 200
        answers.append(browser.post("/login", data={"token": secret, "next": "/jobs"}))
        answers.append(browser.get(f"{odd}?token={secret}"))
        moved = answers[-1].headers["location"]
        assert "?" not in moved and unquote(moved) == "/jobs/what?x=1"
        for answer in answers:
            assert answer.headers["cache-control"] == "no-store", answer.request.url
            assert answer.headers["referrer-policy"] == "no-referrer"
            assert "token" not in answer.headers.get("location", "") and secret not in str(answer.headers)
