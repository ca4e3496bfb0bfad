"""The registry of live daemons keeps the same rules on SQLite, PostgreSQL and in memory: an entry
is live for a lease after its last refresh, then stale (listed only when asked), and forgotten
FORGET_AFTER_LEASES leases after its last refresh; a clean stop removes it."""

from __future__ import annotations

from datetime import timedelta

from dgxqueue.storage.registry import FORGET_AFTER_LEASES, DaemonEntry
from tests.support.queues import LEASE, MODEL, QueueBackend

LEASE_S = LEASE.total_seconds()


def entry(worker_id: str, models: tuple[str, ...] = (MODEL,)) -> DaemonEntry:
    return DaemonEntry(id=worker_id, host="gpu-host", pid=4242, generator="scripted", models=models,
                       version="1.2.3")


def test_register__a_live_entry_with_its_fields(backend: QueueBackend) -> None:
    """A registered daemon is listed live with what it said of itself, times from the queue's clock."""
    queue = backend.queue("w1", models=("b", "a"))
    before = backend.now()
    queue.register(entry("w1", models=("a", "b")))
    [daemon] = backend.daemons()
    assert (daemon.id, daemon.host, daemon.pid, daemon.generator, daemon.models, daemon.version) == (
        "w1", "gpu-host", 4242, "scripted", ("a", "b"), "1.2.3")
    assert daemon.holding == () and not daemon.stale
    assert daemon.started_at == daemon.heartbeat_at
    assert abs((daemon.started_at - before).total_seconds()) < 5
    assert abs((daemon.expires_at - daemon.heartbeat_at - LEASE).total_seconds()) < 1
    assert daemon.heartbeat_age < timedelta(seconds=5)


def test_refresh__records_what_it_holds_and_moves_the_expiry(backend: QueueBackend) -> None:
    """A refresh moves the heartbeat and expiry on and records the held job ids; an entry that is
    gone reports False so the daemon registers again."""
    queue = backend.queue("w1")
    queue.register(entry("w1"))
    backend.advance(LEASE_S / 2)
    assert queue.refresh_registration(["job-1", "job-2"]) is True
    [daemon] = backend.daemons()
    assert daemon.holding == ("job-1", "job-2")
    assert daemon.heartbeat_at - daemon.started_at > timedelta(seconds=LEASE_S / 2 - 1)
    queue.unregister()
    assert backend.daemons(include_stale=True) == []
    assert queue.refresh_registration([]) is False


def test_stale__after_a_lease_without_refresh_listed_only_when_asked(backend: QueueBackend) -> None:
    """An entry not refreshed for a lease is stale: not live, but listed (marked) with include_stale."""
    dead, alive = backend.queue("dead"), backend.queue("alive")
    dead.register(entry("dead"))
    alive.register(entry("alive"))
    backend.advance(LEASE_S + 5)
    alive.refresh_registration([])
    assert [d.id for d in backend.daemons()] == ["alive"]
    listed = {d.id: d for d in backend.daemons(include_stale=True)}
    assert listed["dead"].stale and not listed["alive"].stale
    assert listed["dead"].heartbeat_age > LEASE


def test_forget_dead__only_entries_stale_long_enough(backend: QueueBackend) -> None:
    """Any daemon forgets entries FORGET_AFTER_LEASES leases past their last refresh, never a live
    one or one stale for less."""
    dead, recent, me = backend.queue("dead"), backend.queue("recent"), backend.queue("me")
    dead.register(entry("dead"))
    backend.advance(LEASE_S * (FORGET_AFTER_LEASES - 1))
    recent.register(entry("recent"))
    backend.advance(LEASE_S + 5)
    me.register(entry("me"))
    assert me.forget_dead_daemons() == ["dead"]
    assert sorted(d.id for d in backend.daemons(include_stale=True)) == ["me", "recent"]
    assert me.forget_dead_daemons() == []


def test_register__again_replaces_the_entry(backend: QueueBackend) -> None:
    """Registering an id again (after its entry was forgotten, or twice) leaves one entry."""
    queue = backend.queue("w1")
    queue.register(entry("w1"))
    queue.register(entry("w1", models=("other",)))
    [daemon] = backend.daemons()
    assert daemon.models == ("other",)
