"""run_in_processes: its processes, forked from a fork server started by an earlier caller, see the
environment of the test that started them, not the one the server was started with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.producers import report_environment, run_in_processes


def test_run_in_processes__a_variable_set_after_the_server_started_reaches_the_children(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DGXQ_TEST_PRODUCER_PROBE", raising=False)
    assert run_in_processes(report_environment, [("DGXQ_TEST_PRODUCER_PROBE",)]) == [None]  # server started
    monkeypatch.setenv("DGXQ_TEST_PRODUCER_PROBE", "this test's")
    assert run_in_processes(report_environment, [("DGXQ_TEST_PRODUCER_PROBE",)] * 2) == ["this test's"] * 2
    monkeypatch.delenv("DGXQ_TEST_PRODUCER_PROBE")
    assert run_in_processes(report_environment, [("DGXQ_TEST_PRODUCER_PROBE",)]) == [None]


def test_run_in_processes__a_start_up_variable_set_after_the_server_started_reaches_the_children(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TMPDIR is read at import (by sqlite3) as well: these children are spawned, and still see it."""
    run_in_processes(report_environment, [("TMPDIR",)])  # the server started, if it was not
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert run_in_processes(report_environment, [("TMPDIR",)]) == [str(tmp_path)]
