"""Prometheus metrics of a server, named the way vLLM's are (`fxscale:` where vLLM has `vllm:`)
so dashboards and alerts written for it need only the prefix changed.

Every scrape reads `Server.stats()`, so the numbers are the ones `stats()` returns: requests
running and waiting, KV-cache usage, preemptions, prompt and generated tokens, requests by
finish reason, time-to-first-token, inter-token and end-to-end latency histograms (counted
since the server started), and per operator group its replicas, queue, utilisation, calls
and call-latency histogram. `fxscale serve` exposes them at /metrics; `fxscale.serve(...,
metrics_port=9400)` opts in to an endpoint of their own (127.0.0.1 unless told otherwise).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

PREFIX = "fxscale:"
GROUP_GAUGES = (("replicas", "live replicas of the group"),
                ("queue", "calls waiting in the group's replica queues"),
                ("utilisation", "busy time over wall time per live replica"),
                ("batch_mean", "tokens per execution of the group"))
REQUEST_HISTOGRAMS = (("ttft_s", "time_to_first_token_seconds", "time to first token"),
                      ("itl_s", "inter_token_latency_seconds", "time between two tokens"),
                      ("e2e_s", "e2e_request_latency_seconds", "submission to last token"))


def _histogram(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], dict]]
               ) -> HistogramMetricFamily:
    """A histogram family from `Histogram.report()`s, one per label set."""
    family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    for values, report in rows:
        family.add_metric(values, list(report["buckets"].items()), sum_value=report["sum"])
    return family


class StatsCollector:
    """Turns one `stats()` snapshot into Prometheus metric families, each labelled with the
    served model's name."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str) -> None:
        self.stats, self.model_name = stats, model_name

    def collect(self) -> Iterator[Any]:
        snapshot = self.stats()
        model = [self.model_name]
        engine, requests = snapshot["engine"], snapshot["requests"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        blocks = engine["kv_blocks"]
        yield gauge("num_requests_running", "requests in the engine's running batch",
                    engine["running"])
        yield gauge("num_requests_waiting", "requests waiting for KV blocks or a step",
                    engine["waiting"])
        yield gauge("num_requests_in_flight", "requests admitted and not finished",
                    snapshot["in_flight"])
        yield gauge("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent",
                    blocks["used"] / blocks["total"] if blocks["total"] else 0.0)
        yield counter("num_preemptions", "requests preempted (recomputed later)",
                      engine["preemptions"])
        yield counter("prompt_tokens", "prompt tokens admitted", requests["prompt_tokens"])
        yield counter("generation_tokens", "tokens generated", requests["generation_tokens"])
        success = CounterMetricFamily(PREFIX + "request_success", "requests ended, by reason",
                                      labels=["model_name", "finished_reason"])
        for reason, count in requests["finish_reasons"].items():
            success.add_metric([*model, reason], count)
        yield success
        for key, name, doc in REQUEST_HISTOGRAMS:
            yield _histogram(name, doc, ["model_name"], [(model, requests["histograms"][key])])
        if requests.get("slo_attainment") is not None:
            yield gauge("slo_attainment", "share of recent requests within the SLO",
                        requests["slo_attainment"])
        groups = snapshot["groups"]
        labels = ["model_name", "group"]
        for key, doc in GROUP_GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}group_{key}", doc, labels=labels)
            for name, values in groups.items():
                if values[key] is not None:
                    family.add_metric([*model, name], values[key])
            yield family
        calls = CounterMetricFamily(PREFIX + "group_calls", "group executions", labels=labels)
        for name, values in groups.items():
            calls.add_metric([*model, name], values["completed"])
        yield calls
        yield _histogram("group_call_latency_seconds", "queue + execution time of group calls",
                         labels, [([*model, name], values["latency_histogram"])
                                  for name, values in groups.items()])


def registry_for(stats: Callable[[], dict[str, Any]], model_name: str) -> CollectorRegistry:
    """A registry holding one server's metrics."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats, model_name))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in Prometheus' text format."""
    return generate_latest(registry)


def start_metrics(stats: Callable[[], dict[str, Any]], model_name: str, port: int,
                  host: str = "127.0.0.1"):
    """Serve /metrics on host:port (port 0: any free port); returns the HTTP server."""
    server, _thread = start_http_server(port, addr=host, registry=registry_for(stats,
                                                                               model_name))
    return server
