"""``--metrics HOST:PORT``: the status figures in Prometheus text format.

prometheus-client serves scrapes from its own thread. That thread reads only
the last snapshot the tunnel's loop published (a dict replaced whole, never
changed in place), so it never touches the data plane.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .counters import (
    FLEET_COUNTERS, HANDSHAKE_COUNTERS, PATH_COUNTERS, PEER_COUNTERS, TUNNEL_COUNTERS,
)
from .errors import SetupError

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
except ImportError:  # an optional extra: multitun[metrics]
    CollectorRegistry = None


class _Collector:
    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        st = self.snapshot()
        yield InfoMetricFamily("multitun", "This multitun instance",
                               value={"role": st["role"], "dev": st["dev"],
                                      "version": st["version"]})
        # Every path series names its peer: a fleet server's peer's name, or
        # "" (which PromQL reads as no label) when there is one peer.
        fleet = st.get("peers") is not None
        views = st["peers"] if fleet else [{"name": "", "paths": st["paths"],
                                             "security": st["security"]}]
        labels = ["peer", "path", "remote"]
        up = GaugeMetricFamily("multitun_path_up", "1 if the path answers probes", labels=labels)
        rtt = GaugeMetricFamily("multitun_path_rtt_seconds", "Smoothed probe round trip",
                                labels=labels)
        rtt_min = GaugeMetricFamily("multitun_path_rtt_min_seconds", "Lowest probe round trip",
                                    labels=labels)
        jitter = GaugeMetricFamily("multitun_path_jitter_seconds", "Probe round-trip jitter",
                                   labels=labels)
        loss = GaugeMetricFamily("multitun_path_loss_ratio", "Probes lost, recent window",
                                 labels=labels)
        capacity = GaugeMetricFamily("multitun_path_capacity_bits_per_second",
                                     "Largest delivery rate lately (probe feedback)",
                                     labels=labels)
        queue_delay = GaugeMetricFamily("multitun_path_queue_delay_seconds",
                                        "Queueing delay at the path's bottleneck, estimated",
                                        labels=labels)
        pacing = GaugeMetricFamily("multitun_path_pacing_bits_per_second",
                                   "Rate the path is paced at (absent: not paced)",
                                   labels=labels)
        held = GaugeMetricFamily("multitun_path_queue_packets",
                                 "Packets held in the paced path's own queue", labels=labels)
        wait = GaugeMetricFamily("multitun_path_queue_wait_seconds",
                                 "How long the oldest packet in that queue has waited",
                                 labels=labels)
        counters = {k: CounterMetricFamily(f"multitun_path_{k}", doc, labels=labels)
                    for k, doc in PATH_COUNTERS.items()}
        for view, p in ((v, p) for v in views for p in v["paths"]):
            values = [view["name"], p["name"], p["remote"] or ""]
            up.add_metric(values, 1.0 if p["state"] == "up" else 0.0)
            for family, key, scale in ((rtt, "rtt_ms", 1e-3), (rtt_min, "rtt_min_ms", 1e-3),
                                       (jitter, "jitter_ms", 1e-3), (loss, "loss_pct", 1e-2),
                                       (capacity, "capacity_mbit", 1e6),
                                       (queue_delay, "queue_delay_ms", 1e-3),
                                       (pacing, "pacing_mbit", 1e6), (held, "queue_packets", 1),
                                       (wait, "queue_wait_ms", 1e-3)):
                if p[key] is not None:
                    family.add_metric(values, p[key] * scale)
            for key, family in counters.items():
                family.add_metric(values, p[key])
        yield from (up, rtt, rtt_min, jitter, loss, capacity, queue_delay, pacing, held, wait,
                    *counters.values())
        for key, doc in TUNNEL_COUNTERS.items():
            yield CounterMetricFamily(f"multitun_{key}", doc, value=st["tunnel"][key])
        if fleet:
            yield from self._peers(views)
            for key, doc in FLEET_COUNTERS.items():
                yield CounterMetricFamily(f"multitun_{key}", doc, value=st["security"][key])
        keyed = [v for v in views if v["security"]["keyed"]]
        if keyed:
            handshakes = {k: CounterMetricFamily(f"multitun_{k}", doc, labels=["peer"])
                          for k, doc in HANDSHAKE_COUNTERS.items()}
            age = GaugeMetricFamily("multitun_key_age_seconds", "Age of the current keys",
                                    labels=["peer"])
            for v in keyed:
                for key, family in handshakes.items():
                    family.add_metric([v["name"]], v["security"][key])
                if v["security"]["key_age_s"] is not None:
                    age.add_metric([v["name"]], v["security"]["key_age_s"])
            yield from (*handshakes.values(), age)

    @staticmethod
    def _peers(views: list[dict]) -> Iterator:
        """A fleet server's figures per peer."""
        up = GaugeMetricFamily("multitun_peer_paths_up", "Paths of the peer that answer probes",
                               labels=["peer"])
        counters = {k: CounterMetricFamily(f"multitun_peer_{k}", doc, labels=["peer"])
                    for k, doc in PEER_COUNTERS.items()}
        for v in views:
            up.add_metric([v["name"]], v["paths_up"])
            for key, family in counters.items():
                family.add_metric([v["name"]], v[key])
        yield from (up, *counters.values())


class MetricsServer:
    def __init__(self, host: str, port: int, snapshot: Callable[[], dict]) -> None:
        if CollectorRegistry is None:
            raise SetupError("--metrics needs prometheus-client (multitun's 'metrics' extra)")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot))
        try:
            self.server, self.thread = start_http_server(port, host, registry=registry)
        except OSError as e:
            raise SetupError(f"--metrics: cannot listen on {host} port {port}: {e.strerror}") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
