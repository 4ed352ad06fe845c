"""The thread that does a server's handshake cryptography, so that the
forwarding thread never waits for it.

Answering a first message costs about 0.1 ms of Noise in Python (an X25519
key and exchange, HKDFs, AEADs). On the forwarding thread, a burst of them
(a fleet whose clients all reconnect after a server restart: two messages
each) would hold up every packet behind it. So the keying (keying.py) checks
a message on the forwarding thread (its rate, its fingerprint, whether it is
a copy of one already answered) and hands the cryptography here. The result
comes back to the forwarding thread, which alone touches the engine: it
redeems the ticket, installs the keys and sends the answer, once the engine
has woken on this thread's pipe.

The data plane runs without the GIL, so this thread computes while packets
are forwarded. The forwarding thread needs the GIL back between two runs of
the data plane; while this thread works, the interpreter's switch interval
(sys.setswitchinterval) bounds that wait, so it is set to SWITCH_S instead
of the default 5 ms for as long as the thread runs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable

SWITCH_S = 0.0002
# Results awaited at once (a fleet's clients all connecting after a server
# restart: one each); a first message beyond that is refused, as over the
# keying's rate (a client retries within a second). Well below the engine's
# REPLY_SLOTS (1024): each answer's return address must outlast the wait for
# its result, while probe replies take return addresses too.
MAX_PENDING = 256


class HandshakeThread:
    """Runs ``work()`` on its own thread, then ``then(result)`` on the
    forwarding thread, in the order submitted, at its next ``finish()``.
    ``fd`` turns readable when results wait: the engine watches it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self.pending = 0
        self.fd, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A wake-up byte is in the pipe for results not yet taken. The thread
        # writes one only when none is: a write releases the GIL, and a
        # thread that released and took it back after every result would
        # keep resetting the forwarding thread's wait for it (the
        # interpreter forces a switch only after a whole switch interval
        # without one), so the forwarding thread would wait for the whole
        # burst.
        self._signalled = False
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_S)
        self._thread = threading.Thread(target=self._serve, name="multitun-handshakes",
                                        daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], object], then: Callable[[object], None]) -> bool:
        """False, and nothing done, when MAX_PENDING results are awaited."""
        if self.pending >= MAX_PENDING:
            return False
        self.pending += 1
        self._jobs.put((work, then))
        return True

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, then = job
            try:
                outcome = (True, work())
            except Exception as e:  # a bug: raised again on the forwarding thread
                outcome = (False, e)
            self._done.append((then, outcome))
            if not self._signalled:
                self._signalled = True
                with contextlib.suppress(BlockingIOError):  # full: a wake-up waits already
                    os.write(self._wake, b"\0")

    def finish(self) -> None:
        """Hand the results that came back so far to their ``then``; call it
        when ``fd`` is readable. Those that come meanwhile wait for the next
        call (and wake the engine again)."""
        # In this order: a result that comes after the read either finds the
        # flag still set, and is taken below, or finds it cleared, and
        # writes a wake-up of its own. (Cleared before the read, a wake-up
        # written in between would be read here with the flag left set,
        # and no later result would ever wake the engine.)
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, MAX_PENDING)
        self._signalled = False
        for _ in range(len(self._done)):
            then, (ok, value) = self._done.popleft()
            self.pending -= 1
            if not ok:
                raise value
            then(value)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        os.close(self.fd)
        os.close(self._wake)
        sys.setswitchinterval(self._switch)
