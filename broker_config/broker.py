"""Run Mosquitto from broker_config/ on loopback or a local address, on a given or free port, with a data folder."""

from __future__ import annotations

import errno
import getpass
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEV_CONFIG = "mosquitto.dev.conf"
"""The development config in this folder: loopback, anonymous, plain TCP."""

PROD_CONFIG = "mosquitto.prod.conf"
"""The production config in this folder: TLS with client certificates and ACLs."""

CONFIGS = {"dev": DEV_CONFIG, "prod": PROD_CONFIG}
"""The configs by their short names, as ``python -m broker_config start --config`` takes them."""

PROD_TLS_DIR = "/etc/mosquitto/mqvox/"
"""Where the production config expects the CA, the broker's certificate and key, the CRL and the ACL file."""

LOOPBACK = "127.0.0.1"
"""Where a broker listens unless told otherwise: this machine alone can reach it."""

STATE_FILE = "broker.json"
"""Written into the data directory: port and pid of the running broker, read by ``stop``."""


class BrokerStartError(RuntimeError):
    """Mosquitto did not start or did not accept connections in time."""


def free_port(address: str = LOOPBACK) -> int:
    """A TCP port on ``address`` (an IP address of this machine) that nothing listens on right now."""
    with socket.socket(_family(address), socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def check_bind_address(address: str) -> str:
    """``address`` if a listener can bind it: an IP address of one of this machine's interfaces, or a wildcard.

    Raises ValueError saying why not: a host name, or an address that belongs to another machine.
    """
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"cannot listen on {address!r}: not an IP address; `ip -brief address` lists this machine's"
        ) from None
    try:
        free_port(address)
    except OSError as error:
        if error.errno == errno.EADDRNOTAVAIL:
            raise ValueError(
                f"cannot listen on {address}: not an address of this machine; `ip -brief address` lists its addresses"
            ) from None
        raise ValueError(f"cannot listen on {address}: {error.strerror}") from None
    return address


def exposure_warning(config: str, address: str, port: int) -> str | None:
    """The warning for a development broker that listens beyond loopback; None for loopback or TLS."""
    if config != DEV_CONFIG or ipaddress.ip_address(address).is_loopback:
        return None
    where = f"{address}:{port}" + (" (every interface)" if ipaddress.ip_address(address).is_unspecified else "")
    return (
        f"warning: this development broker listens on {where} with no authentication and no encryption: anyone "
        "on that network can read every message and publish to every topic, commands to devices included; use "
        "it on a network you trust, and the production config (--config prod) anywhere else"
    )


def render_config(
    template: str, *, port: int, data_dir: Path, tls_dir: Path | None = None, bind: str = LOOPBACK
) -> str:
    """A config of this folder with this broker's address and port, data directory, log file and user.

    ``tls_dir`` replaces the production config's /etc/mosquitto/mqvox/, where its TLS files and ACL are.
    """
    if PROD_TLS_DIR in template:
        if tls_dir is None:
            raise ValueError(f"this config reads its TLS files from {PROD_TLS_DIR}: give the folder that has them")
        template = template.replace(PROD_TLS_DIR, f"{Path(tls_dir).resolve()}/")
    replacements = {
        r"^listener \d+(?: \S+)?$": f"listener {port} {bind}",
        r"^persistence_location .*$": f"persistence_location {data_dir}/",
        r"^log_dest .*$": f"log_dest file {data_dir}/mosquitto.log",
    }
    text = template
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"the config has no line matching {pattern!r}")
    # Run as whoever starts it, so the data directory stays theirs (as root, mosquitto
    # would otherwise switch to the 'mosquitto' user).
    return text + f"\nuser {getpass.getuser()}\n"


@dataclass
class Broker:
    """One Mosquitto process from a config of this folder. A context manager, or start() / stop()."""

    data_dir: Path
    """Its config, persistence file, log and state file live here."""
    port: int = 0
    """TCP port on ``bind``; 0 picks a free one."""
    config: str = DEV_CONFIG
    """Which config of this folder: DEV_CONFIG or PROD_CONFIG."""
    tls_dir: Path | None = None
    """PROD_CONFIG only: the folder with ca.pem, server.pem, server.key, crl.pem and acl (provision's broker/)."""
    executable: str = "mosquitto"
    """The mosquitto binary."""
    bind: str = LOOPBACK
    """The IP address it listens on: loopback, or one of this machine's for clients on its network (see
    ``check_bind_address``; with DEV_CONFIG, anyone there may then use it: ``exposure_warning``)."""
    process: subprocess.Popen | None = None
    _log_offset: int = 0

    @property
    def reachable_address(self) -> str:
        """An address this machine reaches the broker on: ``bind``, or loopback when it binds every interface."""
        address = ipaddress.ip_address(self.bind)
        if address.is_unspecified:
            return "::1" if address.version == 6 else LOOPBACK
        return self.bind

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def start(self, timeout_s: float = 10.0) -> Broker:
        """Start Mosquitto and wait until it accepts TCP connections; retries another port if one was taken."""
        binary = shutil.which(self.executable) or shutil.which(self.executable, path="/usr/sbin:/sbin")
        if binary is None:
            raise BrokerStartError(f"{self.executable} not found: run `make setup` (Debian package 'mosquitto')")
        self.data_dir = Path(self.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        template = resources.files("broker_config").joinpath(self.config).read_text(encoding="utf-8")
        attempts = 3 if self.port == 0 else 1
        for _ in range(attempts):
            port = self.port or free_port(self.bind)
            config = self.data_dir / "mosquitto.conf"
            config.write_text(
                render_config(template, port=port, data_dir=self.data_dir, tls_dir=self.tls_dir, bind=self.bind),
                encoding="utf-8",
            )
            self._log_offset = self.log_size()
            # Output goes to a file, not a pipe: `start` leaves the broker running after it exits.
            with open(self.data_dir / "mosquitto.stderr", "wb") as stderr:
                self.process = subprocess.Popen(
                    [binary, "-c", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,  # a Ctrl-C in the terminal is for us, not for the broker
                )
            if self._wait_listening(port, timeout_s):
                self.port = port
                (self.data_dir / STATE_FILE).write_text(json.dumps({"port": port, "pid": self.process.pid}))
                return self
            self._reap()
        output = (self.data_dir / "mosquitto.stderr").read_text(errors="replace").strip()
        raise BrokerStartError(f"mosquitto did not start on {self.bind}: {output or 'no output'}; see {self.log_path}")

    def _wait_listening(self, port: int, timeout_s: float) -> bool:
        # A TCP probe alone could reach another broker on the same port while this one
        # dies; mosquitto logs "running" only once all its listeners are open.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if " running" in self.log_since(self._log_offset):
                try:
                    with socket.create_connection((self.reachable_address, port), timeout=0.2):
                        return self.process.poll() is None
                except OSError:
                    pass
            time.sleep(0.05)
        return False

    def log_size(self) -> int:
        """The log's length now (bytes): an offset for ``log_since``."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        """What Mosquitto logged after ``offset`` (from ``log_size``)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", errors="replace")

    def _reap(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def reload(self, timeout_s: float = 10.0) -> None:
        """SIGHUP: Mosquitto re-reads its config and ACL file; returns once it has logged the reload."""
        offset = self.log_size()
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Reloading config" in self.log_since(offset):
                return
            time.sleep(0.05)
        raise BrokerStartError(f"mosquitto did not log a reload within {timeout_s} s; see {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), then SIGKILL after ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reap()
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        self.process = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_recorded(data_dir: Path, timeout_s: float = 10.0) -> int | None:
    """Stop the broker a previous ``start`` recorded in ``data_dir``; its pid, or None if none was running."""
    state_path = Path(data_dir) / STATE_FILE
    if not state_path.exists():
        return None
    pid = json.loads(state_path.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state_path.unlink()
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
    state_path.unlink()
    return pid
