# One path's queue inside multitun: flows served fairly, sparse flows first,
# urgent DSCP ahead of everything, CoDel on each flow's sojourn time. It is
# FQ-CoDel (RFC 8290) over CoDel (RFC 8289, codel.pxd), with one addition: a band for
# packets marked EF or CS5..CS7 (RFC 4594: telephony, signalling, network
# control), served before the flows, but for at most a quantum (and the
# packet that crosses it) between two packets of theirs while they have any:
# a host that marks everything EF leaves the flows a third of the path at
# least. Only paths that are paced (shaper.pxi)
# queue here; an unpaced path sends at once. Packets are copies (one per
# path) allocated on enqueue: a paced path is slower than the TUN by
# definition, so this is never the fast path.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from .codel cimport CoDel, codel_control_law, codel_enter, codel_ok_to_drop
from .constants cimport FLOW_BUCKETS

cdef enum:
    # Flow buckets per path (fq_codel's default, RFC 8290 section 5.1), in
    # sets of FQ_WAYS, as CAKE has them: a flow takes a free way of its set,
    # so two flows share a bucket only when more than FQ_WAYS of them are
    # queued in one set at once. With plain hashing, a sparse flow (control)
    # sharing a bucket with bulk (video) would lose its priority, and take
    # its share of CoDel's drops, in one run in FQ_FLOWS.
    FQ_FLOWS = 1024
    FQ_WAYS = 8
    # FQ_FLOWS / FQ_WAYS (written out: Cython crashes on a division of enum
    # members here).
    FQ_SETS = 128
    # The flow tag of the urgent band (no hashed flow has it).
    FQ_URGENT = 0
    # A flow's deficit is refilled by this many bytes (RFC 8290 section
    # 4.1: one MTU-sized packet).
    FQ_QUANTUM = 1514

# The DSCP values (RFC 2474) of the urgent band.
cdef enum:
    DSCP_CS5 = 40
    DSCP_EF = 46
    DSCP_CS6 = 48
    DSCP_CS7 = 56


cdef struct QPacket:
    QPacket *next
    uint64_t enqueued_ns
    uint32_t len
    # The datagram follows the struct (allocated together).


cdef struct Flow:
    # The flow's tag (fq_flow_of) while the bucket is its.
    uint32_t tag
    QPacket *head
    QPacket *tail
    uint32_t backlog
    int deficit
    # Which list the flow is on: 0 none, 1 new, 2 old; and its link there.
    uint8_t listed
    Flow *next
    CoDel codel


cdef struct FlowQueue:
    Flow flows[FQ_FLOWS]
    Flow urgent
    Flow *new_head
    Flow *new_tail
    Flow *old_head
    Flow *old_tail
    # What the urgent band may still send before a flow's packet is due.
    int urgent_deficit
    uint32_t packets
    uint64_t bytes
    # Bytes the queue holds before it drops from its fattest flow (RFC 8290
    # section 4.1.1): what an unresponsive flow sends beyond what the path
    # carries, which CoDel alone answers too slowly.
    uint64_t limit_bytes
    # CoDel's target and interval (RFC 8289: 5 ms and 100 ms).
    uint64_t target_ns
    uint64_t interval_ns
    # Dropped by CoDel or on overflow: the caller counts them per path.
    uint64_t dropped


cdef inline uint8_t *qpacket_data(QPacket *q) noexcept nogil:
    return <uint8_t *>(q + 1)


cdef inline void fq_init(FlowQueue *fq, uint64_t target_ns, uint64_t interval_ns,
                         uint64_t limit_bytes) noexcept nogil:
    memset(fq, 0, sizeof(FlowQueue))
    fq.limit_bytes = limit_bytes
    fq.urgent_deficit = FQ_QUANTUM
    fq.target_ns = target_ns
    fq.interval_ns = interval_ns


cdef inline uint32_t fq_flow_of(const uint8_t *p, size_t n, uint64_t key) noexcept nogil:
    """The flow tag of IP packet p[:n]: a keyed hash of its addresses,
    protocol and ports (the ports only where they are there: TCP, UDP,
    UDP-Lite, SCTP, DCCP, and not a later IPv4 fragment), or FQ_URGENT for
    an urgent DSCP."""
    cdef uint64_t h = key
    cdef uint32_t i, off = 0, dscp = 0
    cdef uint8_t proto = 0
    if n >= 20 and p[0] >> 4 == 4:
        dscp = p[1] >> 2
        proto = p[9]
        for i in range(12, 20):
            h = (h ^ p[i]) * 0x100000001B3ULL
        # Offset zero: not a later fragment, so the ports are there.
        if (p[6] & 0x1F) == 0 and p[7] == 0:
            off = (p[0] & 0x0F) * 4
    elif n >= 40 and p[0] >> 4 == 6:
        dscp = ((p[0] & 0x0F) << 2) | (p[1] >> 6)
        proto = p[6]
        for i in range(8, 40):
            h = (h ^ p[i]) * 0x100000001B3ULL
        off = 40
    if dscp == DSCP_EF or dscp == DSCP_CS5 or dscp == DSCP_CS6 or dscp == DSCP_CS7:
        return FQ_URGENT
    h = (h ^ proto) * 0x100000001B3ULL
    if off and n >= off + 4 and (proto == 6 or proto == 17 or proto == 136 or proto == 132
                                 or proto == 33):
        for i in range(off, off + 4):
            h = (h ^ p[i]) * 0x100000001B3ULL
    # FNV-1a leaves a change in the last byte in few bits: mix every bit
    # into every other first (MurmurHash3's 64-bit finaliser).
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return <uint32_t>h if <uint32_t>h != FQ_URGENT else 1


cdef inline uint32_t flow_bucket(const uint8_t *p, size_t n, uint64_t key) noexcept nogil:
    """Where a packet waits in the engine (tun.pxi, backlog.pxd): its flow's
    bucket, of FLOW_BUCKETS."""
    return fq_flow_of(p, n, key) % FLOW_BUCKETS


cdef inline Flow *fq_bucket(FlowQueue *fq, uint32_t tag) noexcept nogil:
    """The bucket of flow ``tag``: the way of its set that it has, else a
    free one (with CoDel's state afresh), else, every way busy with other
    flows, the one its tag picks (as plain hashing would)."""
    cdef uint32_t base = (tag & (FQ_SETS - 1)) * FQ_WAYS, w
    cdef Flow *f
    cdef Flow *free_way = NULL
    if tag == FQ_URGENT:
        return &fq.urgent
    for w in range(FQ_WAYS):
        f = &fq.flows[base + w]
        if f.tag == tag:
            return f
        if free_way == NULL and f.head == NULL and f.listed == 0:
            free_way = f
    if free_way != NULL:
        free_way.tag = tag
        memset(&free_way.codel, 0, sizeof(CoDel))
        return free_way
    return &fq.flows[base + (tag >> 24) % FQ_WAYS]


cdef inline void _append(Flow **head, Flow **tail, Flow *f, uint8_t which) noexcept nogil:
    f.next = NULL
    f.listed = which
    if tail[0] == NULL:
        head[0] = f
    else:
        tail[0].next = f
    tail[0] = f


cdef inline Flow *_pop(Flow **head, Flow **tail) noexcept nogil:
    cdef Flow *f = head[0]
    head[0] = f.next
    if head[0] == NULL:
        tail[0] = NULL
    f.next = NULL
    f.listed = 0
    return f


cdef inline QPacket *_take_head(FlowQueue *fq, Flow *f) noexcept nogil:
    cdef QPacket *q = f.head
    if q != NULL:
        f.head = q.next
        if f.head == NULL:
            f.tail = NULL
        f.backlog -= q.len
        fq.packets -= 1
        fq.bytes -= q.len
    return q


cdef inline void _drop(FlowQueue *fq, QPacket *q) noexcept nogil:
    fq.dropped += 1
    free(q)


cdef inline void _drop_from_fattest(FlowQueue *fq) noexcept nogil:
    # RFC 8290 section 4.1.1: the flow with the largest backlog loses its
    # oldest packet (a scan, but only on overflow).
    cdef Flow *fat = &fq.urgent
    cdef uint32_t i
    for i in range(FQ_FLOWS):
        if fq.flows[i].backlog > fat.backlog:
            fat = &fq.flows[i]
    _drop(fq, _take_head(fq, fat))


cdef inline bint fq_enqueue(FlowQueue *fq, uint32_t flow, const uint8_t *data, uint32_t n,
                            uint64_t now) noexcept nogil:
    """Queue a copy of data[:n] for flow ``flow`` (a tag); False if no
    memory."""
    cdef Flow *f = fq_bucket(fq, flow)
    cdef QPacket *q = <QPacket *>malloc(sizeof(QPacket) + n)
    if q == NULL:
        fq.dropped += 1
        return False
    q.next = NULL
    q.enqueued_ns = now
    q.len = n
    memcpy(qpacket_data(q), data, n)
    if f.tail == NULL:
        f.head = q
    else:
        f.tail.next = q
    f.tail = q
    f.backlog += n
    fq.packets += 1
    fq.bytes += n
    if f != &fq.urgent and f.listed == 0:
        # A flow with nothing queued is new, and sparse until it has used
        # a quantum (RFC 8290 section 4.1).
        f.deficit = FQ_QUANTUM
        _append(&fq.new_head, &fq.new_tail, f, 1)
    while fq.bytes > fq.limit_bytes:
        _drop_from_fattest(fq)
    return True


cdef inline QPacket *_codel_take(FlowQueue *fq, Flow *f, uint64_t now, bint *ok_to_drop) noexcept nogil:
    # RFC 8289 section 5.4 (dodequeue). A flow down to one packet's worth is
    # never judged (its queue is not standing).
    cdef QPacket *q = _take_head(fq, f)
    if q == NULL:
        f.codel.first_above_ns = 0
        ok_to_drop[0] = False
        return NULL
    ok_to_drop[0] = codel_ok_to_drop(&f.codel, now, now - q.enqueued_ns,
                                     f.backlog <= FQ_QUANTUM, fq.target_ns, fq.interval_ns)
    return q


cdef inline QPacket *_codel_dequeue(FlowQueue *fq, Flow *f, uint64_t now) noexcept nogil:
    # RFC 8289 section 5.5: in the dropping state, drop on schedule, ever
    # faster, until the sojourn time falls below target; enter it when the
    # sojourn time stayed above target for an interval.
    cdef bint ok
    cdef CoDel *c = &f.codel
    cdef QPacket *q = _codel_take(fq, f, now, &ok)
    if c.dropping:
        if not ok:
            c.dropping = False
        while c.dropping and now >= c.drop_next_ns:
            _drop(fq, q)
            c.count += 1
            q = _codel_take(fq, f, now, &ok)
            if not ok:
                c.dropping = False
            else:
                c.drop_next_ns = codel_control_law(c.drop_next_ns, c.count, fq.interval_ns)
    elif ok:
        _drop(fq, q)
        q = _codel_take(fq, f, now, &ok)
        codel_enter(c, now, fq.interval_ns)
    return q


cdef inline QPacket *fq_dequeue(FlowQueue *fq, uint64_t now) noexcept nogil:
    """The next packet to send (the caller frees it), or NULL if none is
    left: the urgent band first (within its share), then deficit round
    robin over the new (sparse) flows before the old ones (RFC 8290
    section 4.2)."""
    cdef Flow *f
    cdef QPacket *q
    cdef bint from_new
    if fq.urgent_deficit > 0:
        q = _take_head(fq, &fq.urgent)
        if q != NULL:
            fq.urgent_deficit -= <int>q.len
            return q
    while True:
        from_new = fq.new_head != NULL
        if from_new:
            f = fq.new_head
        elif fq.old_head != NULL:
            f = fq.old_head
        else:
            # Nothing but the urgent band, if that.
            q = _take_head(fq, &fq.urgent)
            if q != NULL:
                fq.urgent_deficit -= <int>q.len
            return q
        if f.deficit <= 0:
            f.deficit += FQ_QUANTUM
            if from_new:
                _pop(&fq.new_head, &fq.new_tail)
            else:
                _pop(&fq.old_head, &fq.old_tail)
            _append(&fq.old_head, &fq.old_tail, f, 2)
            continue
        q = _codel_dequeue(fq, f, now)
        if q == NULL:
            # Emptied. From the new list it goes to the old one, so that a
            # flow cannot stay sparse by emptying itself each round.
            if from_new:
                _pop(&fq.new_head, &fq.new_tail)
                _append(&fq.old_head, &fq.old_tail, f, 2)
            else:
                _pop(&fq.old_head, &fq.old_tail)
            continue
        f.deficit -= <int>q.len
        fq.urgent_deficit = FQ_QUANTUM
        return q


cdef inline uint64_t fq_head_sojourn(FlowQueue *fq, uint64_t now) noexcept nogil:
    """How long the oldest packet at the head of any flow has waited (a scan:
    for the control plane's status, not per packet)."""
    cdef uint64_t oldest = now
    cdef uint32_t i
    for i in range(FQ_FLOWS):
        if fq.flows[i].head != NULL and fq.flows[i].head.enqueued_ns < oldest:
            oldest = fq.flows[i].head.enqueued_ns
    if fq.urgent.head != NULL and fq.urgent.head.enqueued_ns < oldest:
        oldest = fq.urgent.head.enqueued_ns
    return now - oldest


cdef inline void _flush(FlowQueue *fq, Flow *f) noexcept nogil:
    cdef QPacket *q = _take_head(fq, f)
    while q != NULL:
        _drop(fq, q)
        q = _take_head(fq, f)
    f.listed = 0
    f.next = NULL
    memset(&f.codel, 0, sizeof(CoDel))


cdef inline void fq_clear(FlowQueue *fq) noexcept nogil:
    """Drop everything queued (the path is gone); counted as dropped."""
    cdef uint32_t i
    for i in range(FQ_FLOWS):
        _flush(fq, &fq.flows[i])
    _flush(fq, &fq.urgent)
    fq.new_head = fq.new_tail = fq.old_head = fq.old_tail = NULL
