"""Producer and operator features: progress, cancelling a running job, dedupe, expiry, pause, and
a registry of live daemons.

Every new column of ``generations`` is nullable, so a row inserted by plain SQL with only the
specification's columns runs as before. ``progress_done``/``progress_total`` are the latest steps a
generator reported for the running attempt (written with the heartbeat); ``cancel_requested_at`` is
set by a cancel of a running job, which its daemon notices; ``cancelled_at`` and ``expired_at`` say
why a failed job ended (counted apart from failures); ``expires_at`` is when a still-pending job
is no longer wanted; ``dedupe_key``: at most one unfinished job holds a key (a partial unique
index). ``paused_models`` lists the models no daemon claims; ``daemons`` is the registry of live
daemons, each row refreshed by its heartbeat and removed on a clean stop.

Revision ID: 005
Revises: 004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dgxqueue.storage.models import UTCDateTime

revision = "005"
down_revision = "004"
branch_labels = None
depends_on = None

_UNFINISHED = "status IN ('pending', 'processing') AND dedupe_key IS NOT NULL"
_EXPIRING = "status = 'pending' AND expires_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("progress_done", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_total", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("cancel_requested_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("cancelled_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("expires_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("expired_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("dedupe_key", sa.Text(), nullable=True))
    op.create_index("uq_generations_dedupe_key", "generations", ["dedupe_key"], unique=True,
                    sqlite_where=sa.text(_UNFINISHED), postgresql_where=sa.text(_UNFINISHED))
    op.create_index("idx_generations_expires_at", "generations", ["expires_at"],
                    sqlite_where=sa.text(_EXPIRING), postgresql_where=sa.text(_EXPIRING))
    op.create_table(
        "paused_models",
        sa.Column("model_name", sa.Text(), primary_key=True),
        sa.Column("paused_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_table(
        "daemons",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("generator", sa.Text(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),  # JSON list of model names
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("holding", sa.Text(), nullable=True),  # JSON list of the job ids it holds
    )


def downgrade() -> None:
    op.drop_table("daemons")
    op.drop_table("paused_models")
    op.drop_index("idx_generations_expires_at", table_name="generations")
    op.drop_index("uq_generations_dedupe_key", table_name="generations")
    with op.batch_alter_table("generations", recreate="never") as batch:
        for name in ("dedupe_key", "expired_at", "expires_at", "cancelled_at", "cancel_requested_at",
                     "progress_total", "progress_done"):
            batch.drop_column(name)
