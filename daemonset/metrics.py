"""Prometheus metrics of the agent, in a registry of their own (one per engine, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Apply latency buckets: a direct cgroup write is well under a millisecond, a CRI call 10-50 ms.
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """The agent's counters; ``resource`` is cpu, memory, ingress or egress, ``method`` cri, cgroup or netlink."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.active = Gauge("chaos_agent_active_experiments", "Experiments in force on this node.", registry=r)
        self.applies = Counter(
            "chaos_agent_applies", "Resources changed by Apply.", ["resource", "method"], registry=r
        )
        self.reverts = Counter("chaos_agent_reverts", "Experiments reverted.", ["reason"], registry=r)
        self.failures = Counter("chaos_agent_failures", "Requests that failed.", ["operation", "error"], registry=r)
        self.drift_corrections = Counter(
            "chaos_agent_drift_corrections", "Experiments re-applied after something reset a limit.", ["cause"], registry=r
        )
        self.scheduled = Gauge(
            "chaos_agent_scheduled_moments", "End times and retries the supervisor holds (at most one per experiment).",
            registry=r)
        self.apply_latency = Histogram(
            "chaos_agent_apply_latency_seconds",
            "Time to apply and verify one request.",
            ["method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
