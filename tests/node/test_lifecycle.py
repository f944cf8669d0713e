"""The experiment lifecycle on the real node, in the cases users hit every day (issue #9).

A pod re-created with the same name, a revert the kernel refuses, the runtime down across an
expiry, methods mixed in every order, concurrent clients on one container and on one pod, a full
and a damaged state directory, kill -9 at random moments of an apply and of a reset, an in-place
resize, a stopped sandbox. Every assertion is on what can be observed: cgroup files, the runtime's
own view, network devices, the state directory, the agent's CPU time and log.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import random
import shutil
import subprocess
import tempfile
import threading
import time

import grpc
import psutil
import pytest

from daemonset.api.gen import agent_pb2
from tests.cluster.helpers import SocketRelay
from tests.node.test_agent import (
    Agent,
    cpu_files,
    ifb_exists,
    mem_files,
    read,
    wait_until,
)
from tests.node.test_agent_cli import chaos
from tests.support.node import ContainerSpec

MiB = 2**20
CRI, CGROUP, AUTO = agent_pb2.METHOD_CRI, agent_pb2.METHOD_CGROUP, agent_pb2.METHOD_AUTO
# What the container's and its pod's limits are, file by file, plus the runtime's own view: a reset is
# exact when all of it reads as before the first change.
_CONTAINER_FILES = {"cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"),
                    "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.soft_limit_in_bytes")}
_POD_FILES = {"cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"),
              "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")}


def state_of(pod, node, name: str | None = None) -> dict[str, str]:
    """Every limit file of the container and its pod, and the runtime's view of the container."""
    out = {}
    for ctl, files in _CONTAINER_FILES.items():
        for f in files:
            out[f"container/{f}"] = read(pod.container_cgroup_dir(ctl, name) / f)
    for ctl, files in _POD_FILES.items():
        for f in files:
            out[f"pod/{f}"] = read(pod.cgroup_dirs[ctl] / f)
    linux = node.client.container_status(pod.container_id(name), verbose=False).status.resources.linux
    out["runtime/cpu_quota"] = str(linux.cpu_quota)
    out["runtime/cpu_period"] = str(linux.cpu_period)
    out["runtime/cpu_shares"] = str(linux.cpu_shares)
    out["runtime/memory"] = str(linux.memory_limit_in_bytes)
    return out


def diff(a: dict[str, str], b: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {k: (a[k], b.get(k, "?")) for k in a if a[k] != b.get(k)}


@pytest.fixture
def make_agent(node):
    made: list[tuple[Agent, pathlib.Path]] = []

    def start(**kw) -> Agent:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-life-", dir="/tmp"))
        a = Agent(node, workdir, **kw)
        made.append((a, workdir))
        return a.start()

    yield start
    for a, workdir in made:
        a.stop()
        subprocess.run(["umount", "-l", str(workdir / "state")], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def agent(make_agent):
    return make_agent(extra_args=("--retry-max", "4"))


def log_lines(agent: Agent, words: str) -> list[str]:
    return [line for line in agent.log.read_text(errors="replace").splitlines() if words in line]


def phase_of(agent: Agent, pod: str) -> agent_pb2.Experiment | None:
    return next((e for e in agent.list() if e.target.pod == pod), None)


# ---------------------------------------------------------------- rule 1: another pod is another pod


def test_recreated_pod_with_the_same_name_inherits_nothing(agent, pods, node):
    spec = [ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)]
    old = pods.run("web-0", containers=spec)
    agent.apply("default", "web-0", cpu_millicpu=1500, memory_bytes=64 * MiB, ingress_bps=4_000_000,
                egress_bps=4_000_000, duration_s=600)
    assert cpu_files(old) == ("150000", "150000") and ifb_exists(old)
    old.delete()
    new = pods.run("web-0", containers=spec)  # a StatefulSet's new pod: same name, new UID
    fresh = state_of(new, node)
    time.sleep(3)  # six drift passes
    assert state_of(new, node) == fresh, "the new pod was touched"
    assert cpu_files(new) == ("50000", "50000") and mem_files(new)[0] == str(128 * MiB)
    assert agent.list() == [] and agent.records() == []
    assert not ifb_exists(old) and not ifb_exists(new)
    # A change on the new pod starts from its own originals.
    resp = agent.apply("default", "web-0", cpu_millicpu=200)
    assert resp.resources[0].original.value == 500
    agent.revert("default", "web-0")
    assert state_of(new, node) == fresh


def test_pod_replaced_between_requests_ends_the_old_experiment(agent, pods, node):
    spec = [ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)]
    old = pods.run("db-0", containers=spec)
    agent.apply("default", "db-0", cpu_millicpu=300, egress_bps=2_000_000)
    agent.stop()  # nobody watches while the pod is replaced
    old.delete()
    new = pods.run("db-0", containers=spec)
    fresh = state_of(new, node)
    agent.start()
    assert wait_until(lambda: agent.list() == [], 5)
    assert state_of(new, node) == fresh and not ifb_exists(old)
    assert log_lines(agent, "pod replaced")


# ---------------------------------------------------------------- rule 2, 3: refused revert


# 200 MiB of anonymous memory on a signal: dd's buffer, held while its write to a pipe nobody reads
# blocks (the pod's /dev/shm is 64 MiB, too small for this).
HOG = ("sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.1; done; dd if=/dev/zero bs=209715200 count=1 | sleep 3600 &"
       " echo $! > /tmp/reader; while :; do sleep 1; done")
# The reader gone, dd's write fails (SIGPIPE) and its buffer is freed.
FREE = ["sh", "-c", "kill $(cat /tmp/reader)"]


def test_refused_revert_is_retried_with_backoff_and_finishes_by_itself(agent, pods, node):
    pod = pods.run("held", containers=[ContainerSpec("app", argv=HOG, cpu_millicpu=500, memory_bytes=128 * MiB)])
    original = state_of(pod, node)
    agent.apply("default", "held", memory_bytes=512 * MiB, cpu_millicpu=300, duration_s=2)
    node.client.exec_sync(pod.container_id(), ["touch", "/tmp/go"], timeout_s=5)
    usage = pod.container_cgroup_dir("memory") / "memory.usage_in_bytes"
    assert wait_until(lambda: int(read(usage)) > 200 * MiB, 20)
    exp = wait_until(lambda: (e := phase_of(agent, "held")) is not None and e.phase == "revert-failing" and e, 10)
    assert exp, agent.log_tail()
    assert "memory cannot go back to its original 128Mi yet" in exp.failure and "it cannot give back" in exp.failure
    # CPU went back at once; memory waits; drift must not bring the chaos back meanwhile.
    proc = psutil.Process(agent.proc.pid)
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    lines0 = len(agent.log.read_text().splitlines())
    time.sleep(10)
    cpu_share = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    lines = len(agent.log.read_text().splitlines()) - lines0
    print(f"refused revert: agent CPU {cpu_share:.2%} of a core, {lines} log lines in 10 s")
    # A spin reads half a core or more; backed-off retries read 1-2% here (see the runtime-down test).
    assert cpu_share < 0.25 and lines <= 12
    assert cpu_files(pod)[0] == "50000" and mem_files(pod)[0] == str(512 * MiB)
    assert node.client.container_info(pod.container_id()).state == "running"
    # A reset now says exactly what is still changed and when the agent tries again.
    with pytest.raises(grpc.RpcError) as err:
        agent.revert("default", "held")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "still changed: memory 512Mi (original 128Mi)" in err.value.details()
    assert "tries again in" in err.value.details()
    # Freed: the next try finishes it, without anyone asking.
    node.client.exec_sync(pod.container_id(), FREE, timeout_s=5)
    assert wait_until(lambda: agent.list() == [], 15), agent.log_tail()
    assert state_of(pod, node) == original and agent.records() == []
    assert node.client.container_info(pod.container_id()).state == "running"
    oom = read(pod.container_cgroup_dir("memory") / "memory.oom_control")
    assert "oom_kill 0" in oom


# ---------------------------------------------------------------- rule 5: methods mixed, exact reset


@pytest.mark.parametrize(("first", "second"), [
    ({"cpu_millicpu": 300, "memory_bytes": 96 * MiB}, {"cpu_millicpu": 400, "method": CGROUP}),
    ({"cpu_millicpu": 1200, "memory_bytes": 200 * MiB}, {"cpu_millicpu": 1100, "method": CGROUP}),
    ({"cpu_millicpu": 400, "method": CGROUP}, {"memory_bytes": 96 * MiB}),
    ({"memory_bytes": 200 * MiB, "method": CGROUP}, {"cpu_millicpu": 1500, "method": CRI}),
])
def test_mixed_methods_then_reset_is_exact(agent, pods, node, first, second):
    pod = pods.run("mix", containers=[ContainerSpec("app", cpu_millicpu=1000, memory_bytes=128 * MiB)])
    original = state_of(pod, node)
    agent.apply("default", "mix", **first)
    agent.apply("default", "mix", **second)
    # What the runtime holds never contradicts the experiment (a later CRI change sends all its values).
    want_cpu = second.get("cpu_millicpu", first.get("cpu_millicpu"))
    if want_cpu:
        assert cpu_files(pod)[0] == str(want_cpu * 100)
    agent.apply("default", "mix", memory_bytes=100 * MiB)  # a third change through the runtime
    if want_cpu:
        assert cpu_files(pod)[0] == str(want_cpu * 100), "a memory change put back an older CPU value"
    back = agent.revert("default", "mix")
    assert all(not r.in_force.unknown for r in back.resources)
    assert diff(original, state_of(pod, node)) == {}
    time.sleep(1.5)  # drift passes: nothing comes back
    assert diff(original, state_of(pod, node)) == {} and agent.list() == []


def test_random_sequences_of_methods_reset_exactly(agent, pods, node):
    pod = pods.run("seq", containers=[ContainerSpec("app", cpu_millicpu=1000, memory_bytes=128 * MiB)])
    original = state_of(pod, node)
    rng = random.Random(9)
    exact = 0
    rounds = 20
    for _ in range(rounds):
        for _ in range(rng.randint(1, 4)):
            change = rng.choice([{"cpu_millicpu": rng.choice([200, 700, 1300, 1800])},
                                 {"memory_bytes": rng.choice([96, 160, 256]) * MiB},
                                 {"cpu_millicpu": rng.choice([300, 1500]), "memory_bytes": rng.choice([112, 200]) * MiB}])
            agent.apply("default", "seq", method=rng.choice([AUTO, CRI, CGROUP]), **change)
        agent.revert("default", "seq")
        d = diff(original, state_of(pod, node))
        exact += not d
        assert not d, d
    print(f"exact resets after random method sequences: {exact}/{rounds}")


# ---------------------------------------------------------------- rule 5, 6: concurrency


def test_four_clients_with_random_commands_then_exact_reset(agent, pods, node):
    pod = pods.run("crowd", containers=[ContainerSpec("app", cpu_millicpu=1000, memory_bytes=256 * MiB)])
    original = state_of(pod, node)
    exact = 0
    runs = 4
    for run in range(runs):
        def client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(12):
                try:
                    if rng.random() < 0.25:
                        agent.revert("default", "crowd")
                    else:
                        agent.apply("default", "crowd", method=rng.choice([AUTO, CGROUP]),
                                    **rng.choice([{"cpu_millicpu": rng.choice([300, 900, 1500])},
                                                  {"memory_bytes": rng.choice([112, 286, 300]) * MiB},
                                                  {"ingress_bps": 20_000_000}]))
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.ABORTED, e.details()  # a conflict, said cleanly

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(client, [run * 10 + i for i in range(4)]))
        agent.revert("default", "crowd")
        d = diff(original, state_of(pod, node))
        exact += not d
        assert not d, d
        assert not ifb_exists(pod) and agent.records() == []
    print(f"exact resets after four random clients: {exact}/{runs}")


def test_reset_racing_a_change_keeps_the_originals(agent, pods, node):
    pod = pods.run("racer", containers=[ContainerSpec("app", cpu_millicpu=1000, memory_bytes=256 * MiB)])
    original = state_of(pod, node)
    for _ in range(20):
        agent.apply("default", "racer", memory_bytes=200 * MiB)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a = pool.submit(agent.revert, "default", "racer")
            b = pool.submit(agent.apply, "default", "racer", cpu_millicpu=600)
            a.result(), b.result()
        agent.revert("default", "racer")
        assert diff(original, state_of(pod, node)) == {}


def test_two_containers_shaping_one_pod_at_once(agent, pods, node):
    pod = pods.run("duo", containers=[ContainerSpec("a", cpu_millicpu=300), ContainerSpec("b", cpu_millicpu=300)])
    veth_qdiscs_before = _qdiscs_of_pod_veth(pod)
    for i in range(20):
        rate = 4_000_000 + 80_000 * i  # a whole number of bytes per second: reads back exactly

        def shape(container: str, rate: int = rate) -> str:
            try:
                agent.apply("default", "duo", container, ingress_bps=rate, egress_bps=5_000_000)
                return "ok"
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.ABORTED and "already shaped" in e.details(), e.details()
                return "conflict"

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            outcomes = sorted(pool.map(shape, ["a", "b"]))
        assert outcomes == ["conflict", "ok"]
        [exp] = agent.list()
        assert {r.in_force.value for r in exp.resources} == {rate, 5_000_000}
        agent.revert("default", "duo", exp.target.container)
        assert not ifb_exists(pod) and agent.list() == []
        assert _qdiscs_of_pod_veth(pod) == veth_qdiscs_before


def _qdiscs_of_pod_veth(pod) -> list[str]:
    from netshape import find_host_veth

    host = find_host_veth(_pid(pod)).ifname
    out = subprocess.run(["ip", "-j", "link", "show", host], capture_output=True, text=True, check=True).stdout
    index = json.loads(out)[0]["ifindex"]
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(f"{q.get_attr('TCA_KIND')}:{q['handle']:x}:{q['parent']:x}" for q in ipr.get_qdiscs(index))


def _pid(pod) -> int:
    return pod.node.client.container_info(next(iter(pod.containers.values()))).pid


# ---------------------------------------------------------------- rule 7: runtime down, disk full


def test_runtime_down_across_an_expiry(make_agent, pods, node, tmp_path):
    relay = SocketRelay(str(node.socket), pathlib.Path(tempfile.mkdtemp(prefix="kcx-relay-", dir="/tmp")) / "cri.sock")
    relay.restore()
    try:
        agent = make_agent(cri_endpoint=str(relay.path), extra_args=("--retry-max", "4"))
        pod = pods.run("outage", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)])
        original = state_of(pod, node)
        agent.apply("default", "outage", cpu_millicpu=200, memory_bytes=96 * MiB, ingress_bps=3_000_000,
                    egress_bps=3_000_000, duration_s=2)
        relay.cut()
        proc = psutil.Process(agent.proc.pid)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        size0 = agent.log.stat().st_size
        time.sleep(10)
        cpu_share = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        grown = agent.log.stat().st_size - size0
        print(f"runtime down across an expiry: agent CPU {cpu_share:.2%} of a core, log +{grown} bytes in 10 s")
        # What this guards against is a retry that spins or logs at every turn: a spin reads half a core
        # or more. The backed-off retries read 2-3% of a core here and 7.8% on the CI machine (run 14);
        # the expiry's own kernel revert and each try's gRPC reconnect fall inside the window.
        assert cpu_share < 0.25 and grown < 20_000
        # The kernel side is back already (direct writes need no runtime); the runtime's view waits.
        assert cpu_files(pod)[0] == "50000" and mem_files(pod)[0] == str(128 * MiB) and not ifb_exists(pod)
        exp = phase_of(agent, "outage")
        assert exp is not None and exp.phase == "revert-failing" and "runtime" in exp.failure
        # A restart while the runtime is down: the agent starts and serves.
        agent.kill9()
        agent.start()
        assert phase_of(agent, "outage").phase == "revert-failing"
        relay.restore()
        assert wait_until(lambda: agent.list() == [], 15), agent.log_tail()
        assert diff(original, state_of(pod, node)) == {} and agent.records() == []
    finally:
        relay.cut()


def test_bandwidth_reset_while_the_runtime_is_down(make_agent, pods, node):
    relay = SocketRelay(str(node.socket), pathlib.Path(tempfile.mkdtemp(prefix="kcx-relay-", dir="/tmp")) / "cri.sock")
    relay.restore()
    try:
        agent = make_agent(cri_endpoint=str(relay.path))
        pod = pods.run("bwdown", containers=[ContainerSpec("app", cpu_millicpu=500)])
        agent.apply("default", "bwdown", ingress_bps=3_000_000, egress_bps=3_000_000)
        relay.cut()
        agent.kill9()
        agent.start()  # starts without the runtime
        back = agent.revert("default", "bwdown")
        assert back.was_active and not ifb_exists(pod) and agent.list() == []
    finally:
        relay.cut()


def _fill(directory: pathlib.Path) -> None:
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_state_filesystem(node, pods, make_agent):
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kcx-full-", dir="/tmp"))
    state = workdir / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(state)], check=True)
    agent = Agent(node, workdir, extra_args=("--retry-max", "4"))
    try:
        agent.start()
        pod = pods.run("full", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)])
        original = state_of(pod, node)
        agent.apply("default", "full", cpu_millicpu=200, ingress_bps=3_000_000)
        (state / "experiments" / "..").resolve()
        _fill(state)
        # A new experiment is refused with nothing changed ...
        other = pods.run("full2", containers=[ContainerSpec("app", cpu_millicpu=500)])
        with pytest.raises(grpc.RpcError) as err:
            agent.apply("default", "full2", cpu_millicpu=100)
        assert "No space left" in err.value.details() and "nothing was changed" in err.value.details()
        assert cpu_files(other)[0] == "50000"
        # ... and a reset still works.
        back = agent.revert("default", "full")
        assert back.was_active and diff(original, state_of(pod, node)) == {} and not ifb_exists(pod)
        assert agent.list() == [] and agent.records() == []
        # An expiry on a full filesystem: reverted once, no busy loop.
        (state / "filler").unlink()
        agent.apply("default", "full", cpu_millicpu=300, duration_s=1.5)
        _fill(state)
        assert wait_until(lambda: agent.list() == [], 6)
        assert diff(original, state_of(pod, node)) == {}
    finally:
        agent.stop()
        subprocess.run(["umount", "-l", str(state)], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- rule 8: damaged state


@pytest.mark.parametrize("damage", ["truncated", "empty", "no-target", "string-number", "future-schema"])
def test_damaged_record_is_listed_cleaned_and_reset(agent, pods, node, damage):
    pod = pods.run("dmg", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)])
    keep = pods.run("keep", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "dmg", cpu_millicpu=300, ingress_bps=3_000_000, egress_bps=3_000_000)
    agent.apply("default", "keep", cpu_millicpu=200, duration_s=600)
    agent.kill9()
    [path] = [p for p in (agent.state_dir / "experiments").glob("*.json") if '"dmg"' in p.read_text()]
    record = json.loads(path.read_text())
    if damage == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    elif damage == "empty":
        path.write_text("")
    elif damage == "no-target":
        del record["target"]
        path.write_text(json.dumps(record))
    elif damage == "string-number":
        record["started_at"] = "yesterday"
        path.write_text(json.dumps(record))
    else:
        record["schema"] = 99
        path.write_text(json.dumps(record))
    agent.start()  # no single record stops the agent from starting
    resp = agent.list_response()
    assert [e.target.pod for e in resp.experiments] == ["keep"]  # the others still recovered and listed
    [bad] = resp.damaged
    assert bad.file == str(path) and bad.reason
    # What is recognisably ours is removed: the IFB and our qdiscs on the pod's veth.
    assert wait_until(lambda: not ifb_exists(pod), 5)
    assert bad.key in ("", "default/dmg/app")
    with pytest.raises(grpc.RpcError) as err:
        agent.apply("default", "dmg", "app", cpu_millicpu=200)
    assert err.value.code() == grpc.StatusCode.ABORTED and "damaged" in err.value.details()
    back = agent.revert("default", "dmg", "app")
    assert back.was_active and back.not_restored
    text = "; ".join(back.not_restored)
    assert "cpu 300m" in text and "memory 128Mi" in text and "re-create the container" in text
    assert not path.exists() and agent.list_response().damaged == []
    # From here on the container is an ordinary one again.
    agent.apply("default", "dmg", "app", cpu_millicpu=200)
    agent.revert("default", "dmg", "app")
    agent.revert("default", "keep")
    assert cpu_files(keep)[0] == "50000"


def test_cli_status_shows_damaged_records_and_unknown_values(agent, pods, node):
    pod = pods.run("cli-dmg", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "cli-dmg", cpu_millicpu=300)
    agent.kill9()
    [path] = (agent.state_dir / "experiments").glob("*.json")
    path.write_text("{\"schema\": 2, \"key\": \"default/cli-dmg/app\"")
    agent.start()
    res = chaos(agent.address, "status", "-A")
    assert res.returncode == 0, res.stderr
    assert "damaged" in res.stdout and str(path) in res.stdout
    res = chaos(agent.address, "--reset", "-n", "default", "cli-dmg", "-c", "app")
    assert res.returncode == 1 and "not restored" in res.stdout + res.stderr and "cpu 300m" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert pod.container_id()


# ---------------------------------------------------------------- kill -9 at random moments


@pytest.mark.parametrize("during", ["apply", "reset"])
def test_kill9_at_random_moments_then_exact_reset(agent, pods, node, during):
    pod = pods.run(f"k9{during}", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)])
    original = state_of(pod, node)
    rng = random.Random(hash(during) & 0xFFFF)
    rounds, exact = 30, 0
    name = f"k9{during}"
    for _ in range(rounds):
        if during == "reset":
            agent.apply("default", name, cpu_millicpu=1200, memory_bytes=96 * MiB, ingress_bps=10_000_000,
                        egress_bps=10_000_000, method=rng.choice([AUTO, CGROUP]))

        def fire():
            try:
                if during == "apply":
                    agent.apply("default", name, cpu_millicpu=1200, memory_bytes=96 * MiB, ingress_bps=10_000_000,
                                egress_bps=10_000_000, method=rng.choice([AUTO, CGROUP]))
                else:
                    agent.revert("default", name)
            except grpc.RpcError:
                pass

        thread = threading.Thread(target=fire)
        thread.start()
        time.sleep(rng.uniform(0.0, 0.12))
        agent.kill9()
        thread.join()
        agent.start()
        if agent.list():
            agent.revert("default", name)
        d = diff(original, state_of(pod, node))
        exact += not d and not ifb_exists(pod) and agent.records() == []
        assert not d, d
        assert not ifb_exists(pod) and agent.records() == [] and agent.list() == []
    print(f"kill -9 during {during}: {exact}/{rounds} exact resets")


# ---------------------------------------------------------------- rule 9: in-place resize


def test_in_place_resize_supersedes_the_experiment(agent, pods, node):
    pod = pods.run("resize", containers=[ContainerSpec("app", cpu_millicpu=500, memory_bytes=128 * MiB)])
    agent.apply("default", "resize", cpu_millicpu=200, memory_bytes=96 * MiB, egress_bps=3_000_000)
    # What a kubelet does for `kubectl patch pod --subresource resize`: the pod cgroup, then the runtime.
    (pod.cgroup_dirs["cpu"] / "cpu.cfs_quota_us").write_text("80000")
    (pod.cgroup_dirs["memory"] / "memory.memsw.limit_in_bytes").write_text(str(192 * MiB))
    (pod.cgroup_dirs["memory"] / "memory.limit_in_bytes").write_text(str(192 * MiB))
    node.client.update_resources(pod.container_id(), cpu_quota_us=80000, memory_limit_bytes=192 * MiB,
                                 memory_swap_limit_bytes=192 * MiB)
    assert wait_until(lambda: agent.list() == [], 5), agent.log_tail()
    time.sleep(1.5)
    assert cpu_files(pod) == ("80000", "80000") and mem_files(pod)[0] == str(192 * MiB)  # the resize stands
    assert not ifb_exists(pod) and agent.records() == []
    assert log_lines(agent, "superseded by an in-place resize")
    assert not agent.revert("default", "resize").was_active


def test_stopped_sandbox_ends_the_experiment(agent, pods, node):
    pod = pods.run("stopped", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "stopped", cpu_millicpu=200, ingress_bps=3_000_000, egress_bps=3_000_000)
    node.client.stop_pod_sandbox(pod.sandbox_id)
    assert wait_until(lambda: agent.list() == [], 5), agent.log_tail()
    assert not ifb_exists(pod) and agent.records() == []
    assert log_lines(agent, "pod stopped")


# ---------------------------------------------------------------- rule 10, 11: readings and messages


def test_below_usage_refusal_is_one_short_line(agent, pods):
    hog = ("sh", "-c", "head -c 62914560 /dev/zero > /dev/shm/hog; sleep 3600")
    pod = pods.run("msg", containers=[ContainerSpec("app", argv=hog, cpu_millicpu=200, memory_bytes=128 * MiB)])
    usage = pod.container_cgroup_dir("memory") / "memory.usage_in_bytes"
    assert wait_until(lambda: int(read(usage)) > 60 * MiB, 10)
    with pytest.raises(grpc.RpcError) as err:
        agent.apply("default", "msg", memory_bytes=32 * MiB)
    msg = err.value.details()
    assert msg.startswith("memory 32Mi is below the ") and "this container cannot give back (it uses " in msg
    assert msg.endswith("; nothing was changed; --force to try anyway")
    assert "/" not in msg.replace("/dev", "") and len(msg) < 140, msg


def test_list_reads_the_kernel_or_says_why_not(agent, pods, node):
    pod = pods.run("readings", containers=[ContainerSpec("app", cpu_millicpu=500)])
    agent.apply("default", "readings", cpu_millicpu=200)
    [exp] = agent.list()
    assert exp.resources[0].in_force.value == 200 and not exp.resources[0].in_force.unknown
    # The container exits and the kubelet has not re-created it yet: its cgroup is gone, the pod runs.
    node.client.stop_container(pod.container_id(), grace_s=0)
    time.sleep(1.5)
    [exp] = agent.list()
    assert exp.resources[0].in_force.unknown.startswith("cannot read the cgroup"), exp
    res = chaos(agent.address, "status", "-A")
    assert "unknown" in res.stdout and "200m" in res.stdout and "cannot read the cgroup" in res.stdout, res.stdout
    # Re-created in the same pod (same UID): followed, and the experiment applies to the new container.
    node.client.remove_container(pod.containers["app"])
    pod.containers["app"] = node._create_and_start(pod, pod.specs["app"], pod.attempts["app"] + 1)
    pod.attempts["app"] += 1
    assert wait_until(lambda: cpu_files(pod)[0] == "20000", 5)
    agent.revert("default", "readings")
    assert cpu_files(pod) == ("50000", "50000")
