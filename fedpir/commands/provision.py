"""`fedpir provision`: the federation operator's keys and certificates (see fedpir.deployment.provision).

    fedpir provision init DIR --name NAME [--server-name HOST ...] [--curve p384]
    fedpir provision add DIR HOSPITAL [--public-key FILE] [--connection NAME]
    fedpir provision rotate DIR HOSPITAL [--public-key FILE] [--connection NAME]
    fedpir provision revoke DIR HOSPITAL [--connection NAME]
    fedpir provision sync DIR --connection NAME   (the SuperLink accepts exactly the registry's active keys)
    fedpir provision connection DIR NAME --address HOST:PORT   (a flwr connection to the operator port)
    fedpir provision node-id DIR HOSPITAL NODE_ID   (note what `flwr supernode register` printed)
    fedpir provision list DIR
    fedpir provision keygen OUT_DIR          (at a hospital: its own node key pair)

Every command prints what to hand to whom and the commands to run next; no private key is printed.
``--connection`` names the operator's ``flwr`` connection (``$FLWR_HOME/config.toml``) to the SuperLink's
operator port: then the command registers or unregisters the key there itself
(fedpir.deployment.registration).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpir.deployment import provision as p
from fedpir.deployment import registration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedpir provision`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create a federation: CA, SuperLink TLS certificate, empty registry")
    init.add_argument("dir", type=Path, metavar="DIR", help="new folder for the federation (kept by the operator)")
    init.add_argument("--name", default="fedpir", help="federation name (default: fedpir)")
    init.add_argument("--server-name", action="append", default=[], metavar="HOST",
                      help="DNS name or IP address hospitals use to reach the SuperLink (repeatable); "
                           "localhost, 127.0.0.1 and ::1 are always included")
    init.add_argument("--curve", choices=sorted(p.CURVES), default="p384", help="curve of the node keys (default: p384)")
    init.add_argument("--days", type=int, default=825, help="validity of the SuperLink certificate (default: 825)")
    for action, text in (("add", "give a hospital its kit (CA certificate and node key pair)"),
                         ("rotate", "replace a hospital's node key")):
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument("dir", type=Path, metavar="DIR")
        cmd.add_argument("hospital", metavar="HOSPITAL")
        cmd.add_argument("--public-key", type=Path, metavar="FILE",
                         help="the hospital's own OpenSSH EC public key (made with `fedpir provision keygen`); "
                              "then no private key is created here")
        _connection(cmd, "register the new key with the SuperLink through this flwr connection")
    revoke = sub.add_parser("revoke", help="revoke a hospital's node key")
    revoke.add_argument("dir", type=Path, metavar="DIR")
    revoke.add_argument("hospital", metavar="HOSPITAL")
    _connection(revoke, "unregister the key from the SuperLink through this flwr connection (cuts the node off)")
    conn = sub.add_parser("connection", help="add a flwr connection (in $FLWR_HOME/config.toml) to the SuperLink's "
                                             "operator port, trusting the federation CA")
    conn.add_argument("dir", type=Path, metavar="DIR")
    conn.add_argument("name", metavar="NAME", help="the connection's name (what flwr commands take)")
    conn.add_argument("--address", default="127.0.0.1:8000",
                      help="the operator port as seen from here (default 127.0.0.1:8000: on the SuperLink's host, "
                           "or through an SSH tunnel or kubectl port-forward)")
    sync = sub.add_parser("sync", help="make the SuperLink accept exactly the registry's active keys")
    sync.add_argument("dir", type=Path, metavar="DIR")
    _connection(sync, "the operator's flwr connection to the SuperLink", required=True)
    node = sub.add_parser("node-id", help="note the node id `flwr supernode register` printed for a hospital's key")
    node.add_argument("dir", type=Path, metavar="DIR")
    node.add_argument("hospital", metavar="HOSPITAL")
    node.add_argument("node_id", type=int, metavar="NODE_ID")
    listing = sub.add_parser("list", help="hospitals, key fingerprints and status")
    listing.add_argument("dir", type=Path, metavar="DIR")
    keygen = sub.add_parser("keygen", help="at a hospital: make its own node key pair (the private key stays there)")
    keygen.add_argument("out", type=Path, metavar="OUT_DIR")
    keygen.add_argument("--curve", choices=sorted(p.CURVES), default="p384")


def _connection(parser: argparse.ArgumentParser, text: str, required: bool = False) -> None:
    parser.add_argument("--connection", metavar="NAME", required=required,
                        help=f"{text} (a connection of $FLWR_HOME/config.toml to the SuperLink's operator port)")


def _register_steps(root: Path, pub: Path, hospital: str) -> str:
    return (f"  register it on the SuperLink, then note the node id it prints:\n"
            f"    flwr supernode register {pub} <connection> --name {hospital}\n"
            f"    fedpir provision node-id {root} {hospital} NODE_ID")


def _unregister_steps(entry: dict) -> str:
    ids = entry.get("unregister", [])
    if ids:
        return "\n".join(f"    flwr supernode unregister {i} <connection>" for i in ids)
    return "    flwr supernode unregister NODE_ID <connection>   (node id from registration or `flwr supernode list`)"


def run(args: argparse.Namespace) -> int:
    """Do the action and print the hand-over instructions."""
    if args.action == "init":
        fed = p.init_federation(args.dir, args.name, args.server_name, curve=args.curve, days=args.days)
        print(f"federation {fed.name!r} created in {fed.root}")
        print(f"  SuperLink certificate for: {', '.join(fed.server_names)}")
        print(f"  keep offline: {fed.root / 'ca' / 'ca.key'} (the CA's private key)")
        print(f"  hand to the SuperLink operator: the folder {fed.superlink_dir} (contains the server's private key: "
              "copy it over a secure channel, mode 0600)")
        print(f"next: fedpir provision add {fed.root} HOSPITAL")
    elif args.action in ("add", "rotate"):
        if args.action == "add":
            fed = p.add_hospital(args.dir, args.hospital, args.public_key)
            print(f"hospital {args.hospital!r} added to {fed.name!r}")
        else:
            fed, old = p.rotate_hospital(args.dir, args.hospital, args.public_key)
            print(f"hospital {args.hospital!r}: key {old} retired")
        entry, kit = fed.hospitals[args.hospital], fed.hospital_dir(args.hospital)
        print(f"  node key fingerprint: {entry['fingerprint']}")
        if entry["key_origin"] == "provisioned":
            print(f"  hand to the hospital's IT: the folder {kit} (contains its node private key "
                  f"{p.NODE_KEY}: copy it over a secure channel, then delete it here)")
        else:
            print(f"  hand to the hospital's IT: {kit / p.CA_CERT} (its private key never left it)")
        if args.connection:
            try:
                node_id = registration.register(fed.root, args.hospital, args.connection)
            except registration.RegistrationError as err:
                raise registration.RegistrationError(
                    f"{err}. The key is in the registry; register it once the SuperLink answers: "
                    f"fedpir provision sync {fed.root} --connection {args.connection}") from None
            print(f"  registered with the SuperLink ({args.connection}): node id {node_id}")
        else:
            print(_register_steps(fed.root, kit / p.NODE_PUB, args.hospital))
        if args.action == "rotate" and args.connection:
            print("  the hospital restarts its SuperNode with the new key; once it is online, cut the old key off:\n"
                  f"    fedpir provision sync {fed.root} --connection {args.connection}")
        elif args.action == "rotate":
            print("  the hospital restarts its SuperNode with the new key; then unregister the old node:\n"
                  + _unregister_steps(entry))
    elif args.action == "revoke":
        fed, fingerprint = p.revoke_hospital(args.dir, args.hospital)
        print(f"hospital {args.hospital!r} revoked (key {fingerprint})")
        if args.connection:
            ids = registration.unregister_retired(fed.root, args.hospital, args.connection)
            print(f"  unregistered from the SuperLink ({args.connection}): node ids {ids or 'none noted'}; "
                  f"the SuperLink refuses the key from now on")
        else:
            print("  the SuperLink still accepts the key until the node is unregistered:\n"
                  + _unregister_steps(fed.hospitals[args.hospital]))
    elif args.action == "connection":
        path = registration.add_connection(args.dir, args.name, args.address)
        print(f"flwr connection {args.name!r} ({args.address}, CA {p.load_federation(args.dir).ca_cert}) "
              f"written to {path}")
        print(f"  check it: flwr supernode list {args.name}")
    elif args.action == "sync":
        report = registration.sync(args.dir, args.connection)
        for node_id, why in sorted(report.unregistered.items()):
            print(f"  unregistered node {node_id} ({why})")
        for name, node_id in sorted(report.registered.items()):
            print(f"  registered {name}: node id {node_id}")
        print(f"the SuperLink ({args.connection}) accepts exactly the registry's active keys"
              + ("" if report.changed else " (nothing to change)"))
    elif args.action == "node-id":
        p.record_node_id(args.dir, args.hospital, args.node_id)
        print(f"hospital {args.hospital!r}: node id {args.node_id} noted")
    elif args.action == "list":
        fed = p.load_federation(args.dir)
        print(f"federation {fed.name!r} ({fed.root}); SuperLink names: {', '.join(fed.server_names)}")
        for name, entry in sorted(fed.hospitals.items()):
            node = f"node {entry['node_id']}" if "node_id" in entry else "node id not noted"
            print(f"  {name:24s} {entry['status']:8s} {entry['fingerprint']}  "
                  f"({entry['key_origin']} key, since {entry['since']}, {node})")
            if entry.get("unregister"):
                print(f"  {'':24s} retired node ids (unregister them): {', '.join(map(str, entry['unregister']))}")
        if not fed.hospitals:
            print("  no hospitals yet")
    elif args.action == "keygen":
        pub = p.node_key_pair_for_hospital(args.out, curve=args.curve)
        print(f"node key pair written to {args.out} (private key {args.out / p.NODE_KEY}, mode 0600: keep it here)")
        print(f"  fingerprint: {p.ssh_fingerprint(pub.read_text())}")
        print(f"  send to the federation operator: {pub} (public key only)")
    return 0
