"""Throwaway network namespaces for kernel tests and the bandwidth benchmark.

A ``VethPair`` is a "host" namespace and a "pod" namespace joined by a veth, with addresses, and
a sleeping process inside the pod namespace (so ``find_host_veth`` has a pid to start from).
Names carry a random suffix so parallel test runs never collide; everything is removed on exit,
also when the test fails. The real host's interfaces are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

HOST_ADDR = "10.213.0.1"
POD_ADDR = "10.213.0.2"


def run(*argv: str, check: bool = True, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout_s)


@dataclass
class VethPair:
    host_ns: str
    pod_ns: str
    host_ifname: str
    pod_ifname: str
    pod_pid: int

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
def veth_pair(prefix: str = "kt") -> Iterator[VethPair]:
    """A host/pod namespace pair joined by a veth, cleaned up on exit."""
    suffix = secrets.token_hex(3)
    host_ns, pod_ns = f"{prefix}h-{suffix}", f"{prefix}p-{suffix}"
    host_if = f"v{prefix}{suffix}"
    sleeper = None
    try:
        run("ip", "netns", "add", host_ns)
        run("ip", "netns", "add", pod_ns)
        run("ip", "-n", host_ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        for ns, dev, addr in ((host_ns, host_if, HOST_ADDR), (pod_ns, "eth0", POD_ADDR)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        sleeper = subprocess.Popen(["ip", "netns", "exec", pod_ns, "sleep", "3600"])
        _wait_in_netns(sleeper.pid, pod_ns)
        yield VethPair(host_ns, pod_ns, host_if, "eth0", sleeper.pid)
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        for ns in (host_ns, pod_ns):
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


def iperf3_goodput_bps(
    *,
    server_ns: str | None,
    client_ns: str | None,
    server_addr: str,
    duration_s: float = 3.0,
    omit_s: float = 1.0,
    port: int | None = None,
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
        total_s = omit_s + duration_s + 1
        argv = client_prefix + ["iperf3", "-c", server_addr, "-p", str(port), "-t", str(int(total_s + 0.999)), "-J"]
        deadline = time.monotonic() + 5
        while True:
            client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            first = _wait_for_bytes(server_prefix, port, client, timeout_s=5)
            if first is not None or time.monotonic() > deadline:
                break
            client.wait()  # refused: the server was not listening yet
            time.sleep(0.1)
        if first is None:
            out = client.communicate(timeout=total_s + 30)[0]
            raise RuntimeError(f"iperf3 transfer to {server_addr}:{port} did not start: {out[-500:]}")
        time.sleep(omit_s)
        t0, bytes0 = _received(server_prefix, port)
        time.sleep(duration_s)
        t1, bytes1 = _received(server_prefix, port)
        out = client.communicate(timeout=total_s + 30)[0]
        result = json.loads(out or "{}")
        if "error" in result:
            raise RuntimeError(f"iperf3 client failed: {result['error']}")
        return (bytes1 - bytes0) * 8 / (t1 - t0)
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()


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
