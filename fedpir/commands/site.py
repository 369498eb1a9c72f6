"""`fedpir site`: a hospital's own view and controls of its SuperNode.

    fedpir site approve LIST (--app DIR | --fab FILE | --hash SHA256) [--note TEXT]
    fedpir site withdraw LIST SHA256
    fedpir site status --state-dir DIR [--data-dir DIR] [--approved-apps LIST] [--json]
    fedpir site state-key FILE
    fedpir site guard DIR
    fedpir site policy [FILE] [--state-dir DIR]
    fedpir site reset --state-dir DIR --reason TEXT

``approve`` adds a FAB hash to the allow-list the node config names (``approved-apps=LIST``; see
fedpir.deployment.approval). ``status`` reads only local files: the privacy ledger of the state
folder (rounds, epsilon spent of the budget), how the state is stored at rest (encrypted or not,
permissions), the data folder's validation, the approved hashes. ``state-key`` makes a key that
encrypts the state at rest (node config ``state-key-file``; see fedpir.privacy.at_rest).
``guard`` writes the approval guard (a ``flwr-clientapp`` that checks the approved list first) into
DIR, which goes first on the SuperNode's PATH. ``policy`` prints the privacy policy a node config
names (``privacy-policy=FILE``; none: the safe default) with its SHA-256, the hash every ledger
entry records; with ``--state-dir`` it verifies the ledger (chain and signatures) and prints the
site's budget, which the ledger binds (exit 2 with the reason when the ledger does not verify:
training is stopped until the admin acts). ``reset`` retires
the site's identity: the whole state folder (ledger, its sealed head, signing key, local layers) moves
into ``DIR/retired-<UTC time>/`` with the reason, for the auditor, and the next round starts a new
ledger under a new key. It is the only way to a fresh budget: a ledger cut back, restored alone or
deleted while its key stays is refused (fedpir.privacy.budget).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from fedpir.deployment import approval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedpir site`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ap = sub.add_parser("approve", help="approve an app (its FAB hash) for this node")
    ap.add_argument("list", type=Path, metavar="LIST", help="the approved-apps file of the node config")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--app", type=Path, help="a Flower app folder: the hash `flwr run` of this folder sends")
    which.add_argument("--fab", type=Path, help="a .fab file (from `flwr build`)")
    which.add_argument("--hash", help="a FAB hash (SHA-256, 64 hex digits)")
    ap.add_argument("--note", default="", help="a comment kept next to the hash (version, reviewer, date)")
    wd = sub.add_parser("withdraw", help="withdraw an app's approval")
    wd.add_argument("list", type=Path, metavar="LIST")
    wd.add_argument("hash", metavar="SHA256")
    st = sub.add_parser("status", help="ledger, data and approvals of this node (local files only)")
    st.add_argument("--state-dir", type=Path, required=True, help="the node's state-dir")
    st.add_argument("--data-dir", type=Path, help="the node's data-dir (validated)")
    st.add_argument("--approved-apps", type=Path, help="the node's approved-apps file")
    st.add_argument("--json", action="store_true", help="one JSON object")
    sk = sub.add_parser("state-key", help="make a key that encrypts the node's state at rest (node config state-key-file)")
    sk.add_argument("file", type=Path, metavar="FILE", help="where to write it (0600; kept outside the state folder)")
    gd = sub.add_parser("guard", help="write the approval guard (flwr-clientapp) for the SuperNode's PATH")
    gd.add_argument("dir", type=Path, metavar="DIR", help="a folder for it, put first on the SuperNode's PATH")
    po = sub.add_parser("policy", help="the node's privacy policy, its SHA-256 and (--state) the site's bound budget")
    po.add_argument("file", type=Path, nargs="?", help="the privacy-policy file of the node config (none: the default)")
    po.add_argument("--state-dir", type=Path, help="the node's state-dir: verify its ledger, print the site's budget")
    po.add_argument("--state-key-file", type=Path, help="the node's state key, when its state is encrypted at rest")
    rs = sub.add_parser("reset", help="retire the site's identity (ledger, key, local layers) with a reason; a new one starts")
    rs.add_argument("--state-dir", type=Path, required=True, help="the node's state-dir")
    rs.add_argument("--reason", required=True, help="why (kept with the retired state for the auditor)")


def ledger_summary(state_dir: Path) -> dict[str, Any]:
    """Training rounds, noised metric releases and privacy spent, from the state folder's ``privacy_ledger.jsonl``."""
    from fedpir.privacy.budget import LEDGER_NAME
    from fedpir.privacy.release import training_entries

    path = state_dir / LEDGER_NAME
    if not state_dir.is_dir():
        raise OSError(f"state folder {state_dir} does not exist")

    everything = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    private = [e for e in everything if e.get("dp")]
    entries = training_entries(everything)
    last = entries[-1] if entries else {}
    return {
        "rounds": len(entries),
        "private_rounds": sum(1 for e in entries if e.get("dp")),
        "metric_releases": len(everything) - len(entries),
        "last_round": {k: last.get(k) for k in ("objective", "epsilon", "n_patients", "completed")} | {
            "time": dt.datetime.fromtimestamp(last["timestamp"], dt.UTC).isoformat(timespec="seconds")
            if "timestamp" in last else None} if last else None,
        "epsilon_spent": private[-1]["epsilon"] if private else 0.0,
        "epsilon_budget": private[-1].get("epsilon_budget") if private else None,
        "delta": private[-1].get("delta") if private else None,
    }


def status(state_dir: Path, data_dir: Path | None, approved_apps: Path | None) -> dict[str, Any]:
    """Everything ``fedpir site status`` reports."""
    from fedpir.models.warm_start import RECORD_NAME
    from fedpir.privacy.at_rest import state_report
    from fedpir.privacy.budget import LEDGER_NAME
    from fedpir.privacy.signing import HEAD_NAME, PUBLIC_KEY_NAME

    public_state = (LEDGER_NAME, HEAD_NAME, PUBLIC_KEY_NAME, RECORD_NAME)  # plaintext by design: no patient data
    report: dict[str, Any] = {"state_dir": str(state_dir), "ledger": ledger_summary(state_dir),
                              "at_rest": state_report(state_dir, public_state)}
    if data_dir is not None:
        from fedpir.data.validation import validate_site

        val = validate_site(data_dir)
        report["data"] = {"dir": str(data_dir), "usable_subjects": len(val.good), "bad_subjects": len(val.bad),
                          "summary": val.summary()}
    if approved_apps is not None:
        report["approved_apps"] = sorted(approval.read_approved(approved_apps)) if approved_apps.exists() else []
    return report


def at_rest_lines(at_rest: dict[str, Any]) -> list[str]:
    """What ``status`` says about the state at rest."""
    from fedpir.privacy.at_rest import KEY_HINT

    if at_rest["plaintext_files"]:
        lines = [f"at rest: NOT encrypted ({', '.join(at_rest['plaintext_files'])} in plaintext): no state key "
                 f"configured; make one with `fedpir site state-key FILE` and set {KEY_HINT}"]
    elif at_rest["encrypted_files"]:
        lines = [f"at rest: encrypted ({', '.join(at_rest['encrypted_files'])})"]
    else:
        lines = ["at rest: no private state yet"]
    if at_rest["loose_permissions"]:
        lines.append(f"WARNING: accessible to other users: {', '.join(at_rest['loose_permissions'])} "
                     "(chmod 700 the folder, 600 its files)")
    return lines


def print_policy(file: Path | None, state_dir: Path | None, state_key_file: Path | None = None) -> None:
    """Print a policy (the default without ``file``), its SHA-256 and, with ``state_dir``, the site's
    budget as its verified ledger binds it (LedgerError, a ValueError, when the ledger does not verify)."""
    from fedpir.privacy.budget import PrivacyLedger
    from fedpir.privacy.policy import DEFAULT_POLICY, load_policy, recorded_budget, site_budget
    from fedpir.privacy.release import METRICS, mode_of

    if state_dir is not None and not state_dir.is_dir():
        raise OSError(f"state folder {state_dir} does not exist")
    policy = load_policy(file) if file else DEFAULT_POLICY
    print(f"privacy policy: {file or 'default (the node config names none)'}")
    print(json.dumps(policy.to_mapping(), indent=1))
    print(f"sha256: {policy.sha256}")
    print("released metrics: " + ", ".join(f"{name}{'*' if name[-1] in '._' else ''} {mode_of(policy, name, spec)}"
                                            for name, spec in METRICS.items()))
    if state_dir is not None:
        from fedpir.privacy.at_rest import PLAINTEXT, StateCipher

        cipher = StateCipher.from_key_file(state_key_file) if state_key_file else PLAINTEXT
        ledger = PrivacyLedger.in_dir(state_dir, cipher=cipher)
        recorded = recorded_budget(ledger)
        budget = site_budget(policy, ledger, float("nan"))
        print(f"ledger: {len(ledger.entries)} entries, chain and signatures verified; site budget epsilon "
              f"{budget:g} (policy {policy.max_epsilon}, ledger {recorded if recorded is not None else 'none yet'})")


def retire(state_dir: Path, reason: str) -> Path:
    """Move everything in ``state_dir`` (but earlier retired folders) into a new ``retired-<UTC time>``
    folder with ``REASON.txt``; returns that folder."""
    if not state_dir.is_dir():
        raise OSError(f"state folder {state_dir} does not exist")
    if not reason.strip():
        raise ValueError("--reason must say why the identity is retired")
    retired = state_dir / f"retired-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    if retired.exists():
        raise FileExistsError(f"{retired} exists; try again in a second")
    moved = [p for p in sorted(state_dir.iterdir()) if not p.name.startswith("retired-")]
    retired.mkdir(mode=0o700)
    for path in moved:
        path.rename(retired / path.name)
    (retired / "REASON.txt").write_text(f"retired {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}: {reason}\n")
    return retired


def run(args: argparse.Namespace) -> int:
    """Do the action; print the result."""
    if args.action == "approve":
        fab_hash = (approval.fab_hash_of_app(args.app) if args.app else
                    approval.fab_hash_of_file(args.fab) if args.fab else args.hash)
        added = approval.approve(args.list, fab_hash, note=args.note)
        print(f"{'approved' if added else 'already approved'}: {fab_hash} ({args.list})")
    elif args.action == "guard":
        guard = approval.write_guard(args.dir, python=sys.executable)
        print(f"approval guard written to {guard}; put {args.dir.resolve()} first on the SuperNode's PATH "
              f"(PATH={args.dir.resolve()}:$PATH)")
    elif args.action == "state-key":
        from fedpir.privacy.at_rest import new_state_key

        print(f"state key written to {new_state_key(args.file)}; set state-key-file='{args.file}' in the node config "
              "and keep a copy in the hospital's secret store (without it the state cannot be read)")
    elif args.action == "withdraw":
        removed = approval.withdraw(args.list, args.hash)
        print(f"{'withdrawn' if removed else 'was not approved'}: {args.hash} ({args.list})")
    elif args.action == "policy":
        print_policy(args.file, args.state_dir, args.state_key_file)
    elif args.action == "reset":
        retired = retire(args.state_dir, args.reason)
        print(f"retired the site's identity into {retired}; the next round starts a new ledger under a new signing "
              "key (send its public key to the auditor)")
    else:
        report = status(args.state_dir, args.data_dir, args.approved_apps)
        if args.json:
            print(json.dumps(report, indent=1))
            return 0
        led = report["ledger"]
        print(f"state folder: {report['state_dir']}")
        print(f"  rounds trained: {led['rounds']} ({led['private_rounds']} under DP)")
        if led["last_round"]:
            lr = led["last_round"]
            print(f"  last round: {lr['objective']} at {lr['time']}, {lr['n_patients']} patients")
        budget = led["epsilon_budget"]
        print(f"  privacy spent: epsilon {led['epsilon_spent']:.3f}"
              + (f" of {budget:g} (delta {led['delta']:g}), {led['epsilon_spent'] / budget:.0%}" if budget else ""))
        for line in at_rest_lines(report["at_rest"]):
            print(f"  {line}")
        if "data" in report:
            print(f"  data {report['data']['dir']}: {report['data']['summary']}")
        if "approved_apps" in report:
            print(f"  approved apps: {len(report['approved_apps'])}")
            for h in report["approved_apps"]:
                print(f"    {h}")
    return 0
