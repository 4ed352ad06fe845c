"""Every counter the data plane keeps is reported, and nothing is reported
that it does not keep: multitun/counters.py against a real engine's."""

from multitun.counters import PATH_COUNTERS, PEER_COUNTERS, TUNNEL_COUNTERS
from multitun.lab.engine_pair import EnginePair

# What Engine.stats() and Engine.paths() carry besides counters.
TUNNEL_STATE = {"session", "peer_session", "tx_seq", "keyed", "key_id", "rejected_from"}
PATH_STATE = {"path", "active", "udp_gso", "udp_gso_max", "remote", "last_errno", "last_rx_ns",
              "paced_rate", "queue_packets", "queue_bytes", "queue_sojourn_ns"}
PEER_STATE = {"key_id", "key_changes"}


def test_the_engine_counts_what_is_reported():
    pair = EnginePair()
    try:
        engine = pair.engines[0]
        assert set(engine.stats()) == set(TUNNEL_COUNTERS) | TUNNEL_STATE
        (path,) = engine.paths()
        assert set(path) == set(PATH_COUNTERS) | PATH_STATE
        assert set(engine.peer_stats()) == set(PEER_COUNTERS) | PEER_STATE
    finally:
        pair.close()
