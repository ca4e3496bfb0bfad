"""Initial schema: the user's generations and prompts tables, exactly as specified.

Revision ID: 001
Revises:
Create Date: 2025-11-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dgxqueue.storage.models import UTCDateTime

revision = "001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("file_size_bytes", sa.Integer(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("generation_time_seconds", sa.Float(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generations")),
    )
    op.create_index("idx_generations_status", "generations", ["status"])
    op.create_index("idx_generations_created_at", "generations", [sa.column("created_at").desc()])
    op.create_index("idx_generations_model_name", "generations", ["model_name"])
    op.create_index("idx_generations_completed_at", "generations", [sa.column("completed_at").desc()])

    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("used_count", sa.Integer(), server_default="1", nullable=True),
        sa.Column("first_used_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
        sa.UniqueConstraint("text", name=op.f("uq_prompts_text")),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_prompts_text", "prompts", ["text"])


def downgrade() -> None:
    op.drop_index("idx_prompts_text", table_name="prompts")
    op.drop_table("prompts")
    op.drop_index("idx_generations_completed_at", table_name="generations")
    op.drop_index("idx_generations_model_name", table_name="generations")
    op.drop_index("idx_generations_created_at", table_name="generations")
    op.drop_index("idx_generations_status", table_name="generations")
    op.drop_table("generations")
