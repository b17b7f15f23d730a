"""Timed replays in a real QEMU: ``qemu-system-x86_64 -M none -S`` with the image as a drive, driven over QMP.

qemu-io never runs the qcow2 cache cleaner: the cleaning timer is on QEMU_CLOCK_VIRTUAL, which starts disabled and
only a running VM enables (vm_start). A machine without a guest (``-M none``) runs once it gets ``cont``, so its
virtual clock, and the timer armed at open, start then: the first tick comes ``interval`` seconds after ``cont``.
Each request goes at its (scaled) timestamp through QMP ``human-monitor-command`` ``qemu-io d0 "..."``: the HMP
command runs qemu-io's own code on the drive's BlockBackend, so the qcow2 cache trace reads as qemu-io's does
(``qsim.qemu.parse_cache_trace``).

Timing: the trace's times are divided by ``time_scale`` (a trace recorded against the 600 s default replays with
``cache-clean-interval=1`` and ``time_scale=600``). Ticks drift a few milliseconds late (the timer re-arms from its
callback), and each HMP command takes about a millisecond, so a replay is deterministic only when its requests
come in short bursts well away from every tick (the tests keep them a third of an interval away).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .errors import QsimError
from .imageopts import ImageOptions
from .qmp import QmpSocket
from .qemu import MARKER, create_image, parse_cache_trace, _whole_clusters
from .trace import DISCARD, FLUSH, READ, WRITE, Trace

INSTALL_HINT = "apt-get install -y qemu-system-x86"
WORDS = {READ: "read -q", WRITE: "write -q -P 0xab", DISCARD: "discard -q"}


@dataclass(frozen=True)
class TimedRun:
    """What a timed replay counted (``parse_cache_trace``'s names), how late the requests went at worst (seconds
    after their scheduled time) and when each went (seconds after ``cont``, on the replay's scaled clock)."""

    counts: dict
    worst_lateness: float
    sent: tuple[float, ...] = ()


def drive_options(image: str, cache_clean_interval: int, l2_cache_size: int | None = None,
                  l2_cache_entry_size: int | None = None, refcount_cache_size: int | None = None,
                  cache_size: int | None = None, cache_mode: str = "writeback") -> str:
    opts = [f"if=none,id=d0,format=qcow2,file={image}", f"cache={cache_mode}",
            f"cache-clean-interval={cache_clean_interval}", "discard=ignore"]
    for name, value in (("l2-cache-size", l2_cache_size), ("l2-cache-entry-size", l2_cache_entry_size),
                        ("refcount-cache-size", refcount_cache_size), ("cache-size", cache_size)):
        if value is not None:
            opts.append(f"{name}={value}")
    return ",".join(opts)


def find_qemu_system() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise QsimError(f"qemu-system-x86_64 not found ({INSTALL_HINT})", status=2)
    return path


def default_accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def system_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.split("\n")[0].replace("QEMU emulator version ", "").strip() + " (qemu-system)"


def run_timed(binary: str, image: str, trace: Trace, cache_clean_interval: int = 1, time_scale: float | None = 1.0,
              workdir: str | None = None, accel: str | None = None, **cache_options) -> TimedRun:
    """Replay ``trace`` on ``image`` in ``binary`` (a qemu-system), request i at ``trace.time[i] / time_scale``
    seconds after ``cont`` (``time_scale`` None: one after the other, as fast as QMP goes), with cache tracing;
    count what the trace says. ``accel``: kvm when /dev/kvm is usable, else tcg."""
    if trace.time is None and time_scale is not None:
        raise QsimError("a timed replay needs a trace with timestamps")
    accel = accel or default_accel()
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="qsim-timed-")
    log = os.path.join(workdir, "trace.log")
    qmp_path = os.path.join(workdir, "qmp.sock")
    cmd = [binary, "-M", "none", "-accel", accel, "-S", "-nodefaults", "-display", "none", "-no-user-config",
           "-qmp", f"unix:{qmp_path},server=on,wait=off", "-trace", "enable=qcow2_cache_*",
           "-trace", "enable=blk_co_preadv", "-trace", f"file={log}",
           "-drive", drive_options(image, cache_clean_interval, **cache_options)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    qmp = None
    worst = 0.0
    sent = []
    try:
        qmp = QmpSocket(qmp_path, timeout=120, wait_seconds=20)
        lines = [("flush" if op == FLUSH else f"{WORDS[op]} {offset} {length}")
                 for op, offset, length in zip(trace.op.tolist(), trace.offset.tolist(), trace.length.tolist())]
        due = [0.0] * len(lines) if time_scale is None else (trace.time / time_scale).tolist()
        qmp.execute("cont")
        start = time.monotonic()
        for line, at in zip(lines, due):
            wait = start + at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            now = time.monotonic() - start
            worst = max(worst, now - at)
            sent.append(now)
            qmp.hmp(f'qemu-io d0 "{line}"')
        qmp.hmp(f'qemu-io d0 "{MARKER}"')
        qmp.execute("quit")
        _, err = proc.communicate(timeout=30)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if qmp is not None:
            qmp.close()
    if proc.returncode != 0:
        raise QsimError(f"qemu-system failed: {(err or '').strip()[:500]}")
    counts = parse_cache_trace(log)
    counts["image_file_bytes"] = _whole_clusters(os.path.getsize(image), image)
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return TimedRun(counts, worst, tuple(sent))


def replay_timed(binary: str, trace: Trace, virtual_size: int, options: ImageOptions, before_run=None,
                 **kwargs) -> TimedRun:
    """A scratch image made by qemu-img create (the one on PATH: the format does not depend on its version) with
    ``options``, replayed by ``run_timed``, cleaned up. ``before_run`` is called with the image's path first."""
    workdir = tempfile.mkdtemp(prefix="qsim-timed-")
    try:
        path = os.path.join(workdir, "image.qcow2")
        create_image(path, virtual_size, options, workdir)
        if before_run is not None:
            before_run(path)
        return run_timed(binary, path, trace, workdir=workdir, **kwargs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
