"""Provisioning of a fedpir federation for Flower's deployment engine.

One folder holds everything the federation operator creates::

    ROOT/registry.json              the registry: hospitals, key fingerprints, status (no secrets)
    ROOT/ca/ca.key, ca.crt          the federation CA (keep ca.key offline; it signs the SuperLink's
                                    TLS certificate)
    ROOT/superlink/                 the server kit: ca.crt, server.crt, server.key
    ROOT/hospitals/NAME/            hospital NAME's kit: ca.crt (to verify the SuperLink) and its node
                                    key pair supernode.key (OpenSSH EC private key, as
                                    ``flower-supernode --auth-supernode-private-key`` reads it) and
                                    supernode.pub (what the operator registers with
                                    ``flwr supernode register``)
    ROOT/retired/NAME/              public keys of revoked or rotated node keys, with the time

Private keys are written with mode 0600 into folders with mode 0700, and never printed. A hospital
may generate its key pair itself and hand over only the public key (``public_key=`` below); then its
kit holds no private key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REGISTRY = "registry.json"
CURVES: dict[str, type[ec.EllipticCurve]] = {"p256": ec.SECP256R1, "p384": ec.SECP384R1}
#: Names the SuperLink certificate always covers (the loopback deployment and the server machine itself).
DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: Files of the kits, by role (the command lines in fedpir.deployment.commands use these names).
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.crt", "server.key"
NODE_KEY, NODE_PUB = "supernode.key", "supernode.pub"


class ProvisionError(ValueError):
    """A provisioning request that cannot be done as asked (reported as one line by the CLI)."""


@dataclass
class Federation:
    """The registry of a provisioned federation (``registry.json``)."""

    root: Path
    name: str
    curve: str
    server_names: list[str]
    hospitals: dict[str, dict] = field(default_factory=dict)

    @property
    def ca_cert(self) -> Path:
        """The federation CA certificate (public)."""
        return self.root / "ca" / CA_CERT

    @property
    def superlink_dir(self) -> Path:
        """The server kit."""
        return self.root / "superlink"

    def hospital_dir(self, name: str) -> Path:
        """Hospital ``name``'s kit."""
        return self.root / "hospitals" / name

    def active(self) -> list[str]:
        """Names of the hospitals whose key is currently valid."""
        return [n for n, h in self.hospitals.items() if h["status"] == "active"]

    def save(self) -> None:
        """Write the registry (atomically)."""
        data = {"name": self.name, "curve": self.curve, "server_names": self.server_names, "hospitals": self.hospitals}
        tmp = self.root / (REGISTRY + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.root / REGISTRY)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Create ``path`` with ``mode`` (never overwriting: a key is never replaced silently)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(mode)
    return path


def ssh_fingerprint(public_key_line: bytes | str) -> str:
    """OpenSSH-style fingerprint (``SHA256:...``, as ``ssh-keygen -lf`` prints) of a public key line."""
    text = public_key_line.decode() if isinstance(public_key_line, bytes) else public_key_line
    blob = base64.b64decode(text.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _node_key_pair(curve: str, comment: str) -> tuple[bytes, bytes]:
    """A new EC key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVES[curve]())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def read_node_public_key(path: Path) -> bytes:
    """A hospital's own public key (OpenSSH line), checked to be EC on a NIST curve as Flower requires."""
    try:
        data = Path(path).read_bytes().strip()
        key = serialization.load_ssh_public_key(data)
    except (OSError, ValueError) as err:
        raise ProvisionError(f"cannot read an OpenSSH public key from {path}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ProvisionError(f"{path}: the node key must be EC on a NIST curve (P-256/P-384/P-521), "
                             f"got {type(key).__name__}")
    return data + b"\n"


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _cert(subject: str, public_key, issuer: x509.Name | None, signer, days: int, *, ca: bool,
          sans: list[str] | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans or []]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                       encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def check_name(name: str, what: str = "hospital") -> str:
    """A name usable as a folder and in node configs: lower case letters, digits, ``-`` and ``_``."""
    if not NAME_PATTERN.match(name):
        raise ProvisionError(f"{what} name {name!r} is not valid: use 1-63 lower-case letters, digits, '-' or '_'")
    return name


def init_federation(root: Path | str, name: str, server_names: list[str] | tuple[str, ...] = (),
                    curve: str = "p384", days: int = 825) -> Federation:
    """Create the CA, the SuperLink's TLS certificate (for ``localhost``, ``127.0.0.1``, ``::1`` and
    ``server_names``) and an empty registry in a new folder ``root``."""
    root = Path(root)
    check_name(name, "federation")
    if curve not in CURVES:
        raise ProvisionError(f"curve {curve!r} unknown; valid: {', '.join(CURVES)}")
    if (root / REGISTRY).exists():
        raise ProvisionError(f"{root} already holds a federation ({REGISTRY}); nothing changed")
    if root.exists() and any(root.iterdir()):
        raise ProvisionError(f"{root} exists and is not empty; give a new folder")
    sans = list(dict.fromkeys([*DEFAULT_SANS, *server_names]))
    for s in server_names:
        if not s or any(c.isspace() for c in s) or "/" in s:
            raise ProvisionError(f"server name {s!r} is not a host name or IP address")
    _private_dir(root)
    ca_dir, link_dir = _private_dir(root / "ca"), _private_dir(root / "superlink")
    _private_dir(root / "hospitals")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _cert(f"fedpir {name} CA", ca_key.public_key(), None, ca_key, days * 2, ca=True)
    _write(ca_dir / "ca.key", _key_pem(ca_key), 0o600)
    _write(ca_dir / CA_CERT, _pem(ca_cert))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _cert(f"fedpir {name} SuperLink", server_key.public_key(), ca_cert.subject, ca_key, days,
                        ca=False, sans=sans)
    _write(link_dir / SERVER_KEY, _key_pem(server_key), 0o600)
    _write(link_dir / SERVER_CERT, _pem(server_cert))
    _write(link_dir / CA_CERT, _pem(ca_cert))
    fed = Federation(root, name, curve, sans)
    fed.save()
    return fed


def load_federation(root: Path | str) -> Federation:
    """The registry of the federation in ``root``."""
    root = Path(root)
    path = root / REGISTRY
    if not path.is_file():
        raise ProvisionError(f"{root} holds no federation ({REGISTRY} missing); run `fedpir provision init` first")
    data = json.loads(path.read_text())
    return Federation(root, data["name"], data["curve"], data["server_names"], data.get("hospitals", {}))


def _install_node_key(fed: Federation, name: str, public_key: Path | None) -> dict:
    kit = _private_dir(fed.hospital_dir(name))
    if public_key is not None:
        pub = read_node_public_key(public_key)
        origin = "hospital"
    else:
        private, pub = _node_key_pair(fed.curve, f"fedpir-{fed.name}-{name}")
        _write(kit / NODE_KEY, private, 0o600)
        origin = "provisioned"
    _write(kit / NODE_PUB, pub)
    return {"fingerprint": ssh_fingerprint(pub), "key_origin": origin, "since": _now()}


def add_hospital(root: Path | str, name: str, public_key: Path | str | None = None) -> Federation:
    """Give hospital ``name`` a kit: the CA certificate and a node key pair (or its own public key)."""
    fed = load_federation(root)
    check_name(name)
    if name in fed.hospitals:
        status = fed.hospitals[name]["status"]
        hint = "rotate its key with `fedpir provision rotate`" if status == "active" else "choose a new name"
        raise ProvisionError(f"hospital {name!r} already exists ({status}); {hint}")
    kit = fed.hospital_dir(name)
    if kit.exists():
        raise ProvisionError(f"{kit} exists but is not in {REGISTRY}; remove it or choose another name")
    try:
        key = _install_node_key(fed, name, Path(public_key) if public_key else None)
        _write(kit / CA_CERT, fed.ca_cert.read_bytes())
    except BaseException:
        shutil.rmtree(kit, ignore_errors=True)
        raise
    fed.hospitals[name] = {"status": "active", **key}
    fed.save()
    return fed


def _retire_key(fed: Federation, name: str, reason: str) -> Path:
    """Move the hospital's current public key to retired/ and delete its private key, if we hold it."""
    kit = fed.hospital_dir(name)
    retired = _private_dir(fed.root / "retired" / name)
    stamp = _now().replace(":", "")
    target = retired / f"{stamp}-{reason}-{NODE_PUB}"
    (kit / NODE_PUB).replace(target)
    (kit / NODE_KEY).unlink(missing_ok=True)
    return target


def _retire_node_id(entry: dict) -> None:
    """The node id of a retired key goes to ``unregister`` (what the operator must still unregister)."""
    if "node_id" in entry:
        entry.setdefault("unregister", []).append(entry.pop("node_id"))


def _hospital(fed: Federation, name: str) -> dict:
    if name not in fed.hospitals:
        known = ", ".join(sorted(fed.hospitals)) or "none"
        raise ProvisionError(f"unknown hospital {name!r}; known: {known}")
    return fed.hospitals[name]


def record_node_id(root: Path | str, name: str, node_id: int) -> Federation:
    """Note the node id ``flwr supernode register`` printed for the hospital's current key (needed to
    unregister it; ``flwr supernode list`` shows ids, not names)."""
    fed = load_federation(root)
    entry = _hospital(fed, name)
    if entry["status"] != "active":
        raise ProvisionError(f"hospital {name!r} is {entry['status']}; its key is not to be registered")
    entry["node_id"] = int(node_id)
    fed.save()
    return fed


def forget_retired_node_id(root: Path | str, name: str, node_id: int) -> Federation:
    """Drop ``node_id`` from the hospital's ``unregister`` list (the SuperLink no longer accepts it)."""
    fed = load_federation(root)
    entry = _hospital(fed, name)
    remaining = [i for i in entry.get("unregister", []) if i != node_id]
    if remaining:
        entry["unregister"] = remaining
    else:
        entry.pop("unregister", None)
    fed.save()
    return fed


def revoke_hospital(root: Path | str, name: str) -> tuple[Federation, str]:
    """Mark the hospital revoked and retire its key; returns the federation and the revoked fingerprint.
    (The SuperLink forgets the node only when the operator unregisters it: see the printed steps.)"""
    fed = load_federation(root)
    entry = _hospital(fed, name)
    if entry["status"] == "revoked":
        raise ProvisionError(f"hospital {name!r} is already revoked (since {entry['revoked']})")
    fingerprint = entry["fingerprint"]
    _retire_key(fed, name, "revoked")
    _retire_node_id(entry)
    entry.update(status="revoked", revoked=_now())
    entry.setdefault("retired", []).append(fingerprint)
    fed.save()
    return fed, fingerprint


def rotate_hospital(root: Path | str, name: str, public_key: Path | str | None = None) -> tuple[Federation, str]:
    """Replace the hospital's node key (new pair, or its own new public key); returns the old fingerprint."""
    fed = load_federation(root)
    entry = _hospital(fed, name)
    if entry["status"] != "active":
        raise ProvisionError(f"hospital {name!r} is {entry['status']}; add it again under a new name")
    new_pub = read_node_public_key(Path(public_key)) if public_key else None
    if new_pub is not None and ssh_fingerprint(new_pub) == entry["fingerprint"]:
        raise ProvisionError(f"{public_key} is the hospital's current key; rotation needs a new one")
    old = entry["fingerprint"]
    _retire_key(fed, name, "rotated")
    _retire_node_id(entry)
    entry.update(_install_node_key(fed, name, Path(public_key) if public_key else None))
    entry.setdefault("retired", []).append(old)
    fed.save()
    return fed, old


def node_key_pair_for_hospital(out: Path | str, curve: str = "p384", comment: str = "fedpir-node") -> Path:
    """Generate a node key pair at the hospital itself (so the private key never leaves it): writes
    ``out/supernode.key`` (0600) and ``out/supernode.pub``; returns the public key's path."""
    out = _private_dir(Path(out))
    if (out / NODE_KEY).exists() or (out / NODE_PUB).exists():
        raise ProvisionError(f"{out} already holds a node key; move it away first")
    private, pub = _node_key_pair(curve, comment)
    _write(out / NODE_KEY, private, 0o600)
    return _write(out / NODE_PUB, pub)
