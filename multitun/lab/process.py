"""The processes the lab starts: their logs, and ending them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def logs(directory: Path, name: str) -> str:
    """What the processes called ``name`` logged, each start's file
    (``name.N.log``) in order."""
    return "".join(p.read_text() for p in sorted(directory.glob(f"{name}.*.log")))


def wait_logged(directory: Path, name: str, text: str, timeout: float) -> str:
    """Wait until ``text`` is in ``name``'s logs; the logs."""
    deadline = time.monotonic() + timeout
    while text not in (found := logs(directory, name)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not logged by {name} within {timeout:g}s:\n{found}")
        time.sleep(0.05)
    return found


def end(proc: subprocess.Popen | None, sig: int) -> int:
    if proc is None:
        raise RuntimeError("not started")
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ------------------------------------------------------------ traffic tools
