"""Adversarial review of the machine-fault handling: real daemons, real mounts, real signals.

Each test pins what should happen when the machine, not the job, is at fault (or the reverse)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dgxqueue.daemon import EXIT_MACHINE_FAULT
from dgxqueue.storage import get_engine, init_db
from tests.acceptance.test_daemon_processes import enqueue, job
from tests.acceptance.test_machine_faults import config, logged, mount, spawn
from tests.support.generators import read_executions
from tests.support.processes import REPO, stop, wait_until


def fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def running(tmp: Path, job_id: str, times: int = 1) -> bool:
    return read_executions(tmp / "executions.log")[job_id] >= times


def test_machine_fault__outputs_folder_replaced_by_a_file_does_not_fail_the_running_job(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """The outputs folder is moved away and a file left in its place while a job renders (a
    remount gone wrong): that is the machine's fault, so the job goes back pending with its
    attempt refunded, not failed for good with 'Not a directory'."""
    url = sqlite_db_url
    init_db(url)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    [job_id] = enqueue(url, ["block"], max_attempts=3)
    process = spawn(config(tmp_path, url), tmp_path / "w.log")
    try:
        wait_until(lambda: running(tmp_path, job_id), 60, "the job to render", alive=process)
        outputs.rename(tmp_path / "outputs.moved")
        outputs.write_bytes(b"")
        (tmp_path / "release").touch()
        wait_until(lambda: job(url, job_id)[0] != "processing", 60, "the job's outcome")
        status, attempts, error = job(url, job_id)
    finally:
        stop(process)
    assert (status, attempts) == ("pending", 0), (status, attempts, error)


def spawn_limited(cfg: Path, log: Path, nofile: int) -> subprocess.Popen[bytes]:
    """A daemon whose file-descriptor table holds ``nofile`` entries (RLIMIT_NOFILE)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dgxqueue", "--config", str(cfg), "worker"], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit)


def test_machine_fault__no_file_descriptors_left_does_not_fail_the_job(tmp_path: Path) -> None:
    """The daemon runs out of file descriptors (EMFILE: a leak, a low ulimit) when it writes a
    WAV: a resource of the machine, like ENOMEM, so the job goes back pending unspent rather than
    failing for good with 'Too many open files'."""
    # A probe daemon, blocked on its job, shows how many descriptors a daemon holds while it renders.
    probe = tmp_path / "probe"
    probe.mkdir()
    probe_url = f"sqlite:///{probe}/probe.db"
    init_db(probe_url)
    [probe_job] = enqueue(probe_url, ["block"])
    prober = spawn(config(probe, probe_url), probe / "w.log")
    try:
        wait_until(lambda: running(probe, probe_job), 60, "the probe's job", alive=prober)
        held = len(os.listdir(f"/proc/{prober.pid}/fd"))
    finally:
        prober.kill()
        prober.wait()
    # One descriptor more: the backend's log line and the folder open, the WAV's temporary file not.
    url = f"sqlite:///{tmp_path}/queue.db"
    init_db(url)
    [job_id] = enqueue(url, ["block"], max_attempts=3)
    (tmp_path / "release").touch()
    process = spawn_limited(config(tmp_path, url), tmp_path / "w.log", held + 1)
    try:
        wait_until(lambda: running(tmp_path, job_id), 60, "the job to render", alive=process)
        wait_until(lambda: job(url, job_id)[0] != "processing" or process.poll() is not None, 60,
                   "the job's outcome")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    status, attempts, error = job(url, job_id)
    assert "Too many open files" in (error or ""), (status, attempts, error)  # the fault was met
    assert (status, attempts) == ("pending", 0), (status, attempts, error)


def test_machine_fault__mark_left_by_a_stop_does_not_charge_the_next_fault(
        sqlite_db_url: str, tmp_path: Path, outputs_disk: Path) -> None:
    """A job given back after a full disk (marked), then given back again by a graceful stop
    before it could finish, did not fault on its last attempt: when the disk fills again on its
    next attempt it is given back unspent once more, not charged as 'two attempts in a row'."""
    url = sqlite_db_url
    init_db(url)
    [job_id] = enqueue(url, ["block"], max_attempts=3, duration_seconds=1.0)
    release = tmp_path / "release"
    started: list[subprocess.Popen[bytes]] = []
    try:
        first = spawn(config(tmp_path, url), tmp_path / "first.log")
        started.append(first)
        wait_until(lambda: running(tmp_path, job_id, 1), 60, "the first attempt", alive=first)
        fill(outputs_disk)
        release.touch()
        assert first.wait(60) == EXIT_MACHINE_FAULT, (tmp_path / "first.log").read_text()[-3000:]
        assert job(url, job_id)[:2] == ("pending", 0)
        release.unlink()
        (outputs_disk / "filler").unlink()

        second = spawn(config(tmp_path, url, grace_seconds=0.0), tmp_path / "second.log")
        started.append(second)
        wait_until(lambda: running(tmp_path, job_id, 2), 60, "the second attempt", alive=second)
        wait_until(logged(tmp_path / "second.log", "daemon ready"), 60, "signals handled", alive=second)
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, (tmp_path / "second.log").read_text()[-3000:]
        assert job(url, job_id)[:2] == ("pending", 0)

        third = spawn(config(tmp_path, url), tmp_path / "third.log")
        started.append(third)
        wait_until(lambda: running(tmp_path, job_id, 3), 60, "the third attempt", alive=third)
        fill(outputs_disk)
        release.touch()
        assert third.wait(60) == EXIT_MACHINE_FAULT, (tmp_path / "third.log").read_text()[-3000:]
        status, attempts, error = job(url, job_id)
        assert (status, attempts) == ("pending", 0), (status, attempts, error)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_machine_fault__sqlite_disk_full_does_not_fail_a_rendered_job(tmp_path: Path) -> None:
    """The disk of the SQLite database fills while a job renders (on its only attempt): the
    machine's fault. Once space returns the job is completed (or back in the queue unspent); it
    is not failed as 'lease expired on the last attempt' because its outcome could not be written."""
    db_disk = tmp_path / "db"
    mount(db_disk, "size=4m")
    try:
        url = f"sqlite:///{db_disk}/queue.db"
        init_db(url)
        [job_id] = enqueue(url, ["block"], max_attempts=1)
        cfg = config(tmp_path, url, lease_seconds=2.0)
        first = spawn(cfg, tmp_path / "first.log")
        wait_until(lambda: running(tmp_path, job_id), 60, "the job to render", alive=first)
        fill(db_disk)
        (tmp_path / "release").touch()
        wait_until(logged(tmp_path / "first.log", "database or disk is full"), 60, "the write to fail")
        (db_disk / "filler").unlink()
        wait_until(lambda: first.poll() is not None or job(url, job_id)[0] != "processing", 60,
                   "the outcome written, or the daemon gone")
        if first.poll() is None:  # still up: it wrote the outcome once there was space
            stop(first)
        else:  # exited: the next daemon (systemd restarts it) rescues the job after its lease
            second = spawn(cfg, tmp_path / "second.log")
            try:
                wait_until(lambda: job(url, job_id)[0] not in ("processing",), 60, "the rescue", alive=second)
                wait_until(lambda: job(url, job_id)[0] in ("completed", "failed"), 60, "the end", alive=second)
            finally:
                stop(second)
        status, attempts, error = job(url, job_id)
    finally:
        subprocess.run(["umount", "-l", str(db_disk)], check=True)
    assert status in ("completed", "pending"), (status, attempts, error)


def test_outputs_check__unsearchable_parent_pauses_claims_instead_of_exiting(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """The daemon (which runs as an unprivileged user under systemd) cannot search a folder above
    its outputs folder: the outputs check reports 'not_writable' and pauses claims, as documented,
    rather than raising PermissionError out of the loop and exiting."""
    url = sqlite_db_url
    init_db(url)
    enqueue(url, ["fine"])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    os.chown(locked, 65534, 65534)  # nobody's: without CAP_DAC_* root cannot search it either
    cfg = config(tmp_path, url)
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "outputs"), str(locked / "outputs")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    caps = "-dac_override,-dac_read_search"
    log = tmp_path / "w.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-m", "dgxqueue",
             "--config", str(cfg), "worker"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(logged(log, "not claiming"), 60, "the pause", alive=process)
        assert '"reason": "not_writable"' in log.read_text()
    finally:
        code = stop(process)
    assert code == 0, log.read_text()[-2000:]


def cluster_pids(data: Path) -> list[int]:
    """The postmaster of a private cluster and its children (the backends)."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


@pytest.mark.slow
def test_stop__sigterm_while_postgres_hangs_is_bounded(tmp_path: Path) -> None:
    """SIGTERM while the PostgreSQL server hangs (frozen, or a network path that drops packets
    without a reset) and a job is held: the daemon exits within its grace period plus the
    shutdown's database deadline and one connect timeout, as the unit's TimeoutStopSec assumes,
    rather than waiting forever on a query the server never answers; its last line names the
    storage call the loop waits in, read from the loop's stack (it used to assume a database call)."""
    from dgxqueue.daemon.daemon import SHUTDOWN_DB_SECONDS
    from tests.support.pgcluster import private_cluster

    with private_cluster() as cluster:
        url = cluster.url
        init_db(url)
        [job_id] = enqueue(url, ["block"])
        process = spawn(config(tmp_path, url, grace_seconds=1.0), tmp_path / "w.log")
        frozen: list[int] = []
        try:
            wait_until(lambda: running(tmp_path, job_id), 60, "the job", alive=process)
            wait_until(logged(tmp_path / "w.log", "daemon ready"), 60, "signals handled", alive=process)
            frozen = cluster_pids(cluster.data)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            process.send_signal(signal.SIGTERM)
            bound = 1.0 + SHUTDOWN_DB_SECONDS + 10.0 + 10.0  # grace, deadline, connect timeout, slack
            try:
                code: int | None = process.wait(bound)
            except subprocess.TimeoutExpired:
                code = None
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            if process.poll() is None:
                process.kill()
                process.wait()
        get_engine(url).dispose()
    assert code == 0, f"still running {bound:g} s after SIGTERM: {(tmp_path / 'w.log').read_text()[-1500:]}"
    # The hard stop names where the loop waits, read from its stack: a database call of dgxqueue's storage here.
    last = next(line for line in (tmp_path / "w.log").read_text().splitlines() if "stop overran" in line)
    assert "the main loop did not return from " in last and ", called from dgxqueue/storage/" in last, last


def test_machine_fault__one_jobs_read_only_subfolder_fails_that_job_alone(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """One job's file_path names a subfolder that is read-only (a read-only mount inside the
    outputs folder) while the outputs folder itself takes files, and the other jobs of the same
    batch are written: the job's own path is at fault, so that job fails alone and the daemon
    carries on (exit 0 after the burst), instead of exiting 75 at every attempt of it."""
    url = sqlite_db_url
    init_db(url)
    outputs = tmp_path / "outputs"
    locked = outputs / "locked"
    mount(locked, "size=1m,ro")
    try:
        enqueue(url, ["fine"] * 3, max_attempts=2)
        [bad] = enqueue(url, ["fine"], max_attempts=2, file_path="outputs/locked/x.wav")
        enqueue(url, ["fine"] * 3, max_attempts=2)
        exits = []
        for n in range(5):  # as systemd restarts it
            process = spawn(config(tmp_path, url), tmp_path / f"w{n}.log", "--burst")
            try:
                exits.append(process.wait(60))
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            if exits[-1] != EXIT_MACHINE_FAULT:
                break
        status, attempts, error = job(url, bad)
    finally:
        subprocess.run(["umount", "-l", str(locked)], check=True)
    assert status == "failed", (status, attempts, error)
    assert exits == [0], exits


def test_machine_fault__a_disk_that_stays_short_never_fails_the_jobs(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """The outputs disk stays short of space (another program holds it: above outputs.min_free_mb,
    below what one WAV needs, as with an exhausted quota) across restarts: the machine's fault, so
    no job fails however often the daemon restarts; every job is still pending, unspent."""
    url = sqlite_db_url
    init_db(url)
    outputs = tmp_path / "outputs"
    mount(outputs, "size=8m")
    try:
        (outputs / "filler").write_bytes(b"\0" * (8 * 1024 - 1536) * 1024)  # 1.5 MiB left
        ids = enqueue(url, ["fine"] * 3, max_attempts=2, duration_seconds=62.0, sample_rate=16000)  # 1.9 MiB
        exits = []
        for n in range(5):  # as systemd restarts it
            process = spawn(config(tmp_path, url, min_free_mb=1), tmp_path / f"w{n}.log", "--burst")
            try:
                exits.append(process.wait(60))
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            if exits[-1] != EXIT_MACHINE_FAULT:
                break
        states = [tuple(job(url, i)) for i in ids]
    finally:
        subprocess.run(["umount", "-l", str(outputs)], check=True)
    assert {(s, a) for s, a, _ in states} == {("pending", 0)}, (exits, states)
