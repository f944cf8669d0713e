"""Pure planning for netshape: bounds, burst sizing, names, and the bytes of the qdisc options.

Nothing here touches the kernel, so all of it is unit-tested with plain values. The netlink layer
(``netshape._nl``) sends what these functions compute and hands the raw dumps back to the parsers.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from netshape.errors import OutOfRange

MIN_RATE_BPS = 8_000
MAX_RATE_BPS = 100_000_000_000
QDISC_KINDS = ("htb", "tbf")

# Our IFB devices are "kcx" + 12 hex digits: 15 characters, the IFNAMSIZ limit, and a prefix no
# kernel or CNI plugin uses (the kernel's own are ifb0, ifb1; the CNI bandwidth plugin's bwp...).
IFB_PREFIX = "kcx"
IFNAMSIZ_MAX = 15

# Handle major of every qdisc we create: how we recognise our own shaping without stored state.
OUR_MAJOR = 0x6B63  # "kc"
OUR_ROOT_HANDLE = OUR_MAJOR << 16
OUR_CLASS_ID = OUR_ROOT_HANDLE | 1
# Preference of our redirect filter on the veth's ingress hook: 1 runs before anyone else's
# (tc gives filters 49152 and downwards by default; the CNI bandwidth plugin uses the default).
OUR_FILTER_PREF = 1

BURST_TIME_S = 0.010
BURST_FLOOR_BYTES = 64 * 1024
ETH_HEADER_BYTES = 14
# Queue behind a TBF, beyond the burst: this much time at the shaped rate, and at least one more
# burst. With 50 ms (about what the CNI plugin uses) TCP lost enough to idle and then burst:
# 0.92-1.04 of the rate at 10 Mbit/s; with 200 ms, 0.95-0.96.
TBF_QUEUE_TIME_S = 0.200

# The packet scheduler's clock: one tick is 64 ns (PSCHED_SHIFT 6; /proc/net/psched reads
# "000003e8 00000040 ...", which tc turns into 1000/64 = 15.625 ticks per microsecond). Burst
# times travel in ticks in a u32, which caps a burst at about 275 s of the rate.
NS_PER_TICK = 64
U32_MAX = 0xFFFFFFFF

TC_LINKLAYER_ETHERNET = 1
# rtnetlink attribute numbers (include/uapi/linux/pkt_sched.h).
TCA_HTB_PARMS, TCA_HTB_INIT, TCA_HTB_RATE64, TCA_HTB_CEIL64 = 1, 2, 6, 7
TCA_TBF_PARMS, TCA_TBF_RATE64, TCA_TBF_BURST = 1, 4, 6
HTB_VERSION = 3
HTB_R2Q = 10
HTB_QUANTUM_MIN, HTB_QUANTUM_MAX = 1000, 200_000


@dataclass(frozen=True)
class Rates:
    """Rates in bits per second as the kernel holds them; None = that direction is not shaped."""

    ingress_bps: int | None = None
    egress_bps: int | None = None


@dataclass(frozen=True)
class DirectionPlan:
    """What to install for one direction."""

    kind: str
    rate_bytes_per_s: int
    burst_bytes: int
    limit_bytes: int

    @property
    def rate_bps(self) -> int:
        return self.rate_bytes_per_s * 8


def ifb_name(target_key: str) -> str:
    """The IFB device name for a target: our prefix and a short hash of the key, <= 15 characters."""
    if not target_key:
        raise OutOfRange("target_key is empty; a non-empty string identifying the target is required")
    digest = hashlib.sha256(target_key.encode()).hexdigest()
    return IFB_PREFIX + digest[: IFNAMSIZ_MAX - len(IFB_PREFIX)]


def kernel_bps(rate_bps: int) -> int:
    """The rate the kernel will hold for ``rate_bps``: qdiscs count whole bytes per second."""
    return rate_bps // 8 * 8


def default_burst_bytes(rate_bps: int) -> int:
    """max(10 ms of the rate, 64 KiB): enough tokens that timer slack does not cost throughput."""
    return max(int(rate_bps * BURST_TIME_S / 8), BURST_FLOOR_BYTES)


def _check_rate(direction: str, rate_bps: int) -> None:
    if isinstance(rate_bps, bool) or not isinstance(rate_bps, int):
        raise OutOfRange(f"{direction} rate {rate_bps!r} is not an integer number of bits per second")
    if not MIN_RATE_BPS <= rate_bps <= MAX_RATE_BPS:
        raise OutOfRange(
            f"{direction} rate {rate_bps} bit/s is out of range; accepted: {MIN_RATE_BPS} bit/s (8 kbit/s) "
            f"to {MAX_RATE_BPS} bit/s (100 Gbit/s)"
        )


def burst_ticks(rate_bytes_per_s: int, burst_bytes: int) -> int:
    """Time to send ``burst_bytes`` at the rate, in scheduler ticks (what tc calls the buffer)."""
    return burst_bytes * 1_000_000_000 // (rate_bytes_per_s * NS_PER_TICK)


def plan_direction(
    direction: str, rate_bps: int, *, kind: str = "htb", burst_bytes: int | None = None, mtu_bytes: int = 1500
) -> DirectionPlan:
    """Validate one direction's request and size its burst and queue."""
    _check_rate(direction, rate_bps)
    if kind not in QDISC_KINDS:
        raise OutOfRange(f"qdisc {kind!r} is not supported; accepted: {', '.join(QDISC_KINDS)}")
    frame_bytes = mtu_bytes + ETH_HEADER_BYTES
    min_burst = 2 * frame_bytes
    if burst_bytes is None:
        burst = max(default_burst_bytes(rate_bps), min_burst)
    else:
        if isinstance(burst_bytes, bool) or not isinstance(burst_bytes, int):
            raise OutOfRange(f"burst {burst_bytes!r} is not an integer number of bytes")
        if burst_bytes < min_burst:
            raise OutOfRange(
                f"burst {burst_bytes} bytes is below two frames of MTU {mtu_bytes} "
                f"({min_burst} bytes); accepted: at least {min_burst} bytes"
            )
        burst = burst_bytes
    rate_bytes = rate_bps // 8
    if burst_ticks(rate_bytes, burst) > U32_MAX:
        max_burst = U32_MAX * NS_PER_TICK * rate_bytes // 1_000_000_000
        raise OutOfRange(
            f"burst {burst} bytes lasts longer than the kernel can express at {rate_bps} bit/s; "
            f"accepted: at most {max_burst} bytes at this rate"
        )
    if burst > U32_MAX:
        raise OutOfRange(f"burst {burst} bytes is out of range; accepted: at most {U32_MAX} bytes")
    limit = min(burst + max(int(rate_bytes * TBF_QUEUE_TIME_S), burst), U32_MAX)
    return DirectionPlan(kind=kind, rate_bytes_per_s=rate_bytes, burst_bytes=burst, limit_bytes=limit)


def plan_rates(
    *,
    ingress_bps: int | None,
    egress_bps: int | None,
    qdisc: str = "htb",
    burst_bytes: int | None = None,
    mtu_bytes: int = 1500,
) -> tuple[DirectionPlan | None, DirectionPlan | None]:
    """Plans for (ingress, egress); at least one direction must be given."""
    if ingress_bps is None and egress_bps is None:
        raise OutOfRange("no rate given; accepted: ingress_bps, egress_bps or both")
    plans = []
    for direction, rate in (("ingress", ingress_bps), ("egress", egress_bps)):
        plans.append(
            None
            if rate is None
            else plan_direction(direction, rate, kind=qdisc, burst_bytes=burst_bytes, mtu_bytes=mtu_bytes)
        )
    return plans[0], plans[1]


# --- netlink attribute bytes -----------------------------------------------------------------


def nla(attr_type: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, attr_type) + payload + b"\0" * (-length % 4)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Top-level attributes of a netlink payload, by type (NLA_F_* flag bits masked off)."""
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, attr_type = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[attr_type & 0x3FFF] = bytes(data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return attrs


def _ratespec(rate_bytes_per_s: int) -> bytes:
    # struct tc_ratespec: cell_log, linklayer, overhead, cell_align, mpu, rate. An Ethernet
    # link layer tells the kernel to compute transmit times itself, so no rate table is needed.
    return struct.pack("=BBHhHI", 0, TC_LINKLAYER_ETHERNET, 0, -1, 0, min(rate_bytes_per_s, U32_MAX))


def htb_qdisc_options(default_minor: int) -> bytes:
    # struct tc_htb_glob: version, rate2quantum, defcls, debug, direct_pkts.
    return nla(TCA_HTB_INIT, struct.pack("=IIIII", HTB_VERSION, HTB_R2Q, default_minor, 0, 0))


def htb_quantum(rate_bytes_per_s: int) -> int:
    # The kernel's own rule (rate / r2q, clamped), given explicitly so it never logs a warning.
    return min(max(rate_bytes_per_s // HTB_R2Q, HTB_QUANTUM_MIN), HTB_QUANTUM_MAX)


def htb_class_options(plan: DirectionPlan) -> bytes:
    rate = plan.rate_bytes_per_s
    ticks = burst_ticks(rate, plan.burst_bytes)
    # struct tc_htb_opt: rate, ceil, buffer, cbuffer, quantum, level, prio.
    parms = _ratespec(rate) + _ratespec(rate) + struct.pack("=IIIII", ticks, ticks, htb_quantum(rate), 0, 0)
    out = nla(TCA_HTB_PARMS, parms)
    if rate > U32_MAX:
        out += nla(TCA_HTB_RATE64, struct.pack("=Q", rate)) + nla(TCA_HTB_CEIL64, struct.pack("=Q", rate))
    return out


def tbf_options(plan: DirectionPlan) -> bytes:
    rate = plan.rate_bytes_per_s
    # struct tc_tbf_qopt: rate, peakrate (none), limit, buffer, mtu.
    parms = _ratespec(rate) + struct.pack("=12x") + struct.pack(
        "=III", plan.limit_bytes, burst_ticks(rate, plan.burst_bytes), 0
    )
    out = nla(TCA_TBF_PARMS, parms)
    if rate > U32_MAX:
        out += nla(TCA_TBF_RATE64, struct.pack("=Q", rate))
    # The burst in bytes as well: the kernel then derives the buffer time itself, without the
    # rounding of the tick value.
    return out + nla(TCA_TBF_BURST, struct.pack("=I", plan.burst_bytes))


def _rate_from(attrs: dict[int, bytes], parms_type: int, rate64_type: int) -> int | None:
    parms = attrs.get(parms_type)
    if parms is None or len(parms) < 12:
        return None
    rate = struct.unpack_from("=I", parms, 8)[0]
    if rate64_type in attrs:
        rate = struct.unpack("=Q", attrs[rate64_type][:8])[0]
    return rate


def htb_class_rate_bytes(options: bytes) -> int | None:
    """The rate in bytes per second of a dumped HTB class's options."""
    return _rate_from(parse_attrs(options), TCA_HTB_PARMS, TCA_HTB_RATE64)


def htb_class_burst_bytes(options: bytes) -> int | None:
    """The burst in bytes of a dumped HTB class's options (from the buffer time)."""
    attrs = parse_attrs(options)
    rate = _rate_from(attrs, TCA_HTB_PARMS, TCA_HTB_RATE64)
    parms = attrs.get(TCA_HTB_PARMS)
    if rate is None or parms is None or len(parms) < 28:
        return None
    ticks = struct.unpack_from("=I", parms, 24)[0]
    return round(ticks * NS_PER_TICK * rate / 1_000_000_000)


def tbf_rate_bytes(options: bytes) -> int | None:
    """The rate in bytes per second of a dumped TBF's options."""
    return _rate_from(parse_attrs(options), TCA_TBF_PARMS, TCA_TBF_RATE64)
