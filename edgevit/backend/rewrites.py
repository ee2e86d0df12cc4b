"""The mechanics every Relax graph rewrite of edgevit shares."""

from __future__ import annotations


def function_pass(mutator_class, name: str, dead_code: bool = False):
    """A module pass running `mutator_class` (a PyExprMutator built on the module) over every
    Relax function; with `dead_code`, the bindings the rewrite left unused are removed."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def transform(mod, _ctx):
        rewriter = mutator_class(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        rewritten = rewriter.builder_.get()
        return relax.transform.DeadCodeElimination()(rewritten) if dead_code else rewritten

    return transform
