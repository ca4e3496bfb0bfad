"""Shared fixtures (``db_url`` runs a test on a real SQLite file and on real PostgreSQL) and the
collection rules: the ``postgres``, ``slow`` and ``serial`` markers, slow tests first, the xdist
groups of tests that must share a worker, and serial tests alone."""

from __future__ import annotations

import os
import signal
import tempfile

# No model hub is reachable: huggingface_hub reads these once, at its first import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A shell starts a background job (nohup pytest ... &) with SIGINT ignored, and every command a test
# starts would inherit that: the Ctrl-C tests need it to interrupt, as at a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Under nohup SIGHUP is ignored, and every daemon a test starts would keep it ignored (as dgxqueue
# keeps a signal ignored at start): a handler that does nothing leaves pytest itself nohup-proof
# while the commands it starts get SIGHUP at its default, for the tests that send it.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, lambda _signum, _frame: None)
# With PYTHONDONTWRITEBYTECODE set (some shells and images set it), every `python -m dgxqueue` the
# tests start compiled dgxqueue from source, a tenth of its start-up: the processes the tests start
# keep their bytecode in a folder of their own instead, outside the checkout.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), f"dgxqueue-pycache-{os.getuid()}"))
# An xdist worker has one core's share: with torch's thread per core, the workers' threads wait on each other.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import fcntl
import json
import subprocess
import types
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from dgxqueue.storage import dispose_engines, get_engine, init_db
from tests.support import processes, zygote
from tests.support.db import build_sqlite_template, postgres_database_url, sqlite_url, sqlite_url_at_head


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at head, migrated once per session (per xdist worker) and copied per test."""
    return build_sqlite_template(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL of its own, once per engine: empty, or at head when the test also asks for
    ``engine`` (a copy of a template migrated once: migrating is what the migration tests test)."""
    at_head = "engine" in request.fixturenames
    if request.param == "sqlite":
        yield sqlite_url_at_head(tmp_path, request.getfixturevalue("sqlite_template")) if at_head \
            else sqlite_url(tmp_path)
    else:
        with postgres_database_url(at_head=at_head) as url:
            yield url
            dispose_engines()
            return
    dispose_engines()


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> Iterator[str]:
    yield sqlite_url(tmp_path)
    dispose_engines()


@pytest.fixture
def pg_db_url() -> Iterator[str]:
    """An empty PostgreSQL database of its own."""
    with postgres_database_url() as url:
        yield url
        dispose_engines()


@pytest.fixture
def engine(db_url: str) -> Engine:
    """A database at head on each engine (``db_url`` is its URL)."""
    init_db(db_url)
    return get_engine(db_url)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that runs out of space. Needs root (mount)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=64k"):
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs; CI runs as root and must run the disk-full tests")
        pytest.skip("cannot mount a tmpfs (needs root); test_write__file_size_limit covers a failed write")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nothing can be written to: a read-only tmpfs as root (root ignores modes), else mode 0555."""
    folder = tmp_path / "readonly"
    if os.geteuid() == 0 and _mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
        return
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


# --- collection: markers, order, xdist groups ----------------------------------------------------

#: Fixtures that give a test a database on the PostgreSQL server; so does any fixture's or
#: parametrisation's value "postgres" (db_url's, the conformance suite's backend).
POSTGRES_FIXTURES = frozenset({"pg_db_url"})
#: Names whose use in a test's own code means it talks to a PostgreSQL server itself.
POSTGRES_NAMES = frozenset({"private_cluster", "PG_ADMIN_URL", "postgres_database_url", "postgres_schema_url"})
#: Tests that take more than about 2 s each on an idle 2-core machine (``path::function``, every
#: parametrisation). The summary names unlisted tests that take over SLOW_SECONDS.
SLOW = frozenset({
    "tests/acceptance/test_chaos.py::test_chaos__signals_across_three_daemons_leave_every_result_whole",
    "tests/acceptance/test_cli.py::test_db__upgrade_current_downgrade",
    "tests/acceptance/test_cli.py::test_demo__from_a_fresh_folder_writes_the_wavs",
    "tests/acceptance/test_cli.py::test_enqueue_wait__with_a_running_worker_then_sigterm",
    "tests/acceptance/test_cli_edges.py::test_db_upgrade__wait_outlasts_a_database_that_starts_later",
    "tests/acceptance/test_continuous_processes.py::test_continuous__a_job_joins_the_running_batch_and_leaves_first",
    "tests/acceptance/test_continuous_processes.py::test_continuous__batch_size_metric_observes_the_jobs_in_slots_at_each_step",
    "tests/acceptance/test_continuous_processes.py::test_continuous__jobs_whose_lease_was_lost_leave_their_slots",
    "tests/acceptance/test_continuous_processes.py::test_continuous__a_suspect_is_not_claimed_while_the_batch_runs",
    "tests/acceptance/test_continuous_processes.py::test_continuous__cancel_of_one_running_job_leaves_the_others_decoding",
    "tests/acceptance/test_continuous_processes.py::test_continuous__sigkill_jobs_in_slots_are_rescued",
    "tests/acceptance/test_continuous_processes.py::test_continuous__sigterm_during_a_running_batch",
    "tests/acceptance/test_daemon_processes.py::test_daemon__sigkill_mid_job_is_rescued_by_another",
    "tests/acceptance/test_dbmove_processes.py::test_archive__sigkill_at_random_points_every_finished_job_in_exactly_one_database",
    "tests/acceptance/test_dbmove_processes.py::test_db_copy__every_status_to_postgres_then_a_daemon_finishes_the_pending",
    "tests/acceptance/test_dbmove_processes.py::test_db_copy__killed_after_its_first_batch_then_rerun_gives_the_same_result",
    "tests/acceptance/test_db_maintenance.py::test_db_check__overwritten_pages_exit_damaged",
    "tests/acceptance/test_db_maintenance.py::test_db_vacuum__shrinks_the_file_while_a_daemon_works",
    "tests/acceptance/test_daemon_processes.py::test_daemon__sqlite_lock_storm_loses_nothing",
    "tests/acceptance/test_daemon_processes.py::test_daemon__survives_postgres_restart",
    "tests/acceptance/test_daemon_processes.py::test_daemon__survives_terminated_connections",
    "tests/acceptance/test_daemon_processes.py::test_daemons__four_processes_complete_2000_jobs_exactly_once",
    "tests/acceptance/test_first_hour.py::test_db_downgrade__dropping_tables_or_columns_needs_yes",
    "tests/acceptance/test_first_hour.py::test_demo__first_ctrl_c_on_a_terminal_says_what_the_second_does",
    "tests/acceptance/test_first_hour.py::test_demo__sigterm_stops_it_cleanly_with_exit_143",
    "tests/acceptance/test_first_hour.py::test_demo__with_another_daemon_on_the_same_database",
    "tests/acceptance/test_first_hour.py::test_package__alembic_only_to_migrate_and_prometheus_only_to_serve_metrics",
    "tests/acceptance/test_first_hour.py::test_package__producers_and_cli_reads_never_load_numpy_or_structlog",
    "tests/acceptance/test_first_hour.py::test_worker__older_schema_exit_69_and_left_alone",
    "tests/acceptance/test_isolation_processes.py::test_daemons__a_job_that_kills_its_daemon_is_isolated_and_failed_alone",
    "tests/acceptance/test_isolation_processes.py::test_daemons__a_job_whose_validate_kills_its_daemon_fails_alone",
    "tests/acceptance/test_machine_faults.py::test_job_timeout__hanging_prompt_costs_max_attempts_restarts_and_the_queue_moves",
    "tests/acceptance/test_machine_faults.py::test_machine_fault__full_disk_gives_jobs_back_exits_75_then_pauses_until_space_returns",
    "tests/acceptance/test_machine_faults.py::test_machine_fault__read_only_remount_gives_jobs_back_and_exits_75",
    "tests/acceptance/test_machine_faults.py::test_stop__sigterm_while_postgres_is_down_is_bounded_and_the_job_rescued",
    "tests/acceptance/test_machine_faults_review.py::test_machine_fault__a_disk_that_stays_short_never_fails_the_jobs",
    "tests/acceptance/test_machine_faults_review.py::test_machine_fault__mark_left_by_a_stop_does_not_charge_the_next_fault",
    "tests/acceptance/test_machine_faults_review.py::test_stop__sigterm_while_postgres_hangs_is_bounded",
    "tests/acceptance/test_occupied_paths.py::test_daemon__a_file_already_at_a_jobs_path_fails_that_job_alone_and_stays_as_it_was",
    "tests/acceptance/test_occupied_paths_publish.py::test_prune__keeps_a_completed_job_whose_result_is_held",
    "tests/acceptance/test_occupied_paths_publish.py::test_show__a_held_result_is_not_reported_as_the_other_file_at_its_path",
    "tests/acceptance/test_occupied_paths_review.py::test_daemon__a_jobs_own_wav_whose_completion_the_database_lost_is_not_charged_to_the_job",
    "tests/acceptance/test_operator_processes.py::test_cli__enqueue_wait_interrupted_leaves_the_job_id_on_screen",
    "tests/acceptance/test_packaging.py::test_wheel__holds_dgxqueue_workers_and_migrations_only",
    "tests/acceptance/test_poison_rows.py::test_worker_burst__poison_rows_fail_alone_and_the_queue_drains",
    "tests/acceptance/test_result_fencing.py::test_daemon__a_stalled_attempt_never_replaces_the_finished_file",
    "tests/acceptance/test_result_fencing.py::test_daemon__killed_at_any_step_of_a_write_every_job_completes_once",
    "tests/acceptance/test_sd_notify_daemon.py::test_daemon__ready_watchdog_stopping_in_order",
    "tests/acceptance/test_sd_notify_daemon.py::test_daemon__stalled_loop_stops_watchdog",
    "tests/acceptance/test_startup_review.py::test_db_downgrade__forms_not_judged_for_losses_refused",
    "tests/acceptance/test_startup_review.py::test_db_upgrade__explicit_revision_concurrently_on_postgres",
    "tests/acceptance/test_startup_review.py::test_db_backup__postgres_a_failed_dump_says_why_in_words",
    "tests/acceptance/test_startup_review.py::test_db_backup__postgres_dumps_non_latin_text_whatever_pgclientencoding_says",
    "tests/acceptance/test_unreadable_outputs.py::test_prune__a_folder_it_cannot_list_keeps_its_completed_jobs",
    "tests/acceptance/test_unreadable_outputs.py::test_show_wait__a_folder_it_cannot_list_is_not_called_deleted_or_moved",
    "tests/acceptance/test_web_browser.py::test_browser__overview_updates_when_a_daemon_completes_a_job",
    "tests/acceptance/test_web_browser.py::test_browser__progress_bar_moves_as_the_daemon_reports",
    "tests/acceptance/test_web_browser.py::test_browser__audio_loads_and_reports_its_duration",
    "tests/acceptance/test_web_browser.py::test_browser__cancel_and_retry_through_the_buttons",
    "tests/acceptance/test_web_browser.py::test_browser__a_prompt_holding_script_is_shown_as_text",
    "tests/acceptance/test_web_cli.py::test_web_cli__a_token_file_that_never_ends_is_refused_not_read_whole",
    "tests/acceptance/test_web_cli.py::test_web_cli__an_unreadable_token_file_says_what_is_wrong_with_it",
    "tests/acceptance/test_web_cli.py::test_web_cli__off_loopback_without_a_token_is_refused",
    "tests/acceptance/test_web_cli.py::test_web_cli__token_required_on_every_address_and_never_printed",
    "tests/acceptance/test_web_cli.py::test_web_cli__without_the_web_extra_says_how_to_install_it",
    "tests/integration/test_daemon.py::test_daemon__leases_renewed_through_a_round_of_short_calls",
    "tests/integration/test_maintenance.py::test_vacuum__postgresql_gives_up_on_a_table_another_session_holds",
    "tests/integration/test_reads.py::test_queue_depth__gives_up_on_a_locked_table",
    "tests/integration/test_search.py::test_search__plan_reads_the_search_index_for_a_rare_word",
    "tests/migrations/test_migrations.py::test_init_db__concurrent_processes_on_a_new_database",
    "tests/migrations/test_migrations.py::test_migrations__round_trip_through_the_alembic_cli",
    "tests/migrations/test_migrations.py::test_wheel__installed_package_finds_its_migrations",
    "tests/unit/test_metrics.py::test_queue_depth__a_database_that_never_answers_costs_the_depth_not_the_scrape",
    "tests/generators/test_musicgen_decode.py::test_compile_step__greedy_tokens_equal_eager_as_jobs_join_and_leave",
    "tests/generators/test_musicgen_decode.py::test_compile_step__one_graph_serves_every_join_leave_cancel_and_window",
    "tests/generators/test_musicgen.py::test_musicgen__compile_step_compiles_at_load_not_in_a_jobs_time",
    "tests/generators/test_musicgen_slots.py::test_musicgen_slots__a_late_joiner_leaves_first_with_its_audio_alone",
    "tests/generators/test_musicgen_slots.py::test_musicgen_slots__cancel_frees_its_slot_and_the_others_decode_on",
    "tests/acceptance/test_validate_late_processes.py::test_daemons__a_validate_that_hangs_is_timed_out_and_fails_alone",
    "tests/integration/test_web_odd_input.py::test_web_db_busy__a_locked_table_is_503_not_a_hang",
    "tests/acceptance/test_daemon_services_processes.py::test_daemon__a_call_longer_than_the_lease_keeps_its_job_from_a_rescuing_daemon",
    "tests/acceptance/test_registry_processes.py::test_workers__a_killed_daemon_goes_stale_then_is_forgotten",
    "tests/integration/test_wait_async.py::test_wait_async__many_waiters_at_once_need_no_pool",
    "tests/acceptance/test_cancel_races_processes.py::test_cancel__racing_each_jobs_completion_leaves_one_outcome_and_whole_files",
})
#: Fixtures that take seconds to build: every test that uses one is slow (its first user pays).
SLOW_FIXTURES = frozenset({"prometheus"})
SLOW_SECONDS = 5.0
_LOG_TAIL = 6000  # bytes of each daemon log a failed test's report shows
#: Timing-sensitive tests that fail when another test loads the machine: no other test runs beside them.
SERIAL = frozenset({
    "tests/acceptance/test_startup_review.py::test_main__ctrl_c_while_importing_is_one_line_not_a_traceback",
})
#: Tests that torch.compile the decode step, all of one session shape: they run on one worker, one after
#: another, so that only the first pays inductor's cold compile (tens of seconds, more under coverage) and
#: the others load its code from inductor's on-disk cache (dynamo still traces). Side by side on two
#: workers, each would compile the same graph cold.
TORCH_COMPILE = frozenset({
    "tests/generators/test_musicgen.py::test_musicgen__compile_step_compiles_at_load_not_in_a_jobs_time",
    "tests/generators/test_musicgen_decode.py::test_compile_step__greedy_tokens_equal_eager_as_jobs_join_and_leave",
    "tests/generators/test_musicgen_decode.py::test_compile_step__one_graph_serves_every_join_leave_cancel_and_window",
})


def _code_names(code: types.CodeType) -> set[str]:
    """Every global, attribute and imported name ``code`` and the functions inside it refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _uses_postgres(item: pytest.Function) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(isinstance(value, str) and value == "postgres"
                                    for value in callspec.params.values()):
        return True
    if POSTGRES_FIXTURES & set(item.fixturenames):
        return True
    return bool(POSTGRES_NAMES & _code_names(item.function.__code__))


def _xdist_group(item: pytest.Function) -> str | None:
    """Tests that start a private PostgreSQL cluster run one at a time (each initdb and server
    takes a core); the torch.compile tests run one after another (TORCH_COMPILE); tests that share a
    module-scoped fixture run where it is built, once."""
    if "private_cluster" in _code_names(item.function.__code__):
        return "private-pg-cluster"
    if item.nodeid.split("[")[0] in TORCH_COMPILE:
        return "torch-compile"
    for name in item.fixturenames:
        definitions = item._fixtureinfo.name2fixturedefs.get(name, ())
        if definitions and definitions[-1].scope == "module":
            return str(item.module.__name__)
    return None


def _check_names(items: list[pytest.Function]) -> None:
    """A renamed or removed test would drop out of SLOW, SERIAL or TORCH_COMPILE unnoticed: name what
    matches nothing."""
    modules = {item.nodeid.split("::")[0]: item.module for item in items}
    for entry in sorted(SLOW | SERIAL | TORCH_COMPILE):
        path, function = entry.split("::")
        if path in modules and not hasattr(modules[path], function):
            raise pytest.UsageError(f"tests/conftest.py names {entry}, which does not exist")


def _worker_run_folder(config: pytest.Config) -> Path | None:
    """In an xdist worker, the run's basetemp, shared by its workers (each gets a folder in it)."""
    if "PYTEST_XDIST_WORKER" not in os.environ or config.option.basetemp is None:
        return None
    return Path(config.option.basetemp).parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    functions = [item for item in items if isinstance(item, pytest.Function)]
    _check_names(functions)
    groups: dict[str, str] = {}
    for item in functions:
        if _uses_postgres(item):
            item.add_marker(pytest.mark.postgres)
        if item.nodeid.split("[")[0] in SLOW or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if item.nodeid.split("[")[0] in SERIAL:
            item.add_marker(pytest.mark.serial)
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
            groups[item.nodeid] = group
    run = _worker_run_folder(config)
    if run is not None:  # for the scheduler below, in the controller
        (run / f"groups-{os.environ['PYTEST_XDIST_WORKER']}.json").write_text(json.dumps(groups))
    # Slow tests first, so that parallel workers do not end on one long test while the rest idle.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadgroup with the groups above. xdist's own reads the xdist_group marks by adding
    them to each test's id, which pytest 9.2 no longer lets it change (pytest-xdist issue 1386):
    the tests of a group were spread over the workers. Here the workers write each test's group
    into the run's basetemp when they collect, and the controller reads it when it schedules,
    after every worker has collected."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    run = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]  # as xdist gives its workers

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = {}
                for path in run.glob("groups-*.json"):
                    self.groups.update(json.loads(path.read_text()))
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


@contextlib.contextmanager
def _turn(item: pytest.Item) -> Iterator[None]:
    """Under xdist, a ``serial`` test runs alone and any other beside any other: a readers-writer
    lock on files shared by this run's workers, with a turnstile so that a waiting serial test
    stops new tests from starting instead of waiting for a moment when none runs."""
    run = _worker_run_folder(item.config)
    if run is None:
        yield
        return
    alone = item.get_closest_marker("serial") is not None
    with (run / "serial.gate").open("a") as gate, (run / "serial.lock").open("a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases both locks


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    processes.STARTED_LOGS.clear()
    with _turn(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None],
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that started daemons shows the end of each one's log: a timeout in CI says
    what the daemon was doing, not only what the test waited for."""
    report: pytest.TestReport = yield
    if report.failed:
        for log in processes.STARTED_LOGS:
            try:
                tail = log.read_bytes()[-_LOG_TAIL:].decode("utf-8", "replace")
            except OSError as exc:
                tail = f"(unreadable: {exc})"
            report.sections.append((f"daemon log {log.name} ({report.when})", tail))
    return report


_unmarked_slow: list[tuple[float, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > SLOW_SECONDS and "slow" not in report.keywords:
        _unmarked_slow.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unmarked_slow:
        terminalreporter.write_sep("-", f"over {SLOW_SECONDS:g} s and not marked slow (see SLOW in tests/conftest.py)")
        for duration, nodeid in sorted(_unmarked_slow, reverse=True):
            terminalreporter.write_line(f"{duration:6.1f} s  {nodeid}")


def pytest_unconfigure(config: pytest.Config) -> None:
    # The fork servers of DGXQ_TEST_ZYGOTE=1 (none otherwise) end with this process, reaped by it.
    zygote.shutdown()
