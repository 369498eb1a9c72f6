"""Provisioning: real certificates and keys, checked with cryptography, Python's TLS stack, Flower's own
key loaders and ssh-keygen; the `fedpir provision` command's output and errors."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedpir.commands import main
from fedpir.deployment import provision as p


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def fed(tmp_path: Path) -> p.Federation:
    fed = p.init_federation(tmp_path / "fed", "test", ["superlink.hospital-net.example", "10.1.2.3"])
    p.add_hospital(fed.root, "st-anna")
    return p.load_federation(fed.root)


def test_ca_and_superlink_certificate(fed: p.Federation) -> None:
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate((fed.superlink_dir / p.SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.hospital-net.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")}
    key = serialization.load_pem_private_key((fed.superlink_dir / p.SERVER_KEY).read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert (fed.superlink_dir / p.CA_CERT).read_bytes() == fed.ca_cert.read_bytes()


def test_private_keys_0600_folders_0700(fed: p.Federation) -> None:
    for key in (fed.root / "ca" / "ca.key", fed.superlink_dir / p.SERVER_KEY, fed.hospital_dir("st-anna") / p.NODE_KEY):
        assert _mode(key) == 0o600, key
    for folder in (fed.root, fed.root / "ca", fed.superlink_dir, fed.root / "hospitals", fed.hospital_dir("st-anna")):
        assert _mode(folder) == 0o700, folder
    assert "PRIVATE" not in (fed.root / p.REGISTRY).read_text()


def _tls_handshake(fed: p.Federation, server_hostname: str) -> None:
    """A real TLS server with the SuperLink's certificate; a client that trusts only the federation CA."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(fed.superlink_dir / p.SERVER_CERT, fed.superlink_dir / p.SERVER_KEY)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.sendall(b"x")
    finally:
        listener.close()
        thread.join(timeout=10)


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "superlink.hospital-net.example", "10.1.2.3"])
def test_tls_handshake_verifies_for_every_san(fed: p.Federation, name: str) -> None:
    _tls_handshake(fed, name)


def test_tls_handshake_fails_for_other_names(fed: p.Federation) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(fed, "evil.example")


def test_node_key_is_what_flower_loads(fed: p.Federation) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    kit = fed.hospital_dir("st-anna")
    private = serialization.load_ssh_private_key((kit / p.NODE_KEY).read_bytes(), None)  # as flower-supernode does
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key((kit / p.NODE_PUB).read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert try_load_public_key(kit / p.NODE_PUB)  # `flwr supernode register` accepts it
    assert (kit / p.CA_CERT).read_bytes() == fed.ca_cert.read_bytes()
    assert fed.hospitals["st-anna"]["fingerprint"] == p.ssh_fingerprint((kit / p.NODE_PUB).read_text())


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprint_matches_ssh_keygen(fed: p.Federation) -> None:
    out = subprocess.run(["ssh-keygen", "-lf", str(fed.hospital_dir("st-anna") / p.NODE_PUB)],
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == fed.hospitals["st-anna"]["fingerprint"]


def test_p256_federation(tmp_path: Path) -> None:
    p.init_federation(tmp_path / "f", "small", curve="p256")
    p.add_hospital(tmp_path / "f", "h1")
    key = serialization.load_ssh_private_key((tmp_path / "f" / "hospitals" / "h1" / p.NODE_KEY).read_bytes(), None)
    assert key.curve.name == "secp256r1"


def test_errors_change_nothing(fed: p.Federation, tmp_path: Path) -> None:
    registry = (fed.root / p.REGISTRY).read_text()
    with pytest.raises(p.ProvisionError, match="already holds a federation"):
        p.init_federation(fed.root, "again")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(p.ProvisionError, match="not empty"):
        p.init_federation(tmp_path / "busy", "x")
    with pytest.raises(p.ProvisionError, match="already exists .active.; rotate"):
        p.add_hospital(fed.root, "st-anna")
    with pytest.raises(p.ProvisionError, match="unknown hospital 'nowhere'; known: st-anna"):
        p.revoke_hospital(fed.root, "nowhere")
    with pytest.raises(p.ProvisionError, match="unknown hospital"):
        p.rotate_hospital(fed.root, "nowhere")
    with pytest.raises(p.ProvisionError, match="not valid"):
        p.add_hospital(fed.root, "../etc")
    with pytest.raises(p.ProvisionError, match="holds no federation"):
        p.add_hospital(tmp_path / "missing", "h")
    assert (fed.root / p.REGISTRY).read_text() == registry
    assert sorted(x.name for x in (fed.root / "hospitals").iterdir()) == ["st-anna"]


def test_rotate_and_revoke(fed: p.Federation) -> None:
    kit = fed.hospital_dir("st-anna")
    old = fed.hospitals["st-anna"]["fingerprint"]
    fed, retired = p.rotate_hospital(fed.root, "st-anna")
    new = fed.hospitals["st-anna"]["fingerprint"]
    assert retired == old and new != old and new == p.ssh_fingerprint((kit / p.NODE_PUB).read_text())
    assert _mode(kit / p.NODE_KEY) == 0o600
    assert [p.ssh_fingerprint(f.read_text()) for f in (fed.root / "retired" / "st-anna").iterdir()] == [old]
    fed, revoked = p.revoke_hospital(fed.root, "st-anna")
    assert revoked == new and fed.hospitals["st-anna"]["status"] == "revoked"
    assert not (kit / p.NODE_KEY).exists() and not (kit / p.NODE_PUB).exists()
    assert len(list((fed.root / "retired" / "st-anna").iterdir())) == 2
    with pytest.raises(p.ProvisionError, match="already revoked"):
        p.revoke_hospital(fed.root, "st-anna")
    with pytest.raises(p.ProvisionError, match="is revoked"):
        p.rotate_hospital(fed.root, "st-anna")
    with pytest.raises(p.ProvisionError, match="already exists .revoked.; choose a new name"):
        p.add_hospital(fed.root, "st-anna")


def test_hospital_brings_its_own_key(fed: p.Federation, tmp_path: Path) -> None:
    pub = p.node_key_pair_for_hospital(tmp_path / "at-hospital")
    assert _mode(tmp_path / "at-hospital" / p.NODE_KEY) == 0o600
    fed = p.add_hospital(fed.root, "city-general", public_key=pub)
    kit = fed.hospital_dir("city-general")
    assert not (kit / p.NODE_KEY).exists()
    assert fed.hospitals["city-general"]["key_origin"] == "hospital"
    assert fed.hospitals["city-general"]["fingerprint"] == p.ssh_fingerprint(pub.read_text())
    with pytest.raises(p.ProvisionError, match="current key"):
        p.rotate_hospital(fed.root, "city-general", public_key=kit / p.NODE_PUB)
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "ed.pub").write_bytes(ed)
    with pytest.raises(p.ProvisionError, match="EC on a NIST curve"):
        p.add_hospital(fed.root, "ed-hospital", public_key=tmp_path / "ed.pub")
    assert "ed-hospital" not in p.load_federation(fed.root).hospitals
    assert not fed.hospital_dir("ed-hospital").exists()


def test_cli_prints_hand_over_never_private_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "fed"
    assert main(["provision", "init", str(root), "--name", "demo", "--server-name", "link.example"]) == 0
    assert main(["provision", "add", str(root), "st-anna"]) == 0
    assert main(["provision", "rotate", str(root), "st-anna"]) == 0
    assert main(["provision", "list", str(root)]) == 0
    assert main(["provision", "revoke", str(root), "st-anna"]) == 0
    out = capsys.readouterr().out
    assert "flwr supernode register" in out and "hand to the hospital's IT" in out and "flwr supernode unregister" in out
    assert "link.example" in out and "revoked" in out
    assert "PRIVATE KEY" not in out and "BEGIN" not in out
    for secret in (root / "ca" / "ca.key", root / "superlink" / p.SERVER_KEY):
        body = "".join(secret.read_text().splitlines()[1:-1])
        assert body[10:40] not in out


def test_cli_user_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "fed"
    assert main(["provision", "init", str(root)]) == 0
    capsys.readouterr()
    assert main(["provision", "init", str(root)]) == 2
    assert main(["provision", "revoke", str(root), "ghost"]) == 2
    assert main(["provision", "add", str(root), "h1", "--public-key", str(tmp_path / "missing.pub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fedpir provision: error: ") for line in err), err
    assert "already holds a federation" in err[0] and "unknown hospital 'ghost'" in err[1] and "missing.pub" in err[2]


def test_node_ids_follow_the_keys(fed: p.Federation, capsys: pytest.CaptureFixture) -> None:
    p.record_node_id(fed.root, "st-anna", 111)
    fed, _ = p.rotate_hospital(fed.root, "st-anna")
    entry = fed.hospitals["st-anna"]
    assert "node_id" not in entry and entry["unregister"] == [111]
    assert main(["provision", "node-id", str(fed.root), "st-anna", "222"]) == 0
    assert main(["provision", "revoke", str(fed.root), "st-anna"]) == 0
    out = capsys.readouterr().out
    assert "flwr supernode unregister 111 <connection>" in out and "flwr supernode unregister 222 <connection>" in out
    assert p.load_federation(fed.root).hospitals["st-anna"]["unregister"] == [111, 222]
    with pytest.raises(p.ProvisionError, match="is revoked"):
        p.record_node_id(fed.root, "st-anna", 333)


def test_an_unreachable_superlink_is_one_line_and_the_registry_says_what_to_finish(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--connection`` naming a SuperLink that does not answer (here: a closed port): one line, exit 2,
    the hospital in the registry without a node id, and ``sync`` named as the way to finish."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    root = tmp_path / "fed"
    assert main(["provision", "init", str(root)]) == 0
    assert main(["provision", "connection", str(root), "pilot", "--address", f"127.0.0.1:{port}"]) == 0
    assert main(["provision", "connection", str(root), "pilot"]) == 2  # an existing connection is never changed
    capsys.readouterr()
    assert main(["provision", "add", str(root), "st-anna", "--connection", "pilot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flwr supernode register" in err[0] and f"fedpir provision sync {root}" in err[0], err
    entry = p.load_federation(root).hospitals["st-anna"]
    assert entry["status"] == "active" and "node_id" not in entry
    config = (tmp_path / "flwr" / "config.toml").read_text()
    assert f'address = "127.0.0.1:{port}"' in config and str(root / "ca" / p.CA_CERT) in config
