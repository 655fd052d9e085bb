"""The Prometheus metrics of the service (names, units and labels of DESIGN.md), on one registry."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Latencies here span ~1 ms (a queued small-model batch) to seconds (overload, emulated ARM).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip


class Metrics:
    """Every metric the service exports; one instance per app, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "mnv3_request_duration_seconds",
            "Time from request received to reply ready, per protocol, method and status code.",
            ["protocol", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mnv3_queue_wait_seconds",
            "Time an image waited in the batch queue before its batch started computing.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "mnv3_preprocess_duration_seconds",
            "Time to decode, resize, crop and normalise one image.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "mnv3_inference_duration_seconds",
            "Time ONNX Runtime took for one batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mnv3_batch_size",
            "Number of images in each batch sent to the model.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
            registry=r,
        )
        self.queue_depth = Gauge(
            "mnv3_queue_depth",
            "Images waiting in the batch queue right now.",
            registry=r,
        )
        self.inflight = Gauge(
            "mnv3_inflight_requests",
            "Requests being handled right now, all protocols.",
            registry=r,
        )
        self.rejected = Counter(
            "mnv3_requests_rejected_total",
            "Requests refused before compute, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in ("queue_full", "deadline", "not_ready"):
            self.rejected.labels(reason=reason)  # present at 0, so rate() and alerts see them
        self.model_info = Info(
            "mnv3_model",
            "The model being served: architecture, weights source and version.",
            registry=r,
        )

    # The batcher reports through these three methods (its BatchObserver protocol), so it
    # stays ignorant of Prometheus.
    def on_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def on_batch(self, size: int, queue_waits: Sequence[float], seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)
        for wait in queue_waits:
            self.queue_wait.observe(wait)
