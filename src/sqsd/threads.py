"""How many CPU threads PyTorch uses, chosen once per command before torch is imported.

PyTorch's OpenMP threads spin-wait for work. On a small machine shared with another CPU-bound process, one
thread per core makes them fight that process for the cores, and every step slows down. Measured with
`bench/threads.py` on 2 cores (SmolLM2, train / generate / score step times relative to PyTorch's default on a
quiet machine): the default is 2.2-2.8x slower next to one busy process; one thread per *free* core with
passive waiting (what `configure` does) costs 0.96-1.04x when quiet and 1.31-1.46x under load, which is about
what one core can do (a single thread: 1.37-1.54x quiet). `configure` is called by the `sqsd` command before
any library module (and so torch) is imported; an explicit OMP_NUM_THREADS or OMP_WAIT_POLICY in the
environment is always respected (torchrun sets OMP_NUM_THREADS=1 for its workers).
"""

from __future__ import annotations

import os
import sys
import time


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal


def free_cores(window: float = 0.25) -> int:
    """Cores this process may use that were idle over the last `window` seconds (at least 1).

    Falls back to every usable core where /proc/stat does not exist (not Linux)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        idle0, total0 = _cpu_times()
        time.sleep(window)
        idle1, total1 = _cpu_times()
    except OSError:
        return usable
    idle_share = (idle1 - idle0) / max(total1 - total0, 1)
    return max(1, min(usable, round(idle_share * (os.cpu_count() or usable))))


def configure() -> None:
    """Idle threads sleep instead of spinning, and use only the cores that are free (unless the environment says).

    Does nothing once torch is imported (OpenMP has read its settings by then), e.g. when `sqsd.cli.main` is
    called from a Python session or a test."""
    if "torch" in sys.modules:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(free_cores())
