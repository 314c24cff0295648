"""The suite's own PostgreSQL (tests/throwaway_postgres.py): a server of its own in a temporary folder, on a loopback
port of its own, removed at the end; the postgres tests use it unless MQVOX_TEST_POSTGRES_URL names another."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from .throwaway_postgres import OVERRIDE_VARIABLE, ThrowawayPostgres

pytestmark = pytest.mark.postgres


def where(engine) -> tuple[Path, int, str]:
    """The server's data directory, TCP port and socket folder, as it reports them."""
    with engine.connect() as connection:
        data_directory = connection.execute(text("SHOW data_directory")).scalar_one()
        port = connection.execute(text("SELECT inet_server_port()")).scalar_one()
        sockets = connection.execute(text("SHOW unix_socket_directories")).scalar_one()
    return Path(data_directory), port, sockets


def test_the_postgres_tests_run_on_the_suites_own_server(postgres_server, postgres_admin) -> None:
    data_directory, port, _ = where(postgres_admin)
    if postgres_server is None:  # MQVOX_TEST_POSTGRES_URL names the server to use
        assert port == (make_url(os.environ[OVERRIDE_VARIABLE]).port or 5432)
        return
    assert (data_directory, port) == (postgres_server.data_dir, postgres_server.port)
    assert data_directory.is_relative_to(tempfile.gettempdir())


def test_a_throwaway_server_listens_on_loopback_and_leaves_nothing_behind() -> None:
    with ThrowawayPostgres() as server:
        engine = create_engine(server.url)
        try:
            assert where(engine) == (server.data_dir, server.port, str(server.root))
            with engine.connect() as connection:
                assert connection.execute(text("SHOW listen_addresses")).scalar_one() == "127.0.0.1"
        finally:
            engine.dispose()
        root, port, process = server.root, server.port, server.process
    assert process.poll() is not None
    assert not root.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
