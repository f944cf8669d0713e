"""The engine's own logic with in-memory stand-ins for the runtime, cgroups and shaping.

What is checked here is the engine's bookkeeping: first snapshot kept, all-or-nothing rollback,
durations (also across a restart), recovery of half-made changes, drift and gone pods, per-container
serialization. The real runtime and kernel are exercised in tests/node/test_agent*.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from cri_api import errors as cri_errors
from cri_api.types import ContainerInfo, LinuxResources
from cri_api.v1 import api_pb2
from daemonset.cgroups import Readings
from daemonset.engine import Engine, millicpu_of, quota_for, same_quantity
from daemonset.types import (
    UNLIMITED,
    ApplyFailed,
    ApplyRequest,
    Changes,
    Conflict,
    Denied,
    EngineError,
    InvalidRequest,
    Method,
    Phase,
    Refused,
    Resource,
    RevertRequest,
    Target,
    TargetNotFound,
)

MiB = 2**20


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class FakeContainer:
    id: str
    quota_us: int = 50_000
    period_us: int = 100_000
    memory: int = 256 * MiB
    usage: int = 10 * MiB
    running: bool = True


class FakeWorld:
    """A node: pods with containers, their cgroup values, a runtime that can refuse, veth rates."""

    def __init__(self):
        self.containers: dict[tuple[str, str, str], FakeContainer] = {}
        self.pod_quota: dict[tuple[str, str], int] = {}
        self.rates: dict[str, tuple[int, int]] = {}
        self.latency: dict[str, float] = {}  # the queue budget each key was last shaped with
        self.queue_bytes: dict[str, tuple[int | None, int | None]] = {}  # overrides: someone resized a queue
        self.restarting: set[str] = set()  # sandbox ids of pods whose only container is being re-created
        self.runtime_refuses = False
        self.runtime_down = False
        self.shape_fails = False
        self.cri_calls = 0
        self.lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0

    def add(self, ns: str, pod: str, name: str, cid: str, **kw) -> FakeContainer:
        c = FakeContainer(id=cid, **kw)
        self.containers[(ns, pod, name)] = c
        self.pod_quota[(ns, pod)] = self.pod_quota.get((ns, pod), 0) + c.quota_us
        return c

    def by_id(self, cid: str) -> tuple[tuple[str, str, str], FakeContainer]:
        for k, c in self.containers.items():
            if c.id == cid:
                return k, c
        raise KeyError(cid)


class FakeCRI:
    def __init__(self, world: FakeWorld):
        self.w = world

    def find_container(self, ns, pod, container=None):
        if self.w.runtime_down:
            raise cri_errors.RuntimeUnreachable("no runtime at unix:///fake.sock")
        names = [k[2] for k in self.w.containers if k[:2] == (ns, pod)]
        if not names:
            raise cri_errors.NotFound(f"no pod {ns}/{pod}")
        if container is None:
            if len(names) != 1:
                raise cri_errors.NotFound(f"pod {ns}/{pod} has {len(names)} containers")
            container = names[0]
        c = self.w.containers.get((ns, pod, container))
        if c is None:
            raise cri_errors.NotFound(f"pod {ns}/{pod} has no container {container!r}; its containers: {names}")
        if not c.running:
            raise cri_errors.NotRunning(f"container {container} is not running")
        return ContainerInfo(
            id=c.id, sandbox_id=f"sb-{ns}-{pod}", name=container, pod_name=pod, pod_namespace=ns, pod_uid="uid-" + pod,
            attempt=0, state="running", pid=1000, cgroups_path=c.id,
            resources=LinuxResources(cpu_period_us=c.period_us, cpu_quota_us=c.quota_us, memory_limit_bytes=c.memory,
                                     memory_swap_limit_bytes=c.memory),
            labels={}, annotations={},
        )

    def container_info(self, cid):
        (ns, pod, name), _c = self.w.by_id(cid)
        return self.find_container(ns, pod, name)

    def pod_sandbox_status(self, sandbox_id):
        """Ready while the pod has a container, or is in ``restarting`` (its container removed, the next
        attempt not yet created); gone otherwise."""
        pods = {f"sb-{ns}-{pod}" for ns, pod, _ in self.w.containers} | self.w.restarting
        if sandbox_id not in pods:
            raise cri_errors.NotFound(f"no sandbox {sandbox_id}")
        return api_pb2.PodSandboxStatusResponse(status=api_pb2.PodSandboxStatus(id=sandbox_id, state=api_pb2.SANDBOX_READY))

    def update_container_resources(self, cid, resources):
        self.update_resources(cid, cpu_quota_us=resources.cpu_quota_us, memory_limit_bytes=resources.memory_limit_bytes)

    def update_resources(self, cid, *, cpu_quota_us=None, memory_limit_bytes=None, memory_swap_limit_bytes=None):
        self.w.cri_calls += 1
        if self.w.runtime_refuses:
            raise cri_errors.CallFailed("runtime says no")
        with self.w.lock:
            self.w.concurrent += 1
            self.w.max_concurrent = max(self.w.max_concurrent, self.w.concurrent)
        time.sleep(0.01)
        _, c = self.w.by_id(cid)
        if cpu_quota_us is not None:
            c.quota_us = cpu_quota_us
        if memory_limit_bytes is not None:
            c.memory = memory_limit_bytes
        with self.w.lock:
            self.w.concurrent -= 1


class FakeCgroups:
    def __init__(self, world: FakeWorld):
        self.w = world

    def locate(self, *, pid, cgroups_path):
        return cgroups_path

    def read(self, cg, *, pod=False):
        _, c = self.w.by_id(cg)
        return Readings(cpu_quota_us=c.quota_us, cpu_period_us=c.period_us, memory_limit_bytes=c.memory,
                        memsw_limit_bytes=c.memory)

    def read_for_plan(self, cg, *, memory_usage=True):
        return self.read(cg), None

    def check(self, cg, *, cpu_quota_us, memory_limit_bytes, force, state=None, what=""):
        _, c = self.w.by_id(cg)
        if memory_limit_bytes is not None and memory_limit_bytes < c.usage and not force:
            raise Refused(f"{what or 'memory'} {memory_limit_bytes} below usage {c.usage}")
        return None

    def set_container(self, cg, *, cpu_quota_us, memory_limit_bytes, force, plan=None):
        self.check(cg, cpu_quota_us=cpu_quota_us, memory_limit_bytes=memory_limit_bytes, force=force)
        (ns, pod, _), c = self.w.by_id(cg)
        if cpu_quota_us is not None:
            self.w.pod_quota[(ns, pod)] = max(self.w.pod_quota[(ns, pod)], cpu_quota_us)
            c.quota_us = cpu_quota_us
        if memory_limit_bytes is not None:
            c.memory = memory_limit_bytes

    def set_through(self, cg, *, cpu_quota_us, memory_limit_bytes, force, runtime_call, plan=None):
        self.check(cg, cpu_quota_us=cpu_quota_us, memory_limit_bytes=memory_limit_bytes, force=force)
        (ns, pod, _), _c = self.w.by_id(cg)
        before = self.w.pod_quota[(ns, pod)]
        if cpu_quota_us is not None and cpu_quota_us > before:
            self.w.pod_quota[(ns, pod)] = cpu_quota_us
        try:
            runtime_call()
        except BaseException:
            self.w.pod_quota[(ns, pod)] = before
            raise

    # File names as a real snapshot has them, so a restore of only cpu.* or memory.* files works here too.
    def snapshot(self, cg):
        (ns, pod, _), c = self.w.by_id(cg)
        return {"cgroups": {"pod": {}, "id": cg}, "files": {"cpu.quota": c.quota_us, "memory.limit": c.memory,
                                                             "cpu.pod_quota": self.w.pod_quota[(ns, pod)]}}

    def from_snapshot(self, snap):
        return snap["cgroups"]["id"]

    def refresh_container_snapshot(self, old, cg):
        new = self.snapshot(cg)
        new["files"]["cpu.pod_quota"] = old["files"]["cpu.pod_quota"]
        return new

    def restore(self, snap, *, force=False):
        f = snap["files"]
        try:
            (ns, pod, _), c = self.w.by_id(snap["cgroups"]["id"])
        except KeyError:
            return
        if "memory.limit" in f and f["memory.limit"] < c.usage and not force:
            raise Refused(f"memory cannot go back to {f['memory.limit']}: usage {c.usage}")
        c.quota_us = f.get("cpu.quota", c.quota_us)
        c.memory = f.get("memory.limit", c.memory)
        if "cpu.pod_quota" in f:
            self.w.pod_quota[(ns, pod)] = f["cpu.pod_quota"]


class FakeNet:
    def __init__(self, world: FakeWorld):
        self.w = world

    def find_host_veth(self, pid, pod=""):
        return "veth-fake"

    def shape(self, host, key, *, ingress_bps, egress_bps, snapshot=None, latency_s=0.05):
        if self.w.shape_fails:
            raise ApplyFailed("shaping veth-fake: netlink says no")
        old = self.w.rates.get(key, (UNLIMITED, UNLIMITED))
        self.w.rates[key] = (ingress_bps or old[0], egress_bps or old[1])
        self.w.latency[key] = latency_s
        self.w.queue_bytes.pop(key, None)
        return {"was": "nothing"}

    def read_queues(self, host, key):
        """What netshape's read_queue would say: the planned limits at MTU 1500 unless overridden."""
        import netshape

        rates = self.w.rates.get(key)
        if rates is None:
            return netshape.QueueInfo(mtu_bytes=1500)
        planned = tuple(None if r == UNLIMITED else netshape.queue_limit_bytes(r // 8, self.w.latency[key])
                        for r in rates)
        got = self.w.queue_bytes.get(key, planned)
        return netshape.QueueInfo(ingress_limit_bytes=got[0], egress_limit_bytes=got[1], mtu_bytes=1500)

    def has_ingress_hook(self, host):
        return False

    def unshape(self, host, key, snapshot, *, ingress_hook_ours=False):
        self.w.rates.pop(key, None)
        self.w.queue_bytes.pop(key, None)

    def remove_ifb(self, key):
        return self.w.rates.pop(key, None) is not None

    def sweep_orphans(self, active_keys):
        gone = [k for k in self.w.rates if k not in active_keys]
        for k in gone:
            del self.w.rates[k]
        return gone

    def read_rates(self, host, key):
        return self.w.rates.get(key, (UNLIMITED, UNLIMITED))


@pytest.fixture
def world():
    w = FakeWorld()
    w.add("default", "web", "app", "c1")
    w.add("default", "duo", "a", "d1")
    w.add("default", "duo", "b", "d2")
    w.add("kube-system", "dns", "dns", "k1")
    return w


@pytest.fixture
def clock():
    return FakeClock()


def make_engine(world, clock, state_dir, **kw) -> Engine:
    e = Engine(FakeCRI(world), state_dir=str(state_dir), cgroups=FakeCgroups(world), net=FakeNet(world), clock=clock,
               node_name="n1", **kw)
    e.start(background=False)
    return e


def apply(engine, pod="web", container=None, **changes):
    extra = {k: changes.pop(k) for k in ("duration_s", "method", "force", "dry_run") if k in changes}
    return engine.apply(ApplyRequest(Target("default", pod, container), Changes(**changes), **extra))


def test_units_arithmetic():
    assert quota_for(500, 100_000) == 50_000
    assert millicpu_of(50_000, 100_000) == 500
    assert millicpu_of(-1, 100_000) == UNLIMITED
    assert same_quantity(Resource.MEMORY, 100 * MiB, 100 * MiB - 4095)
    assert not same_quantity(Resource.MEMORY, 100 * MiB, 99 * MiB)
    assert same_quantity(Resource.INGRESS, 10_000_000, 9_999_992)


def test_apply_reports_previous_and_read_back(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    res = apply(e, cpu_millicpu=200, memory_bytes=128 * MiB)
    by = {r.resource: r for r in res.resources}
    assert by[Resource.CPU].previous == 500 and by[Resource.CPU].in_force == 200
    assert by[Resource.CPU].method is Method.CRI
    assert by[Resource.MEMORY].previous == 256 * MiB and by[Resource.MEMORY].in_force == 128 * MiB
    assert by[Resource.MEMORY].method is Method.CRI  # auto: the runtime's call for memory too
    assert world.containers[("default", "web", "app")].quota_us == 20_000
    assert res.target.container == "app" and res.target.node_name == "n1"
    assert res.expires_at is None


def test_second_change_keeps_first_snapshot(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    assert apply(e, cpu_millicpu=200).created is True
    res = apply(e, cpu_millicpu=300)
    assert res.created is False  # a further change of the experiment in force
    cpu = res.resources[0]
    assert (cpu.original, cpu.previous, cpu.in_force) == (500, 200, 300)
    back = e.revert(RevertRequest(Target("default", "web")))
    assert back.was_active and back.resources[0].in_force == 500
    assert world.containers[("default", "web", "app")].quota_us == 50_000
    assert e.list() == []


def test_dry_run_changes_nothing(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    res = apply(e, cpu_millicpu=200, dry_run=True)
    assert res.dry_run and res.resources[0].requested == 200
    assert world.containers[("default", "web", "app")].quota_us == 50_000
    assert e.list() == [] and list(e.store.load_all()) == []


def test_runtime_refusal_falls_back_to_cgroup_in_auto_only(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    world.runtime_refuses = True
    res = apply(e, cpu_millicpu=200)
    assert res.resources[0].method is Method.CGROUP
    e.revert(RevertRequest(Target("default", "web")))
    with pytest.raises(Refused, match="runtime refused"):
        apply(e, cpu_millicpu=200, method=Method.CRI)
    assert world.containers[("default", "web", "app")].quota_us == 50_000


def test_all_or_nothing_when_shaping_fails(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    world.shape_fails = True
    with pytest.raises(ApplyFailed, match="netlink says no"):
        apply(e, cpu_millicpu=200, ingress_bps=10_000_000)
    assert world.containers[("default", "web", "app")].quota_us == 50_000
    assert e.list() == [] and list(e.store.load_all()) == []


def test_failed_second_change_returns_to_first(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    apply(e, cpu_millicpu=200)
    world.shape_fails = True
    with pytest.raises(ApplyFailed):
        apply(e, cpu_millicpu=300, egress_bps=10_000_000)
    assert world.containers[("default", "web", "app")].quota_us == 20_000
    [exp] = e.list()
    assert {r.resource: r.requested for r in exp.resources} == {Resource.CPU: 200}


def test_refused_below_usage_changes_nothing(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    with pytest.raises(Refused, match="below usage"):
        apply(e, memory_bytes=5 * MiB)
    assert world.containers[("default", "web", "app")].memory == 256 * MiB and world.cri_calls == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "no change asked for"),
        ({"cpu_millicpu": 0}, "cpu_millicpu 0 is out of range"),
        ({"cpu_millicpu": 5}, "CFS quota of 500us"),
        ({"cpu_millicpu": "1"}, "must be an integer"),
        ({"memory_bytes": 1024}, "memory_bytes 1024 is out of range"),
        ({"ingress_bps": -5}, "ingress_bps -5 is out of range"),
        ({"cpu_millicpu": 100, "duration_s": -1.0}, "positive number of seconds"),
        ({"cpu_millicpu": 100, "duration_s": float("nan")}, "positive number of seconds"),
    ],
)
def test_bad_values_rejected(world, clock, tmp_path, changes, message):
    e = make_engine(world, clock, tmp_path)
    with pytest.raises(InvalidRequest, match=message):
        apply(e, **changes)
    assert world.cri_calls == 0


def test_unknown_and_denied_targets(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    with pytest.raises(TargetNotFound, match="no pod default/nope"):
        apply(e, pod="nope", cpu_millicpu=100)
    with pytest.raises(TargetNotFound, match="has 2 containers"):
        apply(e, pod="duo", cpu_millicpu=100)
    with pytest.raises(TargetNotFound, match="no container 'zz'"):
        apply(e, pod="duo", container="zz", cpu_millicpu=100)
    with pytest.raises(Denied, match="kube-system is denied"):
        e.apply(ApplyRequest(Target("kube-system", "dns"), Changes(cpu_millicpu=100)))
    with pytest.raises(InvalidRequest, match="not a valid name"):
        apply(e, pod="Bad_Name", cpu_millicpu=100)


def test_duration_expires(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    res = apply(e, cpu_millicpu=200, duration_s=30)
    assert res.expires_at == clock.now + 30
    clock.now += 29
    e.expire_due()
    assert world.containers[("default", "web", "app")].quota_us == 20_000
    clock.now += 2
    e.expire_due()
    assert world.containers[("default", "web", "app")].quota_us == 50_000
    assert e.list() == []


def test_restart_reverts_expired_and_rearms_running(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    apply(e, cpu_millicpu=200, duration_s=10)
    apply(e, pod="duo", container="a", cpu_millicpu=100, duration_s=100)
    e.close()  # as if killed: nothing reverted on the way out
    clock.now += 20
    e2 = make_engine(world, clock, tmp_path)
    assert world.containers[("default", "web", "app")].quota_us == 50_000
    assert world.containers[("default", "duo", "a")].quota_us == 10_000
    [left] = e2.list()
    assert left.target.pod == "duo"
    clock.now += 100
    e2.expire_due()
    assert world.containers[("default", "duo", "a")].quota_us == 50_000


def test_half_made_change_is_undone_on_start(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    apply(e, cpu_millicpu=200)
    record = next(iter(e.store.load_all())).data
    record["phase"] = "applying"  # as if killed between the intent record and the active record
    e.store.save(record["key"], record)
    e.close()
    make_engine(world, clock, tmp_path)
    assert world.containers[("default", "web", "app")].quota_us == 50_000
    assert list(e.store.load_all()) == []


def test_drift_reapplied_and_counted(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    apply(e, cpu_millicpu=200)
    world.containers[("default", "web", "app")].quota_us = 50_000  # something reset it
    e.check_drift()
    assert world.containers[("default", "web", "app")].quota_us == 20_000
    assert e.list()[0].drift_corrections == 1
    # a restarted container (new id, kubelet's values) gets the experiment again
    world.containers[("default", "web", "app")] = FakeContainer(id="c1-restarted")
    e.check_drift()
    assert world.containers[("default", "web", "app")].quota_us == 20_000
    assert e.list()[0].target.container_id == "c1-restarted"
    e.revert(RevertRequest(Target("default", "web")))
    assert world.containers[("default", "web", "app")].quota_us == 50_000


def test_deleted_pod_ends_experiment_and_shaping(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    apply(e, ingress_bps=10_000_000, egress_bps=5_000_000)
    assert world.rates
    del world.containers[("default", "web", "app")]
    e.check_drift()
    assert e.list() == [] and not world.rates and list(e.store.load_all()) == []


def test_container_removed_in_a_ready_pod_keeps_the_experiment(world, clock, tmp_path):
    """Between the removal of a container and the creation of its next attempt the pod has no
    container of that name but its sandbox is ready: a drift pass then waits for the next attempt."""
    e = make_engine(world, clock, tmp_path)
    apply(e, cpu_millicpu=200, ingress_bps=10_000_000)
    old = world.containers.pop(("default", "web", "app"))
    world.restarting.add("sb-default-web")
    e.check_drift()
    [exp] = e.list()
    assert exp.target.container_id == old.id and world.rates
    world.add("default", "web", "app", "c-next")
    world.restarting.clear()
    e.check_drift()
    [exp] = e.list()
    assert exp.target.container_id == "c-next" and world.containers[("default", "web", "app")].quota_us == 20_000


def test_same_container_serialized_different_in_parallel(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    errors = []

    def run(pod, container, m):
        try:
            apply(e, pod=pod, container=container, cpu_millicpu=m)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("web", None, 100 + i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and world.max_concurrent == 1
    [exp] = e.list()
    assert exp.resources[0].original == 500
    world.max_concurrent = 0
    # One pod is one lock (its veth and IFB are shared by its containers); different pods in parallel.
    threads = [threading.Thread(target=run, args=("duo", c, 100)) for c in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and world.max_concurrent == 1
    world.max_concurrent = 0
    e.revert(RevertRequest(Target("default", "duo", "a")))
    threads = [threading.Thread(target=run, args=args) for args in (("duo", "a", 150), ("web", None, 150))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and world.max_concurrent == 2
    # Per-pod locks live only while in use: a node that churns through pods keeps none.
    e.revert(RevertRequest(Target("default", "web")))
    e.check_drift()
    assert e._locks == {}


def test_revert_without_experiment(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    res = e.revert(RevertRequest(Target("default", "web")))
    assert not res.was_active and res.target.container == "app"


def test_expiry_during_a_runtime_outage_restores_the_kernel_and_retries_the_runtime(world, clock, tmp_path):
    # Expired while the agent was down, and the runtime does not answer at its restart: the kernel
    # gets the originals at once (direct writes need no runtime), the record stays (revert-failing)
    # until the runtime's own view is put back, a new apply waits, and a reset tries again at once.
    e = make_engine(world, clock, tmp_path)
    apply(e, cpu_millicpu=200, duration_s=5)
    e.close()
    clock.now += 10
    world.runtime_down = True
    e2 = make_engine(world, clock, tmp_path)
    assert world.containers[("default", "web", "app")].quota_us == 50_000
    [exp] = e2.list()
    assert exp.phase is Phase.REVERT_FAILING and "runtime" in exp.failure.reason
    assert exp.failure.next_retry_at > clock.now
    with pytest.raises(Conflict, match="being reverted"):
        apply(e2, cpu_millicpu=300)
    world.runtime_down = False
    res = e2.revert(RevertRequest(Target("default", "web", "app")))
    assert res.was_active and res.resources[0].in_force == 500 and not res.resources[0].unknown
    apply(e2, cpu_millicpu=300)
    [exp] = e2.list()
    assert exp.resources[0].original == 500 and exp.phase is Phase.ACTIVE


def test_one_agent_per_state_dir(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    with pytest.raises(EngineError, match="another chaos-agent is using the state directory"):
        make_engine(world, clock, tmp_path)
    e.close()
    make_engine(world, clock, tmp_path).close()


def test_failed_rollback_is_kept_and_retried_and_says_what_is_still_changed(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    events = []
    e.subscribe(events.append)
    net = e.net

    def shape_then_runtime_breaks(*args, **kw):
        world.runtime_refuses = True  # the runtime goes bad between the change and its rollback
        raise ApplyFailed("shaping veth-fake: netlink says no")

    net.shape = shape_then_runtime_breaks
    with pytest.raises(ApplyFailed) as err:
        apply(e, cpu_millicpu=200, ingress_bps=2_000_000)
    msg = str(err.value)
    assert "the rollback failed too" in msg and "still changed: the runtime's stored cpu" in msg
    assert "next try in" in msg
    [exp] = e.list()
    assert exp.phase is Phase.ROLLBACK_FAILED and exp.failure.attempts == 1
    assert exp.resources[0].original == 500  # the true originals are kept
    assert world.containers[("default", "web", "app")].quota_us == 50_000  # the kernel is back already
    assert [ev.kind.value for ev in events] == ["revert-failing"]
    with pytest.raises(Conflict, match="being reverted"):
        apply(e, cpu_millicpu=300)  # a new snapshot now would take the experiment's values as originals
    world.runtime_refuses = False
    clock.now = exp.failure.next_retry_at + 0.1
    e.expire_due()
    assert e.list() == [] and list(e.store.load_all()) == []
    assert events[-1].kind.value == "ended" and events[-1].reason == "rollback finished"
    # Drift never touched it meanwhile, and the container is an ordinary one again.
    assert apply(e, cpu_millicpu=300).resources[0].original == 500


def test_refused_revert_backs_off_and_drift_leaves_it_alone(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    apply(e, memory_bytes=512 * MiB, cpu_millicpu=300, duration_s=5)
    c = world.containers[("default", "web", "app")]
    c.usage = 300 * MiB  # holds more than the original 256Mi allows
    clock.now += 6
    e.expire_due()
    [exp] = e.list()
    assert exp.phase is Phase.REVERT_FAILING and c.quota_us == 50_000 and c.memory == 512 * MiB
    tries = [exp.failure.next_retry_at - clock.now]
    for _ in range(8):
        clock.now = exp.failure.next_retry_at
        e.check_drift()  # drift passes in between must not re-apply anything
        assert c.quota_us == 50_000
        e.expire_due()
        [exp] = e.list()
        tries.append(exp.failure.next_retry_at - clock.now)
    assert exp.failure.attempts == 9 and max(tries) <= 60 * 1.2 and tries[-1] >= 48
    assert all(b >= a * 1.3 or b >= 48 for a, b in zip(tries, tries[1:], strict=False))
    assert e.scheduled() == 1
    c.usage = 10 * MiB
    clock.now = exp.failure.next_retry_at
    e.expire_due()
    assert e.list() == [] and c.memory == 256 * MiB


def test_an_hour_of_resyncs_schedules_nothing_new(world, clock, tmp_path):
    """50 experiments with end times, an hour of drift passes every 3 s on a fake clock: the schedule
    holds one moment per experiment, and the engine's memory does not grow (counted in the memory
    blocks Python's allocator holds: a leak of one string per experiment and pass would be 60,000;
    tracemalloc told the same at three times the run time)."""
    import gc
    import sys

    for i in range(50):
        world.add("load", f"p{i}", "app", f"l{i}")
    e = make_engine(world, clock, tmp_path)
    for i in range(50):
        e.apply(ApplyRequest(Target("load", f"p{i}", "app"), Changes(cpu_millicpu=300), duration_s=7200))
    e.check_drift()
    gc.collect()
    base = sys.getallocatedblocks()
    for _ in range(1200):
        clock.now += 3
        e.check_drift()
        e.expire_due()
    gc.collect()
    grown = sys.getallocatedblocks() - base
    print(f"an hour of resyncs: {e.scheduled()} scheduled moments, {grown:+d} memory blocks")
    assert e.scheduled() == 50 and len(e.list()) == 50
    assert grown < 2_000


def test_schema_1_records_take_their_owner_from_the_old_owners_file(world, clock, tmp_path):
    import json

    e = make_engine(world, clock, tmp_path)
    apply(e, cpu_millicpu=200)
    e.close()
    [path] = (tmp_path / "experiments").glob("*.json")
    record = json.loads(path.read_text())
    record.update(schema=1, cri_used=record.pop("cri_sent") is not None)
    for field in ("owner", "failure", "end_reason", "cri_intent"):
        record.pop(field)
    path.write_text(json.dumps(record))
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "owners.json").write_text(json.dumps(
        {"default/web/app": {"namespace": "default", "name": "web-app", "uid": "u-7", "pod": "web", "container": "app"}}))
    e2 = make_engine(world, clock, tmp_path)
    [exp] = e2.list()
    assert exp.owner.kind.value == "ResourceChaos" and (exp.owner.name, exp.owner.uid) == ("web-app", "u-7")
    assert json.loads(path.read_text())["schema"] == 2  # rewritten: the owner now lives in the record
    assert not (tmp_path / "cluster" / "owners.json").exists()
    e2.revert(RevertRequest(Target("default", "web", "app")))
    assert world.containers[("default", "web", "app")].quota_us == 50_000


def _ramp(e, clock, steps, **first):
    from daemonset.types import StepSpec

    return e.apply(ApplyRequest(Target("default", "web", "app"), Changes(**first),
                                steps=tuple(StepSpec(o, Changes(**c)) for o, c in steps)))


def test_stepped_profile_runs_on_time_survives_a_restart_and_resets_exactly(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    c = world.containers[("default", "web", "app")]
    _ramp(e, clock, [(10, {"cpu_millicpu": 300}), (20, {"cpu_millicpu": 200}), (30, {"cpu_millicpu": 100})],
          cpu_millicpu=400)
    [exp] = e.list()
    assert (exp.step, exp.steps_total, exp.next_step_at - clock.now, exp.next_step) == (1, 4, 10, {Resource.CPU: 300})
    assert c.quota_us == 40_000 and e.scheduled() == 1
    clock.now += 10
    e.expire_due()
    assert c.quota_us == 30_000 and e.list()[0].step == 2
    e.close()
    clock.now += 15  # down across the third step's time
    e2 = make_engine(world, clock, tmp_path)
    e2.expire_due()
    assert c.quota_us == 20_000 and e2.list()[0].step == 3  # the step due now, not a replay
    clock.now += 5
    e2.expire_due()
    [exp] = e2.list()
    assert c.quota_us == 10_000 and exp.step == 4 and exp.next_step_at is None and e2.scheduled() == 0
    assert exp.resources[0].original == 500
    e2.revert(RevertRequest(Target("default", "web", "app")))
    assert c.quota_us == 50_000 and e2.list() == []


def test_a_memory_step_below_usage_is_held_not_forced(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    c = world.containers[("default", "web", "app")]
    _ramp(e, clock, [(10, {"memory_bytes": 64 * MiB}), (20, {"memory_bytes": 32 * MiB})], memory_bytes=128 * MiB)
    c.usage = 100 * MiB
    clock.now += 10
    e.expire_due()
    [exp] = e.list()
    assert exp.step == 1 and "step 2 held" in exp.step_note and c.memory == 128 * MiB
    c.usage = 10 * MiB
    clock.now += 11  # the retry comes after the third step's time: the step due now is the one made
    e.expire_due()
    [exp] = e.list()
    assert c.memory == 32 * MiB and exp.step == 3 and not exp.step_note


def test_a_new_command_replaces_the_profile(world, clock, tmp_path):
    e = make_engine(world, clock, tmp_path)
    _ramp(e, clock, [(10, {"cpu_millicpu": 300})], cpu_millicpu=400)
    apply(e, cpu_millicpu=250)
    [exp] = e.list()
    assert exp.steps_total == 0 and exp.next_step_at is None and e.scheduled() == 0
    clock.now += 20
    e.expire_due()
    assert world.containers[("default", "web", "app")].quota_us == 25_000
