"""The five faults of bench/faults.py at small scale, with real processes: every utterance answered exactly once.

Each test gets its own Mosquitto (with persistence), two ``python -m cloud_worker serve`` subprocesses, a
PostgreSQL database of its own and simulated devices with SQLite outboxes; the fault lands in the middle of
the load. Nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import socket
import threading

import pytest

from bench.faults import FAULTS, FaultRig, FaultSettings, TcpProxy, encode_templates

pytestmark = pytest.mark.timeout(150)

SMALL = FaultSettings(
    devices=4,
    utterances=3,
    spread_s=9.0,
    broker_down_s=3.0,
    restart_delay_s=1.0,
    db_outage_s=5.0,
    cut_s=5.0,
    trigger_fraction=0.5,
    deadline_s=60.0,
    stall_s=35.0,
    settle_s=2.0,
)
"""4 devices x 3 utterances per fault, a 5 s database outage and a 5 s cut (on the suite's PostgreSQL)."""


@pytest.fixture(scope="module")
def templates() -> list:
    return encode_templates()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_every_utterance_answered_exactly_once(fault, templates, postgres_admin, postgres_url, tmp_path) -> None:
    with FaultRig(dataclasses.replace(SMALL, postgres_url=postgres_url), fault, tmp_path / fault, templates) as rig:
        tally = rig.run()
    evidence = tally["fault"]
    # The fault happened, in the middle of the load.
    if fault == "worker_kill":
        assert evidence["answered_by_it_before"] >= 1, evidence
        assert evidence["in_progress_at_kill"] >= 1, evidence
    elif fault == "worker_gone":
        assert evidence["answered_by_it_before"] >= 1 and evidence["recovery"] == "drain", evidence
    elif fault == "database_outage":
        assert evidence["sessions_ended"] >= 1, evidence
        assert evidence["workers_noticed"] >= 1, evidence
        assert evidence["put_during_outage"] >= 1, evidence
    elif fault == "device_cut":
        assert evidence["put_during_cut"] >= 1, evidence
        assert evidence["held_in_outbox_at_restore"] >= 1, evidence
        assert not evidence["connected_during_cut"], evidence
    else:
        assert evidence["answered_before"] < tally["sent"], evidence
        assert evidence["put_while_down"] >= 1, evidence  # devices sent through the restart
    # Every utterance reached the broker and was answered exactly once.
    assert tally["sent"] == SMALL.devices * SMALL.utterances
    assert tally["unsent"] == 0, tally
    assert "hung_devices" not in tally, tally
    assert (tally["lost"], tally["duplicated"]) == (0, 0), tally


def test_proxy_cuts_and_restores_on_the_same_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:

        def echo() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                with connection:
                    while data := connection.recv(1024):
                        connection.sendall(data)

        threading.Thread(target=echo, daemon=True).start()
        with TcpProxy(server.getsockname()[1]) as proxy:
            port = proxy.port
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
            proxy.cut()
            assert client.recv(4) == b""  # the relayed connection was closed
            client.close()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5)
            proxy.restore()
            assert proxy.port == port
            with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
                again.sendall(b"pong")
                assert again.recv(4) == b"pong"
