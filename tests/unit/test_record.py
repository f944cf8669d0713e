"""The experiment record: its JSON form round-trips, every damage is named, schema 1 migrates,
and the supervisor's schedule and backoff stay bounded."""

from __future__ import annotations

import copy
import json
import random

import pytest

from daemonset.record import SCHEMA_VERSION, Experiment, NetState, RecordError, decode, encode, key_of
from daemonset.supervisor import Supervisor, backoff_s
from daemonset.types import (
    Failure,
    Method,
    Owner,
    OwnerKind,
    Phase,
    ResolvedTarget,
    Resource,
)

TARGET = ResolvedTarget(namespace="shop", pod="web-0", container="app", container_id="c" * 64, pod_uid="u-1",
                        node_name="n1")


def experiment(**kw) -> Experiment:
    base = dict(
        experiment_id="abc123", target=TARGET, sandbox_id="s" * 64,
        owner=Owner(OwnerKind.RESOURCE_CHAOS, "shop", "web-0-app", "uid-9"), phase=Phase.ACTIVE,
        started_at=1_700_000_000.0, expires_at=1_700_000_600.0,
        original={Resource.CPU: 1000, Resource.MEMORY: 128 * 2**20, Resource.INGRESS: -1},
        desired={Resource.CPU: 300, Resource.INGRESS: 2_000_000},
        methods={Resource.CPU: Method.CRI, Resource.INGRESS: Method.NETLINK},
        cgroup_snapshot={"cgroups": {"container": {}, "pod": {}}, "files": {"/x/cpu.cfs_quota_us": "100000"}},
        cri_original={"cpu_quota_us": 100000, "cpu_period_us": 100000, "memory_limit_bytes": 134217728},
        cri_sent={"cpu_quota_us": 30000, "cpu_period_us": 100000, "memory_limit_bytes": 134217728},
        net=NetState(host_ifname="veth1", ifb_key="s" * 64, snapshot={"x": 1}, ingress_hook_before=False),
        drift_corrections=2,
        failure=Failure(reason="memory held", attempts=3, since=1.0, next_retry_at=9.0),
        end_reason="expired",
    )
    base.update(kw)
    return Experiment(**base)


def test_round_trip_through_json():
    exp = experiment()
    data = json.loads(json.dumps(encode(exp)))
    assert data["schema"] == SCHEMA_VERSION and data["key"] == "shop/web-0/app"
    assert decode(data) == exp


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_round_trips(phase):
    exp = experiment(phase=phase, failure=None, expires_at=None)
    assert decode(json.loads(json.dumps(encode(exp)))) == exp


def _damaged(mutate) -> str:
    data = encode(experiment())
    data = copy.deepcopy(data)
    mutate(data)
    with pytest.raises(RecordError) as err:
        decode(data)
    return str(err.value)


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda d: d.pop("target"), "target is missing"),
    (lambda d: d["target"].pop("container_id"), "target.container_id is missing"),
    (lambda d: d["target"].update(pod=""), "target.pod is empty"),
    (lambda d: d.update(started_at="yesterday"), "started_at is 'yesterday', not a number"),
    (lambda d: d.update(started_at=float("nan")), "started_at is nan"),
    (lambda d: d.update(expires_at=True), "expires_at is True"),
    (lambda d: d.update(phase="exploded"), "phase 'exploded' is not one of"),
    (lambda d: d["desired"].update(cpu="300"), "desired.cpu is '300', not a whole quantity"),
    (lambda d: d["desired"].update(disk=5), "names 'disk'"),
    (lambda d: d["methods"].update(cpu="magic"), "methods.cpu is 'magic'"),
    (lambda d: d.update(desired={}), "desired is empty"),
    (lambda d: d.update(schema=99), "schema 99 is not one this agent reads"),
    (lambda d: d.update(key="other/pod/app"), "does not match its target"),
    (lambda d: d.update(cgroup_snapshot=None), "without the snapshot"),
    (lambda d: d.update(net=None), "without the shaping's net section"),
    (lambda d: d["owner"].update(kind="alien"), "owner.kind"),
    (lambda d: d["failure"].update(attempts="3"), "failure.attempts is '3'"),
    (lambda d: d.update(drift_corrections=True), "drift_corrections is True"),
])
def test_each_damage_is_named(mutate, words):
    assert words in _damaged(mutate)


def test_not_an_object_and_key_of_damaged_data():
    with pytest.raises(RecordError, match="not a JSON object but list"):
        decode([1, 2])
    assert key_of({"key": "a/b/c"}) == "a/b/c"
    assert key_of({"key": "a/b"}) == "" and key_of("x") == "" and key_of({"key": 5}) == ""


def test_schema_1_migrates():
    v1 = {
        "schema": 1, "key": "shop/web-0/app", "experiment_id": "e1", "phase": "new",
        "target": TARGET.to_dict(), "sandbox_id": "sb", "started_at": 1.0, "expires_at": None,
        "original": {"cpu": 1000, "memory": 2**27}, "desired": {"cpu": 300}, "methods": {"cpu": "cri"},
        "cri_original": {"cpu_quota_us": 100000}, "cri_used": True,
        "cgroup_snapshot": {"cgroups": {}, "files": {}}, "net": None, "drift_corrections": 0, "only_container": True,
    }
    exp = decode(v1)
    assert exp.phase is Phase.APPLYING and exp.owner.kind is OwnerKind.NODE_LOCAL
    assert exp.cri_used and exp.cri_sent == {}  # what was sent is unknown; the restore sends the whole original
    assert exp.touched() == {Resource.CPU}


def test_random_mutations_never_raise_anything_but_record_error():
    """Property: whatever a damaged file holds, decode says RecordError (never KeyError/TypeError)."""
    rng = random.Random(7)
    base = encode(experiment())
    junk = [None, "", "x", -5, 2**70, 1.5, True, [], {}, {"a": 1}, float("inf")]
    for _ in range(2000):
        data = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            holder = data
            path = [rng.choice(list(holder))]
            while isinstance(holder[path[-1]], dict) and holder[path[-1]] and rng.random() < 0.5:
                holder = holder[path[-1]]
                path.append(rng.choice(list(holder)))
            if rng.random() < 0.2:
                del holder[path[-1]]
            else:
                holder[path[-1]] = rng.choice(junk)
        try:
            exp = decode(data)
        except RecordError:
            continue
        assert isinstance(exp, Experiment) and exp.desired


def test_touched_resources_by_phase():
    exp = experiment(methods={}, cri_intent=(Resource.MEMORY,), phase=Phase.ACTIVE)
    assert exp.touched() == {Resource.MEMORY}
    assert experiment(methods={}, phase=Phase.APPLYING).touched() == {Resource.CPU, Resource.INGRESS}


def test_backoff_doubles_caps_and_jitters():
    rng = random.Random(1)
    delays = [backoff_s(n, rng=rng) for n in range(1, 12)]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4 and 3.2 <= delays[2] <= 4.8
    assert all(d <= 60.0 for d in delays) and delays[-1] >= 48.0
    assert min(backoff_s(1, rng=random.Random(s)) for s in range(200)) > 0.5  # never a zero wait


def test_schedule_holds_one_moment_per_key():
    now = [0.0]
    ran: list[str] = []
    sup = Supervisor(on_due=ran.append, drift=lambda: None, clock=lambda: now[0], drift_interval_s=3.0)
    for _ in range(1000):
        for k in range(50):
            sup.schedule(f"ns/p{k}/c", now[0] + 5)
    assert sup.pending() == 50
    now[0] = 4.0
    assert sup.run_due() == 0
    now[0] = 5.0
    assert sup.run_due() == 50 and sup.pending() == 0 and len(ran) == 50
    sup.schedule("a/b/c", 10.0)
    sup.cancel("a/b/c")
    assert sup.pending() == 0 and sup.due_at("a/b/c") is None


def test_replace_is_dataclasses_replace():
    import dataclasses

    exp = experiment()
    changes = {"phase": Phase.REVERTING, "drift_corrections": 3, "end_reason": "expired"}
    fast, slow = exp.replace(**changes), dataclasses.replace(exp, **changes)
    assert fast == slow and type(fast) is Experiment
    assert exp.phase is not Phase.REVERTING  # the original is untouched
    with pytest.raises(TypeError, match="no_such_field"):
        exp.replace(no_such_field=1)
