"""Where a compiled model's time goes, kernel by kernel, on this CPU.

Builds the model for the host exactly as `compile` does (edgevit's rules, or an int8 model's
kernels), runs it in the VM's bytecode mode with an instrument timing every kernel call, and
prints the kernels grouped by kind (int8 matmuls, fp32 matmuls, fused attention, softmax,
LayerNorm, quantize passes, layout copies, ...) with their share of the total, and the
GFLOP/s of the kernels doing the model's matmuls against PyTorch's sgemm peak, measured in the
same run. Per-call Python overhead (~2 us) is
included in each figure, so the shares of models whose kernels take milliseconds are what it is
for (ViT-Ti and Swin-T at 224), not the fashion models.

    python benchmarks/kernel_profile.py --model vit_tiny [--int8] [--sparsity 0.5] [--batch 1] [--repeat 10] [--top 12]
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import numpy as np
import torch

KINDS = [   # first match wins: a fused kernel is named after its ops, in order
    ("int8 matmul (+ epilogue)", r"matmul_[us]8s8"),
    ("activation quantize", r"round.*clip|clip.*cast"),
    ("fused attention", r"fused_attention"),
    ("softmax", r"softmax"),
    ("LayerNorm", r"layer_norm"),
    ("fp32 matmul (+ epilogue)", r"matmul"),
    ("conv (depthwise, stem)", r"conv"),
    ("GELU", r"gelu|erf|tanh"),
    ("layout / window copies", r"reshape|transpose|permute|take|concat|strided_slice|pad|roll|scatter|gather"),
]


def kind_of(name: str) -> str:
    return next((label for label, pattern in KINDS if re.search(pattern, name)), "other elementwise")


def build(model: torch.nn.Module, batch: int):
    import tvm
    from tvm import relax

    from edgevit.backend.build import quiet_tvm_warnings
    from edgevit.backend.frontend import to_relax
    from edgevit.backend.schedules import relax_pipeline
    from edgevit.targets import load_target

    c = model.cfg
    target = load_target("host")
    mod, weights = to_relax(model, torch.zeros(batch, c.in_chans, c.img_size, c.img_size), target=target)
    tvm_target = target.tvm_target()
    with tvm.transform.PassContext(opt_level=3), quiet_tvm_warnings():
        exe = relax.build(mod, tvm_target, relax_pipeline=relax_pipeline(tvm_target), exec_mode="bytecode")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm, [tvm.runtime.tensor(w) for w in weights]


def profile(vm, weights, x: np.ndarray, repeat: int) -> tuple[dict[str, float], float]:
    """Mean ms per kernel symbol over `repeat` runs, and the mean ms of a whole run."""
    import tvm

    spent: dict[str, float] = defaultdict(float)
    started: list[float] = []

    def instrument(_func, symbol, before, _ret, *_args):
        if before:
            started.append(time.perf_counter())
        else:
            spent[symbol] += time.perf_counter() - started.pop()
        return 0

    arg = tvm.runtime.tensor(x)
    vm["main"](arg, *weights)                  # warm-up
    vm.set_instrument(instrument)
    t0 = time.perf_counter()
    for _ in range(repeat):
        vm["main"](arg, *weights)
    total = (time.perf_counter() - t0) * 1e3 / repeat
    vm.set_instrument(None)
    return {k: v * 1e3 / repeat for k, v in spent.items()}, total


MATMUL_KINDS = ("int8 matmul (+ epilogue)", "fp32 matmul (+ epilogue)", "fused attention", "conv (depthwise, stem)")


def matmul_efficiency(model: torch.nn.Module, batch: int, by_kind: dict[str, float]) -> None:
    """The model's matmul and conv FLOPs (edgevit.flops: nothing else is counted) over the time
    of the kernels computing them (matmuls with their epilogues, fused attention, convs), against
    PyTorch's sgemm on 1024^3 with the same threads, measured now."""
    import sys
    from pathlib import Path

    from edgevit.flops import count_flops

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import matmul_peak_gflops  # the peak peers.py measures, the same way

    flops = count_flops(model, batch)["total"]
    ms = sum(by_kind.get(k, 0.0) for k in MATMUL_KINDS)
    peak = matmul_peak_gflops(torch.get_num_threads(), 2.0)
    achieved = flops / (ms * 1e-3) / 1e9
    print(f"  matmul / attention / conv kernels: {flops / 1e9:.2f} GFLOP in {ms:.2f} ms = {achieved:.0f} GFLOP/s, "
          f"{100 * achieved / peak:.0f}% of the sgemm peak ({peak:.0f} GFLOP/s, PyTorch 1024^3, "
          f"{torch.get_num_threads()} threads)")


def main() -> None:
    from edgevit.models import create_model
    from edgevit.quantize import QuantizeConfig, quantize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--int8", action="store_true", help="quantize first (random weights, Fashion-MNIST calibration)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=None, help="uniform window sparsity (Swin models)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    if args.int8:
        import sys
        import tempfile
        from pathlib import Path

        from edgevit.checkpoint import Checkpoint

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quant import fashion_at  # the calibration images benchmarks/quant.py uses

        data = fashion_at(model.cfg.img_size, model.cfg.in_chans)
        ckpt = Checkpoint.from_model(model, data={"spec": "fashion-mnist", "mean": data.mean, "std": data.std})
        with tempfile.TemporaryDirectory() as tmp:
            q = quantize(ckpt, data, Path(tmp) / "q", None, QuantizeConfig(calib_images=128), log=lambda s: None)
            model = q.checkpoint.build_model().eval()
    if args.sparsity is not None:
        from edgevit.sparsity import SparsityConfig

        if not hasattr(model, "set_sparsity"):
            raise SystemExit(f"error: {args.model} has no windows to prune; --sparsity is for the Swin models")

        model.set_sparsity(SparsityConfig.uniform(model, args.sparsity))
    c = model.cfg
    x = np.random.default_rng(0).standard_normal((args.batch, c.in_chans, c.img_size, c.img_size), dtype=np.float32)
    vm, weights = build(model, args.batch)
    per_kernel, total = profile(vm, weights, x, args.repeat)
    kernels = sum(per_kernel.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind_of(name)] += ms
    label = f"{args.model}{' int8' if args.int8 else ''}{f' s{args.sparsity}' if args.sparsity else ''} b{args.batch}"
    print(f"{label}: {total:.2f} ms per run (bytecode VM, instrumented), kernels {kernels:.2f} ms")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {ms:8.2f} ms  {100 * ms / kernels:5.1f}%")
    matmul_efficiency(model, args.batch, by_kind)
    print(f"top {args.top} kernels:")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {name[:70]:70s} {ms:7.2f} ms  {100 * ms / kernels:5.1f}%")


if __name__ == "__main__":
    main()
