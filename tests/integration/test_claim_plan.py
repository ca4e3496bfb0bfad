"""The claim's query plan: the partial claim index, never a scan of every pending row."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from dgxqueue.storage import create_generations, queue, session_scope
from dgxqueue.storage.engines import profile_of


def test_claim_plan__uses_claim_index_without_statistics(engine: sa.Engine) -> None:
    """Without ANALYZE, the claim reads idx_generations_claim and finds rows by primary key."""
    with session_scope(engine) as s:
        create_generations(s, [{"prompt": f"p{i}", "model_name": "m"} for i in range(2000)])
    statement = queue.claim_statement(profile_of(engine.dialect), 1)
    compiled = statement.compile(dialect=engine.dialect)
    params = compiled.construct_params(queue.claim_parameters(
        worker_id="w", models=["m"], limit=1, lease=timedelta(seconds=60)))
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan_rows = conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + compiled.string,
                tuple(compiled.construct_params(params)[name] for name in compiled.positiontup or ()),
            ).all()
            plan = "\n".join(str(row[-1]) for row in plan_rows)
            assert "idx_generations_status" not in plan, plan
        else:
            conn.exec_driver_sql("SET enable_seqscan = off")  # tiny tables: show what it would use
            processed = {
                name: compiled.binds[name].type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
                for name in params
            }
            values = {k: v if (process := processed[k]) is None else process(v) for k, v in params.items()}
            plan = "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + compiled.string, values))
            conn.rollback()
        assert "idx_generations_claim" in plan, plan
