"""Text for an operator's terminal.

File names and reasons come from uploaders, archives and the platform's data:
printed raw, a name holding an escape sequence, a carriage return, a newline
or a bidirectional override could clear the screen, forge a line of `status`
or reorder what the operator reads. Every name or reason that reaches a
terminal goes through `printable`; JSON output is left to `json.dumps`, whose
default (ensure_ascii) already escapes all of these.
"""

from __future__ import annotations

SURROGATE_ESCAPES = range(0xDC80, 0xDD00)  # undecodable bytes of a file name (os.fsdecode's surrogateescape)


def _escape(char: str) -> str:
    code = ord(char)
    if code in SURROGATE_ESCAPES:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: object) -> str:
    """`text` with every character a terminal would act on (controls, C1, bidi and other format
    characters, line and paragraph separators, undecodable bytes) written as a Python-style escape.

    One line in, one line out: a newline in a name is shown as `\\x0a`.
    """
    value = str(text)
    if value.isprintable():
        return value
    return "".join(char if char.isprintable() else _escape(char) for char in value)
