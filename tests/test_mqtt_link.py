"""The MQTT link's threads, through a real Mosquitto: handlers and callbacks on its dispatcher thread, never on
paho's; a handler that blocks holds up later deliveries but never an acknowledgement; ``publish_later``'s Future;
and the broker's refusals of a publish and of a subscription, by their names."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from broker_config.broker import free_port
from common.mqtt import (
    DISPATCHER_THREAD,
    BrokerRefused,
    BrokerSettings,
    LinkClosed,
    MqttLink,
    NoMatchingSubscribers,
    NotAuthorized,
    PublishRefused,
    SubscribeRefused,
)
from schemas.envelope import Envelope

from .conftest import Inbox

WAIT_S = 5.0
"""How long a test waits for what must happen."""


def text(payload: str) -> Envelope:
    return Envelope(payload.encode(), "text/plain")


def test_handlers_and_future_callbacks_run_on_the_links_dispatcher_thread(links, device_id: str) -> None:
    link = links()
    assert link.dispatcher_thread == f"{DISPATCHER_THREAD}/{link.client_id}"
    seen: queue.Queue[tuple[str, str]] = queue.Queue()
    link.subscribe(f"{device_id}/in", lambda topic, envelope: seen.put(("handler", threading.current_thread().name)))
    links().publish(f"{device_id}/in", text("hello"), qos=1, retain=False)
    acknowledged = link.publish_later(f"{device_id}/in", text("again"), qos=1, retain=False)
    acknowledged.add_done_callback(lambda future: seen.put(("QoS 1 callback", threading.current_thread().name)))
    # Done at once, yet its callback goes to the dispatcher too, not to the thread that adds it.
    immediate = link.publish_later(f"{device_id}/elsewhere", text("at most once"), qos=0, retain=False)
    assert immediate.done()
    immediate.add_done_callback(lambda future: seen.put(("QoS 0 callback", threading.current_thread().name)))
    threads = dict(seen.get(timeout=WAIT_S) for _ in range(4))  # two handler calls, one entry
    assert threads == dict.fromkeys(("handler", "QoS 1 callback", "QoS 0 callback"), link.dispatcher_thread)


def test_a_blocked_handler_holds_up_later_deliveries_but_never_a_puback(links, device_id: str) -> None:
    link, other = links(), links()
    entered, release = threading.Event(), threading.Event()
    handled: queue.Queue[str] = queue.Queue()

    def slow(topic: str, envelope: Envelope) -> None:
        entered.set()
        release.wait(2 * WAIT_S)
        handled.put(envelope.payload.decode())

    link.subscribe(f"{device_id}/slow", slow)
    listener = Inbox()
    other.subscribe(f"{device_id}/out", listener)
    other.publish(f"{device_id}/slow", text("first"), qos=1, retain=False)
    other.publish(f"{device_id}/slow", text("second"), qos=1, retain=False)
    assert entered.wait(WAIT_S)
    try:
        # While the handler waits: a publish from another thread gets its PUBACK, and a Future resolves.
        started = time.monotonic()
        link.publish(f"{device_id}/out", text("while blocked"), qos=1, retain=False, timeout_s=WAIT_S)
        assert time.monotonic() - started < WAIT_S
        assert link.publish_later(f"{device_id}/out", text("later"), qos=1, retain=False).result(WAIT_S) is None
        assert [listener.get()[1].payload for _ in range(2)] == [b"while blocked", b"later"]
        assert handled.empty()  # the second message waits for the first one's handler
    finally:
        release.set()
    assert [handled.get(timeout=WAIT_S) for _ in range(2)] == ["first", "second"]


def test_a_handler_may_publish_and_wait_for_its_puback(links, device_id: str) -> None:
    link, watcher = links(), links()
    answers = Inbox()
    watcher.subscribe(f"{device_id}/answer", answers)
    outcomes: queue.Queue[Exception | None] = queue.Queue()

    def answer(topic: str, envelope: Envelope) -> None:
        try:
            link.publish(f"{device_id}/answer", envelope, qos=1, retain=False, timeout_s=WAIT_S)
        except Exception as error:
            outcomes.put(error)
        else:
            outcomes.put(None)

    link.subscribe(f"{device_id}/ask", answer)
    watcher.publish(f"{device_id}/ask", text("ping"), qos=1, retain=False)
    assert outcomes.get(timeout=2 * WAIT_S) is None
    assert answers.get()[1].payload == b"ping"


def test_publish_later_returns_a_future_of_the_brokers_answer(links, device_id: str) -> None:
    link = links()
    link.subscribe(f"{device_id}/heard", Inbox())
    heard = link.publish_later(f"{device_id}/heard", text("to someone"), qos=1, retain=False)
    assert isinstance(heard, Future)
    assert heard.result(WAIT_S) is None
    assert not heard.cancel()  # the broker decides its outcome
    unheard = link.publish_later(f"{device_id}/nobody", text("to no one"), qos=1, retain=False)
    assert isinstance(unheard.exception(WAIT_S), NoMatchingSubscribers)
    link.publish(f"{device_id}/nobody", text("counts as published"), qos=1, retain=False)


def test_closing_the_link_fails_the_futures_still_waiting(broker_settings, device_id: str) -> None:
    link = MqttLink(f"{device_id}-closing", broker_settings)
    link.close()
    # Queued by paho for a connection that will not come back: the Future says so at once.
    waiting = link.publish_later(f"{device_id}/late", text("after close"), qos=1, retain=False)
    assert isinstance(waiting.exception(WAIT_S), LinkClosed)
    with pytest.raises(LinkClosed):
        link.publish(f"{device_id}/late", text("after close"), qos=1, retain=False, timeout_s=WAIT_S)
    called: list[str] = []
    waiting.add_done_callback(lambda future: called.append(threading.current_thread().name))
    assert called == [threading.current_thread().name]  # the dispatcher is gone: run by whoever adds it


# The broker's refusals. Mosquitto's ACL file grants every subscription and filters at delivery; its dynamic
# security plugin, given no role for a client, refuses it every publish and every subscription (its default access).

DYNAMIC_SECURITY_PLUGIN = "mosquitto_dynamic_security.so"

NO_ACCESS = {
    "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False},
    "clients": [],
    "groups": [],
    "roles": [],
}
"""A dynamic security configuration with no client, group or role: anonymous clients get the default access."""


def dynamic_security_plugin() -> Path | None:
    """Where Mosquitto's dynamic security plugin is installed, if it is."""
    folders = [Path("/usr/lib"), *Path("/usr/lib").glob("*-linux-gnu*"), Path("/usr/local/lib")]
    mosquitto = shutil.which("mosquitto")
    if mosquitto is not None:
        folders.append(Path(mosquitto).resolve().parent.parent / "lib")
    return next((plugin for folder in folders if (plugin := folder / DYNAMIC_SECURITY_PLUGIN).exists()), None)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def refusing_broker(tmp_path_factory) -> Iterator[BrokerSettings]:
    """A Mosquitto that accepts anonymous connections and refuses them every publish and subscription."""
    plugin = dynamic_security_plugin()
    # Debian's mosquitto package, which make setup installs, ships the plugin: missing, it is a broken set-up,
    # not a test to skip.
    assert plugin is not None, f"Mosquitto's {DYNAMIC_SECURITY_PLUGIN} is not installed"
    folder = tmp_path_factory.mktemp("refusing-broker")
    (folder / "dynamic-security.json").write_text(json.dumps(NO_ACCESS))
    port = free_port()
    (folder / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest file {folder / 'log'}\n"
        f"plugin {plugin}\nplugin_opt_config_file {folder / 'dynamic-security.json'}\n"
    )
    log = folder / "log"
    process = subprocess.Popen(["mosquitto", "-c", str(folder / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.05)
        yield BrokerSettings(port=port, connect_timeout_s=5.0)
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.broker
def test_a_refused_publish_fails_its_future_and_a_refused_subscription_raises_subscribe_refused(
    refusing_broker: BrokerSettings,
) -> None:
    with MqttLink("no-rights", refusing_broker) as link:
        refused = link.publish_later("anywhere/topic", text("x"), qos=1, retain=False).exception(WAIT_S)
        assert isinstance(refused, PublishRefused) and isinstance(refused, NotAuthorized)
        assert "Not authorized" in str(refused)
        with pytest.raises(PublishRefused, match="Not authorized"):
            link.publish("anywhere/topic", text("x"), qos=1, retain=False)
        with pytest.raises(SubscribeRefused, match="Not authorized") as subscription:
            link.subscribe("anywhere/#", Inbox())
        assert isinstance(subscription.value, NotAuthorized) and not isinstance(subscription.value, PublishRefused)
        assert isinstance(subscription.value, BrokerRefused)
        # Refused, and the link goes on: still connected, and closed cleanly.
        assert link.connected
