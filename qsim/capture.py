"""Recording a running VM's block requests from the host (``qsim capture``), without touching the guest.

QEMU's BlockBackend trace events ``blk_co_preadv`` and ``blk_co_pwritev`` are switched on over QMP
(``trace-event-set-state``), and switched back to their previous state afterwards. QEMU's ``log`` trace backend
(Debian, Ubuntu) writes the lines to its log; the part of the log written meanwhile becomes a fio iolog with one file
per BlockBackend (named by its blk pointer). The command line around it is ``qsim.cli.capture``.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass

import numpy as np

from .codes import WRITE
from .errors import QsimError
from .safeio import atomic_output
from .traceio import qemulog

EVENTS = ("blk_co_preadv", "blk_co_pwritev")
SETTLE_SECONDS = 0.2  # after switching off, for lines of requests already past the trace point


@dataclass(frozen=True)
class Captured:
    """What ``write_capture`` wrote: requests per BlockBackend (its name in the iolog), and whether the log had
    timestamps (fio iolog v3) or not (v2)."""

    requests: dict[str, int]
    timed: bool

    @property
    def count(self) -> int:
        return sum(self.requests.values())


def event_states(qmp) -> dict[str, bool]:
    """The blk_co_p* events this QEMU has, and whether each is on now."""
    found = {e["name"]: e.get("state") == "enabled" for e in qmp.execute("trace-event-get-state", name="blk_co_p*")}
    missing = [e for e in EVENTS if e not in found]
    if missing:
        raise QsimError(f"{qmp.name}: this QEMU has no trace event {', '.join(missing)} (QEMU 2.x or later has them)")
    return {e: found[e] for e in EVENTS}


def restore(qmp, before: dict[str, bool]) -> str | None:
    """Put each event back as it was (off, unless it was on before); the problem, if that failed."""
    problem = None
    for event, state in before.items():
        try:
            qmp.execute("trace-event-set-state", name=event, enable=state)
        except QsimError as exc:
            problem = problem or str(exc)
    return problem


def write_capture(log: str, start: int, end: int, device: int | None, out: str) -> Captured:
    """The log's blk_co_p* lines between bytes start and end as a fio iolog (nothing written when there are
    none): v3 with the log's timestamps, v2 without them; one iolog file per BlockBackend."""

    end = whole_lines_end(log, start, end)
    first_line = 1 + count_lines(log, start)
    chunks = list(qemulog.raw_chunks(log, start=start, end=end, first_line=first_line))
    if device is not None:
        chunks = [c._replace(**{k: (None if v is None else v[c.key == device])
                                for k, v in c._asdict().items()}) for c in chunks]
    chunks = [c for c in chunks if len(c.op)]
    if not chunks:
        return Captured({}, False)
    keys = list(dict.fromkeys(k for c in chunks for k in np.unique(c.key).tolist()))
    names = {k: qemulog.show_device(k) for k in keys}
    timed = chunks[0].ticks is not None
    t0 = int(chunks[0].ticks[0]) if timed else 0
    with atomic_output(out, binary=True) as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) if out.endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        prefix = "0 " if timed else ""
        text.write(f"fio version {3 if timed else 2} iolog\n")
        for name in names.values():
            text.write(f"{prefix}{name} add\n")
        for name in names.values():
            text.write(f"{prefix}{name} open\n")
        action = np.array(["read", "write"])
        last = 0
        for c in chunks:
            file_names = np.array([names[k] for k in c.key.tolist()], dtype=object)
            body = file_names + " " + action[(c.op == WRITE).astype(np.intp)].astype(object) + " " \
                + c.offset.astype(str).astype(object) + " " + c.length.astype(str).astype(object)
            if timed:
                usec = c.ticks - t0
                last = int(usec[-1])
                body = usec.astype(str).astype(object) + " " + body
            text.write("\n".join(body.tolist()) + "\n")
        for name in names.values():
            text.write(f"{last if timed else ''}{' ' if timed else ''}{name} close\n")
        text.flush()
        text.detach()
        if stream is not raw:
            stream.close()
    return Captured({names[k]: sum(int((c.key == k).sum()) for c in chunks) for k in keys}, timed)


def whole_lines_end(path: str, start: int, end: int) -> int:
    """``end`` moved back to just after the last complete line (QEMU may be writing one as we look)."""
    with open(path, "rb") as f:
        position = end
        while position > start:
            size = min(1 << 16, position - start)
            f.seek(position - size)
            block = f.read(size)
            cut = block.rfind(b"\n")
            if cut >= 0:
                return position - size + cut + 1
            position -= size
    return start


def count_lines(path: str, end: int) -> int:
    lines, done = 0, 0
    with open(path, "rb") as f:
        while done < end:
            block = f.read(min(32 << 20, end - done))
            if not block:
                break
            lines += block.count(b"\n")
            done += len(block)
    return lines
