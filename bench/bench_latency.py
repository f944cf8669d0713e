"""Queueing delay of a shaped link: RTT under a saturating TCP flow, goodput, and smoothness.

Runs as root in throwaway network namespaces: a "pod", the "host" whose veth netshape shapes, and
a "remote" namespace routed through the host (traffic from there is forwarded, as traffic from
another node is). At 1, 10, 100 and 1000 Mbit/s, into the pod (remote -> pod) and out of it
(pod -> remote), one iperf3 TCP flow (cubic, the Linux default, fills whatever queue it is
given) saturates the link while UDP probes (a ping without iputils-ping) go from the remote
namespace to the pod and back. Each row is run with netshape's queue ("new") and with the
plan from before queues were sized ("old": the kernel's 1000-packet leaf under HTB, 64 KiB
burst floor), in the same run.

Goals for "new": RTT p99 under load <= the queue's budget (limit / rate) + one full frame at the
rate + the unloaded RTT p99, and goodput >= 0.93 of the rate. Exits 1 when a goal is missed.
Then, at 1 and 2 Mbit/s: the rate per 100 ms window / configured rate, p5 / p95, twice over: on
the wire (the receiving interface's byte counter: the shaper's own pace; a GSO super-packet let
through whole would show as a burst and a gap) and as the receiving application reads it (TCP on
top: after a loss it holds back every byte behind the missing segment until the retransmission
arrives, while the wire stays busy). Reported, no goal: one window is only 8-17 full frames.

    .venv/bin/python bench/bench_latency.py [--qdisc htb|tbf] [--cc cubic|bbr|...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import netshape  # noqa: E402
from netshape import shaper  # noqa: E402
from netshape.plan import ETH_HEADER_BYTES, plan_rates  # noqa: E402
from tests.support.netns import (  # noqa: E402
    POD_ADDR,
    REMOTE_ADDR,
    WireWindows,
    iperf3_flow,
    tcp_window_rates,
    udp_echo_rtts,
    udp_echo_server,
    veth_pair,
)

RATES_BPS = (1_000_000, 10_000_000, 100_000_000, 1_000_000_000)
WINDOW_RATES_BPS = (1_000_000, 2_000_000)
GOODPUT_GOAL = 0.93
TARGET_KEY = "bench/latency"
MTU_BYTES = 1500
FRAME_BYTES = MTU_BYTES + ETH_HEADER_BYTES
PROBE_FRAME_BYTES = 98  # 56 bytes of payload, as ping's


def _plan(rate_bps: int, qdisc: str, legacy: bool, latency_s: float | None = None):
    return lambda mtu: plan_rates(ingress_bps=rate_bps, egress_bps=rate_bps, qdisc=qdisc, mtu_bytes=mtu, legacy=legacy,
                                  latency_s=latency_s)


def _queue_s(vp, rate_bps: int, direction: str) -> float:
    """The queue's budget as the kernel holds it: limit / rate (packets of full frames if counted in packets)."""
    queue = netshape.read_queue(vp.host_ifname, TARGET_KEY, netns=vp.host_ns)
    limit_bytes = getattr(queue, f"{direction}_limit_bytes")
    if limit_bytes is None:
        limit_bytes = getattr(queue, f"{direction}_limit_packets") * FRAME_BYTES
    return limit_bytes * 8 / rate_bps


def measure_rtt(vp, direction: str, rate_bps: int, queue_s: float, cc: str) -> dict:
    """Unloaded RTT, then RTT and goodput while one TCP flow saturates ``direction``."""
    omit_s, duration_s = (3.0, 8.0) if rate_bps < 10_000_000 else (2.0, 5.0)
    # Probes at 20 Hz, but never more than 1% of the link (at 1 Mbit/s: every 78 ms).
    interval_s = max(0.05, 100 * PROBE_FRAME_BYTES * 8 / rate_bps)
    # Keep the flow running until the last probe is back: a late probe still measures the queue.
    grace_s = min(queue_s * 1.5 + 1.0, 20.0)
    if direction == "ingress":
        ends = dict(server_ns=vp.pod_ns, client_ns=vp.remote_ns, server_addr=POD_ADDR)
    else:
        ends = dict(server_ns=vp.remote_ns, client_ns=vp.pod_ns, server_addr=REMOTE_ADDR)
    with udp_echo_server(vp.pod_ns, POD_ADDR) as port:
        idle = udp_echo_rtts(vp.remote_ns, POD_ADDR, port, duration_s=1.0, interval_s=0.05, grace_s=1.0)
        with iperf3_flow(seconds=omit_s + duration_s + grace_s + 5, congestion=cc, **ends) as flow:
            time.sleep(omit_s)
            t0, bytes0 = flow.received()
            loaded = {}
            prober = threading.Thread(
                target=lambda: loaded.update(
                    stats=udp_echo_rtts(
                        vp.remote_ns, POD_ADDR, port, duration_s=duration_s, interval_s=interval_s, grace_s=grace_s
                    )
                )
            )
            prober.start()
            time.sleep(duration_s)
            t1, bytes1 = flow.received()
            prober.join()
    stats = loaded["stats"]
    goodput = (bytes1 - bytes0) * 8 / (t1 - t0)
    return {
        "idle_p50_s": idle.percentile_s(50) if idle.rtts_s else None,
        "idle_p99_s": _received_percentile(idle.rtts_s, 99),
        "p50_s": _received_percentile(stats.rtts_s, 50),
        "p99_s": _received_percentile(stats.rtts_s, 99),
        "probes_sent": stats.sent,
        "probes_lost": stats.lost,
        "goodput_bps": goodput,
        "goodput_ratio": goodput / rate_bps,
    }


def _received_percentile(rtts: tuple[float, ...], pct: float) -> float | None:
    """Nearest-rank percentile of the probes that came back (as ping reports; losses separately)."""
    if not rtts:
        return None
    ordered = sorted(rtts)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def measure_windows(vp, direction: str, rate_bps: int, cc: str) -> dict:
    if direction == "ingress":
        ends = dict(server_ns=vp.pod_ns, client_ns=vp.remote_ns, server_addr=POD_ADDR)
    else:
        ends = dict(server_ns=vp.remote_ns, client_ns=vp.pod_ns, server_addr=REMOTE_ADDR)
    # The receiver's eth0 on the wire, over the same flow: its first 2.5 s (the flow starts a few
    # hundred ms after the counter) and its last 0.5 s are left out.
    wire = WireWindows(ends["server_ns"], "eth0", total_s=7.0)
    app = sorted(r / rate_bps for r in tcp_window_rates(duration_s=5.0, omit_s=2.0, congestion=cc, **ends))
    on_wire = sorted(r / rate_bps for r in wire.rates_bps(skip_s=2.5, tail_s=0.5))
    return {
        "p5": _received_percentile(tuple(app), 5),
        "p95": _received_percentile(tuple(app), 95),
        "mean": sum(app) / len(app),
        "wire_p5": _received_percentile(tuple(on_wire), 5),
        "wire_p95": _received_percentile(tuple(on_wire), 95),
        "wire_mean": sum(on_wire) / len(on_wire),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qdisc", choices=("htb", "tbf"), default="htb")
    parser.add_argument("--cc", default="cubic", help="the TCP congestion control of the bulk flows (default cubic)")
    parser.add_argument("--no-windows", action="store_true", help="skip the 100 ms window measurement")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--latency-ms", type=int, metavar="MS",
                        help="the queue budget of the new rows (what --latency sets; default netshape's, 50)")
    parser.add_argument("--rates", metavar="BPS,...", help="bit/s to measure (default 1e6,1e7,1e8,1e9)")
    args = parser.parse_args(argv)
    latency_s = None if args.latency_ms is None else args.latency_ms / 1000
    rates = RATES_BPS if args.rates is None else tuple(int(float(r)) for r in args.rates.split(","))
    if os.geteuid() != 0:
        print("bench_latency: needs root (network namespaces, tc)", file=sys.stderr)
        return 2

    rows, windows = [], []
    started = time.monotonic()
    with veth_pair("kl", remote=True) as vp:
        for rate in rates:
            for direction in ("ingress", "egress"):
                for mode in ("new", "old"):
                    # Shaped afresh for each run: unshaping drops what a run left queued (the
                    # old queue holds up to 12 s at 1 Mbit/s after its flow has ended).
                    snap = shaper._shape(vp.host_ifname, TARGET_KEY, _plan(rate, args.qdisc, mode == "old", latency_s),
                                         snapshot=None, netns=vp.host_ns)  # fmt: skip
                    try:
                        queue_s = _queue_s(vp, rate, direction)
                        row = {"rate_bps": rate, "mode": mode, "direction": direction, "queue_s": queue_s}
                        row.update(measure_rtt(vp, direction, rate, queue_s, args.cc))
                        row["bound_s"] = queue_s + FRAME_BYTES * 8 / rate + (row["idle_p99_s"] or 0.0)
                        rows.append(row)
                        _print_row(row)
                    finally:
                        netshape.unshape(vp.host_ifname, TARGET_KEY, snap, netns=vp.host_ns)
        if not args.no_windows:
            for rate in WINDOW_RATES_BPS:
                for direction in ("ingress", "egress"):
                    for mode in ("new", "old"):
                        snap = shaper._shape(vp.host_ifname, TARGET_KEY, _plan(rate, args.qdisc, mode == "old", latency_s),
                                             snapshot=None, netns=vp.host_ns)  # fmt: skip
                        try:
                            result = {"rate_bps": rate, "mode": mode, "direction": direction}
                            result.update(measure_windows(vp, direction, rate, args.cc))
                            windows.append(result)
                        finally:
                            netshape.unshape(vp.host_ifname, TARGET_KEY, snap, netns=vp.host_ns)

    misses = _print_table(rows, args)
    if windows:
        _print_windows(windows)
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"qdisc": args.qdisc, "cc": args.cc, "rows": rows, "windows": windows}, fh, indent=2)
    return 1 if misses else 0


def _print_row(row: dict) -> None:
    print(
        f"  {row['mode']} {_fmt_rate(row['rate_bps'])} {row['direction']}: p99 {_ms(row['p99_s'])} "
        f"goodput {row['goodput_ratio']:.3f}",
        file=sys.stderr,
        flush=True,
    )


def _print_table(rows: list[dict], args) -> int:
    print(
        f"netshape {args.qdisc}, one {args.cc} TCP flow + UDP probes: RTT under load vs the goal "
        f"(budget + 1 frame + unloaded p99), goodput / rate (goal >= {GOODPUT_GOAL})"
    )
    head = (
        f"{'rate':>10} {'dir':>7} {'queue':>5} | {'queue':>8} {'idle p99':>8} {'p50':>9} {'p99':>9} "
        f"{'goal':>8} {'p99/goal':>8} {'lost':>7} | {'goodput':>7}"
    )
    print(head)
    print("-" * len(head))
    misses = 0
    for row in rows:
        rtt_ratio = row["p99_s"] / row["bound_s"] if row["p99_s"] is not None else float("inf")
        marks = ""
        if row["mode"] == "new":
            if rtt_ratio > 1.0:
                marks += " RTT-MISS"
            if row["goodput_ratio"] < GOODPUT_GOAL:
                marks += " GOODPUT-MISS"
            misses += bool(marks)
        print(
            f"{_fmt_rate(row['rate_bps']):>10} {row['direction']:>7} {row['mode']:>5} | {_ms(row['queue_s']):>8} "
            f"{_ms(row['idle_p99_s']):>8} {_ms(row['p50_s']):>9} {_ms(row['p99_s']):>9} {_ms(row['bound_s']):>8} "
            f"{rtt_ratio:>8.2f} {row['probes_lost']:>3}/{row['probes_sent']:<3} | {row['goodput_ratio']:>7.3f}{marks}"
        )
    print("queue: the limit the kernel holds, as time at the rate ('old' HTB: 1000 packets of 1514 bytes)")
    return misses


def _print_windows(windows: list[dict]) -> None:
    print()
    print("rate per 100 ms window / configured rate: on the wire (the receiving interface) | as the receiving"
          " application read it")
    head = (f"{'rate':>10} {'dir':>7} {'queue':>5} | {'p5':>6} {'p95':>6} {'mean':>6} | "
            f"{'p5':>6} {'p95':>6} {'mean':>6}")
    print(head)
    print("-" * len(head))
    for w in windows:
        print(
            f"{_fmt_rate(w['rate_bps']):>10} {w['direction']:>7} {w['mode']:>5} | "
            f"{w['wire_p5']:>6.3f} {w['wire_p95']:>6.3f} {w['wire_mean']:>6.3f} | "
            f"{w['p5']:>6.3f} {w['p95']:>6.3f} {w['mean']:>6.3f}"
        )


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def _fmt_rate(bps: int) -> str:
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


if __name__ == "__main__":
    sys.exit(main())
