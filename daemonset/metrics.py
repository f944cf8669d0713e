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

        self.runtime_calls = Histogram(
            "chaos_agent_runtime_call_seconds",
            "Time the container runtime took to answer one CRI call (failed calls included), by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )

    def observe_runtime_call(self, method: str, seconds: float) -> None:
        self.runtime_calls.labels(method).observe(seconds)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class ExperimentCollector:
    """Per-experiment series read from the kernel at scrape time, with the labels a dashboard needs
    (namespace, pod, container, and resource or direction). Counters are totals: let Prometheus take
    the rates (rate(chaos_experiment_cpu_seconds_total[1m]) = cores used)."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        base = ["namespace", "pod", "container"]
        limit = GaugeMetricFamily("chaos_experiment_limit", "Limit in force now, read from the kernel"
                                  " (millicpu, bytes, bit/s; -1 = none).", labels=base + ["resource"])
        original = GaugeMetricFamily("chaos_experiment_original", "The limit before the experiment.",
                                     labels=base + ["resource"])
        cpu = CounterMetricFamily("chaos_experiment_cpu_seconds", "CPU time the container used.", labels=base)
        periods = CounterMetricFamily("chaos_experiment_cpu_periods", "CFS periods.", labels=base)
        throttled = CounterMetricFamily("chaos_experiment_cpu_throttled_periods", "CFS periods that hit the quota.",
                                        labels=base)
        ws = GaugeMetricFamily("chaos_experiment_memory_working_set_bytes", "Memory the container cannot give back.",
                               labels=base)
        ooms = GaugeMetricFamily("chaos_experiment_oom_kills", "OOM kills since the experiment started.", labels=base)
        sent = CounterMetricFamily("chaos_experiment_shaped_bytes", "Bytes our qdisc sent.", labels=base + ["direction"])
        drops = CounterMetricFamily("chaos_experiment_shaped_drops", "Packets our qdisc dropped.",
                                    labels=base + ["direction"])
        backlog = GaugeMetricFamily("chaos_experiment_shaped_backlog_bytes", "Bytes waiting in our qdisc.",
                                    labels=base + ["direction"])
        for info, c, oom0 in self.engine.sample():
            t = info.target
            lv = [t.namespace, t.pod, t.container]
            for r in info.resources:
                if not r.unknown:
                    limit.add_metric(lv + [r.resource.value], r.in_force)
                original.add_metric(lv + [r.resource.value], r.original)
            if c.cpu_usage_ns is not None:
                cpu.add_metric(lv, c.cpu_usage_ns / 1e9)
            if c.nr_periods is not None:
                periods.add_metric(lv, c.nr_periods)
            if c.nr_throttled is not None:
                throttled.add_metric(lv, c.nr_throttled)
            if c.memory_working_set_bytes is not None:
                ws.add_metric(lv, c.memory_working_set_bytes)
            if c.oom_kills is not None:
                ooms.add_metric(lv, c.oom_kills - (oom0 or 0))
            for direction, q in (("ingress", c.ingress), ("egress", c.egress)):
                if q is not None:
                    sent.add_metric(lv + [direction], q.bytes_sent)
                    drops.add_metric(lv + [direction], q.drops)
                    backlog.add_metric(lv + [direction], q.backlog_bytes)
        yield from (limit, original, cpu, periods, throttled, ws, ooms, sent, drops, backlog)
