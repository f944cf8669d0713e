"""Render results for people (text) and programs (json, yaml). Pure: strings in, strings out.

Text shows each change as ``cpu: 1 -> 500m (read back 500m) via cri, expires 20:31:05Z``.
JSON and YAML carry the same facts as numbers in the resource's unit (``unit`` names it), times
as RFC 3339 UTC strings, keys in Kubernetes' camelCase.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from plugin.backends import (
    RESOURCE_CPU,
    RESOURCE_MEMORY,
    ApplyResult,
    QueueReading,
    ResetResult,
    ResourceChange,
    TargetResult,
)
from plugin.units import format_bandwidth, format_cpu, format_latency, format_memory

if TYPE_CHECKING:
    from plugin.backends.reports import ExperimentStatus, TopRow

__all__ = ["FORMATS", "format_value", "format_time", "render_result", "render_status", "render_top", "result_data",
           "status_data", "top_row_data"]

FORMATS = ("text", "json", "yaml")


def format_value(resource: str, value: int | None) -> str:
    """A resource value as people write it: ``500m``, ``2Gi``, ``2Mbit/s``; None = unlimited."""
    if resource == RESOURCE_CPU:
        return format_cpu(value)
    if resource == RESOURCE_MEMORY:
        return format_memory(value)
    return format_bandwidth(value)


def _utc(moment: datetime) -> datetime:
    # A naive datetime from a backend is taken as UTC, never as local time.
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def format_time(moment: datetime, now: datetime) -> str:
    """``20:31:05Z`` on the same UTC day as ``now``, else ``2026-11-23T20:31:05Z``."""
    moment = _utc(moment)
    if moment.date() == _utc(now).date():
        return moment.strftime("%H:%M:%SZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(moment: datetime | None) -> str | None:
    return None if moment is None else _utc(moment).isoformat().replace("+00:00", "Z")


def _target_name(t: TargetResult | ExperimentStatus) -> str:
    return f"{t.namespace}/{t.pod}" + (f" (container {t.container})" if t.container else "")


def format_queue(queue: QueueReading) -> str:
    """``queue 24.2ms = 6,056 B (budget 20ms)``: the limit read from the kernel, as time at the rate."""
    if queue.unknown:
        return f"queue unknown ({queue.unknown})"
    if queue.limit_bytes is None:
        return f"queue {queue.limit_packets} packets (the kernel's default, not the {format_latency(queue.budget_s)} budget)"
    return f"queue {format_latency(queue.latency_s)} = {queue.limit_bytes:,} B (budget {format_latency(queue.budget_s)})"


def _queue_cell(queue: QueueReading | None) -> str:
    if queue is None:
        return "-"
    if queue.unknown:
        return "unknown"
    if queue.limit_bytes is None:
        return f"{queue.limit_packets}p"
    return f"{format_latency(queue.latency_s)}/{queue.limit_bytes}B"


def _queue_data(queue: QueueReading | None) -> dict | None:
    if queue is None:
        return None
    return {"budgetSeconds": queue.budget_s, "limitBytes": queue.limit_bytes, "limitPackets": queue.limit_packets,
            "latencySeconds": queue.latency_s, "unknown": queue.unknown or None}


def _change_line(change: ResourceChange, *, kind: str, dry_run: bool, now: datetime) -> str:
    before = format_value(change.resource, change.previous)
    after = format_value(change.resource, change.requested)
    line = f"{change.resource}: {before} -> {after}"
    if dry_run:
        line += f" via {change.method} (dry run: nothing changed)"
    elif change.unknown:
        # Never the asked value dressed as a reading: say why there is none.
        line += f" (read back: unknown, {change.unknown}) via {change.method}"
    else:
        line += f" (read back {format_value(change.resource, change.read_back)}"
        line += f", {format_queue(change.queue)})" if change.queue is not None else ")"
        line += f" via {change.method}"
        if kind == "reset":
            line += ", restored" if change.read_back == change.requested else ", NOT the original"
        elif change.expires_at is not None:
            line += f", expires {format_time(change.expires_at, now)}"
        else:
            line += ", no expiry"
    if change.message:
        line += f"; {change.message}"
    return line


def render_result(result: ApplyResult | ResetResult, fmt: str, now: datetime) -> str:
    """The result of an apply or reset in ``fmt`` (text, json, yaml); ends with a newline."""
    if fmt != "text":
        return _dump(result_data(result), fmt)
    kind = "reset" if isinstance(result, ResetResult) else "apply"
    lines: list[str] = []
    for target in result.targets:
        lines.append(f"{_target_name(target)}:")
        if target.error is not None:
            lines.append(f"  failed: {target.error}")
        for change in target.changes:
            lines.append("  " + _change_line(change, kind=kind, dry_run=result.dry_run, now=now))
        if target.error is None and not target.changes:
            lines.append("  nothing to change" if kind == "apply" else "  no experiment to reset")
    if not result.targets:
        lines.append("no pods matched" if kind == "apply" else "no experiment to reset")
    return "\n".join(lines) + "\n"


def _change_data(change: ResourceChange) -> dict:
    data = {
        "resource": change.resource,
        "unit": change.unit,
        "previous": change.previous,
        "requested": change.requested,
        "readBack": change.read_back,
        "method": change.method,
        "expiresAt": _rfc3339(change.expires_at),
        "message": change.message,
        "readBackUnknown": change.unknown or None,
    }
    if change.queue is not None:  # a shaped direction
        data["queue"] = _queue_data(change.queue)
    return data


def result_data(result: ApplyResult | ResetResult) -> dict:
    """The result as plain data for json/yaml."""
    return {
        "kind": type(result).__name__,
        "dryRun": result.dry_run,
        "ok": result.ok,
        "targets": [
            {
                "namespace": t.namespace,
                "pod": t.pod,
                "container": t.container,
                "node": t.node,
                "experimentId": t.experiment_id,
                "created": t.created,
                "error": t.error,
                "changes": [_change_data(c) for c in t.changes],
            }
            for t in result.targets
        ],
    }


def status_data(items: Sequence[ExperimentStatus]) -> dict:
    """Active experiments as plain data for json/yaml."""
    return {
        "kind": "ExperimentStatusList",
        "items": [
            {
                "namespace": s.namespace,
                "pod": s.pod,
                "container": s.container,
                "node": s.node,
                "experimentId": s.experiment_id,
                "startedAt": _rfc3339(s.started_at),
                "state": s.state,
                "message": s.message,
                "changes": [_change_data(c) for c in s.changes],
            }
            for s in items
        ],
    }


_STATUS_COLUMNS = ("NAMESPACE", "POD", "CONTAINER", "RESOURCE", "ORIGINAL", "CHAOS", "NOW", "METHOD", "EXPIRES",
                   "STATE")


def render_status(items: Sequence[ExperimentStatus], fmt: str, now: datetime) -> str:
    """Active experiments: a table (one row per resource) in text, else json/yaml."""
    if fmt != "text":
        return _dump(status_data(items), fmt)
    # A QUEUE column (the queue read back: time at the rate / bytes) when anything is shaped.
    queues = any(c.queue is not None for s in items for c in s.changes)
    columns = _STATUS_COLUMNS[:7] + ("QUEUE",) + _STATUS_COLUMNS[7:] if queues else _STATUS_COLUMNS
    rows = [columns]
    for s in items:
        for c in s.changes or (None,):
            if c is None:
                rows.append((s.namespace, s.pod, s.container, "-", "-", "-", "-", "-", "-", s.state)
                            + (("-",) if queues else ()))
                continue
            row = (
                s.namespace,
                s.pod,
                s.container,
                c.resource,
                format_value(c.resource, c.previous),
                format_value(c.resource, c.requested),
                "unknown" if c.unknown else format_value(c.resource, c.read_back),
                c.method,
                format_time(c.expires_at, now) if c.expires_at is not None else "never",
                s.state,
            )
            rows.append(row[:7] + (_queue_cell(c.queue),) + row[7:] if queues else row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    table = "".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )
    # What a table cell cannot hold: why a value is unknown, a failing restore, a damaged record.
    notes = [f"{s.namespace}/{s.pod}/{s.container} {c.resource}: unknown ({c.unknown})"
             for s in items for c in s.changes if c.unknown]
    notes += [f"{s.namespace}/{s.pod}/{s.container} {c.resource}: {format_queue(c.queue)}"
              for s in items for c in s.changes if c.queue is not None and c.queue.unknown]
    notes += [f"{s.namespace}/{s.pod}/{s.container} ({s.state}): {s.message}" for s in items if s.message]
    return table + "".join(f"  {n}\n" for n in notes)


_TOP_COLUMNS = ("NAMESPACE", "POD", "CONTAINER", "CPU USED/LIMIT", "THROTTLED", "MEMORY WS/LIMIT", "OOM",
                "IN (DROPS, QUEUE)", "OUT (DROPS, QUEUE)", "LEFT", "STEP")


def _pct(share: float | None) -> str:
    return "?" if share is None else f"{share * 100:.0f}%"


def _direction(bps: float | None, drops: int | None, backlog: int | None, shaped: bool) -> str:
    if not shaped:
        return "-"
    if bps is None:
        return "?"
    return f"{format_bandwidth(round(bps))} ({drops}, {format_memory(backlog) if backlog else '0'})"


def top_row_data(row: TopRow, now: datetime) -> dict:
    """One row of ``top`` as plain data (``-o json`` prints one object per row per refresh)."""
    s = row.status
    limits = {c.resource: c for c in s.changes}
    return {
        "time": _rfc3339(now), "namespace": s.namespace, "pod": s.pod, "container": s.container,
        "state": s.state, "intervalSeconds": round(row.interval_s, 3),
        "cpu": {"usedCores": row.cpu_cores, "throttledShare": row.cpu_throttled_share,
                "limitMillicpu": limits[RESOURCE_CPU].read_back if RESOURCE_CPU in limits else None,
                "originalMillicpu": limits[RESOURCE_CPU].previous if RESOURCE_CPU in limits else None},
        "memory": {"workingSetBytes": row.memory_working_set_bytes, "limitBytes": row.memory_limit_bytes,
                   "oomKillsSinceStart": row.oom_kills},
        "ingress": {"bitsPerSecond": row.ingress_bps, "drops": row.ingress_drops, "backlogBytes": row.ingress_backlog_bytes},
        "egress": {"bitsPerSecond": row.egress_bps, "drops": row.egress_drops, "backlogBytes": row.egress_backlog_bytes},
        "expiresAt": _rfc3339(next((c.expires_at for c in s.changes if c.expires_at), None)),
        "message": s.message, "errors": list(row.errors),
    }


def render_top(rows: Sequence[TopRow], fmt: str, now: datetime) -> str:
    """One refresh of ``top``: a table in text, one JSON object per row (a line each) with ``-o json``."""
    if fmt == "json":
        return "".join(json.dumps(top_row_data(r, now)) + "\n" for r in rows)
    table = [_TOP_COLUMNS]
    for r in rows:
        s = r.status
        limits = {c.resource: c for c in s.changes}
        cpu_limit = limits.get(RESOURCE_CPU)
        used = "?" if r.cpu_cores is None else f"{r.cpu_cores:.2f}"
        cpu = f"{used}/{format_value(RESOURCE_CPU, cpu_limit.read_back)}" if cpu_limit else used
        ws = "?" if r.memory_working_set_bytes is None else format_memory(r.memory_working_set_bytes)
        mem = f"{ws}/{format_memory(r.memory_limit_bytes)}" + (
            f" ({_pct(r.memory_working_set_bytes / r.memory_limit_bytes)})"
            if r.memory_working_set_bytes is not None and r.memory_limit_bytes else "")
        expires = next((c.expires_at for c in s.changes if c.expires_at), None)
        left = "-" if expires is None else f"{max(0, int((expires - now).total_seconds()))}s"
        step = next((p.split(",")[0] for p in s.message.split("; ") if p.startswith("step ")), "-")
        table.append((s.namespace, s.pod, s.container, cpu, _pct(r.cpu_throttled_share), mem,
                      "?" if r.oom_kills is None else str(r.oom_kills),
                      _direction(r.ingress_bps, r.ingress_drops, r.ingress_backlog_bytes, "bandwidth-ingress" in limits),
                      _direction(r.egress_bps, r.egress_drops, r.egress_backlog_bytes, "bandwidth-egress" in limits),
                      left, step))
    widths = [max(len(row[i]) for row in table) for i in range(len(_TOP_COLUMNS))]
    out = "".join("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in table)
    notes = [f"  {r.status.namespace}/{r.status.pod}/{r.status.container}: not read: {'; '.join(r.errors)}"
             for r in rows if r.errors]
    return out + "".join(n + "\n" for n in notes)


def _dump(data: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        import yaml  # only -o yaml pays for it

        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
