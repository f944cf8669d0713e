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
import math
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


@dataclasses.dataclass(frozen=True)
class ProfileRow:
    """One later step of a stepped profile (``spec.profile[]``): these values go in force
    ``after_s`` seconds after the agent applied the request; None leaves a resource at the step
    before. The spec's own values are the first step (at 0 s)."""

    after_s: float
    cpu_millicpu: int | None = None
    memory_bytes: int | None = None
    bandwidth_bps: int | None = None  # in the spec's bandwidth direction

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"afterSeconds": self.after_s}
        if self.cpu_millicpu is not None:
            row["cpuMillicores"] = self.cpu_millicpu
        if self.memory_bytes is not None:
            row["memoryBytes"] = self.memory_bytes
        if self.bandwidth_bps is not None:
            row["bitsPerSecond"] = self.bandwidth_bps
        return row


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
    # The queue budget of the shaped directions (spec.bandwidth.latencyMilliseconds); None: the
    # experiment's, 50 ms for a new shaping.
    latency_s: float | None = None
    duration_s: float | None = None
    method: str = "auto"
    force: bool = False
    # New on every kubectl-chaos command, so the same spec sent again is a new generation that
    # every agent answers afresh (a Failed target is retried, an expired one applied again).
    request_id: str | None = None
    # A stepped profile: the values above are its first step, these rows follow (the agent runs them).
    profile: tuple[ProfileRow, ...] = ()

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
            if self.latency_s is not None:
                spec["bandwidth"]["latencyMilliseconds"] = round(self.latency_s * 1000)
        if self.duration_s is not None:
            spec["durationSeconds"] = self.duration_s
        if self.request_id:
            spec["requestId"] = self.request_id
        if self.profile:
            spec["profile"] = [row.to_dict() for row in self.profile]
        return spec

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ChaosSpec:
        """The spec of an object as the API served it, checked as the CRD's schema checks it (an
        object written before the schema had a rule, or past a schema a cluster did not enforce,
        is refused here with the same words): SpecError names the field and what is accepted."""
        if not isinstance(spec, dict):
            raise SpecError(f"spec must be an object, got {_show(spec)}")
        target = spec.get("target") or {}
        if not isinstance(target, dict):
            raise SpecError(f"spec.target must be an object, got {_show(target)}")
        pod, selector = target.get("pod"), target.get("selector")
        if (pod is None) == (selector is None):
            raise SpecError(f"spec.target: give exactly one of pod and selector, got {_show(target)}")
        if pod is not None and not (isinstance(pod, str) and len(pod) <= 253 and re.match(_DNS_SUBDOMAIN, pod)):
            raise SpecError(f"spec.target.pod {_show(pod)} is not a pod name (a lowercase DNS-1123 subdomain, at most"
                            " 253 characters)")
        if selector is not None:
            check_selector(selector)
        container = spec.get("container") or None
        if container is not None and not (isinstance(container, str) and re.match(_DNS_LABEL, container)
                                          and len(container) <= 63):
            raise SpecError(f"spec.container {_show(container)} is not a container name (a lowercase DNS-1123 label,"
                            " at most 63 characters)")
        bandwidth = spec.get("bandwidth") or {}
        if not isinstance(bandwidth, dict):
            raise SpecError(f"spec.bandwidth must be an object, got {_show(bandwidth)}")
        direction = bandwidth.get("direction", "both")
        if direction not in ("ingress", "egress", "both"):
            raise SpecError(f"spec.bandwidth.direction {_show(direction)} is not one of ingress, egress, both")
        latency_ms = _integer(bandwidth, "latencyMilliseconds", *LIMITS["bandwidth.latencyMilliseconds"],
                              field="spec.bandwidth.latencyMilliseconds")
        method = spec.get("method", "auto")
        if method not in ("auto", "cri", "cgroup"):
            raise SpecError(f"spec.method {_show(method)} is not one of auto, cri, cgroup")
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise SpecError(f"spec.force must be true or false, got {_show(force)}")
        request_id = spec.get("requestId")
        if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= 64):
            raise SpecError(f"spec.requestId must be a string of at most 64 characters, got {_show(request_id)}")
        duration = spec.get("durationSeconds")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int | float)
                                     or not math.isfinite(duration) or not 0 < duration <= MAX_DURATION_S):
            raise SpecError(f"spec.durationSeconds {_show(duration)} is out of range; accepted: more than 0, at most"
                            f" {MAX_DURATION_S} (30 days)")
        result = cls(pod=pod, selector=selector, container=container,
                     cpu_millicpu=_integer(spec, "cpuMillicores", *LIMITS["cpuMillicores"]),
                     memory_bytes=_integer(spec, "memoryBytes", *LIMITS["memoryBytes"]),
                     bandwidth_bps=_integer(bandwidth, "bitsPerSecond", *LIMITS["bandwidth.bitsPerSecond"],
                                            field="spec.bandwidth.bitsPerSecond"),
                     direction=direction, duration_s=duration, method=method, force=force, request_id=request_id,
                     latency_s=None if latency_ms is None else latency_ms / 1000)
        if not result.requested():
            raise SpecError("spec: nothing to change; set cpuMillicores, memoryBytes or bandwidth")
        profile = _profile(spec.get("profile"), result)
        return dataclasses.replace(result, profile=profile) if profile else result


def _profile(rows: Any, first: ChaosSpec) -> tuple[ProfileRow, ...]:
    """``spec.profile`` checked row by row (as the CRD's schema, and what it cannot say: offsets
    rising, only resources the first step sets); SpecError names the row, the field and what is
    accepted."""
    if rows is None:
        return ()
    if not isinstance(rows, list):
        raise SpecError(f"spec.profile must be a list of steps, got {_show(rows)}")
    if len(rows) > MAX_PROFILE_ROWS:
        raise SpecError(f"spec.profile has {len(rows)} steps; accepted: at most {MAX_PROFILE_ROWS}")
    out: list[ProfileRow] = []
    last = 0.0
    for i, row in enumerate(rows):
        where = f"spec.profile[{i}]"
        if not isinstance(row, dict):
            raise SpecError(f"{where} must be an object, got {_show(row)}")
        unknown = sorted(set(row) - {"afterSeconds", *_ROW_FIELDS})
        if unknown:
            raise SpecError(f"{where}: unknown field {_show(unknown[0])}; accepted: afterSeconds,"
                            f" {', '.join(_ROW_FIELDS)}")
        after = row.get("afterSeconds")
        if isinstance(after, bool) or not isinstance(after, int | float) or not math.isfinite(after) \
                or not 0 < after <= MAX_DURATION_S:
            raise SpecError(f"{where}.afterSeconds {_show(after)} is out of range; accepted: more than 0, at most"
                            f" {MAX_DURATION_S} (30 days)")
        if after <= last:
            raise SpecError(f"{where}.afterSeconds {after:g} is not after the step before ({last:g}); the rows go"
                            " in time order, each later than the one before")
        values = {name: _integer(row, name, *LIMITS[limit], field=f"{where}.{name}")
                  for name, limit in _ROW_FIELDS.items()}
        if not any(v is not None for v in values.values()):
            raise SpecError(f"{where} changes nothing; set cpuMillicores, memoryBytes or bitsPerSecond")
        for name, value in values.items():
            if value is not None and getattr(first, _ROW_FIELDS_FIRST[name]) is None:
                raise SpecError(f"{where}.{name}: the first step (the spec's own values) sets no"
                                f" {_ROW_NAMES[name]}; a profile steps only the resources it starts with")
        out.append(ProfileRow(after_s=after, cpu_millicpu=values["cpuMillicores"],
                              memory_bytes=values["memoryBytes"], bandwidth_bps=values["bitsPerSecond"]))
        last = after
    if first.duration_s is not None and out and out[-1].after_s > first.duration_s:
        late = next(i for i, r in enumerate(out) if r.after_s > first.duration_s)
        raise SpecError(f"spec.profile[{late}].afterSeconds {out[late].after_s:g} is after spec.durationSeconds"
                        f" {first.duration_s:g}: the experiment ends before that step; accepted: at most the duration")
    return tuple(out)


# A profile row's value fields -> the bounds in LIMITS, the ChaosSpec field of the first step, a name.
_ROW_FIELDS = {"cpuMillicores": "cpuMillicores", "memoryBytes": "memoryBytes",
               "bitsPerSecond": "bandwidth.bitsPerSecond"}
_ROW_FIELDS_FIRST = {"cpuMillicores": "cpu_millicpu", "memoryBytes": "memory_bytes",
                     "bitsPerSecond": "bandwidth_bps"}
_ROW_NAMES = {"cpuMillicores": "cpu", "memoryBytes": "memory", "bitsPerSecond": "bandwidth"}


def spec_of(obj: dict) -> ChaosSpec:
    return ChaosSpec.from_dict(obj.get("spec") or {})


# The bounds the CRD's schema declares (daemonset/manifests/crd.yaml; tests/unit/test_manifests_crd.py
# checks they agree): (minimum, maximum) of each integer field.
LIMITS = {"cpuMillicores": (1, 1_000_000), "memoryBytes": (4 * 2**20, 2**50),
          "bandwidth.bitsPerSecond": (8_000, 100 * 10**9), "bandwidth.latencyMilliseconds": (1, 10_000)}
MAX_DURATION_S = 30 * 24 * 3600
# Steps of a profile after the first (status shows the step in force and the next one).
MAX_PROFILE_ROWS = 999
# At most this many pods per ResourceChaos (status.targets has maxItems of this): beyond it, a
# selector must be narrowed or split. Keeps the object far below the API's ~1.5 MiB size limit.
MAX_TARGETS = 500
# A selector's size: terms, values per term, and the label syntax's own lengths.
MAX_SELECTOR_TERMS = 32
MAX_SELECTOR_VALUES = 64
# Patterns as text, compiled by re's cache on first use (kubectl-chaos imports this module at every
# start and uses few of them).
_LABEL_NAME = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$"
_LABEL_VALUE = r"^(([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)$"
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _show(value: Any, limit: int = 60) -> str:
    """A value for a message, cut short (a hostile object may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _integer(spec: dict, key: str, low: int, high: int, *, field: str | None = None) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    field = field or f"spec.{key}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{field} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise SpecError(f"{field} {_show(value)} is out of range; accepted: {low} to {high}")
    return value


def check_label_key(key: Any, where: str) -> None:
    if not isinstance(key, str) or not key:
        raise SpecError(f"{where}: a label key must be a non-empty string, got {_show(key)}")
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not re.match(_DNS_SUBDOMAIN, prefix)) or not re.match(_LABEL_NAME, name):
        raise SpecError(f"{where}: {_show(key)} is not a label key ([prefix/]name: a DNS subdomain prefix of at most"
                        " 253 characters, a name of at most 63 alphanumerics, '-', '_' or '.')")


def check_label_value(value: Any, where: str) -> None:
    if not isinstance(value, str) or not re.match(_LABEL_VALUE, value):
        raise SpecError(f"{where}: {_show(value)} is not a label value (at most 63 alphanumerics, '-', '_' or '.',"
                        " starting and ending with an alphanumeric)")


def check_selector(selector: Any) -> None:
    """A metav1.LabelSelector that selects something: SpecError for an empty selector (it would match
    every pod of the namespace), an unknown operator, In/NotIn without values, Exists/DoesNotExist
    with values, bad label syntax, or more than MAX_SELECTOR_TERMS terms."""
    where = "spec.target.selector"
    if not isinstance(selector, dict):
        raise SpecError(f"{where} must be an object, got {_show(selector)}")
    unknown = sorted(set(selector) - {"matchLabels", "matchExpressions"})
    if unknown:
        raise SpecError(f"{where}: unknown field {_show(unknown[0])}; accepted: matchLabels, matchExpressions")
    labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not isinstance(labels, dict):
        raise SpecError(f"{where}.matchLabels must be an object, got {_show(labels)}")
    if not isinstance(expressions, list):
        raise SpecError(f"{where}.matchExpressions must be a list, got {_show(expressions)}")
    if not labels and not expressions:
        raise SpecError(f"{where} is empty: it would select every pod in the namespace; give matchLabels or"
                        " matchExpressions")
    if len(labels) + len(expressions) > MAX_SELECTOR_TERMS:
        raise SpecError(f"{where} has {len(labels) + len(expressions)} terms; accepted: at most {MAX_SELECTOR_TERMS}")
    for key, value in labels.items():
        check_label_key(key, f"{where}.matchLabels")
        check_label_value(value, f"{where}.matchLabels[{_show(key)}]")
    for i, expr in enumerate(expressions):
        here = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            raise SpecError(f"{here} must be an object, got {_show(expr)}")
        check_label_key(expr.get("key"), f"{here}.key")
        operator, values = expr.get("operator"), expr.get("values")
        if operator not in _OPERATORS:
            raise SpecError(f"{here}.operator {_show(operator)} is unknown; accepted: {', '.join(_OPERATORS)}")
        if values is not None and not isinstance(values, list):
            raise SpecError(f"{here}.values must be a list, got {_show(values)}")
        values = values or []
        if operator in ("In", "NotIn") and not values:
            raise SpecError(f"{here}: {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise SpecError(f"{here}: {operator} takes no values")
        if len(values) > MAX_SELECTOR_VALUES:
            raise SpecError(f"{here} has {len(values)} values; accepted: at most {MAX_SELECTOR_VALUES}")
        for j, value in enumerate(values):
            check_label_value(value, f"{here}.values[{j}]")


_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def object_name(pod: str, container: str) -> str:
    """The name of the one ResourceChaos of ``pod``/``container``: ``pod.container`` (hashed if too long)."""
    name = f"{pod}.{container}"
    if len(name) <= 253:
        return name
    import hashlib  # here: the plugin's start-up does not pay for it (2.5 ms)

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


_SET_TERM = r"^([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)$"
_CMP_TERM = r"^([A-Za-z0-9./_-]+)\s*(==|!=|=)\s*([A-Za-z0-9._-]*)$"
_KEY_TERM = r"^(!?)([A-Za-z0-9./_-]+)$"


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
        if m := re.match(_SET_TERM, term):
            values = [v.strip() for v in m.group(3).split(",") if v.strip()]
            expressions.append({"key": m.group(1), "operator": "In" if m.group(2) == "in" else "NotIn",
                                "values": values})
        elif m := re.match(_CMP_TERM, term):
            if m.group(2) == "!=":
                expressions.append({"key": m.group(1), "operator": "NotIn", "values": [m.group(3)]})
            elif m.group(1) in match_labels and match_labels[m.group(1)] != m.group(3):
                raise SpecError(f'selector "{text}" asks {m.group(1)} to equal two values')
            else:
                match_labels[m.group(1)] = m.group(3)
        elif m := re.match(_KEY_TERM, term):
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


def with_targets(obj: dict, entries: list[dict], node: dict | None = None) -> dict:
    """``obj``'s status with ``entries`` put in place (by pod), ``node`` in ``status.nodes`` (by
    node) and the summary recomputed."""
    status = dict(obj.get("status") or {})
    targets = {e["pod"]: e for e in status.get("targets") or []}
    for entry in entries:
        targets[entry["pod"]] = entry
    status["targets"] = [targets[name] for name in sorted(targets)]
    if node is not None:
        nodes = {n["node"]: n for n in status.get("nodes") or []}
        nodes[node["node"]] = node
        status["nodes"] = [nodes[name] for name in sorted(nodes)]
    status.update(summarize(obj, status["targets"]))
    status["observedGeneration"] = obj["metadata"].get("generation", 1)
    return status


def target_summary(obj: dict) -> str:
    """What the object targets, as every node writes it alike: ``pod/web-1`` or ``-l app=web``."""
    target = (obj.get("spec") or {}).get("target") or {}
    if target.get("pod"):
        return f"pod/{target['pod']}"
    annotations = obj["metadata"].get("annotations") or {}
    try:
        text = annotations.get(SELECTOR_ANNOTATION) or selector_text(target.get("selector") or {})
    except (AttributeError, KeyError, TypeError):  # a hostile selector: said in the node entries
        text = "(a selector that cannot be used)"
    return f"-l {str(text)[:300]}"


def node_summary(obj: dict, node: str, targets: list[dict]) -> dict:
    """The ``status.nodes`` entry of ``node`` over its own ``targets``."""
    summary = summarize(obj, targets)
    entry = {"node": node, "phase": summary["phase"], "observedGeneration": obj["metadata"].get("generation", 1),
             "targets": len(targets), "message": summary["message"][:1024]}
    if summary.get("expiresAt"):
        entry["expiresAt"] = summary["expiresAt"]
    return entry


def node_entry(status: dict | None, node: str) -> dict | None:
    for entry in (status or {}).get("nodes") or []:
        if entry.get("node") == node:
            return entry
    return None


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
        import hashlib

        name = f"node-{node[:40].rstrip('.-')}-{hashlib.sha256(node.encode()).hexdigest()[:12]}"
    return f"{GROUP}/{name}"


def is_deleting(obj: dict) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))
