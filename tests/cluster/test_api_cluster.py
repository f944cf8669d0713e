"""plugin.api and the pytest plugin in cluster mode: ResourceChaos objects through the fake API server
(as user alice, bound to the manifests' user role in "shop"), applied by the real chaos-agent
process on the real test node; effects checked in the cgroup files, and that no object is left.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import urllib.request
import warnings

import pytest
import yaml

from plugin import api
from plugin.api import ApplyFailed, ExperimentEnded, RevertFailed, limit
from plugin.errors import BackendError
from tests.cluster.helpers import chaos_objects, memory_limit, mirror, quota_us, wait_for
from tests.support.node import ContainerSpec

pytest_plugins = ["pytester"]

MiB = 2**20
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "pytest-kind"


@pytest.fixture
def shop(cluster, pods):
    """Two pods of app=web in "shop" (1 CPU, 256Mi each) and one other, mirrored into the fake API."""
    fakeapi, agent, run = cluster
    made = {}
    for name, app in (("web-0", "web"), ("web-1", "web"), ("db-0", "db")):
        made[name] = pods.run(name, "shop", [ContainerSpec(cpu_millicpu=1000, memory_bytes=256 * MiB)])
        mirror(fakeapi, made[name], labels={"app": app})
    return made


def untouched(fakeapi, pods) -> bool:
    return all(quota_us(p) == 100_000 and memory_limit(p) == 256 * MiB for p in pods) and chaos_objects(fakeapi) == []


def test_the_block_holds_the_limits_and_its_end_puts_them_back(cluster, shop):
    fakeapi, agent, run = cluster
    web = shop["web-0"]
    with limit("web-0", cpu="500m", memory="128Mi", kubeconfig=run.kubeconfig) as exp:
        assert quota_us(web) == 50_000 and memory_limit(web) == 128 * MiB
        (target,) = exp.targets
        assert (target.namespace, target.pod, target.container) == ("shop", "web-0", "app")  # the context's namespace
        assert exp.read_back("cpu") == 500 and exp.original("memory") == 256 * MiB
        (obj,) = chaos_objects(fakeapi)
        assert obj["spec"]["durationSeconds"] == api.DEFAULT_DURATION_S
        assert exp.in_force("memory") == 128 * MiB
        assert [s.state for s in exp.status()] == ["applied"]
    assert untouched(fakeapi, shop.values())
    assert exp.reset_result.ok


def test_a_selector_changes_every_matching_pod_and_reverts_them(cluster, shop):
    fakeapi, agent, run = cluster
    with limit(selector="app=web", cpu="200m", kubeconfig=run.kubeconfig) as exp:
        assert sorted(t.pod for t in exp.targets) == ["web-0", "web-1"]
        assert [quota_us(shop[p]) for p in ("web-0", "web-1", "db-0")] == [20_000, 20_000, 100_000]
        assert exp.read_back("cpu", pod="web-1") == 200
        assert sorted(s.pod for s in exp.status()) == ["web-0", "web-1"]
    assert untouched(fakeapi, shop.values())


def test_an_exception_in_the_block_reverts_and_is_raised_unchanged(cluster, shop):
    fakeapi, agent, run = cluster
    boom = ValueError("the load test failed")
    with pytest.raises(ValueError) as err:
        with limit("db-0", cpu="300m", kubeconfig=run.kubeconfig):
            assert quota_us(shop["db-0"]) == 30_000
            raise boom
    assert err.value is boom
    assert untouched(fakeapi, shop.values())


def test_a_target_under_another_experiment_is_refused(cluster, shop):
    fakeapi, agent, run = cluster
    out = run("--set-memory=128Mi", "web-0")
    assert out.returncode == 0, out.stderr
    with pytest.raises(BackendError, match=r"^shop/web-0/app already has an experiment \(memory 128Mi \(original "
                                           r"256Mi\), applied, shop/web-0.app\)"):
        with limit("web-0", cpu="100m", kubeconfig=run.kubeconfig):
            raise AssertionError("entered")
    with pytest.raises(BackendError, match="shop/web-0/app already has an experiment"):
        with limit(selector="app=web", cpu="100m", kubeconfig=run.kubeconfig):
            raise AssertionError("entered")
    assert quota_us(shop["web-0"]) == 100_000 and memory_limit(shop["web-0"]) == 128 * MiB  # theirs, intact
    assert [o["metadata"]["name"] for o in chaos_objects(fakeapi)] == ["web-0.app"]
    api.reset("web-0", kubeconfig=run.kubeconfig)
    assert untouched(fakeapi, shop.values())


def test_a_selector_with_a_pod_no_agent_answers_for_is_reverted_and_raises(cluster, shop):
    fakeapi, agent, run = cluster
    fakeapi.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "web-far", "namespace": "shop", "labels": {"app": "web"}},
                    "spec": {"nodeName": "node-without-agent", "containers": [{"name": "app"}]},
                    "status": {"phase": "Running"}})
    with pytest.raises(ApplyFailed) as err:
        with limit(selector="app=web", cpu="400m", kubeconfig=run.kubeconfig, timeout="3s"):
            raise AssertionError("entered")
    assert "shop/web-far/app: no answer from the chaos-agent on node node-without-agent" in str(err.value)
    assert str(err.value).endswith("reverted the 2 changed")
    assert sorted(t.pod for t in err.value.result.targets if t.error is None) == ["web-0", "web-1"]
    assert untouched(fakeapi, shop.values())


def test_the_agent_down_at_the_end_raises_what_is_still_changed(cluster, shop):
    fakeapi, agent, run = cluster
    exp = limit("web-0", cpu="200m", kubeconfig=run.kubeconfig, timeout="3s")
    with pytest.raises(RevertFailed) as err:
        with exp:
            agent.kill9()
    message = str(err.value)
    assert message.startswith("could not revert shop/web-0/app: ResourceChaos shop/web-0.app is marked for "
                              "deletion, but the chaos-agent on node test-node did not revert within 3s")
    assert "still changed: shop/web-0/app: cpu 200m (original 1) (reverting)" in message
    assert f"to end it now: kubectl-chaos --reset -n shop web-0 -c app --kubeconfig {run.kubeconfig}" in message
    assert exp.state == "revert-failed" and quota_us(shop["web-0"]) == 20_000
    agent.start()  # the agent finishes the revert it was asked for
    wait_for(lambda: untouched(fakeapi, shop.values()), timeout_s=15, what="the revert after the restart")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExperimentEnded)  # it was ended by this revert, not before
        assert exp.stop() is None and exp.state == "ended"  # tried again: nothing left to do


def test_the_chaos_fixture_reverts_after_passing_failing_and_raising_tests(cluster, shop, pytester):
    fakeapi, agent, run = cluster
    quota = shop["web-0"].container_cgroup_dir("cpu") / "cpu.cfs_quota_us"
    # Two contexts, the current one without any permission: --chaos-context must choose alice's.
    token = fakeapi.add_user("nobody")
    with open(run.kubeconfig) as f:
        alice = next(u for u in yaml.safe_load(f)["users"] if u["name"] == "alice")
    kubeconfig = fakeapi.write_kubeconfig(pytester.path / "kubeconfig", [("nobody", token),
                                                                        ("alice", alice["user"]["token"])],
                                          namespace="shop")
    pytester.makepyfile(test_suite=f"""
        import pathlib

        QUOTA = pathlib.Path({str(quota)!r})

        def test_passes(chaos):
            chaos.limit("web-0", cpu="200m")
            assert QUOTA.read_text().strip() == "20000"

        def test_fails(chaos):
            chaos.limit(selector="app=web", memory="128Mi")
            assert QUOTA.read_text().strip() == "not what it is"

        def test_raises(chaos):
            chaos.limit("db-0", cpu="300m")
            raise ValueError("the body raised")

        def test_each_starts_from_the_originals():
            assert QUOTA.read_text().strip() == "100000"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--chaos-kubeconfig={kubeconfig}",
                                           "--chaos-context=alice")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*not what it is*", "*ValueError: the body raised*"])
    assert untouched(fakeapi, shop.values())

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--chaos-kubeconfig={kubeconfig}",
                                           "-k", "test_passes")
    result.assert_outcomes(failed=1)  # the current context, "nobody", may not do anything
    result.stdout.fnmatch_lines(["*BackendError: not allowed*"])
    assert untouched(fakeapi, shop.values())


def test_the_example_suite_passes_against_pods_on_the_test_node(cluster, pods):
    """examples/pytest-kind as a user runs it, with the fake API server for kind: its own CGI
    script in two busybox httpd pods on the test node, SLOW_URL instead of a port-forward, and the
    connection options on the command line over its pytest.ini."""
    fakeapi, agent, run = cluster
    app = list(yaml.safe_load_all((EXAMPLE / "app.yaml").read_text()))
    script = next(d for d in app if d["kind"] == "ConfigMap")["data"]["work"]
    start = 'mkdir -p /www/cgi-bin && printf "%s" "$WORK" > /www/cgi-bin/work && chmod 755 /www/cgi-bin/work && ' \
            "exec httpd -f -p 8080 -h /www"
    spec = ContainerSpec("app", argv=("sh", "-c", start), cpu_millicpu=1000, memory_bytes=64 * MiB,
                         env={"WORK": script})
    slow = [pods.run(f"slow-{i}", "shop", [spec]) for i in range(2)]
    for pod in slow:
        mirror(fakeapi, pod, labels={"app": "slow"})
    url = f"http://{slow[0].ip}:8080/cgi-bin/work"

    def answers() -> bool:
        try:
            return urllib.request.urlopen(url, timeout=5).read() == b"done\n"
        except OSError:
            return False

    wait_for(answers, timeout_s=15, what="the demo endpoint")
    env = {**os.environ, "SLOW_URL": url}
    env.pop("PYTEST_ADDOPTS", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-s",
                          f"--chaos-kubeconfig={run.kubeconfig}", "--chaos-context=alice", "--chaos-namespace=shop"],
                         cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout and "ms at 200m" in res.stdout
    assert all(quota_us(p) == 100_000 for p in slow) and chaos_objects(fakeapi) == []
