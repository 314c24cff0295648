"""Ed25519 signatures on model manifests: the operator signs, the device verifies.

A device trusts a model only through its manifest's signature, made with a key whose
public half was provisioned on the device. The key id in the manifest says which key
signed it, so a device can tell "signed by a key I do not know" from "tampered with".
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.model import ModelManifest


class SignatureError(ValueError):
    """A manifest that is not signed by the key it should be, or a key file that cannot be used."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM files and return its key id.

    The private key file is created with mode 0600 and never overwritten: losing the
    only copy of a fleet's signing key by a mistyped command would strand the fleet.
    """
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} exists already; refusing to overwrite a key")
    public_path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(private_path, private_pem)
    public_path.write_bytes(public_pem)
    return key_id(private_key.public_key())


def write_private_file(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a secret (a private key) readable by its owner only: mode 0600 from the moment it exists.

    Without ``replace`` an existing file is an error (FileExistsError); with it, the new
    content goes to a temporary 0600 file that is renamed over the old one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(f".{path.name}.tmp") if replace else path
    if replace:
        target.unlink(missing_ok=True)
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    if replace:
        os.replace(target, path)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file; SignatureError if it is missing or not one."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise SignatureError(f"cannot read the signing key {path}: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file; SignatureError if it is missing or not one."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        raise SignatureError(f"cannot read the public key {path}: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign_manifest(manifest: ModelManifest, private_key: Ed25519PrivateKey) -> ModelManifest:
    """``manifest`` with its key id and signature set by ``private_key``."""
    unsigned = dataclasses.replace(manifest, key_id=key_id(private_key.public_key()), signature="A" * 86 + "==")
    signature = private_key.sign(unsigned.signing_bytes())
    return dataclasses.replace(unsigned, signature=base64.b64encode(signature).decode("ascii"))


def verify_manifest(manifest: ModelManifest, public_key: Ed25519PublicKey) -> None:
    """Raise SignatureError unless ``public_key`` signed exactly this manifest."""
    expected = key_id(public_key)
    if manifest.key_id != expected:
        raise SignatureError(f"signed by key {manifest.key_id}, but this device trusts only key {expected}")
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
        public_key.verify(signature, manifest.signing_bytes())
    except (InvalidSignature, binascii.Error):
        raise SignatureError(f"the signature does not match the manifest (key {expected})") from None
