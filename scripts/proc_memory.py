"""Memory of the current process, for the benchmarks (Linux /proc)."""

from __future__ import annotations

import os
import resource


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """Peak RSS of this process in bytes: /proc's VmHWM, this process's own mark
    (ru_maxrss would also count the parent's memory at fork, which Linux keeps
    across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
