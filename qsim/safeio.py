"""Writing the files a user names, safely: through a temporary file and a rename, never through a link.

Every file qsim writes (tables, figures, traces, patched XML, result parts) goes through ``atomic_output``:
- the bytes land in a temporary file beside the target and replace it with one ``os.replace``, so a reader (or a
  crash, or Ctrl-C) sees the old file or the whole new one, never half of it;
- a target that is a symbolic link, or exists and is not a regular file (a FIFO, a device, a folder), is refused:
  writing through it would change a file the user did not name, and opening a FIFO would block;
- an existing qcow2 image is refused too: no qsim output is ever a qcow2 image, so that name is a slip;
- any other existing regular file is replaced, as ``cp`` or ``qemu-img convert -O`` replace theirs, keeping its
  permission bits.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator

from .errors import QsimError

QCOW2_MAGIC = b"QFI\xfb"


def check_output_path(path: str) -> None:
    """Refuse a target qsim must not write (see the module note); QsimError names the path and the reason."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise QsimError(f"{path}: cannot write: folder {parent} does not exist") from None
        return
    except OSError as exc:
        raise QsimError(f"{path}: cannot write: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise QsimError(f"{path}: is a symbolic link; qsim does not write through links (name the real file)")
    if not stat.S_ISREG(st.st_mode):
        raise QsimError(f"{path}: exists and is not a regular file; qsim writes only regular files")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head == QCOW2_MAGIC:
        raise QsimError(f"{path}: is a qcow2 image; qsim never writes over an image (choose another name)")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary file name beside ``path`` (the file exists, empty, with ``path``'s permission bits); on success
    it replaces ``path`` in one rename, on any error (or KeyboardInterrupt) it is removed and ``path`` is untouched.
    For writers that want a name (matplotlib, pyarrow): the name ends in ``.tmp``, so pass the format explicitly,
    e.g. ``savefig(tmp, format="png")``."""
    check_output_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(path: str, binary: bool = True) -> Iterator:
    """``atomic_path``, opened: a file object to write ``path``'s new content to (text is UTF-8, newlines as
    written)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as f:
            yield f
