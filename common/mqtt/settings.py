"""Where the broker is and how to reach it: host, port, time-outs, TLS files, and the command-line options for them."""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from common.mqtt.errors import BrokerUnavailable

TLS_CA_FILE = "ca.pem"
TLS_CERT_FILE = "cert.pem"
TLS_KEY_FILE = "key.pem"
"""The files of a client folder written by ``firmware_tools provision``: CA, certificate and private key."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards the broker: the CA that signed the broker's certificate, and this client's own certificate."""

    ca_file: str
    """PEM file of the CA certificate(s) the broker's certificate must chain to."""
    cert_file: str | None = None
    """PEM file of this client's certificate, for brokers that require one (its CN is the client's identity)."""
    key_file: str | None = None
    """PEM file of the private key of ``cert_file``; None when the key is inside ``cert_file``."""

    @classmethod
    def from_folder(cls, folder: str) -> TlsSettings:
        """The CA, certificate and key of a client folder written by ``firmware_tools provision``."""
        if not os.path.isdir(folder):
            raise BrokerUnavailable(
                f"TLS folder {folder} {'is not a folder' if os.path.exists(folder) else 'does not exist'}: give a "
                f"client folder of firmware_tools provision, with {TLS_CA_FILE}, {TLS_CERT_FILE} and {TLS_KEY_FILE}"
            )
        return cls(f"{folder}/{TLS_CA_FILE}", f"{folder}/{TLS_CERT_FILE}", f"{folder}/{TLS_KEY_FILE}")

    def identity(self) -> str | None:
        """The CN of this client's certificate: the name the production broker knows it by, as its user name and
        its client id (use_username_as_clientid), whatever client id it asks for. None without a certificate.

        Raises BrokerUnavailable when the certificate is missing or not a certificate."""
        if self.cert_file is None:
            return None
        certificate = _check_pem(self.cert_file, "client certificate", x509.load_pem_x509_certificate)
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    def context(self) -> ssl.SSLContext:
        """A client context: the broker's certificate and host name verified, TLS 1.2 at least.

        Raises BrokerUnavailable naming the file that is missing, unreadable or not what it should be.
        """
        _check_pem(self.ca_file, "CA certificate", x509.load_pem_x509_certificates)
        if self.cert_file is not None:
            _check_pem(self.cert_file, "client certificate", x509.load_pem_x509_certificate)
        if self.key_file is not None:
            _check_pem(self.key_file, "private key", lambda data: serialization.load_pem_private_key(data, None))
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except ssl.SSLError as error:
            raise BrokerUnavailable(f"TLS: cannot use the CA certificate {self.ca_file}: {error.reason}") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as error:
                if error.reason == "KEY_VALUES_MISMATCH":
                    problem = f"the private key {self.key_file} is not the key of the certificate {self.cert_file}"
                else:
                    problem = f"cannot use the certificate {self.cert_file} with its key: {error.reason or error}"
                raise BrokerUnavailable(f"TLS: {problem}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


_Loaded = TypeVar("_Loaded")


def _check_pem(path: str, what: str, load: Callable[[bytes], _Loaded]) -> _Loaded:
    """What ``load`` reads in ``path``; BrokerUnavailable unless it is a readable file that ``load`` reads as
    ``what``."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BrokerUnavailable(f"TLS: the {what} {path} does not exist") from None
    except OSError as error:
        raise BrokerUnavailable(f"TLS: cannot read the {what} {path}: {error.strerror}") from None
    try:
        return load(data)
    except TypeError:
        # cryptography's answer to a key that needs a password.
        raise BrokerUnavailable(f"TLS: the {what} {path} is encrypted; mqvox needs it unencrypted") from None
    except ValueError:
        raise BrokerUnavailable(f"TLS: the {what} {path} is not a valid PEM {what}") from None


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how long to wait for it."""

    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = 1883
    """Broker TCP port."""
    keepalive_s: int = 30
    """MQTT keep-alive (seconds); the Last Will fires after about 1.5 times this without traffic."""
    connect_timeout_s: float = 10.0
    """How long to wait for CONNACK (seconds)."""
    tls: TlsSettings | None = None
    """TLS settings; None for a plain TCP connection (the loopback development broker)."""

    @property
    def address(self) -> str:
        """``host:port``, as messages name the broker."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of BrokerSettings, for every entry point that connects."""
    parser.add_argument("--host", default=BrokerSettings.host, help="MQTT broker host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=BrokerSettings.port, help="MQTT broker port (default: %(default)s)")
    parser.add_argument(
        "--tls",
        metavar="DIR",
        help=f"connect with TLS, with the {TLS_CA_FILE}, {TLS_CERT_FILE} and {TLS_KEY_FILE} of this client folder "
        "(firmware_tools provision); default: plain TCP",
    )


def broker_from_arguments(args: argparse.Namespace) -> BrokerSettings:
    """BrokerSettings from options added by add_broker_arguments."""
    tls = TlsSettings.from_folder(args.tls) if args.tls else None
    return BrokerSettings(host=args.host, port=args.port, tls=tls)
