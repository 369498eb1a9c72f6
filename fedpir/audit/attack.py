"""Empirical privacy audit: a loss-threshold membership-inference attack on one site's model.

The attacker holds the trained model and a patient, and guesses "member" (the site trained on this
patient) when the model's loss on the patient is low (Yeom et al., 2018). Its power is summed up by
the AUROC of the score ``-loss`` over the site's training patients (members) against held-out
patients of the same distribution (non-members): 0.5 is a coin toss, 1.0 tells every member from
every non-member. Differential privacy bounds it: an (epsilon, delta)-DP training run keeps any
attack's true-positive rate at most ``e^epsilon * FPR + delta``, so at small epsilon the AUROC
stays near 0.5 (an empirical lower bound on the leakage, not a proof of privacy).

:func:`attack_site` trains one model with the site's own trainer (:class:`LocalTrainer`, Opacus
DP-SGD when an epsilon is given) on the members and runs the attack;
:mod:`fedpir.audit.attack_study` repeats it over seeds and epsilons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.stats import rankdata
from torch.utils.data import Subset

from fedpir.data.dataset import SiteDataset
from fedpir.data.patients import PatientDataset, patient_groups
from fedpir.models.groups import objective_for, trainable_groups
from fedpir.run_config import RunSettings
from fedpir.training.model import build_model
from fedpir.training.trainer import LocalTrainer

MEMBER_FRACTION = 0.5


def auroc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling members (higher score) from non-members: the probability
    that a random member outscores a random non-member, ties counted half (Mann-Whitney U)."""
    members, others = np.asarray(member_scores, float).ravel(), np.asarray(nonmember_scores, float).ravel()
    if not members.size or not others.size:
        raise ValueError("the attack needs at least one member and one non-member")
    if not (np.isfinite(members).all() and np.isfinite(others).all()):
        raise ValueError("membership scores must be finite")
    ranks = rankdata(np.concatenate([members, others]))  # average ranks: ties count half
    u = ranks[: members.size].sum() - members.size * (members.size + 1) / 2
    return float(u / (members.size * others.size))


def patient_losses(trainer: LocalTrainer, sessions: SiteDataset | Subset, groups: list[list[int]],
                   objective: str) -> np.ndarray:
    """Each patient's loss under the trainer's model: the mean of ``objective``'s total loss over the
    patient's sessions (``groups``: session indices per patient), evaluated as the site evaluates."""
    return np.array([trainer.evaluate(Subset(sessions, group), objective)["loss_total"] for group in groups])


@dataclass
class AttackResult:
    """One trained model and the attack on it (``epsilon`` None: trained without DP)."""

    seed: int
    target_epsilon: float | None
    epsilon: float | None
    delta: float | None
    auroc: float
    member_losses: list[float] = field(repr=False)
    nonmember_losses: list[float] = field(repr=False)
    train_seconds: float = 0.0

    @property
    def epsilon_label(self) -> str:
        """The epsilon spent as printed ("inf" without DP)."""
        return "inf" if self.epsilon is None else f"{self.epsilon:.3g}"

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object (no DP: ``epsilon`` null)."""
        return {"seed": self.seed, "target_epsilon": self.target_epsilon, "epsilon": self.epsilon,
                "delta": self.delta, "auroc": self.auroc,
                "member_loss_mean": float(np.mean(self.member_losses)),
                "nonmember_loss_mean": float(np.mean(self.nonmember_losses)),
                "member_losses": self.member_losses, "nonmember_losses": self.nonmember_losses,
                "train_seconds": self.train_seconds}


def split_members(dataset: SiteDataset, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Patients (session index lists) split at random by ``seed``: (members, non-members), half each."""
    groups = patient_groups(dataset.records)
    if len(groups) < 2:
        raise ValueError(f"the attack needs at least 2 patients, the site has {len(groups)}")
    order = np.random.default_rng(seed).permutation(len(groups))
    n_members = max(1, min(len(groups) - 1, round(len(groups) * MEMBER_FRACTION)))
    return [groups[i] for i in sorted(order[:n_members])], [groups[i] for i in sorted(order[n_members:])]


def attack_site(dataset: SiteDataset, settings: RunSettings, *, epsilon: float | None, epochs: int,
                progress: bool = False) -> AttackResult:
    """Train the site's model on a random half of its patients (``settings.seed``: the split, the
    initialisation and the sampling) for ``epochs`` local epochs of one round, without DP
    (``epsilon`` None) or with DP-SGD whose noise spends exactly ``epsilon``; then attack it.

    ``settings`` gives the model, the objective (``finetune_task``), the trained groups
    (``finetune_trainable``), batch size, learning rate, augmentation and the DP knobs."""
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive number (or None for no DP), got {epsilon}")
    members, others = split_members(dataset, settings.seed)
    private = epsilon is not None
    run = replace(settings, dp=private, epsilon_budget=epsilon if private else settings.epsilon_budget,
                  noise_multiplier=0.0, pretrain_rounds=0, finetune_rounds=1)
    objective = objective_for("finetune", run.finetune_task)
    trainer = LocalTrainer.for_run(run, build_model(run), PatientDataset(dataset, members, seed=run.seed),
                                   state_dir=None, seed=run.seed)
    metrics = trainer.train_round(objective, epochs, groups=trainable_groups(run.trainable_for("finetune")),
                                  progress=progress)
    member_losses = patient_losses(trainer, dataset, members, objective)
    other_losses = patient_losses(trainer, dataset, others, objective)
    return AttackResult(seed=run.seed, target_epsilon=epsilon, epsilon=metrics.get("epsilon"),
                        delta=metrics.get("delta"), auroc=auroc(-member_losses, -other_losses),
                        member_losses=member_losses.tolist(), nonmember_losses=other_losses.tolist(),
                        train_seconds=metrics["seconds"])
