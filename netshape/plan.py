"""Pure planning for netshape: bounds, burst and queue sizing, names, and the bytes of the qdisc options.

Nothing here touches the kernel, so all of it is unit-tested with plain values. The netlink layer
(``netshape._nl``) sends what these functions compute and hands the raw dumps back to the parsers.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

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
# The queue under our HTB class: a qdisc of its own needs a major of its own.
OUR_LEAF_HANDLE = (OUR_MAJOR + 1) << 16
# Preference of our redirect filter on the veth's ingress hook: 1 runs before anyone else's
# (tc gives filters 49152 and downwards by default; the CNI bandwidth plugin uses the default).
OUR_FILTER_PREF = 1

# 20 ms: 10 ms held the queue bound and goodput on a bare-metal kernel but lost 13% of the rate out
# of the pod on a node whose timers are coarse (the cgroup v2 VM under TCG: 0.873 of 4 Mbit/s at
# 10 ms, 0.961 at 20 ms); 50 ms cost retransmission timeouts (see default_burst_bytes).
BURST_TIME_S = 0.020
BURST_FLOOR_FRAMES = 2
LEGACY_BURST_FLOOR_BYTES = 64 * 1024
ETH_HEADER_BYTES = 14
VLAN_TAG_BYTES = 4

# The queue of a shaped direction holds this much time at the rate (the CNI bandwidth plugin uses
# 25 ms; Chaos Mesh asks for limit >= 2 x rate x latency). The kernel's default, a 1000-packet
# pfifo under the HTB class, held 1.2-4.2 s at 2 Mbit/s under one bulk TCP flow.
DEFAULT_LATENCY_S = 0.050
MIN_LATENCY_S, MAX_LATENCY_S = 0.001, 10.0
# ... and never fewer than this many full frames: below about 1 Mbit/s the budget is less than
# that. At 200 kbit/s, 2 frames left BBR at 0.75 of the rate, 3 at 0.85, 4 at 0.89 (all that
# the link carried next to the RTT probes; cubic 0.87-0.88 with any of them).
QUEUE_FLOOR_FRAMES = 4
# Packets longer than this much time at the rate are split into MTU-sized segments before they
# queue. HTB sends a GSO super-packet whole (64 KB is half a second at 1 Mbit/s), so RTT under
# load exceeded the budget by one super-packet and BBR fell to 0.7 of the rate at 2 Mbit/s.
# Above ~500 Mbit/s no GSO packet is that long, so nothing is split where splitting costs CPU.
SPLIT_TIME_S = 0.001
# Token buckets of the splitter (a TBF that only splits and queues): so far above any rate we
# shape (MAX_RATE_BPS) that a packet costs about a nanosecond of tokens, so it never holds one
# back (HTB would log "non-work-conserving" and wait for its timer). The kernel requires the
# peak rate to be above the rate.
SPLITTER_RATE_BYTES_PER_S = 62_500_000_000_000  # 500 Tbit/s
SPLITTER_PEAK_BYTES_PER_S = 125_000_000_000_000  # 1 Pbit/s

# The packet scheduler's clock: one tick is 64 ns (PSCHED_SHIFT 6; /proc/net/psched reads
# "000003e8 00000040 ...", which tc turns into 1000/64 = 15.625 ticks per microsecond). Burst
# times travel in ticks in a u32, which caps a burst at about 275 s of the rate.
NS_PER_TICK = 64
U32_MAX = 0xFFFFFFFF

TC_LINKLAYER_ETHERNET = 1
# rtnetlink attribute numbers (include/uapi/linux/pkt_sched.h).
TCA_HTB_PARMS, TCA_HTB_INIT, TCA_HTB_RATE64, TCA_HTB_CEIL64 = 1, 2, 6, 7
TCA_TBF_PARMS, TCA_TBF_RATE64, TCA_TBF_PRATE64, TCA_TBF_BURST, TCA_TBF_PBURST = 1, 4, 5, 6, 7
HTB_VERSION = 3
HTB_R2Q = 10
HTB_QUANTUM_MIN, HTB_QUANTUM_MAX = 1000, 200_000


@dataclass(frozen=True)
class Rates:
    """Rates in bits per second as the kernel holds them; None = that direction is not shaped."""

    ingress_bps: int | None = None
    egress_bps: int | None = None


@dataclass(frozen=True)
class QueueInfo:
    """The queue limits of our shaping as the kernel holds them; None = not shaped by us there.

    A limit counts bytes; ``*_limit_packets`` is set instead where the queue counts packets (the
    kernel's default leaf under an HTB class, from shaping done before queues were sized).
    """

    ingress_limit_bytes: int | None = None
    egress_limit_bytes: int | None = None
    ingress_limit_packets: int | None = None
    egress_limit_packets: int | None = None
    # The veth's MTU, which the planned limits were sized with; a reading, not part of the queues'
    # equality.
    mtu_bytes: int | None = field(default=None, compare=False)

    def planned_limit_bytes(self, rate_bps: int, latency_s: float) -> int | None:
        """The limit ``shape`` installs for this rate and budget on this veth (None: MTU not read)."""
        if self.mtu_bytes is None:
            return None
        return queue_limit_bytes(rate_bps // 8, latency_s, self.mtu_bytes)


@dataclass(frozen=True)
class DirectionPlan:
    """What to install for one direction.

    ``limit_bytes``: the queue (TBF's own, or the splitter's under the HTB class); None = the
    kernel's default leaf (the legacy plan only). ``split_bytes``: longer packets are split into
    MTU-sized segments before they queue; None = nothing is split (legacy).
    """

    kind: str
    rate_bytes_per_s: int
    burst_bytes: int
    limit_bytes: int | None
    split_bytes: int | None = None

    @property
    def rate_bps(self) -> int:
        return self.rate_bytes_per_s * 8

    @property
    def queue_s(self) -> float | None:
        """How long the full queue takes to drain at the rate."""
        return None if self.limit_bytes is None else self.limit_bytes / self.rate_bytes_per_s


def ifb_name(target_key: str) -> str:
    """The IFB device name for a target: our prefix and a short hash of the key, <= 15 characters."""
    if not target_key:
        raise OutOfRange("target_key is empty; a non-empty string identifying the target is required")
    digest = hashlib.sha256(target_key.encode()).hexdigest()
    return IFB_PREFIX + digest[: IFNAMSIZ_MAX - len(IFB_PREFIX)]


def kernel_bps(rate_bps: int) -> int:
    """The rate the kernel will hold for ``rate_bps``: qdiscs count whole bytes per second."""
    return rate_bps // 8 * 8


def default_burst_bytes(rate_bps: int, mtu_bytes: int = 1500) -> int:
    """max(20 ms of the rate, 2 frames): enough tokens that timer slack does not cost throughput.

    No more: a burst leaves at line rate whenever the queue ran empty, and TCP then overruns the
    bounded queue. Out of the pod at 2 and 10 Mbit/s, 50 ms bursts (64 KiB, the floor before)
    cost 2-5 retransmission timeouts in 7 s and windows of 100 ms with nothing delivered; two
    frames or 10 ms none (tests/support/netns.py tcp_window_rates, nstat TcpExtTCPTimeouts).
    """
    return max(int(rate_bps * BURST_TIME_S / 8), BURST_FLOOR_FRAMES * (mtu_bytes + ETH_HEADER_BYTES))


def queue_limit_bytes(rate_bytes_per_s: int, latency_s: float, mtu_bytes: int = 1500) -> int:
    """The queue for a latency budget: ``latency_s`` at the rate, at least QUEUE_FLOOR_FRAMES frames."""
    return max(round(rate_bytes_per_s * latency_s), QUEUE_FLOOR_FRAMES * (mtu_bytes + ETH_HEADER_BYTES))


def split_bytes(rate_bytes_per_s: int, limit_bytes: int, mtu_bytes: int = 1500) -> int:
    """Longest packet queued whole: SPLIT_TIME_S at the rate, at most a quarter of the queue (so
    at least four fit), and never less than a full frame (with a VLAN tag: it is not split)."""
    frame = mtu_bytes + ETH_HEADER_BYTES + VLAN_TAG_BYTES
    return max(min(round(rate_bytes_per_s * SPLIT_TIME_S), limit_bytes // QUEUE_FLOOR_FRAMES), frame)


def _check_latency(latency_s: float) -> None:
    if isinstance(latency_s, bool) or not isinstance(latency_s, (int, float)) or latency_s != latency_s:
        raise OutOfRange(f"latency {latency_s!r} is not a number of seconds")
    if not MIN_LATENCY_S <= latency_s <= MAX_LATENCY_S:
        raise OutOfRange(
            f"latency {latency_s:g} s is out of range; accepted: {MIN_LATENCY_S:g} s (1 ms) to {MAX_LATENCY_S:g} s"
        )


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
    direction: str,
    rate_bps: int,
    *,
    kind: str = "htb",
    burst_bytes: int | None = None,
    mtu_bytes: int = 1500,
    latency_s: float | None = None,
    legacy: bool = False,
) -> DirectionPlan:
    """Validate one direction's request and size its burst, queue and split size.

    ``latency_s``: the queue's budget (None = DEFAULT_LATENCY_S). ``legacy``: plan as before
    queues were sized (64 KiB burst floor, the kernel's 1000-packet leaf under HTB, a 200 ms TBF
    queue, nothing split); only for the latency benchmark's baseline.
    """
    _check_rate(direction, rate_bps)
    if kind not in QDISC_KINDS:
        raise OutOfRange(f"qdisc {kind!r} is not supported; accepted: {', '.join(QDISC_KINDS)}")
    if latency_s is None:
        latency_s = DEFAULT_LATENCY_S
    _check_latency(latency_s)
    frame_bytes = mtu_bytes + ETH_HEADER_BYTES
    min_burst = 2 * frame_bytes
    if burst_bytes is None:
        burst = max(default_burst_bytes(rate_bps, mtu_bytes), LEGACY_BURST_FLOOR_BYTES if legacy else 0)
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
    if legacy:
        limit = None if kind == "htb" else min(burst + max(int(rate_bytes * 0.200), burst), U32_MAX)
        return DirectionPlan(kind=kind, rate_bytes_per_s=rate_bytes, burst_bytes=burst, limit_bytes=limit)
    limit = queue_limit_bytes(rate_bytes, latency_s, mtu_bytes)
    if limit > U32_MAX:
        raise OutOfRange(
            f"latency {latency_s:g} s at {rate_bps} bit/s needs a queue of {limit} bytes; accepted: at most "
            f"{U32_MAX} bytes, {U32_MAX / rate_bytes:.3g} s at this rate"
        )
    split = split_bytes(rate_bytes, limit, mtu_bytes)
    if kind == "tbf":
        split = min(split, burst)  # a TBF passes nothing longer than its burst whole
    return DirectionPlan(kind=kind, rate_bytes_per_s=rate_bytes, burst_bytes=burst, limit_bytes=limit, split_bytes=split)


def plan_rates(
    *,
    ingress_bps: int | None,
    egress_bps: int | None,
    qdisc: str = "htb",
    burst_bytes: int | None = None,
    mtu_bytes: int = 1500,
    latency_s: float | None = None,
    legacy: bool = False,
) -> tuple[DirectionPlan | None, DirectionPlan | None]:
    """Plans for (ingress, egress); at least one direction must be given."""
    if ingress_bps is None and egress_bps is None:
        raise OutOfRange("no rate given; accepted: ingress_bps, egress_bps or both")
    plans = []
    for direction, rate in (("ingress", ingress_bps), ("egress", egress_bps)):
        plans.append(
            None
            if rate is None
            else plan_direction(
                direction,
                rate,
                kind=qdisc,
                burst_bytes=burst_bytes,
                mtu_bytes=mtu_bytes,
                latency_s=latency_s,
                legacy=legacy,
            )
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


def _tbf(
    *, rate: int, burst: int, limit: int, peak: int | None = None, peak_burst: int | None = None
) -> bytes:
    # struct tc_tbf_qopt: rate, peakrate, limit, buffer, mtu (the peak bucket, in ticks).
    peakspec = _ratespec(peak) if peak is not None else struct.pack("=12x")
    mtu_ticks = burst_ticks(peak, peak_burst) if peak is not None and peak_burst is not None else 0
    parms = _ratespec(rate) + peakspec + struct.pack("=III", limit, burst_ticks(rate, burst), mtu_ticks)
    out = nla(TCA_TBF_PARMS, parms)
    if rate > U32_MAX:
        out += nla(TCA_TBF_RATE64, struct.pack("=Q", rate))
    if peak is not None and peak > U32_MAX:
        out += nla(TCA_TBF_PRATE64, struct.pack("=Q", peak))
    # The bursts in bytes as well: the kernel then derives the bucket times itself, without the
    # rounding of the tick values. The smaller of the two is the longest packet TBF sends whole;
    # it splits longer GSO packets into segments.
    out += nla(TCA_TBF_BURST, struct.pack("=I", burst))
    if peak_burst is not None:
        out += nla(TCA_TBF_PBURST, struct.pack("=I", peak_burst))
    return out


def tbf_options(plan: DirectionPlan) -> bytes:
    """Our TBF at the root: the rate, the burst, the queue, and (peak bucket) the split size.

    tc qdisc replace dev DEV root handle 6b63: tbf rate R burst B limit L \
        peakrate 1Pbit mtu SPLIT
    """
    assert plan.limit_bytes is not None
    if plan.split_bytes is None:
        return _tbf(rate=plan.rate_bytes_per_s, burst=plan.burst_bytes, limit=plan.limit_bytes)
    return _tbf(
        rate=plan.rate_bytes_per_s,
        burst=plan.burst_bytes,
        limit=plan.limit_bytes,
        peak=SPLITTER_PEAK_BYTES_PER_S,
        peak_burst=plan.split_bytes,
    )


def splitter_options(plan: DirectionPlan) -> bytes:
    """The queue under our HTB class: a TBF whose buckets never run dry, so it only splits
    packets longer than the split size and holds at most the queue limit.

    tc qdisc replace dev DEV parent 6b63:1 handle 6b64: tbf rate 500Tbit burst SPLIT limit L \
        peakrate 1Pbit mtu SPLIT
    """
    assert plan.limit_bytes is not None and plan.split_bytes is not None
    return _tbf(
        rate=SPLITTER_RATE_BYTES_PER_S,
        burst=plan.split_bytes,
        limit=plan.limit_bytes,
        peak=SPLITTER_PEAK_BYTES_PER_S,
        peak_burst=plan.split_bytes,
    )


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


def tbf_limit_bytes(options: bytes) -> int | None:
    """The queue limit in bytes of a dumped TBF's options."""
    parms = parse_attrs(options).get(TCA_TBF_PARMS)
    if parms is None or len(parms) < 28:
        return None
    return struct.unpack_from("=I", parms, 24)[0]


def fifo_limit(options: bytes) -> int | None:
    """The limit of a dumped bfifo (bytes) or pfifo (packets): a bare struct tc_fifo_qopt."""
    return struct.unpack_from("=I", options)[0] if len(options) >= 4 else None
