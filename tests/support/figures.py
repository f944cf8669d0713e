"""Figures measured in this test session (VM boot times, measured CPU shares, goodput, ...), printed
in the terminal summary by tests/conftest.py: ``FIGURES[name] = value``."""

from __future__ import annotations

FIGURES: dict[str, object] = {}
