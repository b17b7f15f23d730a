"""Exact multiple-choice knapsack: one option per group, total cost within a budget, least total value.

``qsim plan`` splits one RAM budget over many disks: each disk (a group) offers the caches its sweep measured (the
options), each with a cost in bytes and a value (misses, bytes, misses per second). Miss curves are monotone in the
entry count only for a fixed slice size; QEMU's switch from 4 KiB slices to whole tables at the coverage point breaks
convexity, so a greedy on convex hulls is not optimal here. This is exact dynamic programming instead:

- every cost is taken relative to its group's cheapest option (which every group must have), and all are counted
  in units of ``g``, the greatest common divisor of those relative costs (4 KiB or 512 bytes for QEMU's caches), so
  the discretization loses nothing: any feasible choice costs a whole number of units;
- ``best[u]`` = least total value of the groups so far within ``u`` units; one group at a time,
  ``best'[u] = min over options (best[u - cost] + value)``, O(options x units), a numba kernel that stops each
  group's loops at what the groups so far can cost at most;
- the choice table (one small integer per group and unit) gives the selection back; the cheapest of the optimal
  selections is returned, ties going to the cheaper option.

One run to a budget also gives the optimum at every smaller budget (``best``), which is the plan's curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit

from .errors import QsimError

MAX_CHOICE_TABLE_BYTES = 1 << 30  # groups x units x 2 bytes; beyond this, ask for fewer or coarser options


@dataclass(frozen=True)
class Selection:
    """The optimum: one option index per group, its total cost (bytes) and total value."""

    choice: np.ndarray  # int64, an option index per group
    total_cost: int
    total_value: float


@dataclass(frozen=True)
class Problem:
    """Groups of options, flattened: ``cost`` (int64 bytes) and ``value`` (float64) per option, options of group
    ``i`` at ``starts[i]:starts[i+1]``, each group sorted by cost."""

    cost: np.ndarray
    value: np.ndarray
    starts: np.ndarray
    order: tuple = ()  # per group, the sorting permutation from the caller's option order

    @classmethod
    def from_groups(cls, costs: list, values: list) -> Problem:
        if not costs:
            raise QsimError("nothing to plan: no disks")
        lengths = [len(c) for c in costs]
        if min(lengths) == 0:
            raise QsimError("a disk has no cache option to choose from")
        if max(lengths) > np.iinfo(np.int16).max:
            raise QsimError(f"a disk has {max(lengths)} cache options; the plan takes at most 32767")
        order = [np.argsort(np.asarray(c, dtype=np.int64), kind="stable") for c in costs]
        cost = np.concatenate([np.asarray(c, dtype=np.int64)[o] for c, o in zip(costs, order)])
        value = np.concatenate([np.asarray(v, dtype=np.float64)[o] for v, o in zip(values, order)])
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(cost, value, starts, tuple(order))

    @property
    def groups(self) -> int:
        return len(self.starts) - 1

    @property
    def base(self) -> np.ndarray:
        """Each group's cheapest cost (bytes)."""
        return self.cost[self.starts[:-1]]

    @property
    def unit(self) -> int:
        """Bytes per DP unit: the gcd of all costs above their group's cheapest (1 if every group has one cost)."""
        relative = self.cost - np.repeat(self.base, np.diff(self.starts))
        g = int(np.gcd.reduce(relative)) if len(relative) else 0
        return g or 1

    @property
    def min_cost(self) -> int:
        return int(self.base.sum())

    @property
    def max_cost(self) -> int:
        return int(self.cost[self.starts[1:] - 1].sum())

    @cached_property
    def optimum(self) -> np.ndarray:
        """``best[u]``: the least total value within ``min_cost + u * unit`` bytes, for every u up to ``max_cost``
        (one values-only DP run, kept for the curve and the questions asked of it)."""
        top = (self.max_cost - self.min_cost) // self.unit
        return _mckp(_relative_units(self), self.value, self.starts, top, False)[0]

    def units(self, budget: int) -> int:
        """Budget units above the cheapest selection (-1 if even that does not fit)."""
        return -1 if budget < self.min_cost else (budget - self.min_cost) // self.unit


def solve(problem: Problem, budget: int) -> Selection:
    """The selection of least total value whose total cost is at most ``budget`` bytes (QsimError if none fits)."""
    units = problem.units(budget)
    if units < 0:
        raise QsimError(f"budget {budget} is below the smallest caches the disks can have ({problem.min_cost} bytes)")
    units = min(units, (problem.max_cost - problem.min_cost) // problem.unit)
    if problem.groups * (units + 1) * 2 > MAX_CHOICE_TABLE_BYTES:
        raise QsimError(f"the plan's table would take {problem.groups * (units + 1) * 2 >> 20} MiB: give fewer disks "
                        "or a smaller budget")
    rel = _relative_units(problem)
    best, table, reach = _mckp(rel, problem.value, problem.starts, units, True)
    u = int(np.flatnonzero(best == best[units])[0])  # the cheapest of the optimal selections
    choice = np.empty(problem.groups, dtype=np.int64)
    for d in range(problem.groups - 1, -1, -1):
        k = int(table[d, min(u, reach[d])])
        choice[d] = k
        u -= int(rel[problem.starts[d] + k])
    flat = problem.starts[:-1] + choice
    original = np.array([problem.order[d][k] for d, k in enumerate(choice)]) if problem.order else choice
    return Selection(original, int(problem.cost[flat].sum()), float(problem.value[flat].sum()))


def best_values(problem: Problem, budgets) -> np.ndarray:
    """The optimal total value at each budget (bytes; NaN where nothing fits), read from ``problem.optimum``."""
    budgets = np.asarray(budgets, dtype=np.int64)
    out = np.full(len(budgets), np.nan)
    if problem.units(int(budgets.max())) < 0:
        return out
    best = problem.optimum
    top = len(best) - 1
    for i, b in enumerate(budgets):
        u = problem.units(int(b))
        if u >= 0:
            out[i] = best[min(u, top)]
    return out


def least_cost_for(problem: Problem, target: float) -> int | None:
    """The smallest budget (bytes) at which the optimum's total value is at most ``target`` (None if never)."""
    reached = np.flatnonzero(problem.optimum <= target)
    return None if not len(reached) else problem.min_cost + int(reached[0]) * problem.unit


def _relative_units(problem: Problem) -> np.ndarray:
    base = np.repeat(problem.base, np.diff(problem.starts))
    return (problem.cost - base) // problem.unit


@njit(cache=True)
def _mckp(cost, value, starts, units, keep_choice):  # pragma: no cover - compiled; tests hold it to a reference
    """best[u] over all groups, and (when ``keep_choice``) each group's choice at u <= reach[group], where
    reach[group] = the most the groups so far can cost; past it nothing changes, so the loops stop there."""
    n = len(starts) - 1
    best = np.zeros(units + 1)
    new = np.empty(units + 1)
    table = np.zeros((n if keep_choice else 0, units + 1), dtype=np.int16)
    reach = np.zeros(n, dtype=np.int64)
    top = 0
    for d in range(n):
        first, last = starts[d], starts[d + 1]
        top = min(units, top + cost[last - 1])  # options are sorted: the last one is the dearest
        reach[d] = top
        v0 = value[first]  # the cheapest option costs 0 units (costs are relative to it)
        for u in range(top + 1):
            new[u] = best[u] + v0
        for o in range(first + 1, last):
            c = cost[o]
            v = value[o]
            if keep_choice:
                k = o - first
                for u in range(c, top + 1):
                    x = best[u - c] + v
                    if x < new[u]:
                        new[u] = x
                        table[d, u] = k
            else:
                for u in range(c, top + 1):
                    x = best[u - c] + v
                    new[u] = x if x < new[u] else new[u]
        for u in range(top + 1, units + 1):
            new[u] = new[top]
        best, new = new, best
    return best, table, reach
