"""Cluster mode end to end: ``kubectl-chaos --set-cpu`` from process start to "Applied" and exit.

Starts the fake API server, a private containerd node with one pod (mirrored into the API as a
kubelet would register it), and the real ``chaos-agent`` process (``--kubeconfig`` pointing at the
fake API server, as in tests/cluster); then runs the real
``kubectl-chaos`` executable N times, alternating the CPU limit so every run is a real change,
and times each run from process start to exit (the plugin exits after it has seen the agent's
"Applied" status). Also reports the agent's share (the object's create/patch to its status write,
both seen at the API server) and the floor (Python start + ``import kubernetes``).
Goal: p50 under 1 s. For comparison, native in-place pod resize takes 0.16 to 1.8 s to report a
resize on recent Kubernetes.

    .venv/bin/python bench/bench_cluster.py [--runs 20] [--json out.json]   (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

GOAL_P50_S = 1.0
NODE = "bench-node"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_cluster: needs root (the test node runs containerd and cgroups)", file=sys.stderr)
        return 2

    from daemonset import crd
    from tests.support.fakeapi import FakeKubeAPI
    from tests.support.node import ContainerSpec, TestNode

    work = tempfile.mkdtemp(prefix="bench-cluster-")
    crd_manifest = yaml.safe_load(open(os.path.join(ROOT, "daemonset", "manifests", "crd.yaml")))
    with FakeKubeAPI() as api, TestNode() as node:
        api.install_crd(crd_manifest)
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})
        pod = node.run_pod("bench-pod", "bench", [ContainerSpec(cpu_millicpu=1000)])
        api.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod.name, "namespace": "bench", "uid": pod.uid},
                    "spec": {"nodeName": NODE, "containers": [{"name": "app"}]}, "status": {"phase": "Running"}},
                   keep_uid=True)
        kubeconfig = api.write_kubeconfig(os.path.join(work, "kubeconfig"), namespace="bench")
        agent_log = os.path.join(work, "agent.log")
        with open(agent_log, "ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "daemonset.agent", "--cri-endpoint", str(node.socket),
                 "--listen", f"unix://{work}/agent.sock", "--state-dir", os.path.join(work, "state"),
                 "--node-name", NODE, "--kubeconfig", kubeconfig, "--no-sweep-orphans", "--log-format", "json"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        env = dict(os.environ, KUBECONFIG=kubeconfig, HOME=work)
        try:
            deadline = time.monotonic() + 30
            while "cluster mode: watching" not in open(agent_log).read():
                if agent.poll() is not None or time.monotonic() > deadline:
                    print(f"bench_cluster: chaos-agent did not start:\n{open(agent_log).read()[-3000:]}",
                          file=sys.stderr)
                    return 1
                time.sleep(0.05)
            floor = []
            for _ in range(5):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import kubernetes.client, kubernetes.config"], check=True)
                floor.append(time.perf_counter() - t0)
            e2e, agent_share = [], []
            quota_file = pod.container_cgroup_dir("cpu") / "cpu.cfs_quota_us"
            for i in range(args.runs):
                millicpu = 500 if i % 2 == 0 else 400
                first = len(api.requests)
                t0 = time.perf_counter()
                out = subprocess.run([os.path.join(BIN, "kubectl-chaos"), f"--set-cpu={millicpu}m", "bench-pod"],
                                     env=env, capture_output=True, text=True)
                e2e.append(time.perf_counter() - t0)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                assert int(quota_file.read_text()) == millicpu * 100, quota_file.read_text()
                seen = api.requests[first:]
                asked = next(r.at_s for r in seen if r.method in ("POST", "PATCH") and crd.PLURAL in r.path)
                answered = next(r.at_s for r in seen if r.method == "PUT" and r.path.endswith("/status"))
                agent_share.append(answered - asked)
            subprocess.run([os.path.join(BIN, "kubectl-chaos"), "--reset", "bench-pod"], env=env, check=True,
                           capture_output=True)
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(agent.pid, signal.SIGKILL)
                    agent.wait()
            node.delete_pod(pod)

    result = {
        "runs": args.runs,
        "e2e_p50_s": statistics.median(e2e), "e2e_p90_s": percentile(e2e, 0.9), "e2e_max_s": max(e2e),
        "agent_p50_s": statistics.median(agent_share), "agent_p90_s": percentile(agent_share, 0.9),
        "python_import_kubernetes_p50_s": statistics.median(floor),
        "goal_p50_s": GOAL_P50_S,
    }
    print(f"kubectl-chaos --set-cpu, cluster mode, process start to exit after 'Applied' ({args.runs} runs):")
    print(f"  end to end      p50 {result['e2e_p50_s'] * 1000:6.0f} ms   p90 {result['e2e_p90_s'] * 1000:6.0f} ms"
          f"   max {result['e2e_max_s'] * 1000:6.0f} ms   (goal p50 < {GOAL_P50_S * 1000:.0f} ms)")
    print(f"  agent share     p50 {result['agent_p50_s'] * 1000:6.0f} ms   p90 {result['agent_p90_s'] * 1000:6.0f} ms"
          "   (object written -> status written, at the API server)")
    print(f"  floor           p50 {result['python_import_kubernetes_p50_s'] * 1000:6.0f} ms"
          "   (python + import kubernetes, nothing else)")
    print("  native in-place pod resize reports in 0.16 to 1.8 s on recent Kubernetes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["e2e_p50_s"] < GOAL_P50_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
