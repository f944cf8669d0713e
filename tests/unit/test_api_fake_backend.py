"""plugin.api with an in-memory backend passed to Experiment (production code has no switch for it):
argument checks (the CLI's parsers and messages, in the API's words), the block's life (apply on
enter, revert on exit, on exceptions, Ctrl-C, SIGTERM, at interpreter exit), failed and partial
applies, failed and inexact reverts, targets taken by another experiment, and signals held while
a revert is on its way. The real agent and the fake API server: tests/node/test_api.py and
tests/cluster/test_api_cluster.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from plugin import api
from plugin.api import ApplyFailed, Experiment, ExperimentEnded, RevertFailed, build_request
from plugin.backends import (
    ApplyResult,
    BackendError,
    ChaosRequest,
    Connection,
    ExperimentStatus,
    ResetResult,
    ResourceChange,
    TargetResult,
    TopRow,
)
from plugin.errors import UsageError
from plugin.request import Flags, build_invocation

Mi = 2**20
REPO = pathlib.Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
ORIGINAL = {"cpu": 1000, "memory": 512 * Mi, "bandwidth-ingress": None, "bandwidth-egress": None}


# ---------------------------------------------------------------- an in-memory cluster


@dataclasses.dataclass
class Exp:
    id: str
    originals: dict
    values: dict
    expires_at: datetime.datetime | None
    state: str = "active"


class FakeCluster:
    """Pods (namespace, name) -> labels, each with one container "app" at ``ORIGINAL``; experiments
    keyed by container. Knobs make the next calls fail or run a hook."""

    def __init__(self, journal=None):
        self.pods = {("default", "web"): {"app": "web"}, ("default", "web-1"): {"app": "many"},
                     ("default", "web-2"): {"app": "many"}, ("default", "db"): {"app": "db"},
                     ("shop", "web"): {"app": "web"}}
        self.limits = {(ns, pod, "app"): dict(ORIGINAL) for ns, pod in self.pods}
        self.experiments: dict[tuple, Exp] = {}
        self.calls: list[tuple[str, ChaosRequest | str | None]] = []
        self.opened = self.closed = 0
        self.journal = journal  # a callable(str) that sees every call (the subprocess tests print)
        self.broken: set[str] = set()  # pods whose apply fails as one target of a selector
        self.fail_apply: str | None = None
        self.apply_then_fail: str | None = None  # the change is made, the answer lost
        self.fail_reset: list[str] = []  # messages of the next failing resets
        self.reset_hook = None
        self.apply_hook = None
        self.inexact = False
        self.status_fails = False
        self.n = 0

    def open(self, conn: Connection) -> FakeBackend:
        self.opened += 1
        return FakeBackend(self, conn)

    def log(self, what: str, arg) -> None:
        self.calls.append((what, arg))
        if self.journal:
            self.journal(f"{what} {arg.target if isinstance(arg, ChaosRequest) else arg}")


class FakeBackend:
    def __init__(self, cluster: FakeCluster, conn: Connection):
        self.c = cluster
        self.conn = conn

    def default_namespace(self) -> str:
        return "default"

    def _pods(self, req: ChaosRequest) -> list[str]:
        if req.pod is not None:
            if (req.namespace, req.pod) not in self.c.pods:
                raise BackendError(f"no pod {req.namespace}/{req.pod}")
            return [req.pod]
        key, _, value = (req.selector or "").partition("=")
        pods = [p for (ns, p), labels in self.c.pods.items() if ns == req.namespace and labels.get(key) == value]
        if not pods:
            raise BackendError(f"no pod in {req.namespace} matches -l {req.selector}")
        return pods

    def apply(self, req: ChaosRequest) -> ApplyResult:
        self.c.log("dry-run" if req.dry_run else "apply", req)
        if self.c.apply_hook:
            self.c.apply_hook()
        if self.c.fail_apply:
            raise BackendError(self.c.fail_apply)
        wanted = {"cpu": req.cpu_millicpu, "memory": req.memory_bytes, "bandwidth-ingress": req.ingress_bps,
                  "bandwidth-egress": req.egress_bps}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        targets = []
        for pod in self._pods(req):
            key = (req.namespace, pod, "app")
            if pod in self.c.broken:
                targets.append(TargetResult(req.namespace, pod, "app", error="container app is not running"))
                continue
            before = dict(self.c.limits[key])
            expires = NOW + datetime.timedelta(seconds=req.duration_s) if req.duration_s else None
            if not req.dry_run:
                exp = self.c.experiments.get(key)
                if exp is None:
                    self.c.n += 1
                    exp = self.c.experiments[key] = Exp(f"exp-{self.c.n}", {}, {}, expires)
                elif expires is not None:
                    exp.expires_at = expires
                for resource, value in wanted.items():
                    exp.originals.setdefault(resource, before[resource])
                    exp.values[resource] = value
                    self.c.limits[key][resource] = value
                expires = exp.expires_at
            changes = tuple(ResourceChange(r, before[r], v, None if req.dry_run else v, "cri", expires)
                            for r, v in wanted.items())
            exp_id = None if req.dry_run else self.c.experiments[key].id
            targets.append(TargetResult(req.namespace, pod, "app", changes, node="n1", experiment_id=exp_id))
        if self.c.apply_then_fail:
            raise BackendError(self.c.apply_then_fail)
        return ApplyResult(targets=tuple(targets), dry_run=req.dry_run)

    def reset(self, req: ChaosRequest) -> ResetResult:
        self.c.log("reset", req)
        if self.c.reset_hook:
            self.c.reset_hook()
        if self.c.fail_reset:
            raise BackendError(self.c.fail_reset.pop(0))
        targets = []
        for pod in self._pods(req):
            key = (req.namespace, pod, req.container or "app")
            exp = self.c.experiments.pop(key, None)
            if exp is None:
                targets.append(TargetResult(req.namespace, pod, "app"))
                continue
            changes = []
            for resource, original in exp.originals.items():
                back = original if not self.c.inexact else 123
                changes.append(ResourceChange(resource, self.c.limits[key][resource], original, back, "cri"))
                self.c.limits[key][resource] = back
            targets.append(TargetResult(req.namespace, pod, "app", tuple(changes)))
        return ResetResult(targets=tuple(targets))

    def status(self, namespace: str | None) -> list[ExperimentStatus]:
        self.c.log("status", namespace)
        if self.c.status_fails:
            raise BackendError("status: cannot reach the chaos-agent")
        return [ExperimentStatus(ns, pod, ctr, tuple(ResourceChange(r, o, e.values[r], self.c.limits[(ns, pod, ctr)][r],
                                                                    "cri", e.expires_at)
                                                     for r, o in e.originals.items()),
                                 experiment_id=e.id, state=e.state)
                for (ns, pod, ctr), e in self.c.experiments.items() if namespace in (None, ns)]

    def top(self, namespace: str | None, interval_s: float, count: int):
        self.c.log("top", (namespace, interval_s, count))
        someone_else = ExperimentStatus("default", "db", "app", experiment_id="theirs")
        yield [TopRow(status=s, interval_s=interval_s, cpu_cores=0.2, cpu_throttled_share=0.9)
               for s in [*self.status(namespace), someone_else]]

    def close(self) -> None:
        self.c.closed += 1


class BackendWithoutTop(FakeBackend):
    top = None


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


def experiment(cluster: FakeCluster, pod: str | None = "web", **kwargs) -> Experiment:
    kwargs.setdefault("agent_address", "unix:///run/agent.sock")
    kwargs.setdefault("duration", "10m")
    if kwargs.get("selector"):
        pod = None
        kwargs.pop("agent_address")
    req, conn = build_request(pod, **kwargs)
    return Experiment(req, conn, open_backend=cluster.open)


def kinds(cluster: FakeCluster) -> list[str]:
    return [what for what, _ in cluster.calls if what != "status"]


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "flags"),
    [
        ({"cpu": "200m"}, {"set_cpu": "200m"}),
        ({"cpu": "1.5"}, {"set_cpu": "1.5"}),
        ({"memory": "256Mi"}, {"set_memory": "256Mi"}),
        ({"memory": 256 * Mi}, {"set_memory": str(256 * Mi)}),
        ({"bandwidth": "2Mbps"}, {"set_bandwidth": "2Mbps"}),
        ({"bandwidth": 2_000_000, "direction": "egress"}, {"set_bandwidth": "2000000", "direction": "egress"}),
        ({"bandwidth": "2MBps", "direction": "both"}, {"set_bandwidth": "2MBps"}),
        ({"cpu": "1", "duration": "1h30m", "method": "cgroup"}, {"set_cpu": "1", "duration": "1h30m",
                                                                  "method": "cgroup"}),
        ({"cpu": "1", "duration": datetime.timedelta(minutes=5)}, {"set_cpu": "1", "duration": "5m"}),
        ({"cpu": "1", "timeout": datetime.timedelta(seconds=90)}, {"set_cpu": "1", "timeout": "90s"}),
        ({"cpu": "1", "namespace": "shop", "container": "app", "force": True},
         {"set_cpu": "1", "namespace": "shop", "container": "app", "force": True}),
    ],
)  # fmt: skip
def test_values_are_read_as_the_cli_reads_them(kwargs, flags):
    req, conn = build_request("web", **kwargs)
    cli = build_invocation(Flags(pod="web", **flags))
    assert (req, conn) == (cli.request, cli.connection)


def test_connection_modes():
    _, conn = build_request("web", cpu="1", agent_address="/run/a.sock")
    assert conn.mode == "agent" and str(conn.agent_address) == "unix:///run/a.sock"
    _, conn = build_request("web", cpu="1", kubeconfig=pathlib.Path("~/kc"), context="kind-kind")
    assert conn.mode == "cluster" and conn.kubeconfig == os.path.expanduser("~/kc") and conn.context == "kind-kind"
    req, conn = build_request(selector="app=web", cpu="1")
    assert conn.mode == "cluster" and req.selector == "app=web" and req.pod is None


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"cpu": 200}, ['cpu: 200 is not a string', '"200m" for millicores', '"200" for cores']),
        ({"cpu": True}, ["cpu: True is not a string"]),
        ({"cpu": 0.5}, ["cpu: 0.5 is not a string"]),
        ({"cpu": "abc"}, ['cpu: "abc" is not a CPU quantity']),
        ({"cpu": "5m"}, ["cpu:", "10m"]),
        ({"memory": "lots"}, ['memory: "lots"']),
        ({"memory": 1024}, ["memory:", "4Mi"]),
        ({"bandwidth": "2mbps"}, ["bandwidth:", "ambiguous"]),
        ({"bandwidth": 0}, ["bandwidth:"]),
        ({"cpu": "1", "duration": 90}, ['duration: 90 is not a string', '"90s"']),
        ({"cpu": "1", "duration": "90"}, ["duration:", "no unit"]),
        ({"cpu": "1", "duration": datetime.timedelta(0)}, ["duration:", "not a positive duration"]),
        ({"cpu": "1", "timeout": "soon"}, ["timeout:"]),
        ({"cpu": "1", "direction": "sideways"}, ["direction applies only to bandwidth"]),
        ({"bandwidth": "1M", "direction": "sideways"}, ['direction: "sideways" is not a direction']),
        ({"cpu": "1", "method": "magic"}, ['method: "magic" is not a method']),
        ({"bandwidth": "1M", "method": "cri"}, ["method cri applies to cpu and memory"]),
        ({}, ["nothing to change: give cpu=, memory= or bandwidth="]),
        ({"cpu": "1", "namespace": "Shop"}, ['namespace: "Shop" is not a namespace name']),
        ({"cpu": "1", "container": "App"}, ['container: "App" is not a container name']),
        ({"cpu": "1", "agent_address": "agent.sock"}, ["agent_address:", "absolute path"]),
        ({"cpu": "1", "agent_address": "/a.sock", "kubeconfig": "kc"},
         ["kubeconfig selects a cluster, but agent_address talks to one node's agent"]),
        ({"cpu": "1", "force": "yes"}, ["force: 'yes' is not True or False"]),
        ({"cpu": "1", "namespace": 3}, ["namespace: 3 is not a string"]),
        ({"cpu": "1", "kubeconfig": 3}, ["kubeconfig: 3 is not a path"]),
    ],
)  # fmt: skip
def test_bad_arguments_are_usage_errors_in_the_apis_words(kwargs, words):
    with pytest.raises(UsageError) as err:
        build_request("web", **kwargs)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "--" not in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("pod", "kwargs", "words"),
    [
        (None, {"cpu": "1"}, ["name the target: pod= (a pod name) or selector="]),
        ("web", {"cpu": "1", "selector": "app=web"}, ['give a pod or selector, not both']),
        ("Web_0", {"cpu": "1"}, ['pod: "Web_0" is not a pod name']),
        ("deploy/web", {"cpu": "1"}, ["names a deploy"]),
        (None, {"cpu": "1", "selector": " "}, ["selector: empty value"]),
        (None, {"cpu": "1", "selector": "app=web", "agent_address": "/a.sock"},
         ["selector needs cluster mode; agent_address talks to one node's agent"]),
    ],
)  # fmt: skip
def test_bad_targets(pod, kwargs, words):
    with pytest.raises(UsageError) as err:
        build_request(pod, **kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "--" not in str(err.value)


def test_limit_checks_now_applies_later_and_defaults_to_ten_minutes(cluster):
    with pytest.raises(UsageError):
        api.limit("web", cpu="lots")
    exp = api.limit("web", cpu="200m", agent_address="/nowhere.sock")
    assert exp.request.duration_s == api.DEFAULT_DURATION_S == 600
    assert not exp.active and exp.state == "new" and exp.targets == ()
    assert api.limit("web", cpu="200m", duration="30s").request.duration_s == 30
    assert api.limit("pod/web", cpu="1").request.pod == "web"


# ---------------------------------------------------------------- the block


def test_block_applies_on_entry_and_reverts_on_exit(cluster):
    exp = experiment(cluster, cpu="200m", memory="256Mi")
    assert cluster.calls == []  # nothing sent before the block
    with exp as entered:
        assert entered is exp and exp.active and exp.state == "active"
        assert cluster.limits["default", "web", "app"]["cpu"] == 200
        (target,) = exp.targets
        assert (target.pod, target.container) == ("web", "app")
        assert exp.read_back("cpu") == 200 and exp.original("cpu") == 1000
        assert exp.read_back("memory") == 256 * Mi and exp.original("memory") == 512 * Mi
        assert exp.expires_at == NOW + datetime.timedelta(minutes=10)
        cluster.limits["default", "web", "app"]["cpu"] = 300  # someone changed it: status sees it
        assert exp.in_force("cpu") == 300 and exp.current[0].changes[0].read_back == 300
        (now,) = exp.status()
        assert now.experiment_id == target.experiment_id
        assert "web" in repr(exp) and "cpu=200m" in repr(exp)
        with pytest.raises(UsageError, match="bandwidth-ingress is not changed"):
            exp.read_back("bandwidth-ingress")
        with pytest.raises(UsageError, match="use one of cpu, memory"):
            exp.read_back("bandwidth")
    assert kinds(cluster) == ["apply", "reset"]
    assert cluster.limits["default", "web", "app"] == ORIGINAL and cluster.experiments == {}
    assert not exp.active and exp.state == "ended" and cluster.opened == cluster.closed == 1
    assert exp.reset_result.ok
    reset_req = cluster.calls[-1][1]
    assert (reset_req.namespace, reset_req.pod, reset_req.container, reset_req.reset) == ("default", "web", "app", True)


def test_an_exception_in_the_block_reverts_and_goes_on_unchanged(cluster):
    boom = ValueError("boom")
    with pytest.raises(ValueError) as err:
        with experiment(cluster, cpu="200m"):
            raise boom
    assert err.value is boom and err.value.__cause__ is None
    assert kinds(cluster) == ["apply", "reset"] and cluster.experiments == {}


def test_ctrl_c_in_the_block_reverts(cluster):
    with pytest.raises(KeyboardInterrupt):
        with experiment(cluster, cpu="200m"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            raise AssertionError("not interrupted")
    assert cluster.experiments == {} and cluster.limits["default", "web", "app"] == ORIGINAL


def test_start_and_stop_without_a_block(cluster):
    exp = experiment(cluster, bandwidth="2Mbps", direction="ingress").start()
    assert exp.start() is exp and kinds(cluster) == ["apply"]  # started once
    assert exp.read_back("bandwidth-ingress") == 2_000_000
    result = exp.stop()
    assert result.ok and exp.stop() is None and kinds(cluster) == ["apply", "reset"]
    exp.start()  # a stopped experiment can run again
    assert exp.active and exp.stop().ok


def test_update_changes_on_top_and_the_end_restores_the_first_originals(cluster):
    with experiment(cluster, cpu="500m") as exp:
        exp.update(cpu="200m", memory="128Mi")
        assert cluster.limits["default", "web", "app"]["cpu"] == 200
        assert exp.read_back("cpu") == 200 and exp.original("cpu") == 1000 and exp.original("memory") == 512 * Mi
        assert exp.expires_at == NOW + datetime.timedelta(minutes=10)  # kept without duration=
        with pytest.raises(UsageError, match="cpu: "):
            exp.update(cpu="x")
    assert cluster.limits["default", "web", "app"] == ORIGINAL
    with pytest.raises(UsageError, match="not active"):
        exp.update(cpu="1")


def test_effect_is_what_the_backends_top_measures_for_this_experiment(cluster):
    with experiment(cluster, cpu="200m") as exp:
        (row,) = exp.effect("3s")
        assert (row.status.pod, row.cpu_cores, row.cpu_throttled_share) == ("web", 0.2, 0.9)
        assert ("top", ("default", 3.0, 1)) in cluster.calls
        assert exp.effect(datetime.timedelta(seconds=1))[0].interval_s == 1
        with pytest.raises(UsageError, match="^interval: 3 is not a string"):
            exp.effect(3)
    with pytest.raises(UsageError, match="not active"):
        exp.effect()
    req, conn = build_request("web", cpu="200m", kubeconfig="/kc")
    with Experiment(req, conn, open_backend=lambda c: BackendWithoutTop(cluster, c)) as exp:
        with pytest.raises(BackendError, match="the cluster backend of this build measures no effect figures"):
            exp.effect()


def test_namespace_comes_from_the_backend(cluster):
    with experiment(cluster, cpu="1") as exp:
        assert exp.targets[0].namespace == "default" and cluster.calls[-1][1].namespace == "default"


# ---------------------------------------------------------------- failures


def test_a_taken_target_is_refused_before_anything_changes(cluster):
    with experiment(cluster, memory="256Mi"):
        with pytest.raises(BackendError) as err:
            with experiment(cluster, cpu="200m"):
                raise AssertionError("entered")
        message = str(err.value)
        assert "default/web/app already has an experiment (memory 256Mi (original 512Mi), active, exp-1)" in message
        assert "kubectl-chaos status -n default" in message and "Experiment.update" in message
        assert cluster.limits["default", "web", "app"]["cpu"] == 1000  # never applied
    assert kinds(cluster) == ["apply", "reset"]
    assert cluster.closed == cluster.opened == 2


def test_a_failed_apply_raises_the_backends_error(cluster):
    cluster.fail_apply = "no pod default/nope; pods in default: web"
    with pytest.raises(BackendError, match="^no pod default/nope; pods in default: web$"):
        with experiment(cluster, "web", cpu="1"):
            raise AssertionError("entered")
    assert cluster.closed == cluster.opened == 1


def test_an_apply_whose_answer_was_lost_is_reset(cluster):
    cluster.apply_then_fail = "cannot reach the chaos-agent at unix:///run/agent.sock: Socket closed"
    with pytest.raises(BackendError, match="Socket closed"):
        with experiment(cluster, cpu="200m"):
            raise AssertionError("entered")
    assert kinds(cluster) == ["apply", "reset"] and cluster.limits["default", "web", "app"] == ORIGINAL


def test_a_partial_selector_apply_reverts_the_rest(cluster):
    cluster.broken = {"web-2"}
    with pytest.raises(ApplyFailed) as err:
        with experiment(cluster, selector="app=many", cpu="200m"):
            raise AssertionError("entered")
    assert str(err.value) == "could not change default/web-2/app: container app is not running; reverted the 1 changed"
    assert [t.pod for t in err.value.result.targets] == ["web-1", "web-2"]
    assert kinds(cluster) == ["dry-run", "apply", "reset"] and cluster.experiments == {}
    assert cluster.calls[-1][1].selector == "app=many"


def test_a_partial_apply_whose_revert_fails_says_what_is_left(cluster):
    cluster.broken = {"web-2"}
    cluster.fail_reset = ["the API server answered 500"]
    with pytest.raises(RevertFailed) as err:
        experiment(cluster, selector="app=many", cpu="200m").start()
    assert isinstance(err.value.__cause__, ApplyFailed)
    assert "reverting the others failed: the API server answered 500" in str(err.value)
    assert "still changed: default/web-1/app: cpu 200m (original 1)" in str(err.value)
    assert "kubectl-chaos --reset -n default -l app=many" in str(err.value)


def test_a_failed_revert_says_what_is_still_changed_and_keeps_the_blocks_error(cluster):
    exp = experiment(cluster, cpu="200m", memory="64Mi")
    boom = ValueError("boom")
    cluster.fail_reset = ["reset failed: the runtime refused"]
    with pytest.raises(RevertFailed) as err:
        with exp:
            raise boom
    message = str(err.value)
    assert message.startswith("could not revert default/web/app: reset failed: the runtime refused; still changed: "
                              "default/web/app: cpu 200m (original 1), memory 64Mi (original 512Mi) (active)")
    assert "the agent ends it by itself at 2026-12-01T12:10:00Z" in message
    assert "to end it now: kubectl-chaos --reset -n default web -c app --agent-address unix:///run/agent.sock" in message
    assert message.endswith("; the block had raised ValueError: boom")
    assert err.value.__cause__ is boom and err.value.body_error is boom
    assert [s.pod for s in err.value.still_changed] == ["web"]
    assert exp.state == "revert-failed" and exp.active
    assert exp.stop().ok  # tried again: the backend works now
    assert exp.state == "ended" and cluster.experiments == {}


def test_a_failed_revert_without_status_says_what_was_applied(cluster):
    exp = experiment(cluster, cpu="200m").start()
    cluster.fail_reset = ["cannot reach the chaos-agent at unix:///run/agent.sock: failed to connect"]
    cluster.status_fails = True
    with pytest.raises(RevertFailed) as err:
        exp.stop()
    assert "the backend cannot tell now; presumably still changed: default/web/app: cpu 200m (original 1)" \
        in str(err.value)
    assert err.value.__cause__ is None
    cluster.status_fails = False
    exp.stop()


def test_a_revert_that_ended_after_the_backends_timeout_is_a_revert(cluster):
    exp = experiment(cluster, cpu="200m").start()

    def finishes_late():
        cluster.experiments.clear()
        cluster.limits["default", "web", "app"] = dict(ORIGINAL)
        raise BackendError("the chaos-agent did not revert within 30s")

    cluster.reset_hook = finishes_late
    assert exp.stop() is None and exp.state == "ended"


def test_an_inexact_revert_is_a_failed_revert(cluster):
    cluster.inexact = True
    with pytest.raises(RevertFailed, match="put back other values than the originals: default/web/app cpu is 123m, "
                                           "not 1"):
        with experiment(cluster, cpu="200m") as exp:
            pass
    assert exp.state == "ended" and not exp.active  # nothing a retry could change


def test_an_experiment_that_ended_before_the_block_warns(cluster):
    with pytest.warns(ExperimentEnded, match="had ended before its block did"):
        with experiment(cluster, cpu="200m"):
            cluster.experiments.clear()  # the agent reverted it at its expiry and forgot it
    assert kinds(cluster) == ["apply"]  # nothing left to reset
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with experiment(cluster, cpu="200m"):
            pass


# ---------------------------------------------------------------- signals while the backend works


def test_ctrl_c_during_the_revert_waits_for_it(cluster):
    cluster.reset_hook = lambda: os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with experiment(cluster, cpu="200m") as exp:
            pass
    assert exp.state == "ended" and cluster.experiments == {}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_the_apply_reverts_then_interrupts(cluster):
    cluster.apply_hook = lambda: os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with experiment(cluster, cpu="200m"):
            raise AssertionError("entered")
    assert kinds(cluster) == ["apply", "reset"] and cluster.experiments == {}


def test_a_second_ctrl_c_stops_waiting_and_says_what_is_left(cluster, capsys):
    def twice():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # held
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        raise AssertionError("the second Ctrl-C waited")

    exp = experiment(cluster, cpu="200m").start()
    cluster.reset_hook = twice
    with pytest.raises(KeyboardInterrupt):
        exp.stop()
    assert exp.state == "revert-failed"
    assert "the revert was interrupted; the backend cannot tell now; presumably still changed: default/web/app: " \
           "cpu 200m (original 1)" in capsys.readouterr().err
    cluster.reset_hook = None
    exp.stop()


# ---------------------------------------------------------------- as a program (SIGTERM, exit, fork)


PROGRAM = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from plugin.api import Experiment, build_request
from tests.unit.test_api_fake_backend import FakeCluster

cluster = FakeCluster(journal=lambda line: print(line, flush=True))
req, conn = build_request("web", cpu="200m", agent_address="/run/agent.sock", duration="10m")
exp = Experiment(req, conn, open_backend=cluster.open)
"""


def run_program(body: str, *, sigterm_after_in: bool = False) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(PROGRAM).format(repo=str(REPO)) + textwrap.dedent(body)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if sigterm_after_in:
        for line in proc.stdout:
            if line.strip() == "in":
                proc.send_signal(signal.SIGTERM)
                break
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_in_the_block_reverts_and_exits_143():
    res = run_program("""
        with exp:
            print("in", flush=True)
            time.sleep(30)
        print("not reached")
    """, sigterm_after_in=True)
    assert res.returncode == 143, res.stderr
    assert "reset default/web" in res.stdout and "not reached" not in res.stdout
    assert res.stderr == ""  # a clean exit: no traceback


def test_sigterm_goes_to_the_programs_own_handler_where_it_has_one():
    res = run_program("""
        def mine(signum, frame):
            raise RuntimeError("my handler")
        signal.signal(signal.SIGTERM, mine)
        try:
            with exp:
                print("in", flush=True)
                time.sleep(30)
        except RuntimeError as err:
            print("caught", err, flush=True)
        assert signal.getsignal(signal.SIGTERM) is mine
    """, sigterm_after_in=True)
    assert res.returncode == 0, res.stderr
    assert "reset default/web" in res.stdout and "caught my handler" in res.stdout


def test_sigterm_handler_is_only_there_while_an_experiment_is_active():
    res = run_program("""
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        with exp:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_an_experiment_never_stopped_is_reverted_at_exit():
    res = run_program("""
        exp.start()
        print("started", flush=True)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.index("started") < res.stdout.index("reset default/web")
    assert "kubectl-chaos: reverted default/web/app at exit (it was never stopped)" in res.stderr


def test_a_forked_child_leaving_the_block_does_not_revert_the_parents_experiment():
    res = run_program("""
        with exp:
            pid = os.fork()
            if pid == 0:
                sys.exit(0)  # leaves the block in the child
            os.waitpid(pid, 0)
            print("child gone, active:", exp.active, len(cluster.experiments), flush=True)
    """)
    assert res.returncode == 0, res.stderr
    assert "child gone, active: True 1" in res.stdout
    assert res.stdout.count("reset default/web") == 1


# ---------------------------------------------------------------- the plain functions


def test_apply_reset_status_functions(cluster):
    result = api.apply("web", cpu="200m", agent_address="/a.sock", open_backend=cluster.open)
    assert result.targets[0].changes[0].read_back == 200
    assert cluster.calls[-1][1].duration_s is None  # as the CLI: no expiry unless asked
    (item,) = api.status(agent_address="/a.sock", open_backend=cluster.open)
    assert item.pod == "web" and cluster.calls[-1] == ("status", "default")
    api.status(all_namespaces=True, agent_address="/a.sock", open_backend=cluster.open)
    assert cluster.calls[-1] == ("status", None)
    done = api.reset("web", agent_address="/a.sock", open_backend=cluster.open)
    assert done.targets[0].changes[0].read_back == 1000 and cluster.experiments == {}
    assert cluster.opened == cluster.closed == 4

    cluster.broken = {"web-2"}
    with pytest.raises(ApplyFailed) as err:
        api.apply(selector="app=many", cpu="200m", open_backend=cluster.open)
    assert [t.error is None for t in err.value.result.targets] == [True, False]
    cluster.inexact = True
    with pytest.raises(RevertFailed, match="could not revert default -l app=many: default/web-1/app cpu is 123m"):
        api.reset(selector="app=many", open_backend=cluster.open)
    with pytest.raises(UsageError, match="namespace= or all_namespaces=True"):
        api.status("shop", all_namespaces=True)
    with pytest.raises(UsageError, match="^namespace: "):
        api.status("Shop")


def test_the_api_imports_neither_grpc_nor_kubernetes():
    code = ("import sys; import plugin.api, plugin.pytest_plugin, plugin; plugin.limit; "
            "print(sorted(m for m in ('grpc', 'kubernetes') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def test_a_retried_revert_that_finds_nothing_left_does_not_warn(cluster):
    exp = experiment(cluster, cpu="200m").start()
    cluster.fail_reset = ["the chaos-agent did not revert within 30s"]
    with pytest.raises(RevertFailed):
        exp.stop()
    cluster.experiments.clear()  # the agent finished it later
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert exp.stop() is None and exp.state == "ended"


def test_a_range_with_over_is_a_stepped_profile_in_the_apis_words():
    from plugin.api import build_request

    req, _ = build_request("web", cpu="1000m..100m", over="5m", steps=4, agent_address="unix:///a.sock")
    assert req.cpu_millicpu == 1000 and [(s.offset_s, s.cpu_millicpu) for s in req.steps] == [
        (100.0, 700), (200.0, 400), (300.0, 100)]
    with pytest.raises(UsageError, match="a range needs over") as err:
        build_request("web", cpu="1000m..100m", agent_address="unix:///a.sock")
    assert "--" not in str(err.value)
    with pytest.raises(UsageError, match="steps: 'x' is not a whole number"):
        build_request("web", cpu="1000m..100m", over="5m", steps="x", agent_address="unix:///a.sock")
