"""Throwaway network namespaces for kernel tests and the bandwidth benchmarks.

A ``VethPair`` is a "host" namespace and a "pod" namespace joined by a veth, with addresses, and
a sleeping process inside the pod namespace (so ``find_host_veth`` has a pid to start from).
With ``remote=True`` a third namespace hangs off the host by another veth and the host routes
between them: traffic from there to the pod is forwarded, as traffic from another node is.
Names carry a random suffix so parallel test runs never collide; everything is removed on exit,
also when the test fails. The real host's interfaces are never touched.

Traffic tools: ``iperf3_flow`` / ``iperf3_goodput_bps`` (bulk TCP, goodput from the receiver's
TCP byte count), ``udp_echo_server`` + ``udp_echo_rtts`` (a ping without iputils-ping: small UDP
probes echoed back, RTT per probe), ``tcp_window_rates`` (bytes the receiving application got
per short window). The in-namespace halves run as ``python -m tests.support.netns ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

HOST_ADDR = "10.213.0.1"
POD_ADDR = "10.213.0.2"
# The remote namespace's link to the host (only with veth_pair(remote=True)).
REMOTE_GW_ADDR = "10.213.1.1"
REMOTE_ADDR = "10.213.1.2"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*argv: str, check: bool = True, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout_s)


@dataclass
class VethPair:
    host_ns: str
    pod_ns: str
    host_ifname: str
    pod_ifname: str
    pod_pid: int
    remote_ns: str | None = None

    @property
    def host_ns_path(self) -> str:
        return f"/var/run/netns/{self.host_ns}"

    def tc(self, *args: str) -> str:
        """`tc` in the host namespace (tests cross-check with it; product code never runs it)."""
        return run("tc", "-n", self.host_ns, *args).stdout

    def ip_host(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "-n", self.host_ns, *args, check=check)

    def ip_pod(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "-n", self.pod_ns, *args, check=check)

    def host_links(self) -> list[str]:
        out = run("ip", "-n", self.host_ns, "-o", "link", "show").stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())

    def dumps(self) -> str:
        """Everything tc shows about the host veth: qdiscs, classes, ingress filters."""
        dev = self.host_ifname
        return "\n".join(
            [
                self.tc("qdisc", "show", "dev", dev),
                self.tc("class", "show", "dev", dev),
                self.tc("filter", "show", "dev", dev, "ingress"),
            ]
        )


@contextlib.contextmanager
def veth_pair(prefix: str = "kt", *, remote: bool = False) -> Iterator[VethPair]:
    """A host/pod namespace pair joined by a veth, cleaned up on exit.

    ``remote=True`` adds a third namespace (``remote_ns``, address ``REMOTE_ADDR``) joined to the
    host by a second veth, with the host forwarding between the two links.
    """
    suffix = secrets.token_hex(3)
    host_ns, pod_ns = f"{prefix}h-{suffix}", f"{prefix}p-{suffix}"
    remote_ns = f"{prefix}r-{suffix}" if remote else None
    host_if = f"v{prefix}{suffix}"
    sleeper = None
    try:
        run("ip", "netns", "add", host_ns)
        run("ip", "netns", "add", pod_ns)
        run("ip", "-n", host_ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        links = [(host_ns, host_if, HOST_ADDR), (pod_ns, "eth0", POD_ADDR)]
        if remote_ns is not None:
            run("ip", "netns", "add", remote_ns)
            run("ip", "-n", host_ns, "link", "add", f"r{prefix}{suffix}", "type", "veth",
                "peer", "name", "eth0", "netns", remote_ns)  # fmt: skip
            links += [(host_ns, f"r{prefix}{suffix}", REMOTE_GW_ADDR), (remote_ns, "eth0", REMOTE_ADDR)]
        for ns, dev, addr in links:
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        if remote_ns is not None:
            run("ip", "netns", "exec", host_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            run("ip", "-n", pod_ns, "route", "add", "default", "via", HOST_ADDR)
            run("ip", "-n", remote_ns, "route", "add", "default", "via", REMOTE_GW_ADDR)
        sleeper = subprocess.Popen(["ip", "netns", "exec", pod_ns, "sleep", "3600"])
        _wait_in_netns(sleeper.pid, pod_ns)
        yield VethPair(host_ns, pod_ns, host_if, "eth0", sleeper.pid, remote_ns)
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        for ns in (host_ns, pod_ns, remote_ns):
            if ns is not None:
                run("ip", "netns", "del", ns, check=False)


def _wait_in_netns(pid: int, ns: str, timeout_s: float = 5.0) -> None:
    # `ip netns exec` enters the namespace, then execs sleep: wait until the pid is in it.
    want = os.stat(f"/var/run/netns/{ns}").st_ino
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(f"/proc/{pid}/ns/net").st_ino == want and os.readlink(f"/proc/{pid}/exe").endswith("sleep"):
                return
        time.sleep(0.01)
    raise TimeoutError(f"pid {pid} did not enter netns {ns} within {timeout_s} s")


def ns_argv(ns: str | None, argv: list[str]) -> list[str]:
    return argv if ns is None else ["ip", "netns", "exec", ns, *argv]


class Flow:
    """A running iperf3 transfer; ``received()`` reads the receiver's TCP byte count."""

    def __init__(self, server_prefix: list[str], port: int):
        self.server_prefix = server_prefix
        self.port = port

    def received(self) -> tuple[float, int]:
        """(monotonic time, bytes received so far) of the data connection, per the kernel."""
        return _received(self.server_prefix, self.port)


@contextlib.contextmanager
def iperf3_flow(
    *,
    server_ns: str | None,
    client_ns: str | None,
    server_addr: str,
    seconds: float,
    port: int | None = None,
    congestion: str | None = None,
    server_argv_prefix: list[str] | None = None,
    client_argv_prefix: list[str] | None = None,
) -> Iterator[Flow]:
    """One bulk TCP transfer from an iperf3 client to its server, running for ``seconds``.

    Yields once data flows. ``congestion`` picks the sender's TCP congestion control (iperf3
    ``-C``; None = the namespace's default). ``*_argv_prefix`` run the commands another way
    (e.g. nsenter into a container's namespace). On exit both processes are ended.
    """
    port = port or 20000 + secrets.randbelow(20000)
    server_prefix = server_argv_prefix or ns_argv(server_ns, [])
    client_prefix = client_argv_prefix or ns_argv(client_ns, [])
    server = subprocess.Popen(
        server_prefix + ["iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = None
    try:
        argv = client_prefix + ["iperf3", "-c", server_addr, "-p", str(port), "-t", str(int(seconds + 0.999)), "-J"]
        if congestion is not None:
            argv += ["-C", congestion]
        deadline = time.monotonic() + 5
        while True:
            client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            first = _wait_for_bytes(server_prefix, port, client, timeout_s=5)
            if first is not None or time.monotonic() > deadline:
                break
            client.wait()  # refused: the server was not listening yet
            time.sleep(0.1)
        if first is None:
            out = client.communicate(timeout=seconds + 30)[0]
            raise RuntimeError(f"iperf3 transfer to {server_addr}:{port} did not start: {out[-500:]}")
        yield Flow(server_prefix, port)
        if client.poll() is not None and client.returncode != 0:
            result = json.loads(client.communicate()[0] or "{}")
            raise RuntimeError(f"iperf3 client failed: {result.get('error', client.returncode)}")
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()


def iperf3_goodput_bps(
    *,
    server_ns: str | None,
    client_ns: str | None,
    server_addr: str,
    duration_s: float = 3.0,
    omit_s: float = 1.0,
    port: int | None = None,
    congestion: str | None = None,
    server_argv_prefix: list[str] | None = None,
    client_argv_prefix: list[str] | None = None,
) -> float:
    """TCP goodput from an iperf3 client to its server, in bits per second.

    Measured where it is received: the data connection's ``bytes_received`` in the server's TCP
    stack (``ss -ti``), sampled ``omit_s`` after the transfer starts (slow start, the initial
    burst of tokens) and ``duration_s`` later. iperf3's own figures are not used for the rate:
    at low rates its reader wakes in bunches of tens of kilobytes and its end-of-test figure
    counts the time the test-end message waits in the shaped queue behind the data.
    ``*_argv_prefix`` run the commands another way (e.g. nsenter into a container's namespace).
    """
    with iperf3_flow(
        server_ns=server_ns,
        client_ns=client_ns,
        server_addr=server_addr,
        seconds=omit_s + duration_s + 1,
        port=port,
        congestion=congestion,
        server_argv_prefix=server_argv_prefix,
        client_argv_prefix=client_argv_prefix,
    ) as flow:
        time.sleep(omit_s)
        t0, bytes0 = flow.received()
        time.sleep(duration_s)
        t1, bytes1 = flow.received()
    return (bytes1 - bytes0) * 8 / (t1 - t0)


def pod_goodput_bps(
    netns_path: str, pod_ip: str, *, into_pod: bool, node_ip: str | None = None, duration_s: float = 3.0,
    omit_s: float = 1.0,
) -> float:
    """TCP goodput node -> pod (``into_pod``, iperf3's server in the pod's network namespace) or
    pod -> node (the client in the pod's namespace, the server on ``node_ip``, by default the pod's
    gateway: the CNI bridge), measured as ``iperf3_goodput_bps`` does."""
    enter = ["nsenter", f"--net={netns_path}"]
    if into_pod:
        return iperf3_goodput_bps(server_ns=None, client_ns=None, server_addr=pod_ip, duration_s=duration_s,
                                  omit_s=omit_s, server_argv_prefix=enter)
    if node_ip is None:
        route = run(*enter, "ip", "-4", "route", "show", "default").stdout.split()
        node_ip = route[route.index("via") + 1]
    return iperf3_goodput_bps(server_ns=None, client_ns=None, server_addr=node_ip, duration_s=duration_s,
                              omit_s=omit_s, client_argv_prefix=enter)


def goodput_ratios_within(
    measure: Callable[[], float], rate_bps: float, low: float, high: float, *, what: str, attempts: int = 3
) -> list[float]:
    """Goodput / ``rate_bps`` from ``measure()``, asserted within [low, high]; the readings, in order.

    The noise is one-sided: a shaper never lets more through than its rate, while a busy machine
    (a 2-core CI host, a TCG guest) or a retransmission timeout in the window only ever takes
    goodput away. So a reading above ``high`` fails at once, and only a reading below ``low`` is
    measured again, up to ``attempts`` readings in all; the message lists every reading.
    """
    ratios: list[float] = []
    for _ in range(attempts):
        ratio = measure() / rate_bps
        ratios.append(ratio)
        if ratio > high:
            break
        if ratio >= low:
            return ratios
    shown = ", ".join(f"{r:.3f}" for r in ratios)
    raise AssertionError(f"{what}: goodput / {rate_bps / 1e6:g} Mbit/s = {shown}, wanted {low}-{high}")


def _received(prefix: list[str], port: int) -> tuple[float, int]:
    """(when, bytes received) of the busiest TCP connection to ``port``, per the kernel."""
    before = time.monotonic()
    out = run(*prefix, "ss", "-tinH", "state", "established", f"( sport = :{port} )").stdout
    after = time.monotonic()
    counts = [int(m) for m in re.findall(r"bytes_received:(\d+)", out)]
    return (before + after) / 2, max(counts, default=0)


def _wait_for_bytes(prefix: list[str], port: int, client: subprocess.Popen, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and client.poll() is None:
        _when, count = _received(prefix, port)
        if count > 1_000:  # more than the control connection's handshake: data flows
            return count
        time.sleep(0.05)
    return None


# --- a ping without iputils-ping: UDP probes echoed back ------------------------------------------

PROBE_BYTES = 56  # ping's default payload; the frame is 98 bytes, as an ICMP echo's


@dataclass(frozen=True)
class EchoStats:
    """Round-trip times of the probes that came back, in send order, and how many were sent."""

    sent: int
    rtts_s: tuple[float, ...]

    @property
    def lost(self) -> int:
        return self.sent - len(self.rtts_s)

    def percentile_s(self, pct: float) -> float:
        """The ``pct``-th percentile RTT (nearest rank); lost probes count as infinitely late."""
        if not self.sent:
            raise ValueError("no probe was sent")
        ordered = sorted(self.rtts_s) + [float("inf")] * self.lost
        rank = max(1, -(-len(ordered) * pct // 100))  # ceil, at least the first
        return ordered[int(rank) - 1]


@contextlib.contextmanager
def udp_echo_server(ns: str | None, addr: str, port: int | None = None) -> Iterator[int]:
    """A UDP echo server in ``ns`` bound to ``addr``; yields its port once it listens."""
    port = port or 20000 + secrets.randbelow(20000)
    proc = subprocess.Popen(
        ns_argv(ns, [sys.executable, "-m", "tests.support.netns", "echo-server", addr, str(port)]),
        cwd=_REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"UDP echo server on {addr}:{port} in {ns} did not start")
        yield port
    finally:
        proc.kill()
        proc.communicate()


def udp_echo_rtts(
    ns: str | None, addr: str, port: int, *, duration_s: float, interval_s: float = 0.05, grace_s: float = 3.0
) -> EchoStats:
    """Send a probe every ``interval_s`` for ``duration_s`` from ``ns`` to the echo server, wait up
    to ``grace_s`` for the last replies, and return the RTTs. Blocks for about duration + grace."""
    argv = [sys.executable, "-m", "tests.support.netns", "echo-client", addr, str(port),
            str(duration_s), str(interval_s), str(grace_s)]  # fmt: skip
    out = subprocess.run(
        ns_argv(ns, argv), cwd=_REPO_ROOT, check=True, capture_output=True, text=True,
        timeout=duration_s + grace_s + 30,
    ).stdout  # fmt: skip
    result = json.loads(out)
    return EchoStats(sent=result["sent"], rtts_s=tuple(result["rtts_s"]))


def _echo_server(addr: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def _echo_client(addr: str, port: int, duration_s: float, interval_s: float, grace_s: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((addr, port))
    sent_at: list[float] = []
    rtts: dict[int, float] = {}
    start = time.monotonic()
    end_of_sending = start + duration_s
    deadline = end_of_sending + grace_s
    next_send = start
    while True:
        now = time.monotonic()
        if now >= next_send and now < end_of_sending:
            seq = len(sent_at)
            sent_at.append(time.monotonic())
            with contextlib.suppress(OSError):  # ENOBUFS/ECONNREFUSED: the probe counts as lost
                sock.send(struct.pack("=I", seq).ljust(PROBE_BYTES, b"\0"))
            next_send = start + len(sent_at) * interval_s
        if now >= deadline or (now >= end_of_sending and len(rtts) == len(sent_at)):
            break
        wait = (next_send if now < end_of_sending else deadline) - time.monotonic()
        ready, _, _ = select.select([sock], [], [], max(wait, 0))
        if ready:
            with contextlib.suppress(OSError):
                data = sock.recv(2048)
                got = time.monotonic()
                seq = struct.unpack_from("=I", data)[0]
                if seq < len(sent_at) and seq not in rtts:
                    rtts[seq] = got - sent_at[seq]
    print(json.dumps({"sent": len(sent_at), "rtts_s": [rtts[i] for i in sorted(rtts)]}))


# --- what the receiving application gets per window ------------------------------------------------


def tcp_window_rates(
    *,
    server_ns: str | None,
    client_ns: str | None,
    server_addr: str,
    duration_s: float,
    omit_s: float = 1.0,
    window_s: float = 0.1,
    congestion: str | None = None,
) -> list[float]:
    """Bulk TCP from ``client_ns`` to a sink in ``server_ns``: the rate in bit/s the receiving
    application read in each ``window_s`` window of ``duration_s``, after ``omit_s``."""
    port = 20000 + secrets.randbelow(20000)
    sink = subprocess.Popen(
        ns_argv(server_ns, [sys.executable, "-m", "tests.support.netns", "sink", server_addr, str(port),
                            str(omit_s + duration_s), str(window_s)]),
        cwd=_REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    source = None
    try:
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"TCP sink on {server_addr}:{port} did not start: {sink.stderr.read()[-500:]}")
        source = subprocess.Popen(
            ns_argv(client_ns, [sys.executable, "-m", "tests.support.netns", "source", server_addr, str(port),
                                congestion or ""]),
            cwd=_REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        out, err = sink.communicate(timeout=omit_s + duration_s + 30)
        if sink.returncode != 0:
            raise RuntimeError(f"TCP sink failed: {err[-500:]}")
        per_window = json.loads(out)
    finally:
        for proc in (source, sink):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()
    skip = round(omit_s / window_s)
    return [count * 8 / window_s for count in per_window[skip:]]


class WireWindows:
    """What interface ``ifname`` in ``ns`` received on the wire per ``window_s`` window, sampled from
    its rx_bytes counter for ``total_s`` from now, in a process inside the namespace (``ip netns
    exec`` mounts that namespace's /sys). Beside ``tcp_window_rates`` it separates the link's own
    pace from what the receiving application reads: after a loss, TCP holds back every byte behind
    the missing segment until its retransmission arrives, while the wire stays busy."""

    def __init__(self, ns: str | None, ifname: str, total_s: float, window_s: float = 0.1):
        self.window_s = window_s
        self.proc = subprocess.Popen(
            ns_argv(ns, [sys.executable, "-m", "tests.support.netns", "rx-windows", ifname, str(total_s), str(window_s)]),
            cwd=_REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def rates_bps(self, skip_s: float, tail_s: float) -> list[float]:
        """Bit/s per window, without the first ``skip_s`` and the last ``tail_s`` (the flow's start and end)."""
        out, err = self.proc.communicate(timeout=120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"rx-windows failed: {err[-500:]}")
        counts = json.loads(out)
        return [count * 8 / self.window_s for count in counts[round(skip_s / self.window_s):
                                                              len(counts) - round(tail_s / self.window_s)]]


def _rx_windows(ifname: str, total_s: float, window_s: float) -> None:
    path = f"/sys/class/net/{ifname}/statistics/rx_bytes"

    def read() -> int:
        with open(path) as f:
            return int(f.read())

    counts, previous = [], read()
    due = time.monotonic()
    for _ in range(round(total_s / window_s)):
        due += window_s
        time.sleep(max(0.0, due - time.monotonic()))
        current = read()
        counts.append(current - previous)
        previous = current
    print(json.dumps(counts))


def _sink(addr: str, port: int, total_s: float, window_s: float) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    first = conn.recv(65536)
    start = time.monotonic()  # windows count from the first data
    windows = [0] * round(total_s / window_s)
    windows[0] += len(first)
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= total_s:
            break
        ready, _, _ = select.select([conn], [], [], total_s - elapsed)
        if not ready:
            break
        data = conn.recv(65536)
        if not data:
            break
        index = int((time.monotonic() - start) / window_s)
        if index < len(windows):
            windows[index] += len(data)
    print(json.dumps(windows))


def _source(addr: str, port: int, congestion: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if congestion:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    sock.connect((addr, port))
    block = b"\0" * 65536
    with contextlib.suppress(OSError):
        while True:
            sock.sendall(block)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.netns", description="in-namespace traffic tools")
    sub = parser.add_subparsers(dest="tool", required=True)
    sub.add_parser("echo-server").add_argument("args", nargs=2)
    sub.add_parser("echo-client").add_argument("args", nargs=5)
    sub.add_parser("sink").add_argument("args", nargs=4)
    sub.add_parser("source").add_argument("args", nargs=3)
    sub.add_parser("rx-windows").add_argument("args", nargs=3)
    ns = parser.parse_args(argv)
    a = ns.args
    if ns.tool == "echo-server":
        _echo_server(a[0], int(a[1]))
    elif ns.tool == "echo-client":
        _echo_client(a[0], int(a[1]), float(a[2]), float(a[3]), float(a[4]))
    elif ns.tool == "sink":
        _sink(a[0], int(a[1]), float(a[2]), float(a[3]))
    elif ns.tool == "rx-windows":
        _rx_windows(a[0], float(a[1]), float(a[2]))
    else:
        _source(a[0], int(a[1]), a[2])


if __name__ == "__main__":
    _main()
