"""Review: rules of the queue the main conformance suite did not hold all three backends to."""

from __future__ import annotations

import json

from tests.support.queues import QueueBackend, completed

#: Key order, a float that is a whole number, -0.0, a big int and a float at the limits: what
#: PostgreSQL's jsonb normalises (sorts keys, 1e+20 becomes the int 100000000000000000000).
ODD = {"z": 1, "a": 1e20, "n": -0.0, "f": 0.1, "big": 10**30, "tiny": 5e-324,
       "nested": {"y": [1.0, True, None], "b": "\u00fc\U0001f600"}}


def test_finish__keeps_the_metadata_as_given(backend: QueueBackend) -> None:
    """A completion's metadata reads back as the daemon wrote it, as the producer's insert keeps
    a job's: key order, floats and ints, on every backend."""
    job_id = backend.enqueue("odd metadata", metadata=ODD)
    assert json.dumps(backend.row(job_id)["metadata"]) == json.dumps(ODD)
    queue = backend.queue("me")
    [job] = queue.claim(1)
    assert queue.finish([completed(job, metadata=ODD)]) == [True]
    assert json.dumps(backend.row(job_id)["metadata"]) == json.dumps(ODD)
