"""Grids of configurations -> one tidy pandas DataFrame (one row per configuration).

A sweep replays one trace over cluster sizes x extended_l2 (x preallocation) and, within each geometry, over L2
cache sizes (which cost nothing extra: stage 2 serves every size from one pass).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import replace

import pandas as pd

from .cachecfg import DEFAULT_QEMU_VERSION
from .geometry import MIN_EXTENDED_L2_CLUSTER_SIZE
from .imageopts import ImageOptions
from .progress import progress_bar
from .replay import default_virtual_size, parse_cache_sizes, replay
from .trace import Trace


def sweep(
    trace: Trace,
    cluster_sizes: list[int] = (65536,),
    extended_l2: list[bool] = (False,),
    l2_cache_sizes: list[int | None] | str | None = None,
    options: ImageOptions = ImageOptions(),
    virtual_size: int | None = None,
    l2_cache_entry_size: int | None = None,
    cache_mode: str = "writeback",
    offset_policy: str = "error",
    qemu_version: str = DEFAULT_QEMU_VERSION,
    show_progress: bool = True,
    image=None,
) -> pd.DataFrame:
    """Replay ``trace`` for every cluster size x extended_l2 x L2 cache size; combinations QEMU refuses
    (extended_l2 below 16 KiB clusters) are skipped with a note on stderr. With a real ``image`` (an ImageState)
    only the cache sizes vary."""
    if isinstance(l2_cache_sizes, str) or l2_cache_sizes is None:
        l2_cache_sizes = parse_cache_sizes(l2_cache_sizes)
    size = virtual_size if virtual_size is not None else default_virtual_size(trace)
    grid = []
    for cluster_size, ext in itertools.product(cluster_sizes, extended_l2):
        if ext and cluster_size < MIN_EXTENDED_L2_CLUSTER_SIZE:
            print(f"qsim sweep: skipping cluster_size={cluster_size} with extended_l2=on (QEMU needs at least 16k)",
                  file=sys.stderr)
            continue
        grid.append(replace(options, cluster_size=cluster_size, extended_l2=ext))
    if image is not None:
        return replay(trace, image=image, l2_cache_sizes=l2_cache_sizes, l2_cache_entry_size=l2_cache_entry_size,
                      cache_mode=cache_mode, offset_policy=offset_policy, qemu_version=qemu_version).to_frame()
    frames = []
    with progress_bar(total=len(grid) * len(trace), unit="req", desc="sweep", enabled=show_progress) as bar:
        for opts in grid:
            result = replay(trace, size, opts, l2_cache_sizes=l2_cache_sizes, l2_cache_entry_size=l2_cache_entry_size,
                            cache_mode=cache_mode, offset_policy=offset_policy, qemu_version=qemu_version,
                            progress=bar.update)
            frames.append(result.to_frame())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
