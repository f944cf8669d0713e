"""``chaos-agent --node-local-api=off`` (cluster installs): the node-local socket answers grpc
health for the kubelet's probes and nothing else."""

from __future__ import annotations

import tempfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemonset.agent import parse_args
from daemonset.api.gen import agent_pb2, agent_pb2_grpc
from daemonset.server import serve


@pytest.mark.parametrize("node_local_api", [True, False])
def test_node_local_api_can_be_health_only(node_local_api):
    with tempfile.TemporaryDirectory(prefix="kcx-h-", dir="/tmp") as d:
        server = serve(object(), f"unix://{d}/agent.sock", node_local_api=node_local_api)
        try:
            with grpc.insecure_channel(f"unix://{d}/agent.sock") as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                if node_local_api:
                    return
                with pytest.raises(grpc.RpcError) as err:
                    agent_pb2_grpc.AgentStub(channel).List(agent_pb2.ListRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            server.stop(0)


def test_the_flag():
    assert parse_args(["--node-local-api=off"]).node_local_api == "off"
    assert parse_args([]).node_local_api == "on"
