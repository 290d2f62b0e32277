"""Patient-level splits of a PanFoMaBench build.

A patient is (study, patient id) and all its cells go to one split. Within each cancer type, patients are
shuffled (seeded per cancer type, so one type's assignment does not depend on which others exist) and assigned
greedily towards the target cell fractions, each evaluation split first receiving one patient; a cancer type
with fewer patients than splits goes to `train`. Held-out studies go, whole, to `HELD_OUT_SPLIT`.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import numpy as np

from .qc import StudyState

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
HELD_OUT_SPLIT = "held_out_study"
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def assign_splits(states: list[StudyState], fractions: Sequence[float], seed: int,
                   held_out: set[str]) -> dict[str, list[str]]:
    """Set `state.split_of_cell` (int8 index into SPLITS + held-out); return patients per split."""
    split_names = list(SPLITS) + [HELD_OUT_SPLIT]
    # (cancer type) -> list of (patient key, n retained cells, study index, patient code)
    by_cancer: dict[str, list[tuple[str, int, int, int]]] = {}
    held_out_patients: list[str] = []
    for s_idx, state in enumerate(states):
        state.split_of_cell = np.full(state.n_cells, -1, dtype=np.int8)
        kept_codes = state.patient_codes[state.keep]
        sizes = np.bincount(kept_codes, minlength=len(state.patient_names))
        if state.study.name in held_out:
            state.split_of_cell[state.keep] = split_names.index(HELD_OUT_SPLIT)
            held_out_patients.extend(f"{state.study.name}:{state.patient_names[c]}" for c in np.flatnonzero(sizes))
            continue
        for code, size in enumerate(sizes):
            if size:
                key = f"{state.study.name}:{state.patient_names[code]}"
                by_cancer.setdefault(state.study.cancer_type, []).append((key, int(size), s_idx, code))
    patients: dict[str, list[str]] = {name: [] for name in split_names}
    patients[HELD_OUT_SPLIT] = held_out_patients
    active = [i for i, f in enumerate(fractions) if f > 0]
    split_of_patient = [np.full(len(state.patient_names), -1, dtype=np.int8) for state in states]
    for cancer in sorted(by_cancer):
        group = sorted(by_cancer[cancer])
        # A per-cancer-type generator keeps one type's assignment independent of which others exist.
        rng = np.random.default_rng([seed, int(hashlib.sha256(cancer.encode()).hexdigest()[:8], 16)])
        order = rng.permutation(len(group))
        total = sum(size for _, size, _, _ in group)
        filled = np.zeros(len(SPLITS))
        assigned: list[int] = []
        if len(group) < len(active):
            logger.warning("cancer type %r has %d patient(s), fewer than the %d splits: it cannot be stratified "
                           "and goes entirely to 'train'.", cancer, len(group), len(active))
            assigned = [0] * len(group)
        else:
            # Every active split first receives one patient (evaluation splits first, so each cancer
            # type with enough patients is represented in them), then greedy filling by cell deficit.
            seeds = [i for i in active if i != 0] + ([0] if 0 in active else [])
            for position, _ in enumerate(order):
                if position < len(seeds):
                    choice = seeds[position]
                else:
                    deficit = np.array([fractions[i] * total - filled[i] if i in active else -np.inf
                                        for i in range(len(SPLITS))])
                    choice = int(np.argmax(deficit))
                filled[choice] += group[order[position]][1]
                assigned.append(choice)
        for position, split_index in enumerate(assigned):
            key, _, s_idx, code = group[order[position]]
            split_of_patient[s_idx][code] = split_index
            patients[SPLITS[split_index]].append(key)
    for state, lookup in zip(states, split_of_patient):
        if state.study.name not in held_out:
            state.split_of_cell[state.keep] = lookup[state.patient_codes[state.keep]]
    return {name: sorted(keys) for name, keys in patients.items()}


