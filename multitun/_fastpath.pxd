# Layout of the data plane. Constants live in one enum; they must match
# multitun/wire.py (tests/test_codec.py checks that they do).

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from .includes.linux cimport (
    epoll_event, iovec, mmsghdr, sockaddr_storage, socklen_t,
)

cdef enum:
    VERSION = 1
    HEADER_LEN = 16
    MAX_PATHS = 16
    T_DATA = 1
    T_PROBE = 2
    T_PROBE_REPLY = 3
    PROBE_MIN_PAYLOAD = 8
    PROBE_MAX_PAYLOAD = 64
    # Packets handled per syscall batch. Only what is already queued is taken:
    # a batch is never waited for.
    BATCH = 64
    # One buffer slot holds the largest datagram (65535) plus our header.
    SLOT = 65536 + HEADER_LEN
    # 1024 words = 65536 sequence numbers: at 100k packets/s the paths may
    # differ by 0.65 s of delay before a late first copy counts as too old.
    WINDOW_WORDS = 1024
    CTRL_SLOTS = 64
    # UDP GSO: datagrams per train (UDP_MAX_SEGMENTS is 64 on kernels before
    # 6.x) and bytes per train (an IPv4 datagram's payload is at most 65507).
    GSO_MAX_SEGMENTS = 64
    GSO_MAX_BYTES = 65000
    # Control-message room, in 64-bit words so that cmsghdr is aligned: a
    # source address (IPV6_PKTINFO, 40 bytes) and a UDP_SEGMENT (24).
    CMSG_WORDS = 8
    CMSG_ROOM = CMSG_WORDS * 8
    # Return flags of Engine.run().
    WAKE_TIMEOUT = 1
    WAKE_FD = 2
    WAKE_CONTROL = 4
    WAKE_SIGNAL = 8
    WAKE_EVENT = 16
    # epoll tags for the fds that are not path sockets.
    TAG_TUN = 1000
    TAG_WAKE = 1001

cdef struct Window:
    uint64_t top
    uint64_t words[WINDOW_WORDS]

cdef struct PathCounters:
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t rx_packets
    uint64_t rx_bytes
    uint64_t first_arrivals
    uint64_t duplicates
    uint64_t send_errors
    uint64_t recv_errors
    int last_errno
    uint64_t last_rx_ns

cdef struct Endpoint:
    # fd < 0: no endpoint known for this path (server before learning).
    int fd
    # Client sockets are connect()ed: no destination in sendmmsg, and the
    # kernel drops datagrams from any other source.
    bint connected
    sockaddr_storage addr
    socklen_t addrlen
    # Server on a wildcard address: IP_PKTINFO/IPV6_PKTINFO to send from the
    # address the peer wrote to (a reply from another address would be dropped
    # by the peer's connected socket).
    uint64_t cmsg[CMSG_WORDS]
    size_t cmsglen
    uint64_t learned
    # Send trains with UDP_SEGMENT; cleared for good if the path refuses one.
    bint gso
    PathCounters c

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
    uint64_t wrong_session
    uint64_t unknown_source
    uint64_t tun_write_errors
    uint64_t send_dropped
    uint64_t control_dropped
    uint64_t gso_fallbacks
    uint64_t session_changes
    uint64_t endpoint_changes

cdef struct ControlPacket:
    int path
    uint64_t rx_ns
    size_t length
    uint8_t data[HEADER_LEN + PROBE_MAX_PAYLOAD]

cdef class ReplayWindow:
    cdef Window w

cdef class Engine:
    cdef int epfd
    cdef int tun_fd
    cdef bint server
    cdef int nsocks
    cdef int socks[MAX_PATHS]
    cdef Endpoint eps[MAX_PATHS]
    cdef uint32_t session
    cdef uint32_t peer_session
    cdef uint32_t prev_session
    cdef uint64_t tx_seq
    cdef Window win
    cdef TunnelCounters ctr
    cdef ControlPacket ctrl[CTRL_SLOTS]
    cdef int nctrl
    # An endpoint was learned, a peer session adopted or a path refused UDP GSO
    # since run() last returned.
    cdef bint event
    # After activity, poll this long before sleeping in epoll_wait (0: never).
    cdef uint64_t busy_poll_ns
    # Buffers, allocated once.
    cdef uint8_t *txbuf
    cdef size_t txlen[BATCH]
    cdef iovec txiov[BATCH]
    cdef mmsghdr txmsg[BATCH]
    cdef int txfirst[BATCH]
    cdef uint64_t txctl[BATCH][CMSG_WORDS]
    cdef uint8_t *rxbuf
    cdef iovec rxiov[BATCH]
    cdef mmsghdr rxmsg[BATCH]
    cdef sockaddr_storage rxaddr[BATCH]
    cdef uint64_t rxcmsg[BATCH][CMSG_WORDS]

    cdef int _run(self, int timeout_ms) noexcept nogil
    cdef int _tun_to_paths(self) noexcept nogil
    cdef void _send_batch(self, int path, int n) noexcept nogil
    cdef int _group(self, Endpoint *ep, int first, int n) noexcept nogil
    cdef int _send_one(self, int path, const uint8_t *data, size_t n) noexcept nogil
    cdef int _paths_to_tun(self, int sock) noexcept nogil
    cdef void _receive(self, int sock, uint8_t *p, size_t n, mmsghdr *m, uint64_t now) noexcept nogil
    cdef int _endpoint_for(self, int sock, int path, mmsghdr *m) noexcept nogil
    cdef void _learn(self, int sock, int path, mmsghdr *m) noexcept nogil
    cdef void _adopt_session(self, uint32_t session) noexcept nogil
    cdef void _reply_probe(self, int path, uint8_t *pkt, size_t n) noexcept nogil
    cdef void _queue_control(self, int path, uint8_t *pkt, size_t n, uint64_t now) noexcept nogil
