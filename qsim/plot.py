"""Figures of the trade-offs, from DataFrames qsim produced (this module imports nothing of the engine).

- ``miss_ratio_curve``: L2 misses (or metadata bytes read) against cache size, one line per geometry.
- ``tradeoff``: per cluster size x extended_l2: RAM to cover the disk, copy-on-write and zero-fill bytes,
  metadata overhead, and L2 misses at a fixed cache size.
- ``coverage_map``: disk size x cluster size -> L2 cache needed, with QEMU's 32 MiB default as the boundary.
- ``plan``: a host's total misses against its RAM budget, for ``qsim plan``'s optimal split and its baselines.

Axes carry units (KiB, MiB, GiB); colours are the Okabe-Ito colour-blind-safe palette.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, MaxNLocator

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
QEMU_DEFAULT_L2_MAX = 32 * 1024 * 1024


def bytes_label(n: float, _pos=None) -> str:
    """Axis tick text: 65536 -> '64 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


BYTES = FuncFormatter(bytes_label)


class BytesLocator(MaxNLocator):
    """Round ticks in the largest binary unit that fits (0, 2 GiB, 4 GiB, ... rather than 1.86 GiB steps)."""

    def tick_values(self, vmin, vmax):
        unit = 1024.0 ** max(int(np.log(max(abs(vmax), 1)) / np.log(1024)), 0)
        return super().tick_values(vmin / unit, vmax / unit) * unit


def _bytes_axis(axis) -> None:
    axis.set_major_locator(BytesLocator(nbins=6, steps=[1, 2, 2.5, 4, 5, 8, 10]))
    axis.set_major_formatter(BYTES)


def _geometry_label(cluster_size: int, extended_l2: bool) -> str:
    return f"{bytes_label(cluster_size)} clusters" + (", extended_l2" if extended_l2 else "")


def miss_ratio_curve(frame: pd.DataFrame, metric: str = "l2_misses", ax=None, title: str | None = None):
    """Misses (or ``metadata_read_bytes``, ``l2_hit_ratio``, ...) against L2 cache RAM, one line per geometry.
    Rows asked with the default cache are marked with a circle."""
    fig, ax = _figure(ax)
    clusters = sorted(frame["cluster_size"].unique())
    for (cluster, ext), group in frame.groupby(["cluster_size", "extended_l2"], sort=True):
        group = group.sort_values("l2_cache_ram_bytes")
        colour = OKABE_ITO[clusters.index(cluster) % len(OKABE_ITO)]
        ax.plot(group["l2_cache_ram_bytes"], group[metric], marker=".", color=colour,
                linestyle="--" if ext else "-", label=_geometry_label(cluster, ext))
        default = group[group["l2_cache_size_asked"].astype(str) == "default"]
        if len(default):
            ax.scatter(default["l2_cache_ram_bytes"], default[metric], s=90, facecolors="none", edgecolors=colour,
                       linewidths=2, zorder=5)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(BYTES)
    if metric.endswith("_bytes"):
        _bytes_axis(ax.yaxis)
    ax.set_xlabel("L2 cache RAM (entries x entry size); dashed: extended_l2")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or "L2 cache misses against cache size (circles: QEMU's default)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def tradeoff(frame: pd.DataFrame, cache_bytes: int | None = None, title: str | None = None):
    """Four panels per cluster size x extended_l2. Misses are taken at ``cache_bytes`` (default: QEMU's default
    rows if present, else the smallest cache in the frame)."""
    if cache_bytes is None:
        chosen = frame[frame["l2_cache_size_asked"].astype(str) == "default"]
        if chosen.empty:
            chosen = frame[frame["l2_cache_bytes"] == frame["l2_cache_bytes"].min()]
        at = "QEMU's default cache"
    else:
        chosen = frame[frame["l2_cache_bytes"] == cache_bytes]
        at = f"a {bytes_label(cache_bytes)} cache"
    chosen = chosen.sort_values(["extended_l2", "cluster_size"]).drop_duplicates(["cluster_size", "extended_l2"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    panels = [
        ("full_l2_cache_bytes", "L2 cache to cover the whole disk", True),
        ("cow_and_zero_fill_bytes", "copy-on-write + zero-fill bytes", True),
        ("metadata_overhead_bytes", "metadata of a fully allocated image", True),
        ("l2_misses", f"L2 misses at {at}", False),
    ]
    chosen = chosen.assign(cow_and_zero_fill_bytes=chosen["cow_write_bytes"] + chosen["zero_fill_bytes"])
    clusters = sorted(chosen["cluster_size"].unique())
    positions = np.arange(len(clusters))
    width = 0.4
    for ax, (column, label, is_bytes) in zip(axes.flat, panels):
        for j, ext in enumerate((False, True)):
            part = chosen[chosen["extended_l2"] == ext].set_index("cluster_size")
            values = [part[column].get(c, np.nan) for c in clusters]
            ax.bar(positions + (j - 0.5) * width, values, width, color=OKABE_ITO[j],
                   label="extended_l2=on" if ext else "extended_l2=off")
        ax.set_xticks(positions, [bytes_label(c) for c in clusters])
        ax.set_xlabel("cluster size")
        ax.set_title(label)
        if is_bytes:
            _bytes_axis(ax.yaxis)
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].axhline(QEMU_DEFAULT_L2_MAX, color=OKABE_ITO[5], linestyle=":", label="QEMU default max (32 MiB)")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(title or "Cluster size and extended_l2: what each choice costs")
    return fig


def coverage_map(frame: pd.DataFrame, title: str | None = None):
    """Heat map of ``full_l2_cache_bytes`` over disk size x cluster size (a panel per extended_l2 value), with the
    cells QEMU's 32 MiB default covers outlined."""
    exts = sorted(frame["extended_l2"].unique())
    fig, axes = plt.subplots(1, len(exts), figsize=(6 * len(exts), 4.8), constrained_layout=True, squeeze=False)
    for ax, ext in zip(axes.flat, exts):
        part = frame[frame["extended_l2"] == ext]
        table = part.pivot(index="cluster_size", columns="virtual_size", values="full_l2_cache_bytes")
        values = np.log2(table.to_numpy(dtype=float))
        image = ax.imshow(values, cmap="cividis", aspect="auto", origin="lower")
        for (r, c), v in np.ndenumerate(table.to_numpy()):
            if np.isnan(v):
                continue
            covered = v <= QEMU_DEFAULT_L2_MAX
            ax.text(c, r, bytes_label(v).replace(" ", "\n"), ha="center", va="center", fontsize=7,
                    color="black" if values[r, c] > np.nanmean(values) else "white",
                    fontweight="bold" if covered else "normal")
            if covered:
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=OKABE_ITO[1], lw=2))
        ax.set_xticks(range(len(table.columns)), [bytes_label(v) for v in table.columns], rotation=45)
        ax.set_yticks(range(len(table.index)), [bytes_label(v) for v in table.index])
        ax.set_xlabel("virtual disk size")
        ax.set_ylabel("cluster size")
        ax.set_title(f"extended_l2={'on' if ext else 'off'}")
        fig.colorbar(image, ax=ax, label="log2(L2 bytes to cover the disk)")
    fig.suptitle(title or "L2 cache needed to cover the disk (outlined: QEMU's 32 MiB default covers it)")
    return fig


def plan(curve: pd.DataFrame, qemu_default: dict | None = None, budget: int | None = None,
         ylabel: str = "total L2 misses", ax=None, title: str | None = None):
    """Total misses (or the plan's objective) against the budget: the optimal plan, the proportional and equal
    splits (drawn where they keep to the budget), QEMU's defaults as one point at the RAM they take (with the
    plan at that RAM), and the budget asked for. ``curve`` is ``qsim plan``'s curve: budget, plan, proportional,
    equal, proportional_cache_size, equal_cache_size."""
    fig, ax = _figure(ax)
    curve = curve.sort_values("budget")
    ax.plot(curve["budget"], curve["plan"], color=OKABE_ITO[0], marker=".", label="qsim plan (optimal split)")
    for k, (name, label) in enumerate((("proportional", "proportional to disk size"), ("equal", "equal split"))):
        fits = curve[name + "_cache_size"] <= curve["budget"]
        ax.plot(curve["budget"], curve[name].where(fits), color=OKABE_ITO[k + 1], linestyle="--",
                label=label + " (where it keeps to the budget)")
    if qemu_default:
        ax.scatter([qemu_default["total_cache_size"]], [qemu_default["total_objective"]], s=90, marker="s",
                   color=OKABE_ITO[5], zorder=5, label="QEMU's default for every disk")
        same = qemu_default.get("plan_total_objective_at_same_cache_size")
        if same is not None:
            ax.scatter([qemu_default["total_cache_size"]], [same], s=90, marker="*", color=OKABE_ITO[0], zorder=6,
                       label="the plan with the defaults' RAM")
    if budget is not None:
        ax.axvline(budget, color=OKABE_ITO[7], linestyle=":", alpha=0.7, label=f"budget {bytes_label(budget)}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(BYTES)
    ax.set_xlabel("RAM for all disks' metadata caches (L2 entries x entry size + refcount caches)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "One RAM budget for the whole host")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def save_figure(fig, path: str) -> None:
    """Write the figure as PNG or SVG (by the suffix) through qsim.safeio: atomically, never through a link."""
    import os

    from .errors import QsimError
    from .safeio import atomic_path

    kind = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=kind or "png")
    except OSError as exc:
        raise QsimError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


def _figure(ax):
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
        return fig, ax
    return ax.figure, ax
