"""The pytest plugin (plugin/pytest_plugin.py) as users get it: registered through the pytest11 entry
point, run by pytest's own ``pytester`` (each run in a fresh process) on suites written here. Their
conftest overrides the ``chaos_backend_opener`` fixture with the in-memory backend of
test_api_fake_backend.py, which writes every call to a journal; the real agent and the fake API
server: tests/node/test_api.py and tests/cluster/test_api_cluster.py.
"""

from __future__ import annotations

import collections
import importlib.metadata
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest_plugins = ["pytester"]

REPO = pathlib.Path(__file__).resolve().parents[2]

CONFTEST = """
import sys
sys.path.insert(0, {repo!r})

import pytest
from tests.unit.test_api_fake_backend import FakeCluster

JOURNAL = {journal!r}


def write(line):
    with open(JOURNAL, "a") as f:
        f.write(line + "\\n")


@pytest.fixture(scope="session")
def fake_cluster():
    return FakeCluster(journal=write)


@pytest.fixture
def chaos_backend_opener(fake_cluster):
    def opener(conn):
        write(f"open {{conn.mode}} {{conn.agent_address or conn.kubeconfig}} {{conn.context}}")
        return fake_cluster.open(conn)
    return opener
"""


@pytest.fixture
def suite(pytester):
    """``suite(tests, *args)`` runs a test file in a fresh directory with the journaling conftest;
    returns (RunResult, journal lines)."""
    journal = pytester.path / "journal.txt"
    pytester.makeconftest(CONFTEST.format(repo=str(REPO), journal=str(journal)))

    def run(tests: str, *args: str, ini: str | None = None):
        if ini is not None:
            pytester.makeini(ini)
        pytester.makepyfile(test_suite=textwrap.dedent(tests))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        lines = journal.read_text().splitlines() if journal.exists() else []
        return result, lines

    return run


def balanced(lines: list[str]) -> bool:
    """Every container applied to was reset afterwards."""
    held: collections.Counter[str] = collections.Counter()
    for line in lines:
        what, _, target = line.partition(" ")
        if what == "apply":
            held[target.rsplit("/", 1)[0] if target.count("/") > 1 else target] += 1
        elif what == "reset":
            held[target.rsplit("/", 1)[0]] = 0
    return not +held


def test_the_entry_point_registers_the_plugin():
    eps = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "kubectl_chaos"]
    assert [ep.value for ep in eps] == ["plugin.pytest_plugin"], "reinstall the project: make setup-venv"


def test_every_experiment_is_reverted_also_when_the_test_fails_or_raises(suite):
    result, lines = suite("""
        import pytest

        def test_passes(chaos, fake_cluster):
            exp = chaos.limit("web", cpu="200m")
            assert exp.active and fake_cluster.limits["default", "web", "app"]["cpu"] == 200

        def test_fails(chaos, fake_cluster):
            chaos.limit("web", cpu="300m")
            chaos.limit("db", memory="64Mi")
            assert fake_cluster.limits["default", "web", "app"]["cpu"] == 1

        def test_raises(chaos):
            chaos.limit("web", bandwidth="2Mbps")
            raise ValueError("the body raised")

        def test_block_ends_first(chaos, fake_cluster):
            with chaos.limit("web", cpu="100m") as exp:
                assert exp.read_back("cpu") == 100
            assert fake_cluster.experiments == {}
            chaos.limit("web", cpu="150m")

        def test_after_all_that(fake_cluster):
            assert fake_cluster.experiments == {}
            assert all(v["cpu"] == 1000 for v in fake_cluster.limits.values())
    """, "--chaos-agent-address", "/run/agent.sock")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*assert 300 == 1*", "*ValueError: the body raised*"])
    assert [line for line in lines if line.startswith(("apply", "reset"))] == [
        "apply default/web", "reset default/web/app",
        "apply default/web", "apply default/db", "reset default/db/app", "reset default/web/app",  # newest first
        "apply default/web", "reset default/web/app",
        "apply default/web", "reset default/web/app", "apply default/web", "reset default/web/app",
    ]
    assert balanced(lines)


def test_options_are_the_defaults_of_limit(suite):
    result, lines = suite("""
        def test_defaults(chaos):
            assert chaos.defaults == {"agent_address": "unix:///run/agent.sock", "namespace": "shop"}
            exp = chaos.limit("web", cpu="200m")
            assert exp.targets[0].namespace == "shop"
            assert exp.request.duration_s == 600  # the safety duration

        def test_naming_a_cluster_drops_the_agent_default(chaos):
            exp = chaos.limit("web", cpu="200m", kubeconfig="/etc/kc", context="kind-kind", namespace="default",
                              duration="1m")
            assert exp.request.duration_s == 60
    """, "--chaos-agent-address=unix:///run/agent.sock", "--chaos-namespace=shop")
    result.assert_outcomes(passed=2)
    opens = [line for line in lines if line.startswith("open")]
    assert opens == ["open agent unix:///run/agent.sock None", "open cluster /etc/kc kind-kind"]
    result.stdout.fnmatch_lines(["kubectl-chaos: agent-address unix:///run/agent.sock, namespace shop"])


def test_ini_options_and_the_command_line_over_them(suite, pytester):
    ini = """
        [pytest]
        chaos_kubeconfig = kube/config
        chaos_context = kind-kind
    """
    tests = """
        def test_ini(chaos):
            chaos.limit("web", cpu="200m")
    """
    result, lines = suite(tests, ini=textwrap.dedent(ini))
    result.assert_outcomes(passed=1)
    assert f"open cluster {pytester.path / 'kube/config'} kind-kind" in lines
    result, lines = suite(tests, "--chaos-context=other", ini=textwrap.dedent(ini))
    result.assert_outcomes(passed=1)
    assert [line for line in lines if line.startswith("open")][-1] == f"open cluster {pytester.path / 'kube/config'} other"


def test_a_failed_revert_is_an_error_of_the_test_saying_what_is_left(suite):
    result, lines = suite("""
        left = []

        def test_agent_goes_away(chaos, fake_cluster):
            left.append(chaos.limit("web", cpu="200m"))
            fake_cluster.fail_reset = ["cannot reach the chaos-agent at unix:///run/agent.sock: failed to connect"]
            fake_cluster.status_fails = True

        def test_the_agent_is_back(fake_cluster):
            fake_cluster.status_fails = False
            assert left[0].state == "revert-failed"
            assert left[0].stop().ok and fake_cluster.experiments == {}
    """, "--chaos-agent-address", "/run/agent.sock")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_agent_goes_away*",
        "*RevertFailed: could not revert default/web/app: cannot reach the chaos-agent at unix:///run/agent.sock:"
        " failed to connect; the backend cannot tell now; presumably still changed: default/web/app: cpu 200m"
        " (original 1)*to end it now: kubectl-chaos --reset -n default web -c app --agent-address"
        " unix:///run/agent.sock*",
    ])


def test_bad_arguments_fail_the_test_with_one_line_and_change_nothing(suite):
    result, lines = suite("""
        def test_bad(chaos):
            chaos.limit("web", cpu=200)
    """, "--chaos-agent-address", "/run/agent.sock")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(['*UsageError: cpu: 200 is not a string; an int is ambiguous*'])
    assert lines == []


def test_a_taken_target_is_refused(suite):
    result, lines = suite("""
        import pytest
        from plugin.errors import BackendError

        def test_twice(chaos):
            chaos.limit("web", cpu="200m")
            with pytest.raises(BackendError, match="already has an experiment"):
                chaos.limit("web", memory="64Mi")
    """, "--chaos-agent-address", "/run/agent.sock")
    result.assert_outcomes(passed=1)
    assert balanced(lines) and sum(line.startswith("apply") for line in lines) == 1


def test_the_plugin_can_be_disabled(suite):
    result, _ = suite("""
        def test_uses_it(chaos):
            pass
    """, "-p", "no:kubectl_chaos")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'chaos' not found*"])


def test_loading_the_plugin_imports_nothing_heavy(pytester):
    pytester.makepyfile(test_x="""
        import sys

        def test_modules():
            assert not {"grpc", "kubernetes", "plugin.api", "plugin.backends"} & set(sys.modules)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    help_text = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=pytester.path, capture_output=True,
                               text=True, timeout=60).stdout
    for option in ("--chaos-agent-address=ADDRESS", "--chaos-kubeconfig=PATH", "--chaos-context=NAME",
                   "chaos_agent_address (string)"):
        assert option in help_text


def test_sigterm_during_a_test_stops_the_session_and_reverts(pytester):
    journal = pytester.path / "journal.txt"
    pytester.makeconftest(CONFTEST.format(repo=str(REPO), journal=str(journal)))
    pytester.makepyfile(test_suite="""
        import time

        def test_long(chaos):
            chaos.limit("web", cpu="200m")
            time.sleep(60)

        def test_never_runs():
            pass
    """)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--chaos-agent-address",
                             "/run/agent.sock"], cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 30
    while "apply default/web" not in (journal.read_text() if journal.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "SigtermInterrupt: SIGTERM" in out and "test_never_runs" not in out
    assert journal.read_text().splitlines()[-1] == "reset default/web/app"
