"""Parse and format the quantities people type: CPU, memory, bandwidth, durations. Pure.

Every parser returns an int (or float seconds) in the unit its name says and raises
:class:`plugin.errors.UsageError` with one line naming the flag, the bad value and what is accepted.
Arithmetic is exact (``fractions.Fraction``): no float rounding decides whether ``1.0005`` is a
whole number of millicores.

Readings, documented in ``kubectl-chaos --help``:

- CPU (Kubernetes quantity): cores (``2``, ``0.5``, ``1.5``) or millicores (``500m``).
- Memory (Kubernetes quantity): bytes, ``Ki Mi Gi Ti Pi Ei`` (powers of 1024), ``k M G T P E``
  (powers of 1000), or an exponent (``129e6``).
- Bandwidth, bits per second unless a capital ``B`` says bytes: ``2Mbps``, ``2Mbit``, ``2mbit``,
  ``2Mb/s`` and Kubernetes' bare ``2M`` are 2,000,000 bit/s; ``2MBps`` and ``2MB/s`` are
  2,000,000 bytes/s = 16,000,000 bit/s; ``2Mi`` is 2 * 2^20 bit/s; a plain number is bit/s.
  ``2mbps`` is refused: tc reads "mbps" as megabytes/s, people writing it usually mean megabits.
- Durations need a unit (``30s``, ``5m``, ``1h30m``, ``1.5h``); a bare ``90`` is refused rather
  than guessed.
- A queue's latency budget (``--latency``): ``ms`` or ``s`` (``50ms``, ``20ms``, ``1s``), 1ms to 10s.
"""

from __future__ import annotations

import re
from fractions import Fraction

from plugin.errors import UsageError

__all__ = [
    "CPU_MAX_MILLICPU",
    "CPU_MIN_MILLICPU",
    "MEMORY_MAX_BYTES",
    "MEMORY_MIN_BYTES",
    "BANDWIDTH_MIN_BPS",
    "BANDWIDTH_MAX_BPS",
    "DURATION_MIN_S",
    "DURATION_MAX_S",
    "LATENCY_DEFAULT_S",
    "LATENCY_MIN_S",
    "LATENCY_MAX_S",
    "parse_latency",
    "format_latency",
    "describe_latency",
    "parse_cpu",
    "parse_memory",
    "parse_bandwidth",
    "parse_duration",
    "format_cpu",
    "format_memory",
    "format_bandwidth",
    "format_duration",
    "describe_cpu",
    "describe_memory",
    "describe_bandwidth",
    "describe_duration",
]

# The CFS quota is at least 1 ms per period; with the usual 100 ms period that is 10m. The kubelet
# clamps a smaller limit up to the same value.
CPU_MIN_MILLICPU = 10
CPU_MAX_MILLICPU = 100_000 * 1000
# runc and the kernel accept less, but a container's own runtime (shim, init, libc) does not fit:
# below a few MiB it is OOM-killed as it starts or the write fails with EBUSY.
MEMORY_MIN_BYTES = 4 * 1024**2
MEMORY_MAX_BYTES = 2**63 - 1
BANDWIDTH_MIN_BPS = 8_000
BANDWIDTH_MAX_BPS = 100 * 10**9
DURATION_MIN_S = 1
DURATION_MAX_S = 366 * 24 * 3600
# The queue of a shaped direction: netshape's bounds (a TBF limit below 1 ms of the rate is mostly
# the floor of four frames anyway; above 10 s it is not a slow link but a broken one).
LATENCY_DEFAULT_S = 0.050
LATENCY_MIN_S = 0.001
LATENCY_MAX_S = 10.0

_MAX_INPUT_CHARS = 64
_MAX_EXPONENT = 40

_CPU_ACCEPTS = "use millicores like 500m or cores like 0.5 or 2"
_MEMORY_ACCEPTS = (
    "use bytes or a suffix Ki Mi Gi Ti Pi Ei (powers of 1024) or k M G T P E (powers of 1000), "
    "like 512Mi or 2Gi"
)
_BANDWIDTH_ACCEPTS = (
    "use bits/s like 2Mbps, 2Mbit, 500kbit, 1Gbps or 2M, or bytes/s like 2MBps or 2MB/s"
)
_DURATION_ACCEPTS = "use a number with h, m or s, like 30s, 5m, 1h30m or 1.5h"

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}

# sign, mantissa, optional exponent (e3, E-2; "2E" alone is the exa suffix), the rest (the unit).
# (Patterns as text: re's cache compiles the ones a run uses, on first use.)
_QUANTITY = r"(?P<sign>[+-]?)(?P<mantissa>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE](?P<exp>[+-]?[0-9]+))?(?P<unit>.*)"


class _Number:
    """A parsed ``[sign]digits[.digits][e[sign]digits]unit``; ``value`` is exact, ``unit`` as typed."""

    __slots__ = ("negative", "value", "unit", "exponent")

    def __init__(self, negative: bool, value: Fraction, unit: str, exponent: int) -> None:
        self.negative = negative
        self.value = value
        self.unit = unit
        self.exponent = exponent


def _split(text: str, flag: str, kind: str, accepts: str) -> _Number:
    if not isinstance(text, str):
        raise UsageError(f"{flag}: {text!r} is not {kind}; {accepts}")
    stripped = text.strip()
    if not stripped:
        raise UsageError(f'{flag}: empty value; {accepts}')
    if len(stripped) > _MAX_INPUT_CHARS:
        raise UsageError(f"{flag}: {_quote(stripped[:20] + '...')} is too long to be {kind}; {accepts}")
    match = re.fullmatch(_QUANTITY, stripped, re.ASCII | re.DOTALL)
    if match is None:
        raise UsageError(f"{flag}: {_quote(stripped)} is not {kind}; {accepts}")
    mantissa = match["mantissa"]
    whole, _, frac = mantissa.partition(".")
    value = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
    exponent = int(match["exp"]) if match["exp"] is not None else 0
    if value != 0 and abs(exponent) > _MAX_EXPONENT:
        # 1e400 is not a limit anyone means; refuse before computing 10**400.
        direction = "too large" if exponent > 0 else "too small"
        raise UsageError(f"{flag}: {_quote(stripped)} is {direction} to be {kind}; {accepts}")
    if value != 0:
        value *= Fraction(10) ** exponent
    return _Number(match["sign"] == "-", value, match["unit"], exponent)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def _group(n: int) -> str:
    return f"{n:,}"


def _decimal(value: Fraction, max_places: int = 6) -> str:
    """``value`` as a plain decimal string, trailing zeros trimmed (exact up to ``max_places``)."""
    scaled = round(value * 10**max_places)
    whole, frac = divmod(abs(scaled), 10**max_places)
    text = str(whole)
    frac_text = str(frac).rjust(max_places, "0").rstrip("0")
    if frac_text:
        text += "." + frac_text
    return ("-" if scaled < 0 else "") + text


# --- CPU ---------------------------------------------------------------------------------------


def parse_cpu(text: str, flag: str = "--set-cpu") -> int:
    """A Kubernetes CPU quantity (``500m``, ``0.5``, ``2``) as millicpu."""
    num = _split(text, flag, "a CPU quantity", _CPU_ACCEPTS)
    shown = _quote(text.strip())
    if num.unit not in ("", "m"):
        raise UsageError(
            f"{flag}: {shown} has unit {_quote(num.unit)}; CPU takes only m (millicores) or no unit "
            f"(cores): {_CPU_ACCEPTS}"
        )
    if num.unit and num.exponent:
        # A Kubernetes quantity has an exponent or a suffix, never both ("1.5e3m" is refused there).
        raise UsageError(f"{flag}: {shown} has both an exponent and a unit; {_CPU_ACCEPTS}")
    if num.negative and num.value != 0:
        raise UsageError(f"{flag}: {shown} is negative; {_CPU_ACCEPTS}")
    millicpu = num.value if num.unit == "m" else num.value * 1000
    if millicpu == 0:
        raise UsageError(f"{flag}: {shown} is zero; a CPU limit must be at least {CPU_MIN_MILLICPU}m")
    if millicpu.denominator != 1:
        raise UsageError(f"{flag}: {shown} is finer than 1m (0.001 CPU); CPU limits are whole millicores")
    if millicpu < CPU_MIN_MILLICPU:
        raise UsageError(
            f"{flag}: {shown} is below {CPU_MIN_MILLICPU}m: the kernel's CFS quota is at least 1 ms "
            "per 100 ms period"
        )
    if millicpu > CPU_MAX_MILLICPU:
        raise UsageError(
            f"{flag}: {shown} is more than {CPU_MAX_MILLICPU // 1000:,} cores; {_CPU_ACCEPTS}"
        )
    return int(millicpu)


def format_cpu(millicpu: int | None) -> str:
    """Millicpu as Kubernetes writes it: ``2`` for whole cores, else ``1500m``; None = unlimited."""
    if millicpu is None:
        return "unlimited"
    if millicpu % 1000 == 0:
        return str(millicpu // 1000)
    return f"{millicpu}m"


def describe_cpu(text: str, millicpu: int) -> str:
    """How a CPU value was read: ``cpu 500m = 0.5 CPU (500 millicpu)``."""
    cores = _decimal(Fraction(millicpu, 1000), 3)
    return f"cpu {text.strip()} = {cores} CPU ({_group(millicpu)} millicpu)"


# --- Memory ------------------------------------------------------------------------------------


def parse_memory(text: str, flag: str = "--set-memory") -> int:
    """A Kubernetes memory quantity (``2Gi``, ``512Mi``, ``1G``, ``129e6``, ``128974848``) as bytes."""
    num = _split(text, flag, "a memory quantity", _MEMORY_ACCEPTS)
    shown = _quote(text.strip())
    if num.unit == "m":
        raise UsageError(
            f"{flag}: {shown} is in milli-bytes (m means 1/1000); use {text.strip()[:-1]}M "
            f"(megabytes) or {text.strip()[:-1]}Mi (mebibytes)"
        )
    if num.unit and num.exponent:
        raise UsageError(f"{flag}: {shown} has both an exponent and a unit; {_MEMORY_ACCEPTS}")
    if num.unit == "":
        multiplier = 1
    elif num.unit in _BINARY:
        multiplier = _BINARY[num.unit]
    elif num.unit in _DECIMAL:
        multiplier = _DECIMAL[num.unit]
    else:
        raise UsageError(f"{flag}: {shown} has an unknown unit {_quote(num.unit)}; {_MEMORY_ACCEPTS}")
    if num.negative and num.value != 0:
        raise UsageError(f"{flag}: {shown} is negative; {_MEMORY_ACCEPTS}")
    value = num.value * multiplier
    if value == 0:
        raise UsageError(f"{flag}: {shown} is zero; {_MEMORY_ACCEPTS}")
    if value.denominator != 1:
        raise UsageError(f"{flag}: {shown} is not a whole number of bytes; {_MEMORY_ACCEPTS}")
    if value > MEMORY_MAX_BYTES:
        raise UsageError(
            f"{flag}: {shown} is more than 2^63-1 bytes (8Ei), the largest limit the kernel takes"
        )
    if value < MEMORY_MIN_BYTES:
        raise UsageError(
            f"{flag}: {shown} is below 4Mi ({_group(MEMORY_MIN_BYTES)} bytes): a container cannot "
            "even start with less"
        )
    return int(value)


def format_memory(n_bytes: int | None) -> str:
    """Bytes as Kubernetes writes them: the largest exact unit (``2Gi``, ``1G``, ``123Mi``)."""
    if n_bytes is None:
        return "unlimited"
    if n_bytes == 0:
        return "0"
    for suffix, size in reversed(_BINARY.items()):
        if n_bytes % size == 0:
            return f"{n_bytes // size}{suffix}"
    for suffix, size in reversed(_DECIMAL.items()):
        if n_bytes % size == 0:
            return f"{n_bytes // size}{suffix}"
    return str(n_bytes)


def describe_memory(text: str, n_bytes: int) -> str:
    """How a memory value was read: ``memory 2Gi = 2,147,483,648 bytes``."""
    return f"memory {text.strip()} = {_group(n_bytes)} bytes"


# --- Bandwidth ---------------------------------------------------------------------------------

_BW_PREFIX = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BW_PREFIX.update({k: v for k, v in _BINARY.items() if k in ("Ki", "Mi", "Gi", "Ti")})
# tc's lower-case spellings: "mbit" and "gbit" are megabits and gigabits there too.
_TC_LOWER = {"m": 10**6, "g": 10**9, "t": 10**12}
_PREFIX_WORD = {"m": "mega", "g": "giga", "t": "tera"}
_BITS = ("", "b", "bps", "bit", "bits", "bit/s", "bits/s", "b/s")
_BYTES = ("B", "Bps", "B/s", "byte/s", "bytes/s")
_BW_UNIT = r"(?P<prefix>Ki|Mi|Gi|Ti|[kKMGTmgt]?)(?P<unit>.*)"


def parse_bandwidth(text: str, flag: str = "--set-bandwidth") -> int:
    """A rate (``2Mbps``, ``2MBps``, ``500kbit``, ``2M``, ``2Mi``, ``8000``) as bits per second."""
    num = _split(text, flag, "a bandwidth", _BANDWIDTH_ACCEPTS)
    stripped = text.strip()
    shown = _quote(stripped)
    parts = re.fullmatch(_BW_UNIT, num.unit, re.DOTALL)
    assert parts is not None  # the pattern matches every string
    prefix, unit = parts["prefix"], parts["unit"]
    if unit not in _BITS and unit not in _BYTES:
        raise UsageError(f"{flag}: {shown} has an unknown unit {_quote(num.unit)}; {_BANDWIDTH_ACCEPTS}")
    if prefix in _TC_LOWER:
        number = stripped[: len(stripped) - len(num.unit)]
        upper = prefix.upper()
        if prefix == "m" and unit == "":
            raise UsageError(
                f"{flag}: {shown} is in milli-bits/s (m means 1/1000); write {number}M or {number}Mbit "
                "for megabits/s"
            )
        if unit not in ("bit", "bits", "bit/s", "bits/s"):
            # tc's own reading of "mbps" is megabytes/s; people who type it mostly mean megabits.
            raise UsageError(
                f"{flag}: {shown} is ambiguous (tc reads {prefix}bps as {_PREFIX_WORD[prefix]}bytes/s); "
                f"write {number}{upper}bit for {_PREFIX_WORD[prefix]}bits/s or {number}{upper}Bps for "
                f"{_PREFIX_WORD[prefix]}bytes/s"
            )
        multiplier = _TC_LOWER[prefix]
    else:
        multiplier = _BW_PREFIX[prefix]
    if num.exponent and num.unit:
        raise UsageError(f"{flag}: {shown} has both an exponent and a unit; {_BANDWIDTH_ACCEPTS}")
    if unit in _BYTES:
        multiplier *= 8
    if num.negative and num.value != 0:
        raise UsageError(f"{flag}: {shown} is negative; {_BANDWIDTH_ACCEPTS}")
    bps = num.value * multiplier
    if bps == 0:
        raise UsageError(f"{flag}: {shown} is zero; the slowest rate is 8kbit (1 kB/s)")
    if bps.denominator != 1:
        raise UsageError(f"{flag}: {shown} is not a whole number of bits per second; {_BANDWIDTH_ACCEPTS}")
    if bps < BANDWIDTH_MIN_BPS:
        raise UsageError(
            f"{flag}: {shown} is {_group(int(bps))} bit/s, below the minimum of 8kbit (1 kB/s): "
            "slower links stall TCP instead of slowing it"
        )
    if bps > BANDWIDTH_MAX_BPS:
        raise UsageError(
            f"{flag}: {shown} is {format_bandwidth(int(bps))}, above the maximum of 100Gbit/s"
            if bps < 10**18
            else f"{flag}: {shown} is above the maximum of 100Gbit/s"
        )
    return int(bps)


def format_bandwidth(bps: int | None) -> str:
    """Bits per second as ``2Mbit/s``, ``1.5Gbit/s``, ``2Mibit/s``; None = unlimited."""
    if bps is None:
        return "unlimited"
    largest = next(((s, n) for s, n in (("G", 10**9), ("M", 10**6), ("k", 10**3)) if bps >= n), None)
    if largest is not None and (Fraction(bps, largest[1]) * 1000).denominator == 1:
        return f"{_decimal(Fraction(bps, largest[1]), 3)}{largest[0]}bit/s"
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        if bps >= _BINARY[suffix] and bps % _BINARY[suffix] == 0:
            return f"{bps // _BINARY[suffix]}{suffix}bit/s"
    if largest is not None:
        return f"{_decimal(Fraction(bps, largest[1]), 6)}{largest[0]}bit/s"
    return f"{bps}bit/s"


_DIRECTION_WORDS = {
    "both": "both directions",
    "ingress": "ingress: into the pod",
    "egress": "egress: out of the pod",
}


def describe_bandwidth(text: str, bps: int, direction: str = "both") -> str:
    """How a rate was read: ``bandwidth 2Mbps = 2,000,000 bit/s (both directions)``."""
    return f"bandwidth {text.strip()} = {_group(bps)} bit/s ({_DIRECTION_WORDS.get(direction, direction)})"


# --- Durations ---------------------------------------------------------------------------------

_DURATION = r"(?:(?P<h>[0-9]+(?:\.[0-9]+)?)h)?(?:(?P<m>[0-9]+(?:\.[0-9]+)?)m)?(?:(?P<s>[0-9]+(?:\.[0-9]+)?)s)?"
_DURATION_UNIT_S = {"h": 3600, "m": 60, "s": 1}


def _time_text(text: str, flag: str, what: str, accepts: str) -> tuple[str, str]:
    """The stripped text and how a message shows it; refuses empty, overlong and negative values."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag}: empty value; {accepts}")
    stripped = text.strip()
    shown = _quote(stripped if len(stripped) <= _MAX_INPUT_CHARS else stripped[:20] + "...")
    if len(stripped) > _MAX_INPUT_CHARS:
        raise UsageError(f"{flag}: {shown} is too long to be a {what}; {accepts}")
    if stripped.startswith("-"):
        raise UsageError(f"{flag}: {shown} is negative; {accepts}")
    return stripped, shown


def parse_duration(text: str, flag: str = "--duration") -> float:
    """A duration with units, largest first (``30s``, ``5m``, ``1h30m``, ``1.5h``), as seconds."""
    stripped, shown = _time_text(text, flag, "duration", _DURATION_ACCEPTS)
    body = stripped[1:] if stripped.startswith("+") else stripped
    if re.fullmatch(r"[0-9]+(?:\.[0-9]*)?", body, re.ASCII):
        if Fraction(body) == 0:
            raise UsageError(f"{flag}: {shown} is zero; {_DURATION_ACCEPTS}")
        raise UsageError(f"{flag}: {shown} has no unit; write {body}s, {body}m or {body}h")
    match = re.fullmatch(_DURATION, body, re.ASCII)
    if match is None or not any(match.groupdict().values()):
        unit = re.sub(r"^[0-9.]+", "", body)
        if re.fullmatch(r"[0-9.]+[A-Za-zµ]+", body) and unit not in _DURATION_UNIT_S:
            raise UsageError(f"{flag}: {shown} has an unknown unit {_quote(unit)}; {_DURATION_ACCEPTS}")
        raise UsageError(f"{flag}: {shown} is not a duration; {_DURATION_ACCEPTS}")
    total = Fraction(0)
    for unit, seconds in _DURATION_UNIT_S.items():
        if match[unit] is not None:
            total += Fraction(match[unit]) * seconds
    if total == 0:
        raise UsageError(f"{flag}: {shown} is zero; {_DURATION_ACCEPTS}")
    if total < DURATION_MIN_S:
        raise UsageError(f"{flag}: {shown} is shorter than 1s; {_DURATION_ACCEPTS}")
    if total > DURATION_MAX_S:
        raise UsageError(f"{flag}: {shown} is longer than a year (8784h); {_DURATION_ACCEPTS}")
    return float(total)


def format_duration(seconds: float | None) -> str:
    """Seconds as ``1h30m``, ``5m``, ``45s``, ``1m0.5s``; None = no limit."""
    if seconds is None:
        return "none"
    total = Fraction(seconds).limit_denominator(1000)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = ""
    if hours:
        text += f"{int(hours)}h"
    if minutes:
        text += f"{int(minutes)}m"
    if secs or not text:
        text += f"{_decimal(secs, 3)}s"
    return text


def describe_duration(text: str, seconds: float) -> str:
    """How a duration was read: ``duration 1h30m = 5,400 s``."""
    return f"duration {text.strip()} = {_group(int(seconds)) if seconds == int(seconds) else seconds} s"


# --- Queue latency -----------------------------------------------------------------------------

_LATENCY_ACCEPTS = "use ms or s, like 50ms, 20ms or 1s (1ms to 10s)"
_LATENCY = r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>[A-Za-zµ]*)"
_LATENCY_UNIT_S = {"ms": Fraction(1, 1000), "s": Fraction(1)}


def parse_latency(text: str, flag: str = "--latency") -> float:
    """A queue's latency budget with a unit (``50ms``, ``0.5s``), as seconds: 1ms to 10s."""
    stripped, shown = _time_text(text, flag, "latency", _LATENCY_ACCEPTS)
    match = re.fullmatch(_LATENCY, stripped, re.ASCII)
    if match is None:
        raise UsageError(f"{flag}: {shown} is not a latency; {_LATENCY_ACCEPTS}")
    number, unit = match["number"], match["unit"]
    if not unit:
        raise UsageError(f"{flag}: {shown} has no unit; write {number}ms or {number}s")
    if unit not in _LATENCY_UNIT_S:
        raise UsageError(f"{flag}: {shown} has an unknown unit {_quote(unit)}; {_LATENCY_ACCEPTS}")
    seconds = Fraction(number) * _LATENCY_UNIT_S[unit]
    if seconds < Fraction(LATENCY_MIN_S).limit_denominator(1000):
        raise UsageError(f"{flag}: {shown} is {'zero' if seconds == 0 else 'shorter than 1ms'}; accepted: 1ms to 10s")
    if seconds > LATENCY_MAX_S:
        raise UsageError(f"{flag}: {shown} is longer than 10s; accepted: 1ms to 10s")
    if (seconds * 1000).denominator != 1:
        # The ResourceChaos spec holds whole milliseconds; a queue is not finer than that anyway.
        raise UsageError(f"{flag}: {shown} is not a whole number of milliseconds; {_LATENCY_ACCEPTS}")
    return float(seconds)


def format_latency(seconds: float | None) -> str:
    """Seconds as ``50ms``, ``24.2ms``, ``1.5s``; None = unknown."""
    if seconds is None:
        return "unknown"
    if seconds >= 1:
        return f"{_decimal(Fraction(seconds).limit_denominator(10**6), 3)}s"
    return f"{_decimal(Fraction(seconds * 1000).limit_denominator(10**6), 1)}ms"


def describe_latency(text: str, seconds: float) -> str:
    """How a budget was read: ``latency 20ms = 0.02 s of queue per shaped direction``."""
    return f"latency {text.strip()} = {seconds:g} s of queue per shaped direction"
