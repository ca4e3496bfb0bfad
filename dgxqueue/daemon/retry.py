"""Retry decisions: a pure function of the attempt number and the error, stored in the row.

Job retries are rows going back to ``pending`` with a ``run_after`` in the future, not a loop in
memory, so a daemon that dies between attempts loses nothing. (tenacity, in ``daemon/queue_client.py``, only
retries short database calls.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from dgxqueue.config import WorkerSettings
from dgxqueue.errors import GeneratorError, OutputError, text_of


@dataclass(frozen=True)
class Decision:
    """``retry`` after ``backoff`` (counted from the database's now when the result is written,
    not the daemon's clock, which may be off), or ``fail`` for good."""

    retry: bool
    backoff: timedelta | None
    message: str


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, capped, scaled by 0.5..1."""
    # The exponent is bounded: a row written by plain SQL may count thousands of attempts, and
    # 2**1100 does not convert to a float (OverflowError killed the daemon); 2.0**1000 is past any cap.
    delay = min(cap, base * 2.0 ** min(max(0, attempt - 1), 1000))
    return float(delay * (0.5 + rng.random() / 2))


def is_transient(error: BaseException, settings: WorkerSettings) -> bool:
    """Backend errors say so themselves; a failed write is final; unexpected ones follow the config."""
    if isinstance(error, GeneratorError):
        return error.transient
    if isinstance(error, OutputError):
        return False
    return settings.retry_unexpected_errors


#: How a job given back after a machine fault is marked in its row's ``error_message``.
MACHINE_FAULT_MARK = "machine fault ("


def describe(error: BaseException) -> str:
    text = text_of(error) or type(error).__name__
    if not isinstance(error, GeneratorError):
        text = f"{type(error).__name__}: {text}"
    return text[:4000]


def decide(
    error: BaseException,
    *,
    attempt: int,
    max_attempts: int,
    settings: WorkerSettings,
    rng: random.Random,
) -> Decision:
    """Retry a transient error while attempts remain; otherwise fail with the last error."""
    message = describe(error)
    if not is_transient(error, settings):
        return Decision(False, None, message)
    if attempt >= max_attempts:
        return Decision(False, None, f"{message} (gave up after {attempt} attempts)")
    delay = backoff_seconds(attempt, settings.backoff_base_seconds, settings.backoff_max_seconds, rng)
    return Decision(True, timedelta(seconds=delay), f"{message} (attempt {attempt}, retrying)")
