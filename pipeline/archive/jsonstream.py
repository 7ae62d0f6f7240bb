"""A strict, streaming reader of JSON text, driven by the schema the caller expects.

manifest.json and manifest.sig are read with it. The caller asks for what its
schema wants next (`text`, `integer`, `number`, the `keys` of an object, the
`items` of a list), so nesting is bounded by the schema and never by the
input: a list where text belongs is refused at its first byte, not parsed.
Values have their exact JSON type (true is not a number), numbers are made of
ASCII digits and must be finite, text must be valid UTF-8 without unpaired
surrogates. Input arrives in chunks; only the token being read is held, so a
document of many megabytes never sits in memory whole.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator

from pipeline.errors import ArchiveRejected

_SPACE = re.compile(rb"[ \t\n\r]*")
_SPACE_BYTES = frozenset(b" \t\n\r")
_TEXT_BODY = re.compile(rb'(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
_VALUE_STARTS = frozenset('"{[-0123456789')
_MAX_NUMBER_CHARACTERS = 40
_QUOTE, _BACKSLASH = 0x22, 0x5C


def _describe(byte: int) -> str:
    """What a value starting with `byte` is, in an operator's words."""
    if byte < 0:
        return "missing (the text ends)"
    char = chr(byte)
    if char == '"':
        return "text"
    if char == "{":
        return "an object"
    if char == "[":
        return "a list"
    if char == "t":
        return "true"
    if char == "f":
        return "false"
    if char == "n":
        return "null"
    if char == "-" or char.isdigit():
        return "a number"
    return f"the character {char!r}" if 32 < byte < 127 else f"the byte 0x{byte:02x}"


class JsonStream:
    """One JSON document from an iterator of byte chunks; every problem is an ArchiveRejected from `problem`."""

    def __init__(self, chunks: Iterator[bytes], problem: Callable[[str], ArchiveRejected]) -> None:
        self._chunks = chunks
        self._problem = problem
        self._buffer = bytearray()
        self._pos = 0
        self._base = 0  # offset of _buffer[0] in the document

    # -- bytes ------------------------------------------------------------------
    def _more(self) -> bool:
        """Append the next chunk, dropping what was read; False at the end of the input."""
        chunk = next(self._chunks, b"")
        if not chunk:
            return False
        del self._buffer[: self._pos]
        self._base += self._pos
        self._pos = 0
        self._buffer += chunk
        return True

    def _peek(self) -> int:
        """The next byte that is not white space (not consumed), or -1 at the end."""
        if self._pos < len(self._buffer) and self._buffer[self._pos] not in _SPACE_BYTES:
            return self._buffer[self._pos]
        while True:
            match = _SPACE.match(self._buffer, self._pos)
            assert match is not None  # the pattern matches the empty string
            self._pos = match.end()
            if self._pos < len(self._buffer):
                return self._buffer[self._pos]
            if not self._more():
                return -1

    def _syntax(self, expected: str) -> ArchiveRejected:
        return self._problem(
            f"not valid JSON at byte {self._base + self._pos}: expected {expected}, found {_describe(self._peek())}"
        )

    def _take(self, char: str, expected: str) -> None:
        if self._peek() != ord(char):
            raise self._syntax(expected)
        self._pos += 1

    # -- values -----------------------------------------------------------------
    def kind(self) -> str:
        """What the next value is ("text", "a number", "an object", ...), without reading it."""
        return _describe(self._peek())

    def is_null(self) -> bool:
        """Consume a `null` and say so; anything else is left in place."""
        if self._peek() != ord("n"):
            return False
        self._literal()
        return True

    def _wrong(self, where: str, expected: str) -> ArchiveRejected:
        """A value of another type than `expected`; or, when what follows is no JSON value at all, say so."""
        byte = self._peek()
        if byte in _LITERALS:
            word = _LITERALS[byte]
            while len(self._buffer) - self._pos < len(word) and self._more():
                pass
            valid = self._buffer[self._pos : self._pos + len(word)] == word
        else:
            valid = byte >= 0 and chr(byte) in _VALUE_STARTS
        if not valid:
            return self._problem(
                f"{where}: not valid JSON at byte {self._base + self._pos}: expected {expected}, "
                f"found {_describe(byte) if byte not in _LITERALS else f'the character {chr(byte)!r}'}"
            )
        return self._problem(f"{where} is {_describe(byte)}, expected {expected}")

    def _literal(self) -> bool | None:
        word = _LITERALS[self._peek()]
        while len(self._buffer) - self._pos < len(word) and self._more():
            pass
        if self._buffer[self._pos : self._pos + len(word)] != word:
            raise self._syntax("true, false or null")
        self._pos += len(word)
        return {b"true": True, b"false": False, b"null": None}[word]

    def boolean(self, where: str, expected: str = "true or false") -> bool:
        if self._peek() not in (ord("t"), ord("f")):
            raise self._wrong(where, expected)
        return bool(self._literal())

    def text(self, where: str, expected: str = "text") -> str:
        """A JSON string, unescaped; valid UTF-8, no unpaired surrogate."""
        if self._peek() != _QUOTE:
            raise self._wrong(where, expected)
        scan = self._pos + 1
        while True:
            match = _TEXT_BODY.match(self._buffer, scan)
            assert match is not None  # the pattern matches the empty string
            scan = match.end()
            if scan < len(self._buffer):
                byte = self._buffer[scan]
                if byte == _QUOTE:
                    break
                if byte != _BACKSLASH or len(self._buffer) - scan >= 6:  # not an escape cut by the chunk's end
                    what = "an invalid escape" if byte == _BACKSLASH else f"the control character 0x{byte:02x}"
                    raise self._problem(f"{where}: {what} in text at byte {self._base + scan}")
            shift = self._pos
            if not self._more():
                raise self._problem(f"{where}: the text is not closed (the document ends inside it)")
            scan -= shift
        raw = bytes(self._buffer[self._pos + 1 : scan])
        self._pos = scan + 1
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._problem(f"{where}: the text is not valid UTF-8") from None
        if b"\\" in raw:
            value = json.loads('"' + value + '"')
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise self._problem(f"{where}: the text has an unpaired surrogate escape (\\ud800-\\udfff)") from None
        return value

    def _number_token(self, where: str, expected: str) -> bytes:
        byte = self._peek()
        if byte != ord("-") and not ord("0") <= byte <= ord("9"):
            raise self._wrong(where, expected)
        # Buffer more than the longest number allowed, so that a chunk's edge cannot cut one short.
        while len(self._buffer) - self._pos <= _MAX_NUMBER_CHARACTERS and self._more():
            pass
        match = _NUMBER.match(self._buffer, self._pos)
        if match is None:
            raise self._syntax("a number")
        if match.end() - self._pos >= _MAX_NUMBER_CHARACTERS:
            raise self._problem(f"{where}: a number of {_MAX_NUMBER_CHARACTERS} characters or more")
        token = bytes(match.group())
        self._pos = match.end()
        return token

    def integer(self, where: str, expected: str, *, maximum: int) -> int:
        """A whole number from 0 to `maximum`, written without fraction or exponent."""
        token = self._number_token(where, expected)
        shown = token.decode("ascii")
        if not token.isdigit():
            raise self._problem(f"{where} is {shown}, expected {expected}")
        value = int(token)
        if value > maximum:
            raise self._problem(f"{where} is {shown}, above the largest allowed ({maximum})")
        return value

    def number(self, where: str, expected: str, *, maximum: float) -> int | float:
        """A finite number from 0 to `maximum` (an int when written as one)."""
        token = self._number_token(where, expected)
        shown = token.decode("ascii")
        value: int | float = int(token) if token.lstrip(b"-").isdigit() else float(token)
        if not math.isfinite(value):
            raise self._problem(f"{where} is {shown}, which is not a finite number")
        if not 0 <= value <= maximum:
            raise self._problem(f"{where} is {shown}, expected {expected} from 0 to {maximum:g}")
        return value

    # -- containers -----------------------------------------------------------
    def match(self, pattern: re.Pattern[bytes], lookahead: int) -> re.Match[bytes] | None:
        """A fast path: `pattern` matched at the current position (at least `lookahead` bytes buffered), consumed."""
        while len(self._buffer) - self._pos < lookahead and self._more():
            pass
        found = pattern.match(self._buffer, self._pos)
        if found is not None:
            self._pos = found.end()
        return found

    def begin_object(self, where: str, expected: str = "an object") -> bool:
        """Consume an object's '{'; False when the object is empty (its '}' consumed too)."""
        if self._peek() != ord("{"):
            raise self._wrong(where, expected)
        self._pos += 1
        if self._peek() == ord("}"):
            self._pos += 1
            return False
        return True

    def key(self, where: str) -> str:
        """The next key of an object and its ':'; the caller reads the value next."""
        if self._peek() != _QUOTE:
            raise self._syntax(f"a key in double quotes in {where or 'the object'}")
        key = self.text(f"a key of {where or 'the object'}")
        self._take(":", "':' after a key")
        return key

    def more_keys(self, where: str) -> bool:
        """After a value: True for ',' (another key follows), False for the closing '}'."""
        if self._peek() == ord(","):
            self._pos += 1
            return True
        self._take("}", f"',' or '}}' in {where or 'the object'}")
        return False

    def keys(self, where: str, expected: str = "an object") -> Iterator[str]:
        """Each key of an object, its ':' consumed: the caller reads the value before asking for the next key."""
        if not self.begin_object(where, expected):
            return
        while True:
            yield self.key(where)
            if not self.more_keys(where):
                return

    def items(self, where: str, expected: str = "a list") -> Iterator[int]:
        """The index of each item of a list: the caller reads the item before asking for the next."""
        if self._peek() != ord("["):
            raise self._wrong(where, expected)
        self._pos += 1
        if self._peek() == ord("]"):
            self._pos += 1
            return
        index = 0
        while True:
            yield index
            if self._peek() == ord(","):
                self._pos += 1
                index += 1
                continue
            self._take("]", f"',' or ']' in {where}")
            return

    def finish(self) -> None:
        """Nothing but white space may follow the document."""
        if self._peek() != -1:
            raise self._problem(f"data after the end of the JSON text at byte {self._base + self._pos}")
