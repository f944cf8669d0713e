"""Flags (as typed) -> a validated :class:`ChaosRequest` and :class:`Connection`. Pure.

Everything that can be decided without a backend is decided here, so a bad command line exits 2
with one line before any backend is imported or contacted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

from plugin.backends import DIRECTIONS, METHODS, AgentAddress, ChaosRequest, Connection, ProfileStep
from plugin.errors import UsageError
from plugin.units import (
    describe_bandwidth,
    describe_cpu,
    describe_duration,
    describe_latency,
    describe_memory,
    parse_bandwidth,
    parse_cpu,
    parse_duration,
    parse_latency,
    parse_memory,
)

__all__ = ["Flags", "Invocation", "build_invocation", "build_connection", "parse_agent_address", "plan_profile"]

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_STEPS = 10
MAX_STEPS = 1000

# Kubernetes object names: pods are DNS-1123 subdomains, namespaces and containers DNS-1123 labels.
# Patterns as text, compiled by re's own cache on first use: a run uses a few of them, and compiling
# every pattern of the plugin at import took ~1 ms of each start.
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_POD_NAME = rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*"
_LABEL_NAME = _DNS_LABEL
_HOSTNAME = r"[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?)*\.?"
_POD_KINDS = ("pod", "pods", "po")
_SUBCOMMANDS = ("status", "top", "completion")
_ADDRESS_ACCEPTS = "use unix:///path/to/agent.sock or host:port"


class Flags(NamedTuple):
    """The command line as typed. ``None`` = the flag was not given.

    A NamedTuple, not a frozen dataclass like the other records: it is this module's own input,
    made once per run, and the dataclass machinery took 1.2 ms of every start (bench_cluster.py)
    to generate the methods of its twenty fields."""

    pod: str | None = None
    namespace: str | None = None
    container: str | None = None
    selector: str | None = None
    set_cpu: str | None = None
    set_memory: str | None = None
    set_bandwidth: str | None = None
    direction: str | None = None
    duration: str | None = None
    method: str | None = None
    reset: bool = False
    dry_run: bool = False
    force: bool = False
    agent_address: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    timeout: str | None = None
    over: str | None = None
    steps: str | None = None
    latency: str | None = None


@dataclasses.dataclass(frozen=True)
class Invocation:
    """A request ready to send, where to send it, and how each value was read (one line each)."""

    request: ChaosRequest
    connection: Connection
    readings: tuple[str, ...]


def parse_agent_address(text: str, flag: str = "--agent-address") -> AgentAddress:
    """``unix:///abs/path`` (also ``/abs/path`` or ``unix:/abs/path``) or ``host:port`` (IPv6 as ``[::1]:port``)."""
    stripped = text.strip()
    shown = '"' + stripped + '"'
    if not stripped:
        raise UsageError(f"{flag}: empty value; {_ADDRESS_ACCEPTS}")
    if stripped.startswith("/"):
        stripped = "unix://" + stripped  # a bare absolute path is a socket, as crictl and gRPC take it
    elif stripped.startswith("unix:/") and not stripped.startswith("unix://"):
        stripped = "unix://" + stripped[len("unix:"):]
    if stripped.startswith("unix:"):
        path = stripped[len("unix://"):] if stripped.startswith("unix://") else ""
        if not path.startswith("/") or path == "/" or "\0" in path:
            raise UsageError(
                f"{flag}: {shown} is not a unix socket address; use an absolute path like "
                "unix:///run/chaos-agent/agent.sock"
            )
        return AgentAddress(scheme="unix", path=path)
    if "://" in stripped:
        raise UsageError(f"{flag}: {shown} has an unsupported scheme; {_ADDRESS_ACCEPTS}")
    if ":" not in stripped and ("/" in stripped or stripped.endswith(".sock")):
        raise UsageError(
            f"{flag}: {shown} is a relative path; a unix socket needs an absolute path like "
            "unix:///run/chaos-agent/agent.sock"
        )
    if stripped.startswith("["):
        host, sep, port_text = stripped[1:].partition("]:")
        if not sep:
            raise UsageError(f"{flag}: {shown} is not an address; {_ADDRESS_ACCEPTS}")
        try:
            import ipaddress  # only here: ~1 ms to import

            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{flag}: {shown} has an invalid IPv6 address; {_ADDRESS_ACCEPTS}") from None
    else:
        host, sep, port_text = stripped.rpartition(":")
        if not sep or not host:
            raise UsageError(f"{flag}: {shown} has no port; {_ADDRESS_ACCEPTS}")
        if ":" in host:
            raise UsageError(f"{flag}: {shown}: write an IPv6 address in brackets, like [::1]:9443")
        if not re.fullmatch(_HOSTNAME, host, re.ASCII) or len(host) > 253:
            raise UsageError(f"{flag}: {shown} has an invalid host {host!r}; {_ADDRESS_ACCEPTS}")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{flag}: {shown} has an invalid port; a port is 1 to 65535")
    return AgentAddress(scheme="tcp", host=host, port=int(port_text))


def build_connection(
    agent_address: str | None,
    kubeconfig: str | None,
    context: str | None,
    timeout: str | None,
) -> Connection:
    """Where to send requests: the node's agent (``--agent-address``) or the cluster."""
    address = parse_agent_address(agent_address) if agent_address is not None else None
    if address is not None:
        for flag, value in (("--kubeconfig", kubeconfig), ("--context", context)):
            if value is not None:
                raise UsageError(
                    f"{flag} selects a cluster, but --agent-address talks to one node's agent directly; "
                    "give one of them"
                )
    timeout_s = parse_duration(timeout, "--timeout") if timeout is not None else DEFAULT_TIMEOUT_S
    return Connection(agent_address=address, kubeconfig=kubeconfig, context=context, timeout_s=timeout_s)


def check_namespace(namespace: str | None) -> str | None:
    if namespace is not None and (len(namespace) > 63 or not re.fullmatch(_LABEL_NAME, namespace, re.ASCII)):
        raise UsageError(
            f'--namespace: "{namespace}" is not a namespace name; names are up to 63 lower-case '
            'letters, digits and "-"'
        )
    return namespace


def build_invocation(flags: Flags) -> Invocation:
    """Validate ``flags`` and turn them into an :class:`Invocation`; raises :class:`UsageError`."""
    setters = [
        name
        for name, value in (
            ("--set-cpu", flags.set_cpu),
            ("--set-memory", flags.set_memory),
            ("--set-bandwidth", flags.set_bandwidth),
        )
        if value is not None
    ]
    # Which pods. kubectl's TYPE/NAME form is accepted, so pod/status names a pod called "status".
    typed_pod = flags.pod
    if flags.pod is not None:
        kind, slash, name = flags.pod.partition("/")
        if slash and kind in _POD_KINDS:
            flags = flags._replace(pod=name)
        elif slash:
            raise UsageError(f'POD: "{flags.pod}" names a {kind}; kubectl-chaos changes pods (write pod/NAME or NAME)')
    if flags.selector is not None and flags.pod is not None:
        raise UsageError(f'give a POD or --selector, not both (POD "{flags.pod}", --selector "{flags.selector}")')
    if flags.selector is None and flags.pod is None:
        raise UsageError(
            "missing POD: name the pod to change (or --selector for many); to list experiments "
            'run "kubectl-chaos status"'
        )
    if flags.pod is not None and (len(flags.pod) > 253 or not re.fullmatch(_POD_NAME, flags.pod, re.ASCII)):
        raise UsageError(
            f'POD: "{flags.pod}" is not a pod name; pod names are lower-case letters, digits, "-" and "."'
        )
    if flags.selector is not None and not flags.selector.strip():
        raise UsageError('--selector: empty value; use a label selector like "app=web"')
    check_namespace(flags.namespace)
    if flags.container is not None and (len(flags.container) > 63 or not re.fullmatch(_LABEL_NAME, flags.container, re.ASCII)):
        raise UsageError(
            f'--container: "{flags.container}" is not a container name; names are up to 63 lower-case '
            'letters, digits and "-"'
        )
    # What to change.
    if flags.reset and setters:
        raise UsageError(f"--reset restores the originals; it cannot be combined with {setters[0]}")
    if not flags.reset and not setters:
        if flags.pod in _SUBCOMMANDS and flags.pod == typed_pod:
            # "kubectl-chaos -n shop status": a subcommand is only recognised as the first word.
            raise UsageError(
                f'nothing to change for a pod named "{flags.pod}"; to run the {flags.pod} command put it '
                f"first: kubectl-chaos {flags.pod} ..."
            )
        raise UsageError("nothing to change: give --set-cpu, --set-memory or --set-bandwidth, or --reset")
    if flags.reset and flags.duration is not None:
        raise UsageError("--duration applies to a change; --reset ends the experiment now")
    if flags.direction is not None and flags.set_bandwidth is None:
        raise UsageError("--direction applies only to --set-bandwidth")
    if flags.latency is not None and flags.set_bandwidth is None:
        raise UsageError(f'--latency "{flags.latency}" bounds the queue of a shaped direction; give it with'
                         " --set-bandwidth")
    if flags.direction is not None and flags.direction not in DIRECTIONS:
        raise UsageError(f'--direction: "{flags.direction}" is not a direction; use egress, ingress or both')
    if flags.method is not None and flags.method not in METHODS:
        raise UsageError(f'--method: "{flags.method}" is not a method; use auto, cri or cgroup')
    if (
        flags.method not in (None, "auto")
        and not flags.reset
        and flags.set_cpu is None
        and flags.set_memory is None
    ):
        raise UsageError(
            f"--method {flags.method} applies to --set-cpu and --set-memory; bandwidth is always shaped "
            "with qdiscs"
        )
    if flags.selector is not None and flags.agent_address is not None:
        raise UsageError(
            "--selector needs cluster mode; --agent-address talks to one node's agent, so give a POD"
        )

    connection = build_connection(flags.agent_address, flags.kubeconfig, flags.context, flags.timeout)

    readings: list[str] = []
    cpu_millicpu = memory_bytes = bandwidth_bps = None
    duration_s = None
    direction = flags.direction or "both"
    ranges, flags = _split_ranges(flags)
    if (flags.over is not None or flags.steps is not None) and not ranges:
        raise UsageError("--over and --steps go with a range: --set-cpu 1000m..100m --over 5m --steps 10")
    if flags.set_cpu is not None:
        cpu_millicpu = parse_cpu(flags.set_cpu)
        readings.append(describe_cpu(flags.set_cpu, cpu_millicpu))
    if flags.set_memory is not None:
        memory_bytes = parse_memory(flags.set_memory)
        readings.append(describe_memory(flags.set_memory, memory_bytes))
    if flags.set_bandwidth is not None:
        bandwidth_bps = parse_bandwidth(flags.set_bandwidth)
        readings.append(describe_bandwidth(flags.set_bandwidth, bandwidth_bps, direction))
    latency_s = None
    if flags.latency is not None:
        latency_s = parse_latency(flags.latency)
        readings.append(describe_latency(flags.latency, latency_s))
    if flags.duration is not None:
        duration_s = parse_duration(flags.duration)
        readings.append(describe_duration(flags.duration, duration_s))

    profile: tuple[ProfileStep, ...] = ()
    if ranges:
        if flags.over is None:
            raise UsageError(f"{ranges[0][0]} {ranges[0][1]}..{ranges[0][2]}: a range needs --over (how long the"
                             " ramp takes, e.g. --over 5m)")
        over_s = parse_duration(flags.over)
        count = _parse_steps(flags.steps)
        ends = {}
        for flag, start_text, end_text in ranges:
            parse = {"--set-cpu": parse_cpu, "--set-memory": parse_memory, "--set-bandwidth": parse_bandwidth}[flag]
            ends[flag] = (parse(start_text), parse(end_text))
        values = plan_profile(ends, over_s, count)
        first = values[0][1]
        cpu_millicpu = first.get("--set-cpu", cpu_millicpu)
        memory_bytes = first.get("--set-memory", memory_bytes)
        bandwidth_bps = first.get("--set-bandwidth", bandwidth_bps)
        profile = tuple(ProfileStep(offset_s=o, cpu_millicpu=v.get("--set-cpu"), memory_bytes=v.get("--set-memory"),
                                    bandwidth_bps=v.get("--set-bandwidth")) for o, v in values[1:])
        for flag, (a, b) in ends.items():
            readings.append(f"{flag} {a}..{b} ({'millicpu' if flag == '--set-cpu' else 'bytes' if flag == '--set-memory' else 'bit/s'})"
                            f" in {count} steps over {over_s:g}s, one every {over_s / (count - 1):.3g}s")

    request = ChaosRequest(
        namespace=flags.namespace,
        pod=flags.pod,
        container=flags.container,
        selector=flags.selector.strip() if flags.selector is not None else None,
        cpu_millicpu=cpu_millicpu,
        memory_bytes=memory_bytes,
        bandwidth_bps=bandwidth_bps,
        direction=direction,  # type: ignore[arg-type]  # checked against DIRECTIONS above
        duration_s=duration_s,
        method=flags.method or "auto",  # type: ignore[arg-type]
        force=flags.force,
        dry_run=flags.dry_run,
        reset=flags.reset,
        steps=profile,
        latency_s=latency_s,
    )
    return Invocation(request=request, connection=connection, readings=tuple(readings))


def _split_ranges(flags: Flags) -> tuple[list[tuple[str, str, str]], Flags]:
    """``--set-cpu 1000m..100m`` -> ("--set-cpu", "1000m", "100m"), the flag's value set to the start."""
    ranges = []
    for flag, field in (("--set-cpu", "set_cpu"), ("--set-memory", "set_memory"), ("--set-bandwidth", "set_bandwidth")):
        value = getattr(flags, field)
        if value is not None and ".." in value:
            start, _, end = value.partition("..")
            if not start.strip() or not end.strip() or ".." in end:
                raise UsageError(f'{flag}: "{value}" is not a range; write START..END, e.g. 1000m..100m')
            ranges.append((flag, start.strip(), end.strip()))
            flags = flags._replace(**{field: start.strip()})
    return ranges, flags


def _parse_steps(text: str | None) -> int:
    if text is None:
        return DEFAULT_STEPS
    if not text.strip().isdigit() or not 2 <= int(text) <= MAX_STEPS:
        raise UsageError(f'--steps: "{text}" is not accepted; give a whole number of steps from 2 to {MAX_STEPS}')
    return int(text)


def plan_profile(ends: dict[str, tuple[int, int]], over_s: float, steps: int) -> list[tuple[float, dict[str, int]]]:
    """Evenly spaced steps from each start to its end over ``over_s``: [(offset_s, {flag: value}), ...].

    Step i of n is at i/(n-1) of the way in time and in value (rounded to whole units), so the first
    is the start at 0 s and the last the end at ``over_s``. Steps whose values equal the step before
    are dropped (a ramp of 3 CPUs in 1000 steps has repeated millicore values)."""
    out: list[tuple[float, dict[str, int]]] = []
    for i in range(steps):
        f = i / (steps - 1)
        values = {flag: round(a + (b - a) * f) for flag, (a, b) in ends.items()}
        if out and values == out[-1][1]:
            continue
        out.append((over_s * f, values))
    return out
