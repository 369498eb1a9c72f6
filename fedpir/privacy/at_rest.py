"""A site's state at rest: private folders and files, encrypted when the site configures a key.

Every state folder is made 0700 and every state file 0600, written atomically (temporary file,
fsync, rename). With a state key configured in the node config, either ``state-key-file`` (a file,
0600, holding a Fernet key made by ``fedpir site state-key FILE``) or ``state-key-env`` (the *name*
of an environment variable holding one), the site's local layers and its ledger signing key are
encrypted with Fernet (``cryptography``: AES-128-CBC with HMAC-SHA256, authenticated), after a
:data:`MAGIC` line that says so. A wrong key, or an encrypted file with no key, is a one-line error;
a plaintext file found while a key is configured is encrypted in place on first read (adding a key
to a site that has state).

Without a key, state stays plaintext (0600) and ``fedpir site status`` says so. Encryption is not
the default because a key kept in the state folder next to what it encrypts protects nothing: the
key must come from outside it (a mounted secret, a key store), which only the site's admin can set
up. The privacy ledger and the public key stay plaintext on purpose: they hold no patient data, an
auditor reads them, and the ledger's integrity comes from its signatures.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.fernet import Fernet, InvalidToken

log = logging.getLogger("fedpir.client")

MAGIC = b"FEDPIR-ENCRYPTED-1\n"
STATE_KEY_FILE = "state-key-file"
STATE_KEY_ENV = "state-key-env"
KEY_HINT = f"node config {STATE_KEY_FILE}=FILE or {STATE_KEY_ENV}=VARIABLE"


class StateKeyError(ValueError):
    """The state key is missing, unreadable or not the one the state was encrypted with."""


@dataclass(frozen=True)
class StateCipher:
    """How a site's state is stored: Fernet with ``key``, or plaintext (``key`` None).
    ``source`` says where the key came from (for messages; never the key itself)."""

    key: bytes | None = field(default=None, repr=False)
    source: str = "no state key configured"

    @property
    def encrypts(self) -> bool:
        """Whether state is written encrypted."""
        return self.key is not None

    @classmethod
    def from_key_file(cls, path: Path | str) -> StateCipher:
        """The key of a file that only its owner may read."""
        path = Path(path).expanduser()
        try:
            mode = path.stat().st_mode
            text = path.read_bytes()
        except OSError as err:
            raise StateKeyError(f"state key file {path} cannot be read ({err.strerror})") from err
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StateKeyError(f"state key file {path} is accessible to others (mode {stat.S_IMODE(mode):04o}); "
                                f"chmod 600 {path}")
        return cls._checked(text.strip(), f"{STATE_KEY_FILE} {path}")

    @classmethod
    def from_env(cls, variable: str) -> StateCipher:
        """The key held by the environment variable named ``variable``."""
        value = os.environ.get(variable)
        if not value:
            raise StateKeyError(f"environment variable {variable} ({STATE_KEY_ENV}) is not set or empty")
        return cls._checked(value.strip().encode(), f"{STATE_KEY_ENV} {variable}")

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> StateCipher:
        """The cipher a node config asks for (plaintext if it names no key)."""
        if node.get(STATE_KEY_FILE) and node.get(STATE_KEY_ENV):
            raise StateKeyError(f"node config sets both {STATE_KEY_FILE} and {STATE_KEY_ENV}; keep one")
        if node.get(STATE_KEY_FILE):
            return cls.from_key_file(str(node[STATE_KEY_FILE]))
        if node.get(STATE_KEY_ENV):
            return cls.from_env(str(node[STATE_KEY_ENV]))
        return cls()

    @classmethod
    def _checked(cls, key: bytes, source: str) -> StateCipher:
        try:
            Fernet(key)
        except (ValueError, TypeError) as err:
            raise StateKeyError(f"{source} holds no valid state key (a Fernet key: 32 url-safe base64 bytes; "
                                "make one with `fedpir site state-key FILE`)") from err
        return cls(key, source)

    def seal(self, data: bytes) -> bytes:
        """``data`` as stored: encrypted after :data:`MAGIC`, or as is without a key."""
        return MAGIC + Fernet(self.key).encrypt(data) if self.key is not None else data

    def unseal(self, stored: bytes, path: Path) -> bytes:
        """The plaintext of a stored file, or StateKeyError naming the file and what to do."""
        if not stored.startswith(MAGIC):
            return stored
        if self.key is None:
            raise StateKeyError(f"{path} is encrypted at rest but no state key is configured ({KEY_HINT})")
        try:
            return Fernet(self.key).decrypt(stored[len(MAGIC):])
        except InvalidToken as err:
            raise StateKeyError(f"{path} cannot be decrypted with the state key from {self.source} (wrong key, "
                                "or the file was altered); configure the key the state was written with") from err


PLAINTEXT = StateCipher()


def private_dir(path: Path) -> Path:
    """``path`` created if needed and made 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes, cipher: StateCipher = PLAINTEXT) -> None:
    """Write ``data`` to ``path`` (0600, folder 0700, encrypted under ``cipher``) atomically."""
    path = Path(path)
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(cipher.seal(data))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def read_private(path: Path, cipher: StateCipher = PLAINTEXT) -> bytes:
    """The plaintext of a state file; a plaintext file is encrypted in place when ``cipher`` encrypts."""
    path = Path(path)
    stored = path.read_bytes()
    data = cipher.unseal(stored, path)
    if cipher.encrypts and not stored.startswith(MAGIC):
        log.info("encrypting %s at rest with the configured state key", path)
        write_private(path, data, cipher)
    return data


def is_encrypted(path: Path) -> bool:
    """Whether a state file is stored encrypted."""
    with Path(path).open("rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def save_tensors(state: dict[str, torch.Tensor], path: Path, cipher: StateCipher = PLAINTEXT) -> None:
    """``torch.save`` of ``state`` into a private (and, with a key, encrypted) file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_private(path, buffer.getvalue(), cipher)


def load_tensors(path: Path, cipher: StateCipher = PLAINTEXT) -> dict[str, torch.Tensor]:
    """Tensors saved by :func:`save_tensors` (or plain ``torch.save``), on the CPU; tensors only
    (``weights_only``)."""
    return torch.load(io.BytesIO(read_private(path, cipher)), map_location="cpu", weights_only=True)


def loose_permissions(state_dir: Path) -> list[str]:
    """Entries of a state folder (itself included) that others may access, ``"path (mode)"``."""
    entries = [Path(state_dir), *sorted(Path(state_dir).rglob("*"))]
    return [f"{p} ({stat.S_IMODE(p.lstat().st_mode):04o})" for p in entries
            if p.lstat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)]


def new_state_key(path: Path) -> Path:
    """Write a new Fernet state key to ``path`` (0600; an existing file is never overwritten)."""
    path = Path(path).expanduser()
    if not path.parent.exists():  # a folder made for the key is the owner's only, whatever the umask
        private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise FileExistsError(f"{path} exists; a state key is never overwritten (losing it loses the state)") from err
    with os.fdopen(fd, "wb") as fh:
        fh.write(Fernet.generate_key() + b"\n")
    return path


def state_report(state_dir: Path, public_names: Collection[str]) -> dict[str, Any]:
    """How a state folder is stored: its private files (all but ``public_names``) encrypted or in
    plaintext, and what others may access (:func:`loose_permissions`)."""
    files = [p for p in sorted(Path(state_dir).rglob("*")) if p.is_file() and p.name not in public_names]
    encrypted = [p.name for p in files if is_encrypted(p)]
    return {"encrypted_files": encrypted, "plaintext_files": [p.name for p in files if p.name not in encrypted],
            "loose_permissions": loose_permissions(state_dir)}
