"""A completed job whose result is held under its temporary name, another job's WAV at its path:
the status page (its file addresses too), ``wait`` and a job handle say so, on real SQLite and
PostgreSQL and real files with real extended attributes, as ``show`` does (one rule:
dgxqueue.outputs.output)."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import dgxqueue
from dgxqueue.cli import main as cli_main
from dgxqueue.config import Settings
from dgxqueue.storage import complete_generation, create_generations, session_scope
from dgxqueue.storage.models import G
from tests.support import zygote
from tests.support.daemons import make_settings
from tests.support.held import FOREIGN, hold, mark, temporary
from tests.support.processes import REPO, write_config
from tests.support.web import client

OTHER = "5d1e2f3a-0000-4c5e-9f43-2a1c8e7d9b11"


@pytest.fixture
def settings(engine: Engine, db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path / "outputs")


def _completed(engine: Engine, name: str) -> str:
    """A job completed by attempt 1 of worker box-1, with ``outputs/<name>`` as its path."""
    with session_scope(engine) as session:
        [job_id] = create_generations(session, [{"prompt": "held", "model_name": "synth", "duration_seconds": 1.0,
                                                 "sample_rate": 8000, "channels": 1,
                                                 "file_path": f"outputs/{name}"}])
        complete_generation(session, job_id, 0.5, 100)
        session.execute(sa.update(G).where(G.c.id == job_id).values(attempts=1, worker_id="box-1"))
    return job_id


def test_web_api__a_held_result_is_not_offered_as_the_other_file_at_its_path(engine: Engine,
                                                                            settings: Settings) -> None:
    """The job's API and page offer no player and no download (they served the other job's WAV
    as this job's) and say why: whose file it is, where the result is held, what to do. A job
    whose own WAV is at its path still has its player."""
    held_job, own_job = _completed(engine, "held.wav"), _completed(engine, "own.wav")
    outputs = settings.outputs_dir
    hold(outputs / "held.wav", held_job, OTHER)
    (outputs / "own.wav").write_bytes(b"RIFF")
    mark(outputs / "own.wav", own_job)
    with client(settings) as browser:
        job = browser.get(f"/api/jobs/{held_job}").json()
        assert job["audio_url"] is None and job["download_url"] is None and job["output_exists"] is False, job
        note = job["output_note"]
        assert f"job {OTHER}'s WAV" in note and "move that file away" in note, note
        assert "outputs/.held.wav." in note and str(outputs) not in note, note  # relative, as file_path is
        page = browser.get(f"/jobs/{held_job}").text
        assert '<audio id="player"' not in page and "move that file away" in page
        own = browser.get(f"/api/jobs/{own_job}").json()
        assert own["audio_url"] == "/files/own.wav" and own["output_exists"] is True and own["output_note"] is None


def test_job_handle__a_held_result_has_no_output_path(engine: Engine, settings: Settings, db_url: str) -> None:
    """A handle's ``output_path`` is None while the file at the path is another's (a producer
    served the other job's WAV as its song); ``output`` says where the result is held. A missing
    file's path is still given (its rename may come a moment after the commit)."""
    held_job, missing_job = _completed(engine, "held.wav"), _completed(engine, "missing.wav")
    temp = hold(settings.outputs_dir / "held.wav", held_job, OTHER)
    job = dgxqueue.get_job(held_job, database_url=db_url, settings=settings)
    assert job.status == "completed" and job.output_path is None
    assert job.output is not None and job.output.temporary == str(temp) and job.output.holder == OTHER
    missing = dgxqueue.get_job(missing_job, database_url=db_url, settings=settings)
    assert missing.output_path == settings.outputs_dir / "missing.wav"
    assert missing.output is not None and not missing.output.exists



def test_job_handle__names_the_temporary_of_the_attempt_that_completed_as_show_does(
        engine: Engine, settings: Settings, db_url: str) -> None:
    """Beside the held result of the attempt the row completed (1, box-1), a newer temporary of
    an attempt that never committed (2, box-2: the sweep deletes it): the handle's ``output``
    names the completed attempt's, as ``show`` does. It named the newest, the dead attempt's
    file, for a producer to take as the job's result."""
    job_id = _completed(engine, "held.wav")
    completed = hold(settings.outputs_dir / "held.wav", job_id, OTHER)
    stale = temporary(settings.outputs_dir / "held.wav", job_id, attempt=2, worker_id="box-2")
    os.utime(completed, (1_000_000_000, 1_000_000_000))  # the dead attempt's is the newer
    job = dgxqueue.get_job(job_id, database_url=db_url, settings=settings)
    assert job.output is not None and job.output.temporary == str(completed) != str(stale)
    assert job.output_path is None


def test_prune__delete_files_keeps_another_jobs_wav_at_a_pruned_jobs_path(
        engine: Engine, settings: Settings, db_url: str, tmp_path: Path) -> None:
    """A completed job whose own WAV is gone and whose path now holds a WAV marked with another
    job's id (another queue sharing the outputs folder wrote it there, or an archived job's was
    put back): ``show``, the status page, ``wait`` and a handle say it is not the job's, and
    ``prune --delete-files`` (a real process) must not delete it as the job's: it did, that
    other job's only result. The row goes, the file stays, named in kept_not_its; a job's own
    WAV still goes with it."""
    foreign_job, own_job = _completed(engine, "foreign.wav"), _completed(engine, "own.wav")
    outputs = settings.outputs_dir
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / "foreign.wav").write_bytes(FOREIGN)
    mark(outputs / "foreign.wav", OTHER)
    (outputs / "own.wav").write_bytes(b"RIFF own")
    mark(outputs / "own.wav", own_job)
    shown = dgxqueue.get_job(foreign_job, database_url=db_url, settings=settings).output
    assert shown is not None and not shown.exists and shown.holder == OTHER  # not its, as show says
    config = write_config(tmp_path / "prune.toml", {"database": {"url": db_url},
                                                     "outputs": {"dir": str(outputs)},
                                                     "metrics": {"enabled": False}})
    env = {name: value for name, value in os.environ.items() if not name.startswith("DGXQUEUE_")}
    pruned = zygote.run([sys.executable, "-m", "dgxqueue", "--config", str(config), "prune", "--older-than",
                         "0s", "--delete-files", "--json"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**env, "PYTHONPATH": str(REPO)})
    assert pruned.returncode == 0, pruned.stderr
    result = json.loads(pruned.stdout)
    assert result["generations"] == 2 and result["files"] == 1, result
    assert result["kept_not_its"] == ["outputs/foreign.wav"], result
    assert (outputs / "foreign.wav").read_bytes() == FOREIGN and not (outputs / "own.wav").exists()

def test_web_files__a_held_jobs_wav_link_does_not_serve_the_other_file_at_its_path(engine: Engine,
                                                                                 settings: Settings) -> None:
    """The jobs list's "wav" link of a completed job whose result is held (and the same address
    without ``download``, HEAD, or asked for JSON) is refused with 404, as a completed job's
    missing file is, saying the result is held and what to do: it served the other job's WAV at
    the job's path as this job's. Also for a path through a linked folder (the list links the
    path as the job names it). The list itself still links every completed job (no file-system
    check per row), and a job's own WAV is still served."""
    outputs = settings.outputs_dir
    (outputs / "real").mkdir(parents=True)
    os.symlink("real", outputs / "linked")
    held_job, linked_job = _completed(engine, "held.wav"), _completed(engine, "linked/held.wav")
    own_job = _completed(engine, "own.wav")
    hold(outputs / "held.wav", held_job, OTHER)
    hold(outputs / "real" / "held.wav", linked_job, None)  # unmarked: still not this job's while it is held
    (outputs / "own.wav").write_bytes(b"RIFF own")
    mark(outputs / "own.wav", own_job)
    with client(settings) as browser:
        listed = {row["id"]: row["audio_url"] for row in browser.get("/api/jobs").json()["jobs"]}
        assert listed == {held_job: "/files/held.wav", linked_job: "/files/linked/held.wav",
                          own_job: "/files/own.wav"}, listed
        page = browser.get("/jobs").text
        links = dict(re.findall(r'<tr data-job="([^"]+)">.*?<a href="([^"]+)">wav</a>', page, re.DOTALL))
        assert links[held_job] == "/files/held.wav?download=1", links
        for job_id, url in ((held_job, links[held_job]), (held_job, "/files/held.wav"),
                            (linked_job, links[linked_job]), (linked_job, "/files/linked/held.wav")):
            refused = browser.get(url)
            assert refused.status_code == 404, (url, refused.status_code)
            assert FOREIGN not in refused.content and "content-disposition" not in refused.headers, url
            text = refused.text.replace("&#39;", "'")
            assert job_id in text and "held under its temporary name" in text, text
            assert "move that file away" in text, text
            asked = browser.get(url, headers={"Accept": "application/json"})
            assert asked.status_code == 404 and asked.json()["error"].startswith(f"job {job_id}'s WAV is not"), \
                asked.text
            assert "move that file away" in asked.json()["error"]
            assert browser.head(url).status_code == 404
            assert browser.get(url, headers={"Range": "bytes=0-3"}).status_code == 404
        assert (outputs / "held.wav").read_bytes() == FOREIGN  # left as it was
        own = browser.get(links[own_job])
        assert own.status_code == 200 and own.content == b"RIFF own", own.text


def test_cli_wait__a_held_result_is_not_printed_as_its_wav(engine: Engine, settings: Settings, db_url: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``wait`` on a completed job whose result is held says so, with ``show``'s words (the file
    at its path is another job's, where the result is held, what to do) instead of printing that
    path as its WAV; exit 0 as for any completed job. ``--json`` adds ``show``'s fields. A job
    whose own WAV is at its path is printed as before."""
    for name in list(os.environ):
        if name.startswith("DGXQUEUE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("DGXQUEUE_OUTPUTS_DIR", str(settings.outputs_dir))
    held_job, own_job = _completed(engine, "held.wav"), _completed(engine, "own.wav")
    outputs = settings.outputs_dir
    temp = hold(outputs / "held.wav", held_job, OTHER)
    (outputs / "own.wav").write_bytes(b"RIFF own")
    mark(outputs / "own.wav", own_job)
    capsys.readouterr()
    assert cli_main(["wait", held_job, own_job, "--quiet"]) == 0
    held_line, own_line = capsys.readouterr().out.splitlines()
    assert own_line == f"completed  {(outputs / 'own.wav').resolve()}"
    assert held_line.startswith(f"completed  {held_job}  the file at {(outputs / 'held.wav').resolve()} is not"), \
        held_line
    assert f"job {OTHER}'s WAV" in held_line and f"held under its temporary name {temp.resolve()}" in held_line
    assert "move that file away" in held_line
    assert cli_main(["wait", held_job, own_job, "--quiet", "--json"]) == 0
    held, own = json.loads(capsys.readouterr().out)
    assert (held["output_exists"], held["output_held_at"], held["output_holder"]) == (False, str(temp.resolve()),
                                                                                     OTHER), held
    assert (own["output_exists"], own["output_held_at"], own["output_holder"]) == (True, None, None), own


def test_web_api_job_handle__a_folder_that_cannot_be_read_is_not_called_deleted(engine: Engine, settings: Settings,
                                                                                db_url: str) -> None:
    """A completed job whose folder cannot be read (a link loop here, even for root; permissions
    or EIO for the user the page runs as): the job's API and page, and a handle's ``output``, say
    that whether its WAV is there cannot be told, naming the folder (relative, as file_path is) and
    the error, and offer no player. They said that the file was deleted or moved."""
    outputs = settings.outputs_dir
    outputs.mkdir(parents=True, exist_ok=True)
    os.symlink("loop", outputs / "loop")
    job_id = _completed(engine, "loop/song.wav")
    loop_error = os.strerror(errno.ELOOP)
    with client(settings) as browser:
        job = browser.get(f"/api/jobs/{job_id}").json()
        note = job["output_note"]
        assert "deleted or moved" not in note and "cannot be told" in note, note
        assert f"outputs/loop cannot be read ({loop_error})" in note and str(outputs) not in note, note
        assert job["audio_url"] is None and job["output_exists"] is False, job
        page = browser.get(f"/jobs/{job_id}").text
        assert '<audio id="player"' not in page and "cannot be told" in page.replace("&#39;", "'")
    handle = dgxqueue.get_job(job_id, database_url=db_url, settings=settings)
    assert handle.output is not None and handle.output.unreadable is not None
    assert handle.output.unreadable.cause() == f"{outputs.resolve() / 'loop'} cannot be read ({loop_error})"
