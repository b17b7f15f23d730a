"""``qsim plan``: one RAM budget for all of a host's qcow2 disks, split to make the fewest metadata misses.

Each disk brings its miss curve from a sweep (``qsim sweep ... --save RESULTS/``): one row per cache size the
sweep ran. The plan chooses among exactly those measured points, since misses between them are unknown; a finer
sweep (``--l2-cache-size 64k..64M:40,default``) gives a finer plan. Every point is a cache QEMU can build, and it
is counted as the host pays for it:

- **RAM (what the budget counts)** = L2 entries x entry size + the refcount cache's 4-cluster minimum: QEMU
  allocates whole entries (4 KiB slices while the cache does not cover the disk, whole tables once it does, at
  least 2), and libvirt's ``<metadata_cache><max_size>`` (QEMU's combined ``cache-size``) includes the refcount
  cache;
- **cache_size (what to give QEMU / libvirt)** = the smallest ``cache-size`` for which read_cache_sizes builds
  exactly that L2 cache and a 4-cluster refcount cache: L2 bytes + 4 clusters, checked with ``resolve_cache``. It
  equals the RAM except where QEMU's 2-entry minimum doubles a one-table L2 cache (a small disk with big clusters):
  there QEMU holds one entry more than cache-size says, and the budget counts what it holds.

The split is an exact multiple-choice knapsack (``qsim.knapsack``). Beside it, the same budget under three
baselines: QEMU's default for every disk (with the RAM it really takes, the plan at that same RAM, and the least
RAM with which the plan does as well), a cache proportional to disk size, and an equal split; a baseline's share
is rounded down to the disk's largest measured cache that fits (its smallest, marked overspent, if none does).
Baselines ignore --min/--max/--pin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from .cachecfg import DEFAULT_QEMU_VERSION, MIN_REFCOUNT_CACHE_ENTRIES, CacheSettings, resolve_cache
from .codes import DEFAULT_PLAN_CACHE_SIZES, PLAN_OBJECTIVES as OBJECTIVES
from .errors import QsimError, UsageError
from .geometry import ImageGeometry
from .knapsack import Problem, best_values, least_cost_for, solve
from .sizing import pasteable_settings
from .units import format_size

CURVE_POINTS = 48
OPTION_COLUMNS = ["l2_cache_size", "cache_size", "ram_bytes", "l2_cache_entries", "l2_cache_entry_size",
                  "covered_fraction", "misses", "metadata_bytes", "is_qemu_default"]


@dataclass(frozen=True, eq=False)
class Disk:
    """One disk of the host: its name (the sweep's, or ``domain/target`` for a libvirt disk), the name the sweep gave
    its trace and the trace file, its geometry, and the caches measured for it (``options``, one row per buildable
    cache in bytes/entries, sorted by RAM). ``span_seconds``: its trace's time span, if known."""

    name: str
    trace: str
    path: str
    geometry: ImageGeometry
    options: pd.DataFrame
    span_seconds: float | None = None
    aliases: frozenset = frozenset()
    info: dict = field(default_factory=dict)  # where it came from (libvirt domain, target, source file)

    def values(self, objective: str) -> np.ndarray:
        """The objective per option: misses, bytes, or misses per second."""
        if objective == "misses":
            return self.options["misses"].to_numpy(dtype=float)
        if objective == "metadata-bytes":
            return self.options["metadata_bytes"].to_numpy(dtype=float)
        if not self.span_seconds:
            raise QsimError(f"{self.path}: --objective misses-per-second needs request times, and this trace has no "
                            "time span (use a fio iolog v3, or CSV with a time column)")
        return self.options["misses"].to_numpy(dtype=float) / self.span_seconds


def buildable_option(geometry: ImageGeometry, entries: int, entry_size: int,
                     qemu_version: str = DEFAULT_QEMU_VERSION) -> dict | None:
    """The settings that make QEMU build an L2 cache of ``entries`` x ``entry_size`` bytes from libvirt's one knob,
    or None when ``cache-size`` alone cannot build it (a forced l2-cache-entry-size)."""
    refcount = MIN_REFCOUNT_CACHE_ENTRIES * geometry.cluster_size
    l2_setting = min(entries * entry_size, geometry.full_l2_cache_bytes)
    cache_size = l2_setting + refcount
    built = resolve_cache(geometry, CacheSettings(cache_size=cache_size), qemu_version)
    if (built.l2_cache_entries, built.l2_cache_entry_size, built.refcount_cache_bytes) != \
            (entries, entry_size, refcount):
        return None
    return {"l2_cache_size": l2_setting, "cache_size": cache_size,
            "ram_bytes": built.l2_cache_ram_bytes + built.refcount_cache_bytes,
            "l2_cache_entries": entries, "l2_cache_entry_size": entry_size,
            "covered_fraction": built.covered_fraction}


def disks_from_results(frame: pd.DataFrame, cluster_size: int | None = None, extended_l2: bool | None = None,
                       qemu_version: str = DEFAULT_QEMU_VERSION) -> tuple[list[Disk], list[str]]:
    """One Disk per trace of a sweep's rows (a fleet result set or one sweep table), and notes on what was left
    out. A trace swept over several geometries needs ``cluster_size``/``extended_l2`` to say which one it has."""
    needed = {"trace", "virtual_size", "cluster_size", "extended_l2", "l2_cache_entries", "l2_cache_entry_size",
              "l2_misses", "metadata_read_bytes", "metadata_write_bytes"}
    missing = needed - set(frame.columns)
    if frame.empty or missing:
        raise QsimError("not a qsim sweep result" + (f" (missing {', '.join(sorted(missing))})" if missing else
                                                      " (no rows)"))
    if cluster_size is not None:
        frame = frame[frame["cluster_size"] == cluster_size]
    if extended_l2 is not None:
        frame = frame[frame["extended_l2"].astype(bool) == extended_l2]
    if frame.empty:
        raise UsageError("no sweep rows have the --cluster-size/--extended-l2 asked for")
    key = "trace_id" if "trace_id" in frame.columns else "trace"
    disks, notes = [], []
    for name, rows in frame.groupby(key, sort=True):
        _one_setup(str(name), rows)
        first = rows.iloc[0]
        geometry = ImageGeometry(int(first.virtual_size), int(first.cluster_size), bool(first.extended_l2))
        disks.append(disk_from_rows(str(name), str(name), str(first.trace), geometry, rows, qemu_version, notes))
    return disks, notes


def disk_from_rows(name: str, trace: str, path: str, geometry: ImageGeometry, rows: pd.DataFrame,
                   qemu_version: str = DEFAULT_QEMU_VERSION, notes: list[str] | None = None) -> Disk:
    """A Disk from its sweep rows: the distinct caches, those libvirt's max_size can build, sorted by RAM."""
    default = resolve_cache(geometry, CacheSettings(), qemu_version)
    options, dropped = {}, 0
    for row in rows.itertuples(index=False):
        config = (int(row.l2_cache_entries), int(row.l2_cache_entry_size))
        if config in options:
            continue
        option = buildable_option(geometry, *config, qemu_version)
        if option is None:
            dropped += 1
            continue
        option.update(misses=int(row.l2_misses), metadata_bytes=int(row.metadata_read_bytes) +
                      int(row.metadata_write_bytes),
                      is_qemu_default=config == (default.l2_cache_entries, default.l2_cache_entry_size))
        options[config] = option
    if dropped and notes is not None:
        notes.append(f"{name}: {dropped} measured caches left out (a forced l2-cache-entry-size, which libvirt's "
                     "max_size cannot set)")
    if not options:
        raise QsimError(f"{name}: no measured cache that QEMU builds from cache-size alone")
    table = pd.DataFrame(list(options.values()), columns=OPTION_COLUMNS)
    table = table.sort_values(["ram_bytes", "misses"], kind="stable").reset_index(drop=True)
    aliases = {name, trace, trace_stem(trace), os.path.basename(trace).split(".")[0]}
    return Disk(name, trace, path, geometry, table, aliases=frozenset(aliases))


def trace_stem(trace: str) -> str:
    """A fleet's trace name without its content hash: ``web01-vda-0123456789ab`` -> ``web01-vda``."""
    head, _, tail = trace.rpartition("-")
    return head if head and len(tail) == 12 and all(c in "0123456789abcdef" for c in tail) else trace


def _one_setup(name: str, rows: pd.DataFrame) -> None:
    for column in ("virtual_size", "cluster_size", "extended_l2", "preallocation", "cache_mode", "backing"):
        if column in rows and rows[column].nunique(dropna=False) > 1:
            values = ", ".join(str(v) for v in sorted(rows[column].astype(str).unique()))
            hint = " (choose one with --cluster-size/--extended-l2)" if column in ("cluster_size", "extended_l2") \
                else " (plan from a result set with one setup per disk)"
            raise UsageError(f"{name}: swept with several {column} ({values}){hint}")


@dataclass(frozen=True)
class Constraints:
    """Per-disk bounds on the RAM a disk gets (bytes), and pinned caches: a ``cache-size`` in bytes, or
    "default" for QEMU's default. Keys are disk names (or aliases); key None applies to every disk."""

    min_bytes: dict = field(default_factory=dict)
    max_bytes: dict = field(default_factory=dict)
    pins: dict = field(default_factory=dict)


def allowed_options(disk: Disk, constraints: Constraints, qemu_version: str = DEFAULT_QEMU_VERSION) -> np.ndarray:
    """Indices of ``disk.options`` the constraints allow (QsimError when none is left)."""
    opts = disk.options
    mask = np.ones(len(opts), dtype=bool)
    low = _for_disk(disk, constraints.min_bytes)
    high = _for_disk(disk, constraints.max_bytes)
    if low is not None:
        mask &= opts["ram_bytes"].to_numpy() >= low
    if high is not None:
        mask &= opts["ram_bytes"].to_numpy() <= high
    pin = _for_disk(disk, constraints.pins)
    if pin is not None:
        settings = CacheSettings() if pin == "default" else CacheSettings(cache_size=int(pin))
        built = resolve_cache(disk.geometry, settings, qemu_version)
        mask &= (opts["l2_cache_entries"].to_numpy() == built.l2_cache_entries) & \
            (opts["l2_cache_entry_size"].to_numpy() == built.l2_cache_entry_size)
        if not mask.any():
            what = "QEMU's default" if pin == "default" else f"cache-size {format_size(int(pin))}"
            raise QsimError(f"{disk.name}: pinned to {what} (QEMU builds {built.l2_cache_entries} x "
                            f"{format_size(built.l2_cache_entry_size)}), which the sweep did not measure (measured: "
                            f"{', '.join(format_size(int(v)) for v in opts['cache_size'])})")
    if not mask.any():
        raise QsimError(f"{disk.name}: no measured cache between --min and --max (measured RAM: "
                        f"{', '.join(format_size(int(v)) for v in opts['ram_bytes'])})")
    return np.flatnonzero(mask)


def _for_disk(disk: Disk, table: dict):
    for key in disk.aliases:
        if key in table:
            return table[key]
    return table.get(None)


def check_constraint_names(disks: list[Disk], constraints: Constraints) -> None:
    known = set().union(*(d.aliases for d in disks))
    for table, option in ((constraints.min_bytes, "--min"), (constraints.max_bytes, "--max"),
                          (constraints.pins, "--pin")):
        for key in table:
            if key is not None and key not in known:
                raise UsageError(f"{option} {key}=...: no disk of that name (disks: "
                                 f"{', '.join(sorted(d.name for d in disks))})")


@dataclass(frozen=True)
class HostPlan:
    """The plan and its baselines, all sizes in bytes."""

    budget: int
    objective: str
    disks: list
    choice: list  # per disk, the index into its options
    baselines: dict
    curve: pd.DataFrame
    notes: list
    qemu_version: str = DEFAULT_QEMU_VERSION

    def chosen(self, k: int) -> pd.Series:
        return self.disks[k].options.iloc[self.choice[k]]

    @property
    def total_misses(self) -> int:
        return int(sum(self.chosen(k)["misses"] for k in range(len(self.disks))))

    @property
    def total_ram_bytes(self) -> int:
        return int(sum(self.chosen(k)["ram_bytes"] for k in range(len(self.disks))))

    @property
    def total_objective(self) -> float:
        return float(sum(d.values(self.objective)[c] for d, c in zip(self.disks, self.choice)))

    def disk_rows(self) -> list[dict]:
        rows = []
        for k, disk in enumerate(self.disks):
            o = self.chosen(k)
            g = disk.geometry
            source = disk.info.get("source") or "disk.qcow2"
            paste = pasteable_settings(g, int(o.l2_cache_size), filename=source)
            rows.append({
                "disk": disk.name, "trace": disk.trace, **disk.info,
                "virtual_size": g.virtual_size, "cluster_size": g.cluster_size, "extended_l2": g.extended_l2,
                "cache_size": int(o.cache_size), "l2_cache_size": int(o.l2_cache_size),
                "ram_bytes": int(o.ram_bytes), "l2_cache_entries": int(o.l2_cache_entries),
                "l2_cache_entry_size": int(o.l2_cache_entry_size), "covered_fraction": float(o.covered_fraction),
                "misses": int(o.misses), "metadata_bytes": int(o.metadata_bytes),
                "objective_value": float(disk.values(self.objective)[self.choice[k]]),
                "is_qemu_default": bool(o.is_qemu_default),
                "settings": {"libvirt": paste.libvirt, "drive": paste.drive, "blockdev": paste.blockdev},
            })
        return rows

    def to_dict(self) -> dict:
        return {
            "budget": self.budget, "objective": self.objective, "qemu_version": self.qemu_version,
            "budget_used": self.total_ram_bytes,
            "disks": self.disk_rows(),
            "total_misses": self.total_misses, "total_objective": self.total_objective,
            "baselines": self.baselines,
            "curve": self.curve.to_dict(orient="records"),
            "notes": list(self.notes),
        }


def plan_host(disks: list[Disk], budget: int, objective: str = "misses", constraints: Constraints = Constraints(),
              qemu_version: str = DEFAULT_QEMU_VERSION, notes: list[str] | None = None) -> HostPlan:
    """The optimal split of ``budget`` bytes of RAM over ``disks`` for ``objective``, with the baselines."""
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective}: expected one of {', '.join(OBJECTIVES)}")
    if not disks:
        raise UsageError("nothing to plan: no disks")
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise UsageError(f"two disks share the name {next(n for n in names if names.count(n) > 1)}")
    if objective == "misses-per-second":
        disks = [d if d.span_seconds else replace(d, span_seconds=trace_span_seconds(d.path)) for d in disks]
    check_constraint_names(disks, constraints)
    allowed = [allowed_options(d, constraints, qemu_version) for d in disks]
    values = [d.values(objective) for d in disks]
    problem = Problem.from_groups([d.options["ram_bytes"].to_numpy()[a] for d, a in zip(disks, allowed)],
                                  [v[a] for v, a in zip(values, allowed)])
    if budget < problem.min_cost:
        raise QsimError(f"--budget {format_size(budget)} is below the smallest caches allowed: these {len(disks)} "
                        f"disks need at least {format_size(problem.min_cost)} ({problem.min_cost} bytes)")
    selection = solve(problem, budget)
    choice = [int(a[k]) for a, k in zip(allowed, selection.choice)]
    baselines = _baselines(disks, values, budget, objective, problem)
    curve = _curve(disks, values, problem, [budget] + ([baselines["qemu_default"]["total_cache_size"]]
                                                       if baselines["qemu_default"] else []))
    notes = list(notes or [])
    notes.append("the plan chooses among the cache sizes the sweep measured; a finer sweep "
                 f"(--l2-cache-size {DEFAULT_PLAN_CACHE_SIZES}) gives a finer plan")
    return HostPlan(budget, objective, disks, choice, baselines, curve, notes, qemu_version)


def fit_share(disk: Disk, share: float) -> int:
    """Index of the disk's largest measured cache whose RAM fits ``share`` bytes (its smallest if none does)."""
    k = int(np.searchsorted(disk.options["ram_bytes"].to_numpy(), share, side="right")) - 1
    return max(k, 0)


def baseline_shares(disks: list[Disk], budget: int) -> dict[str, np.ndarray]:
    """Bytes each disk gets under the proportional (to virtual size) and the equal split of ``budget``."""
    sizes = np.array([d.geometry.virtual_size for d in disks], dtype=float)
    return {"proportional": budget * sizes / sizes.sum(), "equal": np.full(len(disks), budget / len(disks))}


def _baseline(disks: list[Disk], values: list[np.ndarray], picks: list[int]) -> dict:
    chosen = [d.options.iloc[k] for d, k in zip(disks, picks)]
    return {"total_misses": int(sum(int(o.misses) for o in chosen)),
            "total_cache_size": int(sum(int(o.ram_bytes) for o in chosen)),
            "total_objective": float(sum(v[k] for v, k in zip(values, picks))),
            "cache_sizes": {d.name: int(o.cache_size) for d, o in zip(disks, chosen)}}


def _baselines(disks, values, budget, objective, problem) -> dict:
    out: dict = {}
    defaults = [np.flatnonzero(d.options["is_qemu_default"].to_numpy()) for d in disks]
    if all(len(k) for k in defaults):
        base = _baseline(disks, values, [int(k[0]) for k in defaults])
        same = best_values(problem, [base["total_cache_size"]])[0]
        base["plan_total_objective_at_same_cache_size"] = None if np.isnan(same) else float(same)
        base["plan_cache_size_for_same_objective"] = least_cost_for(problem, base["total_objective"])
        out["qemu_default"] = base
    else:
        lacking = [d.name for d, k in zip(disks, defaults) if not len(k)]
        out["qemu_default"] = None
        out["qemu_default_missing"] = f"QEMU's default cache was not measured for {', '.join(lacking)} " \
                                      "(add 'default' to the sweep's --l2-cache-size)"
    for name, shares in baseline_shares(disks, budget).items():
        picks = [fit_share(d, s) for d, s in zip(disks, shares)]
        base = _baseline(disks, values, picks)
        base["overspent_disks"] = [d.name for d, k, s in zip(disks, picks, shares)
                                   if d.options["ram_bytes"].iloc[k] > s]
        out[name] = base
    return out


def _curve(disks, values, problem: Problem, extra: list[int]) -> pd.DataFrame:
    """The plan's and the split baselines' totals (in the objective) at budgets from the smallest caches to the
    RAM where every disk has its best measured cache."""
    low, high = problem.min_cost, problem.max_cost
    budgets = set(np.unique(np.geomspace(max(low, 1), max(high, low + 1), CURVE_POINTS).astype(np.int64)).tolist())
    budgets |= {int(b) for b in extra if b >= low}
    budgets = np.array(sorted(budgets), dtype=np.int64)
    plan = best_values(problem, budgets)
    rams = [d.options["ram_bytes"].to_numpy() for d in disks]
    rows = []
    for b, p in zip(budgets, plan):
        row = {"budget": int(b), "plan": float(p)}
        for name, shares in baseline_shares(disks, int(b)).items():
            picks = [fit_share(d, s) for d, s in zip(disks, shares)]
            row[name] = float(sum(v[k] for v, k in zip(values, picks)))
            row[name + "_cache_size"] = int(sum(r[k] for r, k in zip(rams, picks)))
        rows.append(row)
    return pd.DataFrame(rows)


def trace_span_seconds(path: str) -> float | None:
    """First to last request time of a trace file (seconds), None when it carries no times."""
    from .traceio import read_trace

    if not os.path.isfile(path):
        raise QsimError(f"{path}: --objective misses-per-second needs the trace's time span, and the trace file the "
                        "sweep read is not there")
    trace = read_trace(path)
    if trace.time is None or len(trace) < 2:
        return None
    span = float(trace.time.max() - trace.time.min())
    return span if span > 0 else None


def sweep_for_plan(traces: list[tuple[str, ImageGeometry | None]], scenario) -> pd.DataFrame:
    """The one place ``qsim plan`` runs a sweep itself: each trace (path) replayed under ``scenario`` (a
    ``qsim.scenario.Scenario``: its cache sizes are the plan's options), on its disk's geometry when known (else
    the scenario's image), one row per cache size, named as a fleet names it."""
    from .fleet import trace_id
    from .replay import replay
    from .traceio import read_trace

    frames = []
    for path, geometry in traces:
        disk = scenario
        if geometry is not None:
            options = replace(scenario.image.options, cluster_size=geometry.cluster_size,
                              extended_l2=geometry.extended_l2, refcount_bits=geometry.refcount_bits)
            disk = replace(scenario, image=replace(scenario.image, options=options,
                                                   virtual_size=geometry.virtual_size))
        frame = replay(read_trace(path), disk).to_frame()
        frame.insert(0, "trace_id", trace_id(path))
        frame["trace"] = path
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
