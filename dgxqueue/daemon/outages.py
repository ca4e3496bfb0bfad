"""Skip a step of the daemon while the database stays unavailable, and say so.

Every queue call (:class:`~dgxqueue.daemon.queue_client.QueueClient`) has already retried through brief
hiccups; what still fails is an outage, and most steps (a heartbeat, a rescue, a sweep, an
early write) are made up for by a later round, or by the lease rescue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from structlog.typing import FilteringBoundLogger

from dgxqueue.storage.dberrors import is_transient_db_error


@contextlib.contextmanager
def outage_skips(log: FilteringBoundLogger, message: str, *, to_rescue: bool = False, **context: Any) -> Iterator[None]:
    """Skip the rest of the block when the database stays unavailable: the next round makes up
    for the step or, with ``to_rescue`` (logged as an error), the lease rescue does, later.
    Other errors pass."""
    try:
        yield
    except Exception as exc:
        if not is_transient_db_error(exc):
            raise
        (log.error if to_rescue else log.warning)(message, error=str(exc)[:300], **context)
