"""Fixtures of the end-to-end tests beyond tests/conftest.py: real local accounts for the console."""

from __future__ import annotations

from tests.console_helpers import accounts

__all__ = ["accounts"]
