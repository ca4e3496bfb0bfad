"""``prune``, ``archive``, ``show`` and ``wait`` run by an operator who cannot list a folder of the
outputs (the daemons' user owns it): real processes without root's permission overrides (setpriv
drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so the kernel checks the folder's mode as for any
user), real folders owned by nobody, real SQLite and PostgreSQL. Whether a completed job's result
is held there cannot be told, so its row stays and nothing calls its WAV deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dgxqueue.daemon.staging import UNKNOWN_JOB_GRACE
from dgxqueue.storage import complete_generation, create_generations, session_scope
from dgxqueue.storage.models import G
from tests.acceptance.test_daemon_processes import job
from tests.acceptance.test_occupied_paths import burst
from tests.support import zygote
from tests.support.held import FOREIGN, hold, mark
from tests.support.processes import REPO, worker_config

OTHER = "5d1e2f3a-0000-4c5e-9f43-2a1c8e7d9b11"  # an archived job, whose WAV is put at another's path
NOBODY = 65534
CAPS = "-dac_override,-dac_read_search"
DENIED = os.strerror(13)  # EACCES, as the reason words it


@pytest.fixture
def outputs(tmp_path: Path) -> Iterator[Path]:
    """The outputs folder; its folders that :func:`lock` gives to nobody are given back after."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must run the unreadable-folder tests")
        pytest.skip("needs root: a folder given to nobody, and setpriv to drop the permission overrides")
    folder = tmp_path / "outputs"
    folder.mkdir()
    yield folder
    for sub in folder.iterdir():  # so that pytest can remove them whatever they were left as
        if sub.is_dir() and not sub.is_symlink():
            os.chown(sub, 0, 0)
            sub.chmod(0o755)


def lock(folder: Path, mode: int) -> Path:
    """Give ``folder`` to nobody with ``mode`` (0700: not even searched by others; 0711: searched,
    not listed), as a daemon running as its own user leaves its folders to the operator."""
    os.chown(folder, NOBODY, NOBODY)
    folder.chmod(mode)
    return folder.resolve()


def as_operator(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dgxqueue`` as root without the overrides: a folder's mode binds it as any other user."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    return subprocess.run(["setpriv", f"--bounding-set={CAPS}", f"--inh-caps={CAPS}", sys.executable, "-m",
                           "dgxqueue", "--config", str(config), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


def completed(engine: Engine, file_path: str) -> str:
    """A job completed by attempt 1 of worker box-1 (as :func:`tests.support.held.hold` writes its
    temporary), at ``file_path``."""
    with session_scope(engine) as session:
        [job_id] = create_generations(session, [{"prompt": "unreadable", "model_name": "scripted",
                                                 "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1,
                                                 "file_path": file_path}])
        complete_generation(session, job_id, 0.5, 100)
        session.execute(sa.update(G).where(G.c.id == job_id).values(attempts=1, worker_id="box-1"))
    return job_id


def own_wav(engine: Engine, outputs: Path, name: str) -> str:
    """A completed job whose own WAV (its mark on it) is at ``outputs/<name>``."""
    job_id = completed(engine, f"outputs/{name}")
    (outputs / name).parent.mkdir(exist_ok=True)
    (outputs / name).write_bytes(b"RIFF")
    mark(outputs / name, job_id)
    return job_id


def test_prune__a_folder_it_cannot_list_keeps_its_completed_jobs(engine: Engine, db_url: str, tmp_path: Path,
                                                                 outputs: Path) -> None:
    """``prune`` run by a user who cannot list ``outputs/locked``: the completed jobs there stay,
    named with the folder and the error (``--json``: ``kept_unreadable``), exit 65, the rest pruned
    (a folder that does not exist holds nothing: its job goes). It pruned them, the held one too,
    and a day later a daemon's sweep deleted that job's result as a temporary no row names: its
    only result lost. Here the sweep keeps it, and a prune that can list the folder prunes the
    job whose WAV is in place and keeps the held one, as held."""
    held = completed(engine, "outputs/locked/held.wav")
    temp = hold(outputs / "locked" / "held.wav", held, OTHER)
    placed = own_wav(engine, outputs, "locked/placed.wav")
    free = own_wav(engine, outputs, "free.wav")
    absent = completed(engine, "outputs/gone/song.wav")
    locked = lock(outputs / "locked", 0o700)
    config = worker_config(tmp_path, db_url)

    listed = as_operator(config, "prune", "--older-than", "0s", "--dry-run")
    assert listed.returncode == 65, listed.stdout + listed.stderr
    assert f"kept generation {held} (outputs/locked/held.wav): whether its result waits" in listed.stdout, listed.stdout
    assert f"{locked} cannot be read ({DENIED})" in listed.stdout and placed in listed.stdout, listed.stdout
    pruned = as_operator(config, "prune", "--older-than", "0s", "--json")
    assert pruned.returncode == 65, pruned.stdout + pruned.stderr
    result = json.loads(pruned.stdout)
    assert result["generations"] == 2 and result["kept_held"] == {}, result
    assert sorted(result["kept_unreadable"]) == sorted([held, placed]), result
    assert f"{locked} cannot be read ({DENIED})" in result["kept_unreadable"][held], result
    assert "2 generation(s) left here" in pruned.stderr and DENIED in pruned.stderr, pruned.stderr
    assert job(db_url, held)[0] == "completed" and job(db_url, placed)[0] == "completed"
    for gone in (free, absent):
        with pytest.raises(sa.exc.NoResultFound):
            job(db_url, gone)

    day_old = time.time() - UNKNOWN_JOB_GRACE - 3600
    os.utime(temp, (day_old, day_old))
    burst(config, tmp_path / "sweep.log")  # the daemon can list the folder: its sweep keeps a temporary a row names
    assert temp.exists() and (outputs / "locked" / "held.wav").read_bytes() == FOREIGN
    again = zygote.run([sys.executable, "-m", "dgxqueue", "--config", str(config), "prune", "--older-than", "0s",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 65, again.stderr
    result = json.loads(again.stdout)
    assert result["generations"] == 1 and list(result["kept_held"]) == [held], result
    assert result["kept_unreadable"] == {}, result


def test_archive__a_folder_it_cannot_list_leaves_its_completed_jobs(engine: Engine, db_url: str, tmp_path: Path,
                                                                    outputs: Path) -> None:
    """``archive`` run by a user who cannot list ``outputs/locked`` leaves the completed job there,
    named with the folder and the error, exit 65, and archives the rest. It archived it, so its
    row was gone from here and the sweep deleted its held result a day later. A job whose own WAV
    (its mark read) is at its path in a folder searched but not listed is archived: published."""
    held = completed(engine, "outputs/locked/held.wav")
    hold(outputs / "locked" / "held.wav", held, OTHER)
    free = own_wav(engine, outputs, "free.wav")
    placed = own_wav(engine, outputs, "peek/placed.wav")
    locked = lock(outputs / "locked", 0o700)
    lock(outputs / "peek", 0o711)
    config = worker_config(tmp_path, db_url)
    archived = as_operator(config, "archive", "--older-than", "0s", "--to", f"sqlite:///{tmp_path / 'archive.db'}")
    assert archived.returncode == 65, archived.stdout + archived.stderr
    assert f"1 generation(s) left here: {held}: whether its result waits" in archived.stderr, archived.stderr
    assert f"{locked} cannot be read ({DENIED})" in archived.stderr, archived.stderr
    assert job(db_url, held)[0] == "completed"
    for gone in (free, placed):
        with pytest.raises(sa.exc.NoResultFound):  # archived: no row here any more
            job(db_url, gone)


def test_show_wait__a_folder_it_cannot_list_is_not_called_deleted_or_moved(engine: Engine, db_url: str,
                                                                          tmp_path: Path, outputs: Path) -> None:
    """``show`` and ``wait`` by a user who cannot list the job's folder say that whether its WAV is
    there cannot be told, naming the folder and the error (``--json``: ``output_unreadable``),
    never that it was deleted or moved, as they did. Where the folder can be searched but not
    listed, another job's WAV at the path is named as such, and a job's own WAV is still seen."""
    hidden = completed(engine, "outputs/locked/held.wav")
    hold(outputs / "locked" / "held.wav", hidden, OTHER)
    peeked = completed(engine, "outputs/peek/held.wav")
    hold(outputs / "peek" / "held.wav", peeked, OTHER)
    placed = own_wav(engine, outputs, "peek/placed.wav")
    locked, peek = lock(outputs / "locked", 0o700), lock(outputs / "peek", 0o711)
    config = worker_config(tmp_path, db_url)

    def exists_line(job_id: str) -> str:
        shown = as_operator(config, "show", job_id)
        assert shown.returncode == 0, shown.stderr
        [line] = [line for line in shown.stdout.splitlines() if line.startswith("output_exists")]
        return line

    line = exists_line(hidden)
    assert f" no: whether this job's WAV is at {locked / 'held.wav'}, or its result waits" in line, line
    assert f"cannot be told: {locked} cannot be read ({DENIED})" in line and "deleted or moved" not in line, line
    data = json.loads(as_operator(config, "show", hidden, "--json").stdout)
    assert data["output_exists"] is False and data["output_unreadable"] == f"{locked} cannot be read ({DENIED})", data

    line = exists_line(peeked)
    assert f" no: the file at {peek / 'held.wav'} is not this job's (it is job {OTHER}'s WAV)" in line, line
    assert f"cannot be told: {peek} cannot be read ({DENIED})" in line and "deleted or moved" not in line, line
    assert exists_line(placed).endswith(" yes")

    waited = as_operator(config, "wait", peeked)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.startswith(f"completed  {peeked}  the file at {peek / 'held.wav'} is not this job's"), \
        waited.stdout
    assert "deleted or moved" not in waited.stdout and f"{peek} cannot be read ({DENIED})" in waited.stdout


def test_prune_show__a_wav_whose_mark_cannot_be_read_is_neither_its_nor_deleted(engine: Engine, db_url: str,
                                                                               tmp_path: Path, outputs: Path) -> None:
    """A user who can list and write a folder but not read the WAV at a completed job's path (the
    daemons' user owns it, mode 0600) cannot read its mark, so whose WAV it is cannot be told:
    ``show`` says so, naming the file and the error, and ``prune --delete-files`` keeps it, named
    (``--json``: ``kept_unreadable_files``), while pruning the row. Both took a mark they could not
    read for no mark at all: ``show`` called another job's WAV this job's, and prune deleted it.
    In a folder listed but not searched (0744), prune stopped at the first such file with exit 74
    after deleting the rows, its report lost; now it keeps the file and reports, exit 0."""
    theirs = completed(engine, "outputs/open/theirs.wav")
    (outputs / "open").mkdir()
    foreign = outputs / "open" / "theirs.wav"
    foreign.write_bytes(FOREIGN)
    mark(foreign, OTHER)  # an archived job's WAV, put at this job's path since
    os.chown(foreign, NOBODY, NOBODY)
    foreign.chmod(0o600)
    unsearched = own_wav(engine, outputs, "listed/own.wav")
    lock(outputs / "listed", 0o744)
    config = worker_config(tmp_path, db_url)

    data = json.loads(as_operator(config, "show", theirs, "--json").stdout)
    assert data["output_exists"] is False, data
    assert data["output_unreadable"] == f"{foreign.resolve()} cannot be read ({DENIED})", data

    pruned = as_operator(config, "prune", "--older-than", "0s", "--delete-files", "--json")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    result = json.loads(pruned.stdout)
    assert result["generations"] == 2 and result["files"] == 0 and result["kept_not_its"] == [], result
    assert sorted(result["kept_unreadable_files"]) == ["outputs/listed/own.wav", "outputs/open/theirs.wav"], result
    assert DENIED in result["kept_unreadable_files"]["outputs/open/theirs.wav"], result
    assert foreign.read_bytes() == FOREIGN
    os.chown(outputs / "listed", 0, 0)  # to look at it here
    assert (outputs / "listed" / "own.wav").read_bytes() == b"RIFF"
    for gone in (theirs, unsearched):
        with pytest.raises(sa.exc.NoResultFound):
            job(db_url, gone)


def test_prune_archive__a_temporary_beside_a_wav_whose_mark_cannot_be_read_is_not_called_held(
        engine: Engine, db_url: str, tmp_path: Path, outputs: Path) -> None:
    """A completed job's temporary lies beside its path in a folder the operator lists, and the
    WAV there is one it cannot read (0600, the daemons' user's): whether that WAV is the job's
    own cannot be told, so ``prune`` and ``archive`` keep the row as one they cannot tell about,
    naming the file and the error, not as held. They called it held (the file there not its),
    telling the operator to move that file away, which may be the job's own WAV."""
    unsure = completed(engine, "outputs/open/unsure.wav")
    hold(outputs / "open" / "unsure.wav", unsure, unsure)  # an older attempt's temporary beside its own WAV
    wav = outputs / "open" / "unsure.wav"
    os.chown(wav, NOBODY, NOBODY)
    wav.chmod(0o600)
    config = worker_config(tmp_path, db_url)
    cause = f"{wav.resolve()} cannot be read ({DENIED})"

    pruned = as_operator(config, "prune", "--older-than", "0s", "--dry-run", "--json")
    assert pruned.returncode == 65, pruned.stdout + pruned.stderr
    result = json.loads(pruned.stdout)
    assert result["kept_held"] == {} and list(result["kept_unreadable"]) == [unsure], result
    assert cause in result["kept_unreadable"][unsure], result
    archived = as_operator(config, "archive", "--older-than", "0s", "--to", f"sqlite:///{tmp_path / 'archive.db'}")
    assert archived.returncode == 65, archived.stdout + archived.stderr
    assert f"left here: {unsure}: whether its result waits" in archived.stderr and cause in archived.stderr, \
        archived.stderr
    assert job(db_url, unsure)[0] == "completed"


def test_prune__a_file_it_cannot_delete_is_named_and_the_others_go(engine: Engine, db_url: str, tmp_path: Path,
                                                                   outputs: Path) -> None:
    """``prune --delete-files`` by a user who can enter but not write ``outputs/peek`` (0711, the
    daemons'): its job's own WAV there cannot be deleted. The rows are pruned (committed before
    any file goes), the other files still go, and every file left is named (``--json``:
    ``not_deleted``, path to error) with exit 74. It stopped at the first such file with exit 74
    and no report, leaving the files after it undeleted and unnamed."""
    stuck = own_wav(engine, outputs, "peek/stuck.wav")
    after = [own_wav(engine, outputs, f"z{n}.wav") for n in range(3)]  # listed after the stuck one
    lock(outputs / "peek", 0o711)
    config = worker_config(tmp_path, db_url)

    result = as_operator(config, "prune", "--older-than", "0s", "--delete-files", "--json")

    assert result.returncode == 74, result.stderr
    report = json.loads(result.stdout)
    assert report["generations"] == 1 + len(after)
    assert report["files"] == len(after)
    assert report["not_deleted"] == {"outputs/peek/stuck.wav": DENIED}
    assert "could not be deleted" in result.stderr and "outputs/peek/stuck.wav" in result.stderr
    assert (outputs / "peek" / "stuck.wav").is_file()
    assert not any((outputs / f"z{n}.wav").exists() for n in range(3))
    with session_scope(engine) as session:
        left = session.execute(sa.select(sa.func.count()).select_from(G).where(G.c.id.in_([stuck, *after])))
        assert left.scalar() == 0
