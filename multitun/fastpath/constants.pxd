# The data plane's constants, in one enum. The wire format's values must match
# multitun/wire.py (tests/test_codec.py checks that they do); the system's
# come from the kernel's headers (multitun/includes/linux.pxd) and reach
# Python through _fastpath.SYSTEM, never as copied literals.

cdef enum:
    # Version 1: no key, everything in clear. Version 2: --key-file, every
    # packet sealed (docs/PROTOCOL.md).
    VERSION_PLAIN = 1
    VERSION_SEALED = 2
    HEADER_LEN = 16
    MAX_PATHS = 16
    # Peers one server carries ([[peer]] tables in its config).
    MAX_PEERS = 1024
    T_DATA = 1
    T_PROBE = 2
    T_PROBE_REPLY = 3
    T_HANDSHAKE_INIT = 4
    T_HANDSHAKE_RESPONSE = 5
    T_HANDSHAKE_COOKIE = 6
    T_HANDSHAKE_RETRY = 7
    PROBE_MIN_PAYLOAD = 16
    PROBE_MAX_PAYLOAD = 64
    # A probe with this much payload asks for feedback in the reply: the
    # timestamp and number, then 16 bytes the peer fills in.
    PROBE_FEEDBACK_PAYLOAD = 32
    # The AEADs, chosen in the handshake (--cipher): AES-256-GCM (NIST SP
    # 800-38D) and ChaCha20-Poly1305 (RFC 8439), both with 32-byte keys,
    # 16-byte tags and 12-byte nonces.
    CIPHER_AES_256_GCM = 1
    CIPHER_CHACHA20_POLY1305 = 2
    KEY_LEN = 32
    TAG_LEN = 16
    NONCE_LEN = 12
    # Handshake messages (multitun/noise.py, keying.py, docs/PROTOCOL.md):
    # header + the key's fingerprint + ephemeral key + sealed ticket and
    # cipher offer; header + ephemeral key + sealed cipher choice and new
    # ticket; header + nonce + sealed ticket; header (the address token in
    # its sequence field) + the start of the first message's ephemeral key
    # (addresstoken.pxd). Each answer is shorter than the first message it
    # answers: no amplification.
    TICKET_LEN = 24
    FINGERPRINT_LEN = 8
    HANDSHAKE_INIT_LEN = HEADER_LEN + FINGERPRINT_LEN + 32 + TICKET_LEN + 1 + TAG_LEN
    HANDSHAKE_RESPONSE_LEN = HEADER_LEN + 32 + 1 + TICKET_LEN + TAG_LEN
    HANDSHAKE_COOKIE_LEN = HEADER_LEN + NONCE_LEN + TICKET_LEN + TAG_LEN
    RETRY_ECHO_LEN = 16
    HANDSHAKE_RETRY_LEN = HEADER_LEN + RETRY_ECHO_LEN
    # The largest UDP payload (RFC 768's 16-bit length less its 8-byte header,
    # less IPv4's 20: what every path can carry in one datagram).
    MAX_DATAGRAM = 65507
    # Packets handled per syscall batch. Only what is already queued is taken:
    # a batch is never waited for.
    BATCH = 64
    # One buffer slot holds the largest datagram (65535) plus our header and
    # an authentication tag.
    SLOT = 65536 + HEADER_LEN + TAG_LEN
    # Where packets wait in the engine (the TUN's reads, tun.pxi; packets for
    # the TUN, backlog.pxd), a flow's order is kept by flow buckets (keyed
    # fq_flow_of, modulo this): a packet waits if its bucket has one waiting.
    FLOW_BUCKETS = 256
    # With share_cpu, a loop that does not sleep lets the tasks waiting for
    # its CPU run once in this long (engine.pxi). Under one TCP stream on two
    # veth paths sharing two CPUs, 0.3 ms carried the stream about 1.1 times
    # as fast as 0.1 ms, ping's 99th percentile +0.7 ms over the bare path
    # instead of +0.5 (README.md, Performance).
    YIELD_EVERY_NS = 300000
    # A UDP GRO train holds this many datagrams at most (the kernel's
    # UDP_GRO_CNT_MAX, net/ipv4/udp_offload.c).
    GRO_TRAIN_MAX = 64
    # 1024 words = 65536 sequence numbers: at 100k packets/s the paths may
    # differ by 0.65 s of delay before a late first copy counts as too old.
    WINDOW_WORDS = 1024
    # Control packets held for Python between two returns of Engine.run(),
    # and the return addresses that send_back() may still answer: enough for
    # a server's handshake thread to answer its whole backlog
    # (handshake_thread.MAX_PENDING) while probe replies of a fleet come in.
    CTRL_SLOTS = 64
    REPLY_SLOTS = 1024
    # The largest control packet: a handshake's first message (a probe
    # reply is at most HEADER_LEN + PROBE_MAX_PAYLOAD, 80).
    CTRL_ROOM = HANDSHAKE_INIT_LEN
    # UDP GSO: datagrams per train (UDP_MAX_SEGMENTS is 64 on kernels before
    # 6.x) and bytes per train (an IPv4 datagram's payload is at most 65507).
    GSO_MAX_SEGMENTS = 64
    GSO_MAX_BYTES = 65000
    # Control-message room, in 64-bit words so that cmsghdr is aligned. To
    # send: a source address (IPV6_PKTINFO, 40 bytes) and a UDP_SEGMENT (24).
    # To receive: IP_PKTINFO (32) and IPV6_PKTINFO (40), both on a server
    # listening on '::' (cmsg(3), CMSG_SPACE), and a UDP_GRO (24); rounded up.
    # Whatever does not fit sets MSG_CTRUNC and the datagram is dropped.
    CMSG_WORDS = 8
    RX_CMSG_WORDS = 16
    # Return flags of Engine.run().
    WAKE_TIMEOUT = 1
    WAKE_FD = 2
    WAKE_CONTROL = 4
    WAKE_SIGNAL = 8
    WAKE_EVENT = 16
