"""pipeline.terminal.printable: what a terminal would act on is shown, never obeyed."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.terminal import printable


@pytest.mark.parametrize(
    "name",
    ["gts.3.19.274.tgz", "Bücher-Übersicht → 2026.tgz", "日本語.tgz", "a b.tgz", "gts.1.0.1.tgz\\x1b"],
)
def test_ordinary_names_are_printed_as_they_are(name: str) -> None:
    assert printable(name) == name


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("gts\x1b[2J\x1b[H.tgz", "gts\\x1b[2J\\x1b[H.tgz"),  # clear the screen
        ("gts\r\x1b[Kfake.tgz", "gts\\x0d\\x1b[Kfake.tgz"),  # go back and overwrite the line
        ("a.tgz\nrun 9: succeeded", "a.tgz\\x0arun 9: succeeded"),  # forge a line
        ("\x1b]0;title\x07x.tgz", "\\x1b]0;title\\x07x.tgz"),  # set the window title (OSC ... BEL)
        ("gts\x9b31m.tgz", "gts\\x9b31m.tgz"),  # C1 control sequence introducer
        ("gts.\u202egpj.tgz", "gts.\\u202egpj.tgz"),  # right-to-left override: reads as gts.tgz.jpg
        ("a\u2066b\u2069c\u200fd", "a\\u2066b\\u2069c\\u200fd"),  # bidi isolates and marks
        ("line\u2028sep\u2029par", "line\\u2028sep\\u2029par"),  # Unicode line and paragraph separators
        ("tab\there\x7f", "tab\\x09here\\x7f"),
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("tag\U000e0041", "tag\\U000e0041"),  # invisible tag characters
    ],
)
def test_what_a_terminal_would_act_on_is_escaped(name: str, shown: str) -> None:
    assert printable(name) == shown


def test_undecodable_bytes_of_a_file_name_are_shown_as_bytes() -> None:
    # Given a name that is not UTF-8, as os.listdir returns it (surrogate escapes)
    name = os.fsdecode(b"gts.1.0.1\xff\x1b[31m.tgz")
    # Then it prints without an encoding error, its bytes shown
    assert printable(name) == "gts.1.0.1\\xff\\x1b[31m.tgz"
    printable(name).encode("utf-8")


def test_non_strings_are_printed_through_str() -> None:
    assert printable(ValueError("bad\x1bname")) == "bad\\x1bname"
    assert printable(None) == "None"


@given(st.text())
def test_the_result_is_one_printable_line_whatever_the_input(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert printable(shown) == shown  # escaping twice changes nothing more
    if text.isprintable():
        assert shown == text
