# Layout of the data plane. Constants live in one enum; they must match
# multitun/wire.py (tests/test_codec.py checks that they do).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from .includes.linux cimport (
    epoll_event, iovec, mmsghdr, sockaddr_storage, socklen_t,
)
from .includes.openssl cimport EVP_CIPHER_CTX

cdef enum:
    # Version 1: no key, everything in clear. Version 2: --key-file, every
    # packet sealed (docs/PROTOCOL.md).
    VERSION_PLAIN = 1
    VERSION_SEALED = 2
    HEADER_LEN = 16
    MAX_PATHS = 16
    T_DATA = 1
    T_PROBE = 2
    T_PROBE_REPLY = 3
    T_HANDSHAKE_INIT = 4
    T_HANDSHAKE_RESPONSE = 5
    PROBE_MIN_PAYLOAD = 16
    PROBE_MAX_PAYLOAD = 64
    # AES-256-GCM (NIST SP 800-38D): 32-byte keys, 16-byte tags, 12-byte nonces.
    KEY_LEN = 32
    TAG_LEN = 16
    NONCE_LEN = 12
    # Handshake messages (multitun/noise.py): header + ephemeral key + sealed
    # timestamp; header + ephemeral key + empty sealed payload. A response is
    # shorter than the request it answers: no amplification.
    HANDSHAKE_INIT_LEN = HEADER_LEN + 32 + 8 + TAG_LEN
    HANDSHAKE_RESPONSE_LEN = HEADER_LEN + 32 + TAG_LEN
    # Key slots: what we send with; the one before it (its packets may still
    # be in flight); a responder's new keys, unused until the initiator shows
    # it has them (its first packet under them).
    K_CURRENT = 0
    K_PREVIOUS = 1
    K_NEXT = 2
    KEY_SLOTS = 3
    # Packets handled per syscall batch. Only what is already queued is taken:
    # a batch is never waited for.
    BATCH = 64
    # One buffer slot holds the largest datagram (65535) plus our header and
    # an authentication tag.
    SLOT = 65536 + HEADER_LEN + TAG_LEN
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
    # struct virtio_net_hdr (<linux/virtio_net.h>) before every packet on a
    # TUN opened with IFF_VNET_HDR: flags, gso_type, hdr_len, gso_size,
    # csum_start, csum_offset; the 16-bit fields in the host's byte order
    # (legacy virtio; drivers/net/tun_vnet.h).
    VNET_HDR_LEN = 10
    VNET_F_NEEDS_CSUM = 1
    VNET_GSO_NONE = 0
    VNET_GSO_TCPV4 = 1
    VNET_GSO_TCPV6 = 4
    VNET_GSO_UDP_L4 = 5
    VNET_GSO_ECN = 0x80
    # Coalesced TCP segments written to the TUN at once, at most; and the
    # room they take: an IPv6 packet's payload may be 65535 bytes, after a
    # 40-byte header and the virtio-net header.
    GRO_MAX_SEGMENTS = 64
    GRO_ROOM = VNET_HDR_LEN + 40 + 65535
    # Return flags of Engine.run().
    WAKE_TIMEOUT = 1
    WAKE_FD = 2
    WAKE_CONTROL = 4
    WAKE_SIGNAL = 8
    WAKE_EVENT = 16
    # epoll tags for the fds that are not path sockets.
    TAG_TUN = 1000
    TAG_WAKE = 1001

cdef struct Header:
    uint8_t version
    uint8_t ptype
    uint8_t path
    uint32_t session
    uint64_t seq

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

cdef struct VnetHdr:
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset

cdef struct GroRun:
    # TCP segments of one flow, coalescing in Engine.grobuf (after room for
    # a virtio-net header). len 0: no run.
    size_t len
    size_t iphl
    size_t hdrlen
    size_t mss
    uint32_t next_seq
    int segments
    bint closed
    bint v6

cdef struct Keypair:
    # id 0: the slot is empty. The id travels in the header's session field.
    uint32_t id
    EVP_CIPHER_CTX *seal
    EVP_CIPHER_CTX *open
    # The sequence number is the nonce: never reused under one key.
    uint64_t tx_seq
    uint64_t installed_ns
    uint64_t last_rx_ns
    uint64_t rx_packets
    # The replay window of this key's packets (de-duplication too).
    Window win

cdef struct ReturnAddress:
    # Where a control packet came from, to answer it before its path is
    # known (a handshake from a client the server has not learned yet).
    int fd
    sockaddr_storage addr
    socklen_t addrlen
    uint64_t cmsg[CMSG_WORDS]
    size_t cmsglen

cdef struct ControlPacket:
    int path
    uint64_t rx_ns
    size_t length
    uint8_t data[HEADER_LEN + PROBE_MAX_PAYLOAD]
    ReturnAddress source

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
    # Sealed mode (version 2): keys installed by the control plane.
    cdef bint keyed
    cdef Keypair keyring[KEY_SLOTS]
    cdef sockaddr_storage rejected_addr
    cdef TunnelCounters ctr
    cdef ControlPacket ctrl[CTRL_SLOTS]
    cdef int nctrl
    # An endpoint was learned, a peer session adopted or a path refused UDP GSO
    # since run() last returned.
    cdef bint event
    # After activity, poll this long before sleeping in epoll_wait (0: never).
    cdef uint64_t busy_poll_ns
    # The TUN carries virtio-net headers (IFF_VNET_HDR): TSO segments to
    # split on the way out, TCP segments to coalesce on the way in.
    cdef bint vnet
    cdef int ntx
    cdef uint8_t *gsobuf
    cdef uint8_t *grobuf
    cdef GroRun gro
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
    cdef void _from_vnet(self, uint8_t *p, size_t n) noexcept nogil
    cdef void _segment_tcp(self, const uint8_t *pkt, size_t n, size_t mss, bint v6) noexcept nogil
    cdef void _segment_udp(self, const uint8_t *pkt, size_t n, size_t mss) noexcept nogil
    cdef void _stage(self, size_t n) noexcept nogil
    cdef void _flush_tx(self) noexcept nogil
    cdef void _to_tun(self, uint8_t *pkt, size_t n) noexcept nogil
    cdef bint _coalesce(self, const uint8_t *pkt, size_t n, size_t iphl, size_t hdrlen) noexcept nogil
    cdef void _flush_gro(self) noexcept nogil
    cdef bint _write_tun(self, uint8_t *buf, size_t n) noexcept nogil
    cdef void _send_batch(self, int path, int n) noexcept nogil
    cdef int _group(self, Endpoint *ep, int first, int n) noexcept nogil
    cdef int _send_one(self, int path, const uint8_t *data, size_t n) noexcept nogil
    cdef int _paths_to_tun(self, int sock) noexcept nogil
    cdef void _receive(self, int sock, uint8_t *p, size_t n, mmsghdr *m, uint64_t now) noexcept nogil
    cdef void _receive_plain(self, int sock, Header *h, uint8_t *p, size_t n, mmsghdr *m, uint64_t now) noexcept nogil
    cdef void _receive_sealed(self, int sock, Header *h, uint8_t *p, size_t n, mmsghdr *m, uint64_t now) noexcept nogil
    cdef void _count_rx(self, int path, size_t n, uint64_t now) noexcept nogil
    cdef void _deliver(self, int path, int verdict, uint8_t *p, size_t n) noexcept nogil
    cdef void _on_probe(self, int path, Header *h, uint8_t *p, size_t n, mmsghdr *m, uint64_t now) noexcept nogil
    cdef Keypair *_keypair(self, uint32_t id) noexcept nogil
    cdef void _confirmed(self, Keypair *kp) noexcept nogil
    cdef void _rejected(self, mmsghdr *m) noexcept nogil
    cdef size_t _put_probe(self, uint8_t *p, uint8_t ptype, int path, uint64_t number,
                           const uint8_t *payload, size_t payload_len) noexcept nogil
    cdef int _endpoint_for(self, int sock, int path, mmsghdr *m) noexcept nogil
    cdef void _learn(self, int sock, int path, mmsghdr *m) noexcept nogil
    cdef void _adopt_session(self, uint32_t session) noexcept nogil
    cdef void _queue_control(self, int path, uint8_t *pkt, size_t n, uint64_t now,
                             int fd, mmsghdr *m) noexcept nogil
