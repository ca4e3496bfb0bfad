"""The registry of live daemons: the ``daemons`` table, one row per running daemon.

A daemon registers itself when it starts (:func:`register`), refreshes its row with each lease
heartbeat (:func:`refresh`: one UPDATE by primary key) and deletes it on a clean stop
(:func:`unregister`). Every time is the database's clock, as the leases' are. A row whose
``expires_at`` has passed is *stale*: its daemon died or cannot reach the database; it is never
counted live, and any daemon's rescuer deletes it :data:`FORGET_AFTER_LEASES` lease periods
after its last heartbeat (:func:`forget_dead`), until then ``dgxqueue workers --all`` shows it.

The registry is observability, not the job: the daemon logs a failed registry write and goes on.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningDelete

from dgxqueue.storage.engines import Profile, profile_of
from dgxqueue.storage.models import DaemonRecord, as_utc

__all__ = ["FORGET_AFTER_LEASES", "DaemonEntry", "LiveDaemon", "daemons", "forget_dead", "live_per_model",
           "refresh", "register", "unregister"]

D = cast(sa.Table, DaemonRecord.__table__)
#: A stale row is deleted this many lease periods after its last heartbeat (it goes stale after one).
FORGET_AFTER_LEASES = 5


@dataclass(frozen=True)
class DaemonEntry:
    """What a daemon says of itself when it registers."""

    id: str  # its worker_id
    host: str
    pid: int
    generator: str
    models: tuple[str, ...]
    version: str


@dataclass(frozen=True)
class LiveDaemon:
    """A registry row as read, with its age by the database's clock."""

    id: str
    host: str
    pid: int
    generator: str
    models: tuple[str, ...]
    version: str
    started_at: datetime
    heartbeat_at: datetime
    expires_at: datetime
    holding: tuple[str, ...]
    heartbeat_age: timedelta  # the database's now minus heartbeat_at
    stale: bool  # past expires_at: not live

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "pid": self.pid, "generator": self.generator,
                "models": list(self.models), "version": self.version, "started_at": _iso(self.started_at),
                "heartbeat_at": _iso(self.heartbeat_at), "expires_at": _iso(self.expires_at),
                "heartbeat_age_seconds": round(self.heartbeat_age.total_seconds(), 3),
                "holding": list(self.holding), "stale": self.stale}


def _iso(value: object) -> str:
    """A time in ISO form; anything else (plain SQL wrote a non-time on SQLite) as its text."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _seconds(lease: timedelta) -> sa.ColumnElement[float]:
    return sa.literal(lease.total_seconds(), sa.Float)


def register(session: Session, entry: DaemonEntry, *, lease: timedelta) -> None:
    """Insert ``entry``'s row (or replace one of the same id), live for one ``lease`` period."""
    profile = profile_of(session.get_bind().dialect)
    now, until = profile.now(), profile.later(_seconds(lease))
    values: dict[str, Any] = {
        "id": entry.id, "host": entry.host, "pid": entry.pid, "generator": entry.generator,
        "models": json.dumps(list(entry.models)), "version": entry.version,
        "started_at": now, "heartbeat_at": now, "expires_at": until, "holding": "[]",
    }
    insert = profile.insert(D).values(**values)
    session.execute(insert.on_conflict_do_update(
        index_elements=[D.c.id], set_={k: v for k, v in values.items() if k != "id"}))


def refresh(session: Session, worker_id: str, holding: list[str], *, lease: timedelta) -> bool:
    """Move the row's heartbeat to now and its expiry one ``lease`` on, and record the jobs it
    holds; False if the row is gone (a rescuer forgot it during a long outage): register again."""
    statement = _refresh_statement(profile_of(session.get_bind().dialect))
    result = session.execute(statement, {"r_id": worker_id, "r_lease": lease.total_seconds(),
                                         "r_holding": json.dumps(holding)})
    return cast(sa.CursorResult[Any], result).rowcount > 0


@functools.cache
def _refresh_statement(profile: Profile) -> sa.Update:
    """:func:`refresh`'s update, built once per engine: a daemon runs it at every heartbeat, and
    constructing it cost more than running it on SQLite."""
    lease = sa.bindparam("r_lease", type_=sa.Float)
    return (sa.update(D).where(D.c.id == sa.bindparam("r_id", type_=sa.Text))
            .values(heartbeat_at=profile.now(), expires_at=profile.later(lease),
                    holding=sa.bindparam("r_holding", type_=sa.Text)))


def unregister(session: Session, worker_id: str) -> None:
    """Delete the daemon's row (a clean stop)."""
    session.execute(sa.delete(D).where(D.c.id == worker_id))


def forget_dead(session: Session, *, lease: timedelta) -> list[str]:
    """Delete the rows whose last heartbeat is :data:`FORGET_AFTER_LEASES` leases old; their ids."""
    # expires_at is one lease after the heartbeat, so the rest of the wait is counted from it.
    after = (-lease * (FORGET_AFTER_LEASES - 1)).total_seconds()
    statement = _forget_statement(profile_of(session.get_bind().dialect))
    return list(session.execute(statement, {"f_after": after}).scalars())


@functools.cache
def _forget_statement(profile: Profile) -> ReturningDelete[Any]:
    """:func:`forget_dead`'s delete, built once per engine (every daemon's rescuer runs it every round)."""
    cutoff = profile.later(sa.bindparam("f_after", type_=sa.Float))
    expires = profile.comparable_time(D.c.expires_at)
    gone = sa.or_(expires < cutoff, profile.not_a_time(D.c.expires_at), D.c.expires_at.is_(None))
    return sa.delete(D).where(gone).returning(D.c.id)


def _names(text: object) -> tuple[str, ...]:
    """A JSON list of names as stored; anything else (plain SQL) as one name, its text."""
    if text is None:
        return ()
    try:
        value = json.loads(str(text))
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the decoder goes
        return (str(text),)
    return tuple(str(item) for item in value) if isinstance(value, list) else (str(value),)


def daemons(session: Session, *, include_stale: bool = False) -> list[LiveDaemon]:
    """The registered daemons, live ones only unless ``include_stale``, oldest first."""
    profile = profile_of(session.get_bind().dialect)
    now = profile.now()
    stale = sa.or_(profile.comparable_time(D.c.expires_at) < now, profile.not_a_time(D.c.expires_at))
    query = sa.select(D, now.label("now"), stale.label("stale")).order_by(D.c.started_at, D.c.id)
    if not include_stale:
        query = query.where(sa.not_(stale))
    found = []
    for row in session.execute(query).mappings():
        at, heartbeat = row["now"], row["heartbeat_at"]
        age = as_utc(at) - as_utc(heartbeat) if isinstance(at, datetime) and isinstance(heartbeat, datetime) \
            else timedelta(0)
        found.append(LiveDaemon(
            id=str(row["id"]), host=str(row["host"]), pid=row["pid"], generator=str(row["generator"]),
            models=_names(row["models"]), version=str(row["version"]), started_at=row["started_at"],
            heartbeat_at=heartbeat, expires_at=row["expires_at"], holding=_names(row["holding"]),
            heartbeat_age=max(age, timedelta(0)), stale=bool(row["stale"]),
        ))
    return found


def live_per_model(session: Session) -> dict[str, int]:
    """How many live daemons serve each model (models no live daemon serves are left out)."""
    return dict(Counter(model for daemon in daemons(session) for model in set(daemon.models)))
