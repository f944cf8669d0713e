"""plugin.request and plugin.output as pure functions: flags -> request, results -> text."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from plugin.backends import AgentAddress, ApplyResult, ChaosRequest, Connection, ResourceChange, TargetResult
from plugin.errors import UsageError
from plugin.output import format_time, render_result
from plugin.request import Flags, build_invocation, parse_agent_address


@pytest.mark.parametrize(
    ("direction", "ingress", "egress"),
    [(None, 2_000_000, 2_000_000), ("both", 2_000_000, 2_000_000), ("ingress", 2_000_000, None),
     ("egress", None, 2_000_000)],
)
def test_direction_maps_to_ingress_and_egress(direction, ingress, egress):
    req = build_invocation(Flags(pod="web", set_bandwidth="2M", direction=direction)).request
    assert (req.ingress_bps, req.egress_bps) == (ingress, egress)


def test_invocation_reads_every_value_once():
    inv = build_invocation(
        Flags(pod="po/web", namespace="shop", set_cpu="1.5", set_memory="129e6", set_bandwidth="10Ki",
              duration="1.5h", timeout="45s", kubeconfig="/k", context="c")
    )
    assert inv.request == ChaosRequest(namespace="shop", pod="web", cpu_millicpu=1500, memory_bytes=129_000_000,
                                       bandwidth_bps=10_240, duration_s=5400.0)
    assert inv.connection == Connection(kubeconfig="/k", context="c", timeout_s=45.0)
    assert inv.readings == (
        "cpu 1.5 = 1.5 CPU (1,500 millicpu)",
        "memory 129e6 = 129,000,000 bytes",
        "bandwidth 10Ki = 10,240 bit/s (both directions)",
        "duration 1.5h = 5,400 s",
    )


def test_reset_request_carries_no_values():
    inv = build_invocation(Flags(pod="web", reset=True, dry_run=True, method="cgroup"))
    assert inv.request == ChaosRequest(namespace=None, pod="web", reset=True, dry_run=True, method="cgroup")
    assert inv.readings == ()


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("unix:///run/a.sock", AgentAddress("unix", path="/run/a.sock")),
        ("10.1.2.3:9443", AgentAddress("tcp", host="10.1.2.3", port=9443)),
        ("[::1]:1", AgentAddress("tcp", host="::1", port=1)),
        ("node-1.cluster.local:65535", AgentAddress("tcp", host="node-1.cluster.local", port=65535)),
    ],
)
def test_agent_address_accepted(text, address):
    assert parse_agent_address(text) == address
    assert parse_agent_address(text).grpc_target == text


@pytest.mark.parametrize("text", ["", "unix://", "unix:///", "unix:x", "node", ":9443", "node:http", "node:-1",
                                  "[::1]9443", "tcp://node:1", "no de:1", "node:１"])
def test_agent_address_refused(text):
    with pytest.raises(UsageError) as info:
        parse_agent_address(text)
    assert str(info.value).startswith("--agent-address: ")


@pytest.mark.parametrize(
    ("text", "target"),
    [("/run/chaos/agent.sock", "unix:///run/chaos/agent.sock"), ("unix:/run/a.sock", "unix:///run/a.sock")],
)
def test_agent_address_as_a_bare_absolute_path(text, target):
    assert parse_agent_address(text) == AgentAddress("unix", path=target[len("unix://"):])
    assert parse_agent_address(text).grpc_target == target


@pytest.mark.parametrize("text", ["agent.sock", "run/chaos/agent.sock", "./agent.sock"])
def test_agent_address_relative_path_is_named_as_such(text):
    with pytest.raises(UsageError) as info:
        parse_agent_address(text)
    assert str(info.value) == (
        f'--agent-address: "{text}" is a relative path; a unix socket needs an absolute path like '
        "unix:///run/chaos-agent/agent.sock"
    )


def test_time_format_same_day_and_other_day_and_naive_is_utc():
    now = datetime(2026, 11, 22, 23, 0, tzinfo=timezone.utc)
    assert format_time(now + timedelta(minutes=30), now) == "23:30:00Z"
    assert format_time(now + timedelta(hours=2), now) == "2026-11-23T01:00:00Z"
    assert format_time(datetime(2026, 11, 22, 23, 5), now) == "23:05:00Z"
    cet = timezone(timedelta(hours=1))
    assert format_time(datetime(2026, 11, 23, 0, 5, tzinfo=cet), now) == "23:05:00Z"


def test_text_shows_a_message_and_an_empty_match():
    now = datetime(2026, 11, 22, 20, 0, tzinfo=timezone.utc)
    change = ResourceChange("cpu", 2000, 500, 500, "cgroup", None, "pod cgroup raised first")
    result = ApplyResult(targets=(TargetResult("a", "p", "c", changes=(change,)),))
    assert render_result(result, "text", now) == (
        "a/p (container c):\n  cpu: 2 -> 500m (read back 500m) via cgroup, no expiry; pod cgroup raised first\n"
    )
    assert render_result(ApplyResult(targets=()), "text", now) == "no pods matched\n"


def test_profile_ranges_plan_even_steps_and_need_over():
    from plugin.request import Flags, build_invocation, plan_profile

    first = plan_profile({"--set-cpu": (1000, 100)}, 300.0, 10)[:3]
    assert [v for _, v in first] == [{"--set-cpu": 1000}, {"--set-cpu": 900}, {"--set-cpu": 800}]
    assert [round(o, 6) for o, _ in first] == [0.0, 33.333333, 66.666667]
    assert plan_profile({"--set-cpu": (1000, 100)}, 300.0, 10)[-1] == (300.0, {"--set-cpu": 100})
    assert len(plan_profile({"--set-cpu": (10, 12)}, 60.0, 50)) == 3  # repeated values are one step
    inv = build_invocation(Flags(pod="web", set_cpu="1000m..100m", set_memory="256Mi", over="5m", steps="4",
                                 agent_address="unix:///run/a.sock"))
    req = inv.request
    assert req.cpu_millicpu == 1000 and req.memory_bytes == 256 * 2**20
    assert [(s.offset_s, s.cpu_millicpu, s.memory_bytes) for s in req.steps] == [
        (100.0, 700, None), (200.0, 400, None), (300.0, 100, None)]
    assert any("in 4 steps over 300s" in line for line in inv.readings)
    # Cluster mode too (#13): the same steps, which the cluster backend writes as spec.profile rows.
    cluster = build_invocation(Flags(pod="web", set_cpu="1000m..100m", over="5m", steps="4"))
    assert cluster.connection.mode == "cluster" and cluster.request.steps == req.steps
    for flags, words in [
        (Flags(pod="web", set_cpu="1000m..100m", agent_address="unix:///a"), "a range needs --over"),
        (Flags(pod="web", set_cpu="1000m..", over="5m", agent_address="unix:///a"), "is not a range"),
        (Flags(pod="web", set_cpu="1000m..100m", over="5m", steps="1", agent_address="unix:///a"), "from 2 to 1000"),
        (Flags(pod="web", set_cpu="500m", over="5m", agent_address="unix:///a"), "go with a range"),
        (Flags(pod="web", set_cpu="1000m..0", over="5m", agent_address="unix:///a"), "0"),
    ]:
        with pytest.raises(UsageError, match=words):
            build_invocation(flags)
