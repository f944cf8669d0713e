"""The queue budget (``--latency``) through the engine, its record, the gRPC conversions and drift, on the
fake node of test_engine; the plugin's parsing and output of it."""

from __future__ import annotations

import pytest

import netshape
from daemonset import record
from daemonset.api.gen import agent_pb2
from daemonset.net import queue_results, stale_queues
from daemonset.server import apply_request_from_pb, resource_pb
from daemonset.types import (
    DEFAULT_LATENCY_S,
    MAX_LATENCY_S,
    MIN_LATENCY_S,
    UNLIMITED,
    ApplyRequest,
    Changes,
    InvalidRequest,
    QueueResult,
    Resource,
    Target,
)
from tests.unit.test_engine import clock, make_engine, world  # noqa: F401 - fixtures

FRAME_FLOOR = 4 * 1514  # netshape's floor: four full frames at MTU 1500


def _apply(e, latency_s=None, **changes):
    return e.apply(ApplyRequest(Target("default", "web"), Changes(**changes), latency_s=latency_s))


def test_bounds_match_netshape():
    assert (DEFAULT_LATENCY_S, MIN_LATENCY_S, MAX_LATENCY_S) == (
        netshape.DEFAULT_LATENCY_S, netshape.MIN_LATENCY_S, netshape.MAX_LATENCY_S)


def test_apply_reports_the_queue_read_back_and_keeps_the_budget(world, clock, tmp_path):  # noqa: F811
    e = make_engine(world, clock, tmp_path)
    res = _apply(e, latency_s=0.020, ingress_bps=2_000_000)
    [r] = res.resources
    # 20 ms of 250,000 bytes/s is 5,000 bytes, under the floor of four frames: the floor is in force.
    assert r.queue == QueueResult(budget_s=0.020, limit_bytes=FRAME_FLOOR,
                                  latency_s=pytest.approx(FRAME_FLOOR * 8 / 2_000_000))
    assert world.latency[next(iter(world.rates))] == 0.020
    # A later change without a budget keeps the experiment's; the record carries it over a restart.
    res = _apply(e, ingress_bps=20_000_000)
    assert res.resources[0].queue.limit_bytes == 50_000 and res.resources[0].queue.budget_s == 0.020
    [stored] = [s.data for s in e.store.load_all()]
    assert stored["net"]["latency_s"] == 0.020
    e.close()
    e2 = make_engine(world, clock, tmp_path)
    [info] = e2.list()
    assert info.resources[0].queue.budget_s == 0.020 and info.resources[0].queue.limit_bytes == 50_000


def test_default_budget_and_cpu_only_results_carry_no_queue(world, clock, tmp_path):  # noqa: F811
    e = make_engine(world, clock, tmp_path)
    res = _apply(e, cpu_millicpu=200, egress_bps=10_000_000)
    by = {r.resource: r for r in res.resources}
    assert by[Resource.CPU].queue is None
    assert by[Resource.EGRESS].queue.budget_s == DEFAULT_LATENCY_S
    assert by[Resource.EGRESS].queue.limit_bytes == 62_500


@pytest.mark.parametrize("latency_s, changes, message", [
    (0.0005, {"ingress_bps": 2_000_000}, "latency 0.5ms is out of range; accepted: 1ms to 10s"),
    (11.0, {"ingress_bps": 2_000_000}, "latency 11000ms is out of range; accepted: 1ms to 10s"),
    (float("nan"), {"ingress_bps": 2_000_000}, "must be a number of seconds"),
    (0.02, {"cpu_millicpu": 200}, "give it with an ingress or egress bandwidth"),
])
def test_bad_budgets_change_nothing(world, clock, tmp_path, latency_s, changes, message):  # noqa: F811
    e = make_engine(world, clock, tmp_path)
    with pytest.raises(InvalidRequest, match=message):
        _apply(e, latency_s=latency_s, **changes)
    assert world.rates == {} and e.list() == []


def test_a_resized_queue_is_drift(world, clock, tmp_path):  # noqa: F811
    e = make_engine(world, clock, tmp_path)
    _apply(e, latency_s=0.1, ingress_bps=8_000_000, egress_bps=8_000_000)
    [key] = world.rates
    world.queue_bytes[key] = (1000, 100_000)  # someone replaced the leaf on the veth
    e.check_drift()
    assert key not in world.queue_bytes  # shaped again, with the budget of the record
    assert world.latency[key] == 0.1
    [info] = e.list()
    assert info.drift_corrections == 1
    assert {r.queue.limit_bytes for r in info.resources} == {100_000}
    e.check_drift()
    assert e.list()[0].drift_corrections == 1


def test_a_queue_that_cannot_be_read_is_unknown_with_the_reason(world, clock, tmp_path):  # noqa: F811
    e = make_engine(world, clock, tmp_path)
    _apply(e, ingress_bps=2_000_000)

    def broken(host, key):
        raise OSError("netlink socket: permission denied")

    e.net.read_queues = broken
    [info] = e.list()
    q = info.resources[0].queue
    assert q.limit_bytes is None and "cannot read the qdiscs: netlink socket: permission denied" in q.unknown


def test_old_records_decode_to_the_default_budget(world, clock, tmp_path):  # noqa: F811
    e = make_engine(world, clock, tmp_path)
    _apply(e, latency_s=0.2, ingress_bps=2_000_000)
    [stored] = [s.data for s in e.store.load_all()]
    assert record.decode(stored).net.latency_s == 0.2
    del stored["net"]["latency_s"]  # a record written before the budget was kept
    assert record.decode(stored).net.latency_s == DEFAULT_LATENCY_S
    stored["net"]["latency_s"] = 99
    with pytest.raises(record.RecordError, match="net.latency_s is 99"):
        record.decode(stored)


def test_pure_queue_arithmetic():
    info = netshape.QueueInfo(ingress_limit_bytes=12_500, egress_limit_packets=1000, mtu_bytes=1500)
    got = queue_results(info, {Resource.INGRESS: 2_000_000, Resource.EGRESS: 2_000_000}, 0.05)
    assert got[Resource.INGRESS] == QueueResult(budget_s=0.05, limit_bytes=12_500, latency_s=0.05)
    assert got[Resource.EGRESS] == QueueResult(budget_s=0.05, limit_packets=1000)  # the kernel's default leaf
    assert queue_results(netshape.QueueInfo(), {}, 0.05)[Resource.INGRESS].unknown
    desired = {Resource.INGRESS: 2_000_000, Resource.EGRESS: 2_000_000}
    assert stale_queues(info, desired, 0.05) == {Resource.EGRESS}
    assert stale_queues(info, desired, 0.1) == {Resource.INGRESS, Resource.EGRESS}
    assert stale_queues(netshape.QueueInfo(), desired, 0.05) == set()  # no MTU read: cannot tell


def test_grpc_conversions_carry_the_budget_and_the_queue():
    pb = agent_pb2.ApplyRequest(target=agent_pb2.Target(namespace="default", pod="web"),
                                changes=agent_pb2.Changes(ingress_bps=2_000_000), latency_s=0.02)
    assert apply_request_from_pb(pb).latency_s == 0.02
    pb.ClearField("latency_s")
    assert apply_request_from_pb(pb).latency_s is None
    from daemonset.types import Method, ResourceResult

    r = ResourceResult(resource=Resource.INGRESS, original=UNLIMITED, previous=UNLIMITED, requested=2_000_000,
                       in_force=2_000_000, method=Method.NETLINK,
                       queue=QueueResult(budget_s=0.02, limit_bytes=6056, latency_s=0.024224))
    out = resource_pb(r)
    assert out.queue.budget_s == 0.02 and out.queue.limit_bytes == 6056 and not out.queue.HasField("limit_packets")
    assert not resource_pb(ResourceResult(resource=Resource.CPU, original=1, previous=1, requested=1, in_force=1,
                                          method=Method.CRI)).HasField("queue")


# --- the plugin --------------------------------------------------------------------------------


def test_parse_and_format_latency():
    from plugin.errors import UsageError
    from plugin.units import LATENCY_DEFAULT_S, LATENCY_MAX_S, LATENCY_MIN_S, format_latency, parse_latency

    assert (LATENCY_DEFAULT_S, LATENCY_MIN_S, LATENCY_MAX_S) == (DEFAULT_LATENCY_S, MIN_LATENCY_S, MAX_LATENCY_S)
    assert [parse_latency(t) for t in ("50ms", " 20ms", "1ms", "0.5s", ".25s", "10s")] == [
        0.05, 0.02, 0.001, 0.5, 0.25, 10.0]
    assert [format_latency(s) for s in (0.05, 0.024224, 1.5, None)] == ["50ms", "24.2ms", "1.5s", "unknown"]
    for text, message in [("0.5ms", '"0.5ms" is shorter than 1ms; accepted: 1ms to 10s'),
                          ("11s", '"11s" is longer than 10s; accepted: 1ms to 10s'),
                          ("0ms", '"0ms" is zero'), ("20", '"20" has no unit; write 20ms or 20s'),
                          ("5m", 'unknown unit "m"'), ("-5ms", "is negative"), ("fast", "is not a latency"),
                          ("1.5ms", '"1.5ms" is not a whole number of milliseconds')]:
        with pytest.raises(UsageError, match=message):
            parse_latency(text)


def _harness():
    from tests.unit.test_cli import Harness

    return Harness()


def test_cli_latency_reaches_the_backend_and_is_read():
    h = _harness()
    res = h.run("web", "--set-bandwidth=2Mbps", "--latency", "20ms")
    assert res.exit_code == 0, res.output
    assert h.backend.requests[0].latency_s == 0.02
    assert "latency 20ms = 0.02 s of queue per shaped direction" in res.output
    res = h.run("web", "--set-bandwidth=2Mbps")
    assert h.opened[-1].requests[0].latency_s is None  # the agent's default (or the experiment's)


@pytest.mark.parametrize("args, message", [
    (["--set-cpu=500m", "--latency", "20ms"], '--latency "20ms" bounds the queue of a shaped direction; give it'
                                               " with --set-bandwidth"),
    (["--reset", "--latency", "20ms"], "give it with --set-bandwidth"),
    (["--set-bandwidth=2Mbps", "--latency", "20us"], '--latency: "20us" has an unknown unit "us"'),
    (["--set-bandwidth=2Mbps", "--latency", "30s"], '--latency: "30s" is longer than 10s; accepted: 1ms to 10s'),
])
def test_cli_bad_latency_is_one_line_and_sends_nothing(args, message):
    h = _harness()
    res = h.run("web", *args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert h.opened == []


def test_output_shows_the_queue_read_back():
    from datetime import datetime, timezone

    from plugin.backends import ApplyResult, ExperimentStatus, QueueReading, ResourceChange, TargetResult
    from plugin.output import render_result, render_status, result_data

    now = datetime(2026, 12, 1, 20, 0, tzinfo=timezone.utc)
    q = QueueReading(budget_s=0.02, limit_bytes=6056, latency_s=0.024224)
    change = ResourceChange("bandwidth-ingress", None, 2_000_000, 2_000_000, "tc", queue=q)
    result = ApplyResult(targets=(TargetResult("default", "web", "app", changes=(change,)),))
    text = render_result(result, "text", now)
    assert "(read back 2Mbit/s, queue 24.2ms = 6,056 B (budget 20ms)) via tc" in text
    data = result_data(result)["targets"][0]["changes"][0]["queue"]
    assert data == {"budgetSeconds": 0.02, "limitBytes": 6056, "limitPackets": None, "latencySeconds": 0.024224,
                    "unknown": None}
    lost = ResourceChange("bandwidth-egress", None, 2_000_000, 2_000_000, "tc",
                          queue=QueueReading(budget_s=0.05, unknown="cannot read the qdiscs: EPERM"))
    table = render_status([ExperimentStatus("default", "web", "app", changes=(change, lost))], "text", now)
    assert table.splitlines()[0].split() == ["NAMESPACE", "POD", "CONTAINER", "RESOURCE", "ORIGINAL", "CHAOS", "NOW",
                                             "QUEUE", "METHOD", "EXPIRES", "STATE"]
    assert "24.2ms/6056B" in table
    assert "bandwidth-egress: queue unknown (cannot read the qdiscs: EPERM)" in table


# --- cluster mode: spec.bandwidth.latencyMilliseconds and the queue in status ------------------------


def test_spec_field_schema_reconcile_and_status():
    from daemonset import crd
    from daemonset.reconcile import _request, applied_entry
    from daemonset.types import Method, ResourceResult
    from plugin.backends.cluster import _entry_status
    from tests.unit.test_manifests_crd import POD, admitted

    spec = crd.ChaosSpec(pod="web-1", container="app", bandwidth_bps=2_000_000, latency_s=0.02)
    obj = crd.build("shop", spec, name=crd.object_name("web-1", "app"), owners=[POD])
    assert obj["spec"]["bandwidth"] == {"bitsPerSecond": 2_000_000, "direction": "both", "latencyMilliseconds": 20}
    assert admitted(obj) == [] and crd.ChaosSpec.from_dict(obj["spec"]) == spec
    assert "latencyMilliseconds" not in crd.ChaosSpec(pod="web-1", bandwidth_bps=8000).to_dict()["bandwidth"]
    for bad in (0, 10_001, "20ms", 2.5):
        body = dict(obj, spec=dict(obj["spec"], bandwidth={"bitsPerSecond": 2_000_000, "latencyMilliseconds": bad}))
        assert any(path.startswith("spec.bandwidth.latencyMilliseconds") for path, _ in admitted(body)), bad
        with pytest.raises(crd.SpecError, match="spec.bandwidth.latencyMilliseconds"):
            crd.ChaosSpec.from_dict(body["spec"])

    obj["metadata"].update(uid="rc-1", generation=1)
    req = _request(spec, "shop", "web-1", "app", None, obj)
    assert req.latency_s == 0.02 and req.changes.ingress_bps == req.changes.egress_bps == 2_000_000
    req.validate()

    q = QueueResult(budget_s=0.02, limit_bytes=6056, latency_s=0.024224)
    results = [ResourceResult(resource=r, original=UNLIMITED, previous=UNLIMITED, requested=2_000_000,
                              in_force=2_000_000, method=Method.NETLINK, queue=q)
               for r in (Resource.INGRESS, Resource.EGRESS)]
    entry = applied_entry(POD, "app", 1, "n1", 1.9e9, results, None, "e1")
    assert entry["changes"][0]["queue"] == {"budgetSeconds": 0.02, "limitBytes": 6056, "limitPackets": None,
                                            "latencySeconds": 0.024224, "unknown": None}
    obj["status"] = crd.with_targets(obj, [entry])
    assert admitted(obj) == []
    status = _entry_status(obj, obj["status"]["targets"][0], spec.requested())
    assert [c.queue.limit_bytes for c in status.changes] == [6056, 6056]
    assert status.changes[0].queue.latency_s == 0.024224
