"""Cluster mode for stepped profiles and top (#13), and the status pruning of #11, as pure code:
``spec.profile`` rows refused by the CRD's schema and by the agent with the row and what is accepted,
the steps handed to the engine, the raise policy over every step, the status following the engine's
steps, entries of gone pods pruned, and the watch-until mark of ``top``."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from daemonset import crd, watch
from daemonset import policy as pol
from daemonset import reconcile as rc
from daemonset.types import (
    Changes,
    ExperimentInfo,
    Method,
    Owner,
    OwnerKind,
    Phase,
    ResolvedTarget,
    Resource,
    ResourceResult,
    StepSpec,
)
from tests.support.fakeapi import apply_defaults, prune_unknown, schema_errors

CRD = yaml.safe_load((pathlib.Path(__file__).resolve().parents[2] / "daemonset/manifests/crd.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
NODE = "n1"
NOW = 2_000_000_000.0
POLICY = pol.Policy({"metadata": {"name": "shop", "labels": {pol.ENABLED_LABEL: "true"}}},
                    {"metadata": {"name": NODE}, "status": {"allocatable": {"cpu": "4", "memory": "16Gi"}}})


def pod(name: str = "web-1", cpu: str = "1") -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "labels": {"app": "web"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "resources": {"limits": {"cpu": cpu}}}]},
            "status": {"phase": "Running"}}


def spec(**extra) -> dict:
    return {"target": {"pod": "web-1"}, "cpuMillicores": 1000, **extra}


def obj(body: dict, *, status: dict | None = None, generation: int = 1) -> dict:
    out = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "spec": body, "metadata": {
        "name": "web-1.app", "namespace": "shop", "uid": "rc-1", "generation": generation, "resourceVersion": "9",
        "finalizers": [crd.finalizer_for(NODE)]}}
    if status is not None:
        out["status"] = status
    return out


def schema_says(body: dict) -> list[tuple[str, str]]:
    full = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "spec": body}
    pruned, _ = prune_unknown(SCHEMA, full)
    return schema_errors(SCHEMA, apply_defaults(SCHEMA, pruned))


RAMP = [{"afterSeconds": 30, "cpuMillicores": 800}, {"afterSeconds": 60, "cpuMillicores": 600}]


def test_a_profile_round_trips_and_becomes_the_engines_steps():
    parsed = crd.ChaosSpec.from_dict(spec(profile=RAMP, bandwidth={"bitsPerSecond": 10**6, "direction": "egress"}))
    assert parsed.profile == (crd.ProfileRow(30, cpu_millicpu=800), crd.ProfileRow(60, cpu_millicpu=600))
    assert crd.ChaosSpec.from_dict(parsed.to_dict()) == parsed
    assert schema_says(parsed.to_dict()) == []
    row = crd.ChaosSpec.from_dict(spec(profile=[{"afterSeconds": 5, "bitsPerSecond": 500_000}],
                                       bandwidth={"bitsPerSecond": 10**6, "direction": "egress"}))
    assert rc.steps(row) == [StepSpec(5.0, Changes(egress_bps=500_000))]

    actions = rc.reconcile(("shop", "web-1.app"), obj(spec(profile=RAMP)), {"web-1": pod()}, [], NODE, now=NOW,
                           policy=POLICY)
    (apply,) = [a for a in actions if isinstance(a, rc.Apply)]
    assert apply.request.changes == Changes(cpu_millicpu=1000)
    assert apply.request.steps == (StepSpec(30.0, Changes(cpu_millicpu=800)), StepSpec(60.0, Changes(cpu_millicpu=600)))
    apply.request.validate()


@pytest.mark.parametrize("rows, words", [
    ("fast", "must be a list"),
    ([{"afterSeconds": 10}], "changes nothing"),
    ([{"afterSeconds": 0, "cpuMillicores": 500}], "spec.profile[0].afterSeconds 0 is out of range"),
    ([{"afterSeconds": 10, "cpuMillicores": 500}, {"afterSeconds": 10, "cpuMillicores": 400}],
     "spec.profile[1].afterSeconds 10 is not after the step before (10)"),
    ([{"afterSeconds": 10, "cpuMillicores": 0}], "spec.profile[0].cpuMillicores 0 is out of range; accepted: 1 to"),
    ([{"afterSeconds": 10, "memoryBytes": 2**30}], "spec.profile[0].memoryBytes: the first step"),
    ([{"afterSeconds": 10, "cpuMillicores": 500, "sleep": 1}], "unknown field 'sleep'"),
    ([{"afterSeconds": 3e6, "cpuMillicores": 500}], "is out of range; accepted: more than 0, at most 2592000"),
    ([{"afterSeconds": 10, "cpuMillicores": 500}] * 1000, "1000 steps; accepted: at most 999"),
])
def test_bad_rows_are_refused_with_the_row_and_what_is_accepted(rows, words):
    with pytest.raises(crd.SpecError, match=re.escape(words)):
        crd.ChaosSpec.from_dict(spec(profile=rows))
    # ... and a node with pods in the namespace says so in its status.nodes entry; nothing changes.
    actions = rc.reconcile(("shop", "web-1.app"), obj(spec(profile=rows)), {"web-1": pod()}, [], NODE, now=NOW,
                           policy=POLICY)
    assert not [a for a in actions if isinstance(a, rc.Apply)]
    (write,) = [a for a in actions if isinstance(a, rc.WriteStatus)]
    assert write.node["phase"] == crd.FAILED and words.split(";")[0] in write.node["message"], write.node


def test_a_step_after_the_duration_is_refused():
    with pytest.raises(crd.SpecError, match=r"spec.profile\[1\].afterSeconds 60 is after spec.durationSeconds 45"):
        crd.ChaosSpec.from_dict(spec(profile=RAMP, durationSeconds=45))
    crd.ChaosSpec.from_dict(spec(profile=RAMP, durationSeconds=60))  # the last step at the end: allowed


@pytest.mark.parametrize("rows", [
    [{"afterSeconds": 0, "cpuMillicores": 500}],
    [{"afterSeconds": 10}],
    [{"afterSeconds": 10, "cpuMillicores": 0}],
    [{"afterSeconds": 10, "memoryBytes": 1}],
    [{"afterSeconds": 10, "bitsPerSecond": 10**12}],
    [{"cpuMillicores": 500}],
    [{"afterSeconds": 10, "cpuMillicores": 500}] * 1000,
])
def test_the_crd_schema_refuses_bad_rows(rows):
    assert schema_says(spec(profile=rows)), rows


def test_the_raise_policy_checks_every_step():
    ramp_up = [{"afterSeconds": 30, "cpuMillicores": 1200}, {"afterSeconds": 60, "cpuMillicores": 1500}]
    actions = rc.reconcile(("shop", "web-1.app"), obj(spec(cpuMillicores=500, profile=ramp_up)), {"web-1": pod()},
                           [], NODE, now=NOW, policy=POLICY)
    assert not [a for a in actions if isinstance(a, rc.Apply)]
    (write,) = [a for a in actions if isinstance(a, rc.WriteStatus)]
    (entry,) = write.entries
    assert entry["phase"] == crd.FAILED
    assert entry["message"].startswith("ResourceChaos web-1.app: step 3 of the profile: cpu 1500m is above container"
                                       " app's cpu limit in its pod spec (1000m)"), entry["message"]
    # Lowering all the way is always allowed; a grant covers a ramp up to its bound.
    down = rc.reconcile(("shop", "web-1.app"), obj(spec(profile=RAMP)), {"web-1": pod()}, [], NODE, now=NOW,
                        policy=POLICY)
    assert [a for a in down if isinstance(a, rc.Apply)]
    granted = pol.Policy({"metadata": {"name": "shop", "labels": {pol.ENABLED_LABEL: "true"},
                                       "annotations": {pol.MAX_RAISE_ANNOTATION: "2"}}}, POLICY.node)
    assert pol.refusal(granted, crd.ChaosSpec.from_dict(spec(cpuMillicores=500, profile=ramp_up)), pod(), "app") == ""


def info(step: int, next_at: float | None, cpu_in_force: int, *, note: str = "") -> ExperimentInfo:
    return ExperimentInfo(
        experiment_id="e1", target=ResolvedTarget("shop", "web-1", "app", "c1", "uid-web-1", NODE),
        resources=(ResourceResult(Resource.CPU, 1000, 1000, cpu_in_force, cpu_in_force, Method.CRI),),
        started_at=NOW - 40, expires_at=None, drift_corrections=0, phase=Phase.ACTIVE,
        owner=Owner(OwnerKind.RESOURCE_CHAOS, "shop", "web-1.app", "rc-1"), steps_total=3, step=step,
        next_step_at=next_at, next_step={Resource.CPU: 600} if next_at else {}, step_note=note)


def applied_status(profile: dict) -> dict:
    entry = rc.applied_entry(pod(), "app", 1, NODE, NOW - 40, info(1, NOW - 10, 1000).resources, None, "e1",
                             profile=profile)
    return {"targets": [entry]}


def test_the_status_follows_the_engines_steps_with_one_write_per_step():
    first = rc.profile_status(3, 1, NOW - 10, {Resource.CPU: 800})
    assert first == {"step": 1, "steps": 3, "nextStepAt": crd.rfc3339(NOW - 10), "next": {"cpu": 800}}
    o = obj(spec(profile=RAMP), status=applied_status(first))
    # The engine took step 2: the entry says so, with the value read back.
    actions = rc.reconcile(("shop", "web-1.app"), o, {"web-1": pod()}, [info(2, NOW + 20, 800)], NODE, now=NOW,
                           policy=POLICY)
    assert not [a for a in actions if isinstance(a, rc.Apply | rc.Revert)]
    (write,) = [a for a in actions if isinstance(a, rc.WriteStatus)]
    (entry,) = write.entries
    assert entry["profile"] == {"step": 2, "steps": 3, "nextStepAt": crd.rfc3339(NOW + 20), "next": {"cpu": 600}}
    assert entry["changes"][0]["applied"] == 800 and entry["phase"] == crd.APPLIED
    # Once written, the same step is no write; a held step is (with why).
    o = obj(spec(profile=RAMP), status={"targets": [entry]})
    again = rc.reconcile(("shop", "web-1.app"), o, {"web-1": pod()}, [info(2, NOW + 20, 800)], NODE, now=NOW + 5,
                         policy=POLICY)
    assert not [a for a in again if isinstance(a, rc.WriteStatus)]
    held = rc.reconcile(("shop", "web-1.app"), o, {"web-1": pod()},
                        [info(2, NOW + 20, 800, note="step 3 held: memory below usage")], NODE, now=NOW + 5,
                        policy=POLICY)
    (write,) = [a for a in held if isinstance(a, rc.WriteStatus)]
    assert write.entries[0]["profile"]["note"] == "step 3 held: memory below usage"


def test_entries_of_gone_pods_are_pruned_once_ended_and_old():
    def entry(name: str, phase: str, since: float, node: str = NODE) -> dict:
        e = rc.new_entry(pod(name), "app", phase, 1, node, since)
        return e

    status = {"targets": [entry("gone-old", crd.REVERTED, NOW - 400), entry("gone-new", crd.REVERTED, NOW - 10),
                          entry("gone-failed", crd.FAILED, NOW - 400), entry("elsewhere", crd.REVERTED, NOW - 400,
                                                                             node="n2"),
                          entry("web-1", crd.REVERTED, NOW - 400)]}
    sel = {"target": {"selector": {"matchLabels": {"app": "web"}}}, "cpuMillicores": 500}
    o = obj(sel, status=status)
    o["metadata"]["name"] = "sel"
    # web-1 still exists here (it stopped matching or its experiment ended): kept; gone-new: kept a while.
    actions = rc.reconcile(("shop", "sel"), o, {"web-1": dict(pod(), metadata={**pod()["metadata"], "labels": {}})},
                           [], NODE, now=NOW, policy=POLICY)
    (write,) = [a for a in actions if isinstance(a, rc.WriteStatus)]
    assert write.drop == ("gone-failed", "gone-old") and write.entries == ()
    # An experiment the engine still holds (a revert being retried) keeps its entry.
    held = ExperimentInfo("e9", ResolvedTarget("shop", "gone-old", "app", "c9", "uid-gone-old", NODE), (), NOW, None,
                          0, Phase.REVERT_FAILING, Owner(OwnerKind.RESOURCE_CHAOS, "shop", "sel", "rc-1"))
    actions = rc.reconcile(("shop", "sel"), o, {}, [held], NODE, now=NOW, policy=POLICY, prune_after_s=0)
    (write,) = [a for a in actions if isinstance(a, rc.WriteStatus)]
    assert "gone-old" not in write.drop and "gone-new" in write.drop


def test_the_watch_mark_counts_at_most_a_minute_from_when_the_agent_saw_it():
    def marked(text: str | None) -> dict:
        meta = {"name": "x", "namespace": "shop"}
        if text is not None:
            meta["annotations"] = {watch.WATCH_ANNOTATION: text}
        return {"metadata": meta}

    assert watch.watch_of(None, marked(None), NOW) is None
    assert watch.watch_of(None, marked("soon"), NOW) is None  # unreadable: ignored, never an error
    w = watch.watch_of(None, marked(crd.rfc3339(NOW + 30)), NOW)
    assert w.until == NOW + 30 and w.seen_at == NOW
    assert watch.watch_of(w, marked(crd.rfc3339(NOW + 30)), NOW + 20) is w  # the same mark: not a refresh
    far = watch.watch_of(None, marked("2099-01-01T00:00:00Z"), NOW)
    assert far.until == NOW + watch.WATCH_MAX_S
    assert watch.watch_of(far, marked("2099-01-01T00:00:00Z"), NOW + 3600).until == NOW + watch.WATCH_MAX_S
    deleting = marked(crd.rfc3339(NOW + 30))
    deleting["metadata"]["deletionTimestamp"] = crd.rfc3339(NOW)
    assert watch.watch_of(w, deleting, NOW) is None


def test_the_schema_bounds_of_rows_are_the_agents():
    spec_schema = SCHEMA["properties"]["spec"]["properties"]
    row = spec_schema["profile"]["items"]["properties"]
    for field, limit in crd._ROW_FIELDS.items():
        low, high = crd.LIMITS[limit]
        assert (row[field]["minimum"], row[field]["maximum"]) == (low, high), field
    top = {"cpuMillicores": spec_schema["cpuMillicores"], "memoryBytes": spec_schema["memoryBytes"],
           "bandwidth.bitsPerSecond": spec_schema["bandwidth"]["properties"]["bitsPerSecond"]}
    for limit, schema in top.items():
        assert (schema["minimum"], schema["maximum"]) == crd.LIMITS[limit], limit
    assert spec_schema["profile"]["maxItems"] == crd.MAX_PROFILE_ROWS
    assert row["afterSeconds"]["maximum"] == crd.MAX_DURATION_S
