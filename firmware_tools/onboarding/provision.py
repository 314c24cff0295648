"""A fleet folder: the CA, one certificate per client, the broker's TLS files and ACL, and each device's config.

Layout (``python -m firmware_tools provision --fleet-dir FLEET``):

- ``inventory.json``: every client (name, role, certificate serial, expiry, a device's
  channel), the revoked serials, and the broker's host names.
- ``ca/``: ``ca.key`` (0600) and ``ca.pem``. Created once; keep the key offline.
- ``broker/``: what the production broker reads from /etc/mosquitto/mqvox/:
  ``mosquitto.conf``, ``ca.pem``, ``server.pem``, ``server.key``, ``crl.pem`` and ``acl``.
- ``clients/<name>/``: ``ca.pem``, ``cert.pem``, ``key.pem`` (0600). A device's folder
  also has ``device.toml`` and ``signing.pub``: it is the device's /etc/mqvox/.

Each client's files are written only when that client is provisioned, re-issued or
revoked; the shared files (ACL, CRL) are regenerated from the inventory every time.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker_config.acl import Client, Role, render_acl
from broker_config.broker import PROD_CONFIG
from common.mqtt import TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE
from firmware_tools.onboarding.certificates import (
    CertificateAuthority,
    certificate_pem,
    key_pem,
    new_key,
)
from schemas.errors import ProtocolError
from schemas.signing import load_public_key, write_private_file
from schemas.topics import check_identifier

INVENTORY_FILE = "inventory.json"
SIGNING_KEY_FILE = "signing.pub"
"""The model-signing public key, kept in the fleet folder and copied into each device's folder."""
DEVICE_CONFIG_FILE = "device.toml"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
CRL_FILE = "crl.pem"
ACL_FILE = "acl"
BROKER_CONFIG_FILE = "mosquitto.conf"

DEFAULT_BROKER_NAMES = ("localhost", "127.0.0.1")
"""The broker certificate's names when none are given: enough for a broker on the same machine."""
RENEW_SERVER_DAYS = 30
"""A provision run re-issues the broker's certificate when it expires within this many days."""
TLS_PORT = 8883
"""The production broker's port (the IANA port of MQTT over TLS)."""


class ProvisionError(ValueError):
    """A provisioning request that cannot be carried out; nothing was changed."""


@dataclass(frozen=True)
class ProvisionSettings:
    """Validity periods and the broker's address, as the provision command takes them."""

    broker_names: tuple[str, ...] | None = None
    """DNS names and IP addresses of the broker, in its certificate; devices connect to the first.
    None keeps the fleet folder's (DEFAULT_BROKER_NAMES for a new one); new names re-issue the broker's certificate."""
    broker_port: int | None = None
    """The port devices connect to; None keeps the fleet folder's (TLS_PORT for a new one)."""
    client_days: int = 825
    """Validity of client and broker certificates (days)."""
    ca_days: int = 3650
    """Validity of the CA certificate (days), when it is created."""
    crl_days: int = 365
    """The CRL's next update (days). OpenSSL refuses every client once it has passed: re-run provision before."""

    def __post_init__(self) -> None:
        for name in ("client_days", "ca_days", "crl_days"):
            if getattr(self, name) < 1:
                raise ProvisionError(f"{name} must be at least 1 day")
        if self.broker_names is not None and not self.broker_names:
            raise ProvisionError("the broker needs at least one name")
        if self.broker_port is not None and not 0 < self.broker_port < 65536:
            raise ProvisionError(f"{self.broker_port} is not a TCP port")


@dataclass
class ClientRecord:
    """One provisioned client in the inventory."""

    role: Role
    serial: str
    """Serial number of its current certificate, hexadecimal."""
    not_after: str
    """Expiry of its current certificate, ISO 8601 UTC."""
    channel: str | None = None
    """A device's model channel."""


@dataclass
class RevokedRecord:
    """A revoked certificate, listed in the CRL."""

    name: str
    serial: str
    revoked_at: str


@dataclass
class Inventory:
    """What the fleet folder holds, as inventory.json."""

    broker_names: list[str]
    broker_port: int
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    revoked: list[RevokedRecord] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Inventory:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            broker_names=data["broker_names"],
            broker_port=data["broker_port"],
            clients={
                name: ClientRecord(**(record | {"role": Role(record["role"])}))
                for name, record in data["clients"].items()
            },
            revoked=[RevokedRecord(**record) for record in data["revoked"]],
        )

    def save(self, path: Path) -> None:
        data = asdict(self)
        data["clients"] = dict(sorted(data["clients"].items()))
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ProvisionOutcome:
    """What one provision run did; printed as JSON by the command."""

    fleet_dir: str
    ca_created: bool
    created: list[str]
    refreshed: list[str]
    reissued: list[str]
    revoked: list[str]
    clients: int
    crl_next_update: str


def _toml_string(value: str) -> str:
    # A TOML basic string: JSON's escapes are valid TOML ones.
    return json.dumps(value)


def device_config_text(
    device_id: str,
    *,
    broker_host: str,
    broker_port: int,
    channel: str,
    model_dir: str | None = None,
    state_dir: str | None = None,
) -> str:
    """The device.toml of a provisioned device; its file paths are relative to the folder it sits in."""
    lines = [
        "# mqvox device configuration, written by `python -m firmware_tools provision`.",
        "# Every other setting has its default: see device/config.example.toml.",
        f"device_id = {_toml_string(device_id)}",
        "",
        "[broker]",
        f"host = {_toml_string(broker_host)}",
        f"port = {broker_port}",
        "",
        "[broker.tls]",
        f"ca_file = {_toml_string(TLS_CA_FILE)}",
        f"cert_file = {_toml_string(TLS_CERT_FILE)}",
        f"key_file = {_toml_string(TLS_KEY_FILE)}",
    ]
    if model_dir is not None:
        lines += ["", "[model]", f"directory = {_toml_string(model_dir)}"]
    lines += ["", "[ota]", f"public_key = {_toml_string(SIGNING_KEY_FILE)}", f"channel = {_toml_string(channel)}"]
    if state_dir is not None:
        lines.append(f"state_dir = {_toml_string(state_dir)}")
    return "\n".join(lines) + "\n"


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds")


class Fleet:
    """A fleet folder: load it (creating the CA on first use), change it, and write what changed."""

    def __init__(self, folder: Path, settings: ProvisionSettings) -> None:
        self.folder = Path(folder)
        self.settings = settings
        self.ca_created = False
        inventory_path = self.folder / INVENTORY_FILE
        if inventory_path.exists():
            self.ca = CertificateAuthority.load(self.folder / "ca")
            self.inventory = Inventory.load(inventory_path)
        else:
            if (self.folder / "ca").exists():
                raise ProvisionError(f"{self.folder / 'ca'} exists without {inventory_path}; refusing to replace a CA")
            name = f"mqvox fleet CA ({self.folder.resolve().name})"
            self.ca = CertificateAuthority.create(name, days=settings.ca_days)
            self.inventory = Inventory(broker_names=[], broker_port=0)
            self.ca_created = True

    @classmethod
    def open(cls, folder: Path) -> Fleet:
        """A fleet folder that provision has written; ProvisionError if there is none."""
        if not (Path(folder) / INVENTORY_FILE).exists():
            raise ProvisionError(f"{folder} is not a fleet folder (no {INVENTORY_FILE}): run provision first")
        return cls(folder, ProvisionSettings())

    def client_dir(self, name: str) -> Path:
        return self.folder / "clients" / name

    @property
    def signing_key_path(self) -> Path:
        return self.folder / SIGNING_KEY_FILE

    def provision(
        self,
        clients: list[Client],
        *,
        reissue: list[str] = (),
        revoke: list[str] = (),
        channel: str = "stable",
        signing_key: Path | None = None,
    ) -> ProvisionOutcome:
        """Add ``clients`` (refreshing the files of those already there), re-issue and revoke by name."""
        self._check_request(clients, reissue, revoke, channel)
        if signing_key is not None:
            try:
                load_public_key(signing_key)
            except ValueError as error:
                raise ProvisionError(str(error)) from None
        elif any(client.role is Role.DEVICE for client in clients) and not self.signing_key_path.exists():
            raise ProvisionError(
                "devices need the model-signing public key: give --signing-key (from `firmware_tools keygen`)"
            )

        self.folder.mkdir(parents=True, exist_ok=True)
        if self.ca_created:
            self.ca.save(self.folder / "ca")
        if signing_key is not None:
            shutil.copyfile(signing_key, self.signing_key_path)
        names = list(self.settings.broker_names or self.inventory.broker_names or DEFAULT_BROKER_NAMES)
        port = self.settings.broker_port or self.inventory.broker_port or TLS_PORT
        if names != self.inventory.broker_names or port != self.inventory.broker_port:
            self.inventory.broker_names, self.inventory.broker_port = names, port
            self._issue_server_certificate()
        elif self._server_certificate_expires_within(dt.timedelta(days=RENEW_SERVER_DAYS)):
            self._issue_server_certificate()

        created, refreshed = [], []
        for client in clients:
            record = self.inventory.clients.get(client.name)
            if record is None:
                self._issue(client, channel)
                created.append(client.name)
            else:
                if client.role is Role.DEVICE:
                    record.channel = channel
                self._write_client_files(client.name, record)
                refreshed.append(client.name)
        for name in reissue:
            record = self.inventory.clients[name]
            self._revoke_serial(name, record.serial)
            self._issue(Client(name, record.role), record.channel)
        for name in revoke:
            record = self.inventory.clients.pop(name)
            self._revoke_serial(name, record.serial)
            shutil.rmtree(self.client_dir(name), ignore_errors=True)

        next_update = self._write_broker_files()
        self.inventory.save(self.folder / INVENTORY_FILE)
        return ProvisionOutcome(
            fleet_dir=str(self.folder),
            ca_created=self.ca_created,
            created=created,
            refreshed=refreshed,
            reissued=list(reissue),
            revoked=list(revoke),
            clients=len(self.inventory.clients),
            crl_next_update=next_update,
        )

    def _check_request(self, clients: list[Client], reissue, revoke, channel: str) -> None:
        try:
            check_identifier("channel", channel)
        except ProtocolError as error:
            raise ProvisionError(error.reason) from None
        named = [client.name for client in clients] + list(reissue) + list(revoke)
        repeated = sorted({name for name in named if named.count(name) > 1})
        if repeated:
            raise ProvisionError(f"named more than once: {', '.join(repeated)}")
        for client in clients:
            record = self.inventory.clients.get(client.name)
            if record is not None and record.role is not client.role:
                raise ProvisionError(f"{client.name} is already a {record.role}, not a {client.role}")
        unknown = [name for name in [*reissue, *revoke] if name not in self.inventory.clients]
        if unknown:
            raise ProvisionError(f"not provisioned: {', '.join(unknown)}")

    def _issue(self, client: Client, channel: str | None) -> None:
        key = new_key()
        certificate = self.ca.issue(client.name, key.public_key(), days=self.settings.client_days)
        record = ClientRecord(
            role=client.role,
            serial=f"{certificate.serial_number:x}",
            not_after=_iso(certificate.not_valid_after_utc),
            channel=channel if client.role is Role.DEVICE else None,
        )
        self.inventory.clients[client.name] = record
        folder = self.client_dir(client.name)
        folder.mkdir(parents=True, exist_ok=True)
        write_private_file(folder / TLS_KEY_FILE, key_pem(key), replace=True)
        (folder / TLS_CERT_FILE).write_bytes(certificate_pem(certificate))
        self._write_client_files(client.name, record)

    def _write_client_files(self, name: str, record: ClientRecord) -> None:
        folder = self.client_dir(name)
        (folder / TLS_CA_FILE).write_bytes(certificate_pem(self.ca.certificate))
        if record.role is Role.DEVICE:
            shutil.copyfile(self.signing_key_path, folder / SIGNING_KEY_FILE)
            (folder / DEVICE_CONFIG_FILE).write_text(
                device_config_text(
                    name,
                    broker_host=self.inventory.broker_names[0],
                    broker_port=self.inventory.broker_port,
                    channel=record.channel,
                ),
                encoding="utf-8",
            )

    def _revoke_serial(self, name: str, serial: str) -> None:
        self.inventory.revoked.append(RevokedRecord(name, serial, _iso(dt.datetime.now(dt.UTC))))

    def _server_certificate_expires_within(self, margin: dt.timedelta) -> bool:
        path = self.folder / "broker" / SERVER_CERT_FILE
        if not path.exists():
            return True
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        return certificate.not_valid_after_utc < dt.datetime.now(dt.UTC) + margin

    def _issue_server_certificate(self) -> None:
        folder = self.folder / "broker"
        folder.mkdir(parents=True, exist_ok=True)
        key = new_key()
        names = tuple(self.inventory.broker_names)
        certificate = self.ca.issue(names[0], key.public_key(), days=self.settings.client_days, server_names=names)
        write_private_file(folder / SERVER_KEY_FILE, key_pem(key), replace=True)
        (folder / SERVER_CERT_FILE).write_bytes(certificate_pem(certificate))

    def _write_broker_files(self) -> str:
        folder = self.folder / "broker"
        revoked = {
            int(record.serial, 16): dt.datetime.fromisoformat(record.revoked_at) for record in self.inventory.revoked
        }
        crl = self.ca.revocation_list(revoked, days=self.settings.crl_days)
        (folder / CRL_FILE).write_bytes(crl.public_bytes(Encoding.PEM))
        (folder / TLS_CA_FILE).write_bytes(certificate_pem(self.ca.certificate))
        clients = [Client(name, record.role) for name, record in self.inventory.clients.items()]
        (folder / ACL_FILE).write_text(render_acl(clients), encoding="utf-8")
        config = resources.files("broker_config").joinpath(PROD_CONFIG).read_text(encoding="utf-8")
        (folder / BROKER_CONFIG_FILE).write_text(config, encoding="utf-8")
        return _iso(crl.next_update_utc)


def parse_clients(role: Role, names: list[str] | None) -> list[Client]:
    """Clients of one role from the command line; ProvisionError for a name that cannot be a CN and user name."""
    try:
        return [Client(name, role) for name in names or ()]
    except ProtocolError as error:
        raise ProvisionError(f"--{role}: {error.reason}") from None
