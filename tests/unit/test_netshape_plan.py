"""Pure planning of netshape: bounds, burst sizing, names, option bytes, snapshots."""

from __future__ import annotations

import json
import struct

import pytest

from netshape import OutOfRange, Snapshot, Unrestorable, ifb_name, kernel_bps
from netshape.plan import (
    IFNAMSIZ_MAX,
    MAX_RATE_BPS,
    MIN_RATE_BPS,
    OUR_CLASS_ID,
    OUR_LEAF_HANDLE,
    OUR_MAJOR,
    OUR_ROOT_HANDLE,
    SPLITTER_PEAK_BYTES_PER_S,
    SPLITTER_RATE_BYTES_PER_S,
    TCA_HTB_PARMS,
    TCA_HTB_RATE64,
    TCA_TBF_BURST,
    TCA_TBF_PARMS,
    TCA_TBF_PBURST,
    TCA_TBF_PRATE64,
    TCA_TBF_RATE64,
    U32_MAX,
    burst_ticks,
    default_burst_bytes,
    fifo_limit,
    htb_class_burst_bytes,
    htb_class_options,
    htb_class_rate_bytes,
    htb_quantum,
    parse_attrs,
    plan_direction,
    plan_rates,
    queue_limit_bytes,
    split_bytes,
    splitter_options,
    tbf_limit_bytes,
    tbf_options,
    tbf_rate_bytes,
)
from netshape.snapshot import TC_H_ROOT, SavedQdisc, TcObject, fmt_handle, record_root


def test_ifb_name_is_short_prefixed_and_stable():
    name = ifb_name("default/web-0/nginx")
    assert name.startswith("kcx")
    assert len(name) <= IFNAMSIZ_MAX
    assert name == ifb_name("default/web-0/nginx")
    assert name != ifb_name("default/web-1/nginx")
    assert name not in ("ifb0", "ifb1")


def test_ifb_name_rejects_empty_key():
    with pytest.raises(OutOfRange, match="target_key"):
        ifb_name("")


@pytest.mark.parametrize(
    ("rate_bps", "burst"),
    [
        (MIN_RATE_BPS, 3028),  # two frames
        (1_000_000, 3028),  # 20 ms = 2500 bytes (the 64 KiB floor before: 524 ms)
        (10_000_000, 25_000),  # 20 ms of the rate
        (100_000_000, 250_000),
        (1_000_000_000, 2_500_000),
    ],
)
def test_default_burst_is_twenty_ms_or_two_frames(rate_bps, burst):
    assert default_burst_bytes(rate_bps) == burst
    assert plan_direction("ingress", rate_bps).burst_bytes == burst


def test_burst_never_below_two_mtus():
    plan = plan_direction("ingress", 5_000_000, mtu_bytes=9000)
    assert plan.burst_bytes == 2 * (9000 + 14)
    plan = plan_direction("ingress", 10_000_000, mtu_bytes=65000)
    assert plan.burst_bytes == 2 * (65000 + 14)
    with pytest.raises(OutOfRange, match=r"burst 2000 bytes is below two frames of MTU 1500 \(3028 bytes\)"):
        plan_direction("egress", 10_000_000, burst_bytes=2000)


@pytest.mark.parametrize("rate", [MIN_RATE_BPS - 1, 0, -5, MAX_RATE_BPS + 1])
def test_rate_bounds(rate):
    with pytest.raises(OutOfRange, match=r"8000 bit/s \(8 kbit/s\) to 100000000000 bit/s \(100 Gbit/s\)"):
        plan_direction("ingress", rate)


def test_rate_bounds_inclusive_and_types():
    assert plan_direction("ingress", MIN_RATE_BPS).rate_bytes_per_s == 1000
    assert plan_direction("ingress", MAX_RATE_BPS).rate_bytes_per_s == 12_500_000_000
    with pytest.raises(OutOfRange, match="not an integer"):
        plan_direction("ingress", 1.5e6)
    with pytest.raises(OutOfRange, match="not an integer"):
        plan_direction("ingress", True)


def test_qdisc_kind_and_one_direction_at_least():
    with pytest.raises(OutOfRange, match="accepted: htb, tbf"):
        plan_direction("ingress", 10_000_000, kind="fq_codel")
    with pytest.raises(OutOfRange, match="no rate given"):
        plan_rates(ingress_bps=None, egress_bps=None)
    ingress, egress = plan_rates(ingress_bps=None, egress_bps=8_000_000)
    assert ingress is None and egress.rate_bps == 8_000_000


def test_burst_too_long_for_the_kernel_clock():
    # At 8 kbit/s a u32 of 64 ns ticks holds about 274 s, i.e. 274877 bytes.
    with pytest.raises(OutOfRange, match="at most 274877 bytes"):
        plan_direction("ingress", 8_000, burst_bytes=300_000)


def test_kernel_bps_rounds_to_whole_bytes():
    assert kernel_bps(10_000_000) == 10_000_000
    assert kernel_bps(8_001) == 8_000


def test_htb_class_options_roundtrip():
    plan = plan_direction("ingress", 100_000_000)
    options = htb_class_options(plan)
    attrs = parse_attrs(options)
    assert set(attrs) == {TCA_HTB_PARMS}
    assert htb_class_rate_bytes(options) == 12_500_000
    assert htb_class_burst_bytes(options) == pytest.approx(250_000, abs=1)
    rate, ceil = struct.unpack_from("=I", attrs[TCA_HTB_PARMS], 8)[0], struct.unpack_from("=I", attrs[TCA_HTB_PARMS], 20)[0]
    assert rate == ceil == 12_500_000
    # linklayer ethernet: the kernel needs no rate table
    assert attrs[TCA_HTB_PARMS][1] == 1


def test_htb_rate64_above_u32():
    plan = plan_direction("ingress", MAX_RATE_BPS)
    options = htb_class_options(plan)
    attrs = parse_attrs(options)
    assert TCA_HTB_RATE64 in attrs
    assert struct.unpack_from("=I", attrs[TCA_HTB_PARMS], 8)[0] == 0xFFFFFFFF
    assert htb_class_rate_bytes(options) == 12_500_000_000


def test_htb_quantum_within_kernel_bounds():
    assert htb_quantum(1000) == 1000
    assert htb_quantum(125_000_000) == 200_000
    assert htb_quantum(1_250_000) == 125_000


def test_tbf_options_carry_rate_burst_limit_and_split():
    plan = plan_direction("egress", 10_000_000, kind="tbf")
    assert (plan.burst_bytes, plan.limit_bytes, plan.split_bytes) == (25_000, 62_500, 1518)
    options = tbf_options(plan)
    attrs = parse_attrs(options)
    assert tbf_rate_bytes(options) == 1_250_000
    assert tbf_limit_bytes(options) == 62_500
    assert struct.unpack("=I", attrs[TCA_TBF_BURST])[0] == 25_000
    limit, buffer = struct.unpack_from("=II", attrs[TCA_TBF_PARMS], 24)
    assert limit == plan.limit_bytes
    assert buffer == burst_ticks(1_250_000, 25_000)
    # The peak bucket only sets the split size: the longest packet TBF sends whole.
    assert struct.unpack_from("=I", attrs[TCA_TBF_PARMS], 20)[0] == U32_MAX  # peak rate, > u32: below
    assert struct.unpack("=Q", attrs[TCA_TBF_PRATE64])[0] == SPLITTER_PEAK_BYTES_PER_S
    assert struct.unpack("=I", attrs[TCA_TBF_PBURST])[0] == 1518
    assert TCA_TBF_RATE64 not in attrs


# --- the queue: sized from a latency budget ------------------------------------------------------


@pytest.mark.parametrize(
    ("rate_bps", "limit"),
    [
        (MIN_RATE_BPS, 4 * 1514),  # 50 ms = 50 bytes: four frames
        (200_000, 4 * 1514),  # 1250 bytes
        (1_000_000, 6250),  # 50 ms of the rate, just above four frames (6056)
        (2_000_000, 12_500),
        (100_000_000, 625_000),
        (10_000_000_000, 62_500_000),
    ],
)
def test_queue_is_fifty_ms_of_the_rate_or_four_frames(rate_bps, limit):
    assert queue_limit_bytes(rate_bps // 8, 0.050) == limit
    for kind in ("htb", "tbf"):
        assert plan_direction("ingress", rate_bps, kind=kind).limit_bytes == limit


def test_queue_follows_the_latency_budget_and_mtu():
    assert plan_direction("ingress", 10_000_000, latency_s=0.2).limit_bytes == 250_000
    assert plan_direction("ingress", 10_000_000, latency_s=0.001).limit_bytes == 4 * 1514
    assert plan_direction("ingress", 10_000_000, latency_s=10).limit_bytes == 12_500_000
    assert plan_direction("ingress", 1_000_000, mtu_bytes=9000).limit_bytes == 4 * 9014
    plan = plan_direction("ingress", 2_000_000, latency_s=0.025)
    assert plan.queue_s == pytest.approx(0.025)
    assert plan_rates(ingress_bps=2_000_000, egress_bps=2_000_000, latency_s=0.1)[1].limit_bytes == 25_000


@pytest.mark.parametrize("latency", [0.0009, 0, -1, 10.001, 3600])
def test_latency_bounds(latency):
    with pytest.raises(OutOfRange, match=r"latency .* s is out of range; accepted: 0.001 s \(1 ms\) to 10 s"):
        plan_direction("ingress", 10_000_000, latency_s=latency)


@pytest.mark.parametrize("latency", ["50ms", True, float("nan")])
def test_latency_must_be_seconds(latency):
    with pytest.raises(OutOfRange, match="is not a number of seconds"):
        plan_direction("egress", 10_000_000, latency_s=latency)


def test_queue_the_kernel_cannot_hold_is_refused():
    # 10 s of 100 Gbit/s is 125 GB; a qdisc limit is a u32.
    with pytest.raises(OutOfRange, match=r"latency 10 s at 100000000000 bit/s needs a queue of 125000000000 bytes; accepted: at most 4294967295 bytes, 0.344 s"):
        plan_direction("ingress", MAX_RATE_BPS, latency_s=10)
    assert plan_direction("ingress", MAX_RATE_BPS, latency_s=0.3).limit_bytes == 3_750_000_000


@pytest.mark.parametrize(
    ("rate_bps", "latency_s", "split"),
    [
        (1_000_000, 0.05, 1518),  # 1 ms = 125 bytes: one frame (with a VLAN tag) is never split
        (10_000_000, 0.05, 1518),
        (100_000_000, 0.05, 12_500),  # 1 ms of the rate
        (1_000_000_000, 0.05, 125_000),  # longer than any GSO packet: nothing is split
        (1_000_000_000, 0.001, 31_250),  # a quarter of a 125 kB queue: four always fit
        (10_000_000_000, 0.05, 1_250_000),
    ],
)
def test_split_size(rate_bps, latency_s, split):
    plan = plan_direction("ingress", rate_bps, latency_s=latency_s)
    assert plan.split_bytes == split
    assert split_bytes(rate_bps // 8, plan.limit_bytes) == split
    assert plan.limit_bytes // 4 >= min(split, 1514)  # four packets of the longest kind always fit


def test_tbf_never_splits_above_its_burst():
    plan = plan_direction("ingress", 1_000_000_000, kind="tbf", burst_bytes=20_000)
    assert plan.split_bytes == 20_000


def test_splitter_never_holds_a_packet_back():
    plan = plan_direction("ingress", 2_000_000)
    options = splitter_options(plan)
    attrs = parse_attrs(options)
    assert tbf_limit_bytes(options) == 12_500
    assert tbf_rate_bytes(options) == SPLITTER_RATE_BYTES_PER_S
    assert struct.unpack("=Q", attrs[TCA_TBF_RATE64])[0] == SPLITTER_RATE_BYTES_PER_S
    assert struct.unpack("=Q", attrs[TCA_TBF_PRATE64])[0] == SPLITTER_PEAK_BYTES_PER_S
    assert struct.unpack("=I", attrs[TCA_TBF_BURST])[0] == struct.unpack("=I", attrs[TCA_TBF_PBURST])[0] == 1518
    # The kernel refuses a peak rate at or below the rate; both dwarf the fastest class we make.
    assert SPLITTER_PEAK_BYTES_PER_S > SPLITTER_RATE_BYTES_PER_S > 100 * MAX_RATE_BPS // 8
    # A 64 KB GSO packet costs under 2 ns of the splitter's tokens: they never run out.
    assert 65536 * 1_000_000_000 / SPLITTER_RATE_BYTES_PER_S < 2
    # Its bucket times are 0 ticks at these rates; the kernel takes the byte values instead.
    assert struct.unpack_from("=I", attrs[TCA_TBF_PARMS], 28)[0] == 0


def test_leaf_handle_is_ours_and_not_the_roots():
    assert OUR_LEAF_HANDLE >> 16 == OUR_MAJOR + 1
    assert OUR_LEAF_HANDLE & 0xFFFF == 0
    assert OUR_LEAF_HANDLE != OUR_ROOT_HANDLE and OUR_CLASS_ID >> 16 == OUR_MAJOR
    assert fmt_handle(OUR_LEAF_HANDLE) == "6b64:"


def test_fifo_limit_parses_a_bare_struct():
    assert fifo_limit(struct.pack("=I", 1000)) == 1000
    assert fifo_limit(b"") is None
    assert tbf_limit_bytes(b"") is None


def test_htb_quantum_given_explicitly_at_10_gbit():
    # Derived, it would be rate / r2q = 125 MB, which the kernel clamps to 200000 with a warning.
    options = htb_class_options(plan_direction("ingress", 10_000_000_000))
    assert struct.unpack_from("=I", parse_attrs(options)[TCA_HTB_PARMS], 32)[0] == 200_000


def test_legacy_plan_is_the_one_before_queues_were_sized():
    htb = plan_direction("ingress", 1_000_000, legacy=True)
    assert (htb.burst_bytes, htb.limit_bytes, htb.split_bytes, htb.queue_s) == (64 * 1024, None, None, None)
    tbf = plan_direction("ingress", 10_000_000, kind="tbf", legacy=True)
    assert (tbf.burst_bytes, tbf.limit_bytes, tbf.split_bytes) == (64 * 1024, 64 * 1024 + 250_000, None)
    attrs = parse_attrs(tbf_options(tbf))
    assert TCA_TBF_PBURST not in attrs and TCA_TBF_PRATE64 not in attrs
    assert struct.unpack_from("=I", attrs[TCA_TBF_PARMS], 12 + 8)[0] == 0  # no peak rate


def test_snapshot_json_roundtrip():
    snap = Snapshot(
        host_ifname="veth1234",
        target_key="ns/pod/c",
        root_taken=True,
        root_before=SavedQdisc(kind="tbf", handle=0x80010000, options_hex="2800aa"),
        ingress_taken=True,
        ingress_qdisc_created=False,
    )
    text = json.dumps(snap.to_dict())
    assert Snapshot.from_dict(json.loads(text)) == snap
    with pytest.raises(OutOfRange, match="snapshot version 7"):
        Snapshot.from_dict({**snap.to_dict(), "version": 7})


def _q(kind, handle, parent=TC_H_ROOT, options=b"\x01"):
    return TcObject(what="qdisc", kind=kind, handle=handle, parent=parent, options=options)


def test_record_root_default_and_single_qdisc():
    assert record_root("v", [_q("noqueue", 0)]) is None
    assert record_root("v", []) is None
    # A TBF shows one class of its own (its inner queue): still a single qdisc to restore.
    tbf = _q("tbf", 0x80010000, options=b"\x28\x00")
    saved = record_root("v", [tbf, TcObject("class", "tbf", 0x80010001, 0x80010000)])
    assert saved == SavedQdisc("tbf", 0x80010000, "2800")


def test_record_root_refuses_a_tree():
    htb = _q("htb", 0x10000)
    objects = [
        htb,
        TcObject("class", "htb", 0x10001, 0x10000),
        _q("sfq", 0x100000, parent=0x10001),
        TcObject("filter", "u32", 0x800, 0x10000),
    ]
    with pytest.raises(Unrestorable, match=r"v has a root qdisc tree htb 1: with 1 classes, 1 child qdiscs, 1 filters"):
        record_root("v", objects)


def test_fmt_handle_and_our_major():
    assert fmt_handle(0x80010000) == "8001:"
    assert fmt_handle(0x10010) == "1:10"
    assert fmt_handle(OUR_MAJOR << 16) == "6b63:"


def test_snapshot_of_another_device_or_target_is_not_applicable():
    from netshape.shaper import _applicable

    snap = Snapshot("veth1", "k", root_taken=True)
    assert _applicable(snap, "veth1", "k") is snap
    assert _applicable(snap, "veth2", "k") == Snapshot("veth2", "k")
    assert _applicable(snap, "veth1", "other") == Snapshot("veth1", "other")
    assert _applicable(None, "veth1", "k") == Snapshot("veth1", "k")


def test_only_our_ifb_names_are_swept():
    from netshape.shaper import _is_our_ifb_name

    assert _is_our_ifb_name(ifb_name("a/b"))
    for name in ("ifb0", "ifb1", "bwp0cni", "kcx", "kcxZZZZZZZZZZZZ", "kcx0123456789a"):
        assert not _is_our_ifb_name(name), name
