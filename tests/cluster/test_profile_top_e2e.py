"""Cluster mode for #13, end to end (the kubectl-chaos executable -> fake API server -> the real
chaos-agent process -> real containerd and cgroups): a stepped profile written as ``spec.profile``
rows and run by the agent, step by step with the status following; a reset in the middle of a
ramp; ``top`` through the API (the watch-until mark, figures in ``status.observed``) with the API
writes a watched and an unwatched experiment cost, counted at the fake API server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from daemonset import crd, watch
from tests.cluster.helpers import KUBECTL_CHAOS, mirror, quota_us, wait_for
from tests.support.node import ContainerSpec

BUSY = ("sh", "-c", "while :; do :; done")


def _obj(fakeapi, name: str) -> dict:
    return fakeapi.get(fakeapi.resource_type(crd.GROUP, crd.PLURAL), "shop", name)


def _observe_writes(fakeapi) -> int:
    """The agents' status.observed applies (field manager chaos-agent/NODE/observe) so far."""
    return sum(1 for r in fakeapi.requests if r.method == "PATCH" and r.path.split("?")[0].endswith("/status")
               and "observe" in r.path)


def _mark_writes(fakeapi, user: str = "alice") -> int:
    """Writes by the plugin's user on ResourceChaos objects (top's watch-until mark: set, refreshed, taken off)."""
    return sum(1 for r in fakeapi.requests if r.method == "PATCH" and r.user == user and "resourcechaos" in r.path)


def test_ramp_in_cluster_mode_steps_on_time_and_status_follows(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("ramp-1", "shop", [ContainerSpec(cpu_millicpu=1000)])
    mirror(fakeapi, pod)
    started = time.monotonic()
    out = run("ramp-1", "--set-cpu", "1000m..400m", "--over", "3s", "--steps", "4", "-o", "json")
    assert out.returncode == 0, out.stderr
    (target,) = json.loads(out.stdout)["targets"]
    assert target["created"] is True
    obj = _obj(fakeapi, "ramp-1.app")
    assert obj["spec"]["cpuMillicores"] == 1000
    assert obj["spec"]["profile"] == [{"afterSeconds": 1.0, "cpuMillicores": 800},
                                      {"afterSeconds": 2.0, "cpuMillicores": 600},
                                      {"afterSeconds": 3.0, "cpuMillicores": 400}]
    # Each step on time, measured in the cgroup file, and the status entry following it.
    seen = {}
    for quota, step in ((80_000, 2), (60_000, 3), (40_000, 4)):
        wait_for(lambda q=quota: quota_us(pod) == q, timeout_s=6, what=f"quota {quota}")
        seen[step] = time.monotonic() - started
        entry = wait_for(lambda s=step: (e := crd.target_entry(_obj(fakeapi, "ramp-1.app")["status"], "ramp-1"))
                         and (e.get("profile") or {}).get("step") == s and e, timeout_s=5,
                         what=f"status at step {step}")
        assert entry["profile"]["steps"] == 4
        assert {c["resource"]: c["applied"] for c in entry["changes"]}["cpu"] == quota // 100
        if step < 4:
            assert entry["profile"]["next"] == {"cpu": quota // 100 - 200} and entry["profile"]["nextStepAt"]
        else:
            assert "nextStepAt" not in entry["profile"]
    print(f"\n[cluster ramp] step in force at {', '.join(f'{s}: {t:.2f}s' for s, t in seen.items())} after the"
          " command started (due 1, 2, 3 s after the agent applied)")
    assert seen[2] < seen[3] < seen[4] and seen[4] - seen[2] >= 1.8
    out = run("status", "-o", "json")
    assert "step 4/4" in json.loads(out.stdout)["items"][0]["message"], out.stdout

    # A further change without a range ends the profile; created says it changed one in force.
    out = run("ramp-1", "--set-cpu", "300m", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["targets"][0]["created"] is False
    assert quota_us(pod) == 30_000 and "profile" not in _obj(fakeapi, "ramp-1.app")["spec"]
    assert run("--reset", "ramp-1").returncode == 0
    assert quota_us(pod) == 100_000


def test_reset_mid_ramp_restores_the_originals_and_no_step_follows(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("ramp-2", "shop", [ContainerSpec(cpu_millicpu=1000, memory_bytes=256 * 2**20)])
    mirror(fakeapi, pod)
    out = run("ramp-2", "--set-cpu", "900m..300m", "--over", "4s", "--steps", "3", "--set-memory", "200Mi")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: quota_us(pod) == 60_000, timeout_s=6, what="step 2")
    out = run("--reset", "ramp-2")
    assert out.returncode == 0, out.stderr
    assert quota_us(pod) == 100_000
    time.sleep(2.5)  # past the third step's time: nothing of the profile is left to run
    assert quota_us(pod) == 100_000
    assert not agent.records()


def test_top_through_the_api_writes_only_while_watched(cluster, pods):
    fakeapi, agent, run = cluster
    pod = pods.run("busy-1", "shop", [ContainerSpec(cpu_millicpu=1000, argv=BUSY)])
    mirror(fakeapi, pod)
    assert run("busy-1", "--set-cpu", "300m").returncode == 0
    assert quota_us(pod) == 30_000

    # Unwatched: no figures, no writes.
    before = _observe_writes(fakeapi)
    time.sleep(3)
    assert _observe_writes(fakeapi) == before == 0
    assert "observed" not in (_obj(fakeapi, "busy-1.app").get("status") or {})

    # One refresh: the mark is set, the agent's figures come back, the mark is taken off.
    out = run("top", "-o", "json")
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    print(f"\n[cluster top] {row}")
    assert row["pod"] == "busy-1" and not row.get("errors"), row
    assert 0.2 <= row["cpu"]["usedCores"] <= 0.4, row
    assert watch.WATCH_ANNOTATION not in (_obj(fakeapi, "busy-1.app")["metadata"].get("annotations") or {})
    wait_for(lambda: not (_obj(fakeapi, "busy-1.app").get("status") or {}).get("observed"), timeout_s=5,
             what="the agent to take its figures off once nobody watches")

    # Watched for ~6 s with top -w: one figure write per 2 s on this node, the mark's own writes,
    # then nothing once top is gone.
    writes, marks = _observe_writes(fakeapi), _mark_writes(fakeapi)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "KUBECONFIG": run.kubeconfig,
           "PYTHONFAULTHANDLER": "1"}
    # Ctrl-C as in a terminal: a test run started in the background (``cmd &`` in a script) has
    # SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler.
    top = subprocess.Popen([KUBECTL_CHAOS, "top", "-w", "-o", "json"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)
    top.send_signal(signal.SIGINT)
    try:
        stdout, stderr = top.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        top.send_signal(signal.SIGABRT)
        stdout, stderr = top.communicate(timeout=10)
        raise AssertionError(f"top -w did not end on SIGINT: {stderr}") from None
    assert top.returncode == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) >= 2 and all(0.2 <= r["cpu"]["usedCores"] <= 0.4 for r in rows), rows
    time.sleep(2)
    watched, marked = _observe_writes(fakeapi) - writes, _mark_writes(fakeapi) - marks
    time.sleep(3)
    assert _observe_writes(fakeapi) - writes == watched, "the agent kept writing after top had gone"
    print(f"[cluster top] watched ~6 s: {watched} figure writes by the agent, {marked} mark writes by top;"
          " unwatched 3 s: 0")
    assert 2 <= watched <= 5 and 1 <= marked <= 3, (watched, marked)

    # Ended by SIGTERM (timeout(1), a cancelled CI job): the mark comes off at once as well.
    top = subprocess.Popen([KUBECTL_CHAOS, "top", "-w", "-o", "json"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_for(lambda: watch.WATCH_ANNOTATION in (_obj(fakeapi, "busy-1.app")["metadata"].get("annotations") or {}),
             timeout_s=10, what="top -w to mark the object")
    top.send_signal(signal.SIGTERM)
    stdout, stderr = top.communicate(timeout=30)
    assert top.returncode == 0, stderr
    assert watch.WATCH_ANNOTATION not in (_obj(fakeapi, "busy-1.app")["metadata"].get("annotations") or {})
    assert run("--reset", "busy-1").returncode == 0
    assert quota_us(pod) == 100_000
