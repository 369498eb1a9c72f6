"""Tamper evidence for a site's privacy ledger: a SHA-256 hash chain and Ed25519 signatures.

Every ledger entry carries ``prev``, the SHA-256 (hex) of the canonical encoding of the entry before
it (the first entry links to :data:`GENESIS`), and ``signature``, the site's Ed25519 signature
(base64) over the canonical encoding of the entry without its signature. The canonical encoding is
compact JSON with sorted keys (:func:`canonical`); Python floats round-trip exactly through JSON, so
an entry parsed back from the file re-encodes to the bytes that were signed.

The site's signing key is ``ledger_signing.key`` (PKCS#8 PEM, mode 0600, encrypted when the site
has a state key: :mod:`fedpir.privacy.at_rest`) in its state folder (mode 0700), created on first
use; the public key ``ledger_signing.pub`` (SubjectPublicKeyInfo PEM, plaintext) lies next to it
for the auditor. The private key is never printed or logged.

What the chain cannot show on its own: that entries were cut off at the *end* of the file (the
remaining prefix is still a valid chain). An auditor who keeps the hash of the last entry they saw
(``fedpir audit verify`` prints it) detects that on the next audit.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpir.privacy.at_rest import PLAINTEXT, StateCipher, read_private, write_private

GENESIS = "0" * 64
SIGNING_KEY_NAME = "ledger_signing.key"
PUBLIC_KEY_NAME = "ledger_signing.pub"
#: The ledger's sealed head (entry count and last hash, signed), beside the ledger: a ledger cut back,
#: or restored alone from a backup, no longer reaches it (fedpir.privacy.budget).
HEAD_NAME = "ledger_head.json"


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes that are hashed and signed: compact, key-sorted JSON of ``entry`` without its signature."""
    body = {k: v for k, v in entry.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of a whole entry, signature included: what the next entry's ``prev`` holds."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(entry: dict[str, Any], prev: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """``entry`` linked to ``prev`` and signed with ``key``."""
    body = {k: v for k, v in entry.items() if k not in ("prev", "signature")} | {"prev": prev}
    return body | {"signature": base64.b64encode(key.sign(canonical(body))).decode()}


def check_entry(entry: dict[str, Any], prev: str, public_key: Ed25519PublicKey) -> list[tuple[str, str]]:
    """The (rule, detail) violations of one entry: ``chain`` (wrong ``prev``), ``signature``."""
    problems: list[tuple[str, str]] = []
    if entry.get("prev") != prev:
        problems.append(("chain", f"prev hash {str(entry.get('prev'))[:12]}... does not match the entry before "
                                  f"({prev[:12]}...): an entry was removed, inserted, reordered or edited"))
    signature = entry.get("signature")
    if not isinstance(signature, str):
        problems.append(("signature", "entry is not signed"))
        return problems
    try:
        public_key.verify(base64.b64decode(signature, validate=True), canonical(entry))
    except (InvalidSignature, ValueError):
        problems.append(("signature", "signature does not verify with the site's public key"))
    return problems


def public_key_path(key_path: Path) -> Path:
    """Where the public key of the signing key ``key_path`` is exported."""
    return key_path.with_suffix(".pub")


def create_signing_key(key_path: Path, cipher: StateCipher = PLAINTEXT) -> Ed25519PrivateKey:
    """A new Ed25519 key at ``key_path`` (0600, folder 0700, encrypted under ``cipher``; an existing key
    is never overwritten) and its public key."""
    key_path = Path(key_path)
    if key_path.exists():
        raise FileExistsError(f"{key_path} exists: a site's signing key is never replaced")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(key_path, pem, cipher)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_private(public_key_path(key_path), public)
    return key


def load_signing_key(key_path: Path, cipher: StateCipher = PLAINTEXT) -> Ed25519PrivateKey:
    """The site's signing key; ValueError (no key material in the message) if it is not an Ed25519 key,
    StateKeyError if it is encrypted and ``cipher`` cannot decrypt it."""
    pem = read_private(key_path, cipher)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key_path}: not a readable unencrypted PEM private key") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{key_path}: the ledger signing key must be Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or a file of the 32 raw bytes."""
    data = Path(path).read_bytes()
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise ValueError(f"{path}: not a PEM or raw (32-byte) Ed25519 public key") from err
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def sign_head(entries: int, head: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The sealed head of a ledger of ``entries`` entries whose last hash is ``head``."""
    body = {"entries": entries, "head": head}
    return body | {"signature": base64.b64encode(key.sign(canonical(body))).decode()}


def check_head(sealed: Any, public_key: Ed25519PublicKey) -> tuple[int, str]:
    """(entries, head) of a sealed head; ValueError if it is malformed or its signature does not verify."""
    try:
        body = {"entries": int(sealed["entries"]), "head": str(sealed["head"])}
        public_key.verify(base64.b64decode(sealed["signature"], validate=True), canonical(body))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        raise ValueError("the ledger's sealed head is malformed or not signed by the site's key") from None
    return body["entries"], body["head"]
