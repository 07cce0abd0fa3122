"""Prometheus metrics of the server, in a registry of their own (one per app, so tests can build several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("convnets_inference_requests", "inference requests received", ["model"],
                                registry=self.registry)  # fmt: skip
        self.failures = Counter("convnets_inference_failures", "inference requests answered with an error",
                                ["model", "code"], registry=self.registry)  # fmt: skip
        self.latency = Histogram("convnets_inference_latency_seconds", "request latency, body read to response",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.queue_time = Histogram("convnets_queue_time_seconds", "time a request waited for its batch to start",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        sizes = sorted({2**i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.batch_size = Histogram("convnets_batch_size", "rows per forward pass of the dynamic batcher",
                                    ["model"], buckets=sizes, registry=self.registry)  # fmt: skip
        # Similar-image search (serve --index): the same measures, apart, so that the infer ones keep their meaning.
        self.similar_requests = Counter("convnets_similar_requests", "similar-image requests received", ["model"],
                                        registry=self.registry)  # fmt: skip
        self.similar_failures = Counter("convnets_similar_failures", "similar-image requests answered with an error",
                                        ["model", "code"], registry=self.registry)  # fmt: skip
        self.similar_latency = Histogram("convnets_similar_latency_seconds", "similar-image request latency, body "
                                         "read to response (embedding and index search)", ["model"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.similar_queue_time = Histogram("convnets_similar_queue_time_seconds", "time a similar-image request "
                                            "waited for its embedding batch to start", ["model"],
                                            buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.similar_batch_size = Histogram("convnets_similar_batch_size", "rows per forward pass of the embedding "
                                            "batcher", ["model"], buckets=sizes, registry=self.registry)  # fmt: skip

    def infer_totals(self, model: str) -> tuple[int, int, int]:
        """Inference requests received, answered, and answered with an error so far (the line the server logs
        when it stops: received equals answered when none was dropped)."""
        value = self.registry.get_sample_value
        received = value("convnets_inference_requests_total", {"model": model}) or 0
        succeeded = value("convnets_inference_latency_seconds_count", {"model": model}) or 0
        failed = sum(s.value for m in self.failures.collect() for s in m.samples
                     if s.name.endswith("_total") and s.labels["model"] == model)  # fmt: skip
        return int(received), int(succeeded + failed), int(failed)
