"""The fleet's certificate authority: client and broker certificates, and the revocation list.

Keys are ECDSA P-256, which every TLS stack a device may have (OpenSSL 1.1 and 3,
mbedTLS) accepts for TLS 1.2 and 1.3. Certificates are X.509 v3 through ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.signing import write_private_file

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"


class CertificateError(ValueError):
    """A CA folder that cannot be used, or a certificate that cannot be issued."""


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM: whoever holds the file is the client, so guard the file."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA key and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    """Signs every certificate and the CRL; the one secret whose loss means re-provisioning the fleet."""
    certificate: x509.Certificate
    """Given to every client and to the broker, which trust what it signed."""

    @classmethod
    def create(cls, name: str, *, days: int) -> CertificateAuthority:
        """A new CA named ``name``, valid for ``days``."""
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @classmethod
    def load(cls, folder: Path) -> CertificateAuthority:
        """The CA saved in ``folder``; CertificateError if it is missing or its two files do not belong together."""
        try:
            key = serialization.load_pem_private_key((folder / CA_KEY_FILE).read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate((folder / CA_CERT_FILE).read_bytes())
        except (OSError, ValueError) as error:
            raise CertificateError(f"cannot load the CA in {folder}: {error}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
            raise CertificateError(f"{folder / CA_KEY_FILE} is not the key of {folder / CA_CERT_FILE}")
        return cls(key, certificate)

    def save(self, folder: Path) -> None:
        """Write the key (0600, never over an existing one) and the certificate into ``folder``."""
        write_private_file(folder / CA_KEY_FILE, key_pem(self.key))
        (folder / CA_CERT_FILE).write_bytes(certificate_pem(self.certificate))

    def issue(
        self,
        name: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        days: int,
        server_names: tuple[str, ...] = (),
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A certificate for ``name`` (its CN), valid for ``days`` from ``not_before`` (default: now).

        With ``server_names`` (DNS names or IP addresses) it is a TLS server certificate
        with those as its subject alternative names; otherwise a TLS client certificate.
        """
        start = not_before or _now() - dt.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(server) for server in server_names]), critical=False
            )
        return builder.sign(self.key, hashes.SHA256())

    def revocation_list(self, revoked: dict[int, dt.datetime], *, days: int) -> x509.CertificateRevocationList:
        """A CRL of these serial numbers (with when each was revoked), to be replaced within ``days``."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=days))
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256())


def _general_name(server: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(server))
    except ValueError:
        return x509.DNSName(server)
