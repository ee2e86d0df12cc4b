"""How many threads TVM's CPU thread pool gets.

TVM sizes its pool once, on first use, from TVM_NUM_THREADS (or OMP_NUM_THREADS), else from the
logical core count, halved on x86 to skip hyper-threads whether the CPU has them or not. On
this 2-core VM without hyper-threading every compiled model ran on one core (ViT-Ti at 224,
batch 1: 32.8 ms, 20.9 ms on both). edgevit sets TVM_NUM_THREADS to the physical cores this
process may run on, before any TVM code can create the pool; a value the user set is kept.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Cores (not hyper-threads) among the CPUs this process may run on: one per distinct
    thread-sibling set in sysfs; the allowed CPU count where sysfs does not say."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return max(1, len(allowed))
    return max(1, len(cores))


def use_physical_cores() -> None:
    """TVM_NUM_THREADS defaults to physical_cores() for this process and its children (tuning's
    measuring workers); an explicit TVM_NUM_THREADS or OMP_NUM_THREADS wins."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
