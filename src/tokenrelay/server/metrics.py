"""Prometheus metrics of the gateway (one registry per app, so tests stay independent).

Labels never carry keys or upstream secrets: key *ids* and model names only.

Several worker processes (``tokenrelay serve --workers N``): the supervisor points
``PROMETHEUS_MULTIPROC_DIR`` at a private temporary directory before it starts them, so
every worker's values go to files there (prometheus-client's multiprocess mode) and
``/metrics`` of any worker reads all of them: counters and histograms summed over the
workers (a dead worker's counts stay: counters never go back), the gauge of streams in
progress summed over the *live* ones (the supervisor marks a dead worker's files dead).

Every replica names itself in ``tokenrelay_info{replica="…"} 1``: ``$TOKENRELAY_REPLICA``,
else the host name (one per container); ``workers`` says how many processes it runs.
"""

from __future__ import annotations

import os
import socket

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "REPLICA_ENV", "WORKERS_ENV",
           "GatewayMetrics", "replica_name"]

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
_TPS_BUCKETS = (1, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
#: prometheus-client's multiprocess directory (set by the worker supervisor).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: This replica's name in ``tokenrelay_info`` (default: the host name).
REPLICA_ENV = "TOKENRELAY_REPLICA"
#: Set by the supervisor for its workers: how many there are.
WORKERS_ENV = "TOKENRELAY_WORKERS"


def replica_name() -> str:
    """``$TOKENRELAY_REPLICA``, else the host name."""
    return os.environ.get(REPLICA_ENV, "").strip()[:128] or socket.gethostname()


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        #: Where the workers' values are, when this is one of several (else None).
        self.multiproc_dir = os.environ.get(MULTIPROC_ENV) or None
        self.active_streams = Gauge(
            "tokenrelay_active_streams", "Streams in progress", ["model"], registry=r,
            multiprocess_mode="livesum")
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
        self.take_overs = Counter(
            "tokenrelay_stream_take_overs",
            "Streams whose producing process stopped, finished by another (take-over)",
            registry=r)
        # Written out, not a Gauge: in multiprocess mode a Gauge goes to the workers'
        # files (one sample per pid), and every worker of a replica says the same.
        self._info = _info_lines(replica_name(), os.environ.get(WORKERS_ENV, "1"))

    def render(self) -> bytes:
        if self.multiproc_dir is None:
            return generate_latest(self.registry) + self._info
        from prometheus_client import multiprocess

        every = CollectorRegistry()
        multiprocess.MultiProcessCollector(every, path=self.multiproc_dir)
        return generate_latest(every) + self._info


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _info_lines(replica: str, workers: str) -> bytes:
    return ("# HELP tokenrelay_info This replica: its name and its worker processes\n"
            "# TYPE tokenrelay_info gauge\n"
            f'tokenrelay_info{{replica="{_label(replica)}",workers="{_label(workers)}"}} 1.0\n'
            ).encode()
