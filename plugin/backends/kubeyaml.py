"""Read a kubeconfig without importing PyYAML, for the block-style YAML that kubectl, kind and most
tools write; anything else is left to PyYAML.

Why: ``import yaml`` costs about 14 ms here (its scanner and resolver compile dozens of regular
expressions at import), a fifth of ``kubectl-chaos``'s whole start-up, and the plugin reads a
kubeconfig on every cluster-mode call. A kubeconfig as ``kubectl config`` writes it (go-yaml's
block style) is a small subset of YAML: nested block mappings and sequences, plain and quoted
scalars, ``{}`` and ``[]``.

:func:`load` returns exactly what ``yaml.safe_load`` returns for such a text, or raises
:class:`Unsupported` as soon as it meets anything outside the subset (anchors, tags, flow
collections, block scalars, escapes, comments after a value, multi-line scalars, plain scalars
that YAML 1.1 would read as a float, a timestamp, an octal or sexagesimal number, ...). The caller
then parses the text with PyYAML, so a valid file is never read differently and an invalid one gets
PyYAML's error. tests/unit/test_kubeyaml.py checks both against PyYAML on generated and mutated
documents.
"""

from __future__ import annotations

import re
from typing import Any


class Unsupported(Exception):
    """The text uses YAML this reader does not handle (PyYAML must read it)."""


# YAML 1.1 plain scalars as PyYAML's SafeLoader resolves them (yaml/resolver.py).
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_BOOLS = {w: True for w in ("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")} | {
    w: False for w in ("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")}
_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\Z")
_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-/]*):(?: +|\Z)")
# A plain scalar's first character: YAML indicators, and what could start a number, a timestamp or
# another implicitly typed value (PyYAML's resolvers key on the first character too).
_RISKY_FIRST = frozenset("?:,[]{}#&*!|>'\"%@`0123456789.<=")


def load(text: str) -> Any:
    """The document ``text`` as ``yaml.safe_load`` gives it; :class:`Unsupported` outside the subset."""
    lines = _lines(text)
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0][0])
    if end != len(lines):
        raise Unsupported(f"line {lines[end][2]}: unexpected indentation")
    if not isinstance(value, (dict, list)):
        raise Unsupported("the document is a lone scalar")
    return value


def _lines(text: str) -> list[list[Any]]:
    """[indent, content, line number] of every line with content (full-line comments left out)."""
    out: list[list[Any]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.rstrip(" ")
        content = stripped.lstrip(" ")
        if not content or content.startswith("#"):
            continue
        if not stripped.isprintable() or content.startswith(("---", "...", "%")):
            raise Unsupported(f"line {number}: tabs, other unprintable characters, document markers or directives")
        out.append([len(stripped) - len(content), content, number])
    return out


def _block(lines: list[list[Any]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1] == "-" or lines[i][1].startswith("- "):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _mapping(lines: list[list[Any]], i: int, indent: int) -> tuple[dict, int]:
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not (lines[i][1] == "-" or lines[i][1].startswith("- ")):
        content, number = lines[i][1], lines[i][2]
        m = _KEY.match(content)
        if m is None:
            raise Unsupported(f"line {number}: not a plain 'key: value'")
        key, rest = m.group(1), content[m.end():]
        if _resolve_plain(key, number) != key:
            raise Unsupported(f"line {number}: key {key!r} is not a plain string")
        i += 1
        if rest:
            out[key] = _scalar(rest, number)
        elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and (
                lines[i][1] == "-" or lines[i][1].startswith("- ")))):
            out[key], i = _block(lines, i, lines[i][0])
        else:
            out[key] = None
        if i < len(lines) and lines[i][0] > indent:
            raise Unsupported(f"line {lines[i][2]}: continues a value over several lines")
    return out, i


def _sequence(lines: list[list[Any]], i: int, indent: int) -> tuple[list, int]:
    out: list[Any] = []
    while i < len(lines) and lines[i][0] == indent and (lines[i][1] == "-" or lines[i][1].startswith("- ")):
        content, number = lines[i][1], lines[i][2]
        item = content[2:].lstrip(" ")
        if not item or item == "-" or item.startswith("- "):
            raise Unsupported(f"line {number}: an empty or nested sequence entry")
        if _KEY.match(item):
            # "- key: value" opens a mapping whose keys sit at the column of "key".
            lines[i] = [indent + len(content) - len(item), item, number]
            value, i = _mapping(lines, i, lines[i][0])
            out.append(value)
        else:
            out.append(_scalar(item, number))
            i += 1
        if i < len(lines) and lines[i][0] > indent:
            raise Unsupported(f"line {lines[i][2]}: unexpected indentation")
    return out, i


def _scalar(text: str, number: int) -> Any:
    if text == "{}":
        return {}
    if text == "[]":
        return []
    if text[0] == "'":
        inner = text[1:-1] if len(text) >= 2 and text.endswith("'") else None
        if inner is None or "'" in inner.replace("''", ""):
            raise Unsupported(f"line {number}: a single-quoted scalar that does not end on its line")
        return inner.replace("''", "'")
    if text[0] == '"':
        inner = text[1:-1] if len(text) >= 2 and text.endswith('"') else None
        if inner is None or '"' in inner or "\\" in inner:
            raise Unsupported(f"line {number}: a double-quoted scalar with escapes or not ending on its line")
        return inner
    return _resolve_plain(text, number)


def _resolve_plain(text: str, number: int) -> Any:
    if text in _NULLS:
        return None
    if text in _BOOLS:
        return _BOOLS[text]
    if _DECIMAL.match(text):
        return int(text)
    if text[0] in "-+":  # a sign starts a number (or .inf); "--flag" and "-name" are strings
        if len(text) == 1 or text[1] in "0123456789. ":
            raise Unsupported(f"line {number}: plain scalar {text[:40]!r} needs YAML's own rules")
    elif text[0] in _RISKY_FIRST:
        raise Unsupported(f"line {number}: plain scalar {text[:40]!r} needs YAML's own rules")
    if ": " in text or " #" in text or text.endswith(":") \
            or text in (".inf", ".nan") or text[0] in "yYnNoOtTfF" and text.lower() in _YAML11_WORDS:
        raise Unsupported(f"line {number}: plain scalar {text[:40]!r} needs YAML's own rules")
    return text


# Case variants PyYAML does not resolve (e.g. "tRUE") are strings to it, but a reader of this subset
# has no reason to guess: hand them to PyYAML.
_YAML11_WORDS = frozenset(("yes", "no", "true", "false", "on", "off", "null", "y", "n"))
