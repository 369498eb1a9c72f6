"""`fedpir audit`: an auditor's check of a site's privacy ledger, with the site's public key only.

    fedpir audit verify LEDGER --public-key KEY [--policy FILE ...] [--json]
    fedpir audit report [LEDGER...] --out DIR [--public-key KEY...] [--attack FILE]
    fedpir audit attack --out FILE [--epsilons inf,1] [--seeds 3] ...

Prints one line per failure (``LEDGER: entry N: RULE: detail``, N the 1-based line of the entry; the
rules are listed in :mod:`fedpir.audit.ledger`) and a final summary line with epsilon spent of the
budget and the hash of the last entry (keep it: a later audit whose ledger no longer contains it
shows that entries were cut off). With ``--policy`` (the site's privacy-policy file; repeat it for each
policy the site has had) every entry is also checked against the policy it was made under, each
release's mechanism recomputed from the policy (rules in :mod:`fedpir.audit.conformance`). ``--json``
prints one JSON object instead.

``report`` writes ``DIR/audit_report.md`` with a plot of epsilon per private round per site and the
budget left (see :mod:`fedpir.audit.report`); with one public key per ledger it verifies them first,
and with ``--attack`` it adds the membership-inference table of an ``attack`` result file.

``attack`` trains a site's model with and without DP on an overfitting configuration and prints the
AUROC of a membership-inference attack next to epsilon (see :mod:`fedpir.audit.attack_study`).

Exit codes: 0 every rule holds, 1 verification failed, 2 usage error or unreadable ledger or key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpir.commands.flags import add_settings_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedpir audit`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = sub.add_parser("verify", help="verify one ledger; exit 0 if it holds, 1 if not, 2 if unreadable")
    verify.add_argument("ledger", type=Path, metavar="LEDGER", help="the site's privacy_ledger.jsonl")
    verify.add_argument("--public-key", type=Path, required=True, metavar="KEY",
                        help="the site's ledger public key (ledger_signing.pub: PEM, or 32 raw bytes)")
    verify.add_argument("--policy", type=Path, action="append", default=[], metavar="FILE",
                        help="the site's privacy-policy file (repeat for each policy it has had): check every entry "
                             "against it, mechanisms recomputed from the policy")
    verify.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    report = sub.add_parser("report", help="a Markdown page: epsilon per round per site, budget left")
    report.add_argument("ledgers", type=Path, nargs="*", metavar="LEDGER",
                        help="one privacy_ledger.jsonl per site (none: only the --attack table)")
    report.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder of the page and its figure")
    report.add_argument("--public-key", type=Path, action="append", default=[], metavar="KEY",
                        help="each ledger's public key, in the ledgers' order (verifies them; exit 1 if one fails)")
    report.add_argument("--attack", type=Path, metavar="FILE", help="a `fedpir audit attack` result file to add")
    attack = sub.add_parser("attack", help="membership-inference attack on a site's model, AUROC next to epsilon")
    _add_attack_arguments(attack)


#: The run settings `fedpir audit attack` offers, and its defaults for them: an overfitting configuration
#: (a small grid, many epochs of one round, every parameter trained) that runs on a laptop CPU.
ATTACK_KNOBS: dict[str, object] = {"volume_size": 16, "finetune_task": "classification", "local_epochs": 50,
                                   "finetune_trainable": "all", "batch_size": 4, "lr": 1e-3, "max_grad_norm": 1.0,
                                   "device": "cpu"}


def _add_attack_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedpir audit attack` (the fields of AttackStudy)."""
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="JSON file of the results")
    parser.add_argument("--epsilons", default="inf,1", help="comma-separated target epsilons, inf = no DP (default inf,1)")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions: member split, initialisation, sampling (default 3)")
    parser.add_argument("--site", type=Path, help="a site folder to attack (default: a synthetic site)")
    parser.add_argument("--patients", type=int, default=32, help="synthetic site's patients, half members (default 32)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic site (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings_flags(parser.add_argument_group("the attacked model's training (one round; the task's loss is attacked)"),
                       ATTACK_KNOBS, defaults=ATTACK_KNOBS)


def run(args: argparse.Namespace) -> int:
    """Run `fedpir audit ACTION`; returns the exit code."""
    if args.action == "verify":
        from fedpir.audit.ledger import verify_ledger
        from fedpir.privacy.policy import load_policy
        from fedpir.privacy.signing import load_public_key

        if not args.ledger.is_file():
            raise OSError(f"ledger {args.ledger} is not a file")
        policies = [load_policy(path) for path in args.policy]
        result = verify_ledger(args.ledger, load_public_key(args.public_key), policies)
        if args.json:
            print(json.dumps(result.to_json(), indent=1))
        else:
            for failure in result.failures:
                print(failure.line(args.ledger))
            print(result.summary())
        return 0 if result.ok else 1
    if args.action == "report":
        from fedpir.audit.report import write_report

        page, ok = write_report(args.ledgers, args.out, args.public_key, attack=args.attack)
        print(f"wrote {page}" + ("" if ok else " (a ledger FAILED verification: run `fedpir audit verify` on it)"))
        return 0 if ok else 1
    if args.action == "attack":
        from fedpir.audit.attack_study import AttackStudy, run_study

        return run_study(AttackStudy(out=args.out, epsilons=args.epsilons, seeds=args.seeds, site=args.site,
                                     patients=args.patients, data_seed=args.data_seed, size=args.volume_size,
                                     task=args.finetune_task, epochs=args.local_epochs, batch_size=args.batch_size,
                                     lr=args.lr, trainable=args.finetune_trainable, max_grad_norm=args.max_grad_norm,
                                     device=args.device, progress=not args.no_progress))
    raise ValueError(f"unknown audit action {args.action!r}")
