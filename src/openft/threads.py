"""How many torch threads each process gets: the cores this process may use, shared out.

Torch (OpenMP) starts one thread per core in every process by default, so on a 2-core machine
an API process and a worker each running 2 threads, beside other work, spend their time
switching instead of computing: the same training step measured 1.07 s with default threads on
a loaded 2-core machine and 0.074 s with one thread. ``openft serve`` gives each of its
processes (every embedded worker, and the API for chat) an equal share, so that
processes x threads <= cores; ``OPENFT_TORCH_THREADS`` overrides the share for every process.
Standard library only: the sizing is computed before torch is imported.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its CPU affinity, further capped by a cgroup CPU quota
    (containers: ``cpu.max`` on cgroup v2, ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` on v1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in cores, or None when there is none (or it cannot be read)."""
    try:
        v2 = root / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.exists() and p.exists():
            quota_us = int(q.read_text())
            return None if quota_us <= 0 else quota_us / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def threads_per_process(cores: int, processes: int) -> int:
    """Equal share of ``cores`` for each of ``processes`` torch processes, at least one thread
    (more processes than cores then run one thread each: the least oversubscription possible)."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    return max(1, cores // processes)
