"""Which examples a run uses when it is told to use fewer: the file's first N, or a seeded random draw
stratified by what the task's examples are made of (WebNLG: category and number of triples; classification:
the label). Data files are often sorted, so the first N can all come from one category; a stratified draw
keeps each group's share of the file."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

SAMPLES = ("first", "random")
EVAL_SEED = 0  # the evaluation draw's seed, whatever the training seed: runs compare on the same inputs


def stratified_indices(strata: Sequence[Hashable], count: int, seed: int) -> list[int]:
    """``count`` distinct positions of ``strata`` drawn at random, each stratum given its share of
    ``count`` (largest remainders first, ties broken by the seeded draw), returned in file order."""
    if count >= len(strata):
        return list(range(len(strata)))
    groups: dict[Hashable, list[int]] = {}
    for position, key in enumerate(strata):
        groups.setdefault(key, []).append(position)
    draw = random.Random(seed)
    keys = sorted(groups, key=repr)  # an order that does not depend on hashing
    shares = {key: count * len(groups[key]) / len(strata) for key in keys}
    taken = {key: int(shares[key]) for key in keys}
    tie_breaks = {key: draw.random() for key in keys}
    by_remainder = sorted(keys, key=lambda key: (taken[key] - shares[key], tie_breaks[key]))
    for key in by_remainder[: count - sum(taken.values())]:
        taken[key] += 1
    return sorted(position for key in keys for position in draw.sample(groups[key], taken[key]))
