"""Drive real qemu-img / qemu-io: build the image, replay a trace with qcow2 cache tracing, count what QEMU did.

Only drives QEMU; ``qsim validate`` is where it meets the model. The counters use ``qsim replay``'s names. QEMU
replays at thousands of requests per second (not millions), so this is for checking, not for sweeps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable

from .errors import QsimError
from .imageopts import ImageOptions
from .trace import DISCARD, FLUSH, READ, WRITE, Trace
from .units import format_size

INSTALL_HINT = "apt-get install -y qemu-utils"
MARKER = "read -q 0 0"  # a zero-length read: traced as blk_co_preadv ... bytes 0, no cache activity


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise QsimError(f"{name} not found: qsim validate needs real QEMU ({INSTALL_HINT})", status=2)
    return path


def qemu_version() -> str:
    out = subprocess.run([find_tool("qemu-io"), "--version"], capture_output=True, text=True).stdout
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
    image_file_bytes: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def create_image(path: str, virtual_size: int, options: ImageOptions, workdir: str) -> None:
    """``qemu-img create`` with the same options qsim models; backing=on adds a raw backing file (every byte
    'allocated', as qsim assumes)."""
    opts = [f"cluster_size={options.cluster_size}", f"extended_l2={'on' if options.extended_l2 else 'off'}",
            f"refcount_bits={options.refcount_bits}", f"preallocation={options.preallocation}"]
    cmd = [find_tool("qemu-img"), "create", "-q", "-f", "qcow2"]
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
    """qemu-io commands for the trace (discards are sent too; QEMU ignores them without discard=unmap)."""
    words = {READ: "read -q", WRITE: "write -q -P 0xab", DISCARD: "discard -q"}
    lines = []
    for op, offset, length in zip(trace.op.tolist(), trace.offset.tolist(), trace.length.tolist()):
        lines.append("flush" if op == FLUSH else f"{words[op]} {offset} {length}")
    lines.append(MARKER)
    return "\n".join(lines) + "\n"


def run_qemu_io(image: str, trace: Trace, l2_cache_size: int | None, l2_cache_entry_size: int | None,
                cache_mode: str, workdir: str, progress: Callable[[int], None] | None = None,
                backing_caches: tuple = (), extra_options: list[str] | None = None) -> QemuCounts:
    """Replay ``trace`` on ``image`` through qemu-io with cache tracing and count the events. ``backing_caches``:
    CacheSettings of the layers below, nearest first, passed as backing.l2-cache-size, backing.backing.... ."""
    opts = ["driver=qcow2", "file.driver=file", f"file.filename={image}", "cache-clean-interval=0",
            *(extra_options or [])]
    for depth, settings in enumerate(((l2_cache_size, l2_cache_entry_size),) +
                                     tuple((b.l2_cache_size, b.l2_cache_entry_size) for b in backing_caches)):
        prefix = "backing." * depth
        if settings[0] is not None:
            opts.append(f"{prefix}l2-cache-size={settings[0]}")
        if settings[1] is not None:
            opts.append(f"{prefix}l2-cache-entry-size={settings[1]}")
    log = os.path.join(workdir, "trace.log")
    cmd = [find_tool("qemu-io"), "--image-opts", "-t", cache_mode, "-T", "qcow2_cache_*", "-T", "blk_co_preadv",
           "-T", f"file={log}", ",".join(opts)]
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
    """Count L2 (is_l2_cache 1) and refcount (0) cache events; write-backs after the end marker are the close's."""
    c = dict(l2_lookups=0, l2_misses=0, l2_disk_reads=0, l2_evictions=0, l2_writebacks=0, l2_writebacks_at_close=0,
             refcount_lookups=0, refcount_misses=0)
    filled: set[str] = set()
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
            if name == "qcow2_cache_get":
                c["l2_lookups" if l2 else "refcount_lookups"] += 1
                reads_disk = rest.rstrip().endswith("read_from_disk 1")
            elif name == "qcow2_cache_get_replace_entry":
                if l2:
                    c["l2_misses"] += 1
                    index = rest.rsplit(" ", 1)[-1].strip()
                    if index in filled:
                        c["l2_evictions"] += 1
                    filled.add(index)
                else:
                    c["refcount_misses"] += 1
            elif name == "qcow2_cache_get_read" and l2 and reads_disk:
                c["l2_disk_reads"] += 1
            elif name == "qcow2_cache_entry_flush" and l2:
                c["l2_writebacks_at_close" if closing else "l2_writebacks"] += 1
    return c


def replay_in_qemu(trace: Trace, virtual_size: int, options: ImageOptions, l2_cache_size: int | None = None,
                   l2_cache_entry_size: int | None = None, cache_mode: str = "writeback",
                   image: str | None = None, progress=None, backing_caches: tuple = ()) -> QemuCounts:
    """Build the image (or copy ``image``: the original is never touched) in a scratch directory, replay, clean up."""
    workdir = tempfile.mkdtemp(prefix="qsim-validate-")
    try:
        path = os.path.join(workdir, "image.qcow2")
        extra: list[str] = []
        if image is not None:
            shutil.copyfile(image, path)
            extra = backing_options(image)
        else:
            create_image(path, virtual_size, options, workdir)
        return run_qemu_io(path, trace, l2_cache_size, l2_cache_entry_size, cache_mode, workdir, progress,
                           backing_caches, extra)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def backing_options(image: str) -> list[str]:
    """--image-opts naming the backing file of ``image`` by the path QEMU resolves it to, so that a scratch copy of
    the image opens the original chain (QEMU opens backing files read-only; the layers below resolve their own
    names from where they are)."""
    from .image import backing_chain
    from .qcow2 import open_image

    chain = backing_chain(open_image(image))
    if not chain:
        return []
    return [f"backing.driver={chain[0].format}", "backing.file.driver=file",
            f"backing.file.filename={os.path.abspath(chain[0].path)}"]


def describe(options: ImageOptions, virtual_size: int) -> str:
    return (f"{format_size(virtual_size)} cluster_size={format_size(options.cluster_size)} "
            f"extended_l2={'on' if options.extended_l2 else 'off'} preallocation={options.preallocation}"
            f"{' backing=on' if options.backing else ''}")
