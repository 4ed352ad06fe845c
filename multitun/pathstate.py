"""What the control plane keeps about each path, beside the engine's counters:
its health and capacity from probes, and what the log already said about it
(so that each change is logged once, and send errors as a summary)."""

from __future__ import annotations

from dataclasses import dataclass

from .capacity import PathCapacity
from .config import Config
from .health import LOST_AFTER_INTERVALS, PathHealth


@dataclass
class PathState:
    health: PathHealth
    capacity: PathCapacity
    # The peer endpoint last logged (a server logs each one it learns).
    logged_remote: tuple | None = None
    # The path's send_errors counter when its errors were last summarised.
    logged_send_errors: int = 0
    # What the log last said of the path's UDP GSO: (on, largest datagram
    # in a train); each refusal narrows it, and is said once.
    logged_gso: tuple[bool, int | None] = (True, None)
    # The engine could not pace the path (no timer), and the log said so.
    logged_unpaced: bool = False

    def forget_endpoint(self) -> None:
        """The path's endpoint is gone: the next one starts with fresh health
        (down until it answers) and capacity (another network, perhaps), and
        is logged when learned."""
        self.health = PathHealth(self.health.down_after_ns, self.health.lost_after_ns)
        self.new_network()
        self.logged_remote = None

    def new_network(self) -> None:
        """The path has a new socket (a new address, interface or link): what
        was learned of its capacity may not hold; learn it again."""
        self.capacity = PathCapacity(self.capacity.target_ns, self.capacity.cap)


class PathStates(dict[int, PathState]):
    """Path index -> its state, made on first use."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.down_after_ns = int(config.effective_down_after * 1e9)
        self.lost_after_ns = LOST_AFTER_INTERVALS * int(config.probe_interval * 1e9)
        self.queue_target_ns = int(config.queue_target_ms * 1e6)
        # --rate caps, bytes/s by path.
        self.caps = {path: bits // 8 for path, bits in config.rate_caps}

    def __missing__(self, path: int) -> PathState:
        state = self[path] = PathState(PathHealth(self.down_after_ns, self.lost_after_ns),
                                       PathCapacity(self.queue_target_ns, self.caps.get(path)))
        return state
