"""Host time per fused call: what Python and PyTorch spend around one kernel launch, the launch stubbed.

    python -m bench.host_time                                          # on this machine's CPU
    python -m bench.host_time --out bench/results/host-time-cpu-2026-12-02.json

Every call is planned for an H100 and not launched (abcgpt_kernels.ops.record_launches, run=False): the
checks, the gate's dtype, the output's allocation, the launch plan (cached by layout), the tensor
descriptors and the autograd bookkeeping are all timed; the kernel and Triton's own launch are not.
Rows are 256 at each benchmark width, so that the CPU's torch.empty stays off mmap, as the GPU's
caching allocator does. Issue 30's target: 20 us per fused call or less on the development CPU.
The floors beside them are torch.empty of the output alone and, under the training forward, an
autograd.Function that does nothing but allocate its output.
"""
import argparse
import statistics
import time

import torch

from abcgpt.core.atomic import write_json
from abcgpt.core.tables import markdown_table
from bench.timing import environment
from abcgpt_kernels.ops import H100, gated_linear_gelu, record_launches

WIDTHS = [(384, 1536), (768, 3072)]  # (K, N) of the kernel benchmark's shapes
ROWS = 256
TARGET_US = 20


def per_call_us(fn, calls, rounds, launches):
    """(median, min, max) over rounds of the mean microseconds per call of fn(), and the launches per call.
    Each call's recorded launch is dropped at once: it holds the call's output alive."""
    launches.clear()
    fn()
    per_call = len(launches)
    for _ in range(calls // 10):
        fn()
        launches.clear()
    means = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            launches.clear()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means), min(means), max(means), per_call


def cases(K, N):
    """(name, fn) of each timed call at width K -> N."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    gate = torch.rand(N, generator=g)
    table = torch.rand(ROWS // 64, N, generator=g)
    x_grad, w_grad = x.clone().requires_grad_(), w.clone().requires_grad_()  # the training forward

    return [("fwd, gate vector", lambda: gated_linear_gelu(x, w, None, gate)),
            ("fwd, gate table", lambda: gated_linear_gelu(x, w, None, table)),
            ("fwd-train, gate vector", lambda: gated_linear_gelu(x_grad, w_grad, None, gate)),
            ("torch.empty of the output alone", lambda: torch.empty(ROWS, N, dtype=torch.bfloat16)),
            ("an autograd.Function that only allocates", lambda: Nothing.apply(x_grad, w_grad, None, gate, False))]


class Nothing(torch.autograd.Function):
    """The floor under the training forward: autograd's own cost for a Function of the same arguments, which
    saves them and returns an empty output."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, tanh):
        ctx.save_for_backward(x, weight)
        return x.new_empty((x.shape[0], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--calls", type=int, default=2000, help="calls per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="one width, few calls: a check of the script")
    args = p.parse_args(argv)
    calls, rounds = (50, 2) if args.quick else (args.calls, args.rounds)
    widths = WIDTHS[: 1 if args.quick else None]
    results = []
    with record_launches(target=H100, run=False, zeros=False) as launches:
        for K, N in widths:
            for name, fn in cases(K, N):
                median, low, high, per_call = per_call_us(fn, calls, rounds, launches)
                results.append({"K": K, "N": N, "rows": ROWS, "call": name, "median_us": round(median, 2),
                                "min_us": round(low, 2), "max_us": round(high, 2), "launches_per_call": per_call})
    rows = [[f"{ROWS} x {r['K']} x {r['N']}", r["call"], r["median_us"], f"{r['min_us']}-{r['max_us']}"]
            for r in results]
    print(markdown_table(["M x K x N", "call", "host us per call", "range over rounds"], rows, numeric=[2]))
    fused = [r["median_us"] for r in results if r["launches_per_call"]]
    print(f"worst fused call {max(fused):.1f} us against a target of {TARGET_US} us: "
          f"{'met' if max(fused) <= TARGET_US else 'NOT met'}")
    if args.out:
        write_json(args.out, {**environment("cpu"), "target_us": TARGET_US, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
