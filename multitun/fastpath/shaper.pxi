# The tunnel's own queue: paths that are paced. A path the control plane
# gives a rate (multitun/capacity.py estimates what the path carries without
# building a queue at its bottleneck; --rate caps it) sends no faster: what
# it cannot send now waits here, in the path's FlowQueue (flowqueue.pxd),
# not in a modem's buffer where nothing can be reordered or dropped. A
# timerfd wakes the loop when the next datagram is due. A copy that waited
# so long that the same packet on another path would arrive a margin
# earlier is stale: dropped, not sent. Unpaced paths never come here.

cdef enum:
    # A paced path may send this far ahead of its rate after a pause: a
    # burst of 2 ms, so that the timer wakes the loop at most every couple
    # of packets on a fast path, and never to send a single one.
    PACE_BURST_NS = 2000000
    # A paced path's queue holds at most this long of its rate (and at least
    # FQ_MIN_LIMIT_BYTES): what an unresponsive flow sends beyond it is
    # dropped from that flow's oldest packets.
    QUEUE_LIMIT_MS = 250
    FQ_MIN_LIMIT_BYTES = 64 * 1024


cdef struct Pacer:
    # Bytes per second; 0: not paced.
    uint64_t rate
    # When the next datagram may leave.
    uint64_t next_ns
    # The path's estimated one-way delay (0: unknown, or the path is down),
    # and from it, how long a copy may wait here before it is stale (0: no
    # limit; no other path is known to be faster).
    uint64_t delay_ns
    uint64_t stale_after_ns
    # The pacer held packets back since the control plane last asked.
    bint limited


@cython.final
cdef class Shaper:
    # One per peer (peer.pxi): its endpoints, and the sockets they share.
    cdef Paths paths
    cdef Endpoint *eps
    cdef FlowQueue *queues[MAX_PATHS]
    cdef Pacer pacers[MAX_PATHS]
    # Paths with a rate, and paths with packets queued, one bit each.
    cdef uint32_t paced
    cdef uint32_t backlog
    # Opened when the peer's first path is paced (a fleet of unpaced peers
    # costs no file descriptors); the engine watches it.
    cdef int timerfd
    cdef uint64_t armed_ns
    # The flow hash's key (per engine, so that flows cannot be aimed at one
    # bucket from outside) and the stale margin (config.py).
    cdef uint64_t key
    cdef uint64_t margin_ns
    # Dequeued datagrams on their way out: out.iov[i] is sending[i]'s data.
    cdef Batch out
    cdef QPacket *sending[BATCH]

    def __cinit__(self, Paths paths, uint64_t key, uint64_t margin_ns):
        self.paths = paths
        self.key = key
        self.margin_ns = margin_ns
        self.timerfd = -1

    cdef int open_timer(self) except -1:
        """The timer's fd, opened now if it was not."""
        if self.timerfd < 0:
            self.timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
            if self.timerfd < 0:
                raise OSError(errno, os.strerror(errno))
        return self.timerfd

    cdef void close_timer(self) noexcept:
        if self.timerfd >= 0:
            close(self.timerfd)
            self.timerfd = -1

    def __dealloc__(self):
        cdef int i
        for i in range(MAX_PATHS):
            if self.queues[i] != NULL:
                fq_clear(self.queues[i])
                free(self.queues[i])
        self.close_timer()

    cdef inline bint holds(self, int path) noexcept nogil:
        """Path ``path``'s datagrams go through its queue (it is paced, or
        still has packets from when it was)."""
        return ((self.paced | self.backlog) >> path) & 1

    cdef void enqueue(self, int path, Batch *b, uint64_t now) noexcept nogil:
        cdef FlowQueue *fq = self.queues[path]
        cdef int i
        for i in range(b.n):
            fq_enqueue(fq, b.flow[i], <uint8_t *>b.iov[i].iov_base, <uint32_t>b.iov[i].iov_len,
                       now)
        if fq.packets:
            self.backlog |= 1U << path

    cdef void service(self, uint64_t now) noexcept nogil:
        """Send what every paced path may send now; arm the timer for the
        next that will be due."""
        cdef int path
        cdef uint64_t due = 0, t
        for path in range(MAX_PATHS):
            if (self.backlog >> path) & 1:
                self._service_path(path, now)
            if (self.backlog >> path) & 1:
                t = self.pacers[path].next_ns
                if due == 0 or t < due:
                    due = t
        self._arm(due)

    cdef void _service_path(self, int path, uint64_t now) noexcept nogil:
        cdef FlowQueue *fq = self.queues[path]
        cdef Pacer *pc = &self.pacers[path]
        cdef Endpoint *ep = &self.eps[path]
        cdef QPacket *q
        cdef uint64_t floor
        cdef int i
        if ep.fd < 0:
            # No endpoint (a path detached or forgotten): nothing here will
            # ever be sent in time.
            ep.c.aqm_dropped += fq.dropped
            ep.c.stale_dropped += fq.packets
            fq_clear(fq)
            fq.dropped = 0
            self.backlog &= ~(1U << path)
            return
        while True:
            self.out.n = 0
            while self.out.n < BATCH:
                if pc.rate and pc.next_ns > now:
                    pc.limited = True
                    break
                q = fq_dequeue(fq, now)
                if q == NULL:
                    break
                if pc.stale_after_ns and now - q.enqueued_ns > pc.stale_after_ns:
                    ep.c.stale_dropped += 1
                    free(q)
                    continue
                self.sending[self.out.n] = q
                self.out.iov[self.out.n].iov_base = qpacket_data(q)
                self.out.iov[self.out.n].iov_len = q.len
                self.out.n += 1
                if pc.rate:
                    floor = now - PACE_BURST_NS
                    if pc.next_ns < floor:
                        pc.next_ns = floor
                    pc.next_ns += <uint64_t>q.len * 1000000000ULL // pc.rate
            ep.c.aqm_dropped += fq.dropped
            fq.dropped = 0
            if self.out.n:
                self.paths.send_on(ep, path, &self.out)
                for i in range(self.out.n):
                    free(self.sending[i])
            if self.out.n < BATCH:
                break
        if fq.packets == 0:
            self.backlog &= ~(1U << path)

    cdef void _arm(self, uint64_t due) noexcept nogil:
        # timerfd_settime(2), absolute: fires at once if `due` has passed. A
        # zero it_value disarms.
        cdef itimerspec its
        if due == self.armed_ns or self.timerfd < 0:
            return
        memset(&its, 0, sizeof(itimerspec))
        if due:
            its.it_value.tv_sec = <time_t>(due // 1000000000ULL)
            its.it_value.tv_nsec = <long>(due % 1000000000ULL)
        timerfd_settime(self.timerfd, TFD_TIMER_ABSTIME, &its, NULL)
        self.armed_ns = due

    cdef void on_timer(self) noexcept nogil:
        cdef uint64_t expirations
        read(self.timerfd, &expirations, 8)
        self.armed_ns = 0
        self.service(now_ns())

    # ------------------------------------------------ for the control plane

    cdef shape(self, int path, uint64_t rate, uint64_t delay_ns):
        """Pace ``path`` at ``rate`` bytes/s (0: not at all) and take
        ``delay_ns`` as its one-way delay (0: unknown)."""
        cdef Pacer *pc
        cdef uint64_t limit
        if not 0 <= path < MAX_PATHS:
            raise ValueError(f"no path {path}")
        pc = &self.pacers[path]
        if rate and self.queues[path] == NULL:
            self.queues[path] = <FlowQueue *>malloc(sizeof(FlowQueue))
            if self.queues[path] == NULL:
                raise MemoryError()
            fq_init(self.queues[path], CODEL_TARGET_NS, CODEL_INTERVAL_NS, FQ_MIN_LIMIT_BYTES)
        if rate:
            limit = rate * QUEUE_LIMIT_MS // 1000
            self.queues[path].limit_bytes = max(limit, <uint64_t>FQ_MIN_LIMIT_BYTES)
            self.paced |= 1U << path
        else:
            self.paced &= ~(1U << path)
        pc.rate = rate
        pc.delay_ns = delay_ns
        self._stale_limits()
        # A path that was paced and is not now sends what it holds at once.
        self.service(now_ns())

    cdef void forget(self, int path) noexcept nogil:
        """Path ``path`` is gone for good: not paced, nothing held, no
        delay known (a path that takes its number later starts afresh)."""
        if self.queues[path] != NULL:
            fq_clear(self.queues[path])
            self.queues[path].dropped = 0
        memset(&self.pacers[path], 0, sizeof(Pacer))
        self.paced &= ~(1U << path)
        self.backlog &= ~(1U << path)
        self._stale_limits()

    cdef bint held(self, int path) except? False:
        """Whether the pacer held packets of ``path`` back since the last
        call."""
        if not 0 <= path < MAX_PATHS:
            raise ValueError(f"no path {path}")
        limited, self.pacers[path].limited = self.pacers[path].limited, False
        return limited

    cdef void _stale_limits(self) noexcept nogil:
        # A copy on path p is stale once its wait here plus p's delay exceeds
        # the fastest other path's delay plus the margin. Only unpaced paths
        # are references: their copy left at once, while a paced one's may
        # be waiting (two paced paths could each drop the same packet).
        cdef int p, r
        cdef uint64_t best, budget
        for p in range(MAX_PATHS):
            best = 0
            for r in range(MAX_PATHS):
                if (r != p and self.pacers[r].delay_ns and self.eps[r].fd >= 0
                        and not (self.paced >> r) & 1
                        and (best == 0 or self.pacers[r].delay_ns < best)):
                    best = self.pacers[r].delay_ns
            self.pacers[p].stale_after_ns = 0
            if best and self.pacers[p].delay_ns:
                budget = best + self.margin_ns
                # Never 0 (that means no limit): a path already too slow to
                # be in time keeps no queue at all.
                self.pacers[p].stale_after_ns = (
                    budget - self.pacers[p].delay_ns if budget > self.pacers[p].delay_ns else 1)

    cdef dict path_info(self, int path):
        """What the status shows of a path's pacing and queue."""
        cdef FlowQueue *fq = self.queues[path]
        cdef uint64_t now = now_ns()
        return {"paced_rate": self.pacers[path].rate * 8 if (self.paced >> path) & 1 else None,
                "queue_packets": fq.packets if fq != NULL else 0,
                "queue_bytes": fq.bytes if fq != NULL else 0,
                "queue_sojourn_ns": fq_head_sojourn(fq, now) if fq != NULL and fq.packets else 0}
