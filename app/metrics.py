"""Prometheus metrics, one registry per app (so that apps created side by side do not share series).

Counted as things happen: requests and their latency (by route template, method, model and status) and
the engine's batch sizes. Read when ``/metrics`` is scraped: queue depth, rejected requests, model load
time, whether the upload store answers, stored uploads and, on CUDA, the GPU memory in use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from app.errors import StoreUnavailable
from app.middleware import RequestRecord

if TYPE_CHECKING:
    from app.state import AppState

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Seconds: from a cached 404 to a large tiled image on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _ScrapeCollector(Collector):
    """Values that already live elsewhere (engine, store, torch), read at scrape time."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        engine = self.state.engine
        depth = GaugeMetricFamily("unetseg_queue_depth", "Requests waiting in the model's queue.", labels=["model"])
        rejected = CounterMetricFamily(
            "unetseg_rejected_requests",
            "Predictions refused with 503 because the model's queue was full.",
            labels=["model"],
        )
        if engine is not None:
            for name, m in engine.models.items():
                depth.add_metric([name], m.queue_depth)
                rejected.add_metric([name], m.stats.rejected)
        yield depth
        yield rejected
        load = GaugeMetricFamily(
            "unetseg_model_load_seconds",
            "Seconds to read and validate the model's bundle and warm it up on its device.",
            labels=["model"],
        )
        if engine is not None:
            for name, m in engine.models.items():
                load.add_metric([name], m.load_s)
        yield load
        store, gate = self.state.store, self.state.store_gate
        if store is not None and gate is not None:
            yield GaugeMetricFamily(
                "unetseg_store_up",
                "1 when the upload store (database and blobs) answered last time it was asked, else 0.",
                value=int(gate.health.reachable),
            )
            try:  # a store that does not answer costs the scrape a second, then nothing until it is back
                stats = gate.run_now(store.stats)
            except StoreUnavailable:
                stats = None
            if stats is not None:
                yield GaugeMetricFamily("unetseg_uploads_stored", "Uploads in the store.", value=stats.count)
                yield GaugeMetricFamily(
                    "unetseg_uploads_bytes", "Bytes of the uploads in the store.", value=stats.bytes
                )
        if engine is not None and engine.device.type == "cuda":
            device = str(engine.device)
            used = GaugeMetricFamily(
                "unetseg_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"]
            )
            used.add_metric([device], torch.cuda.memory_allocated(engine.device))
            yield used
            reserved = GaugeMetricFamily(
                "unetseg_gpu_memory_reserved_bytes",
                "GPU memory reserved by torch's caching allocator.",
                labels=["device"],
            )
            reserved.add_metric([device], torch.cuda.memory_reserved(engine.device))
            yield reserved


class Metrics:
    def __init__(self, state: AppState) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "method", "model", "status"]
        self.requests = Counter("unetseg_requests", "HTTP requests answered.", labels, registry=self.registry)
        self.latency = Histogram(
            "unetseg_request_duration_seconds",
            "Seconds from the request's arrival to the end of its response.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "unetseg_batch_size",
            "Inputs (images or tiles) per forward pass.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ScrapeCollector(state))

    def observe_request(self, record: RequestRecord) -> None:
        labels = (record.route, record.method, record.model or "", str(record.status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(record.duration_s)

    def observe_batch(self, model: str, size: int) -> None:
        """``ModelEngine.on_batch``: called from the engine's worker thread."""
        self.batch_size.labels(model).observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
