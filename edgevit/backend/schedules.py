"""The Relax pipeline each target kind is built with.

Both follow TVM 0.27's default pipelines (library dispatch -> legalize -> fuse -> schedule ->
lower -> finalize), with two changes:
- CUDA: dlight's GPU rules, each wrapped so that a rule whose analysis fails on a kernel
  (dlight's GEMV rule asserts on the window-ranking kernel of sparse models) passes the
  kernel on to the next rule instead of aborting the build; Fallback schedules the rest.
- CPU: edgevit's own rules (TVM 0.27's default CPU pipeline leaves matmuls as naive scalar
  loops, ~2 GFLOP/s here): a register-tiled, vectorised, parallel matmul with its elementwise
  epilogue fused into the write-back; dlight's CPU GEMV and Reduction (softmax, layer norm)
  rules; and a parallel, vectorised rule for the injective kernels (reshapes, window
  gather/scatter, GELU, residual adds). Vector width comes from the target's LLVM features
  (AVX2: 8 fp32 lanes, AVX-512: 16, NEON: 4), thread count from the runtime.

Functions a MetaSchedule database already covers are scheduled by the database (see tune.py)
before these rules run; the rules skip anything already scheduled.
"""

from __future__ import annotations


def _tolerant(rule):
    from tvm.s_tir import dlight as dl

    class Tolerant(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except (AssertionError, ValueError, RuntimeError, KeyError, IndexError):   # dlight's analyses
                return None  # not this rule's pattern: let the next rule try

        def __repr__(self) -> str:
            return f"Tolerant({type(rule).__name__})"

    return Tolerant()


def schedule_passes(target) -> list:
    from tvm.s_tir import dlight as dl

    from edgevit.backend.codebook_rules import CodebookMatmul, CodebookMatmulGPU
    from edgevit.backend.int8_rules import PackedInt8Matmul, RowDotInt8Matmul

    if target.kind.name == "cuda":
        rules = [CodebookMatmulGPU(), RowDotInt8Matmul(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                 dl.gpu.GeneralReduction()]
        return [dl.ApplyDefaultSchedule(*[_tolerant(r) for r in rules], dl.gpu.Fallback())]
    from edgevit.backend.cpu_rules import cpu_rules

    return [dl.ApplyDefaultSchedule(*[_tolerant(r) for r in [CodebookMatmul(), PackedInt8Matmul(), *cpu_rules()]])]


def after_schedule_passes(target) -> list:
    """Rewrites of scheduled kernels no schedule primitive can express (CPU: the codebook decode's
    vector lookups, codebook_rules.vector_decode_pass)."""
    if target.kind.name == "cuda":
        return []
    from edgevit.backend.codebook_rules import vector_decode_pass

    return [vector_decode_pass()]


def prepare_passes(target) -> list:
    """Fast math (CPU), legalize and fuse: the kernels these produce are what gets scheduled,
    by the database (tuned) or by the rules, and what `tune` searches."""
    from tvm import relax

    return ([] if target.kind.name == "cuda" else [fast_math_pass()]) + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def fused_module(mod, target):
    """The module after library dispatch and prepare_passes (for task extraction)."""
    import tvm

    backend = _backend(target)
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(backend.library_dispatch_passes(target) + prepare_passes(target))(mod)


def _backend(target):
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda if target.kind.name == "cuda" else cpu


def relax_pipeline(target, database: str | None = None):
    """The module pass that lowers an imported Relax module for `target` (a tvm Target); with a
    MetaSchedule `database` folder, tuned kernels come from it and the rules do the rest."""
    import tvm

    backend = _backend(target)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(target) + prepare_passes(target) + apply_database(database)
                + schedule_passes(target) + after_schedule_passes(target) + backend.dataflow_lower_passes(target)
                + backend.finalize_passes(target))
            return seq(mod)

    return pipeline


def apply_database(database: str | None) -> list:
    """MetaSchedule's pass that swaps in the best tuned schedule of every kernel the database
    holds a record for (matched by the kernel's structural hash, so dense and sparse models
    share kernels); kernels it does not hold pass through untouched."""
    if database is None:
        return []
    from tvm import relax

    return [relax.transform.MetaScheduleApplyDatabase(database)]


def fast_math_pass():
    """GELU, softmax, exp, erf and tanh as TVM's fast vectorisable approximations (topi.fast_*,
    rational/polynomial, ~1e-7 relative error) instead of scalar libm calls: GELU's erf alone
    took 15-19% of a small ViT's CPU time. Compile still validates every artifact against PyTorch."""
    from tvm import topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from edgevit.backend.rewrites import function_pass

    def gelu(x):
        return topi.multiply(topi.multiply(x, 0.5), topi.add(topi.fast_erf(topi.multiply(x, 0.7071067811865476)), 1.0))

    replacements = {"relax.nn.gelu": lambda c: (gelu, c.args[0]),
                    "relax.nn.softmax": lambda c: (topi.nn.fast_softmax, c.args[0], c.attrs.axis),
                    "relax.exp": lambda c: (topi.fast_exp, c.args[0]),
                    "relax.erf": lambda c: (topi.fast_erf, c.args[0]),
                    "relax.tanh": lambda c: (topi.fast_tanh, c.args[0])}

    @mutator
    class FastMath(PyExprMutator):
        def visit_call_(self, call):
            name = getattr(call.op, "name", None)
            is_fp32 = getattr(getattr(call, "ty", None), "dtype", None) == "float32"
            call = super().visit_call_(call)
            if name in replacements and is_fp32:
                return self.builder_.call_te(*replacements[name](call))
            return call

    return function_pass(FastMath, "EdgeVitFastMath")


def export_kernel_library(mod, cross_compiler: str | None = None) -> str:
    """MetaSchedule's export step for edgevit: a shared library (cross-compiled for ARM), which a
    runtime-only device can load, where TVM's default exports a tar the device would have to link.
    Lives here, not in tune.py, so MetaSchedule's build workers do not import torch."""
    import os
    import tempfile

    import tvm.support.cc as cc

    path = os.path.join(tempfile.mkdtemp(prefix="edgevit-ms-"), "kernel.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler) if cross_compiler else None)
    return path
