"""Ending the processes the lab starts."""

from __future__ import annotations

import subprocess


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
