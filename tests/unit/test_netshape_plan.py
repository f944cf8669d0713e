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
    OUR_MAJOR,
    TCA_HTB_PARMS,
    TCA_HTB_RATE64,
    TCA_TBF_BURST,
    burst_ticks,
    default_burst_bytes,
    htb_class_burst_bytes,
    htb_class_options,
    htb_class_rate_bytes,
    htb_quantum,
    parse_attrs,
    plan_direction,
    plan_rates,
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
        (1_000_000, 64 * 1024),  # 10 ms = 1250 bytes: the 64 KiB floor wins
        (100_000_000, 125_000),  # 10 ms of 100 Mbit/s
        (1_000_000_000, 1_250_000),
    ],
)
def test_default_burst_is_ten_ms_or_64k(rate_bps, burst):
    assert default_burst_bytes(rate_bps) == burst
    assert plan_direction("ingress", rate_bps).burst_bytes == burst


def test_burst_never_below_two_mtus():
    plan = plan_direction("ingress", 10_000_000, mtu_bytes=9000)
    assert plan.burst_bytes == 64 * 1024
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
    assert htb_class_burst_bytes(options) == pytest.approx(125_000, abs=1)
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


def test_tbf_options_carry_rate_burst_and_limit():
    plan = plan_direction("egress", 10_000_000, kind="tbf")
    options = tbf_options(plan)
    attrs = parse_attrs(options)
    assert tbf_rate_bytes(options) == 1_250_000
    assert struct.unpack("=I", attrs[TCA_TBF_BURST])[0] == 64 * 1024
    limit, buffer = struct.unpack_from("=II", attrs[1], 24)
    assert limit == plan.limit_bytes > plan.burst_bytes
    assert buffer == burst_ticks(1_250_000, 64 * 1024)


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
