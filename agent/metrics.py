"""Prometheus metrics of one agent, in a registry of its own (no process-wide singletons), and
the per-version request windows that probation reads."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.windows import VersionWindows

__all__ = ["AgentMetrics"]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class AgentMetrics:
    """Every metric the agent exports on ``/metrics``."""

    def __init__(self) -> None:
        # Not exported: probation cuts windows from these, Prometheus keeps its own counters.
        self.windows = VersionWindows()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edgefleet_agent_requests",
            "Inference requests answered, by the model and version that answered",
            ["model", "version", "fallback"],
            registry=r,
        )
        self.failures = Counter(
            "edgefleet_agent_request_failures",
            "Inference requests that failed, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "edgefleet_agent_fallbacks",
            "Requests the fallback model answered, by why the primary did not",
            ["model", "reason"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "edgefleet_agent_request_seconds",
            "Time from a request's arrival to its answer",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "edgefleet_agent_queue_seconds",
            "Time a request waited in the batch queue",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "edgefleet_agent_compute_seconds",
            "Time the runtime spent on one batch",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edgefleet_agent_batch_size",
            "Rows per model call",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "edgefleet_agent_model_info",
            "1 for each loaded model version, labelled with its runtime and devices",
            ["model", "version", "runtime", "requested_device", "device"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "edgefleet_agent_circuit_open",
            "1 while the primary model's circuit is open (fallback answering)",
            ["model"],
            registry=r,
        )
        # Set when a telemetry window is cut; a version without answers in it has none.
        self.window_latency_p95 = Gauge(
            "edgefleet_agent_window_latency_p95_seconds",
            "95th percentile latency of the version's answers in the last telemetry window",
            ["model", "version"],
            registry=r,
        )
        self.drift_psi = Gauge(
            "edgefleet_agent_drift_psi",
            "PSI of a feature or output in the last telemetry window against the bundle's "
            "reference",
            ["model", "version", "feature"],
            registry=r,
        )

    def observer(
        self, model: str, version: str, window: Callable[[int, int], None] | None = None
    ) -> Callable[[int, int, int], None]:
        """A batcher callback recording batch size, queue time and compute time; ``window``
        also gets each batch's rows and mean queue time (ns) for the telemetry window."""
        batch = self.batch_size.labels(model, version)
        queue = self.queue_seconds.labels(model, version)
        compute = self.compute_seconds.labels(model, version)

        def observe(rows: int, queue_ns: int, compute_ns: int) -> None:
            batch.observe(rows)
            queue.observe(queue_ns / 1e9)
            compute.observe(compute_ns / 1e9)
            if window is not None:
                window(rows, queue_ns)

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
