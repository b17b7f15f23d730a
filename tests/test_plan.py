"""qsim plan: the split is optimal (brute force, a plain reference DP), the caches fit the budget as QEMU builds
them, the baselines are what they say, the CLI keeps the project's conventions, and libvirt XML round-trips."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsim.cachecfg import CacheSettings, resolve_cache
from qsim.errors import QsimError
from qsim.geometry import ImageGeometry
from qsim.knapsack import Problem, best_values, solve
from qsim.plan import Constraints, buildable_option, disk_from_rows, plan_host

G = 1 << 30


# --- the optimiser -------------------------------------------------------------------------------------------------
def brute_force(costs, values, budget):
    """Least total value over every combination within the budget (the cheapest such), or None."""
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[k] for c, k in zip(costs, combo))
        value = sum(v[k] for v, k in zip(values, combo))
        if cost <= budget and (best is None or (value, cost) < best[:2]):
            best = (value, cost, combo)
    return best


def reference_dp(costs, values, budget):
    """Plain Python: the Pareto frontier {cost: least value} grown one group at a time (no discretization)."""
    frontier = {0: 0.0}
    for c, v in zip(costs, values):
        grown: dict = {}
        for total, value in frontier.items():
            for ci, vi in zip(c, v):
                t = total + ci
                if t <= budget and value + vi < grown.get(t, math.inf):
                    grown[t] = value + vi
        frontier = grown
    return min(frontier.values()) if frontier else None


groups = st.lists(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 500)), min_size=1, max_size=4),
                  min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(groups, st.integers(0, 160), st.sampled_from([512, 4096, 1000]))
def test_dp_equals_brute_force_on_small_instances(instance, budget_units, scale):
    costs = [[c * scale for c, _ in g] for g in instance]
    values = [[float(v) for _, v in g] for g in instance]
    budget = budget_units * scale
    expected = brute_force(costs, values, budget)
    problem = Problem.from_groups(costs, values)
    if expected is None:
        with pytest.raises(QsimError, match="below the smallest caches"):
            solve(problem, budget)
        return
    got = solve(problem, budget)
    assert (got.total_value, got.total_cost) == expected[:2]  # the optimum, and the cheapest optimum
    assert sum(c[k] for c, k in zip(costs, got.choice)) == got.total_cost <= budget
    assert sum(v[k] for v, k in zip(values, got.choice)) == got.total_value
    assert best_values(problem, [budget])[0] == expected[0]


def test_dp_equals_a_plain_reference_on_larger_instances():
    rng = np.random.default_rng(7)
    for trial in range(6):
        n, k = 25, 10
        costs, values = [], []
        for _ in range(n):
            c = np.sort(rng.choice(np.arange(2, 400), k, replace=False)) * 4096 + 4 * 65536
            # a miss curve that falls, then jumps down at "coverage": not convex
            v = np.sort(rng.integers(1000, 100000, k))[::-1].astype(float)
            v[-1] = rng.integers(0, 100)
            costs.append(c.tolist())
            values.append(v.tolist())
        problem = Problem.from_groups(costs, values)
        for budget in np.linspace(problem.min_cost, problem.max_cost, 5).astype(int):
            got = solve(problem, int(budget))
            assert got.total_value == reference_dp(costs, values, int(budget))
            assert got.total_cost <= budget


def test_choices_come_back_in_the_callers_order():
    problem = Problem.from_groups([[30, 10, 20], [20, 10]], [[0, 5, 3], [1, 4]])
    got = solve(problem, 40)
    assert got.choice.tolist() == [0, 1] and got.total_value == 4 and got.total_cost == 40
    assert best_values(problem, [10, 20, 30, 40, 50, 60, 1000]).tolist()[1:] == [9, 6, 4, 1, 1, 1]
    assert np.isnan(best_values(problem, [10])[0])


# --- disks from sweep rows -----------------------------------------------------------------------------------------
def sweep_rows(name: str, virtual_size: int, curve: dict, cluster=65536, extended=False, trace=None):
    """Sweep-shaped rows for l2-cache-size -> misses (None = QEMU's default), computed with QEMU's rules."""
    g = ImageGeometry(virtual_size, cluster, extended)
    rows = []
    for asked, misses in curve.items():
        c = resolve_cache(g, CacheSettings(l2_cache_size=asked))
        rows.append({"trace_id": name, "trace": trace or f"/traces/{name}.iolog", "virtual_size": virtual_size,
                     "cluster_size": cluster, "extended_l2": extended,
                     "l2_cache_size_asked": "default" if asked is None else str(asked),
                     "l2_cache_bytes": c.l2_cache_bytes, "l2_cache_entry_size": c.l2_cache_entry_size,
                     "l2_cache_entries": c.l2_cache_entries, "l2_cache_ram_bytes": c.l2_cache_ram_bytes,
                     "covered_fraction": c.covered_fraction, "requests": 1000, "l2_misses": misses,
                     "metadata_read_bytes": misses * c.l2_cache_entry_size,
                     "metadata_write_bytes": 0, "preallocation": "metadata", "cache_mode": "writeback"})
    return pd.DataFrame(rows)


def test_options_are_the_buildable_caches_counted_as_qemu_allocates_them():
    # 100G, 64k clusters: whole-disk L2 = 12.5M; 512M with 64k: one table, QEMU's 2-entry minimum
    frame = sweep_rows("big", 100 * G, {65536: 900, 100000: 800, 1 << 20: 500, None: 3, 64 << 20: 3})
    disk = disk_from_rows("big", "big", "t", ImageGeometry(100 * G), frame)
    o = disk.options
    assert o["l2_cache_entries"].tolist() == [16, 24, 256, 200]  # 100000 bytes -> 24 x 4k; default = 64M = cover
    assert o["l2_cache_entry_size"].tolist() == [4096, 4096, 4096, 65536]
    assert o["ram_bytes"].tolist() == [65536 + 262144, 98304 + 262144, (1 << 20) + 262144, 12800 * 1024 + 262144]
    assert o["cache_size"].tolist() == o["ram_bytes"].tolist()
    assert o["is_qemu_default"].tolist() == [False, False, False, True]
    small = buildable_option(ImageGeometry(512 << 20), 2, 65536)
    assert (small["l2_cache_size"], small["cache_size"], small["ram_bytes"]) == (65536, 327680, 393216)
    two_m = buildable_option(ImageGeometry(100 * G, 2 << 20), 2, 2 << 20)  # one 2M table covers 512G
    assert (two_m["cache_size"], two_m["ram_bytes"]) == (10 << 20, 12 << 20)
    assert buildable_option(ImageGeometry(100 * G), 16, 8192) is None  # a forced entry size: not from cache-size


def make_fleet():
    curves = {
        "web": (20 * G, {65536: 5000, 262144: 4000, 1 << 20: 1500, 2 << 20: 900, None: 10}),
        "db": (200 * G, {65536: 90000, 262144: 70000, 1 << 20: 30000, 4 << 20: 20000, 16 << 20: 8000,
                         None: 7000}),
        "logs": (50 * G, {65536: 2000, 262144: 1990, 1 << 20: 1980, 4 << 20: 1970, None: 1960}),
        "tiny": (512 << 20, {65536: 40, None: 40}),
    }
    disks = []
    for name, (size, curve) in curves.items():
        disks.append(disk_from_rows(name, name, f"/t/{name}", ImageGeometry(size), sweep_rows(name, size, curve)))
    return disks


def test_plan_is_optimal_and_fits_the_budget_as_qemu_builds_it():
    disks = make_fleet()
    for budget in [2 << 20, 5 << 20, 12 << 20, 40 << 20]:
        plan = plan_host(disks, budget)
        rows = plan.disk_rows()
        ram = 0
        for disk, row in zip(disks, rows):
            built = resolve_cache(disk.geometry, CacheSettings(cache_size=row["cache_size"]))
            assert (built.l2_cache_entries, built.l2_cache_entry_size) == (row["l2_cache_entries"],
                                                                            row["l2_cache_entry_size"])
            via_l2 = resolve_cache(disk.geometry, CacheSettings(l2_cache_size=row["l2_cache_size"]))
            assert (via_l2.l2_cache_entries, via_l2.l2_cache_entry_size) == (built.l2_cache_entries,
                                                                              built.l2_cache_entry_size)
            assert built.refcount_cache_entries == 4
            assert f"<max_size unit='bytes'>{row['cache_size']}</max_size>" in row["settings"]["libvirt"]
            ram += built.l2_cache_ram_bytes + built.refcount_cache_bytes
        assert ram == plan.total_ram_bytes <= budget
        costs = [d.options["ram_bytes"].tolist() for d in disks]
        values = [d.options["misses"].tolist() for d in disks]
        assert plan.total_misses == brute_force(costs, values, budget)[0]


def test_plan_numbers_at_5M():
    plan = plan_host(make_fleet(), 5 << 20)
    got = {r["trace"]: (r["cache_size"], r["misses"]) for r in plan.disk_rows()}
    # tiny (512M: one table) costs 64k+256k with 2 entries = 384k RAM; web's 20G cover is 2.5M + 256k
    assert got == {"db": (1310720, 30000), "logs": (524288, 1990), "tiny": (327680, 40), "web": (2883584, 10)}
    assert plan.total_misses == 32040 and plan.total_ram_bytes == 1310720 + 524288 + 393216 + 2883584
    d = plan.to_dict()
    assert d["budget"] == 5 << 20 and d["objective"] == "misses" and d["total_misses"] == 32040
    assert d["budget_used"] == 5111808
    # equal: 1.25M each -> web 1M+256k, db 1M+256k, logs 1M+256k, tiny its only cache
    assert d["baselines"]["equal"]["total_misses"] == 1500 + 30000 + 1980 + 40
    assert d["baselines"]["equal"]["total_cache_size"] == 3 * 1310720 + 393216
    # proportional to 20G:200G:50G:512M -> 378k, 3.7M, 946k, 9.5k: tiny cannot get less than its 2 entries
    assert d["baselines"]["proportional"]["total_misses"] == 5000 + 30000 + 1990 + 40
    assert d["baselines"]["proportional"]["overspent_disks"] == ["tiny"]


def test_baselines_and_the_default_at_the_same_ram():
    disks = make_fleet()
    plan = plan_host(disks, 8 << 20)
    default = plan.baselines["qemu_default"]
    # the defaults: web 2.5M (covers), db 25M (covers 200G), logs 6.25M (covers), tiny 64k -> 2 x 64k
    assert default["total_cache_size"] == (2560 + 25600 + 6400) * 1024 + 128 * 1024 + 4 * 262144
    assert default["total_misses"] == 10 + 7000 + 1960 + 40
    assert default["plan_total_objective_at_same_cache_size"] <= default["total_misses"]
    assert plan_host(disks, default["total_cache_size"]).total_misses == \
        default["plan_total_objective_at_same_cache_size"]
    for name in ("proportional", "equal"):
        base = plan.baselines[name]
        assert base["total_cache_size"] <= 8 << 20 and base["overspent_disks"] == (["tiny"] if name == "proportional"
                                                                                   else [])
        assert plan.total_misses <= base["total_misses"]
    assert (plan.baselines["proportional"]["total_misses"], plan.baselines["equal"]["total_misses"]) == \
        (4000 + 20000 + 1980 + 40, 1500 + 30000 + 1980 + 40)  # equal: 2M each
    curve = plan.curve
    for name in ("equal", "proportional"):  # wherever the baseline kept to the budget, the plan is at least as good
        ok = curve[name + "_cache_size"] <= curve["budget"]
        assert ok.sum() > 30 and (curve["plan"] <= curve[name])[ok].all()
    assert curve["plan"].is_monotonic_decreasing


def test_constraints_min_max_and_pins():
    disks = make_fleet()
    free = plan_host(disks, 5 << 20)
    assert free.chosen(0)["misses"] == 10  # web covered
    capped = plan_host(disks, 5 << 20, constraints=Constraints(max_bytes={"web": 1 << 20}))
    assert capped.chosen(0)["ram_bytes"] <= 1 << 20 and capped.total_misses >= free.total_misses
    pinned = plan_host(disks, 40 << 20, constraints=Constraints(pins={"db": 1310720, "logs": "default"}))
    rows = {r["trace"]: r for r in pinned.disk_rows()}
    assert rows["db"]["cache_size"] == 1310720 and rows["logs"]["is_qemu_default"]
    floor = plan_host(disks, 5 << 20, constraints=Constraints(min_bytes={None: 1 << 20, "tiny": 0}))
    assert {r["trace"]: r["ram_bytes"] for r in floor.disk_rows()} == \
        {"web": 1310720, "db": 1310720, "logs": 1310720, "tiny": 393216}  # a disk's own bound beats the global one
    with pytest.raises(QsimError, match=r"tiny: no measured cache between --min and --max \(measured RAM: 384k\)"):
        plan_host(disks, 40 << 20, constraints=Constraints(min_bytes={None: 1 << 20}))
    with pytest.raises(QsimError, match="db: pinned to cache-size 3M .* which the sweep did not measure"):
        plan_host(disks, 40 << 20, constraints=Constraints(pins={"db": 3 << 20}))
    with pytest.raises(QsimError, match="--pin nope=...: no disk of that name"):
        plan_host(disks, 40 << 20, constraints=Constraints(pins={"nope": 1 << 20}))
    with pytest.raises(QsimError, match=r"below the smallest caches allowed: these 4 disks need at least 1344k"):
        plan_host(disks, 1 << 20)


def test_other_objectives():
    disks = make_fleet()
    by_bytes = plan_host(disks, 5 << 20, objective="metadata-bytes")
    costs = [d.options["ram_bytes"].tolist() for d in disks]
    values = [(d.options["metadata_bytes"]).tolist() for d in disks]
    assert by_bytes.total_objective == brute_force(costs, values, 5 << 20)[0]
    with pytest.raises(QsimError, match="/t/web: --objective misses-per-second needs the trace's time span"):
        plan_host(disks, 5 << 20, objective="misses-per-second")
    from dataclasses import replace

    spans = {"web": 10.0, "db": 1000.0, "logs": 1.0, "tiny": 1.0}
    timed = [replace(d, span_seconds=spans[d.name]) for d in disks]
    per_second = plan_host(timed, 5 << 20, objective="misses-per-second")
    values = [(d.options["misses"] / spans[d.name]).tolist() for d in disks]
    assert per_second.total_objective == pytest.approx(brute_force(costs, values, 5 << 20)[0])
    # at 3M, db's misses weigh 1/1000 of a second each: the RAM goes to web (10 s) instead
    rate = plan_host(timed, 3 << 20, objective="misses-per-second").disk_rows()
    plain = plan_host(disks, 3 << 20).disk_rows()
    assert [(r["trace"], r["ram_bytes"], r["misses"]) for r in rate] == \
        [("web", 1310720, 1500), ("db", 524288, 70000), ("logs", 524288, 1990), ("tiny", 393216, 40)]
    assert [(r["trace"], r["ram_bytes"], r["misses"]) for r in plain] == \
        [("web", 524288, 4000), ("db", 1310720, 30000), ("logs", 524288, 1990), ("tiny", 393216, 40)]
