"""Every counter the tunnel reports, with what it counts: the one list that
`multitun status --json` and the Prometheus metrics are made from.

The data plane counts (``Engine.stats()`` for the tunnel,
``Engine.peer_stats()`` per peer, ``Engine.paths()`` per path); the keying
counts handshakes. A counter added to the engine is
reported once it is named here.
"""

from __future__ import annotations

TUNNEL_COUNTERS = {
    "tun_rx_packets": "Packets read from the TUN device and sent",
    "tun_rx_bytes": "Bytes read from the TUN device and sent",
    "tun_batches": "Batches of packets read from the TUN device",
    "rx_batches": "Batches of datagrams received from the paths",
    "delivered": "Packets delivered to the TUN device",
    "delivered_bytes": "Bytes delivered to the TUN device",
    "duplicates": "Duplicate copies dropped",
    "too_old": "Packets dropped as older than the de-duplication window",
    "malformed": "Datagrams dropped as malformed",
    "truncated": "Datagrams whose control data was cut short, dropped",
    "wrong_session": "Data of another session than the peer's current one, dropped",
    "unknown_source": "Data from an address that is not its path's endpoint, dropped",
    "tun_write_errors": "Packets the TUN device refused",
    "no_route": "Packets from the TUN device to an address in no peer's allowed IPs, dropped",
    "control_dropped": "Control packets dropped while the control queue was full",
    "handshakes_shed": "Handshake messages over their source's rate, dropped before the control plane",
    "handshake_retries": "First messages answered with a RETRY under load (their source had "
                         "not proved its address), never seen by the control plane",
    "session_changes": "Times the peer's session changed (the peer started or restarted)",
    "endpoint_changes": "Times a path's endpoint was learned or moved",
    "auth_failed": "Sealed packets that failed authentication, dropped",
    "key_mismatch": "Packets of the other mode (a key on one end only), dropped",
    "no_key": "Packets from the TUN device dropped for want of session keys",
    "key_changes": "Times new session keys were put in use",
    "tun_gso_reads": "Segments read whole from the TUN device and split here",
    "tun_gso_dropped": "Segments from the TUN device that could not be split, dropped",
    "gro_writes": "Coalesced segments written to the TUN device",
    "gro_coalesced": "Packets coalesced into those segments",
    "cpu_yields": "With --low-latency: times the engine, busy without sleeping, let the tasks "
                  "waiting for its CPU run (every 0.3 ms)",
}

PATH_COUNTERS = {
    "tx_packets": "Datagrams sent on the path",
    "tx_bytes": "Bytes sent on the path",
    "rx_packets": "Datagrams received on the path",
    "rx_bytes": "Bytes received on the path",
    "first_arrivals": "Packets delivered whose first copy came by this path",
    "duplicates": "Later copies received on this path and dropped (in clear; sealed, copies "
                  "are dropped before they prove authentic and count for the tunnel only)",
    "send_errors": "Datagrams the path refused to send",
    "send_dropped": "Datagrams dropped because the path's socket buffer was full",
    "recv_errors": "Errors reported when receiving on the path",
    "gso_fallbacks": "UDP GSO trains the path refused (it then sends datagrams one by one)",
    "aqm_dropped": "Datagrams the paced path's own queue dropped (CoDel, or over its limit)",
    "stale_dropped": "Copies dropped from the paced path's queue as stale: another path "
                     "would deliver the packet sooner",
}

PEER_COUNTERS = {
    "routed_packets": "Packets from the TUN device sent to the peer",
    "routed_bytes": "Bytes from the TUN device sent to the peer",
    "delivered": "Packets from the peer delivered to the TUN device",
    "delivered_bytes": "Bytes from the peer delivered to the TUN device",
    "source_refused": "Authentic packets from the peer whose inner source is not in its "
                      "allowed IPs, dropped",
}

FLEET_COUNTERS = {
    "handshake_unknown_key": "First messages to a fleet server made with a key no peer has",
}

HANDSHAKE_COUNTERS = {
    "handshakes": "Handshakes completed (client) or answered (server)",
    "handshake_auth_failed": "Handshake messages that failed authentication",
    "handshake_replayed": "Handshake messages refused as replays",
    "handshake_rate_limited": "Handshake messages over the rate limit, unanswered",
    "handshake_cookies": "First messages without a fresh ticket, answered with a cookie",
}
