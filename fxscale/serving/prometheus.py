"""The serving runtime's opt-in Prometheus endpoint: `fxscale.serve(..., metrics_port=9400)`.

Binds to 127.0.0.1 unless told otherwise; every scrape reads `Server.stats()`, so the
numbers are the ones `stats()` returns.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

GROUP_GAUGES = (("replicas", "live replicas of the group"),
                ("queue", "calls waiting in the group's replica queues"),
                ("utilisation", "busy time over wall time per live replica"),
                ("batch_mean", "calls per execution (selective batching)"),
                ("latency_p50_s", "median queue + execution time of a group call"),
                ("latency_p99_s", "99th percentile queue + execution time of a group call"))
REQUEST_GAUGES = tuple(f"{key}_p{q}_s" for key in ("ttft", "tbt", "e2e") for q in (50, 90, 99)) \
    + ("slo_attainment",)


class _StatsCollector:
    """Turns one `stats()` snapshot into Prometheus metric families."""

    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        snapshot = self.stats()
        groups = snapshot["groups"]
        for key, doc in GROUP_GAUGES:
            family = GaugeMetricFamily(f"fxscale_group_{key}", doc, labels=["group"])
            for name, values in groups.items():
                if values[key] is not None:
                    family.add_metric([name], values[key])
            yield family
        calls = CounterMetricFamily("fxscale_group_calls", "completed group calls",
                                    labels=["group"])
        for name, values in groups.items():
            calls.add_metric([name], values["completed"])
        yield calls
        latency = HistogramMetricFamily("fxscale_group_call_latency_seconds",
                                        "queue + execution time of recent group calls",
                                        labels=["group"])
        for name, values in groups.items():
            buckets = list(values["latency_histogram"].items())
            latency.add_metric([name], buckets, sum_value=None)
        yield latency
        requests = snapshot["requests"]
        yield CounterMetricFamily("fxscale_requests", "completed requests",
                                  value=requests["completed"])
        for key in REQUEST_GAUGES:
            if requests.get(key) is not None:
                yield GaugeMetricFamily(f"fxscale_request_{key}", f"requests: {key}",
                                        value=requests[key])
        yield GaugeMetricFamily("fxscale_in_flight", "requests in flight",
                                value=snapshot["in_flight"])


def start_metrics(stats, port: int, host: str = "127.0.0.1"):
    """Serve /metrics on host:port (port 0: any free port); returns the HTTP server."""
    registry = CollectorRegistry()
    registry.register(_StatsCollector(stats))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
