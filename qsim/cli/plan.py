"""``qsim plan``: split one RAM budget over a host's qcow2 disks for the fewest metadata misses."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import QsimError, UsageError
from ..units import format_size, human_size, parse_size
from .common import RawDefaultsHelp, print_json, print_table, size_arg

EXAMPLES = """examples:
  qsim sweep 'corpus/*.iolog.gz' --l2-cache-size 64k..64M:40,default --save results/
  qsim plan results/ --budget 256M
  qsim plan results/ --budget 1G --objective metadata-bytes --min 1M --pin db01-vda=default --output=json
  qsim plan results/ --budget 256M --domain web01.xml --domain db01.xml --write-xml patched/
  qsim plan traces/*.iolog.gz --budget 64M -o preallocation=metadata --save plan.json   # sweeps first
  qsim plot plan plan.json --save plan.png
"""
SWEEP_TABLE_SUFFIXES = (".parquet", ".json", ".csv")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..codes import DEFAULT_PLAN_CACHE_SIZES, PLAN_OBJECTIVES as OBJECTIVES

    p = sub.add_parser(
        "plan", help="split one RAM budget over many disks' L2 caches for the fewest misses",
        description="Choose each disk's qcow2 metadata cache so that all of them fit BUDGET bytes of RAM (L2 "
        "entries x entry size + the refcount cache's 4 clusters, as QEMU allocates them) and make the fewest "
        "misses: an exact optimum over the cache sizes the sweep measured (a finer sweep gives a finer plan). "
        "Prints each disk's cache-size / libvirt max_size, expected misses and settings to paste, beside QEMU's "
        "defaults, a split proportional to disk size and an equal split.",
        epilog=EXAMPLES, formatter_class=RawDefaultsHelp)
    p.add_argument("inputs", nargs="+", metavar="RESULTS|TRACE",
                   help="a fleet result set (qsim sweep ... --save results/), sweep tables (.csv .json .parquet), "
                        "or traces (files, globs, folders, @lists) to sweep here first")
    p.add_argument("--budget", required=True, type=size_arg("--budget"), metavar="BYTES",
                   help="RAM for all the disks' metadata caches together, e.g. 256M")
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default="misses",
                   help="what to minimise: L2 misses (default), metadata bytes read and written, or misses per "
                        "second of each trace's time span")
    p.add_argument("--min", action="append", default=[], metavar="[DISK=]BYTES",
                   help="at least this much RAM for every disk (or for DISK); repeatable")
    p.add_argument("--max", action="append", default=[], metavar="[DISK=]BYTES", help="at most this much; repeatable")
    p.add_argument("--pin", action="append", default=[], metavar="DISK=BYTES|default",
                   help="give DISK exactly this cache-size (libvirt max_size), or QEMU's default; repeatable")
    p.add_argument("--cluster-size", type=size_arg("--cluster-size"), metavar="BYTES",
                   help="use the sweep rows of this cluster size (when the sweep ran several); with traces, the "
                        "cluster size to sweep")
    p.add_argument("--extended-l2", choices=("on", "off"), help="likewise for extended_l2")
    g = p.add_argument_group("libvirt")
    g.add_argument("--domain", action="append", default=[], metavar="XML",
                   help="domain XML (virsh dumpxml): plan its qcow2 disks, inspecting each image for its geometry; "
                        "repeatable")
    g.add_argument("--map", metavar="FILE", help="lines 'DISK TRACE' (DISK: domain/target or image path) for disks "
                   "whose trace is not named after the image file or domain-target")
    g.add_argument("--images-dir", metavar="DIR", help="find the images here, by file name, instead of at the paths "
                   "the XML names")
    g.add_argument("--write-xml", metavar="DIR", help="write a copy of each domain XML here with the planned "
                   "<metadata_cache> per disk (the inputs are never changed)")
    s = p.add_argument_group("sweeping traces given directly")
    s.add_argument("--l2-cache-size", default=DEFAULT_PLAN_CACHE_SIZES, metavar="LIST",
                   help="the cache sizes to measure (default %(default)s)")
    s.add_argument("--size", type=size_arg("--size"), help="virtual disk size (default: from the image, else the "
                   "trace's largest offset rounded up to a GiB)")
    s.add_argument("-o", dest="image_options", metavar="OPTIONS",
                   help="image options: preallocation=off|metadata, fill=0.3, seed=0, backing=on|off, refcount_bits")
    s.add_argument("--offset-policy", choices=("error", "skip", "wrap"), default="error")
    p.add_argument("--qemu-version", default="7.2", metavar="X.Y", help="QEMU whose cache rules apply (default 7.2)")
    p.add_argument("--output", choices=("human", "json"), default="human", help="printed format")
    p.add_argument("--save", metavar="FILE", help="also write the plan: .json (what --output=json prints, with the "
                   "curve 'qsim plot plan' draws) or .csv (one row per disk)")
    p.set_defaults(run=run)


def parse_bounds(items: list[str], option: str, allow_default: bool = False) -> dict:
    """``--min 1M --min db=4M`` -> {None: 1M, "db": 4M}."""
    out: dict = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        key = name.strip() if sep else None
        if option == "--pin" and key is None:
            raise UsageError(f"--pin {item}: expected DISK=BYTES or DISK=default")
        if key in out:
            raise UsageError(f"{option} {item}: given twice for {key or 'every disk'}")
        out[key] = "default" if allow_default and value.strip() == "default" else parse_size(value, option)
    return out


def is_sweep_table(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.isdir(os.path.join(path, "parts"))
    if not os.path.isfile(path) or not path.endswith(SWEEP_TABLE_SUFFIXES):
        return False
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", errors="replace") as f:
            return "l2_misses" in f.readline()
    return True


def load_sweep_rows(inputs: list[str]):
    import pandas as pd

    from ..fleet import load_results
    from ..tables import load_frame

    frames = []
    for item in inputs:
        frame = load_results(item) if os.path.isdir(item) else load_frame(item)
        if frame.empty:
            raise QsimError(f"{item}: the result set has no rows")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def run(args: argparse.Namespace) -> int:
    from ..plan import Constraints, disks_from_results, plan_host

    constraints = Constraints(parse_bounds(args.min, "--min"), parse_bounds(args.max, "--max"),
                              parse_bounds(args.pin, "--pin", allow_default=True))
    extended = None if args.extended_l2 is None else args.extended_l2 == "on"
    tables = [is_sweep_table(i) for i in args.inputs]
    if any(tables) and not all(tables):
        raise UsageError("give either sweep results or traces, not both")
    from_results = all(tables)
    if from_results and (args.size or args.image_options):
        raise UsageError("--size and -o are for sweeping traces; sweep results already have their geometry")
    notes: list[str] = []
    if args.domain:
        disks, domains = _libvirt_disks(args, from_results, notes)
    else:
        domains = []
        frame = load_sweep_rows(args.inputs) if from_results else _sweep_traces(args, _trace_paths(args), None)
        disks, notes = disks_from_results(frame, args.cluster_size, extended, args.qemu_version)
    plan = plan_host(disks, args.budget, args.objective, constraints, args.qemu_version, notes)
    result = plan.to_dict()
    if args.write_xml:
        result["patched_xml"] = _write_xml(args.write_xml, domains, plan)
    if args.save:
        _save(result, args.save)
    if args.output == "json":
        print_json(result)
    else:
        _print_human(result)
    return 0


def _trace_paths(args) -> list[str]:
    from ..fleet import expand_corpus

    return expand_corpus(args.inputs)


def _sweep_traces(args, paths: list[str], geometries):
    """Sweep the traces here (each with its disk's geometry when known), through plan's one sweep adapter."""
    from dataclasses import replace

    from ..imageopts import parse_image_options
    from ..plan import sweep_for_plan

    options = parse_image_options(args.image_options, ("refcount_bits", "preallocation", "fill", "seed", "backing"))
    if args.cluster_size:
        options = replace(options, cluster_size=args.cluster_size)
    if args.extended_l2:
        options = replace(options, extended_l2=args.extended_l2 == "on")
    if geometries is None and args.size:
        from ..geometry import ImageGeometry

        geometries = [ImageGeometry(args.size, options.cluster_size, options.extended_l2, options.refcount_bits)
                      for _ in paths]
    from ..scenario import Scenario
    from .scenario_args import parse_cache_sizes

    scenario = Scenario.of(parse_cache_sizes(args.l2_cache_size), None, options, qemu_version=args.qemu_version,
                           offset_policy=args.offset_policy)
    print(f"qsim plan: sweeping {len(paths)} traces over --l2-cache-size {args.l2_cache_size}", file=sys.stderr)
    return sweep_for_plan(list(zip(paths, geometries or [None] * len(paths))), scenario)


def _libvirt_disks(args, from_results: bool, notes: list[str]):
    """The domains' qcow2 disks as plan Disks: geometry from each image, miss curve from its mapped trace."""
    from ..libvirt import map_disks, read_domain, read_mapping
    from ..plan import disk_from_rows, trace_stem
    from ..qcow2 import open_image

    domains = [read_domain(p) for p in args.domain]
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise UsageError(f"domain {next(n for n in names if names.count(n) > 1)} is given twice")
    qcow2 = [disk for d in domains for disk in d.qcow2_disks]
    skipped = [disk for d in domains for disk in d.disks if not disk.is_qcow2]
    if skipped:
        notes.append("not qcow2 disks, so no metadata cache: " + ", ".join(
            f"{d.name} ({d.format or 'no format'} {d.device})" for d in skipped))
    if not qcow2:
        raise QsimError(f"{', '.join(args.domain)}: no qcow2 disks to plan")
    geometries = {}
    for disk in qcow2:
        if not disk.source:
            raise QsimError(f"{disk.name}: a network disk; qsim needs the image file to read its geometry")
        path = os.path.join(args.images_dir, os.path.basename(disk.source)) if args.images_dir else disk.source
        if not os.path.exists(path):
            raise QsimError(f"{disk.name}: image {path} not found" +
                            ("" if args.images_dir else " (--images-dir DIR looks for it elsewhere)"))
        img = open_image(path)
        for warning in img.warnings:
            print(f"qsim plan: warning: {path}: {warning}", file=sys.stderr)
        geometries[disk.name] = img.geometry
    mapping = read_mapping(args.map) if args.map else None
    if from_results:
        frame = load_sweep_rows(args.inputs)
        key = "trace_id" if "trace_id" in frame.columns else "trace"
        traces = {str(n): {str(n), trace_stem(str(n))} | {os.path.basename(str(p)).split(".")[0]
                                                          for p in rows["trace"].unique()}
                  for n, rows in frame.groupby(key)}
        assigned = map_disks(qcow2, traces, mapping, args.map or "--map")
    else:
        from ..fleet import trace_id

        paths = _trace_paths(args)
        ids = {trace_id(p): p for p in paths}
        traces = {i: {i, trace_stem(i)} for i in ids}
        assigned = map_disks(qcow2, traces, mapping, args.map or "--map")
        wanted = sorted({(ids[t], geometries[d]) for d, t in assigned.items()}, key=lambda x: x[0])
        frame = _sweep_traces(args, [p for p, _ in wanted], [g for _, g in wanted])
        key = "trace_id"
    out = []
    for disk in qcow2:
        g = geometries[disk.name]
        trace = assigned[disk.name]
        rows = frame[frame[key].astype(str) == trace]
        match = rows[(rows.virtual_size == g.virtual_size) & (rows.cluster_size == g.cluster_size) &
                     (rows.extended_l2.astype(bool) == g.extended_l2)]
        if match.empty:
            have = ", ".join(sorted({f"{format_size(int(v))}/{format_size(int(c))}/extended_l2="
                                     f"{'on' if e else 'off'}" for v, c, e in
                                     zip(rows.virtual_size, rows.cluster_size, rows.extended_l2)}))
            raise QsimError(f"{disk.name}: its image is {format_size(g.virtual_size)} with cluster_size="
                            f"{format_size(g.cluster_size)}, extended_l2={'on' if g.extended_l2 else 'off'}, but "
                            f"trace {trace} was swept as {have}; sweep it with --size {format_size(g.virtual_size)} "
                            f"--cluster-size {format_size(g.cluster_size)} --extended-l2 "
                            f"{'on' if g.extended_l2 else 'off'}")
        made = disk_from_rows(disk.name, trace, str(match.trace.iloc[0]), g, match, args.qemu_version, notes)
        info = {"domain": disk.domain, "target": disk.target, "source": disk.source,
                "current_cache_size": disk.max_size}
        from dataclasses import replace

        out.append(replace(made, aliases=made.aliases | {disk.name, f"{disk.domain}-{disk.target}"}, info=info))
    return out, domains


def _write_xml(folder: str, domains, plan) -> list[str]:
    from ..libvirt import write_patched

    if not domains:
        raise UsageError("--write-xml needs --domain")
    names = [os.path.basename(d.path) for d in domains]
    if len(set(names)) != len(names):
        raise UsageError(f"--write-xml: two domain files are named {next(n for n in names if names.count(n) > 1)}; "
                         "their copies would overwrite each other (rename one)")
    os.makedirs(folder, exist_ok=True)
    sizes: dict[str, dict[str, int]] = {}
    for row in plan.disk_rows():
        sizes.setdefault(row["domain"], {})[row["target"]] = row["cache_size"]
    written = []
    for domain in domains:
        out = os.path.join(folder, os.path.basename(domain.path))
        write_patched(domain.path, out, sizes.get(domain.name, {}))
        written.append(out)
    return written


def _save(result: dict, path: str) -> None:
    from ..safeio import atomic_output

    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".json":
        with atomic_output(path, binary=False) as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    elif suffix == ".csv":
        import pandas as pd

        rows = [{k: v for k, v in r.items() if k != "settings"} | {f"settings_{k}": v for k, v in
                                                                   r["settings"].items()} for r in result["disks"]]
        with atomic_output(path, binary=False) as f:
            pd.DataFrame(rows).to_csv(f, index=False)
    else:
        raise UsageError(f"--save {path}: a plan is saved as .json or .csv")


def _print_human(result: dict) -> None:
    from ..plan import OBJECTIVES

    disks = result["disks"]
    objective = result["objective"]
    print(f"Plan for {len(disks)} disks within {format_size(result['budget'])} of RAM "
          f"(minimising {OBJECTIVES[objective]}; QEMU {result['qemu_version']})")
    width = max(len(d["disk"]) for d in disks)
    print(f"  {'disk'.ljust(width)}  {'size':>6} {'cluster':>8}  {'cache-size':>10}  {'L2 cache':<14} {'covers':>7} "
          f"{'misses':>10}")
    for d in disks:
        l2 = f"{d['l2_cache_entries']} x {format_size(d['l2_cache_entry_size'])}"
        ext = "+ext" if d["extended_l2"] else ""
        print(f"  {d['disk'].ljust(width)}  {format_size(d['virtual_size']):>6} "
              f"{format_size(d['cluster_size']) + ext:>8}  {format_size(d['cache_size']):>10}  {l2:<14} "
              f"{100 * d['covered_fraction']:>6.3g}% {d['misses']:>10,}")
    print(f"  {'total'.ljust(width)}  {'':>6} {'':>7}  {format_size(result['budget_used']):>10}  "
          f"{'(RAM held)':<14} {'':>7} {result['total_misses']:>10,}")
    if objective != "misses":
        print(f"  total {OBJECTIVES[objective]}: {result['total_objective']:,.6g}")
    print()
    print("The same budget, split as others would:")
    rows = []
    base = result["baselines"]
    if base.get("qemu_default"):
        q = base["qemu_default"]
        same = q["plan_total_objective_at_same_cache_size"]
        least = q["plan_cache_size_for_same_objective"]
        unit = "" if objective == "misses" else f" {OBJECTIVES[objective]} (defaults: {q['total_objective']:,.6g})"
        rows.append(("QEMU's default", f"{q['total_misses']:>10,} misses in {human_size(q['total_cache_size'])} "
                     f"of RAM (the plan with that RAM: {same:,.6g}{unit}; as good as the defaults from "
                     f"{human_size(least)})"))
    else:
        rows.append(("QEMU's default", base.get("qemu_default_missing", "not measured")))
    for name, label in (("proportional", "proportional to disk size"), ("equal", "equal split")):
        b = base[name]
        over = f"; {len(b['overspent_disks'])} disks below their smallest cache" if b["overspent_disks"] else ""
        rows.append((label, f"{b['total_misses']:>10,} misses in {human_size(b['total_cache_size'])} of RAM{over}"))
    rows.append(("this plan", f"{result['total_misses']:>10,} misses in {human_size(result['budget_used'])} of RAM"))
    print_table(rows)
    print()
    print("Settings to paste:")
    for d in disks:
        current = d.get("current_cache_size")
        was = "" if "current_cache_size" not in d else \
            f"  (now: {format_size(current) if current is not None else 'no metadata_cache, QEMU default'})"
        print(f"  {d['disk']}: cache-size={format_size(d['cache_size'])}{was}")
        print(f"    libvirt: <metadata_cache><max_size unit='bytes'>{d['cache_size']}</max_size></metadata_cache>")
        print(f"    {d['settings']['drive']}")
        print(f"    {d['settings']['blockdev']}")
    for path in result.get("patched_xml", []):
        print(f"wrote {path}")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
