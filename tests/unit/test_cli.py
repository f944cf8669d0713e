"""The command line through click's CliRunner, with an in-memory backend passed to make_cli().

Asserts exit status and the exact lines a user sees. The fake backend lives here only: the CLI
takes the backend opener as an argument, production code has no switch for it.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from click.testing import CliRunner

from plugin.backends import (
    AgentAddress,
    ApplyResult,
    Backend,
    BackendError,
    ChaosRequest,
    Connection,
    ExperimentStatus,
    ResetResult,
    ResourceChange,
    TargetResult,
    open_backend,
)
from plugin.cli import make_cli

NOW = datetime(2026, 11, 22, 20, 26, 5, tzinfo=timezone.utc)
Mi = 1024**2


class FakeBackend:
    """In memory: a pod default/web with container app at 1 CPU, 512Mi, no shaping."""

    ORIGINAL = {"cpu": 1000, "memory": 512 * Mi, "bandwidth-ingress": None, "bandwidth-egress": None}

    def __init__(self, connection: Connection, *, fail: str | None = None, namespace: str = "default"):
        self.connection = connection
        self.fail = fail
        self.namespace = namespace
        self.requests: list[ChaosRequest] = []
        self.status_scopes: list[str | None] = []
        self.closed = False

    def default_namespace(self) -> str:
        return self.namespace

    def _changes(self, req: ChaosRequest) -> tuple[ResourceChange, ...]:
        expires = NOW + timedelta(seconds=req.duration_s) if req.duration_s else None
        cpu_mem_method = "cgroup" if req.method == "cgroup" else "cri"
        wanted = [
            ("cpu", req.cpu_millicpu, cpu_mem_method),
            ("memory", req.memory_bytes, cpu_mem_method),
            ("bandwidth-ingress", req.ingress_bps, "tc"),
            ("bandwidth-egress", req.egress_bps, "tc"),
        ]
        return tuple(
            ResourceChange(
                resource=name,
                previous=self.ORIGINAL[name],
                requested=value,
                read_back=None if req.dry_run else value,
                method=method,
                expires_at=expires,
            )
            for name, value, method in wanted
            if value is not None
        )

    def apply(self, req: ChaosRequest) -> ApplyResult:
        self.requests.append(req)
        if self.fail:
            raise BackendError(self.fail)
        pods = ["web-1", "web-2"] if req.selector else [req.pod]
        targets = []
        for pod in pods:
            error = "container app is not running" if pod == "web-2" else None
            targets.append(
                TargetResult(
                    namespace=req.namespace,
                    pod=pod,
                    container=req.container or "app",
                    changes=() if error else self._changes(req),
                    node="node-1",
                    experiment_id=None if error else f"exp-{pod}",
                    error=error,
                )
            )
        return ApplyResult(targets=tuple(targets), dry_run=req.dry_run)

    def reset(self, req: ChaosRequest) -> ResetResult:
        self.requests.append(req)
        changes = (
            ResourceChange("cpu", previous=500, requested=1000, read_back=1000, method="cri"),
            ResourceChange("bandwidth-egress", previous=2_000_000, requested=None, read_back=None, method="tc"),
        )
        target = TargetResult(req.namespace, req.pod, req.container or "app", changes=changes)
        return ResetResult(targets=(target,), dry_run=req.dry_run)

    def status(self, namespace: str | None) -> list[ExperimentStatus]:
        self.status_scopes.append(namespace)
        items = [
            ExperimentStatus(
                namespace="default",
                pod="web",
                container="app",
                changes=(
                    ResourceChange("cpu", 1000, 500, 500, "cri", NOW + timedelta(minutes=5)),
                    ResourceChange("bandwidth-egress", None, 2_000_000, 2_000_000, "tc", None),
                ),
                node="node-1",
                experiment_id="exp-web",
                started_at=NOW,
            ),
            ExperimentStatus(
                namespace="shop",
                pod="cart-7",
                container="cart",
                changes=(ResourceChange("memory", 2 * 1024 * Mi, 256 * Mi, 256 * Mi, "cgroup", NOW + timedelta(days=1)),),
            ),
        ]
        return [s for s in items if namespace is None or s.namespace == namespace]

    def close(self) -> None:
        self.closed = True


class Harness:
    """Runs the CLI with FakeBackend; remembers every backend it opened."""

    def __init__(self, **backend_kwargs):
        self.opened: list[FakeBackend] = []
        self.backend_kwargs = backend_kwargs

        def opener(connection: Connection) -> Backend:
            backend = FakeBackend(connection, **self.backend_kwargs)
            self.opened.append(backend)
            return backend

        self.cli = make_cli(open_backend=opener, clock=lambda: NOW)

    def run(self, *args: str, env=None):
        return CliRunner().invoke(self.cli, list(args), prog_name="kubectl-chaos", env=env)

    @property
    def backend(self) -> FakeBackend:
        assert len(self.opened) == 1
        return self.opened[0]


@pytest.fixture
def harness() -> Harness:
    return Harness()


# --- usage errors: exit 2, one line, no backend -------------------------------------------------

USAGE_CASES = [
    (["web", "--set-cpu", "abc"], '--set-cpu: "abc" is not a CPU quantity; use millicores like 500m or cores like 0.5 or 2'),
    (["web", "--set-cpu", "-1"], '--set-cpu: "-1" is negative; use millicores like 500m or cores like 0.5 or 2'),
    (["web", "--set-cpu", "0"], '--set-cpu: "0" is zero; a CPU limit must be at least 10m'),
    (
        ["web", "--set-cpu", "1e400"],
        '--set-cpu: "1e400" is too large to be a CPU quantity; use millicores like 500m or cores like 0.5 or 2',
    ),
    (["web", "--set-memory", "2GB"], '--set-memory: "2GB" has an unknown unit "GB"; use bytes or a suffix '
     "Ki Mi Gi Ti Pi Ei (powers of 1024) or k M G T P E (powers of 1000), like 512Mi or 2Gi"),
    (["web", "--set-bandwidth", "2mbps"], '--set-bandwidth: "2mbps" is ambiguous (tc reads mbps as megabytes/s); '
     "write 2Mbit for megabits/s or 2MBps for megabytes/s"),
    (["web", "--set-cpu", "1", "--duration", "90"], '--duration: "90" has no unit; write 90s, 90m or 90h'),
    (["web", "--set-cpu", "1", "--timeout", "0s"],
     '--timeout: "0s" is zero; use a number with h, m or s, like 30s, 5m, 1h30m or 1.5h'),
    (["web"], "nothing to change: give --set-cpu, --set-memory or --set-bandwidth, or --reset"),
    (["web", "--dry-run"], "nothing to change: give --set-cpu, --set-memory or --set-bandwidth, or --reset"),
    (["-n", "shop", "status"], 'nothing to change for a pod named "status"; to run the status command put it '
     "first: kubectl-chaos status ..."),
    (["pod/status"], "nothing to change: give --set-cpu, --set-memory or --set-bandwidth, or --reset"),
    (["web", "--reset", "--set-cpu", "1"], "--reset restores the originals; it cannot be combined with --set-cpu"),
    (["web", "--reset", "--duration", "5m"], "--duration applies to a change; --reset ends the experiment now"),
    (["web", "--set-cpu", "1", "--direction", "egress"], "--direction applies only to --set-bandwidth"),
    (["--set-cpu", "1"], 'missing POD: name the pod to change (or --selector for many); to list experiments '
     'run "kubectl-chaos status"'),
    (["web", "-l", "app=web", "--set-cpu", "1"], 'give a POD or --selector, not both (POD "web", --selector "app=web")'),
    (["web", "--method", "cgroup", "--set-bandwidth", "2M"],
     "--method cgroup applies to --set-cpu and --set-memory; bandwidth is always shaped with qdiscs"),
    (["web", "--method", "cri", "--set-bandwidth", "2M"],
     "--method cri applies to --set-cpu and --set-memory; bandwidth is always shaped with qdiscs"),
    (["web", "--set-cpu", "1", "--agent-address", "localhost"],
     '--agent-address: "localhost" has no port; use unix:///path/to/agent.sock or host:port'),
    (["web", "--set-cpu", "1", "--agent-address", "unix:agent.sock"],
     '--agent-address: "unix:agent.sock" is not a unix socket address; use an absolute path like '
     "unix:///run/chaos-agent/agent.sock"),
    (["web", "--set-cpu", "1", "--agent-address", "unix://relative/x.sock"],
     '--agent-address: "unix://relative/x.sock" is not a unix socket address; use an absolute path like '
     "unix:///run/chaos-agent/agent.sock"),
    (["web", "--set-cpu", "1", "--agent-address", "http://node:9443"],
     '--agent-address: "http://node:9443" has an unsupported scheme; use unix:///path/to/agent.sock or host:port'),
    (["web", "--set-cpu", "1", "--agent-address", "node:0"],
     '--agent-address: "node:0" has an invalid port; a port is 1 to 65535'),
    (["web", "--set-cpu", "1", "--agent-address", "node:65536"],
     '--agent-address: "node:65536" has an invalid port; a port is 1 to 65535'),
    (["web", "--set-cpu", "1", "--agent-address", "::1:9443"],
     '--agent-address: "::1:9443": write an IPv6 address in brackets, like [::1]:9443'),
    (["web", "--set-cpu", "1", "--agent-address", "[::g]:9443"],
     '--agent-address: "[::g]:9443" has an invalid IPv6 address; use unix:///path/to/agent.sock or host:port'),
    (["web", "--set-cpu", "1", "--agent-address", "bad_host:9443"],
     "--agent-address: \"bad_host:9443\" has an invalid host 'bad_host'; use unix:///path/to/agent.sock or host:port"),
    (["web", "--set-cpu", "1", "--agent-address", "127.0.0.1:9443", "--context", "prod"],
     "--context selects a cluster, but --agent-address talks to one node's agent directly; give one of them"),
    (["-l", "app=web", "--set-cpu", "1", "--agent-address", "127.0.0.1:9443"],
     "--selector needs cluster mode; --agent-address talks to one node's agent, so give a POD"),
    (["Web", "--set-cpu", "1"], 'POD: "Web" is not a pod name; pod names are lower-case letters, digits, "-" and "."'),
    (["deploy/web", "--set-cpu", "1"],
     'POD: "deploy/web" names a deploy; kubectl-chaos changes pods (write pod/NAME or NAME)'),
    (["web", "-n", "Prod", "--set-cpu", "1"],
     '--namespace: "Prod" is not a namespace name; names are up to 63 lower-case letters, digits and "-"'),
    (["web", "-c", "my_app", "--set-cpu", "1"],
     '--container: "my_app" is not a container name; names are up to 63 lower-case letters, digits and "-"'),
    (["-l", " ", "--set-cpu", "1"], '--selector: empty value; use a label selector like "app=web"'),
    # click's own parsing errors come out as one line too
    (["web", "--set-cpu"], "Option '--set-cpu' requires an argument."),
    (["web", "--xyzzy"], "No such option '--xyzzy'."),
    (["web", "--forc"], "No such option '--forc'. (Did you mean one of: '--force', '--over'?)"),
    (["web", "--set-cpu", "1", "--direction", "up"],
     "Invalid value for '--direction': 'up' is not one of 'egress', 'ingress', 'both'."),
    (["web", "--set-cpu", "1", "-o", "xml"],
     "Invalid value for '-o' / '--output': 'xml' is not one of 'text', 'json', 'yaml'."),
    (["web", "other", "--set-cpu", "1"], "Got unexpected extra argument (other)"),
    (["status", "-n", "a", "-A"], "give -n/--namespace or -A/--all-namespaces, not both"),
    (["status", "--agent-address", "nowhere"],
     '--agent-address: "nowhere" has no port; use unix:///path/to/agent.sock or host:port'),
    (["status", "-n", "UPPER"],
     '--namespace: "UPPER" is not a namespace name; names are up to 63 lower-case letters, digits and "-"'),
    (["completion", "powershell"],
     "Invalid value for 'SHELL': 'powershell' is not one of 'bash', 'zsh', 'fish'."),
]


@pytest.mark.parametrize(("args", "line"), USAGE_CASES, ids=[" ".join(a) for a, _ in USAGE_CASES])
def test_usage_error_is_one_line_exit_2_and_opens_no_backend(harness, args, line):
    result = harness.run(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {line}\n"
    assert result.stdout == ""
    assert harness.opened == []


def test_no_arguments_prints_help_and_exits_2(harness):
    result = harness.run()
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: kubectl-chaos [OPTIONS] POD\n")
    assert harness.opened == []


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_usage_units_and_exit_codes(harness, flag):
    result = harness.run(flag)
    assert result.exit_code == 0
    out = result.stdout
    assert out.startswith("Usage: kubectl-chaos [OPTIONS] POD\n")
    for text in (
        "--set-cpu",
        "--set-memory",
        "--set-bandwidth",
        "--direction",
        "--duration",
        "--namespace",
        "--container",
        "--reset",
        "--dry-run",
        "--method",
        "--force",
        "--output",
        "--agent-address",
        "--kubeconfig",
        "--context",
        "--selector",
        "--timeout",
        "kubectl-chaos status [-n NAMESPACE | -A]",
        "kubectl-chaos completion bash|zsh|fish",
        "2MBps = 2MB/s = 16,000,000 bit/s",
        '"2mbps" is refused as ambiguous',
        "a unit is required",
        "0  done",
        "1  the request failed",
        "2  usage error",
        "pod/status",
    ):
        assert text in out, text
    assert "_apply" not in out


def test_status_help(harness):
    result = harness.run("status", "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: kubectl-chaos status [OPTIONS]\n")
    assert "--all-namespaces" in result.stdout


# --- apply and its output ----------------------------------------------------------------------


def test_apply_text_shows_readings_then_each_change(harness):
    result = harness.run("web", "--set-cpu", "500m", "--set-memory", "256Mi", "--set-bandwidth", "2Mbps",
                         "--direction", "egress", "--duration", "5m")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "cpu 500m = 0.5 CPU (500 millicpu)\n"
        "memory 256Mi = 268,435,456 bytes\n"
        "bandwidth 2Mbps = 2,000,000 bit/s (egress: out of the pod)\n"
        "duration 5m = 300 s\n"
        "default/web (container app):\n"
        "  cpu: 1 -> 500m (read back 500m) via cri, expires 20:31:05Z\n"
        "  memory: 512Mi -> 256Mi (read back 256Mi) via cri, expires 20:31:05Z\n"
        "  bandwidth-egress: unlimited -> 2Mbit/s (read back 2Mbit/s) via tc, expires 20:31:05Z\n"
    )
    assert result.stderr == ""
    request = harness.backend.requests[0]
    assert request == ChaosRequest(
        namespace="default",
        pod="web",
        cpu_millicpu=500,
        memory_bytes=256 * Mi,
        bandwidth_bps=2_000_000,
        direction="egress",
        duration_s=300.0,
    )
    assert (request.ingress_bps, request.egress_bps) == (None, 2_000_000)
    assert harness.backend.closed


def test_apply_defaults_and_flags_reach_the_request(harness):
    result = harness.run("pod/web", "-n", "shop", "-c", "cart", "--set-bandwidth", "2MB/s", "--method", "auto",
                         "--force", "--dry-run", "--agent-address", "unix:///run/chaos/agent.sock", "--timeout", "5s")
    assert result.exit_code == 0, result.output
    backend = harness.backend
    assert backend.requests == [
        ChaosRequest(namespace="shop", pod="web", container="cart", bandwidth_bps=16_000_000, direction="both",
                     force=True, dry_run=True)
    ]
    assert backend.connection == Connection(
        agent_address=AgentAddress(scheme="unix", path="/run/chaos/agent.sock"), timeout_s=5.0
    )
    assert backend.connection.agent_address.grpc_target == "unix:///run/chaos/agent.sock"
    assert result.stdout.splitlines()[1:] == [
        "shop/web (container cart):",
        "  bandwidth-ingress: unlimited -> 16Mbit/s via tc (dry run: nothing changed)",
        "  bandwidth-egress: unlimited -> 16Mbit/s via tc (dry run: nothing changed)",
    ]


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("10.0.0.7:9443", "10.0.0.7:9443"),
        ("node-1.example:9443", "node-1.example:9443"),
        ("[fd00::7]:9443", "[fd00::7]:9443"),
        ("unix:///var/run/chaos-agent.sock", "unix:///var/run/chaos-agent.sock"),
        ("/var/run/chaos-agent.sock", "unix:///var/run/chaos-agent.sock"),
    ],
)
def test_agent_address_forms(harness, address, target):
    result = harness.run("web", "--set-cpu", "1", "--agent-address", address)
    assert result.exit_code == 0, result.output
    assert harness.backend.connection.agent_address.grpc_target == target
    assert harness.backend.connection.mode == "agent"


def test_cluster_mode_gets_kubeconfig_and_context(harness):
    result = harness.run("web", "--set-cpu", "1", "--kubeconfig", "/tmp/kc", "--context", "prod")
    assert result.exit_code == 0, result.output
    assert harness.backend.connection == Connection(kubeconfig="/tmp/kc", context="prod", timeout_s=30.0)
    assert harness.backend.connection.mode == "cluster"


def test_namespace_defaults_to_the_backends():
    harness = Harness(namespace="team-a")
    result = harness.run("web", "--set-cpu", "1")
    assert result.exit_code == 0
    assert harness.backend.requests[0].namespace == "team-a"
    assert "team-a/web (container app):" in result.stdout


def test_a_pod_named_status_is_reachable(harness):
    for args in (["pod/status", "--set-cpu", "1"], ["--set-cpu", "1", "--", "status"]):
        harness.opened.clear()
        result = harness.run(*args)
        assert result.exit_code == 0, result.output
        assert harness.backend.requests[0].pod == "status"


def test_apply_json_keeps_stdout_machine_readable(harness):
    result = harness.run("web", "--set-cpu", "2", "--duration", "1h30m", "-o", "json")
    assert result.exit_code == 0, result.output
    assert result.stderr == "cpu 2 = 2 CPU (2,000 millicpu)\nduration 1h30m = 5,400 s\n"
    data = json.loads(result.stdout)
    assert data == {
        "kind": "ApplyResult",
        "dryRun": False,
        "ok": True,
        "targets": [
            {
                "namespace": "default",
                "pod": "web",
                "container": "app",
                "node": "node-1",
                "experimentId": "exp-web",
                "created": None,
                "error": None,
                "changes": [
                    {
                        "resource": "cpu",
                        "unit": "millicpu",
                        "previous": 1000,
                        "requested": 2000,
                        "readBack": 2000,
                        "method": "cri",
                        "expiresAt": "2026-11-22T21:56:05Z",
                        "message": "",
                        "readBackUnknown": None,
                    }
                ],
            }
        ],
    }


def test_apply_yaml(harness):
    result = harness.run("web", "--set-memory", "1Gi", "--method", "cgroup", "-o", "yaml")
    assert result.exit_code == 0, result.output
    assert result.stderr == "memory 1Gi = 1,073,741,824 bytes\n"
    data = yaml.safe_load(result.stdout)
    change = data["targets"][0]["changes"][0]
    assert change == {
        "resource": "memory",
        "unit": "bytes",
        "previous": 512 * Mi,
        "requested": 1024 * Mi,
        "readBack": 1024 * Mi,
        "method": "cgroup",
        "expiresAt": None,
        "message": "",
        "readBackUnknown": None,
    }
    assert harness.backend.requests[0].method == "cgroup"


def test_selector_partial_failure_prints_all_and_exits_1(harness):
    result = harness.run("-l", "app=web", "--set-cpu", "250m")
    assert result.exit_code == 1
    assert result.stdout == (
        "cpu 250m = 0.25 CPU (250 millicpu)\n"
        "default/web-1 (container app):\n"
        "  cpu: 1 -> 250m (read back 250m) via cri, no expiry\n"
        "default/web-2 (container app):\n"
        "  failed: container app is not running\n"
    )
    assert result.stderr == "error: default/web-2: container app is not running\n"
    assert harness.backend.requests[0].selector == "app=web"
    assert harness.backend.requests[0].pod is None


def test_backend_error_is_one_line_exit_1_and_backend_closed():
    harness = Harness(fail="chaos-agent at unix:///run/x.sock refused: container app is not running")
    result = harness.run("web", "--set-cpu", "1", "--agent-address", "unix:///run/x.sock")
    assert result.exit_code == 1
    assert result.stderr == "error: chaos-agent at unix:///run/x.sock refused: container app is not running\n"
    assert result.stdout == "cpu 1 = 1 CPU (1,000 millicpu)\n"
    assert harness.backend.closed


def test_backend_error_message_with_newlines_still_prints_one_line():
    harness = Harness(fail="first\n  second\n")
    result = harness.run("web", "--set-cpu", "1", "-o", "json")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: first second"
    assert result.stdout == ""


def test_reset_text(harness):
    result = harness.run("web", "--reset")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "default/web (container app):\n"
        "  cpu: 500m -> 1 (read back 1) via cri, restored\n"
        "  bandwidth-egress: 2Mbit/s -> unlimited (read back unlimited) via tc, restored\n"
    )
    assert harness.backend.requests == [ChaosRequest(namespace="default", pod="web", reset=True)]


def test_reset_json(harness):
    result = harness.run("web", "--reset", "-o", "json", "--method", "cri")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "ResetResult"
    assert [c["resource"] for c in data["targets"][0]["changes"]] == ["cpu", "bandwidth-egress"]
    assert harness.backend.requests[0].method == "cri"


# --- the real backend opener -------------------------------------------------------------------


def test_missing_backend_module_is_a_clean_backend_error():
    # Point the opener at a package without backends: the same path a build without them takes.
    with pytest.raises(BackendError) as info:
        open_backend(Connection(agent_address=AgentAddress("unix", path="/x.sock")), package="tests.support")
    assert str(info.value).startswith("node-local mode needs a running chaos-agent")
    assert info.value.exit_code == 1
    with pytest.raises(BackendError) as info:
        open_backend(Connection(), package="tests.support")
    assert str(info.value).startswith("cluster mode needs the Kubernetes backend")


# --- status ------------------------------------------------------------------------------------


def test_status_text_table(harness):
    result = harness.run("status", "-A")
    assert result.exit_code == 0, result.output
    assert harness.backend.status_scopes == [None]
    assert result.stdout == (
        "NAMESPACE   POD      CONTAINER   RESOURCE           ORIGINAL    CHAOS     NOW       METHOD   EXPIRES                STATE\n"
        "default     web      app         cpu                1           500m      500m      cri      20:31:05Z              active\n"
        "default     web      app         bandwidth-egress   unlimited   2Mbit/s   2Mbit/s   tc       never                  active\n"
        "shop        cart-7   cart        memory             2Gi         256Mi     256Mi     cgroup   2026-11-23T20:26:05Z   active\n"
    )


def test_status_defaults_to_the_backends_namespace(harness):
    result = harness.run("status")
    assert result.exit_code == 0
    assert harness.backend.status_scopes == ["default"]
    assert len(result.stdout.splitlines()) == 3


def test_status_empty_says_so_on_stderr(harness):
    result = harness.run("status", "-n", "nothing-here")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == "No chaos experiments in namespace nothing-here.\n"
    assert harness.backend.status_scopes == ["nothing-here"]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_status_structured(harness, fmt):
    result = harness.run("status", "-n", "shop", "-o", fmt)
    assert result.exit_code == 0
    data = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert data == {
        "kind": "ExperimentStatusList",
        "items": [
            {
                "namespace": "shop",
                "pod": "cart-7",
                "container": "cart",
                "node": None,
                "experimentId": None,
                "startedAt": None,
                "state": "active",
                "message": "",
                "changes": [
                    {
                        "resource": "memory",
                        "unit": "bytes",
                        "previous": 2 * 1024 * Mi,
                        "requested": 256 * Mi,
                        "readBack": 256 * Mi,
                        "method": "cgroup",
                        "expiresAt": "2026-11-23T20:26:05Z",
                        "message": "",
                        "readBackUnknown": None,
                    }
                ],
            }
        ],
    }


def test_status_empty_json_is_an_empty_list(harness):
    result = harness.run("status", "-n", "nothing-here", "-o", "json")
    assert json.loads(result.stdout) == {"kind": "ExperimentStatusList", "items": []}


# --- completion --------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_command_prints_the_script(harness, shell):
    result = harness.run("completion", shell)
    assert result.exit_code == 0
    assert "_KUBECTL_CHAOS_COMPLETE" in result.stdout
    assert f"{shell}_complete" in result.stdout


def test_completion_env_var_prints_the_same_script(harness):
    via_env = harness.run(env={"_KUBECTL_CHAOS_COMPLETE": "bash_source"})
    via_command = harness.run("completion", "bash")
    assert via_env.exit_code == 0
    assert via_env.stdout == via_command.stdout


def complete(harness: Harness, words: str) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    result = harness.run(
        env={"_KUBECTL_CHAOS_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    )
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.stdout.splitlines()]


def test_completion_of_words(harness):
    assert complete(harness, "kubectl-chaos st") == ["status"]
    assert complete(harness, "kubectl-chaos ") == ["status", "top", "completion"]
    assert set(complete(harness, "kubectl-chaos web --set-")) == {"--set-cpu", "--set-memory", "--set-bandwidth"}
    assert complete(harness, "kubectl-chaos web --direction ") == ["egress", "ingress", "both"]
    assert complete(harness, "kubectl-chaos status --all") == ["--all-namespaces"]
    assert complete(harness, "kubectl-chaos completion ") == ["bash", "zsh", "fish"]
    assert harness.opened == []


def kubectl_answer(words: list[str], command=None) -> list[str]:
    import io

    from plugin.cli import cli, kubectl_complete

    out = io.StringIO()
    assert kubectl_complete(command or cli, words, out) == 0
    return out.getvalue().splitlines()


def test_kubectl_protocol_answers_candidates_then_a_directive():
    assert kubectl_answer([]) == ["status\tlist active experiments", "top\twatch what the experiments do", "completion\tprint a completion script", ":4"]
    assert kubectl_answer(["web", "--direction", "e"]) == ["egress", ":4"]
    assert kubectl_answer(["status", "--all"]) == [
        "--all-namespaces\tExperiments in every namespace.", ":4"
    ]
    assert kubectl_answer(["web", "--kubeconfig", "/et"]) == [":0"]
    # A half-typed, even invalid, command line still completes.
    assert kubectl_answer(["web", "--set-cpu", "abc", "--method", "bogus", "--out"])[0].startswith("--output\t")


KUBECONFIG_TEXT = """apiVersion: v1
kind: Config
contexts:
- {name: prod-eu, context: {cluster: eu, user: admin}}
- {name: prod-us, context: {cluster: us, user: admin}}
- {name: staging, context: {cluster: st, user: admin}}
"""


def test_context_completes_from_the_kubeconfig(tmp_path, monkeypatch):
    given = tmp_path / "given.yaml"
    given.write_text(KUBECONFIG_TEXT)
    other = tmp_path / "other.yaml"
    other.write_text("contexts:\n- {name: dev}\n- {name: prod-eu}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("contexts: [\n")
    assert kubectl_answer(["web", "--kubeconfig", str(given), "--context", "prod"]) == ["prod-eu", "prod-us", ":4"]
    # $KUBECONFIG is a path list, merged in order; missing and broken files offer nothing.
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing.yaml'}:{broken}:{other}:{given}")
    assert kubectl_answer(["status", "--context", ""]) == ["dev", "prod-eu", "prod-us", "staging", ":4"]
    monkeypatch.setenv("KUBECONFIG", str(broken))
    assert kubectl_answer(["status", "--context", ""]) == [":4"]


def test_subcommands_are_offered_only_as_the_first_word():
    # After an option the word is a pod: "kubectl-chaos -n shop status" would name a pod "status".
    assert kubectl_answer(["st"]) == ["status\tlist active experiments", ":4"]
    assert kubectl_answer(["-n", "shop", "st"]) == [":4"]
    assert kubectl_answer(["--dry-run", ""]) == [":4"]


def test_kubectl_protocol_reports_a_failing_completer_as_an_error_directive():
    import click

    def broken(ctx, param, incomplete):
        raise RuntimeError("boom")

    command = click.Command("x", params=[click.Argument(["thing"], shell_complete=broken)])
    assert kubectl_answer([""], command) == [":1"]


def test_request_is_frozen():
    request = ChaosRequest(namespace="default", pod="web", cpu_millicpu=500)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.cpu_millicpu = 1  # type: ignore[misc]
    assert request.target == "default/web"
    assert ChaosRequest(namespace="a", selector="app=x").target == "a -l app=x"


def test_top_closes_its_refreshes_when_interrupted_while_printing():
    """Ctrl-C (or SIGTERM, which top turns into one) while a refresh is printed: the backend's
    refreshes are closed, so their cleanup runs (in cluster mode: the watch-until marks come off),
    before the command returns; the installed command exits without the interpreter's teardown
    (console_main), so nothing may be left to the garbage collector."""
    import gc

    cleaned: list[str] = []

    class TopBackend(FakeBackend):
        def top(self, namespace, interval_s, count):
            try:
                while True:
                    yield []
            finally:
                cleaned.append("closed")

    def clock():  # called as the first refresh is rendered
        raise KeyboardInterrupt

    cli = make_cli(open_backend=TopBackend, clock=clock)
    gc.disable()
    try:
        result = CliRunner().invoke(cli, ["top", "-w", "-o", "json"], prog_name="kubectl-chaos")
        assert cleaned == ["closed"], result.output
    finally:
        gc.enable()
    assert result.exit_code == 0, result.output
