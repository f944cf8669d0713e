"""Who may change what in cluster mode: namespace opt-in and the raise policy, as pure code.

Node-local mode (root on the node, ``--agent-address``) is not subject to any of this; the
controller asks :func:`refusal` before every apply it plans for a ResourceChaos.

- **Namespace opt-in.** The agent acts only in namespaces a cluster admin labelled
  ``kubectl-chaos.io/enabled=true``. ``kube-system`` and the agent's own namespace are refused
  even when labelled.
- **Raise policy.** By default a ResourceChaos may only lower a container's CPU and memory limits
  relative to its pod spec (what the kubelet gave the runtime). A raise needs a grant on the
  namespace: ``kubectl-chaos.io/max-raise: "2"`` (at most twice the spec limit) and/or absolute
  caps ``kubectl-chaos.io/max-cpu: "4"``, ``kubectl-chaos.io/max-memory: "8Gi"``; when several are
  set, each one bounds. Nothing is ever raised above the node's allocatable. A container without
  a limit in its spec counts as the node's allocatable for lowering and cannot be raised.
  Bandwidth needs no grant (no pod spec field limits it).

Every refusal names the limit, the policy and who can change it; none names another namespace's
objects.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import re
from typing import Any

from daemonset import crd

ENABLED_LABEL = f"{crd.GROUP}/enabled"
MAX_RAISE_ANNOTATION = f"{crd.GROUP}/max-raise"
MAX_CPU_ANNOTATION = f"{crd.GROUP}/max-cpu"
MAX_MEMORY_ANNOTATION = f"{crd.GROUP}/max-memory"
ALWAYS_REFUSED = ("kube-system",)
DEFAULT_AGENT_NAMESPACE = "kubectl-chaos"

_CAP_ANNOTATION = {"cpu": MAX_CPU_ANNOTATION, "memory": MAX_MEMORY_ANNOTATION}


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the policy looks at: the target namespace's object, this node's object (None: not seen
    in the API, or not readable) and the agent's own namespace."""

    namespace: dict | None
    node: dict | None
    agent_namespace: str = DEFAULT_AGENT_NAMESPACE


def namespace_refusal(name: str, namespace: dict | None, agent_namespace: str = DEFAULT_AGENT_NAMESPACE) -> str:
    """Why the agent does not act in namespace ``name`` ("" if it does)."""
    if name in ALWAYS_REFUSED or name == agent_namespace:
        return (f"namespace {name} is never changed by kubectl-chaos in cluster mode (kube-system and the agent's own"
                " namespace are refused even when labelled)")
    labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
    if labels.get(ENABLED_LABEL) != "true":
        return (f"namespace {name} is not enabled for kubectl-chaos; a cluster admin enables it with:"
                f" kubectl label namespace {name} {ENABLED_LABEL}=true")
    return ""


def refusal(policy: Policy, spec: crd.ChaosSpec, pod: dict, container: str) -> str:
    """Why ``spec`` may not be applied to ``container`` of ``pod`` under ``policy`` ("" if it may)."""
    name = pod["metadata"].get("namespace") or ((policy.namespace or {}).get("metadata") or {}).get("name", "")
    denied = namespace_refusal(name, policy.namespace, policy.agent_namespace)
    if denied:
        return denied
    reasons = []
    for resource, field in (("cpu", "cpu_millicpu"), ("memory", "memory_bytes")):
        # Every step of a profile is checked (a ramp up may end above the spec limit), the highest
        # first: it is the one a grant must cover, and the message names its step.
        asked = [(value, step) for step, value in enumerate(
            [getattr(spec, field)] + [getattr(row, field) for row in spec.profile], 1) if value is not None]
        if not asked:
            continue
        value, step = max(asked, key=lambda pair: (pair[0], -pair[1]))
        why = raise_refusal(resource, value, spec_limit(pod, container, resource), policy, name, container)
        if why:
            reasons.append(f"step {step} of the profile: {why}" if spec.profile and step > 1 else why)
    return "; ".join(reasons)


def raise_refusal(resource: str, asked: int, limit: int | None, policy: Policy, namespace: str,
                  container: str) -> str:
    """Why ``asked`` (millicores or bytes) is refused against the spec ``limit`` (None: no limit)."""
    node_name = ((policy.node or {}).get("metadata") or {}).get("name", "this node")
    allocatable = node_allocatable(policy.node, resource)
    if limit is not None and asked <= limit:
        return ""  # a lowering (or the spec's own value): always allowed
    if limit is None:
        if allocatable is None:
            return (f"{resource} {show(resource, asked)}: container {container} has no {resource} limit in its pod spec"
                    f" and node {node_name}'s allocatable {resource} cannot be read from the API, so nothing tells"
                    " whether this lowers it; refused")
        if asked <= allocatable:
            return ""
        return (f"{resource} {show(resource, asked)} is above node {node_name}'s allocatable {resource}"
                f" ({show(resource, allocatable)}); container {container} has no {resource} limit in its pod spec, so"
                " it counts as the node's allocatable and cannot be raised")
    what = (f"{resource} {show(resource, asked)} is above container {container}'s {resource} limit in its pod spec"
            f" ({show(resource, limit)})")
    grant, how, unreadable = _grant(resource, limit, policy.namespace)
    if grant is None:
        note = f" ({unreadable})" if unreadable else ""
        return (f"{what}; raising needs a grant on namespace {namespace}, which has none{note}: a cluster admin can"
                f" annotate the namespace with {MAX_RAISE_ANNOTATION}=2 (up to twice the spec limit) or"
                f" {_CAP_ANNOTATION[resource]}=<quantity>")
    if asked > grant:
        return (f"{what}; namespace {namespace} allows at most {show(resource, grant)} ({how}); a cluster admin can"
                " change that annotation on the namespace")
    if allocatable is None:
        return (f"{what}; node {node_name}'s allocatable {resource} cannot be read from the API, and no raise may go"
                " above it; refused")
    if asked > allocatable:
        return (f"{what}; no raise may go above node {node_name}'s allocatable {resource}"
                f" ({show(resource, allocatable)}), whatever the namespace allows")
    return ""


def _grant(resource: str, limit: int, namespace: dict | None) -> tuple[int | None, str, str]:
    """The highest value the namespace's annotations allow a raise to, how that was read, and what
    could not be read. (None, "", why) when there is no usable grant."""
    annotations = ((namespace or {}).get("metadata") or {}).get("annotations") or {}
    bounds: list[tuple[int, str]] = []
    unreadable = []
    factor_text = annotations.get(MAX_RAISE_ANNOTATION)
    if factor_text is not None:
        factor = _number(factor_text)
        if factor is None or factor < 1:
            unreadable.append(f'{MAX_RAISE_ANNOTATION}="{_short(factor_text)}" is not a number >= 1')
        else:
            bounds.append((math.floor(limit * factor), f"{MAX_RAISE_ANNOTATION}={factor_text} times the spec limit"))
    cap_text = annotations.get(_CAP_ANNOTATION[resource])
    if cap_text is not None:
        cap = to_units(resource, quantity(cap_text))
        if cap is None or cap <= 0:
            unreadable.append(f'{_CAP_ANNOTATION[resource]}="{_short(cap_text)}" is not a quantity')
        else:
            bounds.append((cap, f"{_CAP_ANNOTATION[resource]}={cap_text}"))
    if unreadable:
        return None, "", "; ".join(unreadable)
    if not bounds:
        return None, "", ""
    return min(bounds)[0], " and ".join(how for _, how in bounds), ""


# ---------------------------------------------------------------------------------------------
# Quantities


_QUANTITY = re.compile(r"^\s*([+-]?[0-9]+(?:\.[0-9]*)?|[+-]?\.[0-9]+)(?:[eE]([+-]?[0-9]{1,3}))?"
                       r"(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?\s*$")
_SUFFIX = {"": 1, "m": fractions.Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(text: Any) -> fractions.Fraction | None:
    """A Kubernetes quantity ("500m", "1", "256Mi", "1e3") as an exact number; None if unreadable."""
    text = str(text)
    if len(text) > 64:  # no quantity a person writes is longer; a hostile annotation may be
        return None
    m = _QUANTITY.match(text)
    if not m:
        return None
    value = fractions.Fraction(m.group(1)) * _SUFFIX[m.group(3) or ""]
    if m.group(2):
        value *= fractions.Fraction(10) ** int(m.group(2))
    return value


def to_units(resource: str, value: fractions.Fraction | None) -> int | None:
    """millicores for cpu (rounded up, as the kubelet does), bytes for memory."""
    if value is None:
        return None
    if resource == "cpu":
        return math.ceil(value * 1000)
    return math.ceil(value)


def spec_limit(pod: dict, container: str, resource: str) -> int | None:
    """The container's ``resources.limits`` in its pod spec, in millicores or bytes; None if unset."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            text = ((c.get("resources") or {}).get("limits") or {}).get(resource)
            return None if text is None else to_units(resource, quantity(text))
    return None


def node_allocatable(node: dict | None, resource: str) -> int | None:
    text = (((node or {}).get("status") or {}).get("allocatable") or {}).get(resource)
    return None if text is None else to_units(resource, quantity(text))


def _number(text: str) -> fractions.Fraction | None:
    value = quantity(text)
    return value if value is not None and str(text).strip()[-1:].isdigit() else None


def _short(text: str, limit: int = 40) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def show(resource: str, value: int) -> str:
    """A value as a person reads it: 1500m, 256Mi."""
    if resource == "cpu":
        return f"{value}m"
    for suffix, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= size and value % size == 0:
            return f"{value // size}{suffix}"
    return f"{value} bytes"
