"""The ResourceChaos API (kubectl-chaos.io/v1alpha1): names, spec and status, as pure code.

Shared by the agent's controller (daemonset.controller) and the plugin's cluster backend
(plugin.backends.cluster), so both read and write the object the same way. No Kubernetes client
here: objects are plain dicts as the API serves them. The schema itself is
daemonset/manifests/crd.yaml.

The life of one experiment:

1. the plugin creates a ResourceChaos (one per target container; ``-l`` makes one for a selector);
   one for a named pod is owned by that pod, so deleting the pod deletes its experiment; one for
   a selector has no owner and applies to every matching pod, also later ones, until deleted;
2. each agent applies it to the matching pods on its own node, after adding its node's finalizer,
   and writes one ``status.targets`` entry per pod (original and read-back values, expiry);
3. deleting the object (``--reset``) or reaching the expiry reverts; the agent writes the restored
   values, then drops its finalizer, and the API server removes the object. A revert the kernel
   refuses shows as ``Reverting`` (why, and the next try) until the agent's retries succeed.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from typing import Any

GROUP = "kubectl-chaos.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ResourceChaos"
PLURAL = "resourcechaos"

PENDING, APPLIED, REVERTED, FAILED, PARTIAL = "Pending", "Applied", "Reverted", "Failed", "Partial"
# The originals could not all be put back yet; the agent retries with backoff (the message says why and when).
REVERTING = "Reverting"
TERMINAL = (APPLIED, REVERTED, FAILED)  # an agent has answered for the target

DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
SELECTOR_ANNOTATION = f"{GROUP}/selector"  # the selector as typed, for --reset -l and status
CREATED_BY_LABEL = "app.kubernetes.io/managed-by"
CREATED_BY = "kubectl-chaos"
EVENT_COMPONENT = "chaos-agent"

# Status resource names and the plain unit each carries.
UNITS = {"cpu": "millicores", "memory": "bytes", "bandwidth-ingress": "bits/s", "bandwidth-egress": "bits/s"}


class SpecError(ValueError):
    """A ResourceChaos spec or selector that cannot be used; the message names the field and value."""


# ---------------------------------------------------------------------------------------------
# Spec


@dataclasses.dataclass(frozen=True)
class ChaosSpec:
    """``spec`` of a ResourceChaos. Exactly one of ``pod`` and ``selector`` is set."""

    pod: str | None = None
    selector: dict | None = None  # a LabelSelector: matchLabels / matchExpressions
    container: str | None = None
    cpu_millicpu: int | None = None
    memory_bytes: int | None = None
    bandwidth_bps: int | None = None
    direction: str = "both"
    duration_s: float | None = None
    method: str = "auto"
    force: bool = False
    # New on every kubectl-chaos command, so the same spec sent again is a new generation that
    # every agent answers afresh (a Failed target is retried, an expired one applied again).
    request_id: str | None = None

    @property
    def ingress_bps(self) -> int | None:
        return self.bandwidth_bps if self.direction in ("ingress", "both") else None

    @property
    def egress_bps(self) -> int | None:
        return self.bandwidth_bps if self.direction in ("egress", "both") else None

    def requested(self) -> dict[str, int]:
        """What is asked, by status resource name."""
        pairs = {"cpu": self.cpu_millicpu, "memory": self.memory_bytes,
                 "bandwidth-ingress": self.ingress_bps, "bandwidth-egress": self.egress_bps}
        return {k: v for k, v in pairs.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        target: dict[str, Any] = {"pod": self.pod} if self.pod is not None else {"selector": self.selector}
        spec: dict[str, Any] = {"target": target, "method": self.method, "force": self.force}
        if self.container:
            spec["container"] = self.container
        if self.cpu_millicpu is not None:
            spec["cpuMillicores"] = self.cpu_millicpu
        if self.memory_bytes is not None:
            spec["memoryBytes"] = self.memory_bytes
        if self.bandwidth_bps is not None:
            spec["bandwidth"] = {"bitsPerSecond": self.bandwidth_bps, "direction": self.direction}
        if self.duration_s is not None:
            spec["durationSeconds"] = self.duration_s
        if self.request_id:
            spec["requestId"] = self.request_id
        return spec

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ChaosSpec:
        target = spec.get("target") or {}
        pod, selector = target.get("pod"), target.get("selector")
        if (pod is None) == (selector is None):
            raise SpecError(f"spec.target: give exactly one of pod and selector, got {target!r}")
        bandwidth = spec.get("bandwidth") or {}
        result = cls(pod=pod, selector=selector, container=spec.get("container") or None,
                     cpu_millicpu=spec.get("cpuMillicores"), memory_bytes=spec.get("memoryBytes"),
                     bandwidth_bps=bandwidth.get("bitsPerSecond"), direction=bandwidth.get("direction", "both"),
                     duration_s=spec.get("durationSeconds"), method=spec.get("method", "auto"),
                     force=bool(spec.get("force", False)), request_id=spec.get("requestId"))
        if not result.requested():
            raise SpecError("spec: nothing to change; set cpuMillicores, memoryBytes or bandwidth")
        return result


def spec_of(obj: dict) -> ChaosSpec:
    return ChaosSpec.from_dict(obj.get("spec") or {})


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def object_name(pod: str, container: str) -> str:
    """The name of the one ResourceChaos of ``pod``/``container``: ``pod.container`` (hashed if too long)."""
    name = f"{pod}.{container}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{pod[:200]}.{digest}"


def build(namespace: str, spec: ChaosSpec, *, name: str | None = None, owners: list[dict] = (),
          selector_text: str | None = None) -> dict:
    """A new ResourceChaos owned by the ``owners`` pods (pod dicts as the API serves them)."""
    metadata: dict[str, Any] = {"namespace": namespace, "labels": {CREATED_BY_LABEL: CREATED_BY}}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = "chaos-"
    if selector_text:
        metadata["annotations"] = {SELECTOR_ANNOTATION: selector_text}
    if owners:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": p["metadata"]["name"], "uid": p["metadata"]["uid"]}
            for p in owners]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec.to_dict()}


# ---------------------------------------------------------------------------------------------
# Label selectors: the text people type <-> metav1.LabelSelector <-> matching


_SET_TERM = re.compile(r"^([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)$")
_CMP_TERM = re.compile(r"^([A-Za-z0-9./_-]+)\s*(==|!=|=)\s*([A-Za-z0-9._-]*)$")
_KEY_TERM = re.compile(r"^(!?)([A-Za-z0-9./_-]+)$")


def _terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    terms.append(current.strip())
    return [t for t in terms if t]


def parse_selector(text: str) -> dict:
    """``app=web,tier in (a,b),!canary`` -> a LabelSelector dict; SpecError names the bad term."""
    match_labels: dict[str, str] = {}
    expressions: list[dict] = []
    terms = _terms(text or "")
    if not terms:
        raise SpecError(f'selector "{text}" is empty; use a label selector like "app=web"')
    for term in terms:
        if m := _SET_TERM.match(term):
            values = [v.strip() for v in m.group(3).split(",") if v.strip()]
            expressions.append({"key": m.group(1), "operator": "In" if m.group(2) == "in" else "NotIn",
                                "values": values})
        elif m := _CMP_TERM.match(term):
            if m.group(2) == "!=":
                expressions.append({"key": m.group(1), "operator": "NotIn", "values": [m.group(3)]})
            elif m.group(1) in match_labels and match_labels[m.group(1)] != m.group(3):
                raise SpecError(f'selector "{text}" asks {m.group(1)} to equal two values')
            else:
                match_labels[m.group(1)] = m.group(3)
        elif m := _KEY_TERM.match(term):
            expressions.append({"key": m.group(2), "operator": "DoesNotExist" if m.group(1) else "Exists"})
        else:
            raise SpecError(f'selector "{text}": cannot read "{term}"; use key=value, key!=value, '
                            "key in (a,b), key notin (a,b), key or !key")
    selector: dict[str, Any] = {}
    if match_labels:
        selector["matchLabels"] = match_labels
    if expressions:
        selector["matchExpressions"] = expressions
    return selector


def selector_text(selector: dict) -> str:
    """A LabelSelector as the string the API's ``labelSelector`` parameter takes."""
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op, key, values = expr["operator"], expr["key"], expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        else:
            terms.append(f"!{key}")
    return ",".join(terms)


def selector_matches(selector: dict, labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Pods and containers


def pod_containers(pod: dict) -> list[str]:
    return [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]


def choose_container(pod: dict, asked: str | None) -> str:
    """The container to change, as ``kubectl exec`` picks it; SpecError lists what exists."""
    names = pod_containers(pod)
    pod_name = pod["metadata"]["name"]
    if asked:
        if asked not in names:
            raise SpecError(f'container "{asked}" not found in pod {pod_name}; its containers: {", ".join(names)}')
        return asked
    default = ((pod["metadata"].get("annotations") or {}).get(DEFAULT_CONTAINER_ANNOTATION) or "").strip()
    if default and default in names:
        return default
    if len(names) == 1:
        return names[0]
    raise SpecError(f"pod {pod_name} has {len(names)} containers ({', '.join(names)}); choose one with -c")


# ---------------------------------------------------------------------------------------------
# Status


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def target_entry(status: dict | None, pod: str) -> dict | None:
    for entry in (status or {}).get("targets") or []:
        if entry.get("pod") == pod:
            return entry
    return None


def with_targets(obj: dict, entries: list[dict]) -> dict:
    """``obj``'s status with ``entries`` put in place (by pod) and the summary recomputed."""
    status = dict(obj.get("status") or {})
    targets = {e["pod"]: e for e in status.get("targets") or []}
    for entry in entries:
        targets[entry["pod"]] = entry
    status["targets"] = [targets[name] for name in sorted(targets)]
    status.update(summarize(obj, status["targets"]))
    status["observedGeneration"] = obj["metadata"].get("generation", 1)
    return status


def summarize(obj: dict, targets: list[dict]) -> dict:
    """The top-level phase, message, target summary and earliest expiry over the targets."""
    spec = obj.get("spec") or {}
    target = spec.get("target") or {}
    annotations = obj["metadata"].get("annotations") or {}
    if target.get("pod"):
        summary = f"pod/{target['pod']}"
    else:
        summary = f"-l {annotations.get(SELECTOR_ANNOTATION) or selector_text(target.get('selector') or {})}"
        summary += f" ({len(targets)} pod{'s' if len(targets) != 1 else ''})"
    phases = {t["phase"] for t in targets}
    if not phases:
        phase = PENDING
    elif len(phases) == 1:
        phase = next(iter(phases))
    elif FAILED in phases:
        phase = PARTIAL
    elif PENDING in phases:
        phase = PENDING
    elif REVERTING in phases:
        phase = REVERTING
    else:
        phase = APPLIED  # some applied, some already reverted (e.g. a pod that went away)
    failed = [t for t in targets if t["phase"] == FAILED]
    message = f"{failed[0]['pod']}: {failed[0].get('message', '')}" if failed else ""
    if len(failed) > 1:
        message += f" (and {len(failed) - 1} more failed)"
    reverting = [t for t in targets if t["phase"] == REVERTING]
    if reverting and not failed:
        message = f"{reverting[0]['pod']}: {reverting[0].get('message', '')}"
        if len(reverting) > 1:
            message += f" (and {len(reverting) - 1} more reverting)"
    expiries = sorted(t["expiresAt"] for t in targets if t.get("expiresAt") and t["phase"] == APPLIED)
    out = {"phase": phase, "targetSummary": summary, "message": message}
    if expiries:
        out["expiresAt"] = expiries[0]
    return out


def finalizer_for(node: str) -> str:
    """The finalizer an agent holds on the objects it applied: ``kubectl-chaos.io/node-NAME``."""
    name = f"node-{node}"
    if len(name) > 63:
        name = f"node-{node[:40].rstrip('.-')}-{hashlib.sha256(node.encode()).hexdigest()[:12]}"
    return f"{GROUP}/{name}"


def is_deleting(obj: dict) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))
