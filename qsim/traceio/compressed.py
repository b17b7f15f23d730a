"""Compressed trace files, gzip or zstd (known by their first bytes, never by name), decoded in bounded pieces.

``decoder`` is the one place that turns a compressed file into its bytes; ``textfile.open_binary`` (every reader
opens files through it) calls it. Memory stays bounded whatever the ratio: gzip decodes into the caller's buffer;
zstd is fed to its decoder a few whole blocks at a time (a zstd block decodes to at most 128 KiB, so no input, a
"zstd bomb" included, decodes to more than ``ZSTD_BLOCKS_PER_CALL`` x 128 KiB at once). Walking the blocks also
tells a file that ends inside a frame (zstandard's own readers end quietly there, which would cut a trace short
without a word).
"""

from __future__ import annotations

import gzip
import io

from ..errors import QsimError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_HINT = "pip install zstandard (or pip install 'qsim[zstd]')"
ZSTD_BLOCK_BYTES = 128 << 10  # the largest a zstd block decodes to (RFC 8878, Block_Maximum_Size)
ZSTD_BLOCKS_PER_CALL = 32  # at most 4 MiB decoded per call into zstandard
ZSTD_READ_BYTES = 1 << 20  # compressed bytes read from the file at a time


def kind(head: bytes) -> str | None:
    """'gzip', 'zstd' or None, from a file's first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def decoder(path: str, raw, head: bytes):
    """A readable binary stream of ``raw``'s decoded bytes (``raw`` at offset 0), or ``raw`` itself when ``head``
    shows no compression."""
    found = kind(head)
    if found == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if found == "zstd":
        try:
            import zstandard
        except ImportError:
            raise QsimError(f"{path}: zstd-compressed; reading it needs the zstandard package: {ZSTD_HINT}") from None
        return io.BufferedReader(ZstdReader(path, raw, zstandard), 1 << 20)
    return raw


class ZstdReader(io.RawIOBase):
    """A zstd file's decoded bytes, frame after frame (skippable frames skipped), fed to zstandard a few whole
    blocks at a time; QsimError when the file ends inside a frame or a frame is damaged."""

    def __init__(self, path: str, raw, zstandard):
        self.path, self.raw, self.zstandard = path, raw, zstandard
        self.data = b""  # compressed bytes read, from ``self.at`` on not yet walked
        self.at = 0
        self.state = "magic"  # magic, header, block, checksum
        self.checksum = False
        self.dobj = None
        self.pending = memoryview(b"")
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self.pending) and not self.eof:
            self.pending = memoryview(self._decode_some())
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _need(self, size: int) -> bool:
        """Whether ``size`` unwalked bytes are at hand (reading more from the file as needed)."""
        while len(self.data) - self.at < size:
            block = self.raw.read(max(ZSTD_READ_BYTES, size))
            if not block:
                return False
            self.data = self.data[self.at:] + block
            self.at = 0
        return True

    def _take(self, size: int) -> bytes:
        piece = self.data[self.at:self.at + size]
        self.at += size
        return piece

    def _damaged(self, problem: str) -> QsimError:
        return QsimError(f"{self.path}: damaged zstd data ({problem})")

    def _decode_some(self) -> bytes:
        """Walk up to ZSTD_BLOCKS_PER_CALL blocks and decode them; b'' with ``eof`` set at a clean end."""
        feed, blocks = [], 0
        while blocks < ZSTD_BLOCKS_PER_CALL:
            if self.state == "magic":
                if not self._need(1):
                    if len(self.data) > self.at:
                        raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
                    self.eof = True
                    break
                if not self._need(4):
                    raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
                magic = int.from_bytes(self.data[self.at:self.at + 4], "little")
                if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: magic, 4-byte size, content
                    if not self._need(8):
                        raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
                    size = int.from_bytes(self.data[self.at + 4:self.at + 8], "little")
                    self.at += 8
                    self._skip(size)
                    continue
                if self.data[self.at:self.at + 4] != ZSTD_MAGIC:
                    raise self._damaged(f"no frame magic at a frame start: {self.data[self.at:self.at + 4].hex()}")
                self.state = "header"
            if self.state == "header":
                header = self._frame_header()
                self.dobj = self.zstandard.ZstdDecompressor().decompressobj()
                feed.append(header)
                self.state = "block"
            if self.state == "block":
                if not self._need(3):
                    raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
                bits = int.from_bytes(self.data[self.at:self.at + 3], "little")
                last, block_type, size = bits & 1, (bits >> 1) & 3, bits >> 3
                if block_type == 3:
                    raise self._damaged("a block of the reserved type 3")
                if size > ZSTD_BLOCK_BYTES:
                    raise self._damaged(f"a block of {size} bytes, above the 128 KiB limit")
                body = 1 if block_type == 1 else size
                if not self._need(3 + body):
                    raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
                feed.append(self._take(3 + body))
                blocks += 1
                if last:
                    self.state = "checksum" if self.checksum else "end"
            if self.state == "checksum":
                if not self._need(4):
                    raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
                feed.append(self._take(4))
                self.state = "end"
            if self.state == "end":
                out = self._feed(b"".join(feed))
                if not self.dobj.eof:
                    raise self._damaged("a frame that its decoder does not see end")
                self.dobj, self.state = None, "magic"
                return out
        return self._feed(b"".join(feed)) if feed else b""

    def _frame_header(self) -> bytes:
        """The frame's magic and header (RFC 8878 3.1.1.1), noting whether a content checksum follows the blocks."""
        if not self._need(5):
            raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
        descriptor = self.data[self.at + 4]
        single = (descriptor >> 5) & 1
        fcs = (0, 2, 4, 8)[descriptor >> 6] or single
        size = 4 + 1 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs
        if descriptor & 0x08:
            raise self._damaged("a frame header with its reserved bit set")
        self.checksum = bool(descriptor & 0x04)
        if not self._need(size):
            raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
        return self._take(size)

    def _skip(self, size: int) -> None:
        while size:
            if not self._need(1):
                raise QsimError(f"{self.path}: the zstd data ends inside a frame (truncated file?)")
            step = min(size, len(self.data) - self.at)
            self.at += step
            size -= step

    def _feed(self, data: bytes) -> bytes:
        try:
            return self.dobj.decompress(data)
        except self.zstandard.ZstdError as exc:
            raise self._damaged(str(exc)) from None

    def close(self) -> None:
        self.raw.close()
        super().close()
