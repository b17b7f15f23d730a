"""How to read a trace file, as one frozen value: what the fleet hands its workers beside the scenario.

The CLI's ``--format``, ``--file`` and ``--action`` (and any reader option added later) land here once, so a trace
read in this process and one read by a Dask worker are read the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReadOptions:
    """``format``: one of ``qsim.traceio.FORMATS`` (None = detected from the content); ``file``: the file to keep
    in a fio iolog naming several; ``action``: the blkparse/blktrace action kept (Q, queued, by default);
    ``device``: the BlockBackend (blk pointer) of a QEMU trace log; ``volume``: the volume of an MSR, Alibaba or
    Tencent trace."""

    format: str | None = None
    file: str | None = None
    action: str = "Q"
    device: str | None = None
    volume: str | None = None

    def read(self, path: str):
        """The whole trace (a ``Trace``)."""
        from . import read_trace

        return read_trace(path, **asdict(self))

    def chunks(self, path: str, chunk_requests: int = 1 << 21):
        """The trace in chunks (``Trace`` pieces), for files larger than memory."""
        from . import iter_trace

        return iter_trace(path, **asdict(self), chunk_requests=chunk_requests)
