"""PostgreSQL: the prompts id sequence follows ids inserted by hand.

The specification's example records insert prompts with explicit ids (1, 2). PostgreSQL's
sequence does not see them, so the next prompts counted through the API took ids 1 and 2 again
and failed on the primary key. A statement-level trigger moves the sequence past the highest id
an INSERT wrote whenever that id is ahead of it; the API's own inserts never are, so for them
it only reads the inserted rows. SQLite needs nothing: AUTOINCREMENT already takes the highest
id in the table into account.

Revision ID: 003
Revises: 002
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "003"
down_revision = "002"
branch_labels = None
depends_on = None

def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    # OR REPLACE: `db reset` drops the tables (and so the trigger) but leaves the function.
    op.execute("""
        CREATE OR REPLACE FUNCTION dgxqueue_prompts_id_follows() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            seq regclass := pg_get_serial_sequence(quote_ident(TG_TABLE_SCHEMA) || '.prompts', 'id');
            top integer;
        BEGIN
            SELECT max(id) INTO top FROM inserted;
            IF top > coalesce(pg_sequence_last_value(seq), 0) THEN
                PERFORM setval(seq, top);
            END IF;
            RETURN NULL;
        END
        $$""")
    op.execute("""
        CREATE TRIGGER prompts_id_follows AFTER INSERT ON prompts
        REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION dgxqueue_prompts_id_follows()""")
    # Ids inserted by hand before this migration.
    op.execute("""
        SELECT setval(pg_get_serial_sequence('prompts', 'id'), max(id)) FROM prompts
        HAVING max(id) > coalesce(pg_sequence_last_value(pg_get_serial_sequence('prompts', 'id')::regclass), 0)""")


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER prompts_id_follows ON prompts")
    op.execute("DROP FUNCTION IF EXISTS dgxqueue_prompts_id_follows()")
