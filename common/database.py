"""The SQLAlchemy database base every mqvox program opens the same way: SQLite or PostgreSQL, an outage reported alike.

The worker's store (cloud_worker/storage.py), the training contributions the operator tools read
(common/worker_database.py) and the model registry (firmware_tools/release/registry.py) all build on
``Database``, so one SQLite file or PostgreSQL server holds them all, and each says "unavailable" the
same way (``StorageUnavailable``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from sqlalchemy import JSON, URL, Engine, LargeBinary, create_engine, event, func, make_url, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Session

from common.locations import Role, default_database_url, make_private_folder, make_state_folder, state_folder

SUPPORTED_URLS = "use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME"
"""What a database URL may be, for error messages."""

COLUMN_TYPES: dict[Any, Any] = {dict[str, Any]: JSON, list[dict[str, Any]]: JSON, bytes: LargeBinary}
"""Column types of the annotations every mqvox table uses: JSON documents and binary payloads."""


class StorageUnavailable(ConnectionError):
    """The database cannot be reached, or went away; ``str(error)`` names it (password masked) and says why."""


@dataclass(frozen=True)
class DatabaseSettings:
    """How any mqvox program reaches the database."""

    url: str = field(default_factory=default_database_url)
    """SQLAlchemy database URL. The default is an embedded SQLite file, ``mqvox.sqlite3`` in the worker's state
    folder (common/locations.py: ``$STATE_DIRECTORY/worker`` under systemd, else ``$MQVOX_STATE_DIR/worker``, else
    ``~/.local/state/mqvox/worker``), which the operator tools use too; a SQLite file's folder is made, mode 0700,
    when missing. ``postgresql+psycopg://user:password@host:5432/name`` for a shared server."""
    connect_timeout_s: int = 5
    """How long (seconds) to wait for a PostgreSQL server to accept a connection; libpq's minimum is 2."""
    busy_timeout_s: float = 5.0
    """How long (seconds) to wait for another program to finish writing a shared SQLite file."""


class Database:
    """One SQLAlchemy engine on SQLite or PostgreSQL, with the tables of ``tables`` created on first use."""

    tables: type[DeclarativeBase]
    """The declarative base whose tables this database needs; each subclass names its own."""

    def __init__(self, settings: DatabaseSettings | None = None) -> None:
        self.settings = settings or DatabaseSettings()
        try:
            url = make_url(self.settings.url)
        except ArgumentError:
            raise ValueError(f"{self.settings.url!r} is not a database URL: {SUPPORTED_URLS}") from None
        self.database = url.render_as_string(hide_password=True)
        """The database URL with its password masked, for messages and logs."""
        try:
            self._engine = _create_engine(url, self.settings)
        except OSError as error:  # The SQLite file's folder could not be made.
            raise StorageUnavailable(f"database {self.database} is unavailable ({error})") from error
        except NoSuchModuleError:  # SQLAlchemy knows no such dialect or driver
            raise ValueError(f"database {self.database}: unknown kind of database; {SUPPORTED_URLS}") from None
        dialect = self._engine.dialect.name
        if dialect not in _INSERTS:
            self._engine.dispose()
            raise ValueError(
                f"database {self.database}: dialect {dialect!r} is not supported, only SQLite and PostgreSQL"
            )
        self._insert: Callable[..., Any] = _INSERTS[dialect]
        """The dialect's INSERT, which has ON CONFLICT."""
        try:
            with self._unavailable_as_error("create the tables"):
                self.tables.metadata.create_all(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    def counts(self) -> dict[str, int]:
        """Rows in each table, by table name."""
        with self._unavailable_as_error("count rows"), Session(self._engine) as session:
            return {
                table.name: session.scalar(select(func.count()).select_from(table)) or 0
                for table in self.tables.metadata.sorted_tables
            }

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _unavailable_as_error(self, action: str) -> Iterator[None]:
        """Turn the driver's ways of saying 'cannot reach the database' into StorageUnavailable."""
        try:
            yield
        except (OperationalError, InterfaceError, PoolTimeoutError) as error:
            raise StorageUnavailable(self._unavailable_message(action, error)) from error
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            raise StorageUnavailable(self._unavailable_message(action, error)) from error

    def _unavailable_message(self, action: str, error: Exception) -> str:
        cause = getattr(error, "orig", None) or error
        reason = " ".join(str(cause).split()) or type(cause).__name__
        return f"cannot {action}: database {self.database} is unavailable ({reason})"


_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
"""The INSERT with ON CONFLICT of each supported dialect."""


def _create_engine(url: URL, settings: DatabaseSettings) -> Engine:
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            folder = Path(url.database).parent
            if folder == state_folder(Role.WORKER):
                make_state_folder(Role.WORKER, "--database")
            else:
                make_private_folder(folder, "choose another --database")
        connect_args["timeout"] = settings.busy_timeout_s
    elif url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = max(settings.connect_timeout_s, 2)
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _prepare_sqlite_connection)
    return engine


def _prepare_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    """WAL, so one program reads while another writes the same file; and foreign keys, off by default in SQLite."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()
