"""Committed gRPC stubs are what their generator produces now (regenerate and compare).

Each entry of GENERATORS names a generator ``generate(out) -> [written paths]`` and how a written
path maps to the committed file; add the agent API's stubs the same way.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cri_api() -> tuple[Callable[[pathlib.Path], list[pathlib.Path]], Callable[[pathlib.Path, pathlib.Path], pathlib.Path]]:
    from cri_api import generate

    return generate.generate, lambda written, out: REPO_ROOT / written.relative_to(out)


def _agent_api() -> tuple[Callable[[pathlib.Path], list[pathlib.Path]], Callable[[pathlib.Path, pathlib.Path], pathlib.Path]]:
    from daemonset.api import generate

    return generate.generate, lambda written, out: generate.GEN_DIR / written.relative_to(out)


GENERATORS = {
    "cri_api (python -m cri_api.generate)": _cri_api,
    "agent API (python -m daemonset.api.generate)": _agent_api,
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_committed_stubs_match_a_fresh_generation(name, tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) generates the stubs")
    generate, committed_for = GENERATORS[name]()
    written = generate(tmp_path)
    assert written, f"{name} wrote no files"
    stale = []
    for path in written:
        committed = committed_for(path, tmp_path)
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(committed.relative_to(REPO_ROOT)))
    assert not stale, f"generated files out of date: {stale}; regenerate with {name.split('(')[1].rstrip(')')}"


def test_cri_generated_module_names_the_upstream_service_and_numbers():
    from cri_api.v1 import api_pb2

    service = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    assert {"UpdateContainerResources", "ContainerStatus", "ExecSync", "ListContainers"} <= set(service.methods_by_name)
    fields = {f.name: f.number for f in api_pb2.LinuxContainerResources.DESCRIPTOR.fields}
    assert fields == {
        "cpu_period": 1,
        "cpu_quota": 2,
        "cpu_shares": 3,
        "memory_limit_in_bytes": 4,
        "oom_score_adj": 5,
        "cpuset_cpus": 6,
        "cpuset_mems": 7,
        "hugepage_limits": 8,
        "unified": 9,
        "memory_swap_limit_in_bytes": 10,
    }
