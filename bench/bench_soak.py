"""chaos-agent soak on a throwaway containerd node (root): does the agent stay flat?

1,000 apply/reset cycles against the real agent process (CPU and memory through CRI on one
container, bandwidth every tenth cycle), with the agent's RSS sampled every 100 cycles and the
supervisor's scheduled moments read from its metrics. Goals: RSS after the soak within 10 MiB of
the RSS after the first 100 cycles (the baseline of the same run: warm caches, loaded modules),
zero scheduled moments left once everything is reset, every reset exact (cgroup files as before).

    .venv/bin/python bench/bench_soak.py [--cycles 1000] [--json out.json]

Exits 1 when a goal is missed. An hour of simulated resyncs on a fake clock is a unit test
(tests/unit/test_engine.py::test_an_hour_of_resyncs_schedules_nothing_new).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_agent import AgentProcess, rss_mib  # noqa: E402
from daemonset.api.gen import agent_pb2  # noqa: E402
from tests.support.node import ContainerSpec, TestNode  # noqa: E402

MiB = 2**20


def scheduled(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("chaos_agent_scheduled_moments "):
                return float(line.split()[1])
    return float("nan")


def files(pod) -> tuple[str, ...]:
    return tuple((pod.container_cgroup_dir(c) / f).read_text().strip()
                 for c, f in (("cpu", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-soak-", dir="/tmp"))
    from tests.node.test_agent import free_port

    port = free_port()
    with TestNode() as node:
        agent = AgentProcess(node, workdir, extra_args=("--metrics-address", f"127.0.0.1:{port}"))
        try:
            pod = node.run_pod("soak", "bench", [ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)])
            original = files(pod)
            target = agent_pb2.Target(namespace="bench", pod="soak")
            rss: list[tuple[int, float]] = []
            inexact = 0
            started = time.monotonic()
            for i in range(1, args.cycles + 1):
                changes = agent_pb2.Changes(cpu_millicpu=200 + i % 7 * 100, memory_bytes=(96 + i % 5 * 8) * MiB)
                if i % 10 == 0:
                    changes.ingress_bps = 10_000_000
                agent.stub.Apply(agent_pb2.ApplyRequest(target=target, changes=changes, duration_s=3600), timeout=60)
                agent.stub.Revert(agent_pb2.RevertRequest(target=target), timeout=60)
                inexact += files(pod) != original
                if i % 100 == 0:
                    rss.append((i, rss_mib(agent.proc.pid)))
            elapsed = time.monotonic() - started
            left = scheduled(port)
        finally:
            agent.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    base = rss[0][1]
    growth = rss[-1][1] - base
    print(f"{'cycles':>8} {'RSS MiB':>8}")
    for i, r in rss:
        print(f"{i:>8} {r:>8.1f}")
    print(f"{args.cycles} apply/reset cycles in {elapsed:.1f} s ({elapsed / args.cycles * 1000:.1f} ms per cycle)")
    print(f"RSS growth after the first 100 cycles: {growth:+.1f} MiB (goal <= 10 MiB): "
          f"{'met' if growth <= 10 else 'MISSED'}")
    print(f"scheduled moments left: {left:g} (goal 0): {'met' if left == 0 else 'MISSED'}")
    print(f"inexact resets: {inexact} (goal 0): {'met' if inexact == 0 else 'MISSED'}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rss_mib": rss, "growth_mib": growth, "scheduled_left": left,
                                                       "inexact": inexact, "elapsed_s": elapsed}))
    return 0 if growth <= 10 and left == 0 and inexact == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
