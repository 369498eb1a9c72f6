"""Patients, not scans, are the unit of privacy: group a site's sessions by patient.

A site's manifest lists scan sessions (subjects); several may belong to one patient (follow-up
timepoints, or the same scan filed twice, which validation finds by content and merges). DP-SGD
protects a *sample*; for the guarantee to be patient-level, a patient must be one sample however many
sessions they have. :class:`PatientDataset` makes it so: item ``i`` is patient ``i``, and each time
it is drawn it yields **one** of the patient's sessions, chosen uniformly at random.

Why one session per draw rather than averaging the sessions' gradients before clipping: Opacus
computes one per-sample gradient per batch row, so a patient must be one row. A drawn session is a
function of that patient's data only, so the clipped per-patient gradient still has norm at most
``max_grad_norm``, Poisson sampling still includes each *patient* with probability ``q``, and the
accountant's epsilon is per patient. Averaging would need every session of a patient in one row
(varying counts, several times the memory per step) for no gain in the guarantee. The price: an
epoch sees one session per patient, not all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import Dataset

from fedpir.data.manifest import SubjectRecord


def patient_groups(records: Sequence[SubjectRecord]) -> list[list[int]]:
    """Indices of each patient's sessions, patients in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, rec in enumerate(records):
        groups.setdefault(rec.patient_id, []).append(index)
    return list(groups.values())


def patient_share(records: Sequence[SubjectRecord], indices: Sequence[int]) -> float:
    """The ``n`` of a per-session average over the sessions ``indices`` whose sensitivity to one
    patient is ``range / n``: the sessions divided by the most sessions one patient has among them
    (one patient with two of four sessions moves the average by up to 2/4, as if n were 2)."""
    counts: dict[str, int] = {}
    for i in indices:
        counts[records[i].patient_id] = counts.get(records[i].patient_id, 0) + 1
    return len(indices) / max(counts.values()) if counts else 0.0


def merge_patients(records: Sequence[SubjectRecord], same: Iterable[Iterable[str]]) -> list[SubjectRecord]:
    """``records`` with the patients of each set of subject ids in ``same`` merged into one patient
    (the first-listed record's patient id, transitively); records are copied, not modified."""
    parent: dict[str, str] = {}

    def find(patient: str) -> str:
        while parent.get(patient, patient) != patient:
            patient = parent[patient]
        return patient

    by_subject = {rec.subject_id: rec.patient_id for rec in records}
    order = {rec.patient_id: i for i, rec in reversed(list(enumerate(records)))}
    for subjects in same:
        roots = sorted({find(by_subject[s]) for s in subjects if s in by_subject}, key=order.__getitem__)
        for other in roots[1:]:
            parent[other] = roots[0]
    return [replace(rec, patient_id=find(rec.patient_id)) for rec in records]


class PatientDataset(Dataset):
    """One item per patient: a uniformly drawn session of theirs from ``sessions`` (see the module
    docstring). ``groups`` lists the session indices of each patient; ``seed`` starts the draw stream."""

    def __init__(self, sessions: Dataset, groups: Sequence[Sequence[int]], seed: int = 0) -> None:
        if any(len(group) == 0 for group in groups):
            raise ValueError("every patient needs at least one session")
        self.sessions, self.groups = sessions, [list(group) for group in groups]
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = self.groups[index]
        pick = int(torch.randint(len(group), (1,), generator=self.generator)) if len(group) > 1 else 0
        return self.sessions[group[pick]]
