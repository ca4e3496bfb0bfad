"""Each job writes its own file (migration 007), on SQLite, PostgreSQL and the in-memory queue: a
second job naming a file another job writes to is refused at the door, naming the field and the
holder, and nothing of its batch is written; the same request deduplicated is not a second job."""

from __future__ import annotations

import pytest

from dgxqueue.errors import ValidationError
from tests.support.queues import QueueBackend, completed, failed

SONG = "outputs/song.wav"


def _refused(backend: QueueBackend, call: object, *words: str) -> ValidationError:
    before = backend.count()
    with pytest.raises(ValidationError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.field == "file_path", caught.value
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert backend.count() == before
    return caught.value


def test_file_path__a_second_job_for_a_taken_file_is_refused_naming_its_holder(backend: QueueBackend) -> None:
    """Whether the holder is pending, running or completed, the second job is refused; its
    message names the holder and its status."""
    holder = backend.enqueue("first", file_path=SONG)
    _refused(backend, lambda: backend.enqueue("second", file_path=SONG), holder, "pending", "each job's WAV its own")
    queue = backend.queue()
    [job] = queue.claim(1)
    _refused(backend, lambda: backend.enqueue("second", file_path=SONG), holder, "processing")
    queue.finish([completed(job)])
    _refused(backend, lambda: backend.enqueue("second", file_path=SONG), holder, "completed")
    assert backend.enqueue("second", file_path="outputs/other.wav") != holder


def test_file_path__a_batch_with_one_taken_file_writes_nothing(backend: QueueBackend) -> None:
    """Two jobs of one batch naming one file, or one naming a file already held: the whole batch is
    refused."""
    holder = backend.enqueue("first", file_path=SONG)
    _refused(backend, lambda: backend.enqueue_many([{"prompt": "a", "file_path": "outputs/a.wav"},
                                                    {"prompt": "b", "file_path": SONG}]), holder)
    _refused(backend, lambda: backend.enqueue_many([{"prompt": "a", "file_path": "outputs/a.wav"},
                                                    {"prompt": "b", "file_path": "outputs/a.wav"}]),
             "'outputs/a.wav'", "of this batch")
    assert len(backend.enqueue_many([{"prompt": "a", "file_path": "outputs/a.wav"},
                                     {"prompt": "b", "file_path": "outputs/b.wav"}])) == 2


def test_file_path__the_same_keyed_request_again_is_its_holder_not_a_refusal(backend: QueueBackend) -> None:
    """Dedupe comes first: the same request with the same key and file returns the job that holds
    the key (alone or twice in one batch). Another key naming the held file is refused."""
    holder = backend.enqueue("song", dedupe_key="k", file_path=SONG)
    assert backend.enqueue("song", dedupe_key="k", file_path=SONG) == holder
    twice = {"prompt": "song", "dedupe_key": "k2", "file_path": "outputs/two.wav"}
    pair = backend.enqueue_many([twice, twice])
    assert pair[0] == pair[1] and backend.enqueue("song", dedupe_key="k2", file_path="outputs/two.wav") == pair[0]
    _refused(backend, lambda: backend.enqueue("other", dedupe_key="k3", file_path=SONG), "'outputs/song.wav'")


def test_file_path__a_failed_job_holds_no_file(backend: QueueBackend) -> None:
    """A failed job never wrote its file (a WAV is renamed into place only with a completed
    outcome): a new job may name its path, whether it failed in a daemon or was cancelled."""
    queue = backend.queue()
    broken = backend.enqueue("broken", file_path=SONG)
    [job] = queue.claim(1)
    queue.finish([failed(job)])
    assert backend.row(broken)["status"] == "failed"
    again = backend.enqueue("fixed", file_path=SONG)
    assert backend.cancel(again) == "failed"
    third = backend.enqueue("third", file_path=SONG)
    assert len({broken, again, third}) == 3 and backend.row(third)["status"] == "pending"


def test_file_path__a_keyed_request_again_after_its_holder_expired_takes_the_file(backend: QueueBackend) -> None:
    """The same keyed request for the same file, after its pending holder passed its expiry
    unswept: the enqueue expires the holder (which never ran, so wrote no file) and the new job
    takes both the key and the file."""
    first = backend.enqueue("song", dedupe_key="k", file_path=SONG, ttl=60)
    backend.advance(61)
    second = backend.enqueue("song", dedupe_key="k", file_path=SONG)
    assert second != first and backend.row(first)["status"] == "failed"
    assert backend.row(second)["status"] == "pending" and backend.row(second)["file_path"] == SONG



def test_file_path__a_batch_naming_the_file_of_a_holder_it_expires_is_refused_as_on_the_databases(
        backend: QueueBackend) -> None:
    """A batch whose keyed job expires its key's holder (pending past its expiry, unswept) and
    whose plain job names that holder's file: the door looks the file up before any insert, while
    the holder is still pending, so the batch is refused naming it and nothing is written, the
    holder included (the in-memory queue let the plain job take the file)."""
    holder = backend.enqueue("song", dedupe_key="k", file_path=SONG, ttl=60)
    backend.advance(61)
    _refused(backend, lambda: backend.enqueue_many([{"prompt": "song", "dedupe_key": "k", "file_path": "outputs/k.wav"},
                                                    {"prompt": "plain", "file_path": SONG}]), holder, "pending")
    assert backend.row(holder)["status"] == "pending"
