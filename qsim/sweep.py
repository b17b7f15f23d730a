"""Grids of configurations -> one tidy pandas DataFrame (one row per configuration).

A sweep replays one trace for each geometry of a ``Grid`` (cluster sizes x extended_l2) and, within each, for
every cache configuration of its scenario (which cost nothing extra: stage 2 serves every size from one pass).
"""

from __future__ import annotations

import pandas as pd

from .progress import progress_bar
from .replay import replay
from .scenario import Grid
from .trace import Trace


def sweep(trace: Trace, grid: Grid, show_progress: bool = True) -> pd.DataFrame:
    """Replay ``trace`` for every geometry of ``grid``; one row per (geometry, cache configuration), in grid order.

    The frame's ``attrs["skipped"]`` lists the combinations QEMU refuses (extended_l2 below 16 KiB clusters) and
    ``attrs["notes"]`` what the user should be told about a real image: the caller decides how to show them."""
    scenarios, skipped = grid.expand()
    frames, notes = [], []
    with progress_bar(total=len(scenarios) * len(trace), unit="req", desc="sweep", enabled=show_progress) as bar:
        for scenario in scenarios:
            result = replay(trace, scenario, progress=bar.update)
            frames.append(result.to_frame())
            notes.extend(n for n in result.notes if n not in notes)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    frame.attrs["skipped"] = skipped
    frame.attrs["notes"] = notes
    return frame
