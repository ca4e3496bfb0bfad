"""Process bodies for multi-process tests, and :func:`run_in_processes`, which starts them.

They run in processes forked from multiprocessing's fork server (the 'forkserver' context), so they
live here, importable. The server imports this module, dgxqueue and the database drivers once per
test worker: each process is then a fresh fork of a single-threaded server, not a fresh interpreter
that spends most of a second on imports before its real work. The server keeps the environment of
the worker's first caller, so each child is given its caller's environment before its body runs (as
a spawned process would have been) and re-reads what reads it at import; a caller whose start-up
variables differ from the server's (``TMPDIR``, ``PYTHON*``, ... read while the server imported)
gets spawned processes instead.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from tests.support.zygote import startup_key, take_environment


def enqueue_many_times(url: str, prompt: str, times: int, barrier: Any, results: Any) -> None:
    """Warm up, wait for every sibling at ``barrier``, then enqueue ``prompt`` ``times`` times.

    One ``dgxqueue.enqueue`` (one transaction) per job. Puts ("ok", n) or ("error", traceback).
    """
    try:
        import dgxqueue
        from dgxqueue.config import load_settings
        from dgxqueue.storage import init_db

        init_db(url)  # engine, pool and schema check ready before the start line
        settings = load_settings(env={})
        barrier.wait(timeout=60)
        for _ in range(times):
            dgxqueue.enqueue(prompt, database_url=url, settings=settings)
        results.put(("ok", times))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def enqueue_with_key(url: str, key: str, times: int, barrier: Any, results: Any) -> None:
    """Warm up, wait for every sibling at ``barrier``, then enqueue ``times`` jobs with dedupe key
    ``key``, one transaction each. Puts ("ok", the ids returned) or ("error", traceback)."""
    try:
        import dgxqueue
        from dgxqueue.config import load_settings
        from dgxqueue.storage import init_db

        init_db(url)
        settings = load_settings(env={})
        barrier.wait(timeout=60)
        ids = [dgxqueue.enqueue("deduplicated", dedupe_key=key, database_url=url, settings=settings)
               for _ in range(times)]
        results.put(("ok", ids))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def enqueue_keyed_batches(url: str, keys: list[str], times: int, barrier: Any, results: Any) -> None:
    """Warm up, wait for every sibling at ``barrier``, then ``times`` times enqueue one batch
    (one transaction) holding a job for each key of ``keys``, in that order, after marking the
    previous round's jobs finished. Puts ("ok", the batches' ids) or ("error", traceback)."""
    try:
        import dgxqueue
        from dgxqueue.config import load_settings
        from dgxqueue.storage import init_db

        init_db(url)
        settings = load_settings(env={})
        barrier.wait(timeout=60)
        batches = [dgxqueue.enqueue_many([{"prompt": "batch", "dedupe_key": f"{key}-{i}"} for key in keys],
                                         database_url=url, settings=settings) for i in range(times)]
        results.put(("ok", batches))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def init_db_at_once(url: str, barrier: Any, results: Any) -> None:
    """Wait for every sibling at ``barrier``, then run ``init_db(url)``. Puts the revision or the error."""
    try:
        from dgxqueue.storage import ensure_schema, get_engine

        engine = get_engine(url)
        barrier.wait(timeout=60)
        results.put(("ok", ensure_schema(engine)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def report_environment(name: str, barrier: Any, results: Any) -> None:
    """Put ("ok", the value of environment variable ``name`` or None): what a child was given."""
    barrier.wait(timeout=60)
    results.put(("ok", os.environ.get(name)))


def _as_caller(env: dict[str, str], target: Any, *args: Any) -> None:
    """In a child forked from the server: the caller's environment, then ``target(*args)``."""
    take_environment(env)
    target(*args)


#: The start-up variables of this worker's fork server (those of its first caller); None before.
_server_startup: tuple[tuple[str, str], ...] | None = None


#: What the fork server imports before it forks (a module that is not installed is skipped).
_PRELOAD = ["tests.support.producers", "dgxqueue", "dgxqueue.config", "dgxqueue.storage", "psycopg",
            "sqlalchemy.dialects.postgresql.psycopg", "sqlalchemy.dialects.sqlite", "alembic.command"]


def run_in_processes(target: Any, args_for: list[tuple[Any, ...]], timeout: float = 120) -> list[Any]:
    """Run ``target(*args, barrier, results)`` in one forked process per args tuple; their results.

    Every process meets the others at a barrier before its real work. Fails (AssertionError) when a
    process reports an error, exits non-zero or outlives ``timeout``.
    """
    import multiprocessing
    import queue

    global _server_startup
    env = dict(os.environ)
    if _server_startup is None:
        _server_startup = startup_key(env)  # the server starts below, with this environment
    if startup_key(env) == _server_startup:
        ctx: Any = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts: at this worker's first call
    else:  # the preloaded modules read other start-up variables: a fresh interpreter reads these
        ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args_for))
    results = ctx.Queue()
    processes = [ctx.Process(target=_as_caller, args=(env, target, *args, barrier, results)) for args in args_for]
    for process in processes:
        process.start()
    outcomes: list[tuple[str, Any]] = []
    try:
        for _ in processes:
            outcomes.append(results.get(timeout=timeout))
    except queue.Empty:
        answered = f"only {len(outcomes)} of {len(processes)} processes answered: {outcomes}"
        raise AssertionError(answered) from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    errors = [detail for status, detail in outcomes if status != "ok"]
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in processes] == [0] * len(processes)
    return [detail for _, detail in outcomes]
