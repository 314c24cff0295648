"""The worker's Prometheus metrics, on a registry of its own (so several workers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Buckets (seconds) of receipt-to-answer latency; the target is 0.5 s."""
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
"""Buckets of the real-time factor: recognition time over audio length."""


class WorkerMetrics:
    """Counts, queue depth and histograms of one worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "mqvox_worker_utterances_received", "Utterances taken from the broker.", registry=self.registry
        )
        self.answered = Counter(
            "mqvox_worker_utterances_answered",
            "Utterances answered with a result; 'stored' ones were answered again from storage.",
            ["how"],
            registry=self.registry,
        )
        self.failed = Counter(
            "mqvox_worker_utterances_failed",
            "Utterances that got an error result or an error report, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "mqvox_worker_queue_depth", "Utterances received and not yet answered.", registry=self.registry
        )
        self.storage_available = Gauge(
            "mqvox_worker_storage_available",
            "1 while the database answers, 0 while it is unavailable (nothing is acknowledged then).",
            registry=self.registry,
        )
        self.storage_available.set(1)
        self.storage_retries = Counter(
            "mqvox_worker_storage_retries",
            "Database operations tried again after the database was unavailable.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "mqvox_worker_latency_seconds",
            "From receipt to the answer ready to publish.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.real_time_factor = Histogram(
            "mqvox_worker_real_time_factor",
            "Recognition time of a batch over the length of its audio.",
            buckets=RTF_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mqvox_worker_batch_size",
            "Utterances transcribed together.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP on ``host:port`` (0 picks a free port); returns the port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        """Stop serving /metrics, if it was served."""
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
