"""qsim plan: the split is optimal (brute force, a plain reference DP), the caches fit the budget as QEMU builds
them, the baselines are what they say, the CLI keeps the project's conventions, and libvirt XML round-trips."""

from __future__ import annotations

import itertools
import json

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


def reference_frontier(costs, values):
    """Plain Python, no discretization: the Pareto frontier [(total cost, least total value)] grown one group at a
    time, dominated pairs dropped."""
    frontier = [(0, 0.0)]
    for c, v in zip(costs, values):
        grown = sorted((total + ci, value + vi) for total, value in frontier for ci, vi in zip(c, v))
        frontier = []
        for total, value in grown:
            if not frontier or value < frontier[-1][1]:
                frontier.append((total, value))
    return frontier


def reference_dp(costs, values, budget):
    fits = [value for total, value in reference_frontier(costs, values) if total <= budget]
    return fits[-1] if fits else None


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
    least = default["plan_cache_size_for_same_objective"]  # the least RAM at which the plan is as good
    assert plan_host(disks, least).total_misses <= default["total_misses"] < plan_host(disks, least - 1).total_misses
    # here nothing cheaper is as good: db and logs must cover their disks to reach 7000 and 1960
    assert least == default["total_cache_size"] == 2883584 + 26476544 + 6815744 + 393216
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


# --- the command line, on a real fleet result set and the libvirt fixtures ------------------------------------------
from pathlib import Path  # noqa: E402

from qsim.cli import main  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "libvirt"
DISK_TRACES = {"web01-vda": (20 * G, "zipf:1.1", 3000), "db01-vda": (40 * G, "zipf:0.9", 4000),
               "db01-vdb": (100 * G, "uniform", 3000)}


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three timed synthetic traces named after the fixture disks, swept as a fleet over two geometries."""
    from qsim.synth import synthesize
    from qsim.trace import Trace
    from qsim.traceio import write_trace

    d = tmp_path_factory.mktemp("fleet")
    for seed, (name, (size, pattern, requests)) in enumerate(DISK_TRACES.items()):
        t = synthesize(size, requests, pattern, "4k", read_share=0.6, seed=seed)
        write_trace(Trace.from_arrays(t.op, t.offset, t.length, np.arange(requests) * (0.01 * (seed + 1))),
                    str(d / f"{name}.iolog.gz"))
    results = d / "results"
    assert main(["sweep", str(d / "*.iolog.gz"), "--cluster-size", "64k,128k", "--extended-l2", "off,on",
                 "--l2-cache-size", "64k..16M:12,default", "--save", str(results) + "/", "--workers", "1",
                 "--output", "json"]) == 0
    return d


def run_cli(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_json_from_a_fleet_result_set(fleet, capsys, tmp_path):
    from qsim.fleet import load_results

    status, out, err = run_cli(["plan", str(fleet / "results"), "--budget", "3M", "--cluster-size", "64k",
                                "--extended-l2", "off", "--output=json", "--save", str(tmp_path / "plan.json")],
                               capsys)
    assert status == 0, err
    result = json.loads(out)
    assert json.loads((tmp_path / "plan.json").read_text()) == result
    assert result["budget"] == 3 << 20 and result["objective"] == "misses"
    assert [d["trace"][:-13] for d in result["disks"]] == ["db01-vda", "db01-vdb", "web01-vda"]
    for d in result["disks"]:
        assert set(d) >= {"trace", "cache_size", "l2_cache_size", "misses", "settings"}
    assert set(result["baselines"]) >= {"qemu_default", "proportional", "equal"}
    for name in ("qemu_default", "proportional", "equal"):
        assert set(result["baselines"][name]) >= {"total_misses", "total_cache_size"}
    # independently: brute force over the rows of the result set, RAM = entries x entry size + 4 clusters
    frame = load_results(str(fleet / "results"))
    frame = frame[(frame.cluster_size == 65536) & ~frame.extended_l2.astype(bool)]
    costs, values = [], []
    for _, rows in frame.groupby("trace_id"):
        rows = rows.drop_duplicates(["l2_cache_entries", "l2_cache_entry_size"])
        costs.append((rows.l2_cache_ram_bytes + 4 * 65536).tolist())
        values.append(rows.l2_misses.tolist())
    assert result["total_misses"] == brute_force(costs, values, 3 << 20)[0]
    assert sum(d["cache_size"] for d in result["disks"]) == result["budget_used"] <= 3 << 20
    assert result["total_misses"] <= min(result["baselines"][n]["total_misses"] for n in ("proportional", "equal"))
    default = result["baselines"]["qemu_default"]
    assert default["plan_total_objective_at_same_cache_size"] <= default["total_misses"]
    # the same plan as a CSV, one row per disk
    assert run_cli(["plan", str(fleet / "results"), "--budget", "3M", "--cluster-size", "64k", "--extended-l2", "off",
                    "--save", str(tmp_path / "plan.csv")], capsys)[0] == 0
    table = pd.read_csv(tmp_path / "plan.csv")
    assert table["cache_size"].tolist() == [d["cache_size"] for d in result["disks"]]
    assert run_cli(["plot", "plan", str(tmp_path / "plan.json"), "--save", str(tmp_path / "plan.png")], capsys)[0] == 0
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_libvirt_round_trip(fleet, capsys, tmp_path):
    from qsim.libvirt import read_domain

    before = snapshot(FIXTURES)
    out_dir = tmp_path / "patched"
    argv = ["plan", str(fleet / "results"), "--budget", "3M", "--domain", str(FIXTURES / "web01.xml"),
            "--domain", str(FIXTURES / "db01.xml"), "--images-dir", str(FIXTURES / "images"),
            "--write-xml", str(out_dir), "--output=json"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    result = json.loads(out)
    disks = {d["disk"]: d for d in result["disks"]}
    assert list(disks) == ["web01/vda", "db01/vda", "db01/vdb"]  # raw disks and the cdrom are left out
    assert "web01/vdb (raw disk), web01/sda (raw cdrom), db01/vdc (raw disk)" in " ".join(result["notes"])
    assert (disks["db01/vdb"]["cluster_size"], disks["db01/vdb"]["extended_l2"]) == (128 << 10, True)
    assert disks["web01/vda"]["current_cache_size"] == 8 << 20 and disks["db01/vda"]["current_cache_size"] is None
    assert sum(d["ram_bytes"] for d in disks.values()) <= 3 << 20
    assert snapshot(FIXTURES) == before  # the domain XML and the images are byte-identical
    for name in ("web01", "db01"):
        original = (FIXTURES / f"{name}.xml").read_text()
        patched = (out_dir / f"{name}.xml").read_text()
        domain = read_domain(str(out_dir / f"{name}.xml"))
        for disk in domain.disks:
            want = disks[disk.name]["cache_size"] if disk.is_qcow2 else None
            assert disk.max_size == want
            built = resolve_cache(ImageGeometry(disks[disk.name]["virtual_size"], disks[disk.name]["cluster_size"],
                                                disks[disk.name]["extended_l2"]),
                                  CacheSettings(cache_size=disk.max_size)) if want else None
            if built:
                assert built.l2_cache_entries == disks[disk.name]["l2_cache_entries"]
        # only metadata_cache lines differ
        removed = set(original.splitlines()) - set(patched.splitlines())
        added = set(patched.splitlines()) - set(original.splitlines())
        assert all("max_size" in line or "driver" in line for line in removed)
        assert all("max_size" in line or "metadata_cache" in line or "driver" in line for line in added)
    assert "<!-- the system disk: its cache was raised by hand last year -->" in (out_dir / "web01.xml").read_text()
    # the patched copy of web01 replaced the KiB setting with bytes, in place in the text
    assert f"<max_size unit='bytes'>{disks['web01/vda']['cache_size']}</max_size>" in \
        (out_dir / "web01.xml").read_text()
    # two domain files of one name would overwrite each other's copy: refused before anything is written
    twin = tmp_path / "elsewhere"
    twin.mkdir()
    (twin / "web01.xml").write_bytes((FIXTURES / "db01.xml").read_bytes())
    status, _, err = run_cli(argv[:4] + ["--domain", str(FIXTURES / "web01.xml"), "--domain", str(twin / "web01.xml"),
                                         "--images-dir", str(FIXTURES / "images"), "--write-xml", str(tmp_path / "t")],
                             capsys)
    assert status == 2 and "two domain files are named web01.xml" in err and not (tmp_path / "t").exists()
    # never in place: writing the copies over their inputs is refused, and nothing changed
    status, _, err = run_cli(argv[:-3] + ["--write-xml", str(FIXTURES), "--output=json"], capsys)
    assert status == 1 and "never changes a file in place" in err and err.count("\n") == 1
    assert snapshot(FIXTURES) == before


def test_cli_traces_given_directly_sweep_with_each_images_geometry(fleet, capsys):
    argv = ["plan", str(fleet / "*.iolog.gz"), "--budget", "3M", "--domain", str(FIXTURES / "db01.xml"),
            "--images-dir", str(FIXTURES / "images"), "--l2-cache-size", "64k..16M:12,default", "--output=json"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    direct = json.loads(out)
    status, out, err = run_cli(["plan", str(fleet / "results")] + argv[2:8] + ["--output=json"], capsys)
    via_results = json.loads(out)
    keep = ("disk", "cache_size", "misses", "l2_cache_entries")
    assert [{k: d[k] for k in keep} for d in direct["disks"]] == [{k: d[k] for k in keep} for d in via_results["disks"]]
    per_second = json.loads(run_cli(argv[:-1] + ["--objective", "misses-per-second", "--output=json"], capsys)[1])
    spans = {"db01/vda": 0.02 * 3999, "db01/vdb": 0.03 * 2999}
    for d in per_second["disks"]:
        assert d["objective_value"] == pytest.approx(d["misses"] / spans[d["disk"]])


def test_cli_human_output_and_help(fleet, capsys):
    status, out, err = run_cli(["plan", str(fleet / "results"), "--budget", "4M", "--cluster-size", "64k",
                                "--extended-l2", "off", "--pin", "web01-vda=default"], capsys)
    assert status == 0, err
    web = next(line for line in out.splitlines() if line.startswith("  web01-vda-"))
    assert web.split()[1:6] == ["20G", "64k", "2816k", "40", "x"]  # pinned to its default: 40 x 64k covers 20G
    assert out.startswith("Plan for 3 disks within 4M of RAM (minimising L2 misses; QEMU 7.2)")
    assert "QEMU's default" in out and "proportional to disk size" in out and "equal split" in out
    assert "libvirt: <metadata_cache><max_size unit='bytes'>" in out and "-blockdev '" in out and "-drive " in out
    assert "a finer sweep (--l2-cache-size 64k..64M:40,default) gives a finer plan" in err
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    help_text = capsys.readouterr().out
    assert help_text.rstrip().endswith("qsim plot plan plan.json --save plan.png")


@pytest.mark.parametrize("extra, status, message", [
    (["--budget", "64k"], 1, "--budget 64k is below the smallest caches allowed: these 3 disks need at least 960k"),
    (["--budget", "12Q"], 2, "unknown size suffix"),
    (["--budget", "3M", "--pin", "nope=1M"], 2, "--pin nope=...: no disk of that name"),
    (["--budget", "3M", "--pin", "1M"], 2, "--pin 1M: expected DISK=BYTES or DISK=default"),
    (["--budget", "3M", "--min", "1M", "--min", "2M"], 2, "--min 2M: given twice for every disk"),
    (["--budget", "3M", "--cluster-size", "64k", "--extended-l2", "off", "--save", "x.txt"], 2,
     "a plan is saved as .json or .csv"),
])
def test_cli_errors_are_one_line(fleet, capsys, extra, status, message):
    argv = ["plan", str(fleet / "results")] + extra
    if "--cluster-size" not in extra:
        argv += ["--cluster-size", "64k", "--extended-l2", "off"]
    got, out, err = run_cli(argv, capsys)
    assert got == status and message in err and "Traceback" not in err
    if "12Q" not in extra:  # qsim's own errors are one line; argparse adds its usage above its line
        assert err.count("\n") == 1 and err.startswith("qsim plan: error: ")


def test_cli_several_geometries_need_choosing(fleet, capsys):
    status, _, err = run_cli(["plan", str(fleet / "results"), "--budget", "3M"], capsys)
    assert status == 2 and "swept with several cluster_size (131072, 65536) (choose one with --cluster-size" in err


def test_libvirt_errors(tmp_path, fleet, capsys):
    from qsim.libvirt import parse_scaled, read_domain, read_mapping

    bomb = tmp_path / "bomb.xml"
    bomb.write_text('<?xml version="1.0"?>\n<!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>\n'
                    "<domain><name>&b;</name></domain>\n")
    with pytest.raises(QsimError, match="bomb.xml: refused: .*DTD"):
        read_domain(str(bomb))
    external = tmp_path / "ext.xml"
    external.write_text('<!DOCTYPE d SYSTEM "file:///etc/passwd"><domain><name>x</name></domain>')
    with pytest.raises(QsimError, match="ext.xml: refused"):
        read_domain(str(external))
    broken = tmp_path / "broken.xml"
    broken.write_text("<domain>\n  <name>x</name>\n  <devices>\n</domain>\n")
    with pytest.raises(QsimError, match=r"broken.xml:4: not well-formed XML"):
        read_domain(str(broken))
    (tmp_path / "net.xml").write_text("<network><name>default</name></network>")
    with pytest.raises(QsimError, match="not libvirt domain XML .*<network>"):
        read_domain(str(tmp_path / "net.xml"))
    assert [parse_scaled("8", u, "x") for u in (None, "bytes", "b", "KiB", "k", "KB", "MiB", "M", "MB", "GiB")] == \
        [8, 8, 8, 8192, 8192, 8000, 8 << 20, 8 << 20, 8_000_000, 8 << 30]
    with pytest.raises(QsimError, match="unknown unit 'parsecs'"):
        parse_scaled("8", "parsecs", "x")
    mapping = tmp_path / "map.txt"
    mapping.write_text("# disk  trace\nweb01/vda  db01-vda\nweb01/vdb\n")
    with pytest.raises(QsimError, match=r"map.txt:3: expected 'DISK TRACE'"):
        read_mapping(str(mapping))
    # a mapping that gives web01's 20G disk the trace swept on 40G: said in one line, with the sweep to run
    mapping.write_text("web01/vda = db01-vda   # the same workload\n")
    status, _, err = run_cli(["plan", str(fleet / "results"), "--budget", "3M", "--domain", str(FIXTURES / "web01.xml"),
                              "--images-dir", str(FIXTURES / "images"), "--map", str(mapping)], capsys)
    assert status == 1 and err.count("\n") == 1
    assert "web01/vda: its image is 20G with cluster_size=64k, extended_l2=off, but trace db01-vda-" in err
    assert "sweep it with --size 20G --cluster-size 64k --extended-l2 off" in err
    status, _, err = run_cli(["plan", str(fleet / "results"), "--budget", "3M",
                              "--domain", str(FIXTURES / "web01.xml")], capsys)
    assert status == 1 and "web01/vda: image /var/lib/libvirt/images/web01-vda.qcow2 not found (--images-dir" in err
