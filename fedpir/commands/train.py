"""``fedpir train``: a short local training run of one site, private by default, reported as JSON.

A quarter of the site's patients are held out; each round's metrics on them are ``heldout_*``.
With ``--state-dir`` the rounds spend that folder's privacy budget, are written to its ledger and
obey the node's privacy policy (``--privacy-policy``, else the safe default that a hospital's node
gets): a request the policy refuses (``--no-dp``, a larger ``--epsilon``, replayable noise) stops
before anything trains or is written.

Example::

    fedpir train --site fed/site-0 --stage pretrain --local-epochs 2 --rounds 3 --epsilon 8 --out run.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedpir.commands.flags import add_settings_flags, settings_from_args
from fedpir.models.groups import TRAINABLE_PRESETS
from fedpir.run_config import RunSettings
from fedpir.wire.protocol import STAGES

EXIT_BUDGET = 3
#: The run settings `fedpir train` offers as flags (the same flags as `fedpir simulate` where both have them).
KNOBS: tuple[str, ...] = (
    "finetune_task", "local_epochs", "dp", "epsilon_budget", "noise_multiplier", "delta", "max_grad_norm", "accountant",
    "secret_noise", "batch_size", "lr", "volume_size", "seed", "device",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedpir train``."""
    parser.add_argument("--site", type=Path, required=True, help="site folder (or its manifest)")
    parser.add_argument("--modalities", help="comma-separated modality vocabulary (default: the federation's, in "
                                             "SITE/../federation.json, else the site's own)")
    parser.add_argument("--stage", choices=STAGES, default="pretrain", help="pretraining or fine-tuning (--task)")
    parser.add_argument("--trainable", help=f"parameter groups to train: {', '.join(TRAINABLE_PRESETS)} or a comma list "
                                            "(default: the stage's, as in a federation: --pretrain-trainable or "
                                            "--finetune-trainable of `fedpir simulate`)")
    parser.add_argument("--rounds", type=int, default=1, help="local rounds (each is one ledger entry)")
    parser.add_argument("--out", type=Path, help="write the per-round records and the config here (JSON)")
    parser.add_argument("--state-dir", type=Path, help="site state folder holding the privacy ledger")
    parser.add_argument("--state-key-file", type=Path, help="key that encrypts the state folder at rest")
    parser.add_argument("--privacy-policy", type=Path,
                        help="with --state-dir: the node's privacy policy file (default: the safe default policy)")
    parser.add_argument("--data-root", type=Path, action="append", default=[],
                        help="a folder outside the site folder that the manifest may point into (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_flags(parser.add_argument_group("run settings"), KNOBS)


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN metrics (e.g. AUROC of a single class) as null, so the file is strict JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}


def settings_of(args: argparse.Namespace, modalities: list[str]) -> RunSettings:
    """The flags as run settings, so that the model, DP and trainer are built as in a federation."""
    finetune = args.stage == "finetune"
    trainable = {f"{args.stage}_trainable": args.trainable} if args.trainable else {}
    return settings_from_args(args, KNOBS, modalities=",".join(modalities), pretrain_rounds=0 if finetune else args.rounds,
                              finetune_rounds=args.rounds if finetune else 0, **trainable)


def run(args: argparse.Namespace) -> int:
    """Train ``--rounds`` rounds, evaluate on held-out patients after each, print and write the records."""
    from fedpir.client.guard import check_round
    from fedpir.client.site import split_patients
    from fedpir.data.dataset import load_site
    from fedpir.data.layouts import site_vocabulary
    from fedpir.models.groups import objective_for, trainable_groups
    from fedpir.privacy.at_rest import PLAINTEXT, StateCipher
    from fedpir.privacy.budget import BudgetExceededError, PrivacyLedger
    from fedpir.privacy.dp import dp_config_for
    from fedpir.privacy.policy import (
        DEFAULT_POLICY,
        PolicyViolation,
        bind_budget,
        check_plan,
        check_request,
        load_policy,
        site_budget,
        site_settings,
    )
    from fedpir.training.model import build_model
    from fedpir.training.trainer import LocalTrainer

    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.trainable:
        trainable_groups(args.trainable)  # a bad value stops here, before the site is read
    if args.privacy_policy and not args.state_dir:
        raise ValueError("--privacy-policy binds a node's state folder: give --state-dir too")
    modalities = site_vocabulary(args.site, args.modalities)
    settings = settings_of(args, modalities)
    cipher = StateCipher.from_key_file(args.state_key_file) if args.state_key_file else PLAINTEXT
    policy = (load_policy(args.privacy_policy) if args.privacy_policy else DEFAULT_POLICY) if args.state_dir else None
    if policy is not None:  # before the data is read or the state folder written
        try:
            check_request(policy, settings)
            settings = site_settings(policy, settings)  # its noise planned over the policy's max-rounds
            budget = site_budget(policy, PrivacyLedger.in_dir(args.state_dir, cipher=cipher), settings.epsilon_budget)
            check_plan(policy, settings, budget=budget, delta=None, noise_multiplier=None)
        except PolicyViolation as err:
            raise ValueError(f"{err} (--state-dir {args.state_dir} obeys the node's privacy policy)") from None
    dataset, report = load_site(args.site, modalities, (settings.volume_size,) * 3, data_roots=args.data_root)
    print(report.summary())
    if len(dataset) == 0:
        print(f"fedpir train: error: {report.summary()}", file=sys.stderr)
        return 2
    train_set, holdout_set = split_patients(dataset, args.seed)
    held_out = len(holdout_set) > 0
    print(f"{len(train_set)} training patients, {len(holdout_set)} held out for evaluation"
          + ("" if held_out else " (too few patients: metrics are on the training patients)"))
    trainer = LocalTrainer.for_run(settings, build_model(settings), train_set, state_dir=args.state_dir, seed=args.seed,
                                   state_cipher=cipher)
    if policy is not None:
        bind_budget(policy, trainer.ledger, trainer.budget, settings.epsilon_budget)
    objective = objective_for(args.stage, settings.finetune_task)
    groups = trainable_groups(settings.trainable_for(args.stage))
    prefix = "heldout" if held_out else "train"
    rounds: list[dict[str, Any]] = []
    status = 0
    for r in range(args.rounds):
        try:
            if policy is not None:
                check_round(policy, trainer, settings, settings.local_epochs)
            train = trainer.train_round(objective, settings.local_epochs, groups=groups, progress=not args.no_progress)
        except PolicyViolation as err:
            print(f"round {r}: {err}", file=sys.stderr)
            status = 2
            break
        except BudgetExceededError as err:
            print(f"round {r}: {err}", file=sys.stderr)
            status = EXIT_BUDGET
            break
        metrics = trainer.evaluate(holdout_set if held_out else train_set)
        record = _finite({"round": r, **train, **{f"{prefix}_{k}": v for k, v in metrics.items()}})
        rounds.append(record)
        eps = f" epsilon={record['epsilon']:.3f}" if "epsilon" in record else " (no DP)"
        print(f"round {r}: loss={record['loss_total']:.4f} {prefix} loss={record[f'{prefix}_loss_total']:.4f}"
              f"{eps} steps={int(record['steps'])}")
    result = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
            "modalities": modalities,
            "dp": asdict(dp_config_for(settings)),
            "delta": trainer.delta,
            "train_patients": len(train_set),
            "heldout_patients": len(holdout_set),
            "validation": report.to_dict(),
        },
        "rounds": rounds,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    return status
