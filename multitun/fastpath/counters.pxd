# The counters the data plane keeps: the one place their names are written
# in C. Engine.stats() and Engine.paths() hand them up as dicts, and
# multitun/counters.py documents each (tests/test_counters.py proves the two
# lists are the same, so none is kept and never shown).

from libc.stdint cimport uint64_t

cdef struct PathCounters:
    uint64_t tx_packets
    uint64_t tx_bytes
    # Only datagrams that passed the endpoint check, and sealed, proved
    # authentic: a replayed copy moves neither these nor last_rx_ns.
    uint64_t rx_packets
    uint64_t rx_bytes
    uint64_t first_arrivals
    uint64_t duplicates
    uint64_t send_errors
    # Socket buffer full: dropped rather than stall every path.
    uint64_t send_dropped
    uint64_t recv_errors
    # UDP GSO trains the path refused (then sent datagram by datagram).
    uint64_t gso_fallbacks
    # A paced path's queue (shaper.pxi): dropped by CoDel or on overflow,
    # and copies dropped as stale (another path would deliver them sooner).
    uint64_t aqm_dropped
    uint64_t stale_dropped

cdef struct TunnelCounters:
    uint64_t tun_rx_packets
    uint64_t tun_rx_bytes
    uint64_t tun_batches
    uint64_t rx_batches
    uint64_t delivered
    uint64_t delivered_bytes
    uint64_t duplicates
    uint64_t too_old
    uint64_t malformed
    # Control data cut short (MSG_CTRUNC): the source address or the GRO
    # segment size may be missing, so the datagram cannot be trusted.
    uint64_t truncated
    uint64_t wrong_session
    uint64_t unknown_source
    uint64_t tun_write_errors
    # A fleet server: packets from the TUN whose destination is in no
    # peer's allowed IPs, dropped.
    uint64_t no_route
    uint64_t control_dropped
    # Handshake messages over their source's rate (limiter.pxd), dropped.
    uint64_t handshakes_shed
    # First messages answered with a RETRY (addresstoken.pxd): under load,
    # from a source that had not proved its address.
    uint64_t handshake_retries
    uint64_t session_changes
    uint64_t endpoint_changes
    # Sealed mode: failed authentication, and packets of the other mode (a
    # peer with no key while we have one, or the reverse).
    uint64_t auth_failed
    uint64_t key_mismatch
    uint64_t no_key
    uint64_t key_changes
    # TUN offloads: segments read whole and split here, and packets that
    # arrived as several and were written to the TUN as one.
    uint64_t tun_gso_reads
    uint64_t tun_gso_dropped
    uint64_t gro_writes
    uint64_t gro_coalesced
    # --low-latency (share_cpu): times the loop, busy without sleeping, let
    # the tasks waiting for its CPU run (engine.pxi).
    uint64_t cpu_yields
