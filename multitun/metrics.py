"""``--metrics HOST:PORT``: the status figures in Prometheus text format.

prometheus-client serves scrapes from its own thread. That thread reads only
the last snapshot the tunnel's loop published (a dict replaced whole, never
changed in place), so it never touches the data plane.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .errors import SetupError

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
except ImportError:  # an optional extra: multitun[metrics]
    CollectorRegistry = None

PATH_COUNTERS = {
    "tx_packets": "Datagrams sent on the path",
    "tx_bytes": "Bytes sent on the path",
    "rx_packets": "Datagrams received on the path",
    "rx_bytes": "Bytes received on the path",
    "first_arrivals": "Packets delivered whose first copy came by this path",
    "duplicates": "Later copies received on this path and dropped",
    "send_errors": "Datagrams the path refused to send",
}
TUNNEL_COUNTERS = {
    "tun_rx_packets": "Packets read from the TUN device and sent",
    "delivered": "Packets delivered to the TUN device",
    "delivered_bytes": "Bytes delivered to the TUN device",
    "duplicates": "Duplicate copies dropped",
    "too_old": "Packets dropped as older than the de-duplication window",
    "malformed": "Datagrams dropped as malformed",
    "wrong_session": "Data of another session than the peer's current one, dropped",
    "unknown_source": "Data from an address that is not its path's endpoint, dropped",
    "tun_write_errors": "Packets the TUN device refused",
    "auth_failed": "Sealed packets that failed authentication, dropped",
    "key_mismatch": "Packets of the other mode (a key on one end only), dropped",
    "no_key": "Packets from the TUN device dropped for want of session keys",
}
SECURITY_COUNTERS = {
    "handshakes": "Handshakes completed (client) or answered (server)",
    "handshake_auth_failed": "Handshake messages that failed authentication",
    "handshake_replayed": "Handshake messages refused as replays",
    "handshake_rate_limited": "Handshake messages over the rate limit, unanswered",
}


class _Collector:
    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        st = self.snapshot()
        yield InfoMetricFamily("multitun", "This multitun instance",
                               value={"role": st["role"], "dev": st["dev"],
                                      "version": st["version"]})
        labels = ["path", "remote"]
        up = GaugeMetricFamily("multitun_path_up", "1 if the path answers probes", labels=labels)
        rtt = GaugeMetricFamily("multitun_path_rtt_seconds", "Smoothed probe round trip",
                                labels=labels)
        rtt_min = GaugeMetricFamily("multitun_path_rtt_min_seconds", "Lowest probe round trip",
                                    labels=labels)
        jitter = GaugeMetricFamily("multitun_path_jitter_seconds", "Probe round-trip jitter",
                                   labels=labels)
        loss = GaugeMetricFamily("multitun_path_loss_ratio", "Probes lost, recent window",
                                 labels=labels)
        counters = {k: CounterMetricFamily(f"multitun_path_{k}", doc, labels=labels)
                    for k, doc in PATH_COUNTERS.items()}
        for p in st["paths"]:
            values = [p["name"], p["remote"] or ""]
            up.add_metric(values, 1.0 if p["state"] == "up" else 0.0)
            for family, key, scale in ((rtt, "rtt_ms", 1e-3), (rtt_min, "rtt_min_ms", 1e-3),
                                       (jitter, "jitter_ms", 1e-3), (loss, "loss_pct", 1e-2)):
                if p[key] is not None:
                    family.add_metric(values, p[key] * scale)
            for key, family in counters.items():
                family.add_metric(values, p[key])
        yield from (up, rtt, rtt_min, jitter, loss, *counters.values())
        for key, doc in TUNNEL_COUNTERS.items():
            yield CounterMetricFamily(f"multitun_{key}", doc, value=st["tunnel"][key])
        security = st["security"]
        if security["keyed"]:
            for key, doc in SECURITY_COUNTERS.items():
                yield CounterMetricFamily(f"multitun_{key}", doc, value=security[key])
            if security["key_age_s"] is not None:
                yield GaugeMetricFamily("multitun_key_age_seconds", "Age of the current keys",
                                        value=security["key_age_s"])


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
