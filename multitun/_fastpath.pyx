# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The multitun data plane, one compiled module made of parts.

One ``Engine`` moves packets between a TUN fd and the path sockets:

    TUN --read()--> [split] --> header [--seal] --sendmmsg()--> every path
    path socket --recvmmsg()--> check header, source, key or session --> window
        [--open] --> [coalesce] --write()--> TUN

``Engine.run()`` loops under ``nogil`` until its timeout, a wake-up fd turns
readable (Python's signal.set_wakeup_fd), or control packets are waiting for
Python. Nothing in the loop creates a Python object; buffers are allocated
once. Syscall errors become OSError only after the GIL is back. A send error
on one path is counted against that path and never ends the loop.

The parts (docs/ARCHITECTURE.md describes each), in multitun/fastpath/:

- stateless, ``cdef inline`` functions in ``.pxd`` files, cimported: the
  header codec (header.pxd), the replay window (window.pxd), checksums
  (checksum.pxd), the AEAD (aead.pxd), TSO/USO splitting (segment.pxd), TCP
  coalescing (coalesce.pxd), socket addresses and control messages
  (addresses.pxd), the handshake limiter per source (limiter.pxd), a fleet
  server's allowed IPs (routes.pxd) and key ids (keyindex.pxd), a paced
  path's flow queue (flowqueue.pxd) and its CoDel (codel.pxd), the packets
  that wait for a later turn to be written to the TUN (backlog.pxd); the constants
  (constants.pxd) and counters (counters.pxd);
- stateful, a ``final`` class each, ``include``d here: the TUN boundary
  (tun.pxi), the keys (keyring.pxi), path I/O (paths.pxi), the control
  queue (control.pxi), the paced paths and their queues (shaper.pxi), one
  peer: its keys, endpoints, queues and counters (peer.pxi), the peers and
  how a packet finds its own (peers.pxi), the receive direction
  (receive.pxi), the send direction (send.pxi) and the engine: the loop
  (engine.pxi).

Why ``include`` and ``final``: the per-packet path crosses every part, and
it must inline. Included, the parts are one C file, so the compiler sees
every call; ``final``, their cdef methods are plain C functions, never
called through a vtable. Separate extension modules would call each other
through function pointers (and multiply the shared objects in a wheel).
The test hooks live in another module, multitun._testing, which cimports
the same inline functions.
"""

cimport cython
from libc.errno cimport (
    errno, EAGAIN, EINTR, EBADF, EFAULT, EINVAL, EIO, EMSGSIZE, ENOENT, ENOTSOCK,
)
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from posix.unistd cimport read, write, close

from .includes.linux cimport *
from .fastpath.constants cimport *
from .fastpath.counters cimport PathCounters, TunnelCounters
from .fastpath.byteorder cimport be16, now_ns
from .fastpath.header cimport H_OK, H_OTHER_MODE, Header, parse_header, payload_fits, put_header
from .fastpath.window cimport W_DUPLICATE, W_NEW, Window, window_check, window_mark, window_test
from .fastpath.checksum cimport csum_add, csum_fold
from .includes.openssl cimport OPENSSL_VERSION, OpenSSL_version
from .fastpath.aead cimport Keypair, clear_keypair, new_cipher, open_packet, seal_packet, used_up
from .fastpath.vnet cimport *
from .fastpath.segment cimport Segmenter, segmenter_next, segmenter_start
from .fastpath.coalesce cimport (
    GRO_MAX_PACKET, GroRun, gro_append, gro_finish, gro_start, tcp_segment_headers,
)
from .fastpath.addresses cimport gro_segment_size, same_addr, sticky_source
from .fastpath.batch cimport Batch, add_packet, next_packet
from .fastpath.limiter cimport SourceLimiter, limiter_allow
from .fastpath.addresstoken cimport (
    LOAD_BURST, LOAD_PER_S, TOKEN_EPOCH_NS, AddressCheck, address_check_free,
    address_check_init, address_token, loaded, token_valid, under_load,
)
from .fastpath.codel cimport CODEL_INTERVAL_NS, CODEL_TARGET_NS
from .fastpath.backlog cimport (
    RX_TURN, Backlog, Waiting, backlog_free, backlog_init, backlog_next, backlog_now,
    backlog_push, backlog_turn,
)
from .fastpath.routes cimport (
    ROUTE_NONE, RouteFamily, RouteTable, route_add, route_of_packet, routes_alloc,
    routes_free,
)
from .fastpath.keyindex cimport KeyIndex, keyindex_add, keyindex_alloc, keyindex_find, keyindex_free
from .fastpath.flowqueue cimport (
    FlowQueue, QPacket, flow_bucket, fq_clear, fq_dequeue, fq_enqueue, fq_flow_of,
    fq_head_sojourn, fq_init, qpacket_data,
)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

import ipaddress
import os

include "fastpath/tun.pxi"
include "fastpath/keyring.pxi"
include "fastpath/paths.pxi"
include "fastpath/control.pxi"
include "fastpath/shaper.pxi"
include "fastpath/peer.pxi"
include "fastpath/peers.pxi"
include "fastpath/receive.pxi"
include "fastpath/send.pxi"
include "fastpath/engine.pxi"


# What Python must agree with: the wire format (tests/test_codec.py holds
# multitun/wire.py to it) and the system's values, taken from the kernel's
# headers, for the control plane's setsockopt() and ioctl() calls.
CONSTANTS = {
    "VERSION_PLAIN": VERSION_PLAIN, "VERSION_SEALED": VERSION_SEALED,
    "HEADER_LEN": HEADER_LEN, "MAX_PATHS": MAX_PATHS,
    "T_DATA": T_DATA, "T_PROBE": T_PROBE, "T_PROBE_REPLY": T_PROBE_REPLY,
    "T_HANDSHAKE_INIT": T_HANDSHAKE_INIT, "T_HANDSHAKE_RESPONSE": T_HANDSHAKE_RESPONSE,
    "T_HANDSHAKE_COOKIE": T_HANDSHAKE_COOKIE, "TICKET_LEN": TICKET_LEN,
    "FINGERPRINT_LEN": FINGERPRINT_LEN,
    "PROBE_MIN_PAYLOAD": PROBE_MIN_PAYLOAD, "PROBE_MAX_PAYLOAD": PROBE_MAX_PAYLOAD,
    "PROBE_FEEDBACK_PAYLOAD": PROBE_FEEDBACK_PAYLOAD,
    "KEY_LEN": KEY_LEN, "TAG_LEN": TAG_LEN,
    "HANDSHAKE_INIT_LEN": HANDSHAKE_INIT_LEN, "HANDSHAKE_RESPONSE_LEN": HANDSHAKE_RESPONSE_LEN,
    "HANDSHAKE_COOKIE_LEN": HANDSHAKE_COOKIE_LEN,
    "T_HANDSHAKE_RETRY": T_HANDSHAKE_RETRY, "HANDSHAKE_RETRY_LEN": HANDSHAKE_RETRY_LEN,
    "RETRY_ECHO_LEN": RETRY_ECHO_LEN,
    "MAX_DATAGRAM": MAX_DATAGRAM,
}

# How many peers one engine holds (config.py refuses more), and the rate of
# first messages above which a server is under load (keying.py's answer rate
# must not be below it: tests/test_keying.py); what a turn of the loop takes
# at most (tests/test_offload.py and tests/test_engine.py count on them).
LIMITS = {"MAX_PEERS": MAX_PEERS, "LOAD_PER_S": LOAD_PER_S, "LOAD_BURST": LOAD_BURST,
          "BATCH": BATCH, "RX_TURN": RX_TURN}

# The libcrypto that seals packets, as `multitun --version` reports it.
LIBCRYPTO = OpenSSL_version(OPENSSL_VERSION).decode()

SYSTEM = {
    "UDP_SEGMENT": UDP_SEGMENT, "UDP_GRO": UDP_GRO, "IP_PKTINFO": IP_PKTINFO,
    "SO_SNDBUFFORCE": SO_SNDBUFFORCE, "SO_RCVBUFFORCE": SO_RCVBUFFORCE,
    "VNET_HDR_LEN": VNET_HDR_LEN,
}

CIPHERS = {"aes-256-gcm": CIPHER_AES_256_GCM, "chacha20-poly1305": CIPHER_CHACHA20_POLY1305}

WAKE = {"timeout": WAKE_TIMEOUT, "fd": WAKE_FD, "control": WAKE_CONTROL,
        "signal": WAKE_SIGNAL, "event": WAKE_EVENT}
