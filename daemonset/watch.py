"""``kubectl chaos top`` in cluster mode: who watches which ResourceChaos, and the figures the agents
publish for them, as pure code.

Publishing figures into an object's status costs an API write each time (and every write goes to
every agent's watch), so the agents publish only while someone looks: ``top`` sets the annotation
``kubectl-chaos.io/watch-until: <RFC3339>`` on the objects it shows and refreshes it while it runs.
Until that time each agent with targets of the object samples their containers every
``OBSERVE_INTERVAL_S`` (the same counters as node-local top, :mod:`daemonset.observe`) and applies
its entries of ``status.observed`` (field manager ``chaos-agent/NODE/observe``); once the time has
passed it applies one last, empty list (its entries are removed) and writes nothing more. An
object nobody watches costs no write at all.

A mark further ahead than ``WATCH_MAX_S`` from the moment this agent first saw it counts only that
far (a clock running ahead on the user's machine, or a mark set for next year, does not keep the
agents writing); a refresh is a new mark and counts afresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from daemonset import crd

WATCH_ANNOTATION = f"{crd.GROUP}/watch-until"
WATCH_MAX_S = 60.0
OBSERVE_INTERVAL_S = 2.0
OBSERVE_MANAGER = "chaos-agent/{node}/observe"


def mark_of(obj: dict | None) -> str:
    """The object's watch-until annotation as written ("" if none)."""
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    text = annotations.get(WATCH_ANNOTATION) or ""
    return text if isinstance(text, str) and len(text) <= 64 else ""


def mark_until(text: str) -> float | None:
    """The epoch seconds of a mark; None when it is not an RFC3339 UTC time (ignored, never an error)."""
    try:
        parsed = crd.parse_rfc3339(text)
    except ValueError:
        return None
    return parsed.timestamp() if parsed is not None else None


@dataclasses.dataclass(frozen=True)
class Watch:
    """One object's mark as this agent saw it."""

    mark: str  # the annotation as written: a new value is a refresh
    seen_at: float  # epoch seconds this agent first saw that value
    until: float  # epoch seconds this agent publishes until (the mark, at most WATCH_MAX_S after seen_at)


def watch_of(previous: Watch | None, obj: dict | None, now: float) -> Watch | None:
    """The watch of ``obj`` after this change of it (None: no mark, or one that cannot be read)."""
    mark = mark_of(obj)
    if not mark or (obj is not None and crd.is_deleting(obj)):
        return None
    if previous is not None and previous.mark == mark:
        return previous
    until = mark_until(mark)
    if until is None:
        return None
    return Watch(mark, now, min(until, now + WATCH_MAX_S))


def observed_entry(pod: str, container: str, node: str, at: float, mark: str, figures: Any) -> dict:
    """A ``status.observed`` entry from :class:`daemonset.observe.Figures` (None stays null: not read)."""

    def number(value: float | None, digits: int) -> float | None:
        return None if value is None else round(float(value), digits)

    entry: dict[str, Any] = {
        "pod": pod, "container": container, "node": node, "at": crd.rfc3339(at), "watchUntil": mark,
        "intervalSeconds": number(figures.interval_s, 3),
        "cpuCores": number(figures.cpu_cores, 4), "cpuThrottledShare": number(figures.throttled_share, 4),
        "memoryWorkingSetBytes": figures.memory_working_set_bytes, "memoryLimitBytes": figures.memory_limit_bytes,
        "oomKills": figures.oom_kills,
        "ingressBitsPerSecond": number(figures.ingress_bps, 1), "ingressDrops": figures.ingress_drops,
        "ingressBacklogBytes": figures.ingress_backlog_bytes,
        "egressBitsPerSecond": number(figures.egress_bps, 1), "egressDrops": figures.egress_drops,
        "egressBacklogBytes": figures.egress_backlog_bytes,
    }
    if figures.errors:
        entry["errors"] = [str(e)[:512] for e in figures.errors[:8]]
    return entry
