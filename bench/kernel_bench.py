"""Microbenchmark of the fused gated-MLP kernel against eager PyTorch, torch.compile and cuBLAS.

    python -m bench.kernel_bench --out bench/results/kernel-h100-2026-11-21.json   # on a GPU
    python -m bench.kernel_bench --quick                                           # smoke run, any machine
    python bench/kernel_bench.py --budget 120 --out DIR/kernel_bench.json          # what fits in 2 minutes

For each shape (M rows, K in, N = hidden), in bf16 on CUDA, with the gates given
as the model gives them (a vector for one alpha, a (B, N) table of one row per
sequence of T = 256 rows for per-sequence alphas), no bias, as the model has none:
  up:  h = GELU(x W^T) * G     fused kernel | eager | torch.compile of eager |
       a plain matmul x W^T with no epilogue: cuBLAS (the ceiling), and our plain
       Triton matmul (bench.plain_matmul; forward only), which tells Triton's own
       cost from the epilogue's; and, forward only, the overlap experiment: the
       fused forward the other way (gated_up_kernel, two programs per SM, each able
       to run its epilogue under the other's matmul) at two programs per SM and at
       one, and our plain matmul at two per SM against its one. Same binaries, so the
       ratios say whether a second program's overlap happens, which
       bench.kernel_static's model cannot tell (docs/design.md, Overlap); and, in
       the fwd-train pass only, the training forward with the forward's deferred
       epilogue, one program per SM, against the fused op's two
  mlp: the whole gated MLP, h W2^T after the up part, with the same rivals;
each in three passes: "fwd" (inference: nothing kept for a backward), "fwd-train"
(the forward of a training step: the fused kernel also stores the slope) and "fwd+bwd".
Every compiled rival is compiled afresh for its own case, after every other case
has its numbers (compiling is the slow part); a recompile while timing is reported
as that case's error, never as a time. With --budget, cases not started in time are
left out and counted, and the JSON is rewritten after every shape. Each case also reports its
first call (warm-up: compilation included). On CUDA a case's time comes from replays of a CUDA graph
of its calls, the device's time alone (per-call events where capture fails, and the case says so), and
the host's time per call stands beside it. All cases of a shape run in one
process, so ratios come from one run. Off CUDA it runs tiny fp32 shapes through
Triton's interpreter: that checks the script, and its times mean nothing.
"""
import argparse
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from torch.nn import functional as F  # noqa: E402

from abcgpt.core.atomic import write_json
from abcgpt.core.device import default_device  # noqa: E402
from abcgpt.core.recompiles import forbid_recompiles  # noqa: E402
from abcgpt.core.tables import markdown_table  # noqa: E402
from abcgpt.gates.gate import tent_gate  # noqa: E402
from bench.plain_matmul import plain_matmul  # noqa: E402
from bench.timing import environment, host_seconds, summary, time_calls, time_graph_replays  # noqa: E402
from abcgpt_kernels.ops import _gate_arg, gated_linear_gelu, gated_mlp, target_of, up_launch  # noqa: E402

GPU_SHAPES = [(m, k, 4 * k) for m in (16384, 65536) for k in (768, 384)]  # in order of value; --quick: the first
QUICK_SHAPES = [(64, 16, 48)]
PASSES = ("fwd", "fwd-train", "fwd+bwd")
HOST_CALLS = 30  # calls timed on the host alone: few enough never to fill a GPU's launch queue


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


def triton_matmul_up(x, w, w2, gate):
    return plain_matmul(x, w)


def two_programs_up(x, w, w2, gate, per_sm=2):
    h = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)
    up_launch(x, w, None, _gate_arg(gate), h, x.new_empty(0), False, target_of(x.device), deferred=False,
              programs_per_sm=per_sm)()
    return h


def two_programs_up_one_per_sm(x, w, w2, gate):
    return two_programs_up(x, w, w2, gate, per_sm=1)


def deferred_train_up(x, w, w2, gate):
    """The training forward (h and its slope) with the forward's deferred epilogue, one program per SM: the
    rival of the fused op's two programs per SM."""
    h, slope = (torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype) for _ in range(2))
    up_launch(x, w, None, _gate_arg(gate), h, slope, False, target_of(x.device), deferred=True)()
    return h


def triton_matmul_up_two_per_sm(x, w, w2, gate):
    return plain_matmul(x, w, programs_per_sm=2)


# compiled: torch.compile of the eager code, in run_case; the rest of the up-only ones: forward only
IMPLS = {"fused": (fused_up, fused_mlp), "eager": (eager_up, eager_mlp), "matmul": (matmul_up, matmul_mlp),
         "triton_matmul": (triton_matmul_up, None), "two_programs": (two_programs_up, None),
         "two_programs_one_per_sm": (two_programs_up_one_per_sm, None),
         "triton_matmul_two_per_sm": (triton_matmul_up_two_per_sm, None), "deferred_train": (deferred_train_up, None),
         "compiled": (eager_up, eager_mlp)}
# the rivals timed in one pass alone: the forward's overlap experiment, and the training forward's other design
ONE_PASS = {**dict.fromkeys(("triton_matmul", "two_programs", "two_programs_one_per_sm", "triton_matmul_two_per_sm"),
                            "fwd"), "deferred_train": "fwd-train"}


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
        with forbid_recompiles() if name == "compiled" else nullcontext():
            times, timing = time_calls(call, sets, repeats, warmup, device), "per call"
            if device == "cuda":  # the headline: graph replays, the kernels' time without the host's
                try:
                    times, timing = time_graph_replays(call, sets, repeats, warmup, device), "graph replay"
                except Exception as e:  # the per-call times stand, and say why
                    timing = f"per call (graph capture failed: {type(e).__name__})"
            # on a CPU the call is all host time, and the interpreter's calls are slow: nothing more to time
            host = summary(host_seconds(call, sets, HOST_CALLS, device))["median_s"] if device == "cuda" else None
        return {**summary(times), "timing": timing, "host_s": host, "warmup_s": warmup_s, "error": None}
    except Exception as e:  # a failed or recompiling case is reported, not timed
        return {"median_s": None, "warmup_s": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rival")
    p.add_argument("--budget", type=float, help="seconds: cases not started by then are left out and counted")
    p.add_argument("--out", help="write the results as JSON here, again after every group of cases")
    args = p.parse_args(argv)
    deadline = time.perf_counter() + args.budget if args.budget else float("inf")
    device = default_device()
    quick = args.quick or device == "cpu"
    if device == "cpu":
        print("no CUDA device: tiny fp32 shapes in Triton's interpreter; the times say nothing about speed")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = QUICK_SHAPES if device == "cpu" else GPU_SHAPES[:1] if quick else GPU_SHAPES
    repeats, warmup = (3, 1) if device == "cpu" else (20, 5) if quick else (args.repeats, args.warmup)
    rows_per_sequence = 16 if device == "cpu" else 256  # the reference recipe's block
    record = {**environment(device), "dtype": str(dtype).removeprefix("torch."), "quick": quick, "repeats": repeats,
              "warmup": warmup, "rows_per_sequence": rows_per_sequence, "results": [], "skipped": 0}
    # the compiled rival compiles afresh for every case: it goes last, once every cheap case has its numbers
    phases = [["fused", "matmul", "triton_matmul", "two_programs", "two_programs_one_per_sm",
                "triton_matmul_two_per_sm", "deferred_train", "eager"]] + (
        [] if args.no_compile else [["compiled"]])
    for impls in phases:
        for M, K, N in shapes:
            for per_row in (False, True):
                for pas in PASSES:
                    sets = make_inputs(M, K, N, dtype, device, per_row, 2 if quick else 4, pas != "fwd",
                                       rows_per_sequence)
                    for op_index, op in enumerate(("up", "mlp")):
                        row = {"M": M, "K": K, "N": N, "op": op, "alpha": "per-row" if per_row else "scalar",
                               "pass": pas}
                        flops = 2 * M * K * N * (2 if op == "mlp" else 1) * (3 if pas == "fwd+bwd" else 1)
                        for name in impls:
                            if IMPLS[name][op_index] is None or ONE_PASS.get(name, pas) != pas:
                                continue
                            if time.perf_counter() > deadline:
                                record["skipped"] += 1
                                continue
                            with torch.set_grad_enabled(pas != "fwd"):
                                stats = run_case(name, IMPLS[name][op_index], sets, pas == "fwd+bwd", repeats, warmup,
                                                 device)
                            tflops = flops / stats["median_s"] / 1e12 if stats["median_s"] else None
                            record["results"].append({**row, "impl": name, **stats, "tflops": tflops})
                    del sets
            if args.out:  # after every shape: a run cut short keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                write_json(args.out, record)
    print(kernel_table(record["results"]))
    print("ratios are speed-ups of the fused kernel: rival time / fused time (the matmuls have no epilogue: the "
          "ceiling); 1 per SM vs 2: above 1, a second program's overlap pays")
    if record["skipped"]:
        print(f"out of time: {record['skipped']} cases not measured")
    if args.out:
        print(f"wrote {args.out}")
    return record["results"]


RIVALS = {"matmul": "vs cuBLAS matmul", "triton_matmul": "vs our Triton matmul",
          "two_programs": "vs two programs per SM", "deferred_train": "vs a deferred epilogue",
          "compiled": "vs compiled", "eager": "vs eager"}
# the overlap experiment: one program per SM's time over two's, for the same binary (above 1: the second pays)
SECOND_PROGRAM = {"two-program kernel: 1 per SM vs 2": ("two_programs_one_per_sm", "two_programs"),
                  "our Triton matmul: 1 per SM vs 2": ("triton_matmul", "triton_matmul_two_per_sm")}


def kernel_table(results):
    """A Markdown table, one line per case: the fused kernel's median time, its first call (compilation
    included), and its speed against each rival (rival time / fused time), then any errors."""
    cases = {}
    for r in results:
        cases.setdefault((r["M"], r["K"], r["N"], r["op"], r["alpha"], r["pass"]), {})[r["impl"]] = r
    rows = []
    for (M, K, N, op, alpha, pas), impl in cases.items():
        fused = impl.get("fused")
        if fused is None:
            continue

        def ratio(name, base="fused"):
            rival, ours = impl.get(name), impl.get(base)
            if rival is None or ours is None:
                return "-"
            if rival["error"] or ours["error"]:
                return "error"
            return f"{rival['median_s'] / ours['median_s']:.2f}"

        rows.append([f"{M} x {K} x {N}", op, alpha, pas,
                     "error" if fused["error"] else f"{fused['median_s'] * 1e3:.3f}",
                     "-" if fused.get("host_s") is None else f"{fused['host_s'] * 1e6:.0f}",
                     "-" if fused["warmup_s"] is None else f"{fused['warmup_s']:.2f}", *map(ratio, RIVALS),
                     *(ratio(*pair) for pair in SECOND_PROGRAM.values())])
    table = markdown_table(["M x K x N", "op", "alpha", "pass", "fused ms", "host us a call", "first call s",
                            *RIVALS.values(), *SECOND_PROGRAM], rows,
                           numeric=range(4, 7 + len(RIVALS) + len(SECOND_PROGRAM)))
    errors = [f"- error: {r['impl']} {r['op']} {r['alpha']} {r['pass']} M={r['M']} K={r['K']}: {r['error']}"
              for r in results if r["error"]]
    return "\n".join([table, *errors])


if __name__ == "__main__":
    main()
