"""A multitun server and client running across a bed."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from ..keyfile import generate_key
from .bed import Bed
from .process import end, logs, wait_logged
from .traffic import wait_udp


TUN_SERVER, TUN_CLIENT = "10.42.42.1", "10.42.42.2"
TUN_SERVER6, TUN_CLIENT6 = "fd42::1", "fd42::2"


def key_args(directory: Path) -> tuple[str, str]:
    """A fresh key in ``directory`` (mode 0600, as --key-file insists) and
    the options that give it to both ends of a pair."""
    key = Path(directory) / "key"
    key.write_text(generate_key())
    key.chmod(0o600)
    return ("--key-file", str(key))


class TunnelPair:
    """A multitun server in ``bed.server`` and a client in ``bed.client``, with
    their logs in ``logdir``. ``stop()`` (or leaving the ``with``) ends both."""

    def __init__(self, bed: Bed, logdir: Path, port: int = 5678,
                 server_extra: tuple[str, ...] = (), client_extra: tuple[str, ...] = (),
                 command: list[str] | None = None, python: str | None = None,
                 endpoints: str | None = None, client_env: dict | None = None) -> None:
        """``command``: run this program instead of multitun, with the original
        C++ tool's flags only (-l, -s, -c, -p), to compare tunnels on one bed.
        ``python``: run the multitun installed for this interpreter (another
        version of it, in a virtual environment) with all its flags.
        ``endpoints``: the client's -c (default: every path of the bed, by
        address). ``client_env``: variables added to the client's environment."""
        self.bed, self.logdir, self.port, self.command = bed, Path(logdir), port, command
        self.python, self.client_env = python, client_env
        ipv6 = () if command else ("-l", f"{TUN_SERVER6}/64")
        self.server_args = ["-l", TUN_SERVER, *ipv6, "-s", "0.0.0.0", "-p", str(port),
                            *server_extra]
        ipv6 = () if command else ("-l", f"{TUN_CLIENT6}/64")
        self.client_args = ["-l", TUN_CLIENT, *ipv6, "-c", endpoints or bed.client_endpoints(),
                            "-p", str(port), *client_extra]
        self.server: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        self._starts = itertools.count()

    def __enter__(self) -> TunnelPair:
        self.start_server()
        self.start_client()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, side: str) -> subprocess.Popen:
        ns = self.bed.server if side == "server" else self.bed.client
        args = self.server_args if side == "server" else self.client_args
        log = open(self.logdir / f"{side}.{next(self._starts)}.log", "wb")
        with log:
            if self.command:
                return self.bed.popen(ns, [*self.command, *args], stdout=log,
                                      stderr=subprocess.STDOUT)
            env = {**os.environ, **self.client_env} if side == "client" and self.client_env \
                else None
            return self.bed.multitun(ns, args, python=self.python, stdout=log,
                                     stderr=subprocess.STDOUT, env=env)

    def start_server(self) -> None:
        self.server = self._start("server")

    def start_client(self) -> None:
        self.client = self._start("client")

    def stop_server(self, sig: int = signal.SIGTERM) -> int:
        return end(self.server, sig)

    def stop_client(self, sig: int = signal.SIGTERM) -> int:
        return end(self.client, sig)

    def stop(self) -> None:
        for proc in (self.client, self.server):
            if proc is not None and proc.poll() is None:
                end(proc, signal.SIGTERM)

    @contextlib.contextmanager
    def own_cpus(self) -> Iterator[bool]:
        """Within the ``with``, each end runs on a CPU of its own, as on two
        hosts: on one machine the two ends otherwise share one CPU at times,
        and take turns on it a scheduler tick at a time (the figures in
        README.md's Performance section). Yields False, and changes nothing,
        where this process may use fewer than two CPUs."""
        cpus = sorted(os.sched_getaffinity(0))
        ends = [p for p in (self.server, self.client) if p is not None]
        if len(cpus) < 2:
            yield False
            return
        for cpu, proc in zip(cpus, ends):
            _set_cpus(proc, {cpu})
        try:
            yield True
        finally:
            for proc in ends:
                if proc.poll() is None:
                    _set_cpus(proc, set(cpus))

    def logs(self, side: str) -> str:
        return logs(self.logdir, side)

    def wait_log(self, side: str, text: str, timeout: float = 5.0) -> str:
        """Wait until ``text`` is in ``side``'s logs; the logs."""
        return wait_logged(self.logdir, side, text, timeout)

    def wait_carrying(self, timeout: float = 10.0, v6: bool = False) -> float:
        """Seconds until a datagram sent client -> server arrives through the tunnel."""
        return wait_udp(self.bed, self.bed.client, self.bed.server,
                        TUN_SERVER6 if v6 else TUN_SERVER, timeout)


def _set_cpus(proc: subprocess.Popen, cpus: set[int]) -> None:
    """Every thread of ``proc`` on ``cpus`` (sched_setaffinity(2) is per thread)."""
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)
