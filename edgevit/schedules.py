"""The Relax pipeline each target kind is built with.

Both follow TVM 0.27's default pipelines (library dispatch -> legalize -> fuse -> schedule ->
lower -> finalize), with two changes:
- CUDA: dlight's GPU rules, each wrapped so that a rule whose analysis fails on a kernel
  (dlight's GEMV rule asserts on the window-ranking kernel of sparse models) passes the
  kernel on to the next rule instead of aborting the build; Fallback schedules the rest.
- CPU: the schedule step is the hook where CPU schedule rules are applied.
"""

from __future__ import annotations


def _tolerant(rule):
    from tvm.s_tir import dlight as dl

    class Tolerant(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except (AssertionError, ValueError, RuntimeError):
                return None  # not this rule's pattern: let the next rule try

        def __repr__(self) -> str:
            return f"Tolerant({type(rule).__name__})"

    return Tolerant()


def schedule_passes(target) -> list:
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
        return [dl.ApplyDefaultSchedule(*[_tolerant(r) for r in rules], dl.gpu.Fallback())]
    return []


def relax_pipeline(target):
    """The module pass that lowers an imported Relax module for `target` (a tvm Target)."""
    import tvm
    from tvm import relax

    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    backend = cuda if target.kind.name == "cuda" else cpu
    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(target) + legalize + schedule_passes(target)
                + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))
            return seq(mod)

    return pipeline
