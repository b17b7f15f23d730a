"""qsim: how much L2 cache a qcow2 disk needs, and what each cluster size / extended_l2 choice costs.

The public API: geometry and sizing (``ImageGeometry``, ``measure``, ``resolve_cache``, ``size_report``), traces
(``read_trace``, ``synthesize``), one replay scenario (``Scenario``, ``ImageSpec``, ``Grid``), replay and sweeps
(``replay``, ``sweep``: pandas DataFrames at the edge), real images (``open_image``, ``inspect_image``) and
``validate`` against QEMU. Plots live in ``qsim.plot``.

Names are imported on first use (PEP 562), so ``qsim size`` and ``qsim --version`` never load numpy, pandas or
numba.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "CacheConfig": "cachecfg", "CacheSettings": "cachecfg", "resolve_cache": "cachecfg",
    "QsimError": "errors", "ImageGeometry": "geometry", "measure": "geometry", "size_report": "sizing",
    "format_size": "units", "parse_size": "units", "ImageOptions": "imageopts",
    "Scenario": "scenario", "ImageSpec": "scenario", "Grid": "scenario",
    "Trace": "trace", "read_trace": "traceio", "write_trace": "traceio", "synthesize": "synth",
    "replay": "replay", "sweep": "sweep", "open_image": "qcow2", "inspect_image": "inspect", "validate": "validate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the function shadows the submodule of the same name, as an eager import did
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``qsim.replay``, ``qsim.sweep`` and ``qsim.validate`` are functions named like their modules. Importing a
    submodule makes Python bind it on the package (``qsim.replay = <module>``); with names exported lazily that
    would hide the function, so the package keeps those names for the functions. The modules stay importable
    (``from qsim.replay import ...``, ``importlib.import_module("qsim.replay")``)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
