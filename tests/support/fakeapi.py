"""An HTTP-level fake kube-apiserver for the cluster tests.

No kube-apiserver binary can be installed on the test machines, so the cluster paths are tested
against this server, which the real ``kubernetes`` Python client and kubectl talk to over HTTP on
127.0.0.1. It keeps to the API server's observable contract where our code depends on it:

- real paths: ``/api/v1/...``, ``/apis/GROUP/VERSION/...``, namespaced and cluster-scoped
  resources, all-namespaces lists, the ``status`` subresource, discovery (``/api``, ``/apis``,
  ``/apis/GROUP/VERSION``, ``/version``);
- verbs: get, list, watch (``?watch=true``: a chunked stream of JSON lines, resource versions,
  ``410 Gone`` as an ERROR event for a compacted version), create (``409 AlreadyExists``,
  ``generateName``), update (``409 Conflict`` on a stale ``resourceVersion``), patch
  (``merge-patch+json``; ``strategic-merge-patch+json`` for built-in types only, ``415`` for
  custom resources like the real server; a ``resourceVersion`` in a patch is a precondition),
  delete (finalizers hold an object with a ``deletionTimestamp``; owner-reference garbage
  collection removes dependents whose owners are all gone);
- ``fieldSelector`` (metadata.name, metadata.namespace, and spec.nodeName / status.phase for pods;
  anything else is a 400 like the real server) and ``labelSelector`` (=, ==, !=, in, notin,
  exists, !exists);
- custom resources registered from a CRD manifest: unknown fields pruned (or rejected with
  ``fieldValidation=Strict``), the object validated against the CRD's openAPIV3Schema with
  jsonschema and a ``422 Invalid`` answer naming the field, ``generation`` bumped on spec changes,
  printer columns served as a Table to kubectl;
- TLS with a self-signed certificate (in the kubeconfig it writes), bearer-token authentication (401) and an RBAC-style authorizer (403) fed with PolicyRules, so a
  test can bind the manifests' own ClusterRole to the agent's token.

Fault injection, for clients' error paths: ``fail_writes`` answers writes with a given error
(409 Conflict, 500, 503) for a while or a number of times, as a busy or restarting API server
does; ``expire_watches`` compacts the history and ends every open watch in the middle of its
stream with the ``410 Gone`` ERROR event a real server sends after etcd compaction.

Server-side apply (``application/apply-patch+yaml``) for custom resources: ``managedFields`` per
manager, operation and subresource (Update operations take the fields whose value they change),
list-maps merged by their keys, conflicts (409 naming each field and manager) unless ``force``,
fields a manager stops applying removed unless another owns them. Size limits: a request body over
3 MiB is a 413, a stored object over 1.5 MiB (etcd's default request limit) a 500 "etcdserver:
request is too large", as a real server answers.

What it leaves out: client certificates, admission beyond the CRD schema, CEL rules, server-side apply
of built-in types, managed fields of built-in types, JSON patch, pagination (``limit`` is ignored, which the API contract allows), graceful pod deletion
(pods go at once, as with ``gracePeriodSeconds=0``).
"""

from __future__ import annotations

import base64
import copy
import datetime
import http.server
import json
import os
import re
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import yaml

WATCH_HISTORY = 10_000
DEFAULT_WATCH_TIMEOUT_S = 1800.0


# --------------------------------------------------------------------------------------------
# Resource types


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    custom: bool = False
    schema: dict | None = None  # openAPIV3Schema of a CRD
    printer_columns: tuple[dict, ...] = ()
    field_labels: tuple[str, ...] = ("metadata.name", "metadata.namespace")

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


_CORE_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, singular="namespace",
                 short_names=("ns",), status_subresource=True, field_labels=("metadata.name",)),
    ResourceType("", "v1", "nodes", "Node", namespaced=False, singular="node", short_names=("no",),
                 status_subresource=True, field_labels=("metadata.name",)),
    ResourceType("", "v1", "pods", "Pod", singular="pod", short_names=("po",), status_subresource=True,
                 field_labels=("metadata.name", "metadata.namespace", "spec.nodeName", "status.phase")),
    ResourceType("", "v1", "events", "Event", singular="event", short_names=("ev",),
                 field_labels=("metadata.name", "metadata.namespace", "involvedObject.name",
                               "involvedObject.uid", "reason", "type")),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", singular="serviceaccount", short_names=("sa",)),
)


class ApiError(Exception):
    """An API answer other than success: carried to the client as a metav1.Status."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


_CERT_LOCK = threading.Lock()
_CERT_FILES: tuple[str, str] | None = None


def _self_signed_certificate() -> tuple[str, str]:
    """A certificate for 127.0.0.1 made once per process with the openssl command."""
    global _CERT_FILES
    with _CERT_LOCK:
        if _CERT_FILES is None:
            directory = tempfile.mkdtemp(prefix="fakeapi-tls-")
            cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=fake-kube-apiserver",
                            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                           check=True, capture_output=True, timeout=30)
            _CERT_FILES = (cert, key)
        return _CERT_FILES


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Selectors (pure)


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return has and value == self.values[0]
        if self.op == "!=":
            return not has or value != self.values[0]
        if self.op == "in":
            return has and value in self.values
        if self.op == "notin":
            return not has or value not in self.values
        if self.op == "exists":
            return has
        return not has  # "!"


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_SET_RE = re.compile(r"^([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)$")
_CMP_RE = re.compile(r"^([A-Za-z0-9./_-]+)\s*(==|!=|=)\s*([A-Za-z0-9._-]*)$")
_KEY_RE = re.compile(r"^(!?)([A-Za-z0-9./_-]+)$")


def parse_label_selector(text: str) -> list[Requirement]:
    """Parse a label selector string as the API server does; a ValueError names the bad term."""
    requirements = []
    for term in _split_top_level(text or ""):
        if m := _SET_RE.match(term):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            requirements.append(Requirement(m.group(1), m.group(2), values))
        elif m := _CMP_RE.match(term):
            op = "=" if m.group(2) in ("=", "==") else "!="
            requirements.append(Requirement(m.group(1), op, (m.group(3),)))
        elif m := _KEY_RE.match(term):
            requirements.append(Requirement(m.group(2), "!" if m.group(1) else "exists"))
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return requirements


def parse_field_selector(text: str, allowed: Iterable[str]) -> list[tuple[str, str, str]]:
    """Parse ``a=b,c!=d``; a ValueError for a field label the resource does not support."""
    terms = []
    for term in _split_top_level(text or ""):
        m = re.match(r"^([A-Za-z0-9.]+)\s*(==|!=|=)\s*(.*)$", term)
        if not m:
            raise ValueError(f"invalid selector: {term!r}; can't understand {term!r}")
        if m.group(1) not in allowed:
            raise ValueError(f'field label not supported: {m.group(1)}')
        terms.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return terms


def _field_value(obj: dict, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def selector_matches(obj: dict, labels: list[Requirement], fields: list[tuple[str, str, str]]) -> bool:
    obj_labels = obj.get("metadata", {}).get("labels") or {}
    if not all(r.matches(obj_labels) for r in labels):
        return False
    for path, op, want in fields:
        if (_field_value(obj, path) == want) != (op == "="):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Patches and schema (pure)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists that strategic merge merges by key instead of replacing (the ones our code touches).
_STRATEGIC_MERGE_KEYS = {"containers": "name", "initContainers": "name", "ownerReferences": "uid",
                         "conditions": "type", "containerStatuses": "name", "finalizers": None}


def strategic_merge_patch(target: Any, patch: Any, key: str = "") -> Any:
    """Strategic merge patch, enough of it for built-in types: maps merge, keyed lists merge."""
    if isinstance(patch, list) and isinstance(target, list) and key in _STRATEGIC_MERGE_KEYS:
        merge_key = _STRATEGIC_MERGE_KEYS[key]
        result = copy.deepcopy(target)
        for item in patch:
            if merge_key is None:
                if item not in result:
                    result.append(item)
                continue
            for i, existing in enumerate(result):
                if isinstance(existing, dict) and existing.get(merge_key) == item.get(merge_key):
                    result[i] = strategic_merge_patch(existing, item)
                    break
            else:
                result.append(copy.deepcopy(item))
        return result
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, value in patch.items():
        if value is None:
            result.pop(k, None)
        else:
            result[k] = strategic_merge_patch(result.get(k), value, k)
    return result


def prune_unknown(schema: dict, value: Any, path: str = "") -> tuple[Any, list[str]]:
    """Drop fields the structural schema does not declare, as the API server does; return them."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return value, []
    dropped: list[str] = []
    if isinstance(value, dict) and ("properties" in schema or "additionalProperties" in schema):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            sub_path = f"{path}.{key}" if path else key
            if key in props:
                result[key], more = prune_unknown(props[key], item, sub_path)
            elif isinstance(extra, dict):
                result[key], more = prune_unknown(extra, item, sub_path)
            elif extra is True:
                result[key], more = item, []
            else:
                dropped.append(sub_path)
                continue
            dropped.extend(more)
        return result, dropped
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        result_list = []
        for i, item in enumerate(value):
            pruned, more = prune_unknown(schema["items"], item, f"{path}[{i}]")
            result_list.append(pruned)
            dropped.extend(more)
        return result_list, dropped
    return value, []


def apply_defaults(schema: dict, value: Any) -> Any:
    """Fill in the schema's ``default`` values for absent fields, as the API server does."""
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _to_json_schema(schema: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema draft 4: ``nullable: true`` becomes a "null" type."""
    if isinstance(schema, list):
        return [_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result = {k: _to_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if result.pop("nullable", False) and "type" in result:
        result["type"] = [result["type"], "null"]
    return result


def schema_errors(schema: dict, obj: dict) -> list[tuple[str, str]]:
    """Validate ``obj`` (without metadata) against an openAPIV3Schema: [(field path, message)]."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    top = _to_json_schema(schema)
    top.get("properties", {}).pop("metadata", None)
    validator = jsonschema.Draft4Validator(top)
    found = []
    for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        found.append((path or "<root>", error.message))
    return found


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# --------------------------------------------------------------------------------------------
# Server-side apply and managed fields (pure), for custom resources
#
# A field set is a set of paths; a path is a tuple of fieldsV1 elements: "f:name" for a field of a
# map, 'k:{"pod":"web-1"}' for the item of a list-map (x-kubernetes-list-type: map) with that key,
# "." for the item itself. A scalar, an atomic list (any other list) or an unknown value is a leaf.

MAX_OBJECT_BYTES = 1_572_864  # etcd's default --max-request-bytes; custom resources are stored as JSON
MAX_REQUEST_BYTES = 3_145_728  # the API server's limit on a request body
_MISSING = object()

Path = tuple[str, ...]


def _item_key(item: Any, keys: list[str]) -> str:
    key = {k: item.get(k) for k in keys} if isinstance(item, dict) else {}
    return "k:" + json.dumps(key, separators=(",", ":"))


def _sub_schema(schema: dict | None, field: str) -> dict:
    schema = schema or {}
    props = schema.get("properties") or {}
    if field in props:
        return props[field]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else {}


def field_paths(value: Any, schema: dict | None, prefix: Path = ()) -> set[Path]:
    """Every path ``value`` sets, as the API server's structured-merge-diff counts them."""
    schema = schema or {}
    if isinstance(value, dict) and value and ("properties" in schema or "additionalProperties" in schema
                                              or schema.get("type") == "object" or not schema):
        out: set[Path] = set()
        for key, item in value.items():
            out |= field_paths(item, _sub_schema(schema, key), prefix + (f"f:{key}",))
        return out
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        out = set()
        for item in value:
            element = prefix + (_item_key(item, keys),)
            out.add(element + (".",))
            if isinstance(item, dict):
                for key, sub in item.items():
                    out |= field_paths(sub, _sub_schema(schema.get("items"), key), element + (f"f:{key}",))
        return out
    return {prefix} if prefix else set()


def value_at(obj: Any, path: Path) -> Any:
    for element in path:
        if element == ".":
            return obj
        if element.startswith("f:"):
            if not isinstance(obj, dict) or element[2:] not in obj:
                return _MISSING
            obj = obj[element[2:]]
        else:  # k:{...}
            key = json.loads(element[2:])
            if not isinstance(obj, list):
                return _MISSING
            obj = next((i for i in obj if isinstance(i, dict) and all(i.get(k) == v for k, v in key.items())),
                       _MISSING)
            if obj is _MISSING:
                return _MISSING
    return obj


def remove_path(obj: Any, path: Path) -> None:
    """Delete the field (or list item, for a path ending in ".") at ``path`` from ``obj``."""
    if path and path[-1] == ".":
        parent, element = value_at(obj, path[:-2]), path[-2]
        if isinstance(parent, list):
            key = json.loads(element[2:])
            parent[:] = [i for i in parent if not (isinstance(i, dict) and all(i.get(k) == v for k, v in key.items()))]
        return
    parent = value_at(obj, path[:-1])
    if isinstance(parent, dict) and path and path[-1].startswith("f:"):
        parent.pop(path[-1][2:], None)


def merge_applied(current: Any, applied: Any, schema: dict | None) -> Any:
    """The applied configuration merged into ``current``: maps by key, list-maps by item key, the rest replaced."""
    schema = schema or {}
    if isinstance(applied, dict) and isinstance(current, dict):
        out = copy.deepcopy(current)
        for key, value in applied.items():
            out[key] = merge_applied(current.get(key, _MISSING), value, _sub_schema(schema, key))
        return out
    if isinstance(applied, list) and isinstance(current, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        out_list = copy.deepcopy(current)
        index = {_item_key(i, keys): n for n, i in enumerate(out_list)}
        for item in applied:
            k = _item_key(item, keys)
            if k in index:
                out_list[index[k]] = merge_applied(out_list[index[k]], item, schema.get("items"))
            else:
                index[k] = len(out_list)
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(applied)


def fields_v1(paths: set[Path]) -> dict:
    tree: dict = {}
    for path in sorted(paths):
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    return tree


def paths_of(tree: dict, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for element, sub in (tree or {}).items():
        if sub:
            out |= paths_of(sub, prefix + (element,))
        else:
            out.add(prefix + (element,))
    return out


def show_path(path: Path) -> str:
    """A path as the API server prints it in a conflict: .status.targets[pod="web-1"].phase"""
    out = ""
    for element in path:
        if element.startswith("f:"):
            out += "." + element[2:]
        elif element.startswith("k:"):
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(element[2:]).items()) + "]"
    return out or "."


DIRECT_MANAGER = "fakeapi-test"  # the manager of writes a test makes straight on the store


def _part(obj: dict, subresource: str | None) -> dict:
    """What a write to ``subresource`` sets: the status, or everything but the status and the
    system-owned metadata."""
    if subresource == "status":
        return {"status": obj["status"]} if "status" in obj else {}
    out = {k: v for k, v in obj.items() if k not in ("status", "metadata", "apiVersion", "kind")}
    meta = {k: v for k, v in (obj.get("metadata") or {}).items()
            if k in ("labels", "annotations", "finalizers", "ownerReferences")}
    if meta:
        out["metadata"] = meta
    return out


def _managers(obj: dict | None) -> dict[tuple[str, str, str], set[Path]]:
    return {(e["manager"], e["operation"], e.get("subresource", "")): paths_of(e.get("fieldsV1") or {})
            for e in ((obj or {}).get("metadata") or {}).get("managedFields") or []}


def _managed_fields(managers: dict[tuple[str, str, str], set[Path]], current: dict | None,
                    rtype: ResourceType) -> list[dict]:
    before = _managers(current)
    times = {(e["manager"], e["operation"], e.get("subresource", "")): e.get("time")
             for e in ((current or {}).get("metadata") or {}).get("managedFields") or []}
    out = []
    for key in sorted(managers):
        paths = managers[key]
        if not paths:
            continue
        manager, operation, subresource = key
        entry = {"manager": manager, "operation": operation, "apiVersion": rtype.group_version,
                 "time": times.get(key) if before.get(key) == paths and times.get(key) else _now(),
                 "fieldsType": "FieldsV1", "fieldsV1": fields_v1(paths)}
        if subresource:
            entry["subresource"] = subresource
        out.append(entry)
    return out


def _check_size(obj: dict) -> None:
    if len(json.dumps(obj, separators=(",", ":"))) > MAX_OBJECT_BYTES:
        raise ApiError(500, "InternalError", "etcdserver: request is too large")


# --------------------------------------------------------------------------------------------
# Authorization


@dataclass
class Binding:
    rules: list[dict]
    namespace: str | None  # None: cluster-wide (ClusterRoleBinding)


def rule_allows(rule: dict, verb: str, group: str, resource: str, name: str | None) -> bool:
    def has(key: str, value: str) -> bool:
        items = rule.get(key) or []
        return "*" in items or value in items

    if not has("verbs", verb) or not has("apiGroups", group) or not has("resources", resource):
        return False
    names = rule.get("resourceNames")
    return not names or (name is not None and name in names)


# --------------------------------------------------------------------------------------------
# The store


@dataclass
class _WatchEvent:
    rv: int
    type: str
    key: tuple[str, str, str]  # (group_resource, namespace, name)
    obj: dict
    old: dict | None


@dataclass
class _Request:
    verb: str
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None
    query: dict[str, str]


_FAULT_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


@dataclass
class _Fault:
    """Answer matching requests with ``code`` until ``until_s`` (monotonic) or for ``times`` more requests."""

    code: int
    verbs: frozenset[str]
    until_s: float | None = None
    times: int | None = None
    user: str | None = None
    resources: frozenset[str] | None = None  # group_resource ("resourcechaos.kubectl-chaos.io", "pods")
    hits: int = 0

    def matches(self, user: str, r: _Request) -> bool:
        if self.until_s is not None and time.monotonic() >= self.until_s:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        return r.verb in self.verbs and (self.user is None or user == self.user) and \
            (self.resources is None or r.rtype.group_resource in self.resources)

    def error(self, r: _Request) -> ApiError:
        what = f'{r.rtype.group_resource} "{r.name or ""}"'
        if self.code == 409:
            return ApiError(409, "Conflict", f"Operation cannot be fulfilled on {what}: the object has been modified; "
                            "please apply your changes to the latest version and try again",
                            {"name": r.name or "", "group": r.rtype.group, "kind": r.rtype.plural})
        reason = _FAULT_REASONS.get(self.code, "InternalError")
        return ApiError(self.code, reason, f"injected fault: {reason} on {r.verb} {what}")


@dataclass
class RequestRecord:
    """One request as the server saw it, for tests that assert what a client sent."""

    method: str
    path: str
    user: str | None
    code: int
    content_type: str = ""
    at_s: float = field(default_factory=time.monotonic)  # when the answer went out


class FakeKubeAPI:
    """The server. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, *, admin_token: str = "admin-token", watch_history: int = WATCH_HISTORY, tls: bool = True):
        self.tls = tls
        self.ca_pem = b""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._types: dict[tuple[str, str], ResourceType] = {}
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._rv = 100
        self._history: list[_WatchEvent] = []
        self._history_limit = watch_history
        self._compacted_rv = self._rv
        self._tokens: dict[str, str] = {admin_token: "admin"}
        self._superusers = {"admin"}
        self._bindings: dict[str, list[Binding]] = {}
        self.admin_token = admin_token
        self.requests: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self._watch_epoch = 0  # bumped by expire_watches(): open streams end with a 410
        self._stopping = False
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for rtype in _CORE_TYPES:
            self._types[(rtype.group, rtype.plural)] = rtype
        for ns in ("default", "kube-system"):
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeKubeAPI:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        if self.tls:
            # Over TLS, as a real API server: client-go (kubectl) sends no bearer token over plain HTTP.
            cert_path, key_path = _self_signed_certificate()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_path, key_path)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            with open(cert_path, "rb") as f:
                self.ca_pem = f.read()
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    # -- users, RBAC, kubeconfig -----------------------------------------------------------------

    def add_user(self, user: str, token: str | None = None, *, superuser: bool = False) -> str:
        token = token or f"{user}-token-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._tokens[token] = user
            if superuser:
                self._superusers.add(user)
        return token

    def bind(self, user: str, role: dict | list[dict], namespace: str | None = None) -> None:
        """Grant a Role/ClusterRole (a manifest dict) or a list of PolicyRules to ``user``."""
        rules = role.get("rules", []) if isinstance(role, dict) else role
        with self._lock:
            self._bindings.setdefault(user, []).append(Binding(copy.deepcopy(rules), namespace))

    def kubeconfig(self, users: Iterable[tuple[str, str]] | None = None, *, namespace: str = "default",
                   current: str | None = None) -> dict:
        """A kubeconfig with one context per (user, token); context names are the user names."""
        users = list(users or [("admin", self.admin_token)])
        return {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url, **(
                {"certificate-authority-data": base64.b64encode(self.ca_pem).decode()} if self.tls else {})}}],
            "users": [{"name": u, "user": {"token": t}} for u, t in users],
            "contexts": [{"name": u, "context": {"cluster": "fake", "user": u, "namespace": namespace}}
                         for u, _ in users],
            "current-context": current or users[0][0],
        }

    def write_kubeconfig(self, path, users: Iterable[tuple[str, str]] | None = None, **kwargs) -> str:
        with open(path, "w") as f:
            yaml.safe_dump(self.kubeconfig(users, **kwargs), f)
        return str(path)

    def authorize(self, user: str, verb: str, rtype: ResourceType, namespace: str | None,
                  name: str | None, subresource: str | None) -> bool:
        if user in self._superusers:
            return True
        resource = f"{rtype.plural}/{subresource}" if subresource else rtype.plural
        for binding in self._bindings.get(user, []):
            if binding.namespace is not None and binding.namespace != namespace:
                continue
            if any(rule_allows(r, verb, rtype.group, resource, name) for r in binding.rules):
                return True
        return False

    # -- seeding what a cluster has --------------------------------------------------------------

    def add_namespace(self, name: str, *, labels: dict | None = None, annotations: dict | None = None) -> dict:
        """A Namespace; ``labels={"kubectl-chaos.io/enabled": "true"}`` is the admin's opt-in."""
        meta: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}}
        if annotations:
            meta["annotations"] = dict(annotations)
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})

    def add_node(self, name: str, *, cpu: str = "2", memory: str = "8Gi") -> dict:
        """A Node as a kubelet registers it, with its allocatable CPU and memory."""
        return self.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
                       "capacity": {"cpu": cpu, "memory": memory, "pods": "110"}}})

    # -- types -----------------------------------------------------------------------------------

    def install_crd(self, crd: dict) -> ResourceType:
        """Register the custom resource a CustomResourceDefinition manifest describes."""
        spec = crd["spec"]
        names = spec["names"]
        version = next(v for v in spec["versions"] if v.get("storage", True))
        rtype = ResourceType(
            group=spec["group"], version=version["name"], plural=names["plural"], kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            singular=names.get("singular", names["kind"].lower()),
            short_names=tuple(names.get("shortNames", [])),
            status_subresource="status" in (version.get("subresources") or {}),
            custom=True, schema=version["schema"]["openAPIV3Schema"],
            printer_columns=tuple(version.get("additionalPrinterColumns", [])),
        )
        with self._lock:
            self._types[(rtype.group, rtype.plural)] = rtype
        return rtype

    def resource_type(self, group: str, plural: str) -> ResourceType:
        try:
            return self._types[(group, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", "the server could not find the requested resource") from None

    def _type_of(self, obj: dict) -> ResourceType:
        api_version = obj.get("apiVersion", "")
        group = api_version.rpartition("/")[0]
        for rtype in self._types.values():
            if rtype.group == group and rtype.kind == obj.get("kind"):
                return rtype
        raise ApiError(400, "BadRequest", f"no kind {obj.get('kind')!r} is registered for version {api_version!r}")

    # -- storage operations (used by the HTTP layer and directly by tests) ------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, type_: str, key, obj: dict, old: dict | None) -> None:
        self._history.append(_WatchEvent(int(obj["metadata"]["resourceVersion"]), type_, key,
                                         copy.deepcopy(obj), copy.deepcopy(old) if old else None))
        if len(self._history) > self._history_limit:
            drop = len(self._history) - self._history_limit
            self._compacted_rv = self._history[drop - 1].rv
            del self._history[:drop]
        self._changed.notify_all()

    # -- fault injection -------------------------------------------------------------------------

    def fail_writes(self, code: int = 409, *, seconds: float | None = None, times: int | None = None,
                    user: str | None = None, resources: Iterable[str] | None = None,
                    verbs: Iterable[str] = ("create", "update", "patch", "delete")) -> None:
        """Answer writes over HTTP with ``code`` (409 Conflict, 429, 500, 503) for ``seconds``, or for
        the next ``times`` matching requests, or until ``clear_faults()``. ``user`` and ``resources``
        (group_resource names, e.g. "pods") narrow it. The store is not changed by a refused write."""
        fault = _Fault(code, frozenset(verbs), None if seconds is None else time.monotonic() + seconds, times, user,
                       None if resources is None else frozenset(resources))
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def injected(self) -> int:
        """How many requests the faults have answered so far."""
        with self._lock:
            return sum(f.hits for f in self._faults)

    def _fault_for(self, user: str, r: _Request) -> ApiError | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(user, r):
                    fault.hits += 1
                    return fault.error(r)
        return None

    def expire_watches(self) -> int:
        """Compact the history (older resource versions get 410) and end every open watch now, in the
        middle of its stream, with an ERROR event carrying 410 Gone. Returns the compacted version."""
        with self._lock:
            self._watch_epoch += 1
            rv = self.compact()
            self._changed.notify_all()
            return rv

    def compact(self) -> int:
        """Forget the watch history (like etcd compaction): older resource versions get 410 Gone."""
        with self._lock:
            self._history.clear()
            self._compacted_rv = self._rv
            return self._rv

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        with self._lock:
            obj = self._objects.get((rtype.group_resource, namespace or "", name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{rtype.group_resource} "{name}" not found',
                               {"name": name, "group": rtype.group, "kind": rtype.plural})
            return copy.deepcopy(obj)

    def list(self, rtype: ResourceType, namespace: str | None, label_selector: str = "",
             field_selector: str = "") -> tuple[list[dict], int]:
        labels, fields = self._selectors(rtype, label_selector, field_selector)
        with self._lock:
            items = [copy.deepcopy(o) for (gr, ns, _), o in sorted(self._objects.items())
                     if gr == rtype.group_resource and (namespace is None or ns == namespace)
                     and selector_matches(o, labels, fields)]
            return items, self._rv

    def _selectors(self, rtype: ResourceType, label_selector: str, field_selector: str):
        try:
            return (parse_label_selector(label_selector),
                    parse_field_selector(field_selector, rtype.field_labels))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None

    def create(self, obj: dict, namespace: str | None = None, *, field_validation: str = "",
               warnings: list[str] | None = None, dry_run: bool = False, keep_uid: bool = False,
               manager: str = DIRECT_MANAGER) -> dict:
        """Create ``obj``. ``keep_uid`` (tests seeding pods that mirror real ones) keeps its uid."""
        rtype = self._type_of(obj)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if rtype.namespaced:
            namespace = namespace or meta.get("namespace") or "default"
            if meta.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                                                  "the namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise self._invalid(rtype, "", [("metadata.name", "Required value: name or generateName is required")])
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise self._invalid(rtype, name, [("metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 '
                                                                "subdomain must consist of lower case alphanumeric "
                                                                "characters, '-' or '.'")])
        if rtype.status_subresource and rtype.custom:
            obj.pop("status", None)
        obj = self._admit(rtype, obj, field_validation, warnings)
        with self._lock:
            key = (rtype.group_resource, namespace or "", name)
            if key in self._objects:
                raise ApiError(409, "AlreadyExists", f'{rtype.group_resource} "{name}" already exists',
                               {"name": name, "group": rtype.group, "kind": rtype.plural})
            if namespace and (rtype.plural != "events") and \
                    ("namespaces", "", namespace) not in self._objects:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            uid = meta.get("uid") if keep_uid and meta.get("uid") else str(uuid.uuid4())
            meta.update(uid=uid, creationTimestamp=_now())
            meta.pop("deletionTimestamp", None)
            if rtype.custom:
                meta["generation"] = 1
                meta.pop("managedFields", None)
                self._track_update(rtype, None, obj, None, manager)
            _check_size(obj)
            if dry_run:
                return copy.deepcopy(obj)
            meta["resourceVersion"] = str(self._next_rv())
            self._objects[key] = obj
            self._record("ADDED", key, obj, None)
            return copy.deepcopy(obj)

    def _admit(self, rtype: ResourceType, obj: dict, field_validation: str,
               warnings: list[str] | None) -> dict:
        if not rtype.custom or rtype.schema is None:
            return obj
        meta = obj.pop("metadata")
        pruned, dropped = prune_unknown(rtype.schema, obj)
        if dropped:
            if field_validation == "Strict":
                raise ApiError(400, "BadRequest", "strict decoding error: "
                               + ", ".join(f'unknown field "{d}"' for d in dropped))
            if warnings is not None:
                warnings.extend(f'unknown field "{d}"' for d in dropped)
        pruned = apply_defaults(rtype.schema, pruned)
        pruned["metadata"] = meta
        errors = schema_errors(rtype.schema, pruned)
        if errors:
            raise self._invalid(rtype, meta.get("name", ""), errors)
        return pruned

    @staticmethod
    def _invalid(rtype: ResourceType, name: str, errors: list[tuple[str, str]]) -> ApiError:
        causes = [{"reason": "FieldValueInvalid", "message": f"{path}: {msg}", "field": path}
                  for path, msg in errors]
        listed = ", ".join(c["message"] for c in causes)
        text = f"[{listed}]" if len(causes) > 1 else listed
        kind = f"{rtype.kind}.{rtype.group}" if rtype.group else rtype.kind
        return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {text}',
                        {"name": name, "group": rtype.group, "kind": rtype.kind, "causes": causes})

    def update(self, rtype: ResourceType, namespace: str | None, name: str, obj: dict,
               subresource: str | None = None, *, require_rv: bool = True, field_validation: str = "",
               warnings: list[str] | None = None, dry_run: bool = False, manager: str = DIRECT_MANAGER,
               managed: bool = False) -> dict:
        """Replace the object (or its status). ``manager`` owns the fields it changes (operation
        Update); ``managed``: ``obj`` carries the managed fields already (a server-side apply)."""
        with self._lock:
            key = (rtype.group_resource, namespace or "", name)
            current = self._objects.get(key)
            if current is None:
                raise ApiError(404, "NotFound", f'{rtype.group_resource} "{name}" not found',
                               {"name": name, "group": rtype.group, "kind": rtype.plural})
            meta = obj.get("metadata") or {}
            if meta.get("name", name) != name:
                raise ApiError(400, "BadRequest", "the name of the object "
                               f"({meta.get('name')}) does not match the name on the URL ({name})")
            want_rv = meta.get("resourceVersion")
            if not want_rv and require_rv and rtype.custom:
                raise self._invalid(rtype, name, [("metadata.resourceVersion",
                                                   "Invalid value: 0x0: must be specified for an update")])
            if want_rv and want_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.group_resource} '
                               f'"{name}": the object has been modified; please apply your changes to the '
                               "latest version and try again",
                               {"name": name, "group": rtype.group, "kind": rtype.plural})
            if subresource == "status":
                new = copy.deepcopy(current)
                if "status" in obj:
                    new["status"] = copy.deepcopy(obj["status"])
                else:
                    new.pop("status", None)
            elif subresource == "resize" and rtype.plural == "pods":
                # In-place resize (KEP-1287): only the containers' resources change; the kubelet acts on it.
                new = copy.deepcopy(current)
                asked = {c.get("name"): c for c in (obj.get("spec") or {}).get("containers") or []}
                for container in new["spec"].get("containers") or []:
                    if container.get("name") in asked:
                        resources = asked[container["name"]].get("resources")
                        if resources:
                            container["resources"] = copy.deepcopy(resources)
                        else:
                            container.pop("resources", None)
            elif subresource is not None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({subresource})")
            else:
                new = copy.deepcopy(obj)
                new.setdefault("apiVersion", current["apiVersion"])
                new.setdefault("kind", current["kind"])
                if rtype.status_subresource:
                    if "status" in current:
                        new["status"] = copy.deepcopy(current["status"])
                    else:
                        new.pop("status", None)
                new_meta = new.setdefault("metadata", {})
                for immutable in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                                  "generation"):
                    if immutable in current["metadata"]:
                        new_meta[immutable] = current["metadata"][immutable]
                    else:
                        new_meta.pop(immutable, None)
                if current["metadata"].get("deletionTimestamp"):
                    added = set(new_meta.get("finalizers") or []) - set(current["metadata"].get("finalizers") or [])
                    if added:
                        raise ApiError(422, "Invalid", f'{rtype.group_resource} "{name}" is being deleted: '
                                       f"no new finalizers can be added: {sorted(added)}")
            new = self._admit(rtype, new, field_validation, warnings)
            if rtype.custom:
                if managed:
                    new["metadata"]["managedFields"] = copy.deepcopy(obj["metadata"].get("managedFields") or [])
                else:
                    new["metadata"]["managedFields"] = copy.deepcopy(current["metadata"].get("managedFields") or [])
                    self._track_update(rtype, current, new, subresource, manager)
            if new == current or dry_run:
                return copy.deepcopy(new)
            _check_size(new)
            if rtype.custom and {k: v for k, v in new.items() if k not in ("metadata", "status")} != \
                    {k: v for k, v in current.items() if k not in ("metadata", "status")}:
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                return self._remove(key, new)
            self._objects[key] = new
            self._record("MODIFIED", key, new, current)
            return copy.deepcopy(new)

    def patch(self, rtype: ResourceType, namespace: str | None, name: str, patch: Any, content_type: str,
              subresource: str | None = None, *, force: bool = False, **kwargs) -> dict:
        kind = content_type.split(";")[0].strip()
        if kind == "application/apply-patch+yaml":
            return self.apply(rtype, namespace, name, patch, subresource, force=force, **kwargs)
        if kind == "application/strategic-merge-patch+json" and rtype.custom:
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json-patch+json, "
                           "application/merge-patch+json, application/apply-patch+yaml")
        if kind not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"the fake API server does not support {kind!r} patches")
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        with self._lock:
            current = self.get(rtype, namespace, name)
            merged = merge_patch(current, patch) if kind == "application/merge-patch+json" \
                else strategic_merge_patch(current, patch)
            want_rv = (patch.get("metadata") or {}).get("resourceVersion")
            merged["metadata"]["resourceVersion"] = want_rv or current["metadata"]["resourceVersion"]
            return self.update(rtype, namespace, name, merged, subresource, **kwargs)

    # -- server-side apply --------------------------------------------------------------------------

    def apply(self, rtype: ResourceType, namespace: str | None, name: str, applied: Any,
              subresource: str | None = None, *, manager: str = "", force: bool = False, **kwargs) -> dict:
        """Server-side apply of ``applied`` (a partial object) by field manager ``manager``.

        As the API server: a field another manager owns with another value is a conflict (409,
        every conflicting field and manager named) unless ``force`` (then it changes hands); the
        same value is shared ownership; fields this manager applied before and applies no more are
        removed unless another manager owns them; list-maps merge by their keys. Only existing
        custom resources (the status subresource, or the object itself)."""
        if not rtype.custom:
            raise ApiError(415, "UnsupportedMediaType", "the fake API server applies custom resources only")
        if not manager:
            raise ApiError(400, "BadRequest", "PATCH, application/apply-patch+yaml: fieldManager is required for "
                           "apply requests")
        if not isinstance(applied, dict):
            raise ApiError(400, "BadRequest", "an apply patch must be an object")
        if applied.get("apiVersion") != rtype.group_version or applied.get("kind") != rtype.kind:
            raise ApiError(400, "BadRequest", f"apiVersion and kind must be {rtype.group_version} and {rtype.kind}, "
                           f"got {applied.get('apiVersion')!r} and {applied.get('kind')!r}")
        if (applied.get("metadata") or {}).get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name in the apply patch does not match the name on the URL")
        with self._lock:
            try:
                current = self.get(rtype, namespace, name)
            except ApiError as e:
                if e.code != 404 or subresource is not None:
                    raise
                # Apply creates what does not exist yet; the applier owns every field it set.
                body = copy.deepcopy(applied)
                body.setdefault("metadata", {})["name"] = name
                created = self.create(body, namespace, manager=manager, **{
                    k: v for k, v in kwargs.items() if k in ("field_validation", "warnings", "dry_run")})
                paths = field_paths(_part(created, None), rtype.schema)
                created["metadata"]["managedFields"] = _managed_fields({(manager, "Apply", ""): paths}, None, rtype)
                if not kwargs.get("dry_run"):
                    self._objects[(rtype.group_resource, namespace or "", name)]["metadata"]["managedFields"] = \
                        copy.deepcopy(created["metadata"]["managedFields"])
                return created
            part = _part(applied, subresource)
            wanted = field_paths(part, rtype.schema)
            managers = _managers(current)
            me = (manager, "Apply", subresource or "")
            conflicts = []
            for other, paths in managers.items():
                if other == me:
                    continue
                for path in sorted(wanted & paths):
                    if path[-1] != "." and value_at(current, path) not in (_MISSING, value_at(applied, path)):
                        conflicts.append((other, path))
            if conflicts and not force:
                causes = [{"reason": "FieldManagerConflict", "message": f'conflict with "{m}"', "field": show_path(p)}
                          for (m, _, _), p in conflicts]
                listed = "\n".join(f"- {c['message']}: {c['field']}" for c in causes)
                raise ApiError(409, "Conflict", f"Apply failed with {len(causes)} conflict"
                               f"{'s' if len(causes) > 1 else ''}: {listed}",
                               {"name": name, "group": rtype.group, "kind": rtype.plural, "causes": causes})
            for other, path in conflicts:
                managers[other].discard(path)
            merged = merge_applied(current, part, rtype.schema)
            others = set().union(*(paths for m, paths in managers.items() if m != me))
            # Whole list items first (deepest first), then single fields: a field of an item another
            # manager keeps is removed on its own, but never a field of the item's key.
            for path in sorted(managers.get(me, set()) - wanted, key=lambda p: (p[-1] != ".", -len(p))):
                if path in others or path[-1] == "." and any(q[:len(path) - 1] == path[:-1] for q in others):
                    continue  # another manager still holds it (or a part of that list item)
                if len(path) >= 2 and path[-2].startswith("k:") and path[-1][2:] in json.loads(path[-2][2:]):
                    continue
                remove_path(merged, path)
            managers[me] = wanted
            merged["metadata"]["managedFields"] = _managed_fields(managers, current, rtype)
            want_rv = (applied.get("metadata") or {}).get("resourceVersion")
            merged["metadata"]["resourceVersion"] = want_rv or current["metadata"]["resourceVersion"]
            kwargs.pop("require_rv", None)
            return self.update(rtype, namespace, name, merged, subresource, require_rv=False, managed=True, **kwargs)

    def _track_update(self, rtype: ResourceType, current: dict | None, new: dict, subresource: str | None,
                      manager: str) -> None:
        """Managed fields after a create or update by ``manager``: the fields whose value it changed
        become its own (taken from any other manager); fields it removed are no one's."""
        old_part, new_part = _part(current or {}, subresource), _part(new, subresource)
        new_paths = field_paths(new_part, rtype.schema)
        old_paths = field_paths(old_part, rtype.schema)
        changed = {p for p in new_paths if (value_at(old_part, p) is _MISSING if p[-1] == "." else
                                            value_at(old_part, p) != value_at(new_part, p))}
        managers = _managers(current) if current is not None else {}
        for paths in managers.values():
            paths -= changed | (old_paths - new_paths)
        key = (manager, "Update", subresource or "")
        managers[key] = managers.get(key, set()) | changed
        new["metadata"]["managedFields"] = _managed_fields(managers, current, rtype)

    def delete(self, rtype: ResourceType, namespace: str | None, name: str,
               preconditions: dict | None = None) -> dict:
        with self._lock:
            key = (rtype.group_resource, namespace or "", name)
            current = self.get(rtype, namespace, name)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != current["metadata"]["uid"] or \
                    pre.get("resourceVersion") and pre["resourceVersion"] != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": '
                               "Precondition failed")
            if current["metadata"].get("finalizers"):
                if current["metadata"].get("deletionTimestamp"):
                    return current
                current["metadata"]["deletionTimestamp"] = _now()
                current["metadata"]["deletionGracePeriodSeconds"] = 0
                current["metadata"]["resourceVersion"] = str(self._next_rv())
                old = self._objects[key]
                self._objects[key] = current
                self._record("MODIFIED", key, current, old)
                return copy.deepcopy(current)
            current["metadata"]["resourceVersion"] = str(self._next_rv())
            return self._remove(key, current)

    def _remove(self, key, obj: dict) -> dict:
        old = self._objects.pop(key)
        self._record("DELETED", key, obj, old)
        self._collect_garbage()
        return copy.deepcopy(obj)

    def _collect_garbage(self) -> None:
        """Delete dependents whose owners are all gone (the garbage collector, synchronously)."""
        live_uids = {o["metadata"]["uid"] for o in self._objects.values()}
        for (gr, ns, name), obj in list(self._objects.items()):
            owners = obj["metadata"].get("ownerReferences") or []
            if owners and not any(o.get("uid") in live_uids for o in owners):
                rtype = next(t for t in self._types.values() if t.group_resource == gr)
                if (gr, ns, name) in self._objects and not obj["metadata"].get("deletionTimestamp"):
                    self.delete(rtype, ns or None, name)

    # -- watch -----------------------------------------------------------------------------------

    def watch_events(self, rtype: ResourceType, namespace: str | None, resource_version: str,
                     label_selector: str, field_selector: str, timeout_s: float) -> Iterator[dict]:
        """Watch events (dicts) from ``resource_version`` on, until the timeout or ``stop()``.

        Bad selectors and versions raise ApiError here, before the stream (and its 200) starts.
        """
        labels, fields = self._selectors(rtype, label_selector, field_selector)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            epoch = self._watch_epoch
            if resource_version in ("", "0"):
                # "Start at most recent": the current objects as ADDED events, then changes.
                items, last = self.list(rtype, namespace, label_selector, field_selector)
                initial = [{"type": "ADDED", "object": o} for o in items]
            else:
                try:
                    last = int(resource_version)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resource version: {resource_version!r}") from None
                initial = []
                if last < self._compacted_rv:
                    # The real server answers 200 and then an ERROR event carrying the 410.
                    gone = ApiError(410, "Expired", f"too old resource version: {last} ({self._compacted_rv})")
                    return iter([{"type": "ERROR", "object": gone.status()}])

        def visible(obj: dict | None) -> bool:
            if obj is None:
                return False
            ns = obj["metadata"].get("namespace")
            return (namespace is None or ns == namespace) and selector_matches(obj, labels, fields)

        def stream(last: int) -> Iterator[dict]:
            yield from initial
            while True:
                with self._lock:
                    if self._watch_epoch != epoch:
                        gone = ApiError(410, "Expired", f"too old resource version: {last} ({self._compacted_rv})")
                        yield {"type": "ERROR", "object": gone.status()}
                        return
                    pending = [e for e in self._history if e.rv > last and e.key[0] == rtype.group_resource]
                    if not pending:
                        remaining = deadline - time.monotonic()
                        if self._stopping or remaining <= 0:
                            return
                        self._changed.wait(min(remaining, 0.5))
                        continue
                for event in pending:
                    last = event.rv
                    was, now = visible(event.old), visible(event.obj)
                    if event.type == "DELETED":
                        type_ = "DELETED" if was else None
                    elif now and not was:
                        type_ = "ADDED"  # moved into the selector
                    elif was and not now:
                        type_ = "DELETED"  # moved out of it
                    else:
                        type_ = event.type if now else None
                    if type_:
                        yield {"type": type_, "object": event.obj}

        return stream(last)

    # -- discovery -------------------------------------------------------------------------------

    def api_resource_list(self, group: str, version: str) -> dict:
        resources = []
        for rtype in self._types.values():
            if rtype.group != group or rtype.version != version:
                continue
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append({"name": rtype.plural, "singularName": rtype.singular, "namespaced": rtype.namespaced,
                              "kind": rtype.kind, "verbs": verbs, "shortNames": list(rtype.short_names)})
            if rtype.status_subresource:
                resources.append({"name": f"{rtype.plural}/status", "singularName": "", "namespaced": rtype.namespaced,
                                  "kind": rtype.kind, "verbs": ["get", "patch", "update"]})
            if rtype.plural == "pods":
                resources.append({"name": "pods/resize", "singularName": "", "namespaced": True, "kind": "Pod",
                                  "verbs": ["get", "patch", "update"]})
        if not resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}".lstrip("/"),
                "resources": resources}

    def api_groups(self) -> dict:
        groups = sorted({(t.group, t.version) for t in self._types.values() if t.group})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
             "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}

    def table(self, rtype: ResourceType, items: list[dict], rv: int) -> dict:
        """The server-side printing kubectl asks for: NAME, the CRD's printer columns, AGE."""
        columns = [{"name": "Name", "type": "string", "format": "name", "description": "name", "priority": 0}]
        for col in rtype.printer_columns:
            columns.append({"name": col["name"], "type": col.get("type", "string"), "format": col.get("format", ""),
                            "description": col.get("description", ""), "priority": col.get("priority", 0)})
        if not any(c["jsonPath"] == ".metadata.creationTimestamp" for c in rtype.printer_columns):
            columns.append({"name": "Age", "type": "date", "format": "", "description": "age", "priority": 0})
        rows = []
        for obj in items:
            cells = [obj["metadata"]["name"]]
            for col in rtype.printer_columns:
                value = json_path(obj, col["jsonPath"])
                # The server prints date columns as ages ("12s", "5m"), as kubectl shows them.
                cells.append(_age(value) if col.get("type") == "date" and value else value)
            if len(cells) < len(columns):
                cells.append(_age(obj["metadata"].get("creationTimestamp")))
            rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                    "metadata": obj["metadata"]}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(rv)},
                "columnDefinitions": columns, "rows": rows}


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds())
    if seconds < -1:
        return "<invalid>"  # as the API server prints a date in the future
    seconds = max(seconds, 0)
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def json_path(obj: Any, path: str) -> Any:
    """The subset of JSONPath printer columns use: ``.a.b``, ``.a[0].b``, ``.a[*].b`` (joined)."""
    values = [obj]
    for part in re.findall(r"\.([A-Za-z0-9_-]+)|\[(\*|\d+)\]", path):
        name, index = part
        nxt = []
        for value in values:
            if name:
                if isinstance(value, dict) and name in value:
                    nxt.append(value[name])
            elif isinstance(value, list):
                nxt.extend(value if index == "*" else value[int(index):int(index) + 1])
        values = nxt
    if not values:
        return None
    if len(values) == 1 and "[*]" not in path:
        return values[0]
    return ",".join(str(v) for v in values)


# --------------------------------------------------------------------------------------------
# HTTP


_VERB_BY_METHOD = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class _Handler(http.server.BaseHTTPRequestHandler):
    api: FakeKubeAPI
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as Go's net package sets on every connection of a real API server. Without it a
    # response written as headers then body waits ~40 ms on a kept-alive connection (Nagle against
    # the client's delayed ACK), which no real server shows.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def do_PUT(self):
        self._serve()

    def do_PATCH(self):
        self._serve()

    def do_DELETE(self):
        self._serve()

    # ---------------------------------------------------------------------------------------------

    def _serve(self) -> None:
        api = self.api
        parsed = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        user = None
        try:
            user = self._authenticate()
            if self.command == "GET" and (body := self._discovery(parsed.path)) is not None:
                return self._send(200, body, user)
            request = self._route(parsed.path, query)
            if not api.authorize(user, request.verb, request.rtype, request.namespace, request.name,
                                 request.subresource):
                raise self._forbidden(user, request)
            if (fault := api._fault_for(user, request)) is not None:
                raise fault
            if request.verb == "watch":
                return self._watch(request, user)
            if length > MAX_REQUEST_BYTES:
                raise ApiError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_REQUEST_BYTES}")
            if raw and self.headers.get("Content-Type", "").startswith("application/apply-patch+yaml"):
                try:
                    body = yaml.safe_load(raw)
                except yaml.YAMLError as e:
                    raise ApiError(400, "BadRequest", f"invalid YAML body: {e}") from None
            else:
                body = json.loads(raw) if raw else None
            warnings: list[str] = []
            result = self._dispatch(request, body, warnings)
            return self._send(201 if request.verb == "create" else 200, result, user, warnings)
        except ApiError as e:
            return self._send(e.code, e.status(), user)
        except json.JSONDecodeError as e:
            return self._send(400, ApiError(400, "BadRequest", f"invalid JSON body: {e}").status(), user)

    def _authenticate(self) -> str:
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        user = self.api._tokens.get(token)
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    @staticmethod
    def _forbidden(user: str, r: _Request) -> ApiError:
        resource = f"{r.rtype.plural}/{r.subresource}" if r.subresource else r.rtype.plural
        what = f'{r.rtype.group_resource} "{r.name}"' if r.name else r.rtype.group_resource
        where = f' in the namespace "{r.namespace}"' if r.namespace else " at the cluster scope"
        return ApiError(403, "Forbidden", f'{what} is forbidden: User "{user}" cannot {r.verb} resource '
                        f'"{resource}" in API group "{r.rtype.group}"{where}',
                        {"name": r.name or "", "group": r.rtype.group, "kind": r.rtype.plural})

    def _discovery(self, path: str) -> dict | None:
        api = self.api
        path = path.rstrip("/")
        if path == "/version":
            return {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if path == "/api/v1":
            return api.api_resource_list("", "v1")
        if path == "/apis":
            return api.api_groups()
        parts = path.split("/")[2:] if path.startswith("/apis/") else None
        if parts and len(parts) == 1:
            groups = [g for g in api.api_groups()["groups"] if g["name"] == parts[0]]
            if not groups:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIGroup", "apiVersion": "v1", **groups[0]}
        if parts and len(parts) == 2:
            return api.api_resource_list(parts[0], parts[1])
        return None

    def _route(self, path: str, query: dict[str, str]) -> _Request:
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rtype = self.api.resource_type(group, rest[0])
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if rtype.namespaced is False and namespace is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rtype.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if subresource == "resize" and rtype.plural == "pods" and self.command in ("GET", "PATCH", "PUT"):
            pass
        elif subresource not in (None, "status") or (subresource and not rtype.status_subresource):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        verb = _VERB_BY_METHOD[self.command]
        if self.command == "GET" and name is None:
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
        if self.command == "POST" and name is not None:
            raise ApiError(405, "MethodNotAllowed", "POST to an object is not allowed")
        if self.command in ("PUT", "PATCH", "DELETE") and name is None:
            raise ApiError(405, "MethodNotAllowed", f"{self.command} on a collection is not supported here")
        return _Request(verb, rtype, namespace, name, subresource, query)

    def _dispatch(self, r: _Request, body: Any, warnings: list[str]) -> dict:
        api, q = self.api, r.query
        validation = q.get("fieldValidation", "")
        # As the API server: fieldManager, else the client's user agent up to its first "/".
        manager = q.get("fieldManager") or (self.headers.get("User-Agent") or "unknown").split("/")[0]
        if r.verb == "get":
            obj = api.get(r.rtype, r.namespace, r.name)
            if "as=Table" in (self.headers.get("Accept") or ""):
                return api.table(r.rtype, [obj], int(obj["metadata"]["resourceVersion"]))
            return obj
        if r.verb == "list":
            items, rv = api.list(r.rtype, r.namespace, q.get("labelSelector", ""), q.get("fieldSelector", ""))
            if "as=Table" in (self.headers.get("Accept") or ""):
                return api.table(r.rtype, items, rv)
            for item in items:
                item.setdefault("apiVersion", r.rtype.group_version)
                item.setdefault("kind", r.rtype.kind)
            return {"apiVersion": r.rtype.group_version, "kind": f"{r.rtype.kind}List",
                    "metadata": {"resourceVersion": str(rv)}, "items": items}
        if body is None and r.verb in ("create", "update", "patch"):
            raise ApiError(400, "BadRequest", "the request body is empty")
        dry_run = q.get("dryRun") == "All"
        if q.get("dryRun") not in (None, "All"):
            raise ApiError(400, "BadRequest", f"unsupported dryRun value {q.get('dryRun')!r}; accepted: All")
        if r.verb == "create":
            body.setdefault("apiVersion", r.rtype.group_version)
            body.setdefault("kind", r.rtype.kind)
            if body.get("kind") != r.rtype.kind:
                raise ApiError(400, "BadRequest", f"the kind {body.get('kind')!r} does not match {r.rtype.kind!r}")
            return api.create(body, r.namespace, field_validation=validation, warnings=warnings, dry_run=dry_run,
                              manager=manager)
        if r.verb == "update":
            return api.update(r.rtype, r.namespace, r.name, body, r.subresource, field_validation=validation,
                              warnings=warnings, dry_run=dry_run, manager=manager)
        if r.verb == "patch":
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("application/apply-patch+yaml"):
                if not q.get("fieldManager"):
                    manager = ""  # required for apply: no user-agent default
                if q.get("force") not in (None, "true", "false"):
                    raise ApiError(400, "BadRequest", f"invalid force value {q.get('force')!r}")
            return api.patch(r.rtype, r.namespace, r.name, body, content_type, r.subresource, require_rv=False,
                             field_validation=validation, warnings=warnings, dry_run=dry_run, manager=manager,
                             force=q.get("force") == "true")
        if r.subresource:
            raise ApiError(405, "MethodNotAllowed", "DELETE on a subresource is not allowed")
        if dry_run:
            return api.get(r.rtype, r.namespace, r.name)
        return api.delete(r.rtype, r.namespace, r.name, (body or {}).get("preconditions"))

    def _watch(self, r: _Request, user: str) -> None:
        q = r.query
        timeout_s = float(q.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_S)
        events = self.api.watch_events(r.rtype, r.namespace, q.get("resourceVersion", ""),
                                       q.get("labelSelector", ""), q.get("fieldSelector", ""), timeout_s)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.api.requests.append(RequestRecord("WATCH", self.path, user, 200))
        try:
            for event in events:
                self._chunk(event)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ssl.SSLError):  # the client went away (closed its watch)
            pass
        self.close_connection = True

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send(self, code: int, body: dict, user: str | None, warnings: list[str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.api.requests.append(RequestRecord(self.command, self.path, user, code,
                                               self.headers.get("Content-Type", "")))
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for warning in warnings or []:
            self.send_header("Warning", f'299 - "{warning}"')
        self.end_headers()
        self.wfile.write(data)
