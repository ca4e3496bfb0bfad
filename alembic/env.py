"""alembic environment: the URL comes from dgxqueue (``$DATABASE_URL`` or the default file)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from dgxqueue.storage.database import create_engine, resolve_url
from dgxqueue.storage.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

#: Objects no model describes, each built per engine: migration 006's search index (on SQLite an
#: FTS5 table and its shadow tables, generations_search_data, _idx, ...; on PostgreSQL an index on an
#: expression) and migration 007's file-path index (on PostgreSQL, on md5 of the path).
UNMODELLED = ("generations_search", "idx_generations_prompt_search", "uq_generations_file_path")


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate (``alembic check``) compares everything but the objects built per engine."""
    return not (name or "").startswith(UNMODELLED)


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=True,  # SQLite can only alter tables by copying them
        include_name=_include_name,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(url=resolve_url(config.attributes.get("database_url")), literal_binds=True,
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # called from dgxqueue.storage.database (init_db, the CLI)
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.attributes.get("database_url"))
    with engine.connect() as conn:
        _configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
