"""Process plumbing: children that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # prctl(2) option, Linux only


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; else nothing).

    Hypercorn's and Uvicorn's worker processes, and `run`'s children, would otherwise keep
    serving as orphans after a `kill -9` of their parent, holding its port and its database
    connections. The signal arrives as a normal SIGTERM, so shutdown stays graceful. `parent` is
    the pid this process was started by: if it is already gone, the signal is sent at once.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
