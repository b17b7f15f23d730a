"""Where QEMU finds an image's backing files: each name resolved, each format probed and each loop refused the way
QEMU does it. This is the one walker behind everything that follows a chain: replay's loader (``image.
backing_chain``), ``inspect``'s chain listing and ``--map``, and validate's scratch copy."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from .errors import QsimError
from .qcow2 import MAGIC, Qcow2Image, open_image, open_regular

MAX_CHAIN_DEPTH = 64  # far deeper than any real chain; it bounds the walk when names go round in circles


@dataclass(frozen=True)
class BackingLink:
    """One backing file: the ``name`` its parent's header gives, the ``path`` QEMU opens and the ``format`` it opens
    it as (the header's backing format, else probed: qcow2 by its magic, raw otherwise). ``depth`` is 1 for the
    image's own backing file."""

    parent: str
    name: str
    path: str
    format: str
    depth: int


class BackingError(QsimError):
    """A backing file QEMU could not open. ``path`` is where it looked (None when the name is not a local file),
    ``format`` what the parent's header declares (None: probed)."""

    def __init__(self, message: str, path: str | None, format: str | None = None):
        super().__init__(message)
        self.path, self.format = path, format


def backing_path(image_path: str, name: str) -> str:
    """Where QEMU looks for a backing file (bdrv_get_full_backing_filename / path_combine): an absolute name as it
    is, a relative one beside the image that names it -- the folder of the path the image was opened by, symlinks
    not resolved."""
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(image_path), name)


def probe_format(path: str) -> str:
    """QEMU probes a backing file named without a format: qcow2 by its magic, raw otherwise. Regular files only,
    so a FIFO is refused at once instead of blocking."""
    fd = open_regular(path, "backing file")
    try:
        return "qcow2" if os.pread(fd, 4, 0) == MAGIC else "raw"
    finally:
        os.close(fd)


def walk_chain(img: Qcow2Image) -> Iterator[tuple[BackingLink, Qcow2Image | None]]:
    """Every backing file below ``img``, nearest first, with the opened image for a qcow2 layer (None for raw or
    another format, which end the walk: qsim follows qcow2 and raw). BackingError where QEMU would fail to open
    the chain: a protocol name, an unreadable or non-regular file, a loop."""
    seen = {os.path.realpath(img.path)}
    current: Qcow2Image | None = img
    depth = 0
    while current is not None and current.header.backing_file:
        name, declared = current.header.backing_file, current.header.backing_format
        if "://" in name or name.startswith("json:"):
            raise BackingError(f"{current.path}: backing file {name} is not a local file; qsim models local chains",
                               None, declared)
        path = backing_path(current.path, name)
        depth += 1
        if os.path.realpath(path) in seen:
            raise BackingError(f"{current.path}: backing file {path} creates an infinite loop (QEMU: \"Backing "
                               f"file '{name}' creates an infinite loop.\")", path, declared)
        if depth > MAX_CHAIN_DEPTH:
            raise BackingError(f"{current.path}: backing chain deeper than {MAX_CHAIN_DEPTH} images", path, declared)
        seen.add(os.path.realpath(path))
        if not os.access(path, os.R_OK):
            raise BackingError(f"{current.path}: backing file {path} is not readable (QEMU could not open it)", path,
                               declared)
        try:
            fmt = declared or probe_format(path)
            opened = open_image(path) if fmt == "qcow2" else None
            if fmt == "raw":
                os.close(open_regular(path, "backing file"))
        except BackingError:
            raise
        except QsimError as exc:
            raise BackingError(str(exc), path, declared) from None
        yield BackingLink(current.path, name, path, fmt, depth), opened
        current = opened
