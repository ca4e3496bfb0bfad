"""Each job writes its own file: a unique index on ``generations.file_path``.

Two rows with one ``file_path`` made two jobs write one WAV: the later job's audio replaced the
earlier job's finished file while both rows said completed. The index refuses the second row when
it is inserted (the producer's door names the field and the job that holds the path; an insert by
plain SQL fails). A failed job holds no path (it never wrote its file: a WAV is renamed into place
only with a completed outcome), so the index is partial; a retry of one whose path another job
took since is refused. On PostgreSQL it indexes ``md5(file_path)``: a b-tree entry holds at most
about 2,700 bytes and a path may have 4,095 (the engine profile's ``path_key``). A database that
already holds unfailed rows sharing a path is not migrated: the error names them, since no rule
here can say which job's file is the one on disk.

Revision ID: 007
Revises: 006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dgxqueue.errors import SchemaError
from dgxqueue.storage.engines import profile_of

revision = "007"
down_revision = "006"
branch_labels = None
depends_on = None

INDEX = "uq_generations_file_path"
_HOLDS_ITS_FILE = "status <> 'failed'"  # as dgxqueue.storage.models.HOLDS_ITS_FILE_SQL is today
_SHOWN = 3  # shared paths the refusal names


def _refuse_shared_paths() -> None:
    generations = sa.table("generations", sa.column("id", sa.Text), sa.column("file_path", sa.Text))
    holders = sa.text(_HOLDS_ITS_FILE)
    shared = (sa.select(generations.c.file_path).where(holders).group_by(generations.c.file_path)
              .having(sa.func.count() > 1).order_by(generations.c.file_path))
    bind = op.get_bind()
    paths = list(bind.execute(shared.limit(_SHOWN + 1)).scalars())
    if not paths:
        return
    examples = []
    for path in paths[:_SHOWN]:
        ids = bind.execute(sa.select(generations.c.id).where(generations.c.file_path == path, holders)
                           .order_by(generations.c.id).limit(4)).scalars().all()
        examples.append(f"{path!r} (jobs {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})")
    more = " and more" if len(paths) > _SHOWN else ""
    raise SchemaError(
        f"migration 007 gives each job its own file, but jobs here that have not failed share a file_path: "
        f"{'; '.join(examples)}{more}. "
        "Only the last to finish has its audio in that file. Give each of those rows its own file_path, or delete "
        "the ones you do not need, then run 'dgxqueue db upgrade' again")


def upgrade() -> None:
    _refuse_shared_paths()
    key = profile_of(op.get_context().dialect).path_key(sa.column("file_path", sa.Text))
    op.create_index(INDEX, "generations", [key], unique=True, sqlite_where=sa.text(_HOLDS_ITS_FILE),
                    postgresql_where=sa.text(_HOLDS_ITS_FILE))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="generations")
