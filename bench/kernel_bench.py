"""Microbenchmark of the fused gated-MLP kernel against eager PyTorch, torch.compile and cuBLAS.

    python -m bench.kernel_bench --out bench/results/kernel-h100-2026-11-21.json   # on a GPU
    python -m bench.kernel_bench --quick                                           # smoke run, any machine

For each shape (M rows, K in, N = hidden), in bf16 on CUDA, with the gates given
as the model gives them (a vector for one alpha, a (B, N) table of one row per
sequence of T = 256 rows for per-sequence alphas), no bias, as the model has none:
  up:  h = GELU(x W^T) * G     fused kernel | eager | torch.compile of eager |
       a plain matmul x W^T with no epilogue (the ceiling)
  mlp: the whole gated MLP, h W2^T after the up part, with the same rivals;
each in three passes: "fwd" (inference: nothing kept for a backward), "fwd-train"
(the forward of a training step: the fused kernel also stores z) and "fwd+bwd".
Every compiled rival is compiled afresh for its own case; a recompile while timing
is reported as that case's error, never as a time. Each case also reports its
first call (warm-up: compilation included). All cases of a shape run in one
process, so ratios come from one run. Off CUDA it runs tiny fp32 shapes through
Triton's interpreter: that checks the script, and its times mean nothing.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from torch.nn import functional as F  # noqa: E402

from abcgpt.device import default_device  # noqa: E402
from abcgpt.gate import tent_gate  # noqa: E402
from bench.timing import environment, summary, time_calls  # noqa: E402
from kernels.ops import gated_linear_gelu, gated_mlp  # noqa: E402

GPU_SHAPES = [(m, k, 4 * k) for m in (16384, 65536) for k in (384, 768)]
QUICK_SHAPES = [(64, 16, 48)]
PASSES = ("fwd", "fwd-train", "fwd+bwd")


def gated(h, gate):
    """h (M, N) times a gate vector, or a (B, N) table over B equal runs of rows."""
    if gate.dim() == 1:
        return h * gate
    return (h.view(gate.shape[0], -1, h.shape[1]) * gate[:, None, :]).view(h.shape)


def eager_up(x, w, w2, gate):
    return gated(F.gelu(F.linear(x, w)), gate.to(x.dtype))


def eager_mlp(x, w, w2, gate):
    return F.linear(eager_up(x, w, w2, gate), w2)


def fused_up(x, w, w2, gate):
    return gated_linear_gelu(x, w, None, gate)


def fused_mlp(x, w, w2, gate):
    return gated_mlp(x, w, None, w2, None, gate)


def matmul_up(x, w, w2, gate):
    return torch.mm(x, w.t())


def matmul_mlp(x, w, w2, gate):
    return torch.mm(torch.mm(x, w.t()), w2.t())


IMPLS = {"fused": (fused_up, fused_mlp), "eager": (eager_up, eager_mlp), "matmul": (matmul_up, matmul_mlp)}


def make_inputs(M, K, N, dtype, device, per_row, n_buffers, grad, rows_per_sequence):
    """n_buffers sets of inputs to rotate through; weights shared, activations and gates not."""
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype).requires_grad_(grad)
    w2 = (torch.randn(K, N, device=device) / N**0.5).to(dtype).requires_grad_(grad)
    scores = torch.rand(N, device=device)
    sets = []
    for _ in range(n_buffers):
        x = torch.randn(M, K, device=device, dtype=dtype).requires_grad_(grad)
        alpha = torch.rand(max(1, M // rows_per_sequence), device=device) if per_row else torch.rand((), device=device)
        sets.append((x, w, w2, tent_gate(alpha, scores)))
    return sets


def caller(fn, backward):
    def call(x, w, w2, gate):
        out = fn(x, w, w2, gate)
        if backward:
            out.backward(torch.ones_like(out))
            for t in (x, w, w2):
                t.grad = None

    return call


def first_call_seconds(call, inputs, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(name, fn, sets, backward, repeats, warmup, device):
    """{median_s, ..., warmup_s, error}: a compiled rival that recompiles while timed gets an error."""
    if name == "compiled":
        torch._dynamo.reset()  # compiled for this case alone: no cache shared with other shapes or passes
        fn = torch.compile(fn, fullgraph=True)
    call = caller(fn, backward)
    try:
        warmup_s = first_call_seconds(call, sets[0], device)
        for inputs in sets[1:]:  # every input set once before timing, so guards see them all
            call(*inputs)
        if name == "compiled":
            torch._dynamo.config.error_on_recompile = True
        times = time_calls(call, sets, repeats, warmup, device)
        return {**summary(times), "warmup_s": warmup_s, "error": None}
    except Exception as e:  # a failed or recompiling case is reported, not timed
        return {"median_s": None, "warmup_s": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    finally:
        torch._dynamo.config.error_on_recompile = False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks the script runs")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rival")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = default_device()
    quick = args.quick or device == "cpu"
    if device == "cpu":
        print("no CUDA device: tiny fp32 shapes in Triton's interpreter; the times say nothing about speed")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = QUICK_SHAPES if quick else GPU_SHAPES
    repeats, warmup = (3, 1) if quick else (args.repeats, args.warmup)
    rows_per_sequence = 16 if quick else 256  # the reference recipe's block

    impls = dict(IMPLS)
    if not args.no_compile:
        impls["compiled"] = (eager_up, eager_mlp)
    results = []
    for M, K, N in shapes:
        for per_row in (False, True):
            for pas in PASSES:
                sets = make_inputs(M, K, N, dtype, device, per_row, 2 if quick else 4, pas != "fwd", rows_per_sequence)
                for op_index, op in enumerate(("up", "mlp")):
                    row = {"M": M, "K": K, "N": N, "op": op, "alpha": "per-row" if per_row else "scalar", "pass": pas}
                    flops = 2 * M * K * N * (2 if op == "mlp" else 1) * (3 if pas == "fwd+bwd" else 1)
                    for name, fns in impls.items():
                        with torch.set_grad_enabled(pas != "fwd"):
                            stats = run_case(name, fns[op_index], sets, pas == "fwd+bwd", repeats, warmup, device)
                        tflops = flops / stats["median_s"] / 1e12 if stats["median_s"] else None
                        results.append({**row, "impl": name, **stats, "tflops": tflops})
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {**environment(device), "dtype": str(dtype).removeprefix("torch."), "quick": quick,
                  "repeats": repeats, "warmup": warmup, "rows_per_sequence": rows_per_sequence, "results": results}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return results


def print_table(results):
    """One line per case: the fused kernel's median time, first call, and speed against each rival."""
    cases = {}
    for r in results:
        cases.setdefault((r["M"], r["K"], r["N"], r["op"], r["alpha"], r["pass"]), {})[r["impl"]] = r
    print(f"{'M':>6} {'K':>5} {'N':>5} {'op':>4} {'alpha':>8} {'pass':>9} {'fused ms':>9} {'first s':>8}"
          f" {'vs eager':>9} {'vs compiled':>12} {'vs matmul':>10}")
    for (M, K, N, op, alpha, pas), impl in cases.items():
        fused = impl["fused"]["median_s"]

        def ratio(name):
            r = impl.get(name)
            if r is None:
                return "-"
            if r["error"] or not fused:
                return "error"
            return f"{r['median_s'] / fused:.2f}x"

        fused_ms = f"{fused * 1e3:.3f}" if fused else "error"
        first = f"{impl['fused']['warmup_s']:.2f}" if impl["fused"]["warmup_s"] is not None else "-"
        print(f"{M:>6} {K:>5} {N:>5} {op:>4} {alpha:>8} {pas:>9} {fused_ms:>9} {first:>8} "
              f"{ratio('eager'):>9} {ratio('compiled'):>12} {ratio('matmul'):>10}")
    for r in results:
        if r["error"]:
            print(f"error: {r['impl']} {r['op']} {r['alpha']} {r['pass']} M={r['M']} K={r['K']}: {r['error']}")
    print("ratios are speed-ups of the fused kernel: rival time / fused time (the matmul has no epilogue: its ceiling)")


if __name__ == "__main__":
    main()
