"""Tree search: the best Medusa tree for each node budget, from calibrated joint acceptance (no timing, no model).

For every node budget n (tree tokens per step, root included) the best prefix-closed tree is the n - 1 most likely
paths (see `greedy_order` for the proof); its expected accepted length is 1 + the sum of their probabilities.
`choose` then picks the budget: the largest one for the `acceptance` objective, or the one with the best predicted
tokens/s given measured step latencies (medusa_toolkit.tuning.timing) for the `speed` objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medusa_toolkit.model.tree import MedusaTree
from medusa_toolkit.tuning.calibration import Calibration


def greedy_order(calib: Calibration) -> list[tuple[int, ...]]:
    """Every path with a nonzero count, best first; the optimal tree with budget n is the first n - 1 paths.

    Order: count descending, then depth ascending, then ranks. Why taking a prefix of this order is optimal: the
    objective 1 + sum(p) is additive over nodes, so for n - 1 nodes no set of any shape beats the n - 1 largest p.
    That set is prefix-closed: a child's matching positions are a subset of its parent's (the child's path extends
    the parent's), so count(child) <= count(parent) holds exactly for empirical counts, and on a tie the parent wins
    on depth; hence every parent comes before its child in the order. Equivalently, repeatedly adding the best
    frontier node (the greedy algorithm) picks this same sequence, because the best remaining node's parent is always
    already in. Paths with count 0 add nothing, so a budget larger than the nonzero paths gets no extra nodes.
    """
    return sorted(calib.path_counts, key=lambda p: (-calib.path_counts[p], len(p), p))


def accept_length_curve(calib: Calibration, order: list[tuple[int, ...]], max_nodes: int) -> list[float]:
    """Expected accepted length of the optimal tree for n = 1 .. max_nodes tree tokens (root included)."""
    probs = [calib.probability(p) for p in order[: max(0, max_nodes - 1)]]
    curve = [1.0]
    for p in probs:
        curve.append(curve[-1] + p)
    curve += [curve[-1]] * (max_nodes - len(curve))  # no more nonzero paths: bigger budgets gain nothing
    return curve[:max_nodes]


def tree_for_budget(order: list[tuple[int, ...]], n: int, name: str | None = None) -> MedusaTree:
    """The optimal tree with n tree tokens (root included)."""
    return MedusaTree.from_paths(order[: max(0, n - 1)], name=name or f"tuned-{n}")


@dataclass
class TuneResult:
    tree: MedusaTree
    chosen_nodes: int
    budgets: list[int]  # 1 .. max budget
    accept_length: list[float]  # expected accepted length per budget
    step_time: list[float] | None = None  # interpolated seconds per step (speed objective)
    measured_latency: dict[int, float] = field(default_factory=dict)  # the timed grid
    latency_spread: dict[int, float] = field(default_factory=dict)  # interquartile range / median of its repeats

    @property
    def tokens_per_second(self) -> list[float] | None:
        if self.step_time is None:
            return None
        return [a / t for a, t in zip(self.accept_length, self.step_time)]

    @property
    def predicted_accept_length(self) -> float:
        return self.accept_length[self.chosen_nodes - 1]

    @property
    def predicted_tokens_per_second(self) -> float | None:
        tps = self.tokens_per_second
        return None if tps is None else tps[self.chosen_nodes - 1]


def choose(calib: Calibration, max_nodes: int, latency: dict[int, float] | None = None) -> TuneResult:
    """The optimal tree: the largest useful budget without `latency`, else the budget with the best predicted
    tokens/s, interpolating measured step latencies {budget: seconds} between the timed budgets."""
    order = greedy_order(calib)
    top = min(max_nodes, len(order) + 1)  # beyond the nonzero paths a bigger tree only costs time
    budgets = list(range(1, top + 1))
    curve = accept_length_curve(calib, order, top)
    if latency is None:
        return TuneResult(tree_for_budget(order, top, f"tuned-acceptance-{top}"), top, budgets, curve)
    timed = sorted(latency)
    step = np.interp(budgets, timed, [latency[n] for n in timed]).tolist()
    best = int(np.argmax([a / t for a, t in zip(curve, step)])) + 1
    return TuneResult(tree_for_budget(order, best, f"tuned-speed-{best}"), best, budgets, curve, step, dict(latency))
