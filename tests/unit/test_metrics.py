"""DaemonMetrics driven through its hooks against a real database, and its HTTP server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine

from dgxqueue.hooks import DaemonInfo
from dgxqueue.metrics import DaemonMetrics, start_metrics_server
from dgxqueue.storage import (
    GenerationStatus,
    admin,
    complete_generation,
    create_generation,
    init_db,
    session_scope,
)
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import G
from tests.support import queue_calls

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sqlite_engine(sqlite_db_url: str) -> Engine:
    return init_db(sqlite_db_url)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def job(model: str = "synth", created: datetime = T0, claimed: datetime | None = None) -> ClaimedJob:
    return ClaimedJob("id-1", "a prompt", model, 10.0, 32000, 1, "outputs/x.wav", None, 1, 3,
                           created, claimed or created + timedelta(seconds=3))


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def start(metrics: DaemonMetrics, models: tuple[str, ...] = ("synth",)) -> None:
    metrics.on_start(DaemonInfo("w-1", "synth", models, "sqlite", "0.1.0"))


def test_daemon_metrics__completed_job_moves_counter_and_histogram_by_one(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """One completed job adds exactly 1 to its counter, histogram count and in-flight round trip;
    its queue wait is its claim's time less its creation's (both the database's), not the
    daemon's clock (here an hour off) less its creation."""
    metrics = DaemonMetrics(registry, sqlite_engine)
    start(metrics)
    assert value(registry, "dgxqueue_jobs_finished_total", outcome="completed", model="synth") == 0
    metrics.on_claimed([job(claimed=T0 + timedelta(seconds=7))], T0 + timedelta(hours=1))
    assert value(registry, "dgxqueue_jobs_in_flight") == 1
    metrics.on_batch(1)
    metrics.on_job_finished(job(), "completed", generation_seconds=2.5, audio_seconds=10.0, error=None)
    assert value(registry, "dgxqueue_jobs_finished_total", outcome="completed", model="synth") == 1
    assert value(registry, "dgxqueue_generation_duration_seconds_count", model="synth") == 1
    assert value(registry, "dgxqueue_generation_duration_seconds_sum", model="synth") == 2.5
    assert value(registry, "dgxqueue_generation_duration_seconds_bucket", model="synth", le="2.0") == 0
    assert value(registry, "dgxqueue_generation_duration_seconds_bucket", model="synth", le="5.0") == 1
    assert value(registry, "dgxqueue_queue_wait_seconds_count", model="synth") == 1
    assert value(registry, "dgxqueue_queue_wait_seconds_sum", model="synth") == 7
    assert value(registry, "dgxqueue_audio_seconds_total", model="synth") == 10
    assert value(registry, "dgxqueue_batch_size_count") == 1
    assert value(registry, "dgxqueue_jobs_in_flight") == 0


def test_daemon_metrics__each_outcome_counts_under_its_own_label(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """Failed, retried, released and fenced attempts count apart; only completed ones add audio."""
    metrics = DaemonMetrics(registry, sqlite_engine)
    start(metrics)
    outcomes = ["failed", "retried", "retried", "released", "fenced"]
    metrics.on_claimed([job()] * len(outcomes), T0)
    for outcome in outcomes:
        metrics.on_job_finished(job(), outcome, generation_seconds=1.0, audio_seconds=10.0, error="x")
    for outcome, n in {"completed": 0, "failed": 1, "retried": 2, "released": 1, "fenced": 1}.items():
        assert value(registry, "dgxqueue_jobs_finished_total", outcome=outcome, model="synth") == n
    assert value(registry, "dgxqueue_audio_seconds_total", model="synth") == 0
    assert value(registry, "dgxqueue_jobs_in_flight") == 0


def test_daemon_metrics__unannounced_model_gets_its_series(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """A job of a model not named at start still counts, with every outcome of it at zero."""
    metrics = DaemonMetrics(registry, sqlite_engine)
    metrics.on_job_finished(job("other"), "completed", generation_seconds=None, audio_seconds=None,
                            error=None)
    assert value(registry, "dgxqueue_jobs_finished_total", outcome="completed", model="other") == 1
    assert value(registry, "dgxqueue_jobs_finished_total", outcome="failed", model="other") == 0
    assert value(registry, "dgxqueue_generation_duration_seconds_count", model="other") == 0


def test_daemon_metrics__rescues_count_by_result(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """Rescued jobs count as requeued or failed, each series present from zero."""
    metrics = DaemonMetrics(registry, sqlite_engine)
    assert value(registry, "dgxqueue_jobs_rescued_total", result="requeued") == 0
    metrics.on_rescued(["a", "b"], ["c"])
    metrics.on_rescued([], [])
    assert value(registry, "dgxqueue_jobs_rescued_total", result="requeued") == 2
    assert value(registry, "dgxqueue_jobs_rescued_total", result="failed") == 1


def test_daemon_metrics__build_info_model_load_and_last_loop(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """build_info is 1 with its labels; ready is 0 while the generator loads, then 1; the loop gauge
    holds the wall time of the last round, and of the end of loading."""
    wall = Clock(1_700_000_000.0)
    metrics = DaemonMetrics(registry, sqlite_engine, wall_clock=wall)
    start(metrics)
    assert value(registry, "dgxqueue_build_info", version="0.1.0", generator="synth", engine="sqlite",
                 worker_id="w-1") == 1
    assert value(registry, "dgxqueue_ready") == 0
    wall.now += 10
    metrics.on_model_loaded(4.25)
    assert value(registry, "dgxqueue_model_load_seconds") == 4.25 and value(registry, "dgxqueue_ready") == 1
    assert value(registry, "dgxqueue_last_loop_timestamp_seconds") == 1_700_000_010.0
    wall.now += 20
    metrics.on_loop(123.0)
    assert value(registry, "dgxqueue_last_loop_timestamp_seconds") == 1_700_000_030.0


def _fill(engine: Engine) -> None:
    """Rows in all four states over two models and two priorities."""
    with session_scope(engine) as session:
        for model, priority in [("a", 0), ("a", 5), ("a", 5), ("b", 1), ("b", 1), ("c", 0), ("c", 0)]:
            create_generation(session, "p", model_name=model, priority=priority)
    queue_calls.claim(engine, worker_id="w", models=["c"], limit=1, lease=timedelta(minutes=5))
    [done] = queue_calls.claim(engine, worker_id="w", models=["c"], limit=1, lease=timedelta(minutes=5))
    with session_scope(engine) as session:
        complete_generation(session, done.id, 1.0, 100)
        failed = create_generation(session, "p", model_name="b")
        admin.set_outcome(session, failed.id, GenerationStatus.FAILED, {"error_message": "x"})


def test_queue_depth__equals_rows_in_database(engine: Engine, registry: CollectorRegistry) -> None:
    """dgxqueue_queue_jobs and _pending_jobs equal a GROUP BY over the table, on each engine."""
    DaemonMetrics(registry, engine)
    _fill(engine)
    with engine.connect() as conn:
        by_status = {str(k): int(v) for k, v in conn.execute(
            sa.text("SELECT status, count(*) FROM generations GROUP BY status"))}
        by_model = {str(k): int(v) for k, v in conn.execute(sa.text(
            "SELECT model_name, count(*) FROM generations WHERE status = 'pending' GROUP BY model_name"))}
    assert by_status == {"pending": 5, "processing": 1, "completed": 1, "failed": 1}
    for status in ("pending", "processing", "completed", "failed"):
        assert value(registry, "dgxqueue_queue_jobs", status=status) == by_status[status]
    for model, n in by_model.items():
        assert value(registry, "dgxqueue_queue_pending_jobs", model=model) == n
    assert value(registry, "dgxqueue_queue_pending_jobs", model="c") is None
    assert value(registry, "dgxqueue_queue_depth_scrape_errors_total") == 0


def test_queue_depth__served_model_with_nothing_pending_reads_zero(
        sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """A model the daemon serves shows 0 pending rather than no series, so panels and alerts see it."""
    start(DaemonMetrics(registry, sqlite_engine), models=("synth", "musicgen-small"))
    assert value(registry, "dgxqueue_queue_pending_jobs", model="musicgen-small") == 0
    assert value(registry, "dgxqueue_queue_pending_jobs", model="elsewhere") is None


def test_queue_depth__oldest_pending_age_from_created_at(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """The oldest pending age is the database's now minus the oldest pending row's created_at,
    whatever this host's clock says (here: T0, long past); 0 when none."""
    wall = Clock(T0.timestamp())
    DaemonMetrics(registry, sqlite_engine, depth_cache_seconds=0, wall_clock=wall)
    assert value(registry, "dgxqueue_queue_oldest_pending_age_seconds") == 0
    with session_scope(sqlite_engine) as session:
        low = create_generation(session, "p", model_name="a", priority=0)
        create_generation(session, "p", model_name="a", priority=9)
        ago = profile_of(sqlite_engine.dialect).later(sa.literal(-90.0, sa.Float))
        session.execute(sa.update(G).where(G.c.id == low.id).values(created_at=ago))
    age = value(registry, "dgxqueue_queue_oldest_pending_age_seconds")
    assert age is not None and 90 <= age < 95, age


def test_queue_depth__cache_holds_for_depth_cache_seconds(
    sqlite_engine: Engine, registry: CollectorRegistry
) -> None:
    """A scrape inside depth_cache_seconds reuses the last read; one after it reads again."""
    clock = Clock()
    DaemonMetrics(registry, sqlite_engine, depth_cache_seconds=5, clock=clock)
    assert value(registry, "dgxqueue_queue_jobs", status="pending") == 0
    with session_scope(sqlite_engine) as session:
        create_generation(session, "p", model_name="a")
    clock.now += 4.9
    assert value(registry, "dgxqueue_queue_jobs", status="pending") == 0
    clock.now += 0.1
    assert value(registry, "dgxqueue_queue_jobs", status="pending") == 1


def test_queue_depth__database_error_drops_depth_and_counts_it(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    """A failing depth read leaves the rest of the scrape whole and counts the error."""
    broken = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    metrics = DaemonMetrics(registry, broken, depth_cache_seconds=0)
    metrics.on_rescued(["a"], [])
    text = generate_latest(registry).decode()
    assert "dgxqueue_jobs_rescued_total" in text
    assert 'dgxqueue_queue_jobs{status="pending"}' not in text
    assert value(registry, "dgxqueue_queue_depth_scrape_errors_total") == 2  # two scrapes so far


def test_queue_depth__a_database_that_never_answers_costs_the_depth_not_the_scrape(
    registry: CollectorRegistry,
) -> None:
    """A server that accepts the connection and never answers (hung, or behind a dead proxy): the
    scrape answers after the depth wait (2 s), without the depth series and with the error counted,
    instead of hanging until Prometheus gives up and reports the daemon down."""
    listener = socket.create_server(("127.0.0.1", 0))  # the kernel completes the handshake; nobody answers
    hung = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{listener.getsockname()[1]}/test",
                            connect_args={"connect_timeout": 60})
    try:
        DaemonMetrics(registry, hung, depth_cache_seconds=0)
        scraped = threading.Thread(target=lambda: texts.append(generate_latest(registry).decode()))
        texts: list[str] = []
        scraped.start()
        scraped.join(20)
        assert not scraped.is_alive(), "the scrape waited for the database"
        assert "dgxqueue_build_info" in texts[0] and 'dgxqueue_queue_jobs{status="pending"}' not in texts[0]
        assert "dgxqueue_queue_depth_scrape_errors_total 1.0" in texts[0]
    finally:
        listener.close()
        hung.dispose()


@pytest.fixture
def served(sqlite_engine: Engine, registry: CollectorRegistry) -> Iterator[tuple[str, list[bool]]]:
    healthy = [True]
    metrics = DaemonMetrics(registry, sqlite_engine)
    start(metrics)
    metrics.on_job_finished(job(), "completed", generation_seconds=1.0, audio_seconds=5.0, error=None)
    server = start_metrics_server("127.0.0.1", 0, registry, is_healthy=lambda: healthy[0])
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    yield server.url, healthy
    server.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_server__serves_metrics_and_healthz(served: tuple[str, list[bool]]) -> None:
    """/metrics has the daemon's series; /healthz is 200 ok, then 503 once the loop stalls."""
    url, healthy = served
    code, text = get(url + "/metrics")
    assert code == 200
    assert 'dgxqueue_jobs_finished_total{model="synth",outcome="completed"} 1.0' in text
    assert 'dgxqueue_queue_jobs{status="pending"} 0.0' in text
    assert get(url + "/healthz") == (200, "ok\n")
    healthy[0] = False
    assert get(url + "/healthz")[0] == 503
    assert get(url + "/nothing")[0] == 404


def test_metrics_server__serves_no_created_series(served: tuple[str, list[bool]]) -> None:
    """Neither exposition format carries a `_created` series: they double every counter and histogram."""
    url = served[0] + "/metrics"
    plain = get(url)[1]
    request = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        openmetrics = response.read().decode()
    for text in (plain, openmetrics):
        assert "dgxqueue_jobs_finished" in text
        assert [line for line in text.splitlines() if "_created" in line] == []


def test_daemon_metrics__exports_the_process_series(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """The daemon's registry carries the standard process_* series: memory, CPU time, open files."""
    DaemonMetrics(registry, sqlite_engine)
    assert (value(registry, "process_resident_memory_bytes") or 0) > 0
    assert (value(registry, "process_open_fds") or 0) > 0
    assert value(registry, "process_cpu_seconds_total") is not None
    assert value(registry, "process_start_time_seconds") is not None


def test_metrics_server__close_frees_the_port(sqlite_engine: Engine, registry: CollectorRegistry) -> None:
    """After close() the port refuses connections."""
    server = start_metrics_server("127.0.0.1", 0, registry, is_healthy=lambda: True)
    url = server.url
    server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=5)


def test_metrics_server__promtool_check_metrics_is_clean(served: tuple[str, list[bool]]) -> None:
    """`promtool check metrics` finds no problem in the /metrics output."""
    promtool = shutil.which("promtool")
    if promtool is None:  # CI installs it (Debian package prometheus); elsewhere it may be absent
        if os.environ.get("CI"):
            pytest.fail("promtool missing: apt-get install -y --no-install-recommends prometheus")
        pytest.skip("promtool missing: apt-get install -y --no-install-recommends prometheus")
    _, text = get(served[0] + "/metrics")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr)
