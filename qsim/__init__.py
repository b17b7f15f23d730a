"""qsim: how much L2 cache a qcow2 disk needs, and what each cluster size / extended_l2 choice costs.

The public API: geometry and sizing (``ImageGeometry``, ``measure``, ``resolve_cache``, ``size_report``), traces
(``read_trace``, ``synthesize``), replay and sweeps (``replay``, ``sweep``: pandas DataFrames at the edge), real
images (``open_image``, ``inspect_image``) and ``validate`` against QEMU. Plots live in ``qsim.plot``.
"""

__version__ = "0.1.0"

from .cachecfg import CacheConfig, CacheSettings, resolve_cache  # noqa: E402
from .errors import QsimError  # noqa: E402
from .geometry import ImageGeometry, measure  # noqa: E402
from .sizing import size_report  # noqa: E402
from .units import format_size, parse_size  # noqa: E402
from .imageopts import ImageOptions  # noqa: E402
from .trace import Trace  # noqa: E402
from .traceio import read_trace, write_trace  # noqa: E402
from .synth import synthesize  # noqa: E402
from .replay import replay  # noqa: E402
from .sweep import sweep  # noqa: E402
from .qcow2 import open_image  # noqa: E402
from .inspect import inspect_image  # noqa: E402
from .validate import validate  # noqa: E402

__all__ = [
    "CacheConfig", "CacheSettings", "ImageGeometry", "ImageOptions", "QsimError", "Trace", "format_size",
    "inspect_image", "measure", "open_image", "parse_size", "read_trace", "replay", "resolve_cache", "size_report",
    "sweep", "synthesize", "validate", "write_trace",
]
