"""plugin.api and the pytest plugin in node-local mode against a real chaos-agent on the test node
(real containerd, cgroups, qdiscs): what the kernel holds inside the block and after it, when the
block ends normally, raises, is interrupted (SIGINT, SIGTERM), when its process is SIGKILLed (the
duration reverts), when the agent is gone at the end, and the ``chaos`` fixture run by pytester.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from plugin import api
from plugin.api import RevertFailed, limit
from plugin.errors import BackendError, UsageError
from tests.node.test_agent import (  # noqa: F401 (agent is a fixture)
    BUSY,
    MiB,
    agent,
    cpu_files,
    cpu_used,
    ifb_exists,
    iperf_bps,
    mem_files,
    wait_until,
)
from tests.support.node import ContainerSpec

pytest_plugins = ["pytester"]

REPO = pathlib.Path(__file__).resolve().parents[2]
ORIGINAL_CPU = ("50000", "50000")


@pytest.fixture
def web(pods):
    return pods.run("web", containers=[ContainerSpec("app", argv=BUSY, cpu_millicpu=500, memory_bytes=64 * MiB)])


def untouched(agent, pod) -> bool:  # noqa: F811
    return cpu_files(pod) == ORIGINAL_CPU and mem_files(pod)[0] == str(64 * MiB) and agent.list() == [] \
        and agent.records() == [] and not ifb_exists(pod)


def test_the_block_holds_the_limits_and_its_end_puts_them_back(agent, web):  # noqa: F811
    exp = limit("web", namespace="default", container="app", cpu="200m", memory="32Mi", agent_address=agent.address)
    assert agent.list() == []  # nothing before the block
    with exp:
        # In force as the block starts: the files, the agent's reading, and what the container gets.
        assert cpu_files(web)[0] == "20000" and mem_files(web)[0] == str(32 * MiB)
        assert exp.read_back("cpu") == 200 and exp.original("cpu") == 500
        assert exp.read_back("memory") == 32 * MiB and exp.original("memory") == 64 * MiB
        assert cpu_used(web) < 0.2 * 1.25
        (listed,) = agent.list()
        assert abs(listed.expires_at_unix_s - listed.started_at_unix_s - api.DEFAULT_DURATION_S) < 1
        assert abs(exp.expires_at.timestamp() - listed.expires_at_unix_s) < 1
        (now,) = exp.status()
        assert (now.pod, now.container, now.experiment_id) == ("web", "app", listed.experiment_id)
        (web.container_cgroup_dir("cpu") / "cpu.cfs_quota_us").write_text("30000")  # drift: status reads it
        assert exp.in_force("cpu") in (300, 200)  # 200 once the agent has corrected it
    assert untouched(agent, web)
    assert exp.state == "ended" and exp.reset_result.ok
    assert {c.resource: c.read_back for c in exp.reset_result.targets[0].changes} == {"cpu": 500,
                                                                                      "memory": 64 * MiB}


def test_the_effect_is_measured_as_top_measures_it(agent, web):  # noqa: F811
    with limit("web", cpu="200m", agent_address=agent.address) as exp:
        (row,) = exp.effect("2s")
        assert (row.status.pod, row.status.container) == ("web", "app") and abs(row.interval_s - 2) < 0.5
        assert 0.1 < row.cpu_cores < 0.25, row  # one busy thread held at 200m
        assert row.cpu_throttled_share > 0.5, row
    assert untouched(agent, web)


def test_bandwidth_is_shaped_when_the_block_starts(agent, pods):  # noqa: F811
    pod = pods.run("net", containers=[ContainerSpec("app", cpu_millicpu=500)])
    with limit("net", bandwidth="8Mbps", direction="ingress", agent_address=agent.address) as exp:
        assert exp.read_back("bandwidth-ingress") == 8_000_000
        measured = iperf_bps(pod, into_pod=True)
        assert 0.7 * 8e6 < measured < 1.1 * 8e6, measured
    with limit("net", bandwidth="2Mbps", direction="egress", agent_address=agent.address):
        assert ifb_exists(pod)
    assert not ifb_exists(pod) and agent.list() == []


def test_an_exception_in_the_block_reverts_and_is_raised_unchanged(agent, web):  # noqa: F811
    boom = ValueError("the load test failed")
    with pytest.raises(ValueError) as err:
        with limit("web", cpu="100m", agent_address=agent.address):
            assert cpu_files(web)[0] == "10000"
            raise boom
    assert err.value is boom and err.value.__cause__ is None
    assert untouched(agent, web)


def test_ctrl_c_in_the_block_reverts(agent, web):  # noqa: F811
    with pytest.raises(KeyboardInterrupt):
        with limit("web", cpu="100m", agent_address=agent.address):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
    assert untouched(agent, web)


def test_update_and_the_end_restores_the_first_originals(agent, web):  # noqa: F811
    with limit("web", cpu="300m", agent_address=agent.address) as exp:
        exp.update(cpu="100m", memory="48Mi")
        assert cpu_files(web)[0] == "10000" and mem_files(web)[0] == str(48 * MiB)
        assert exp.original("cpu") == 500 and exp.original("memory") == 64 * MiB
        assert exp.in_force("memory") == 48 * MiB
    assert untouched(agent, web)


def test_a_target_under_another_experiment_is_refused(agent, web):  # noqa: F811
    api.apply("web", memory="48Mi", agent_address=agent.address)  # as kubectl-chaos --set-memory would
    with pytest.raises(BackendError, match=r"^default/web/app already has an experiment \(memory 48Mi "
                                           r"\(original 64Mi\), active, [0-9a-f]+\); limit\(\) resets"):
        with limit("web", cpu="100m", agent_address=agent.address):
            raise AssertionError("entered")
    assert cpu_files(web) == ORIGINAL_CPU and mem_files(web)[0] == str(48 * MiB)  # theirs is intact
    (item,) = api.status(agent_address=agent.address)
    assert item.pod == "web" and item.changes[0].read_back == 48 * MiB
    done = api.reset("web", agent_address=agent.address)
    assert done.targets[0].changes[0].read_back == 64 * MiB
    assert untouched(agent, web)


def test_errors_are_the_clis_one_line_errors_and_change_nothing(agent, web, tmp_path):  # noqa: F811
    with pytest.raises(BackendError) as err:
        with limit("nope", cpu="100m", agent_address=agent.address):
            pass
    assert "no pod default/nope" in str(err.value) and "default/web" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="^memory: "):
        limit("web", memory="1Mi", agent_address=agent.address)
    with pytest.raises(BackendError, match="cannot reach the chaos-agent at unix://"):
        with limit("web", cpu="100m", agent_address=f"unix://{tmp_path}/none.sock", timeout="3s"):
            pass
    assert untouched(agent, web)


def test_the_agent_gone_at_the_end_raises_what_is_still_changed(agent, web):  # noqa: F811
    exp = limit("web", cpu="150m", agent_address=agent.address, timeout="3s")
    boom = RuntimeError("the body failed too")
    with pytest.raises(RevertFailed) as err:
        with exp:
            agent.stop()
            raise boom
    message = str(err.value)
    assert message.startswith(f"could not revert default/web/app: cannot reach the chaos-agent at {agent.address}")
    assert "presumably still changed: default/web/app: cpu 150m (original 500m)" in message
    assert "the agent ends it by itself at" in message
    assert f"to end it now: kubectl-chaos --reset -n default web -c app --agent-address {agent.address}" in message
    assert message.endswith("the block had raised RuntimeError: the body failed too")
    assert err.value.__cause__ is boom and exp.state == "revert-failed"
    assert cpu_files(web)[0] == "15000"
    agent.start()  # the agent is back (it re-armed the experiment): the revert can be tried again
    assert exp.stop().ok
    assert untouched(agent, web)


# ---------------------------------------------------------------- a program using the API


PROGRAM = """
import sys, time
from plugin.api import limit

with limit("web", cpu="200m", duration={duration!r}, agent_address={address!r}):
    print("in", flush=True)
    time.sleep(60)
print("not reached", flush=True)
"""


def start_program(agent, duration: str | None = None) -> subprocess.Popen:  # noqa: F811
    code = PROGRAM.format(address=agent.address, duration=duration)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "in", proc.communicate(timeout=30)
    return proc


def test_sigterm_to_a_program_in_the_block_reverts_and_exits_143(agent, web):  # noqa: F811
    proc = start_program(agent)
    assert cpu_files(web)[0] == "20000"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "" and "not reached" not in out, err
    assert untouched(agent, web)


def test_a_program_killed_in_the_block_is_reverted_by_the_duration(agent, web):  # noqa: F811
    proc = start_program(agent, duration="3s")
    assert cpu_files(web)[0] == "20000"
    proc.kill()
    proc.wait(timeout=10)
    assert cpu_files(web)[0] == "20000"  # nobody left the block
    assert wait_until(lambda: untouched(agent, web), 10)


# ---------------------------------------------------------------- the pytest plugin


SUITE = """
import pathlib

import pytest

QUOTA = pathlib.Path({quota!r})
MEMORY = pathlib.Path({memory!r})


def test_passes(chaos):
    exp = chaos.limit("web", cpu="200m", memory="32Mi")
    assert QUOTA.read_text().strip() == "20000" and exp.read_back("memory") == 32 * 2**20


def test_fails(chaos):
    chaos.limit("web", cpu="100m")
    assert QUOTA.read_text().strip() == "not what it is"


def test_raises(chaos):
    chaos.limit("web", memory="48Mi")
    raise ValueError("the body raised")


def test_block(chaos):
    with chaos.limit("web", cpu="300m") as exp:
        assert QUOTA.read_text().strip() == "30000"
    assert not exp.active and QUOTA.read_text().strip() == "50000"


def test_each_starts_from_the_originals():
    assert QUOTA.read_text().strip() == "50000" and MEMORY.read_text().strip() == str(64 * 2**20)
"""


def test_the_chaos_fixture_reverts_after_passing_failing_and_raising_tests(agent, web, pytester):  # noqa: F811
    pytester.makepyfile(test_suite=SUITE.format(
        quota=str(web.container_cgroup_dir("cpu") / "cpu.cfs_quota_us"),
        memory=str(web.container_cgroup_dir("memory") / "memory.limit_in_bytes")))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--chaos-agent-address", agent.address,
                                           "--chaos-namespace", "default")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*not what it is*", "*ValueError: the body raised*"])
    assert untouched(agent, web)


def test_the_chaos_fixture_with_the_address_in_the_ini_file(agent, web, pytester):  # noqa: F811
    pytester.makeini(f"[pytest]\nchaos_agent_address = {agent.address}\n")
    pytester.makepyfile(test_ini=textwrap.dedent("""
        def test_ini(chaos):
            exp = chaos.limit("web", cpu="250m")
            assert exp.in_force("cpu") == 250
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert untouched(agent, web)
