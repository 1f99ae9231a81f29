"""Microbenchmark of the fused gated-MLP kernel against eager PyTorch, torch.compile and cuBLAS.

    python bench/kernel_bench.py --out bench/results/kernel-h100-2026-11-21.json   # on a GPU
    python bench/kernel_bench.py --quick                                            # smoke run, any machine

For each shape (M rows, K in, N hidden), in bf16 on CUDA:
  up:  h = GELU(x W^T + b) * g(alpha, m)   fused kernel | eager (linear, GELU, multiply) |
       torch.compile of eager | plain matmul x W^T with no epilogue (the ceiling)
  mlp: the whole gated MLP, h W2^T + b2 after the up part, with the same rivals;
each forward only and forward plus backward, with one alpha and with one per row.
All cases of one shape run side by side in one process; ratios come from that run.
Off CUDA (or with --quick) it runs tiny fp32 shapes through Triton's interpreter:
that checks the script, and its times mean nothing.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels are defined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.nn import functional as F  # noqa: E402

from abcgpt.gate import tent_gate  # noqa: E402
from bench.timing import environment, summary, time_calls  # noqa: E402
from kernels.ops import gated_linear_gelu, gated_mlp  # noqa: E402

GPU_SHAPES = [(m, k, 4 * k) for m in (16384, 65536) for k in (384, 768)]
QUICK_SHAPES = [(64, 16, 48)]


def eager_up(x, w, b, alpha, m):
    return F.gelu(F.linear(x, w, b)) * tent_gate(alpha, m).to(x.dtype)


def eager_mlp(x, w, b, w2, b2, alpha, m):
    return F.linear(eager_up(x, w, b, alpha, m), w2, b2)


def fused_up(x, w, b, alpha, m):
    return gated_linear_gelu(x, w, b, alpha, m)


def fused_mlp(x, w, b, w2, b2, alpha, m):
    return gated_mlp(x, w, b, w2, b2, alpha, m)


def matmul_up(x, w, b, alpha, m):
    return torch.mm(x, w.t())


def matmul_mlp(x, w, b, w2, b2, alpha, m):
    return torch.mm(torch.mm(x, w.t()), w2.t())


def make_inputs(M, K, N, dtype, device, per_row, n_buffers, grad):
    """n_buffers sets of inputs to rotate through; weights shared, activations not."""
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype).requires_grad_(grad)
    b = torch.zeros(N, device=device, dtype=dtype).requires_grad_(grad)
    w2 = (torch.randn(K, N, device=device) / N**0.5).to(dtype).requires_grad_(grad)
    b2 = torch.zeros(K, device=device, dtype=dtype).requires_grad_(grad)
    m = torch.rand(N, device=device)
    sets = []
    for _ in range(n_buffers):
        x = torch.randn(M, K, device=device, dtype=dtype).requires_grad_(grad)
        alpha = torch.rand(M, device=device) if per_row else torch.tensor(0.5, device=device)
        sets.append((x, w, b, w2, b2, alpha, m))
    return sets


def run_case(fn, sets, op, backward, repeats, warmup, device):
    def call(x, w, b, w2, b2, alpha, m):
        out = fn(x, w, b, alpha, m) if op == "up" else fn(x, w, b, w2, b2, alpha, m)
        if backward:
            out.backward(torch.ones_like(out))
            for t in (x, w, b, w2, b2):
                t.grad = None

    return time_calls(call, sets, repeats, warmup, device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks the script runs")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rival")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    if device == "cpu":
        print("no CUDA device: tiny fp32 shapes in Triton's interpreter; the times say nothing about speed")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = QUICK_SHAPES if quick else GPU_SHAPES
    repeats, warmup = (3, 1) if quick else (args.repeats, args.warmup)

    impls = {"fused": (fused_up, fused_mlp), "eager": (eager_up, eager_mlp), "matmul": (matmul_up, matmul_mlp)}
    if not args.no_compile:
        impls["compiled"] = (torch.compile(eager_up), torch.compile(eager_mlp))
    results = []
    for M, K, N in shapes:
        for per_row in (False, True):
            for backward in (False, True):
                sets = make_inputs(M, K, N, dtype, device, per_row, 2 if quick else 4, backward)
                for op_index, op in enumerate(("up", "mlp")):
                    row = {"M": M, "K": K, "N": N, "op": op, "alpha": "per-row" if per_row else "scalar",
                           "pass": "fwd+bwd" if backward else "fwd"}
                    flops = 2 * M * K * N * (2 if op == "mlp" else 1) * (3 if backward else 1)
                    for name, fns in impls.items():
                        times = run_case(fns[op_index], sets, op, backward, repeats, warmup, device)
                        stats = summary(times)
                        results.append({**row, "impl": name, **stats, "tflops": flops / stats["median_s"] / 1e12})
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {**environment(device), "dtype": str(dtype).removeprefix("torch."), "quick": quick,
                  "repeats": repeats, "warmup": warmup, "results": results}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return results


def print_table(results):
    """One line per case: the fused kernel's median time and its speed against each rival."""
    cases = {}
    for r in results:
        cases.setdefault((r["M"], r["K"], r["N"], r["op"], r["alpha"], r["pass"]), {})[r["impl"]] = r
    print(f"{'M':>6} {'K':>5} {'N':>5} {'op':>4} {'alpha':>8} {'pass':>8} {'fused ms':>9} {'TFLOP/s':>8}"
          f" {'vs eager':>9} {'vs compiled':>12} {'vs matmul':>10}")
    for (M, K, N, op, alpha, pas), impl in cases.items():
        fused = impl["fused"]["median_s"]
        ratio = lambda name: f"{impl[name]['median_s'] / fused:.2f}x" if name in impl else "-"
        print(f"{M:>6} {K:>5} {N:>5} {op:>4} {alpha:>8} {pas:>8} {fused * 1e3:>9.3f} "
              f"{impl['fused']['tflops']:>8.1f} {ratio('eager'):>9} {ratio('compiled'):>12} {ratio('matmul'):>10}")
    print("ratios are speed-ups of the fused kernel: rival time / fused time (the matmul has no epilogue: its ceiling)")


if __name__ == "__main__":
    main()
