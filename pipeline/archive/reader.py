"""Reading an archive: its concatenated gzip members, then tar headers one at a time.

The tar stream is parsed here rather than by `tarfile`, so that every header
field that matters is checked explicitly and no header (pax, GNU long name) is
ever read into memory beyond a small bound.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from pipeline.archive.format import BLOCK, CHUNK, MAX_EXTENDED_HEADER_BYTES, RATIO_GRACE_BYTES
from pipeline.errors import ArchiveRejected

_ZERO_BLOCK = bytes(BLOCK)
_OCTAL = re.compile(rb"^[0-7]*$")
REGULAR = (b"0", b"\0")
TAR_KINDS = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"K": "a link (GNU long link name)",
    b"S": "a sparse file",
    b"M": "a multi-volume continuation",
    b"V": "a volume label",
}


def _nothing() -> None:
    return None


class Inflater:
    """The decompressed bytes of an archive's gzip members, one member at a time, counting bytes in and out.

    Reads the file in bounded chunks and inflates at most `chunk` bytes at a
    time, so memory stays constant whatever the archive's size; with
    `max_ratio`, stops as soon as the output outgrows the input by that factor.
    `next_member` starts each gzip member (the head, then the payload), and
    `read` returns b"" at the end of the current one, so the caller sees the
    archive's structure and can refuse a head and payload in one member, an
    empty member, or anything after the last.

    Every step of the loop consumes input or produces output, or raises, and
    calls `checkpoint` (the step's time limit and cancellation), so no input
    can make it spin.
    """

    def __init__(
        self,
        handle: IO[bytes],
        *,
        limit: int,
        chunk: int = CHUNK,
        max_ratio: float | None = None,
        checkpoint: Callable[[], None] = _nothing,
    ) -> None:
        self._handle = handle
        self._limit = limit
        self._chunk = chunk
        self._max_ratio = max_ratio
        self._checkpoint = checkpoint
        self._decompressor: Any = None  # zlib's decompress object of the current member; None before the first
        self._pending = b""  # compressed bytes read from the file and not yet used by a member
        self._out = b""
        self._offset = 0
        self.members = 0  # gzip members started
        self.consumed = 0  # compressed bytes read from the file
        self.produced = 0  # bytes inflated

    @property
    def position(self) -> int:
        """Compressed bytes used so far: where the next member would start."""
        return self.consumed - len(self._pending)

    def _read_file(self) -> bytes:
        data = self._handle.read(min(self._chunk, self._limit - self.consumed))
        self.consumed += len(data)
        return data

    def next_member(self) -> bool:
        """Start the next gzip member; False when the file has nothing more."""
        if self._decompressor is not None and not self._decompressor.eof:
            raise RuntimeError("the current gzip member has not ended")  # pragma: no cover - a caller's mistake
        if not self._pending:
            self._pending = self._read_file()
        if not self._pending:
            return False
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._out, self._offset = b"", 0
        self.members += 1
        return True

    def at_end(self) -> bool:
        """True when nothing follows the current member in the file."""
        if not self._pending:
            self._pending = self._read_file()
        return not self._pending

    def _inflate_step(self) -> None:
        """Inflate some of the current member: consumes input or produces output, or raises."""
        self._checkpoint()
        decompressor = self._decompressor
        if not self._pending:
            self._pending = self._read_file()
            if not self._pending:
                raise ArchiveRejected(
                    f"the gzip stream ends without its end marker after {self.consumed} bytes (truncated or corrupt)"
                )
        before = len(self._pending)
        try:
            out = decompressor.decompress(self._pending, self._chunk)
        except zlib.error as error:
            raise ArchiveRejected(f"corrupt gzip stream near byte {self.position} of the archive ({error})") from None
        # Once a member has ended, the rest of the input is `unused_data`; CPython may still
        # hold stale input in `unconsumed_tail` then, which must never be fed to it again.
        self._pending = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
        if not out and not decompressor.eof and len(self._pending) >= before:
            raise ArchiveRejected(f"corrupt gzip stream near byte {self.position}: it does not advance")
        self.produced += len(out)
        self._out, self._offset = out, 0
        ratio = self._max_ratio
        if ratio is not None and self.produced > RATIO_GRACE_BYTES and self.produced > ratio * self.consumed:
            raise ArchiveRejected(
                f"expansion ratio above {ratio:g}:1 ({self.produced} bytes out of {self.consumed} compressed; "
                "limits.max_ratio): a decompression bomb?"
            )

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of the current member; b"" at its end."""
        while self._offset >= len(self._out):
            if self._decompressor is None or self._decompressor.eof:
                return b""
            self._inflate_step()
        start = self._offset
        self._offset = min(len(self._out), start + size)
        return self._out[start : self._offset]

    def at_member_end(self) -> bool:
        """True when the current member has no more bytes (inflating up to its end marker to know)."""
        while self._offset >= len(self._out):
            if self._decompressor is None or self._decompressor.eof:
                return True
            self._inflate_step()
        return False

    def read_up_to(self, size: int) -> bytes:
        """`size` bytes, or fewer only at the end of the current member."""
        parts = []
        wanted = size
        while wanted:
            data = self.read(wanted)
            if not data:
                break
            parts.append(data)
            wanted -= len(data)
        return b"".join(parts)

    def read_exact(self, size: int, what: str) -> bytes:
        data = self.read_up_to(size)
        if len(data) < size:
            raise ArchiveRejected(f"the archive ends inside {what} (truncated)")
        return data


@dataclass
class TarHeader:
    name: bytes
    mode: int
    size: int
    mtime: int
    kind: bytes
    link: bytes


def _number(field_bytes: bytes, what: str) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):  # GNU base-256
        if field_bytes[0] == 0xFF:
            raise ArchiveRejected(f"corrupt tar header: negative {what}")
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip(b" \0")
    if not _OCTAL.match(text):
        raise ArchiveRejected(f"corrupt tar header: {what} field {field_bytes!r} is not an octal number")
    return int(text, 8) if text else 0


def _cut(field_bytes: bytes) -> bytes:
    return field_bytes.split(b"\0", 1)[0]


def parse_header(block: bytes) -> TarHeader:
    """One 512-byte ustar/GNU header, checksum verified."""
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != unsigned and stored != unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127):
        raise ArchiveRejected("corrupt tar header: checksum mismatch (not a tar stream, or damaged)")
    name = _cut(block[0:100])
    if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field extends the name
        prefix = _cut(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    return TarHeader(
        name=name,
        mode=_number(block[100:108], "mode"),
        size=_number(block[124:136], "size"),
        mtime=_number(block[136:148], "mtime"),
        kind=block[156:157],
        link=_cut(block[157:257]),
    )


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveRejected("corrupt tar stream: a malformed pax extended header") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveRejected("corrupt tar stream: a malformed pax extended header")
        key, _, value = record[:-1].partition(b"=")
        records[key] = value
        pos += length
    return records


def skip_padding(inflater: Inflater, size: int, what: str) -> None:
    padding = -size % BLOCK
    if padding:
        inflater.read_exact(padding, what)


class TarStream:
    """Tar members from an inflated stream, one header at a time (pax and GNU long names folded in)."""

    def __init__(self, inflater: Inflater) -> None:
        self._inflater = inflater
        self.index = 0

    def _extended(self, header: TarHeader, what: str) -> bytes:
        if header.size > MAX_EXTENDED_HEADER_BYTES:
            raise ArchiveRejected(
                f"member {self.index + 1}: {what} of {header.size} bytes, "
                f"above the {MAX_EXTENDED_HEADER_BYTES}-byte limit"
            )
        data = self._inflater.read_exact(header.size, what)
        skip_padding(self._inflater, header.size, what)
        return data

    def next(self) -> TarHeader | None:
        """The next member, or None at the end-of-archive marker."""
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        for _ in range(4):  # at most a few extended headers before a member
            block = self._inflater.read_exact(BLOCK, "a tar header (the end-of-archive marker is missing)")
            if block == _ZERO_BLOCK:
                second = self._inflater.read(BLOCK)
                if second and second != _ZERO_BLOCK[: len(second)]:
                    raise ArchiveRejected("corrupt tar stream: an empty header block in the middle of the archive")
                return None
            header = parse_header(block)
            if header.kind == b"x":
                pax.update(_parse_pax(self._extended(header, "a pax extended header")))
                continue
            if header.kind == b"g":
                self._extended(header, "a pax global header")
                continue
            if header.kind == b"L":
                long_name = _cut(self._extended(header, "a GNU long name"))
                continue
            self.index += 1
            if long_name is not None:
                header.name = long_name
            if b"path" in pax:
                header.name = pax[b"path"]
            if b"size" in pax:
                try:
                    header.size = int(pax[b"size"])
                except ValueError:
                    raise ArchiveRejected("corrupt tar stream: a pax size that is not a number") from None
            if b"linkpath" in pax:
                header.link = pax[b"linkpath"]
                if header.kind in REGULAR:
                    header.kind = b"2"
            if any(key.startswith(b"GNU.sparse.") for key in pax):
                header.kind = b"S"
            return header
        raise ArchiveRejected("corrupt tar stream: a chain of extended headers without a member")
