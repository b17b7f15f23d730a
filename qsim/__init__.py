"""qsim: how much L2 cache a qcow2 disk needs, and what each cluster size / extended_l2 choice costs.

The public API: geometry and sizing (``ImageGeometry``, ``measure``, ``resolve_cache``, ``size_report``);
traces, replay and sweeps arrive in their own modules.
"""

__version__ = "0.1.0"

from .cachecfg import CacheConfig, CacheSettings, resolve_cache  # noqa: E402
from .errors import QsimError  # noqa: E402
from .geometry import ImageGeometry, measure  # noqa: E402
from .sizing import size_report  # noqa: E402
from .units import format_size, parse_size  # noqa: E402

__all__ = [
    "CacheConfig", "CacheSettings", "ImageGeometry", "QsimError", "format_size", "measure", "parse_size",
    "resolve_cache", "size_report",
]
