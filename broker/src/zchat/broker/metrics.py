"""Prometheus metrics for the broker, on an optional HTTP port (``--metrics-port``).

Counters and gauges are not updated on the hot path: at scrape time a collector asks the
broker's loop (through :meth:`Broker.submit`, so it never reads state the loop is changing)
for :meth:`BrokerCore.snapshot`. Two histograms, store commit latency and loop turn time,
are observed once per loop turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: Help text of each snapshot figure.
HELP = {
    "sessions": "Live sessions.",
    "rooms": "Rooms with at least one member.",
    "members": "Room memberships (a session in three rooms counts three).",
    "requests_total": "Request frames read from the ROUTER.",
    "published_total": "Publications sent on the XPUB (events, ticks, sync markers).",
    "stored_total": "Messages committed to the store (a DM counts once per inbox).",
    "duplicates_total": "Resends answered with the original message.",
    "history_requests_total": "History requests.",
    "gap_fetches_total": "History requests with 'after': clients repairing gaps.",
    "commits_total": "Store transactions committed.",
    "commit_failures_total": "Store transactions refused (disk full, quota, I/O error).",
    "pruned_total": "Messages deleted by retention.",
    "sessions_opened_total": "Sessions opened.",
    "sessions_resumed_total": "Sessions taken over by their client from a new connection.",
    "sessions_expired_total": "Sessions ended by their heartbeat timeout.",
    "subscriptions_granted_total": "Subscriptions granted on the XPUB.",
    "subscriptions_denied_total": "Subscriptions refused (not a live room or private topic).",
    "subscriptions_deferred_total": "Subscriptions neither granted nor refused while libzmq could not place them.",
    "rate_limited_total": "Requests refused by flood control.",
    "loop_turns_total": "Turns of the broker's loop.",
    "last_commit_seconds": "Duration of the latest store commit.",
}


class _SnapshotCollector:
    """Turns :meth:`BrokerCore.snapshot` into metric families, asking the loop for it."""

    def __init__(self, snapshot: Callable[[], Future[dict[str, float]]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time

    def collect(self) -> Iterator[Metric]:
        figures = self._snapshot().result(timeout=2)
        errors = CounterMetricFamily("zchat_errors", "Error replies by code.", labels=["code"])
        for key, value in sorted(figures.items()):
            if key.startswith("errors_total:"):
                errors.add_metric([key.partition(":")[2]], value)
            elif key == "errors_total":
                continue
            elif key.endswith("_total"):
                yield CounterMetricFamily("zchat_" + key[: -len("_total")], HELP.get(key, key), value=value)
            else:
                yield GaugeMetricFamily("zchat_" + key, HELP.get(key, key), value=value)
        yield errors


class Metrics:
    """The broker's metrics registry, its HTTP endpoint and its per-turn histograms."""

    def __init__(self, snapshot: Callable[[], Future[dict[str, float]]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(snapshot))
        self.commit_seconds = Histogram(
            "zchat_store_commit_seconds",
            "Duration of store commits (one per loop turn that stored messages).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.turn_seconds = Histogram(
            "zchat_loop_turn_seconds",
            "Time the loop spends on a turn (reading, deciding, committing, sending).",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=self.registry,
        )
        self._server: Any = None
        self.port = 0

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a thread; return the port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
