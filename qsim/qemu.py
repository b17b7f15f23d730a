"""Drive real qemu-img / qemu-io: build the image, replay a trace with qcow2 cache tracing, count what QEMU did.

Only drives QEMU; ``qsim validate`` is where it meets the model. The counters use ``qsim replay``'s names. QEMU
replays at thousands of requests per second (not millions), so this is for checking, not for sweeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable

from .errors import QsimError
from .imageopts import ImageOptions
from .trace import DISCARD, FLUSH, READ, WRITE, Trace
from .units import format_size

INSTALL_HINT = "apt-get install -y qemu-utils"
MARKER = "read -q 0 0"  # a zero-length read: traced as blk_co_preadv ... bytes 0, no cache activity


QEMU_IO_ENV = "QSIM_QEMU_IO"  # which qemu-io validate runs, when --qemu-io is not given


def find_tool(name: str, qemu_io: str | None = None) -> str:
    """The QEMU tool ``name`` (qemu-io or qemu-img): the one beside ``qemu_io`` (or $QSIM_QEMU_IO) when a qemu-io
    is chosen, so both come from one QEMU build; otherwise the one on PATH."""
    chosen = qemu_io or os.environ.get(QEMU_IO_ENV) or None
    if chosen is not None:
        origin = "--qemu-io" if qemu_io else f"${QEMU_IO_ENV}"
        path = chosen if name == "qemu-io" else os.path.join(os.path.dirname(os.path.abspath(chosen)), name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            what = f"{path} is not an executable" if name == "qemu-io" else \
                f"{name} not found beside {chosen} ({origin}): the image must be made by the same QEMU"
            raise QsimError(f"{origin} {chosen}: {what}", status=2)
        return path
    path = shutil.which(name)
    if path is None:
        raise QsimError(f"{name} not found: qsim validate needs real QEMU ({INSTALL_HINT})", status=2)
    return path


def qemu_version(qemu_io: str | None = None) -> str:
    out = subprocess.run([find_tool("qemu-io", qemu_io), "--version"], capture_output=True, text=True).stdout
    return out.split("\n")[0].replace("qemu-io version ", "").strip()


@dataclass(frozen=True)
class QemuCounts:
    """What the qcow2 cache trace says QEMU did (L2 and refcount caches)."""

    l2_lookups: int
    l2_misses: int
    l2_disk_reads: int
    l2_evictions: int
    l2_writebacks: int
    l2_writebacks_at_close: int
    refcount_lookups: int
    refcount_misses: int
    refcount_disk_reads: int
    refcount_evictions: int
    refcount_writebacks: int
    refcount_writebacks_at_close: int
    image_file_bytes: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def create_image(path: str, virtual_size: int, options: ImageOptions, workdir: str,
                 qemu_io: str | None = None) -> None:
    """``qemu-img create`` with the same options qsim models; backing=on adds a raw backing file (every byte
    'allocated', as qsim assumes)."""
    opts = [f"cluster_size={options.cluster_size}", f"extended_l2={'on' if options.extended_l2 else 'off'}",
            f"refcount_bits={options.refcount_bits}", f"preallocation={options.preallocation}"]
    cmd = [find_tool("qemu-img", qemu_io), "create", "-q", "-f", "qcow2"]
    if options.backing:
        backing = os.path.join(workdir, "backing.raw")
        with open(backing, "wb") as f:
            f.truncate(virtual_size)
        cmd += ["-b", backing, "-F", "raw"]
    if options.fill:
        raise QsimError("validate builds images with qemu-img; fill= states are qsim-only (use preallocation=off or "
                        "metadata, or --image with a real image)", status=2)
    cmd += ["-o", ",".join(opts), path, str(virtual_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise QsimError(f"qemu-img create failed: {proc.stderr.strip()}")


def commands(trace: Trace) -> str:
    """qemu-io commands for the trace (discards are sent too; the image is opened with the discard mode being
    compared, so QEMU ignores them with discard=ignore)."""
    words = {READ: "read -q", WRITE: "write -q -P 0xab", DISCARD: "discard -q"}
    lines = []
    for op, offset, length in zip(trace.op.tolist(), trace.offset.tolist(), trace.length.tolist()):
        lines.append("flush" if op == FLUSH else f"{words[op]} {offset} {length}")
    lines.append(MARKER)
    return "\n".join(lines) + "\n"


def image_opts(image: str, l2_cache_size: int | None, l2_cache_entry_size: int | None, discard: str = "ignore",
               discard_no_unref: bool = False, extra_opts: tuple[str, ...] = (), backing_caches: tuple = ()) -> str:
    """qemu-io's --image-opts for the image: the discard mode always spelled out (qemu-io's own default is unmap,
    a VM's is ignore), cache cleaning off (the tools never clean anyway), the cache options given for the image
    and, as backing.l2-cache-size, backing.backing.l2-cache-size, ..., for the layers below (``backing_caches``:
    CacheSettings, nearest first), and ``extra_opts`` (the scratch copy's data file and backing file)."""
    opts = ["driver=qcow2", "file.driver=file", f"file.filename={image}", "cache-clean-interval=0",
            f"discard={discard}", *extra_opts]
    if discard_no_unref:
        opts.append("discard-no-unref=on")
    for depth, (size, entry) in enumerate(((l2_cache_size, l2_cache_entry_size),) +
                                          tuple((b.l2_cache_size, b.l2_cache_entry_size) for b in backing_caches)):
        prefix = "backing." * depth
        if size is not None:
            opts.append(f"{prefix}l2-cache-size={size}")
        if entry is not None:
            opts.append(f"{prefix}l2-cache-entry-size={entry}")
    return ",".join(opts)


def run_qemu_io(image: str, trace: Trace, l2_cache_size: int | None, l2_cache_entry_size: int | None,
                cache_mode: str, workdir: str, progress: Callable[[int], None] | None = None,
                discard: str = "ignore", discard_no_unref: bool = False, qemu_io: str | None = None,
                extra_opts: tuple[str, ...] = (), backing_caches: tuple = ()) -> QemuCounts:
    """Replay ``trace`` on ``image`` through qemu-io with cache tracing and count the events."""
    log = os.path.join(workdir, "trace.log")
    cmd = [find_tool("qemu-io", qemu_io), "--image-opts", "-t", cache_mode, "-T", "qcow2_cache_*",
           "-T", "blk_co_preadv", "-T", f"file={log}",
           image_opts(image, l2_cache_size, l2_cache_entry_size, discard, discard_no_unref, extra_opts, backing_caches)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(commands(trace))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0 or "qemu-io:" in (err or ""):
        raise QsimError(f"qemu-io failed: {(err or '').strip()[:500]}")
    if progress is not None:
        progress(len(trace))
    counts = parse_cache_trace(log)
    return QemuCounts(**counts, image_file_bytes=_whole_clusters(os.path.getsize(image), image))


def _whole_clusters(file_bytes: int, image: str) -> int:
    """The image file's size rounded up to whole clusters (QEMU may leave the last cluster partly written)."""
    with open(image, "rb") as f:
        header = f.read(24)
    cluster = 1 << int.from_bytes(header[20:24], "big")
    return -(-file_bytes // cluster) * cluster


def parse_cache_trace(log: str) -> dict[str, int]:
    """Count L2 (is_l2_cache 1) and refcount (0) cache events, the same way for both; write-backs after the end
    marker are the close's."""
    c = dict(l2_lookups=0, l2_misses=0, l2_disk_reads=0, l2_evictions=0, l2_writebacks=0, l2_writebacks_at_close=0,
             refcount_lookups=0, refcount_misses=0, refcount_disk_reads=0, refcount_evictions=0,
             refcount_writebacks=0, refcount_writebacks_at_close=0)
    filled: dict[bool, set[str]] = {True: set(), False: set()}
    closing = False
    reads_disk = False  # the last get's read_from_disk: get_read is traced for get_empty too
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if name == "blk_co_preadv":
                if rest.rstrip().endswith("bytes 0 flags 0x0"):
                    closing = True
                continue
            if not name.startswith("qcow2_cache_"):
                continue
            l2 = " is_l2_cache 1" in rest
            cache = "l2_" if l2 else "refcount_"
            if name == "qcow2_cache_get":
                c[cache + "lookups"] += 1
                reads_disk = rest.rstrip().endswith("read_from_disk 1")
            elif name == "qcow2_cache_get_replace_entry":
                c[cache + "misses"] += 1
                index = rest.rsplit(" ", 1)[-1].strip()
                if index in filled[l2]:
                    c[cache + "evictions"] += 1
                filled[l2].add(index)
            elif name == "qcow2_cache_get_read" and reads_disk:
                c[cache + "disk_reads"] += 1
            elif name == "qcow2_cache_entry_flush":
                c[cache + ("writebacks_at_close" if closing else "writebacks")] += 1
    return c


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C (scratch files removed, one line, no traceback)."""


@contextlib.contextmanager
def _sigterm_stops_cleanly():
    """While scratch files exist, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) so ``finally`` cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replay_in_qemu(trace: Trace, virtual_size: int, options: ImageOptions, l2_cache_size: int | None = None,
                   l2_cache_entry_size: int | None = None, cache_mode: str = "writeback",
                   image: str | None = None, progress=None, discard: str = "ignore", discard_no_unref: bool = False,
                   qemu_io: str | None = None, backing_caches: tuple = (), before_run=None) -> QemuCounts:
    """Build the image (or copy ``image``) in a scratch directory, replay, clean up (also on Ctrl-C and SIGTERM).
    ``qemu_io``: which qemu-io (qemu-img from the same folder); default $QSIM_QEMU_IO, else PATH's.

    The user's files are never written: qemu-io runs on a copy of the image and, with an external data file, on
    a copy of the data file (qemu-io writes guest data there); backing files are opened read-only where they are
    (QEMU never writes a backing file it opened read-only), after qsim has checked the whole chain.
    ``before_run`` is called with the path of the image qemu-io will open, just before it does."""
    with _sigterm_stops_cleanly():
        workdir = tempfile.mkdtemp(prefix="qsim-validate-")
        try:
            path = os.path.join(workdir, "image.qcow2")
            extra: tuple[str, ...] = ()
            if image is not None:
                extra = scratch_copy(image, path, workdir)
            else:
                create_image(path, virtual_size, options, workdir, qemu_io)
            if before_run is not None:
                before_run(path)
            return run_qemu_io(path, trace, l2_cache_size, l2_cache_entry_size, cache_mode, workdir, progress,
                               discard, discard_no_unref, qemu_io, extra, backing_caches)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def scratch_copy(image: str, path: str, workdir: str) -> tuple[str, ...]:
    """Copy ``image`` (sparse) to ``path``, and its external data file beside it; check its backing chain (every
    link a readable regular file, no loop). Returns the qemu-io ``--image-opts`` that point QEMU at the copies and,
    read-only, at the original backing file."""
    from .backing import backing_path, walk_chain
    from .qcow2 import open_image

    img = open_image(image)
    extra: list[str] = []
    sparse_copy(image, path)
    if img.has_data_file:
        data_copy = os.path.join(workdir, "data.raw")
        sparse_copy(img.data_file, data_copy)
        extra += ["data-file.driver=file", f"data-file.filename={data_copy}"]
    name = img.header.backing_file
    if name:
        below = os.path.abspath(backing_path(image, name))
        for _ in walk_chain(img):  # every link a readable regular file, no loop: QEMU's errors, before qemu-io
            pass
        extra += [f"backing.file.filename={below}", "backing.file.driver=file", "backing.read-only=on"]
        fmt = img.header.backing_format
        if fmt:
            extra.append(f"backing.driver={fmt}")
    img.close()
    return tuple(extra)


def sparse_copy(source: str, target: str) -> None:
    """Copy a regular file, keeping its holes (SEEK_DATA/SEEK_HOLE), so a sparse 2 TiB image costs what it holds."""
    from .qcow2 import open_regular

    fd_in = open_regular(source)
    try:
        size = os.fstat(fd_in).st_size
        fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd_out, size)
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(fd_in, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd_in, data, os.SEEK_HOLE)
                while data < end:
                    chunk = os.pread(fd_in, min(end - data, 8 << 20), data)
                    if not chunk:
                        break
                    os.pwrite(fd_out, chunk, data)
                    data += len(chunk)
                pos = end
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def describe(options: ImageOptions, virtual_size: int) -> str:
    return (f"{format_size(virtual_size)} cluster_size={format_size(options.cluster_size)} "
            f"extended_l2={'on' if options.extended_l2 else 'off'} preallocation={options.preallocation}"
            f"{' backing=on' if options.backing else ''}")
