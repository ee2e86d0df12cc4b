"""Everything TVM-specific, kept apart from the stages that use it.

    frontend      torch.export -> Relax, and the graph rewrites edgevit applies
    encodings     how weights travel through the compile path (fp32; quantized schemes plug in)
    schedules     the Relax pipeline per target kind; cpu_rules: edgevit's CPU schedules
    build         the Relax build, library export (cross-compiled for ARM), weights files
    database      tuning databases: where they live, which schedules a build uses
    metaschedule  MetaSchedule tasks, builders, runners and measurements for `tune`
    runtime       devices and sessions (local or TVM RPC): only the TVM runtime
    emulator      the emulated aarch64 board (qemu + TVM RPC on loopback)
    threads       the size of TVM's CPU thread pool (physical cores)

This `__init__` imports nothing but `threads` (sizing TVM's pool before any module here can
start it), and no module here imports a stage: stages call the backend.
"""

from edgevit.backend.threads import use_physical_cores

use_physical_cores()
