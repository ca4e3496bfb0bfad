"""A trigger that counts completions, to prove each job's outcome is written once."""

from __future__ import annotations

import sqlalchemy as sa

from dgxqueue.storage import get_engine


def count_completions(url: str) -> None:
    """Log every write that marks a job completed into a ``completions`` table."""
    with get_engine(url).begin() as conn:
        conn.execute(sa.text("CREATE TABLE completions (id TEXT NOT NULL)"))
        if conn.dialect.name == "sqlite":
            conn.execute(sa.text(
                "CREATE TRIGGER log_completion AFTER UPDATE OF status ON generations"
                " WHEN NEW.status = 'completed' BEGIN INSERT INTO completions VALUES (NEW.id); END"))
        else:
            conn.execute(sa.text(
                "CREATE FUNCTION log_completion() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN INSERT INTO completions VALUES (NEW.id); RETURN NEW; END $$"))
            conn.execute(sa.text(
                "CREATE TRIGGER log_completion AFTER UPDATE OF status ON generations FOR EACH ROW"
                " WHEN (NEW.status = 'completed') EXECUTE FUNCTION log_completion()"))
