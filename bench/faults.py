"""Fault tests with real processes: every utterance answered exactly once through five faults.

    .venv/bin/python bench/faults.py [--devices 50] [--utterances 10] [--db-outage-s 30] [--cut-s 20]
                                     [--gone-recovery drain|retire|none] [--recover-after-s 5]
                                     [--faults broker_restart,worker_kill,worker_gone,database_outage,device_cut]

Each fault runs on a rig of its own, so that what one fault leaves broken is not counted
against another: a real Mosquitto (broker_config/, with persistence), two cloud workers as
subprocesses (``python -m cloud_worker serve``, stable worker ids, so persistent
sessions), and a PostgreSQL database (``mqvox_faults_<pid>_<fault>``, dropped at the end) on a throwaway
server of the bench's own (tests/throwaway_postgres.py), unless ``--postgres-url`` or
``MQVOX_TEST_POSTGRES_URL`` names one.
The load is fresh for each fault: ``--devices`` simulated devices, each with its own MQTT
connection, SQLite outbox, OutboxSender and CloudClient (the device's own, which sends an
unanswered request again every ``cloud.resend_after_s`` until ``cloud.timeout_s``, the
device defaults), ask about ``--utterances`` real recordings (samples/ and
device/self_test_clips/, encoded to Opus) through their outboxes, paced over ``--spread-s``. In the middle of the load:

- ``broker_restart``: Mosquitto stopped (SIGTERM, it saves its persistence file) and
  started again on the same data directory and port ``--broker-down-s`` later;
- ``worker_kill``: ``kill -9`` of one worker once it has answered some of the load, and
  the same worker id started again ``--restart-delay-s`` later, as systemd would;
- ``worker_gone``: ``kill -9`` of one worker, never started again; ``--recover-after-s``
  later its session is drained by ``cloud_worker serve --drain`` under its id, which
  answers what the session holds and ends it (``--gone-recovery retire``: ended by
  ``cloud_worker retire``, dropping it; ``none``: left to expire). Until then the broker
  routes a share of the load to the dead session, and the devices' re-sends reach the
  live worker;
- ``database_outage``: the database refuses connections (``ALLOW_CONNECTIONS false``
  and ``pg_terminate_backend`` of its sessions) for ``--db-outage-s``;
- ``device_cut``: ``--cut-devices`` devices reach the broker through a TCP proxy that
  closes their connections and refuses new ones for ``--cut-s``, while they go on
  putting utterances into their outboxes.

An observer with a persistent session counts the workers' replies to each utterance on
``mqvox/v1/devices/+/reply``, until all are answered (then ``settle_s`` more, for late
duplicates), ``--deadline-s`` passes, or none came for ``--stall-s``. Progress goes to
stderr; the last stdout line is one JSON object mapping each fault to {"sent",
"answered", "duplicated", "lost"}, with beside them: ``error_results`` (replies carrying
an error), ``unsent`` (left in the outboxes), ``answered_twice_in_worker_logs``,
``elapsed_s``, ``fault`` (evidence that the fault happened mid-load), and when they
apply ``lost_sample`` (some lost ids) and ``hung_devices`` (an outbox sender that would
not stop). Exit code 0 only when no fault lost or duplicated an answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from broker_config.broker import Broker
from common.mqtt import BrokerSettings, MqttLink
from common.recording import read_recording
from device.cloud_client import CloudClient, CloudDeferred
from device.outbox import Outbox, OutboxSender
from device.settings import CloudSettings, OutboxSettings
from schemas.envelope import Envelope
from schemas.protocol import decode
from schemas.reply import CloudReply
from schemas.topics import REPLY
from schemas.utterance import UploadReason, Utterance, new_utterance_id

REPO = Path(__file__).resolve().parent.parent
CLIPS = (
    REPO / "samples" / "hey_jarvis_turn_on_the_lights.flac",
    REPO / "samples" / "hey_jarvis_weather_tomorrow.flac",
    REPO / "device" / "self_test_clips" / "hey_jarvis_start.flac",
    REPO / "device" / "self_test_clips" / "hey_jarvis_three.flac",
    REPO / "device" / "self_test_clips" / "hey_jarvis_turn_on_the_lights.flac",
    REPO / "device" / "self_test_clips" / "negative_speech.flac",
)
"""Real recordings (speech) the utterances are made of."""

POSTGRES_URL = os.environ.get("MQVOX_TEST_POSTGRES_URL")
"""A PostgreSQL database to administer from: the bench creates and drops a database of its own beside it. Unset:
a throwaway server of the bench's own, for the run (tests/throwaway_postgres.py, the one the tests start)."""

FAULTS = ("broker_restart", "worker_kill", "worker_gone", "database_outage", "device_cut")
"""Every fault, in the order they run (each on a fresh broker, workers and database)."""

_started = time.monotonic()


def say(message: str) -> None:
    """Progress, on stderr."""
    print(f"[faults {time.monotonic() - _started:7.1f} s] {message}", file=sys.stderr, flush=True)


def wait_for(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``condition`` until it is true or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(poll_s)
    return True


@dataclass(frozen=True)
class FaultSettings:
    """The load and the faults."""

    devices: int = 50
    """Simulated devices per fault, each with its own connection and outbox."""
    utterances: int = 10
    """Utterances each device sends per fault."""
    spread_s: float = 40.0
    """Each device's utterances are spread over this many seconds (staggered between devices)."""
    broker_down_s: float = 5.0
    """How long Mosquitto stays down in ``broker_restart``."""
    restart_delay_s: float = 2.0
    """How long the killed worker stays dead in ``worker_kill`` before it is started again."""
    gone_recovery: str = "drain"
    """In ``worker_gone``, what is done about the dead worker's session: ``drain`` (``cloud_worker serve --drain``
    under its id answers what it holds and ends it), ``retire`` (``cloud_worker retire`` ends it, dropping what it
    holds) or ``none`` (the broker keeps routing a share of the load to it until it expires)."""
    recover_after_s: float = 5.0
    """How long after the kill the recovery starts."""
    db_outage_s: float = 30.0
    """How long the database refuses connections in ``database_outage``."""
    cut_s: float = 20.0
    """How long the proxied devices are cut off from the broker in ``device_cut``."""
    cut_devices: int = 1
    """How many devices go through the proxy in ``device_cut``."""
    trigger_fraction: float = 0.5
    """The fault starts once this fraction of the load has been put and some of it answered (or once the load is all
    put): devices go on sending through the fault, with work already under way in the workers."""
    deadline_s: float = 600.0
    """After the load is sent, how long to wait for every answer before counting the rest lost."""
    stall_s: float = 60.0
    """After the load is sent, give up waiting once no answer has come for this long."""
    settle_s: float = 3.0
    """After the last answer, how long to wait for duplicates."""
    worker_threads: int = 1
    """CPU threads of each worker's recogniser."""
    postgres_url: str | None = POSTGRES_URL
    """Where to create (and drop) the bench's own database; None: on a throwaway server started for the run."""


class TcpProxy:
    """A TCP relay on 127.0.0.1 to one target, which can cut every connection and refuse new ones for a while."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        """The port it listens on (fixed at the first ``start``, kept across a cut)."""
        self.connections = 0
        """Connections relayed so far."""
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()

    def start(self) -> TcpProxy:
        """Listen (again, on the same port after a cut)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy-accept", daemon=True).start()
        return self

    @property
    def cut_off(self) -> bool:
        return self._listener is None

    def cut(self) -> None:
        """Close every relayed connection and stop listening: connections are refused until ``restore``."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = list(self._sockets), set()
        if listener is not None:
            _close(listener)
        for connection in sockets:
            _close(connection)

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        if self.cut_off:
            self.start()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut or closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for end in (client, upstream):
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), name="proxy-pump", daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._sockets -= {source, sink}
        _close(source)
        _close(sink)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(connection: socket.socket) -> None:
    # shutdown() wakes a thread blocked in accept() or recv() on it; close() alone may not.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()


class WorkerProcess:
    """One ``python -m cloud_worker serve`` subprocess under a stable worker id; its JSON logs go to a file."""

    def __init__(
        self,
        worker_id: str,
        *,
        port: int,
        database_url: str,
        group: str,
        threads: int,
        log: Path,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.worker_id = worker_id
        self.group = group
        self.log_path = log
        self.command = [
            sys.executable, "-m", "cloud_worker", "--log-level", "INFO", "serve",
            "--port", str(port), "--worker-id", worker_id, "--database", database_url, "--group", group,
            "--threads", str(threads), *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        """Start it and wait until it has subscribed (its ``ready`` log line)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C is for the bench, which stops its workers itself
            )
        if not wait_for(lambda: self.process.poll() is not None or _has_event(self.events(offset), "ready"), timeout_s):
            raise RuntimeError(f"worker {self.worker_id} not ready within {timeout_s} s; see {self.log_path}")
        if self.process.poll() not in (None, 0):  # 0: a --drain worker done already
            raise RuntimeError(f"worker {self.worker_id} exited ({self.process.returncode}): {self.tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (the worker finishes its batch), SIGKILL after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def events(self, offset: int = 0) -> list[dict]:
        """The JSON log lines written since ``offset``."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            lines = log.read().decode("utf-8", errors="replace").splitlines()
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _has_event(events: list[dict], name: str) -> bool:
    return any(event.get("event") == name for event in events if isinstance(event, dict))


class Database:
    """A PostgreSQL database of the bench's own, beside the one of ``admin_url``, that can be made unavailable."""

    def __init__(self, admin_url: str, name: str) -> None:
        self.name = name
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        self.url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        self.created = False

    def create(self) -> None:
        with self._admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.created = True

    def refuse_connections(self) -> int:
        """No new connection is allowed, and every open one is ended; how many were ended."""
        with self._admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS false'))
            ended = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": self.name},
            ).scalar_one()
        return int(ended)

    def allow_connections(self) -> None:
        with self._admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true'))

    def drop(self) -> None:
        if self.created:
            with self._admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.created = False
        self._admin.dispose()


class Observer:
    """Counts the workers' replies to each utterance, on a persistent session that misses nothing across restarts.

    The simulated devices are outboxes, not device runtimes: nobody turns the replies into results, so the
    workers' answers are counted where they publish them, on the reply topics."""

    def __init__(self, client_id: str, broker: BrokerSettings) -> None:
        self._lock = threading.Lock()
        self.results: Counter[str] = Counter()
        """Replies received, by utterance id."""
        self.errors: Counter[str] = Counter()
        """Of those, the ones carrying an error, by utterance id."""
        self.link = MqttLink(client_id, broker, clean_start=False, session_expiry_s=3600)
        self.link.subscribe(REPLY.filter(), self._receive)

    def _receive(self, topic: str, envelope: Envelope) -> None:
        message = decode(topic, envelope)
        if not isinstance(message, CloudReply):
            return
        with self._lock:
            self.results[message.utterance_id] += 1
            if message.error is not None:
                self.errors[message.utterance_id] += 1

    def answered(self, ids: set[str]) -> int:
        with self._lock:
            return sum(1 for utterance_id in ids if self.results[utterance_id])

    def unanswered(self, ids: set[str]) -> set[str]:
        with self._lock:
            return {utterance_id for utterance_id in ids if not self.results[utterance_id]}

    def tally(self, ids: set[str]) -> dict[str, int]:
        """sent, answered, duplicated, lost (and error results) over these utterance ids."""
        with self._lock:
            counts = [self.results[utterance_id] for utterance_id in ids]
            errors = sum(1 for utterance_id in ids if self.errors[utterance_id])
        answered = sum(1 for count in counts if count)
        return {
            "sent": len(ids),
            "answered": answered,
            "duplicated": sum(counts) - answered,
            "lost": len(ids) - answered,
            "error_results": errors,
        }

    def close(self) -> None:
        self.link.close(end_session=True)


class DeviceCounters:
    """The counters a device's status would carry (cloud_resends, cloud_late_replies, ...), added to from the
    cloud client's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]


@dataclass
class SimulatedDevice:
    """One device's connection, outbox, sender and cloud client, as the device runtime wires them: each request
    is asked on a thread of its own, and sent again while unanswered (cloud.resend_after_s) as a device does."""

    device_id: str
    link: MqttLink
    outbox: Outbox
    sender: OutboxSender
    client: CloudClient
    asking: ThreadPoolExecutor
    cloud: CloudSettings
    counts: DeviceCounters
    sent: list[str] = field(default_factory=list)
    """Utterance ids handed to the cloud client, in order."""

    @classmethod
    def open(cls, device_id: str, port: int, folder: Path, *, in_flight: int) -> SimulatedDevice:
        link = MqttLink(device_id, BrokerSettings(port=port, connect_timeout_s=5.0), require_connection=False)
        outbox = Outbox(OutboxSettings(path=str(folder / f"{device_id}.sqlite3")))
        sender = OutboxSender(outbox, link).start()
        counts = DeviceCounters()
        client = CloudClient(link, device_id, outbox=outbox, sender=sender, count=counts.add)
        asking = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix=f"ask-{device_id}")
        return cls(device_id, link, outbox, sender, client, asking, CloudSettings(), counts)

    def send(self, utterance: Utterance) -> None:
        self.sent.append(utterance.utterance_id)
        self.asking.submit(self._ask, utterance)

    def _ask(self, utterance: Utterance) -> None:
        # The answer is counted by the Observer, where the workers publish it; here only the device's side.
        with contextlib.suppress(CloudDeferred):  # the broker away: the outbox sends it later, once
            self.client.ask(utterance, self.cloud.timeout_s, self.cloud.resend_after_s)

    def close(self) -> int:
        """Stop; how many messages were left unsent in the outbox."""
        self.asking.shutdown(wait=True, cancel_futures=True)
        self.sender.stop()
        self.client.close()
        self.link.close()
        left = self.outbox.stats().messages
        self.outbox.close()
        return left


def close_devices(devices: list[SimulatedDevice], timeout_s: float = 15.0) -> tuple[int, list[str]]:
    """Close every device, each on a thread of its own: messages left unsent, and the devices whose close hung
    (a sender thread that never stops is a deadlock worth reporting, not a reason for the bench to hang)."""
    left: dict[str, int] = {}

    def close(device: SimulatedDevice) -> None:
        left[device.device_id] = device.close()

    closers = [threading.Thread(target=close, args=(device,), daemon=True) for device in devices]
    for closer in closers:
        closer.start()
    deadline = time.monotonic() + timeout_s
    for closer in closers:
        closer.join(max(0.0, deadline - time.monotonic()))
    hung = [device.device_id for device in devices if device.device_id not in left]
    for device_id in hung:
        say(f"device {device_id}: its outbox sender did not stop within {timeout_s:g} s (a thread is stuck)")
    return sum(left.values()), hung


class Load(threading.Thread):
    """Each device puts its utterances into its outbox, paced over the spread and staggered between devices."""

    def __init__(self, devices: list[SimulatedDevice], templates: list[Utterance], utterances: int, spread_s: float):
        super().__init__(name="load", daemon=True)
        interval = spread_s / utterances
        self.plan = sorted(
            ((index / len(devices) + k) * interval, index, k)
            for index in range(len(devices))
            for k in range(utterances)
        )
        self.devices = devices
        self.templates = templates
        self.ids: set[str] = set()
        """Every utterance id put so far (read it under ``lock``)."""
        self.lock = threading.Lock()
        self.failure: BaseException | None = None
        self._halt = threading.Event()

    @property
    def total(self) -> int:
        return len(self.plan)

    def run(self) -> None:
        started = time.monotonic()
        try:
            for at, index, k in self.plan:
                if self._halt.wait(max(0.0, started + at - time.monotonic())):
                    return
                device = self.devices[index]
                template = self.templates[(index + k) % len(self.templates)]
                utterance = replace(
                    template, device_id=device.device_id, utterance_id=new_utterance_id(), captured_at=time.time()
                )
                device.send(utterance)
                with self.lock:
                    self.ids.add(utterance.utterance_id)
        except BaseException as error:
            self.failure = error

    def sent_ids(self) -> set[str]:
        with self.lock:
            return set(self.ids)

    def stop(self) -> None:
        self._halt.set()


def encode_templates() -> list[Utterance]:
    """One forced utterance per recording, encoded to Opus once; each sent utterance is a copy with new ids."""
    return [
        Utterance.from_samples(
            "template",
            read_recording(path, 16000),
            16000,
            hypotheses=(),
            model_version=None,
            reason=UploadReason.FORCED,
        )
        for path in CLIPS
    ]


class FaultRig:
    """A fresh Mosquitto, database, observer and two workers for one fault; a context manager that removes them.

    Each fault gets a rig of its own, so that what one fault leaves broken cannot be counted against another.
    """

    def __init__(self, settings: FaultSettings, fault: str, folder: Path, templates: list[Utterance]) -> None:
        self.settings = settings
        self.fault = fault
        self.folder = folder
        self.templates = templates
        self.tag = f"{os.getpid()}"
        self.broker: Broker | None = None
        self.database: Database | None = None
        self.workers: list[WorkerProcess] = []
        self.drainers: list[WorkerProcess] = []
        """Workers started under a gone worker's id to drain its session (worker_gone)."""
        self.observer: Observer | None = None
        self.ids: set[str] = set()
        """The utterance ids this rig's phase sent."""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FaultRig:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.broker = Broker(data_dir=self.folder / "broker").start()
        self._stack.callback(lambda: self.broker.stop())
        self.database = Database(self.settings.postgres_url, f"mqvox_faults_{self.tag}_{self.fault}")
        self.database.create()
        self._stack.callback(self.database.drop)
        self._stack.callback(self._allow_database)  # runs before the drop: an interrupted outage is ended
        self.observer = Observer(f"faults-observer-{self.tag}", self.broker_settings())
        self._stack.callback(self.observer.close)
        for name in ("a", "b"):
            worker = WorkerProcess(
                f"faults-{self.tag}-{name}",
                port=self.broker.port,
                database_url=self.database.url,
                group=f"faults-{self.tag}",
                threads=self.settings.worker_threads,
                log=self.folder / f"worker-{name}.log",
            )
            self.workers.append(worker)
            self._stack.callback(worker.stop)
        self._stack.callback(lambda: [drainer.stop() for drainer in self.drainers])
        for worker in self.workers:
            worker.start()
        say(
            f"{self.fault}: Mosquitto on port {self.broker.port}, database {self.database.name}, "
            f"workers {', '.join(worker.worker_id for worker in self.workers)} ready"
        )

    def _allow_database(self) -> None:
        with contextlib.suppress(Exception):
            self.database.allow_connections()

    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings(port=self.broker.port, connect_timeout_s=5.0)

    def restart_broker(self, down_s: float) -> None:
        """Stop Mosquitto and start a new one on the same data directory and port ``down_s`` later."""
        port, data_dir = self.broker.port, self.broker.data_dir
        self.broker.stop()
        time.sleep(down_s)
        self.broker = Broker(data_dir=data_dir, port=port).start()

    def run(self) -> dict:
        """Fresh devices and load, the fault in the middle of it; the tally and the fault's evidence."""
        settings, fault = self.settings, self.fault
        say(f"{fault}: {settings.devices} devices x {settings.utterances} utterances over {settings.spread_s:g} s")
        devices: list[SimulatedDevice] = []
        proxy: TcpProxy | None = None
        started = time.monotonic()
        load: Load | None = None
        try:
            if fault == "device_cut":
                proxy = TcpProxy(self.broker.port).start()
            for index in range(settings.devices):
                device_id = f"{fault.replace('_', '-')}-{self.tag}-{index:03d}"
                through_proxy = proxy is not None and index < settings.cut_devices
                port = proxy.port if through_proxy else self.broker.port
                devices.append(
                    SimulatedDevice.open(device_id, port, self.folder / "outboxes", in_flight=settings.utterances)
                )
            load = Load(devices, self.templates, settings.utterances, settings.spread_s)
            load.start()
            evidence = FAULT_ACTIONS[fault](self, load, devices, proxy)
            load.join()
            if load.failure is not None:
                raise RuntimeError(f"the load failed: {load.failure!r}") from load.failure
            ids = self.ids = load.sent_ids()
            say(f"{fault}: all {len(ids)} put; waiting for the answers")
            self._wait_for_answers(ids)
            time.sleep(settings.settle_s)
        except BaseException as error:
            say(f"{fault}: stopped by {error!r}")
            raise
        finally:
            if load is not None:
                load.stop()
            if proxy is not None:
                proxy.close()
            unsent, hung = close_devices(devices)
        tally = self.observer.tally(ids)
        published = Counter()
        for worker in self.workers + self.drainers:
            published.update(_publications(worker, ids))
        tally |= {
            "elapsed_s": round(time.monotonic() - started, 1),
            "unsent": unsent,
            "answered_twice_in_worker_logs": sum(1 for count in published.values() if count > 1),
            "device_resends": sum(device.counts.get("cloud_resends") for device in devices),
            "fault": evidence,
        }
        if hung:
            tally["hung_devices"] = hung
        if tally["lost"]:
            tally["lost_sample"] = sorted(self.observer.unanswered(ids))[:5]
        say(f"{fault}: {json.dumps(tally)}")
        return tally

    def _wait_for_answers(self, ids: set[str]) -> None:
        """Until every utterance is answered, the deadline passes, or no answer came for ``stall_s``."""
        deadline = time.monotonic() + self.settings.deadline_s
        last, last_change = -1, time.monotonic()
        while (answered := self.observer.answered(ids)) < len(ids):
            now = time.monotonic()
            if answered != last:
                last, last_change = answered, now
            if now >= deadline or now - last_change >= self.settings.stall_s:
                say(f"{self.fault}: giving up with {len(ids) - answered} unanswered")
                return
            time.sleep(0.25)

    def wait_to_trigger(self, load: Load, answered: Callable[[set[str]], int], timeout_s: float = 120.0) -> None:
        """Until ``trigger_fraction`` of the load has been put and ``answered(ids)`` is at least one, or every
        utterance has been put."""
        goal = max(1, round(self.settings.trigger_fraction * load.total))

        def due() -> bool:
            ids = load.sent_ids()
            return not load.is_alive() or (len(ids) >= goal and answered(ids) >= 1)

        wait_for(due, timeout_s, poll_s=0.1)

    def keep_logs(self, folder: Path) -> None:
        """Copy the workers' and the broker's logs into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        for log in [worker.log_path for worker in self.workers + self.drainers] + [
            self.folder / "broker" / "mosquitto.log"
        ]:
            if log.exists():
                shutil.copy(log, folder / log.name)


PUBLISHING_EVENTS = ("answered", "answered again from storage")
"""Worker log events that stand for one publication of a reply."""


def _publications(worker: WorkerProcess, ids: set[str]) -> Counter[str]:
    """How many times the worker's log says it published a reply, by utterance id (of ``ids``)."""
    return Counter(
        event.get("utterance_id")
        for event in worker.events()
        if isinstance(event, dict) and event.get("event") in PUBLISHING_EVENTS and event.get("utterance_id") in ids
    )


def _answered_by(worker: WorkerProcess, ids: set[str], offset: int = 0) -> int:
    return sum(
        1
        for event in worker.events(offset)
        if isinstance(event, dict) and event.get("event") == "answered" and event.get("utterance_id") in ids
    )


def fault_broker_restart(rig: FaultRig, load: Load, devices: list, proxy: TcpProxy | None) -> dict:
    rig.wait_to_trigger(load, rig.observer.answered)
    sent, answered = len(load.sent_ids()), rig.observer.answered(load.sent_ids())
    say(f"broker_restart: stopping Mosquitto ({sent} sent, {answered} answered)")
    rig.restart_broker(rig.settings.broker_down_s)
    after = len(load.sent_ids())
    say(f"broker_restart: Mosquitto back on port {rig.broker.port}; {after - sent} utterances put while it was down")
    return {
        "sent_before": sent,
        "answered_before": answered,
        "down_s": rig.settings.broker_down_s,
        "put_while_down": after - sent,
        "load_running_after": load.is_alive(),
    }


def fault_worker_kill(rig: FaultRig, load: Load, devices: list, proxy: TcpProxy | None) -> dict:
    victim = rig.workers[0]
    rig.wait_to_trigger(load, lambda ids: _answered_by(victim, ids))
    ids = load.sent_ids()
    by_victim, answered = _answered_by(victim, ids), rig.observer.answered(ids)
    say(f"worker_kill: kill -9 {victim.worker_id} (it answered {by_victim}; {len(ids)} sent, {answered} answered)")
    victim.kill()
    time.sleep(rig.settings.restart_delay_s)
    victim.start()
    say(f"worker_kill: {victim.worker_id} started again with the same worker id")
    return {
        "killed": victim.worker_id,
        "answered_by_it_before": by_victim,
        "sent_before": len(ids),
        "answered_before": answered,
        "in_progress_at_kill": len(ids) - answered,
        "load_running_after": load.is_alive(),
    }


def fault_worker_gone(rig: FaultRig, load: Load, devices: list, proxy: TcpProxy | None) -> dict:
    victim = rig.workers[0]
    rig.wait_to_trigger(load, lambda ids: _answered_by(victim, ids))
    ids = load.sent_ids()
    by_victim, answered = _answered_by(victim, ids), rig.observer.answered(ids)
    say(
        f"worker_gone: kill -9 {victim.worker_id} for good"
        f" (it answered {by_victim}; {len(ids)} sent, {answered} answered)"
    )
    victim.kill()
    resends_before = sum(device.counts.get("cloud_resends") for device in devices)
    recovery = rig.settings.gone_recovery
    if recovery != "none":
        # What a supervisor or an operator does for a worker that will not come back: answer what its session
        # holds (serve --drain under its id, on any machine with the worker), or only end the session (retire).
        time.sleep(rig.settings.recover_after_s)
        if recovery == "drain":
            drainer = WorkerProcess(
                victim.worker_id,
                port=rig.broker.port,
                database_url=rig.database.url,
                group=victim.group,
                threads=rig.settings.worker_threads,
                log=rig.folder / "worker-drain.log",
                extra=("--drain",),
            )
            rig.drainers.append(drainer)
            drainer.start()  # it answers the session's queue, ends the session and exits on its own
        else:
            done = subprocess.run(
                [sys.executable, "-m", "cloud_worker", "retire", "--worker-id", victim.worker_id,
                 "--port", str(rig.broker.port)],
                cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"cloud_worker retire failed: {done.stderr.strip()}")
        say(f"worker_gone: its session {'drained' if recovery == 'drain' else 'retired'} from"
            f" {rig.settings.recover_after_s:g} s after the kill")  # fmt: skip
    return {
        "killed": victim.worker_id,
        "answered_by_it_before": by_victim,
        "sent_before": len(ids),
        "answered_before": answered,
        "recovery": recovery,
        "recover_after_s": rig.settings.recover_after_s,
        "resends_before_kill": resends_before,
        "load_running_after": load.is_alive(),
    }


def fault_database_outage(rig: FaultRig, load: Load, devices: list, proxy: TcpProxy | None) -> dict:
    rig.wait_to_trigger(load, rig.observer.answered)
    offsets = [worker.log_path.stat().st_size for worker in rig.workers]
    ids = load.sent_ids()
    answered = rig.observer.answered(ids)
    ended = rig.database.refuse_connections()
    say(
        f"database_outage: {rig.database.name} refuses connections ({ended} sessions ended) for "
        f"{rig.settings.db_outage_s:g} s; {len(ids)} sent, {answered} answered"
    )
    time.sleep(rig.settings.db_outage_s)
    put_during = len(load.sent_ids()) - len(ids)
    answered_during = rig.observer.answered(load.sent_ids()) - answered
    rig.database.allow_connections()
    noticed = sum(
        1
        for worker, offset in zip(rig.workers, offsets, strict=True)
        for event in worker.events(offset)
        if isinstance(event, dict) and str(event.get("event", "")).startswith("database unavailable")
    )
    say(f"database_outage: connections allowed again; {answered_during} answered during the outage")
    return {
        "outage_s": rig.settings.db_outage_s,
        "sessions_ended": ended,
        "answered_before": answered,
        "answered_during": answered_during,
        "put_during_outage": put_during,
        "workers_noticed": noticed,
        "load_running_after": load.is_alive(),
    }


def fault_device_cut(rig: FaultRig, load: Load, devices: list, proxy: TcpProxy | None) -> dict:
    cut = devices[: rig.settings.cut_devices]
    wait_for(lambda: all(len(device.sent) >= 2 for device in cut) or not load.is_alive(), 120.0, poll_s=0.05)
    before = sum(len(device.sent) for device in cut)
    proxy.cut()
    say(f"device_cut: {len(cut)} device(s) cut off for {rig.settings.cut_s:g} s after {before} utterances")
    time.sleep(rig.settings.cut_s)
    put_during = sum(len(device.sent) for device in cut) - before
    held = sum(device.outbox.stats().messages for device in cut)
    connected_during = any(device.link.connected for device in cut)
    proxy.restore()
    say(f"device_cut: restored; {put_during} utterances put during the cut, {held} held in the outbox(es)")
    return {
        "cut_devices": [device.device_id for device in cut],
        "cut_s": rig.settings.cut_s,
        "put_during_cut": put_during,
        "held_in_outbox_at_restore": held,
        "connected_during_cut": connected_during,
    }


FAULT_ACTIONS = {
    "broker_restart": fault_broker_restart,
    "worker_kill": fault_worker_kill,
    "worker_gone": fault_worker_gone,
    "database_outage": fault_database_outage,
    "device_cut": fault_device_cut,
}


def run_faults(settings: FaultSettings, faults: list[str], keep_logs: Path | None = None) -> dict[str, dict]:
    """Each fault of ``faults``, in the order of FAULTS, on a rig of its own; each one's tally."""
    if settings.postgres_url is None:
        with _throwaway_postgres() as url:
            return run_faults(replace(settings, postgres_url=url), faults, keep_logs)
    say(f"encoding {len(CLIPS)} recordings to Opus")
    templates = encode_templates()
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mqvox-faults-") as folder:
        for fault in (name for name in FAULTS if name in faults):
            rig = FaultRig(settings, fault, Path(folder) / fault, templates)
            with rig:
                try:
                    reports[fault] = rig.run()
                finally:
                    if keep_logs is not None:
                        rig.keep_logs(keep_logs / fault)
    return reports


@contextlib.contextmanager
def _throwaway_postgres() -> Iterator[str]:
    """A PostgreSQL server of the bench's own (tests/throwaway_postgres.py): its URL, until the block ends."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # run as a script, only bench/ is on the path
    from tests.throwaway_postgres import ThrowawayPostgres

    with ThrowawayPostgres() as server:
        say(f"a throwaway PostgreSQL on port {server.port}")
        yield server.url


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM ends the bench as Ctrl-C does: through every cleanup."""

    def exit_once(*_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        sys.exit(143)

    previous = signal.signal(signal.SIGTERM, exit_once)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = FaultSettings()
    parser.add_argument("--devices", type=int, default=defaults.devices, help="devices per fault (%(default)s)")
    parser.add_argument("--utterances", type=int, default=defaults.utterances, help="per device (%(default)s)")
    parser.add_argument("--spread-s", type=float, default=defaults.spread_s, help="pacing of each device's load")
    parser.add_argument("--broker-down-s", type=float, default=defaults.broker_down_s)
    parser.add_argument("--restart-delay-s", type=float, default=defaults.restart_delay_s)
    parser.add_argument(
        "--gone-recovery", choices=("drain", "retire", "none"), default=defaults.gone_recovery, help="worker_gone"
    )
    parser.add_argument("--recover-after-s", type=float, default=defaults.recover_after_s, help="worker_gone")
    parser.add_argument("--db-outage-s", type=float, default=defaults.db_outage_s)
    parser.add_argument("--cut-s", type=float, default=defaults.cut_s)
    parser.add_argument("--cut-devices", type=int, default=defaults.cut_devices)
    parser.add_argument("--deadline-s", type=float, default=defaults.deadline_s, help="wait for answers at most")
    parser.add_argument("--stall-s", type=float, default=defaults.stall_s, help="or until none came for this long")
    parser.add_argument("--worker-threads", type=int, default=defaults.worker_threads)
    parser.add_argument(
        "--postgres-url",
        default=defaults.postgres_url,
        help="PostgreSQL to create a database beside (default: MQVOX_TEST_POSTGRES_URL, else a throwaway server)",
    )
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy worker and broker logs here, per fault")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated subset of {', '.join(FAULTS)} (default: all)"
    )
    args = parser.parse_args()
    faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        parser.error(f"unknown fault(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(FAULTS)}")
    settings = FaultSettings(
        devices=args.devices,
        utterances=args.utterances,
        spread_s=args.spread_s,
        broker_down_s=args.broker_down_s,
        restart_delay_s=args.restart_delay_s,
        gone_recovery=args.gone_recovery,
        recover_after_s=args.recover_after_s,
        db_outage_s=args.db_outage_s,
        cut_s=args.cut_s,
        cut_devices=min(args.cut_devices, args.devices),
        deadline_s=args.deadline_s,
        stall_s=args.stall_s,
        worker_threads=args.worker_threads,
        postgres_url=args.postgres_url,
    )
    with _terminate_as_exit():
        report = run_faults(settings, faults, args.keep_logs)
    print(json.dumps(report))
    return 0 if all(tally["lost"] == 0 and tally["duplicated"] == 0 for tally in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
