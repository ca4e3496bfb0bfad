"""Queue columns: priority, attempts, schedule, and the lease that fences a job's outcome.

Every column has a server default or is nullable, so a row inserted with only the
specification's columns (plain SQL, another language) is claimed like any other.

Revision ID: 002
Revises: 001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dgxqueue.storage.models import UTCDateTime

revision = "002"
down_revision = "001"
branch_labels = None
depends_on = None

PENDING = sa.text("status = 'pending'")
PROCESSING = sa.text("status = 'processing'")


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("max_attempts", sa.Integer(), server_default="3", nullable=False))
        batch.add_column(sa.Column("run_after", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("worker_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("claimed_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime(), nullable=True))
    op.create_index(
        "idx_generations_claim", "generations",
        ["model_name", sa.column("priority").desc(), "created_at"],
        sqlite_where=PENDING, postgresql_where=PENDING,
    )
    op.create_index(
        "idx_generations_lease", "generations", ["lease_expires_at"],
        sqlite_where=PROCESSING, postgresql_where=PROCESSING,
    )


def downgrade() -> None:
    op.drop_index("idx_generations_lease", table_name="generations")
    op.drop_index("idx_generations_claim", table_name="generations")
    # recreate="never": SQLite 3.35+ drops columns in place, keeping the other indexes as they are.
    with op.batch_alter_table("generations", recreate="never") as batch:
        for column in ("lease_expires_at", "claimed_at", "worker_id", "run_after",
                       "max_attempts", "attempts", "priority"):
            batch.drop_column(column)
