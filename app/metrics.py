"""Prometheus metrics, one registry per app (so that apps created side by side do not share series).

Counted as things happen: requests and their latency (by route template, method, model and status). Read
when ``/metrics`` is scraped: the engine's batch sizes, queue depth, rejected requests, model load time,
whether the upload store answers, stored uploads and, on CUDA, the GPU memory in use.

With several HTTP front ends (``unetseg serve --workers N``) each process counts its own requests in
Prometheus's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor) and any of them
answers ``/metrics`` with the sum over all; the engine's values come from the one engine process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
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


def batch_histogram(counts: dict[int, int]) -> tuple[list[tuple[str, float]], float]:
    """Forward passes by batch size -> cumulative (le, count) buckets and the sum of sizes."""
    buckets = [(str(float(le)), float(sum(n for size, n in counts.items() if size <= le))) for le in BATCH_BUCKETS]
    buckets.append(("+Inf", float(sum(counts.values()))))
    return buckets, float(sum(size * n for size, n in counts.items()))


class _ScrapeCollector(Collector):
    """Values that already live elsewhere (engine, store), read at scrape time."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        engine = self.state.engine
        models = dict(engine.models) if engine is not None else {}
        batches = HistogramMetricFamily(
            "unetseg_batch_size", "Inputs (images or tiles) per forward pass.", labels=["model"]
        )
        depth = GaugeMetricFamily("unetseg_queue_depth", "Requests waiting in the model's queue.", labels=["model"])
        rejected = CounterMetricFamily(
            "unetseg_rejected_requests",
            "Predictions refused with 503 because the model's queue was full.",
            labels=["model"],
        )
        load = GaugeMetricFamily(
            "unetseg_model_load_seconds",
            "Seconds to read and validate the model's bundle and warm it up on its device.",
            labels=["model"],
        )
        for name, m in models.items():
            buckets, total = batch_histogram(m.batch_counts())
            batches.add_metric([name], buckets, total)
            depth.add_metric([name], m.queue_depth)
            rejected.add_metric([name], m.rejected)
            load.add_metric([name], m.load_s)
        yield from (batches, depth, rejected, load)
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
        gpu = engine.gpu_memory() if engine is not None else {}
        if gpu:
            used = GaugeMetricFamily(
                "unetseg_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"]
            )
            reserved = GaugeMetricFamily(
                "unetseg_gpu_memory_reserved_bytes",
                "GPU memory reserved by torch's caching allocator.",
                labels=["device"],
            )
            for device, (allocated, held) in gpu.items():
                used.add_metric([device], allocated)
                reserved.add_metric([device], held)
            yield used
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
        self.scraped = _ScrapeCollector(state)
        self.registry.register(self.scraped)
        # Several front ends: their request series are summed from the multiprocess files at each scrape.
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def observe_request(self, record: RequestRecord) -> None:
        labels = (record.route, record.method, record.model or "", str(record.status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(record.duration_s)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(self.scraped)
        return generate_latest(registry)
