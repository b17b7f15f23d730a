#!/usr/bin/env python3
"""Writes the notebooks in this folder from the cells below and executes them, so they are committed with their
outputs and read well on a web page. Run it after changing a notebook's cells:

    .venv/bin/python notebooks/make_notebooks.py            # write and execute all
    .venv/bin/python notebooks/make_notebooks.py 02         # just the ones whose name contains 02
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str):
    return nbformat.v4.new_code_cell(text.strip())


SETUP = code("""
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import qsim
import qsim.plot
from qsim.units import format_size, parse_size
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 30)
%matplotlib inline
""")

NOTEBOOKS = {
    "01-l2-cache-sizing": [
        md("""
# 1. How much L2 cache does a qcow2 disk need?

qcow2 maps guest clusters through L2 tables: one entry per cluster, 8 bytes (16 with `extended_l2`). QEMU keeps
L2 tables in a cache (`l2-cache-size`); a lookup that misses costs a metadata read. The cache that covers the whole
disk is

$$\\text{L2 bytes} = \\left\\lceil \\frac{\\text{disk size}}{\\text{cluster size}} \\right\\rceil \\times
\\text{entry bytes}, \\text{ rounded up to a whole cluster.}$$

Everything below is computed by qsim, which follows QEMU's `read_cache_sizes` (block/qcow2.c)."""),
        SETUP,
        md("## The formula, for a few disks and cluster sizes"),
        code("""
from qsim.sizing import coverage_table
sizes = [parse_size(s) for s in ["64G", "256G", "1T", "4T", "16T"]]
clusters = [parse_size(s) for s in ["64k", "128k", "512k", "1M", "2M"]]
table = coverage_table(sizes, clusters)
wide = table.pivot_table(index=["extended_l2", "cluster_size"], columns="virtual_size", values="full_l2_cache_bytes")
wide.map(format_size).rename(columns=format_size, index=lambda v: format_size(v) if v > 1 else v)
"""),
        md("""
## What QEMU builds by default, across versions

Before 3.1 the default L2 cache was 1 MiB (or 8 clusters); 3.1 made it cover the disk up to a 32 MiB cap (8 MiB
off Linux); 4.0 switched to 4 KiB slices whenever the cache cannot cover the disk; 5.2 added `extended_l2`."""),
        code("""
rows = []
for disk in ["100G", "1T", "4T"]:
    g = qsim.ImageGeometry(parse_size(disk))
    for version in ["2.11", "3.0", "3.1", "4.0", "7.2"]:
        c = qsim.resolve_cache(g, qsim.CacheSettings(), version)
        rows.append({"disk": disk, "qemu": version, "l2_cache": format_size(c.l2_cache_bytes),
                     "entry_size": format_size(c.l2_cache_entry_size), "entries": c.l2_cache_entries,
                     "covered": f"{100 * c.covered_fraction:.3g}%"})
pd.DataFrame(rows).pivot(index="qemu", columns="disk", values="covered")
"""),
        md("""
## Checking a widely repeated claim

*"With QEMU >= 5.2, `extended_l2=on`, the default 64 KiB clusters and the 32 MiB default cache, the whole L2 table of
a disk up to 4 TB stays in RAM."* Extended entries are 16 bytes, so a cache of a given size covers **half** as much
disk as with 8-byte entries. What does the 32 MiB default really cover?"""),
        code("""
from qsim.cachecfg import largest_covered_disk
claim = {"extended_l2=on, 64k clusters": largest_covered_disk(32 << 20, 64 << 10, True),
         "extended_l2=off, 64k clusters": largest_covered_disk(32 << 20, 64 << 10, False)}
{k: format_size(v) for k, v in claim.items()}
"""),
        code("""
four_t = qsim.ImageGeometry(4 << 40, 64 << 10, True)
default = qsim.resolve_cache(four_t)
print(f"4T, 64k clusters, extended_l2: whole-disk L2 {format_size(four_t.full_l2_cache_bytes)}; "
      f"QEMU's default {format_size(default.l2_cache_bytes)} covers {format_size(default.covered_bytes)} "
      f"({100 * default.covered_fraction:.3g}%)")
"""),
        md("So the claim is off by a factor of 32. Which settings **do** keep a 4 TiB disk's L2 tables in 32 MiB?"),
        code("""
ok = coverage_table([4 << 40], [parse_size(s) for s in ["64k", "128k", "256k", "512k", "1M", "2M"]])
ok = ok.assign(fits_default=ok.full_l2_cache_bytes <= 32 << 20)
ok.assign(cluster_size=ok.cluster_size.map(format_size), full_l2=ok.full_l2_cache_bytes.map(format_size))[
    ["cluster_size", "extended_l2", "full_l2", "fits_default"]]
"""),
        md("""
Only 1 MiB clusters (without subclusters) or 2 MiB clusters (with `extended_l2`: 64 KiB subclusters) fit 4 TiB in
the default. Otherwise raise `l2-cache-size`; qsim prints ready-to-paste settings:"""),
        code("""
report = qsim.size_report(four_t)
print(report.settings.drive)
print(report.settings.blockdev)
print(report.settings.libvirt)
"""),
        md("## The coverage map (outlined cells: QEMU's 32 MiB default covers the disk)"),
        code("""
fig = qsim.plot.coverage_map(coverage_table([parse_size(s) for s in ["16G", "64G", "256G", "1T", "4T", "16T"]],
                                       [parse_size(s) for s in ["16k", "64k", "256k", "1M", "2M"]]))
"""),
    ],
    "02-cluster-tradeoffs": [
        md("""
# 2. Cluster size and subclusters: what each choice costs

We replay a real fio recording of 4 KiB random writes (`traces/fio-randwrite-4k.iolog.gz`, 20,000 writes over
4 GiB) into an empty image, for cluster sizes 16k..2M with and without `extended_l2`, with and without a backing
file. The model follows QEMU 7.2's allocating-write path: a write into an unallocated cluster copies (backing file)
or zero-fills (no backing, host with fast write-zeroes) the rest of the cluster -- with subclusters, only the rest of
the touched subclusters."""),
        SETUP,
        code("""
from qsim.traceio import read_trace
from qsim.imageopts import ImageOptions
from qsim.scenario import Grid, Scenario
trace = read_trace("../traces/fio-randwrite-4k.iolog.gz")
clusters = tuple(parse_size(s) for s in ["16k", "64k", "128k", "256k", "512k", "1M", "2M"])
frames = []
for backing in (False, True):
    grid = Grid(Scenario.of(options=ImageOptions(backing=backing)), clusters, (False, True))
    frames.append(qsim.sweep(trace, grid, show_progress=False))
df = pd.concat(frames, ignore_index=True)
df["cow_bytes_per_guest_byte"] = (df.cow_read_bytes + df.cow_write_bytes + df.zero_fill_bytes) / df.guest_write_bytes
df[["backing", "cluster_size", "extended_l2", "cow_read_bytes", "cow_write_bytes", "zero_fill_bytes",
    "cow_bytes_per_guest_byte", "l2_misses", "image_file_bytes", "full_l2_cache_bytes"]].head(28)
"""),
        md("## Copy-on-write amplification per guest byte"),
        code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, constrained_layout=True)
for ax, backing in zip(axes, (False, True)):
    part = df[df.backing == backing]
    for ext, style in ((False, "-o"), (True, "--s")):
        p = part[part.extended_l2 == ext]
        ax.plot(p.cluster_size, p.cow_bytes_per_guest_byte, style, label=f"extended_l2={'on' if ext else 'off'}")
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.xaxis.set_major_formatter(qsim.plot.BYTES)
    ax.set_title("backing file (COW copies)" if backing else "no backing file (zero-fill)")
    ax.set_xlabel("cluster size"); ax.grid(True, which="both", alpha=.3)
axes[0].set_ylabel("extra bytes per guest byte written"); axes[0].legend()
"""),
        md("""
## Beside the published IOPS

The published measurement (40 GB image over a 40 GB backing file, fio 4 KiB random writes, SSD) gives IOPS with
subclusters on / off. These figures are the one external input of this notebook:"""),
        code("""
published = pd.DataFrame({"cluster_size": [parse_size(s) for s in ["64k", "128k", "256k", "512k", "1M", "2M"]],
                          "iops_subclusters_on": [13341, 12391, 9645, 4960, 2732, 1630],
                          "iops_subclusters_off": [1671, 870, 566, 359, 215, 214]})
model = df[df.backing].pivot(index="cluster_size", columns="extended_l2", values="cow_bytes_per_guest_byte")
model.columns = ["model_extra_off", "model_extra_on"]
cmp = published.merge(model, left_on="cluster_size", right_index=True)
cmp["published_speedup_on"] = cmp.iops_subclusters_on / cmp.iops_subclusters_off
cmp["model_io_ratio_off_vs_on"] = (1 + cmp.model_extra_off) / (1 + cmp.model_extra_on)
cmp["published_off_x_1_plus_extra"] = cmp.iops_subclusters_off * (1 + cmp.model_extra_off)
cmp.assign(cluster_size=cmp.cluster_size.map(format_size)).round(2)
"""),
        code("""
rho = np.corrcoef(np.log(cmp.published_speedup_on), np.log(cmp.model_io_ratio_off_vs_on))[0, 1]
print(f"correlation (log-log) between the published speed-up and the model's I/O ratio: {rho:.2f}")
print("IOPS x bytes moved per write, subclusters off (a constant would mean pure bandwidth-bound):")
print((cmp.published_off_x_1_plus_extra / cmp.published_off_x_1_plus_extra.iloc[0]).round(2).tolist())
"""),
        md("""
**Where the extra-I/O ratio explains the shape, and where it cannot.** Without subclusters, every first write to a
cluster copies the rest of the cluster from the backing file, so the bytes moved per 4 KiB write grow with the
cluster size and the published IOPS fall roughly in step: IOPS x bytes moved stays within about a factor of two
from 64k to 2M (printed above). With subclusters the copy shrinks to the rest of the touched subclusters
(cluster/32): at 64k and 128k a 4 KiB write covers whole 2k/4k subclusters and the model copies nothing, yet the
published "on" IOPS are finite and similar there -- per-request costs that are not bytes (allocating clusters,
updating L2 entries, flushes) set the limit, so the model's I/O ratio overstates the speed-up at small clusters
and the published speed-up peaks later (256k). At 2 MiB the published "off" IOPS stop falling (large sequential
copies get cheaper per byte on an SSD), and nothing here models the device's latency, queue depth or the host page cache."""),
        md("## RAM and metadata for a 40 GB disk"),
        code("""
rows = []
for c in clusters:
    for ext in (False, True):
        g = qsim.ImageGeometry(40 * 10**9, c, ext)
        rows.append({"cluster_size": format_size(c), "extended_l2": ext,
                     "l2_cache_for_whole_disk": format_size(g.full_l2_cache_bytes),
                     "metadata_fully_allocated": qsim.measure(g).required})
pd.DataFrame(rows)
"""),
    ],
    "03-replay-fio-trace": [
        md("""
# 3. From a real fio trace to a cache setting

Load a real fio recording, sweep L2 cache sizes, read the knee of the miss-ratio curve, pick the cache for a target
hit ratio and turn it into QEMU and libvirt settings."""),
        SETUP,
        code("""
from qsim.traceio import read_trace
from qsim.trace import trace_stats
from qsim.imageopts import ImageOptions
trace = read_trace("../traces/fio-randread-4k.iolog.gz")
stats = trace_stats(trace)
{k: stats[k] for k in ("requests", "reads", "writes", "max_end_offset", "footprint_4k_blocks",
                       "footprint_64k_clusters")}
"""),
        code("""
from qsim.scenario import Scenario, log_spaced_sizes
sizes = log_spaced_sizes(16 << 10, 8 << 20, 24) + (None,)  # bytes; None = QEMU's default
result = qsim.replay(trace, Scenario.of(sizes, options=ImageOptions(preallocation="metadata")))
frame = result.to_frame()
frame[["l2_cache_size_asked", "l2_cache_bytes", "l2_cache_entry_size", "l2_cache_entries", "l2_misses",
       "l2_hit_ratio", "metadata_read_bytes"]]
"""),
        code("""
fig = qsim.plot.miss_ratio_curve(frame, "l2_hit_ratio", title="fio 4k random reads on a 32 GiB disk")
"""),
        md("""
The curve is flat until the cache holds every 4 KiB slice the workload touches, then jumps once the whole disk is
covered and QEMU switches to one entry per L2 table. Pick the smallest cache with at least 99% hits:"""),
        code("""
target = 0.99
good = frame[frame.l2_hit_ratio >= target].sort_values("l2_cache_ram_bytes")
choice = good.iloc[0]
print(f"smallest cache with >= {target:.0%} hits: l2-cache-size={format_size(int(choice.l2_cache_bytes))} "
      f"({choice.l2_cache_entries} x {format_size(int(choice.l2_cache_entry_size))}, "
      f"{choice.l2_hit_ratio:.2%} hits)")
"""),
        code("""
g = qsim.ImageGeometry(int(choice.virtual_size))
report = qsim.size_report(g, qsim.CacheSettings(l2_cache_size=int(choice.l2_cache_bytes)))
print(report.settings.drive)
print(report.settings.blockdev)
print(report.settings.libvirt)
"""),
        md("""
## Time matters: QEMU's cache cleaning

QEMU drops idle cache entries every `cache-clean-interval` seconds (600 by default on Linux): at each tick, whatever
is clean and unused since the previous tick. This fio recording lasts a tenth of a second, so cleaning never
touches it. Play the same requests as ten bursts half an hour apart, as a VM busy now and then would, and every
burst starts from a cache the cleaner has emptied:"""),
        code("""
from qsim.trace import Trace
bursts = np.arange(len(trace)) // 2000 * 1800.0 + trace.time  # ten bursts, 30 minutes apart
spread = Trace.from_arrays(trace.op, trace.offset, trace.length, bursts)
sizes = (64 << 10, 1 << 20, 4 << 20, None)
rows = []
for interval in (600, 0):
    for row in qsim.replay(spread, Scenario.of(sizes, options=ImageOptions(preallocation="metadata"),
                                               cache_clean_interval=interval)).rows:
        rows.append({k: row[k] for k in ("cache_clean_interval", "l2_cache_size_asked", "l2_cache_entries",
                                         "l2_misses", "l2_cleaned", "cache_clean_ticks")})
pd.DataFrame(rows)
"""),
        md("""
## libvirt's one number: the combined cache-size

libvirt's `<metadata_cache><max_size>` sets QEMU's `cache-size`, which QEMU splits between the L2 and refcount caches
(read_cache_sizes): below full coverage the refcount cache keeps its 4-cluster minimum and L2 gets the rest. Sweep it
as a libvirt user would, with the real mixed fio trace (30% writes, fsyncs) on a new (empty) disk, where every first
write allocates and so goes through the refcount cache as well: its lookups (the allocator checking clusters, the one-time preallocation scan), its misses, and its
write-backs, which QEMU does before every write-back of an L2 slice that a new cluster was linked into."""),
        code("""
from qsim.scenario import ImageSpec, doubling_sizes
caches = tuple(qsim.CacheSettings(cache_size=s) for s in doubling_sizes(1 << 20, 64 << 20))
mixed = read_trace("../traces/fio-randrw-mixed-fsync.iolog.gz")
combined = qsim.replay(mixed, Scenario(ImageSpec(ImageOptions()), caches)).to_frame()
combined[["cache_size_asked", "l2_cache_bytes", "refcount_cache_bytes", "l2_misses", "l2_writebacks",
          "refcount_lookups", "refcount_misses", "refcount_writebacks", "metadata_write_bytes"]]
"""),
        md("""
From 2M on, the L2 part covers the whole disk, so QEMU's entries become whole 64k tables instead of 4k slices: the
misses all but vanish, but every write-back of a dirty table now writes 64k, and the metadata written grows about
five-fold. The refcount cache's counters do not move with its size here: this trace's writes stay within one refcount
block, so the 4-cluster minimum already holds all it needs, and a larger `cache-size` only adds RAM to it."""),
    ],
    "04-validate-against-qemu": [
        md("""
# 4. qsim beside real QEMU

The same trace through real `qemu-io` (with `-T qcow2_cache_*` tracing) and through qsim. This notebook needs
`qemu-utils` (`apt-get install -y qemu-utils`); without it, it says so and stops."""),
        SETUP,
        code("""
import shutil
from qsim.traceio import read_trace
from qsim.imageopts import ImageOptions
from qsim.validate import validate
from qsim.scenario import Scenario
have_qemu = shutil.which("qemu-io") is not None and shutil.which("qemu-img") is not None
print("QEMU found" if have_qemu else "QEMU is not installed here: apt-get install -y qemu-utils (skipping)")
"""),
        code("""
cases = [("fio-randrw-mixed-fsync", ImageOptions(preallocation="metadata"), 64 << 10, "writeback"),
         ("fio-randwrite-4k", ImageOptions(cluster_size=128 << 10, extended_l2=True), 256 << 10, "writeback"),
         ("fio-seqwrite-64k", ImageOptions(), 32 << 10, "writethrough")]
rows = []
if have_qemu:
    for name, options, l2, mode in cases:
        trace = read_trace(f"../traces/{name}.iolog.gz")
        size = max(-(-trace.max_end_offset // (1 << 30)), 1) << 30
        v = validate(trace, Scenario.of((l2,), None, options, size, cache_mode=mode))
        for counter in v.compared:  # the L2 and refcount caches' counters, and the image file's size
            rows.append({"trace": name, "counter": counter, "qsim": v.qsim[counter], "qemu": v.qemu[counter]})
side_by_side = pd.DataFrame(rows)
side_by_side
"""),
        code("""
if have_qemu:
    agree = (side_by_side.qsim == side_by_side.qemu).all()
    print("every counter agrees" if agree else "DIFFERENCES above")
"""),
        md("""
## Along a miss-ratio curve, on QEMU 7.2 and 10.0

The real fio 4 KiB random-read trace on a metadata-preallocated disk, at cache sizes from 16k to 4M: qsim's
misses as a line, each QEMU build's (every folder in `QSIM_QEMU_PREFIXES`, as CI sets it: 7.2.22 and 10.0.2) as
markers. The cache switches to 4 KiB slices below full coverage, which is why the curve bends where it does."""),
        code("""
import os
from qsim.replay import default_virtual_size
prefixes = [p for p in os.environ.get("QSIM_QEMU_PREFIXES", "").split(":") if p]
if not prefixes and have_qemu:
    prefixes = [os.path.dirname(shutil.which("qemu-io"))]
    if os.access("/opt/qemu-10.0/usr/bin/qemu-io", os.X_OK):
        prefixes.append("/opt/qemu-10.0/usr/bin")
trace = read_trace("../traces/fio-randread-4k.iolog.gz")
opts = ImageOptions(preallocation="metadata")
size = default_virtual_size(trace)
points = []
if have_qemu:
    for l2 in (16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20):
        for prefix in prefixes:
            qemu_io = os.path.join(prefix, "qemu-io")
            if os.access(qemu_io, os.X_OK):
                v = validate(trace, Scenario.of((l2,), None, opts, size), qemu_io=qemu_io)
                points.append({"l2_cache_size": l2, "qemu": "QEMU " + v.qemu_version.split()[0],
                               "qsim_misses": v.qsim["l2_misses"], "qemu_misses": v.qemu["l2_misses"],
                               "all counters agree": v.match})
curve = pd.DataFrame(points)
curve
"""),
        code("""
if len(curve):
    fig, ax = plt.subplots(figsize=(7, 4))
    ours = curve.drop_duplicates("l2_cache_size")
    ax.plot(ours.l2_cache_size, ours.qsim_misses / len(trace), color="#0072B2", label="qsim")
    for (name, group), marker in zip(curve.groupby("qemu"), ("o", "x", "s")):
        ax.scatter(group.l2_cache_size, group.qemu_misses / len(trace), marker=marker, s=60, label=name,
                   facecolors="none" if marker == "o" else None, edgecolors="#D55E00" if marker == "o" else None,
                   color=None if marker == "o" else "#009E73")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ours.l2_cache_size, [format_size(int(v)) for v in ours.l2_cache_size])
    ax.set_xlabel("l2-cache-size")
    ax.set_ylabel("L2 misses per request")
    ax.set_title("fio 4k random reads: qsim beside qemu-io")
    ax.legend()
    print("every point agrees on every counter" if curve["all counters agree"].all() else "DIFFERENCES above")
"""),
        md("""
`qemu-io` never runs QEMU's cache cleaner (its timer is on the virtual clock, which only a running VM starts), so
the comparison above is with cleaning off on both sides, as `qsim validate` says. To see cleaning, qsim drives a
`qemu-system-x86_64 -M none -S` over QMP (`qsim.qemusystem`) and sends each request at its scaled timestamp: here
bursts on a clock where the interval is 600 s, replayed with `cache-clean-interval=1` and the times divided by
600 (about 4 seconds). Needs `apt-get install -y qemu-system-x86`."""),
        code("""
import os
from qsim.trace import READ, WRITE, Trace
from qsim.qemusystem import replay_timed
qemu_system = shutil.which("qemu-system-x86_64")
rng = np.random.default_rng(1)
starts = [0.4, 1.5, 2.6, 3.5]  # in intervals: away from every tick
n = 15
times = np.concatenate([(s + 0.08 * np.arange(n) / n) * 600 for s in starts])
offsets = rng.integers(0, 12, len(times)) * (32 << 20)  # 12 slices of 4k, one each, in a 16-entry cache
ops = np.where(rng.random(len(times)) < 0.3, WRITE, READ)
timed = Trace.from_arrays(ops, offsets, [4096] * len(times), times)
opts = ImageOptions(preallocation="metadata", extended_l2=True)
rows = []
if qemu_system and have_qemu:
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    theirs = replay_timed(qemu_system, timed, 2 << 30, opts, cache_clean_interval=1, time_scale=600,
                          accel=accel, l2_cache_size=64 << 10).counts
    for interval in (600, 0):
        ours = qsim.replay(timed, Scenario.of((64 << 10,), None, opts, 2 << 30,
                                              cache_clean_interval=interval)).rows[0]
        rows.append({"qsim cache_clean_interval": interval, **{k: ours[k] for k in ("l2_misses", "l2_writebacks")},
                     "qemu-system l2_misses": theirs["l2_misses"],
                     "qemu-system l2_writebacks": theirs["l2_writebacks"]})
else:
    print("qemu-system-x86_64 is not installed here (apt-get install -y qemu-system-x86): skipping")
pd.DataFrame(rows)
"""),
    ],
    "05-plan-a-host": [
        md("""
# 5. One RAM budget for a whole host

Every qcow2 disk of every VM gets its own metadata cache, and the RAM is real: at QEMU's 32 MiB default cap, 100
large disks hold 3.2 GiB. Each cache is usually sized alone (QEMU's default, the disk's size, by hand). qsim knows
each disk's exact miss curve from its own workload, so it can answer the host's question: *given B bytes for all of
these disks, how should they be split to make the fewest metadata reads?*

`qsim plan` (here its library, `qsim.plan`) answers it exactly. Each disk may take only the caches its sweep
measured, each counted as QEMU allocates it: L2 entries x entry size (4 KiB slices while the cache does not cover
the disk, whole tables once it does) plus the refcount cache's 4-cluster minimum, which libvirt's
`<metadata_cache><max_size>` counts too. Choosing one cache per disk within the budget is a multiple-choice
knapsack; miss curves drop in a cliff where the cache starts covering the disk, so they are not convex and a greedy
is not optimal: the plan is an exact dynamic programme (`qsim.knapsack`)."""),
        SETUP,
        md("""
## A host of twelve disks

The seven bundled traces (real fio recordings and synthetic ones, 1 GiB to 64 GiB) plus five synthetic disks of
100 GiB to 2 TiB with different skews: Zipf 0.8 (almost uniform) to 1.3 (a few hot spots), uniform, and a hot spot
taking 95% of the I/O on 5% of the disk. Every image is metadata-preallocated (a disk in use: every L2 table
exists)."""),
        code("""
from qsim.imageopts import ImageOptions
from qsim.traceio import read_trace
bundled = ["fio-randread-4k.iolog.gz", "fio-randrw-mixed-fsync.iolog.gz", "fio-randwrite-4k.iolog.gz",
           "fio-seqwrite-64k.iolog.gz", "synth-zipf-read-4k.iolog.gz", "synth-hotspot-mixed.csv",
           "synth-seq-read-1m.iolog.gz"]
fleet = {name.split(".")[0]: read_trace(f"../traces/{name}") for name in bundled}
synthetic = {"zipf0.8-200G": ("200G", "zipf:0.8"), "zipf1.3-500G": ("500G", "zipf:1.3"),
             "uniform-100G": ("100G", "uniform"), "hotspot-1T": ("1T", "hotspot:95/5"),
             "zipf1.0-2T": ("2T", "zipf:1.0")}
for seed, (name, (size, pattern)) in enumerate(synthetic.items()):
    fleet[name] = qsim.synthesize(parse_size(size), 20_000, pattern, "4k/80:64k/20", read_share=0.7, seed=seed)

# One replay per disk, 40 log-spaced cache sizes and QEMU's default: the points the plan may choose among.
from qsim.scenario import Scenario, log_spaced_sizes
frames = []
for name, trace in fleet.items():
    size = parse_size(synthetic[name][0]) if name in synthetic else None  # else the trace's extent, in whole GiB
    scenario = Scenario.of(log_spaced_sizes(64 << 10, 64 << 20, 40) + (None,),
                           options=ImageOptions(preallocation="metadata"), virtual_size=size)
    frame = qsim.replay(trace, scenario).to_frame()
    frame.insert(0, "trace_id", name)
    frames.append(frame)
results = pd.concat(frames, ignore_index=True)

from qsim.plan import disks_from_results, plan_host
disks, notes = disks_from_results(results)
pd.DataFrame([{"disk": d.name, "size": format_size(d.geometry.virtual_size),
               "requests": int(results[results.trace_id == d.name].requests.iloc[0]),
               "measured caches": len(d.options),
               "QEMU default": format_size(int(d.options[d.options.is_qemu_default].cache_size.iloc[0])),
               "misses at default": int(d.options[d.options.is_qemu_default].misses.iloc[0])} for d in disks])
"""),
        md("""
## Each disk's miss curve

Misses per request against the RAM the cache takes. Inside one slice size LRU is a stack algorithm, so each curve
falls monotonically; the last point of the smaller disks is the cliff where the cache covers the whole disk and
QEMU switches from 4 KiB slices to whole 64 KiB tables."""),
        code("""
fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
for k, d in enumerate(disks):
    requests = int(results[results.trace_id == d.name].requests.iloc[0])
    ax.plot(d.options.ram_bytes, d.options.misses / requests, marker=".", label=d.name,
            color=qsim.plot.OKABE_ITO[k % 8], linestyle="-" if k < 8 else "--")
ax.set_xscale("log", base=2); ax.xaxis.set_major_formatter(qsim.plot.BYTES)
ax.set_xlabel("cache RAM (L2 entries x entry size + refcount cache)"); ax.set_ylabel("L2 misses per request")
ax.grid(True, which="both", alpha=.3); ax.legend(fontsize="x-small", ncol=2)
"""),
        md("""
## The plan beside the baselines, at several budgets

The baselines get the same budget: a share proportional to each disk's size, or an equal share, each rounded down
to the disk's largest measured cache that fits (and up to its smallest where even that does not fit, which then
overspends: the `RAM` columns say how much each really took)."""),
        code("""
rows = []
for budget in ["4M", "8M", "16M", "32M", "64M", "128M"]:
    p = plan_host(disks, parse_size(budget))
    b = p.baselines
    rows.append({"budget": budget, "plan misses": p.total_misses, "plan RAM": format_size(p.total_ram_bytes),
                 "proportional misses": b["proportional"]["total_misses"],
                 "proportional RAM": format_size(b["proportional"]["total_cache_size"]),
                 "equal misses": b["equal"]["total_misses"], "equal RAM": format_size(b["equal"]["total_cache_size"])})
    assert p.total_misses <= b["proportional"]["total_misses"] and p.total_misses <= b["equal"]["total_misses"]
    assert p.total_ram_bytes <= parse_size(budget)
at_budgets = pd.DataFrame(rows)
at_budgets
"""),
        md("""
## QEMU's defaults, with the RAM they really take

QEMU's default covers each disk up to 32 MiB of L2 cache, so the defaults take whatever RAM the disks' sizes
decide. Given exactly that RAM, the plan can only do at least as well (the defaults are one of its choices); the
interesting number is how much less RAM the plan needs to match them."""),
        code("""
plan = plan_host(disks, 64 << 20)
default = plan.baselines["qemu_default"]
same_ram = plan_host(disks, default["total_cache_size"])
assert same_ram.total_misses <= default["total_misses"]
curve = plan.curve
enough = default["plan_cache_size_for_same_objective"]
assert plan_host(disks, enough).total_misses <= default["total_misses"] < plan_host(disks, enough - 1).total_misses
print(f"QEMU's defaults: {default['total_misses']:,} misses in {default['total_cache_size'] / 2**20:.1f} MiB of RAM")
print(f"the plan with that RAM: {same_ram.total_misses:,} misses")
print(f"the plan makes no more misses than the defaults from {enough / 2**20:.1f} MiB on "
      f"({100 * enough / default['total_cache_size']:.0f}% of their RAM)")
"""),
        code("""
fig = qsim.plot.plan(curve, default, 64 << 20, title="Twelve disks, one budget: the plan and the baselines")
"""),
        md("""
## What to paste, at 64 MiB

Each disk's `cache-size` is the libvirt `<metadata_cache><max_size>` (bytes) that makes QEMU build exactly the
planned L2 cache and a 4-cluster refcount cache (checked against QEMU's read_cache_sizes); `-drive` and `-blockdev`
give the same L2 cache with `l2-cache-size`. From the command line, `qsim plan RESULTS/ --budget 64M --domain
vm.xml --write-xml patched/` also writes patched copies of the domains' XML."""),
        code("""
table = pd.DataFrame(plan.disk_rows())
table.assign(size=table.virtual_size.map(format_size), cache_size=table.cache_size.map(format_size),
             l2=[f"{n} x {format_size(e)}" for n, e in zip(table.l2_cache_entries, table.l2_cache_entry_size)],
             covers=(100 * table.covered_fraction).round(2))[
    ["disk", "size", "cache_size", "l2", "covers", "misses", "is_qemu_default"]]
"""),
        code("""
for row in plan.disk_rows()[:2]:
    print(row["disk"], row["settings"]["libvirt"], row["settings"]["drive"], sep="\\n  ")
"""),
    ],
}


def build(names: list[str]) -> None:
    for name, cells in NOTEBOOKS.items():
        if names and not any(n in name for n in names):
            continue
        nb = nbformat.v4.new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, str(HERE / f"{name}.ipynb"))
        print(f"wrote {name}.ipynb")


if __name__ == "__main__":
    build(sys.argv[1:])
