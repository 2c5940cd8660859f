"""Named points where a crash test can make the process die (kill -9 semantics).

Off unless the process was started with a failpoint name (settings `failpoint`). Used by the
crash-recovery tests to stop the service at an exact step, which no timing-based kill can do.
"""

from __future__ import annotations

import os
import signal

_armed: str | None = None


def arm(name: str | None) -> None:
    """Make `hit(name)` kill the process; None disarms."""
    global _armed
    _armed = name


def hit(name: str) -> None:
    """Kill this process at once with SIGKILL if `name` is the armed failpoint."""
    if _armed is not None and _armed == name:
        os.kill(os.getpid(), signal.SIGKILL)
