"""/metrics: this node's API in Prometheus text format (prometheus-client).

Counted where requests pass this node's proxy: answers by model and status, failures after a
server was chosen, tokens generated, time to first token and decode speed; by the fleet: each
time a model's llama-server starts again, with its cause; read live at each
scrape: requests in flight per model and the mesh's other nodes by role. One registry per
node (not the library's global one), so several nodes in one process never share counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh_llm.api.meter import Measured

UNKNOWN_MODEL = "(none)"  # requests naming no served model: their names are not labels (unbounded)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SPEED_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


class _Live(Collector):
    """Gauges read when scraped, from their one owner (the proxy's gates, the mesh's members)."""

    def __init__(self, in_flight: Callable[[], dict[str, int]], peers: Callable[[], dict[str, int]]) -> None:
        self.in_flight, self.peers = in_flight, peers

    def collect(self) -> Iterator[Metric]:
        flight = GaugeMetricFamily("mesh_llm_requests_in_flight", "Requests being answered now, per model (this node's callers and peers' at its server)", labels=["model"])
        for model, count in sorted(self.in_flight().items()):
            flight.add_metric([model], count)
        yield flight
        peers = GaugeMetricFamily("mesh_llm_peers", "Other nodes in the mesh as this node sees them, by role", labels=["role"])
        for role, count in sorted(self.peers().items()):
            peers.add_metric([role], count)
        yield peers


class NodeMetrics:
    def __init__(self, in_flight: Callable[[], dict[str, int]], peers: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mesh_llm_requests", "Requests answered by this node's API, by model and HTTP status", ["model", "status"], registry=self.registry)
        self.failures = Counter("mesh_llm_request_failures", "Requests that failed after a server was chosen, by kind", ["model", "kind"], registry=self.registry)
        self.tokens = Counter("mesh_llm_generated_tokens", "Tokens generated in answers relayed by this node", ["model"], registry=self.registry)
        self.ttft = Histogram("mesh_llm_time_to_first_token_seconds", "From a streamed request's arrival to its first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.speed = Histogram("mesh_llm_tokens_per_second", "Decode speed of an answer", ["model"], buckets=SPEED_BUCKETS, registry=self.registry)
        self.resumes = Counter("mesh_llm_resumes", "Requests run again on another server after theirs went away before answering", ["model"],
                               registry=self.registry)
        self.restarts = Counter("mesh_llm_plan_restarts", "llama-server started again for a model this node serves, by cause", ["model", "cause"],
                                registry=self.registry)
        self.registry.register(_Live(in_flight, peers))

    def resumed(self, model: str) -> None:
        self.resumes.labels(model).inc()

    def restarted(self, model: str, cause: str) -> None:
        self.restarts.labels(model, cause).inc()

    def answered(self, model: str | None, status: int) -> None:
        self.requests.labels(model or UNKNOWN_MODEL, str(status)).inc()

    def failed(self, model: str, kind: str) -> None:
        self.failures.labels(model, kind).inc()

    def measured(self, model: str, m: Measured) -> None:
        if m.tokens:
            self.tokens.labels(model).inc(m.tokens)
        if m.ttft_s is not None:
            self.ttft.labels(model).observe(m.ttft_s)
        if m.tokens_per_s is not None:
            self.speed.labels(model).observe(m.tokens_per_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
