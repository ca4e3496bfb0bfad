"""Job isolation: which jobs a backend call started, and how often a job's daemon died under it.

``started_at`` is set when a backend call starts the job's attempt (the claim clears it), so the
lease rescue can give back, unspent, the attempt of a batch-mate that never ran. ``lease_losses``
counts the attempts that ended with the lease lost while the job ran (its daemon died or stalled)
or with the time limit; a job with any runs alone. Both have a server default or are nullable,
so a row inserted with only the specification's columns is claimed like any other.

Revision ID: 004
Revises: 003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dgxqueue.storage.models import UTCDateTime

revision = "004"
down_revision = "003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("started_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("lease_losses", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    # recreate="never": SQLite 3.35+ drops columns in place, keeping the indexes as they are.
    with op.batch_alter_table("generations", recreate="never") as batch:
        batch.drop_column("lease_losses")
        batch.drop_column("started_at")
