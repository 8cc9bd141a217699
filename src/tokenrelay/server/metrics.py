"""Prometheus metrics of the gateway (one registry per app, so tests stay independent).

Labels never carry keys or upstream secrets: key *ids* and model names only.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
_TPS_BUCKETS = (1, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_streams = Gauge(
            "tokenrelay_active_streams", "Streams in progress", ["model"], registry=r)
        self.requests = Counter(
            "tokenrelay_requests", "Requests by endpoint, model and outcome",
            ["endpoint", "model", "status"], registry=r)
        self.ttft = Histogram(
            "tokenrelay_time_to_first_token_seconds", "Time to first token",
            ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.tokens_per_second = Histogram(
            "tokenrelay_tokens_per_second", "Decode rate of finished streams",
            ["model"], buckets=_TPS_BUCKETS, registry=r)
        self.errors = Counter(
            "tokenrelay_errors", "Errors by kind", ["kind"], registry=r)
        self.cancellations = Counter(
            "tokenrelay_cancellations", "Streams stopped by the client going away",
            ["model", "reason"], registry=r)
        self.upstream_status = Counter(
            "tokenrelay_upstream_responses", "Upstream outcomes by status",
            ["model", "status"], registry=r)
        self.completion_tokens = Counter(
            "tokenrelay_completion_tokens", "Generated tokens", ["model"], registry=r)
        # Streams that outlive their connection (server/producing.py, delivery.py).
        self.resumes = Counter(
            "tokenrelay_stream_resumes", "Streams resumed (GET …/{id}/stream)",
            ["endpoint"], registry=r)
        self.replayed_frames = Counter(
            "tokenrelay_stream_replayed_frames",
            "Frames sent again to resuming clients (stored before they attached)",
            ["endpoint"], registry=r)
        self.stream_cancels = Counter(
            "tokenrelay_stream_cancels", "Live streams cancelled through POST …/{id}/cancel",
            ["endpoint"], registry=r)
        self.producer_losses = Counter(
            "tokenrelay_stream_producer_losses",
            "Streams whose producing process stopped before their end (producer_lost)",
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
