"""The window in which a wait whose connection the server ended keeps connecting again
(:func:`dgxqueue.jobs.reconnecting`), shared by Job.wait, wait_async and ``dgxqueue wait``."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from dgxqueue.jobs import RECONNECT_PAUSE_SECONDS, RECONNECT_SECONDS, reconnecting


def lost() -> sa.exc.DBAPIError:
    return sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"),
                                   connection_invalidated=True)


def refused() -> sa.exc.DBAPIError:
    """What connecting during a restart raises: no code, the connection itself failed."""
    return sa.exc.OperationalError("SELECT 1", {}, Exception("the database system is shutting down"))


def test_reconnecting__a_lost_connection_opens_the_window_and_refusals_inside_it_are_tried_again() -> None:
    before = time.monotonic()
    until = reconnecting(lost(), None)
    assert before + RECONNECT_SECONDS <= until <= time.monotonic() + RECONNECT_SECONDS
    assert reconnecting(refused(), until) == until  # a restart's shutdown, then its start
    assert reconnecting(lost(), until) == until


def test_reconnecting__past_the_window_or_for_an_error_that_cannot_pass_the_error_is_raised() -> None:
    with pytest.raises(sa.exc.OperationalError):
        reconnecting(refused(), time.monotonic() + RECONNECT_PAUSE_SECONDS / 2)  # no pause left
    error = sa.exc.ProgrammingError("SELECT 1", {}, Exception("syntax error"))
    for until in (None, time.monotonic() + RECONNECT_SECONDS):
        with pytest.raises(sa.exc.ProgrammingError):
            reconnecting(error, until)  # never passes: not tried again
