"""Progress bars on long work: tqdm when it is installed and stderr is a terminal, silence otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def progress_bar(total: int | None, unit: str = "it", desc: str = "", enabled: bool = True):
    """A context manager yielding an object with ``update(n)``."""
    if not enabled or not sys.stderr.isatty():
        yield _Silent()
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield _Silent()
        return
    with tqdm(total=total, unit=unit, desc=desc, unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar
