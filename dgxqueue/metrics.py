"""Prometheus metrics: counters and histograms fed by the daemon's hooks, queue depth read at scrape.

:class:`DaemonMetrics` is a :class:`~dgxqueue.hooks.Hooks` observer that owns every metric
of one daemon in the given registry. The queue depth (``dgxqueue_queue_*``) is not kept in memory:
a collector reads it from the database when Prometheus scrapes, through
:func:`~dgxqueue.storage.reads.queue_depth`, and keeps the answer ``depth_cache_seconds`` so
that several scrapers cannot hammer the database.

Cost of a scrape, measured by ``benchmarks/bench_metrics.py`` on 1,000,000 rows: pending rows are
counted through the partial claim index and the oldest pending job found by a skip scan of it;
processing and failed rows are counted through the status index; completed rows are the rest of
the table's total (exact on SQLite, where ``count(*)`` walks pages; on PostgreSQL the planner's
estimate once the table is past 100,000 rows, since ``count(*)`` there reads every row). Only the
pending count grows with the backlog. A database error during a scrape drops the depth samples
(stale numbers would mislead), logs it, and counts it in ``dgxqueue_queue_depth_scrape_errors_total``.
With the depth, the same read counts the live daemons serving each model from the registry
(``dgxqueue_live_daemons``, 0 for a model with jobs pending and no daemon), so an alert can say
"jobs pending for a model no daemon serves".

:func:`start_metrics_server` serves ``/metrics`` and ``/healthz`` from a daemon thread.
"""

from __future__ import annotations

import collections
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dgxqueue.daemon.diskcheck import PAUSE_REASONS
from dgxqueue.hooks import OUTCOMES, DaemonInfo, Hooks
from dgxqueue.logs import get_logger
from dgxqueue.machine_faults import REASONS as FAULT_REASONS
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.models import GenerationStatus
from dgxqueue.storage.reads import QueueDepth, queue_depth
from dgxqueue.storage.registry import live_per_model

__all__ = ["DURATION_BUCKETS", "DaemonMetrics", "MetricsServer", "QueueDepthCollector",
           "start_metrics_server"]

#: Seconds; fits jobs of about 1 s to 5 min, with room either side.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RESCUE_RESULTS = ("requeued", "failed")

log = get_logger(__name__)


#: Longest a scrape waits for the queue depth; Prometheus' own scrape timeout is often 5-10 s.
DEPTH_WAIT_SECONDS = 2.0


class QueueDepthCollector(Collector):
    """Queue depth from the database at scrape time, cached for ``cache_seconds``.

    The read runs on a thread of its own and a scrape waits for it at most ``wait_seconds``: a
    database that does not answer (a hung server, a lock) costs the scrape its depth series and
    counts a scrape error, never the whole scrape, which would read as the daemon being down."""

    def __init__(self, engine: Engine, cache_seconds: float,
                 clock: Callable[[], float] = time.monotonic,
                 wait_seconds: float = DEPTH_WAIT_SECONDS) -> None:
        self._engine = engine
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._wait_seconds = wait_seconds
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._reading: threading.Thread | None = None  # one read at a time; scrapes share its answer
        self._depth: QueueDepth | None = None
        self._live: dict[str, int] | None = None  # live daemons per model, read with the depth
        self._query_seconds = 0.0
        self.errors = 0
        #: Models this daemon serves: reported at 0 when none of theirs is pending, not left out.
        self.models: tuple[str, ...] = ()

    def depth(self) -> QueueDepth | None:
        """The cached depth, read again once older than the cache; None if the read failed or is
        still running after ``wait_seconds``."""
        with self._lock:
            now = self._clock()
            if self._reading is None and (self._read_at is None or now - self._read_at >= self._cache_seconds):
                self._read_at = now  # a failed read is cached too, so a sick database is not hammered
                self._reading = threading.Thread(target=self._read, name="dgxqueue-queue-depth", daemon=True)
                self._reading.start()
            reading, read_at = self._reading, now if self._read_at is None else self._read_at
        if reading is not None:
            reading.join(max(0.0, read_at + self._wait_seconds - self._clock()))
            if reading.is_alive():
                with self._lock:
                    self.errors += 1
                log.warning("queue depth read still running; scraped without it", seconds=self._wait_seconds)
                return None
        return self._depth

    def _read(self) -> None:
        started = time.perf_counter()
        depth, live = None, None
        try:
            with Session(self._engine) as session:
                depth = queue_depth(session)
                live = live_per_model(session)
        except Exception as exc:  # any failure must leave the rest of the scrape intact
            with self._lock:
                self.errors += 1
            log.warning("queue depth query failed", error=repr(exc))
        with self._lock:
            self._depth, self._query_seconds, self._reading = depth, time.perf_counter() - started, None
            self._live = live if depth is not None else None

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect(), i.e. query, at registration.
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        depth = self.depth()
        return self._families(depth, self._live if depth is not None else None)

    def _families(self, depth: QueueDepth | None, live: dict[str, int] | None = None) -> list[Metric]:
        jobs = GaugeMetricFamily(
            "dgxqueue_queue_jobs",
            "Jobs in the database by status (completed is PostgreSQL's estimate past 100k rows).",
            labels=["status"])
        pending = GaugeMetricFamily(
            "dgxqueue_queue_pending_jobs", "Pending jobs in the database by model.", labels=["model"])
        oldest = GaugeMetricFamily(
            "dgxqueue_queue_oldest_pending_age_seconds",
            "Age of the oldest pending job that is due (0 when none is): a job scheduled for later,"
            " or a retry waiting out its backoff, is not waiting to be claimed yet.")
        paused = GaugeMetricFamily(
            "dgxqueue_model_paused",
            "1 while the model is paused (no daemon claims it), else 0: a growing queue of a paused"
            " model is not a stuck one.", labels=["model"])
        query = GaugeMetricFamily(
            "dgxqueue_queue_depth_query_seconds", "Database time of the last queue depth read.")
        errors = CounterMetricFamily(
            "dgxqueue_queue_depth_scrape_errors", "Queue depth reads that failed during a scrape.")
        daemons = GaugeMetricFamily(
            "dgxqueue_live_daemons",
            "Live daemons serving each model, from the registry (0 for a model with jobs pending and none).",
            labels=["model"])
        if depth is not None:
            for status in GenerationStatus:
                jobs.add_metric([status.value], depth.by_status.get(status.value, 0))
            counts = {model: 0 for model in self.models} | dict(depth.pending_by_model)
            for model, n in sorted(counts.items()):
                pending.add_metric([model], n)
            for model in sorted(set(counts) | depth.paused):
                paused.add_metric([model], 1 if model in depth.paused else 0)
            # As of the read, by the database's clock (this host's may be off), as the rest of the depth is.
            created, read_at = depth.oldest_pending_created_at, depth.read_at
            age = (read_at - created).total_seconds() if created and read_at else 0.0
            oldest.add_metric([], max(0.0, age))
            query.add_metric([], self._query_seconds)
            if live is not None:
                for model in sorted(set(counts) | set(live)):
                    daemons.add_metric([model], live.get(model, 0))
        errors.add_metric([], self.errors)
        return [jobs, pending, oldest, paused, query, errors, daemons]


class _ModelSeries(NamedTuple):
    finished: dict[str, Counter]  # by outcome
    generation: Histogram
    queue_wait: Histogram
    audio: Counter


class DaemonMetrics(Hooks):
    """Every metric of one daemon, in ``registry``, updated by the daemon's lifecycle hooks, and the
    standard ``process_*`` series (memory, CPU time, open files) of the process it runs in.

    No ``_created`` series: each would add a series per counter and histogram that no dashboard or
    alert reads, and prometheus_client can turn them off only for the whole process, which this does."""

    def __init__(self, registry: CollectorRegistry, engine: Engine, *, depth_cache_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated
        # The daemon's registry is its own, not the global one that has the process series built in.
        ProcessCollector(registry=registry)
        self._wall_clock = wall_clock
        self.depth = QueueDepthCollector(engine, depth_cache_seconds, clock)
        registry.register(self.depth)
        self.build_info = Gauge(
            "dgxqueue_build_info", "Always 1; labels say what this daemon runs.",
            ["version", "generator", "engine", "worker_id"], registry=registry)
        self.finished = Counter(
            "dgxqueue_jobs_finished", "Attempts finished, by outcome "
            "(completed, failed, retried, released back to the queue, fenced off, abandoned, cancelled while it "
            "ran: apart from failed) and model.",
            ["outcome", "model"], registry=registry)
        self.rescued = Counter(
            "dgxqueue_jobs_rescued", "Jobs whose lease expired that this daemon's rescuer "
            "requeued or failed.", ["result"], registry=registry)
        self.expired = Counter(
            "dgxqueue_jobs_expired", "Pending jobs past their expires_at that this daemon's rescuer "
            "failed without running them, by model (not counted in dgxqueue_jobs_finished).",
            ["model"], registry=registry)
        self.generation = Histogram(
            "dgxqueue_generation_duration_seconds", "Time the generator spent on an attempt "
            "(its batch's time), by model.", ["model"], buckets=DURATION_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "dgxqueue_queue_wait_seconds", "Time from a job's creation to its claim, by model.",
            ["model"], buckets=DURATION_BUCKETS, registry=registry)
        self.audio = Counter(
            "dgxqueue_audio_seconds", "Seconds of audio produced by completed jobs, by model.",
            ["model"], registry=registry)
        self.batch_size = Histogram(
            "dgxqueue_batch_size", "Requests per generator call; with continuous batching, jobs in slots at each"
            " decoding step.", buckets=BATCH_BUCKETS,
            registry=registry)
        self.in_flight = Gauge(
            "dgxqueue_jobs_in_flight", "Jobs this daemon holds right now.", registry=registry)
        # Progress as two series per daemon, not one per job: a job label would grow the series
        # without bound (every job id ever run), and per-job progress is in the row already.
        self.progress_ratio = Gauge(
            "dgxqueue_progress_ratio", "Mean progress (0..1) of the jobs this daemon runs that report "
            "progress, as last written to their rows.", registry=registry)
        self.progress_jobs = Gauge(
            "dgxqueue_progress_jobs", "Jobs this daemon holds that report progress.", registry=registry)
        self._progress: dict[str, float] = {}
        self.model_load = Gauge(
            "dgxqueue_model_load_seconds", "How long the generator took to load.", registry=registry)
        self.last_loop = Gauge(
            "dgxqueue_last_loop_timestamp_seconds", "Unix time the main loop last went round healthy "
            "(a claim, an idle poll or a heartbeat); a stuck loop, or a backend call stuck past its "
            "time limit, stops it.", registry=registry)
        self.ready = Gauge(
            "dgxqueue_ready", "1 once the generator is loaded and the daemon takes jobs; 0 while it "
            "loads.", registry=registry)
        self.claims_paused = Gauge(
            "dgxqueue_claims_paused", "1 while the daemon claims nothing because its outputs folder "
            "cannot take files, by reason (disk_low, read_only, not_writable); it resumes by itself.",
            ["reason"], registry=registry)
        self.machine_fault = Gauge(
            "dgxqueue_machine_fault", f"1 once a machine fault ({', '.join(FAULT_REASONS)}) stopped the daemon, "
            "which gives its jobs back and exits for a restart.",
            ["reason"], registry=registry)
        for result in RESCUE_RESULTS:
            self.rescued.labels(result)
        for reason in PAUSE_REASONS:
            self.claims_paused.labels(reason)
        # Each model's series, looked up once: labels() costs about as much as the update itself.
        self._series: dict[str, _ModelSeries] = {}

    def _model(self, model: str) -> _ModelSeries:
        # Every series of a model from zero, so rate() and increase() see the first event.
        series = self._series[model] = _ModelSeries(
            {outcome: self.finished.labels(outcome, model) for outcome in OUTCOMES},
            self.generation.labels(model), self.queue_wait.labels(model), self.audio.labels(model))
        return series

    def on_start(self, info: DaemonInfo) -> None:
        self.build_info.labels(info.version, info.generator, info.engine, info.worker_id).set(1)
        for model in info.models:
            self._model(model)
            self.expired.labels(model)
        self.depth.models = info.models
        self.last_loop.set(self._wall_clock())
        self.ready.set(0)

    def on_model_loaded(self, seconds: float) -> None:
        self.model_load.set(seconds)
        self.last_loop.set(self._wall_clock())
        self.ready.set(1)

    def on_loop(self, monotonic: float) -> None:
        self.last_loop.set(self._wall_clock())

    def on_claimed(self, jobs: Sequence[ClaimedJob], now: datetime) -> None:
        self.in_flight.inc(len(jobs))
        for job in jobs:
            series = self._series.get(job.model_name) or self._model(job.model_name)
            # Both times are the database's: the daemon's ``now`` may be off (as the job log's wait).
            series.queue_wait.observe(max(0.0, (job.claimed_at - job.created_at).total_seconds()))

    def on_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def on_progress(self, progress: Mapping[str, tuple[int, int]]) -> None:
        self._progress = {job_id: min(1.0, done / total) for job_id, (done, total) in progress.items() if total > 0}
        self._show_progress()

    def _show_progress(self) -> None:
        values = self._progress.values()
        self.progress_jobs.set(len(values))
        self.progress_ratio.set(sum(values) / len(values) if values else 0.0)

    def on_job_finished(self, job: ClaimedJob, outcome: str, *, generation_seconds: float | None,
                        audio_seconds: float | None, error: str | None) -> None:
        self.in_flight.dec()
        if self._progress.pop(job.id, None) is not None:
            self._show_progress()
        series = self._series.get(job.model_name) or self._model(job.model_name)
        counter = series.finished.get(outcome) or self.finished.labels(outcome, job.model_name)
        counter.inc()
        if generation_seconds is not None:
            series.generation.observe(generation_seconds)
        if outcome == "completed" and audio_seconds:
            series.audio.inc(audio_seconds)

    def on_expired(self, jobs: Sequence[tuple[str, str]]) -> None:
        for model, n in collections.Counter(model for _, model in jobs).items():
            self.expired.labels(model).inc(n)

    def on_claims_paused(self, reason: str | None) -> None:
        for label in PAUSE_REASONS:
            self.claims_paused.labels(label).set(1 if label == reason else 0)

    def on_machine_fault(self, reason: str) -> None:
        self.machine_fault.labels(reason).set(1)

    def on_rescued(self, requeued: Sequence[str], failed: Sequence[str]) -> None:
        if requeued:
            self.rescued.labels("requeued").inc(len(requeued))
        if failed:
            self.rescued.labels("failed").inc(len(failed))


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a daemon thread; ``close()`` stops it and frees the port."""

    def __init__(self, server: http.server.ThreadingHTTPServer) -> None:
        self._server = server
        self.address = str(server.server_address[0])
        self.port = int(server.server_address[1])
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def address_family(address: str) -> socket.AddressFamily:
    """The family the metrics server binds ``address`` in: IPv6 for one holding ':', else IPv4
    (a name is resolved in that family alone)."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def start_metrics_server(address: str, port: int, registry: CollectorRegistry,
                         is_healthy: Callable[[], bool]) -> MetricsServer:
    """Serve ``registry`` on ``address:port`` (port 0 picks a free one); see :class:`MetricsServer`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(registry), content_type)
            elif path == "/healthz":
                try:
                    healthy = bool(is_healthy())
                except Exception:  # a broken check is an unhealthy daemon, not a crashed server
                    healthy = False
                self._reply(200 if healthy else 503, b"ok\n" if healthy else b"stalled\n")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics request", line=format % args)

    family = address_family(address)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = family

    return MetricsServer(Server((address, port), Handler))
