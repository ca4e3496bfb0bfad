"""The shipped dashboard and alert rules, proven against a real Prometheus scraping real /metrics.

The ``workload`` fixture is the data source: two real ``dgxqueue worker`` processes (the
synthesizer and the scripted test backend) completing, failing, retrying and rescuing jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.storage import create_generations, dispose_engines, init_db, session_scope
from dgxqueue.storage.models import G
from tests.support.processes import SCRIPTED, free_port, start_worker, stop, wait_until, write_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "dgxqueue.json"
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "monitoring" / "prometheus" / "alerts_test.yml"
SCRAPE_EXAMPLE = ROOT / "monitoring" / "prometheus" / "scrape-example.yml"
GRAFANA_VARIABLES = {"$instance": ".*", "${datasource}": "", "$__rate_interval": "1m", "$__interval": "15s"}


def need(binary: str) -> str:
    """The binary's path; missing, a skip outside CI and a failure under CI."""
    found = shutil.which(binary)
    if found is None:
        message = f"{binary} missing: apt-get install -y --no-install-recommends prometheus"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class Workload:
    """Something that exposes dgxqueue /metrics: its scrape targets, and a way to make more work."""

    targets: list[str]
    more_work: Callable[[], None]
    completed: Callable[[], int]  # jobs completed so far, as /metrics should say


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    """Two real daemon processes on one SQLite queue: the synthesizer, and the scripted test backend
    for failures and a retry; one job is left with an expired lease for the rescuer."""
    folder = tmp_path_factory.mktemp("queue")
    url = f"sqlite:///{folder / 'generations.db'}"
    engine = init_db(url)
    ports = [free_port(), free_port()]
    processes = []
    for n, (generator, port) in enumerate(zip(("synth", SCRIPTED), ports, strict=True)):
        config = write_config(folder / f"daemon{n}.toml", {
            "database": {"url": url},
            "outputs": {"dir": str(folder / "outputs")},
            "generator": {"name": generator},
            "worker": {"backoff_base_seconds": 0.0, "rescue_interval_seconds": 0.2, "heartbeat_seconds": 0.2},
            "metrics": {"port": port},
            "logging": {"format": "json"},
        })
        processes.append(start_worker(config, folder / f"daemon{n}.log"))

    def enqueue(model: str, prompts: list[str]) -> None:
        with session_scope(engine) as session:
            create_generations(session, [{"prompt": p, "model_name": model, "duration_seconds": 0.5,
                                          "sample_rate": 16000} for p in prompts])

    def finished() -> bool:
        with engine.connect() as conn:
            busy = conn.execute(sa.text(
                "SELECT count(*) FROM generations WHERE status IN ('pending', 'processing')")).scalar_one()
        return int(busy) == 0

    def completed() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT count(*) FROM generations WHERE status = 'completed'")).scalar_one())

    enqueue("scripted", ["fine", "fine", "transient:1", "permanent"])
    enqueue("synth", ["lo-fi piano 85 BPM", "trap 140 BPM in Cm", "house 124 BPM"])
    with session_scope(engine) as session:  # a job whose daemon died: the rescuer requeues it
        [dead] = create_generations(session, [{"prompt": "techno", "model_name": "synth", "duration_seconds": 0.5}])
        session.execute(sa.update(G).where(G.c.id == dead).values(
            status="processing", worker_id="dead", attempts=1,
            lease_expires_at=datetime.now(UTC) - timedelta(minutes=5)))
    wait_until(finished, 60, "the first jobs", alive=processes[0])

    def more_work() -> None:
        enqueue("synth", ["ambient pads", "drum and bass 174 BPM"])
        enqueue("scripted", ["fine"])
        wait_until(finished, 60, "more jobs", alive=processes[1])

    yield Workload([f"127.0.0.1:{port}" for port in ports], more_work, completed)
    for process in processes:
        assert stop(process) == 0
    dispose_engines()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as error:  # 400 on a bad query still carries the JSON error
            body = json.load(error)
        return body

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


@pytest.fixture(scope="module")
def prometheus(workload: Workload, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus scraping the workload every second, with the shipped rules loaded."""
    binary = need("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "dgxqueue", "static_configs": [{"targets": workload.targets}]}],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: process.poll() is not None or server.ready(), 30, "Prometheus to be ready", interval=0.2)
        assert process.poll() is None, (folder / "prometheus.log").read_text()
        first = 'count(dgxqueue_build_info) == 2 and count(dgxqueue_queue_jobs{status="pending"}) == 2'
        wait_until(lambda: server.query(first)["data"]["result"], 30, "the first scrape of both daemons", interval=0.2)
        workload.more_work()
        expected = f'sum(dgxqueue_jobs_finished_total{{outcome="completed"}}) == {workload.completed()}'
        wait_until(lambda: server.query(expected)["data"]["result"], 30, "a scrape after more work", interval=0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            expr = target["expr"]
            for metric in re.findall(r"\b((?:dgxqueue_\w+|up))\{([^}]*)\}", expr):
                assert 'instance=~"$instance"' in metric[1], (panel["title"], expr)
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            found.append((panel["title"], expr))
    return found


def alert_expressions(prometheus: Prometheus) -> list[tuple[str, str]]:
    """(alert, expression) of every rule, as Prometheus loaded them from alerts.yml."""
    groups = prometheus.api("rules", type="alert")["data"]["groups"]
    return [(rule["name"], rule["query"]) for group in groups for rule in group["rules"]]


def test_dashboard__every_query_returns_data(prometheus: Prometheus) -> None:
    """Each dashboard panel's query parses and returns data from the scraped daemons."""
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty = []
    for title, expr in queries:
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (title, expr, answer)
        if not answer["data"]["result"]:
            empty.append((title, expr))
    assert not empty, empty


def test_dashboard__variables_and_shape(prometheus: Prometheus) -> None:
    """The datasource and instance variables exist; the instance query lists both daemons."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["multi"] and instance["includeAll"]
    assert instance["query"]["query"] == "label_values(dgxqueue_build_info, instance)"
    answer = prometheus.api("label/instance/values", **{"match[]": "dgxqueue_build_info"})
    assert len(answer["data"]) == 2
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"]


def test_alert_rules__every_expression_parses_and_rules_evaluate(prometheus: Prometheus) -> None:
    """Each alert expression evaluates through the API, and Prometheus runs every rule healthily."""
    expressions = alert_expressions(prometheus)
    assert len(expressions) == ALERTS.read_text().count("- alert: ")
    for name, expr in expressions:
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (name, expr, answer)

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]
        done = len(rules) == len(expressions) and all(r["lastEvaluation"][:4] != "0001" for r in rules)
        return rules if done else []

    rules = wait_until(evaluated, 30, "every rule to be evaluated", interval=0.2)
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert "DgxQueueDaemonDown" not in firing and "DgxQueueDaemonLoopStalled" not in firing


def test_scrape__process_series_and_no_created_series(prometheus: Prometheus) -> None:
    """Each real daemon exports the standard process_* series and not one `_created` series."""
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_max_fds", "process_start_time_seconds"):
        answer = prometheus.query(f'{name}{{job="dgxqueue"}}')
        assert len(answer["data"]["result"]) == 2, (name, answer)
    created = prometheus.query('{__name__=~".+_created", job="dgxqueue"}')
    assert created["status"] == "success" and created["data"]["result"] == []
    assert prometheus.query('dgxqueue_jobs_finished_total{job="dgxqueue"}')["data"]["result"]


ALERT_PREFIX = "DgxQueue"


def test_alert_rules__every_name_shares_one_prefix_and_has_a_unit_test() -> None:
    """Every alert in alerts.yml is named DgxQueue..., alerts_test.yml tests each of them and no
    other, and the alerts the dashboard names exist."""
    alerts = re.findall(r"^\s*- alert: (\S+)\s*$", ALERTS.read_text(), flags=re.MULTILINE)
    assert alerts and len(alerts) == len(set(alerts)), alerts
    assert [name for name in alerts if not name.startswith(ALERT_PREFIX)] == []
    tested = set(re.findall(r"^\s*alertname: (\S+)\s*$", ALERTS_TEST.read_text(), flags=re.MULTILINE))
    assert tested == set(alerts), (sorted(set(alerts) - tested), sorted(tested - set(alerts)))
    named = set(re.findall(r"\b(\w+) alert\b", DASHBOARD.read_text()))
    assert named and named <= set(alerts), sorted(named - set(alerts))


def test_alert_rules__promtool_check_and_unit_tests_pass() -> None:
    """`promtool check rules` and `promtool test rules` pass on the shipped files."""
    promtool = need("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                                cwd=ALERTS.parent)
        assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_example__is_a_valid_prometheus_config(tmp_path: Path) -> None:
    """The example prometheus.yml passes `promtool check config` with the shipped rule file."""
    promtool = need("promtool")
    shutil.copy(ALERTS, tmp_path / "dgxqueue-alerts.yml")
    text = SCRAPE_EXAMPLE.read_text().replace("/etc/prometheus/dgxqueue-alerts.yml",
                                              str(tmp_path / "dgxqueue-alerts.yml"))
    (tmp_path / "prometheus.yml").write_text(text)
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
