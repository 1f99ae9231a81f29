"""Gated GPT against vanilla nanoGPT, every gate backend, side by side in one run.

    python -m bench.gate_throughput                        # the full run for this machine
    python -m bench.gate_throughput --quick                # seconds: checks the script (CI)
    python bench/gate_throughput.py --quick                # the same, run as a file
    python -m bench.gate_throughput --out bench/results/gate_throughput-DEVICE-DATE.json
    python -m bench.gate_throughput --shapes small --cases vanilla,reference --compile off --repeats 20

For each shape it measures the training step (forward, backward, AdamW step)
and generation with a key/value cache, eager and under torch.compile (generation
compiled: its one-token steps over a static-shape cache, sampling.CompiledDecoder), in
tokens/s with peak device memory, for the vanilla GPT (gated=False) and the gated
GPT with each backend available here at alpha 0, 0.5 and 1. Ratios are to vanilla
in the same run. Timing: CUDA events (or perf_counter), warm-up, rotating
batches, median.
"""
import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from abcgpt.backends.registry import available as available_gate_backends
from abcgpt.core.atomic import write_json
from abcgpt.core.device import default_device
from abcgpt.core.recompiles import forbid_recompiles
from abcgpt.core.tables import markdown_table
from abcgpt.gates.voice import Dial
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.model.sampling import PLAIN, CompiledDecoder, Generation, generate
from bench.timing import environment, summary, time_calls

SHAPES = {  # name: (n_layer, n_head, n_embd, block_size, batch_size, vocab_size)
    "reference": (6, 6, 384, 256, 64, 65),  # the reference recipe
    "gpt2": (12, 12, 768, 1024, None, 50304),  # GPT-2 small; batch fitted to the device
    "small": (4, 4, 128, 64, 16, 65),  # the CPU preset's shape (batch 16: half the preset's, to be quick)
    "tiny": (2, 2, 64, 32, 4, 65),  # --quick
}
PER_ROW = ("seq", "point")  # dials with one setting per sequence
# Dense bf16 tensor-core peaks from the vendors' data sheets, for the MFU estimate.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device_name):
    for name, flops in PEAK_BF16_FLOPS.items():  # the longer names come first where they overlap
        if name in device_name:
            return flops
    return None


def build_model(shape, case, device, alpha=None):
    """The case's model; for the "point" dial, on the pool geometry over two sources (a point a row)."""
    n_layer, n_head, n_embd, block_size, _, vocab_size = shape
    points = {"geometry": "pool", "n_sources": 2} if alpha == "point" else {}
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                       dropout=0.0, gated=case != "vanilla", **points)
    torch.manual_seed(0)
    return GPT(config, "reference" if case == "vanilla" else case).to(device)


class TrainStep:
    """One optimizer step on a batch, as the trainer takes it (AdamW, clip, bf16 autocast on CUDA)."""

    def __init__(self, model, compiled, device):
        self.model = model
        self.forward = torch.compile(model) if compiled else model
        self.optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), torch.device(device).type)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    def __call__(self, x, y, alpha):
        with self.autocast:
            _, loss = self.forward(x, alpha, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def batches(shape, batch_size, device, n=4):
    _, _, _, block_size, _, vocab_size = shape
    g = torch.Generator().manual_seed(1)
    return [
        tuple(torch.randint(vocab_size, (batch_size, block_size), generator=g).to(device) for _ in range(2))
        for _ in range(n)
    ]


def fit_batch(shape, device, case, start=64):
    """The largest power-of-two batch (up to start) at which case, eager, takes a training step."""
    def try_step(batch_size):
        step = TrainStep(build_model(shape, case, device), False, device)
        x, y = batches(shape, batch_size, device, n=1)[0]
        step(x, y, torch.tensor(0.5) if case != "vanilla" else None)
        torch.cuda.synchronize()

    batch_size = start
    while batch_size >= 1:
        try:
            try_step(batch_size)
            return batch_size
        except torch.cuda.OutOfMemoryError:
            batch_size //= 2
        finally:
            torch.cuda.empty_cache()
    raise RuntimeError(f"not even batch 1 of shape {shape} fits this device")


class Case:
    """One measured configuration: what to call, on which rotating inputs, and what it gave."""

    def __init__(self, row, fn, inputs, tokens_per_call):
        self.row, self.fn, self.inputs, self.tokens_per_call = row, fn, inputs, tokens_per_call
        self.times, self.peak = [], 0


def interleave(cases, args, device, deadline, compiled=False):
    """Time all cases round-robin, a few calls each per round, so that drift in the
    machine's speed falls on every case alike instead of on whichever ran last.
    Compiled cases compile in their warm-up; a recompile while timed raises instead of
    quietly timing something else. Past the deadline, no new round starts (one always runs)."""
    cuda = device == "cuda"
    for case in cases:
        for i in range(args.warmup):
            case.fn(*case.inputs[i % len(case.inputs)])
    per_round = max(1, args.repeats // args.rounds)
    with forbid_recompiles() if compiled else nullcontext():
        for round_index in range(args.rounds):
            if round_index and time.perf_counter() > deadline:
                print(f"  out of time after {round_index} of {args.rounds} rounds", flush=True)
                break
            for case in cases:
                if cuda:
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                case.times += time_calls(case.fn, case.inputs, per_round, 0, device)
                if cuda:  # what a call needs above the models held resident
                    case.peak = max(case.peak, torch.cuda.max_memory_allocated() - before)
    return [
        {**case.row, **summary(case.times), "peak_memory_bytes": case.peak if cuda else None,
         "tokens_per_s": case.tokens_per_call / statistics.median(case.times)}
        for case in cases
    ]


def dials(case, alphas, devices):
    """(alpha, the device it is given on) for a case: every alpha on each of devices; "seq" (one random
    alpha per sequence) where the backend takes it."""
    if case == "vanilla":
        return [(None, None)]
    return [(a, d) for a in alphas if not (a in PER_ROW and case == "folded") for d in devices]


def alpha_devices(choice, device):
    """Where alphas are given: on the CPU, on CUDA, or both (only the CPU without CUDA)."""
    if device != "cuda":
        return ["cpu"]
    return {"cpu": ["cpu"], "cuda": ["cuda"], "both": ["cpu", "cuda"]}[choice]


def dial_tensor(alpha, on, batch_size):
    if alpha is None:
        return None
    if alpha == "seq":
        return torch.rand(batch_size, generator=torch.Generator().manual_seed(2)).to(on)
    if alpha == "point":  # the same per-row alphas as "seq", as points (1 - alpha, alpha) of the simplex
        a = torch.rand(batch_size, generator=torch.Generator().manual_seed(2))
        return Dial.mixture_of(torch.stack([1 - a, a], -1)).to(on)
    return torch.tensor(alpha, device=on)


def run_shape(name, args, device, cases, alphas, modes, compile_modes, deadline, results, save):
    """Measure every case of one shape into results, calling save() after each group."""
    shape = SHAPES[name]
    n_layer, n_head, n_embd, block_size, batch_size, vocab_size = shape
    if batch_size is None:  # half the largest that fits alone: the group's other models stay resident
        hungriest = "reference" if "reference" in cases else cases[0]  # elementwise gates keep the most activations
        batch_size = max(1, fit_batch(shape, device, hungriest) // 2) if device == "cuda" else 8
    train_batches = batches(shape, batch_size, device)
    gen_batch = min(args.gen_batch, batch_size)
    prompts = [(torch.randint(vocab_size, (gen_batch, 1), generator=torch.Generator().manual_seed(i)).to(device),)
               for i in range(2)]
    for compiled in compile_modes:
        if time.perf_counter() > deadline:
            print(f"  {name}, {'compiled' if compiled else 'eager'}: not measured, out of time", flush=True)
            continue
        group = []
        for case in cases:
            models = {}  # the line's model, and the simplex's for point dials
            for alpha, on in dials(case, alphas, alpha_devices(args.alpha_on, device)):
                kind = "point" if alpha == "point" else "line"
                if kind not in models:
                    built = build_model(shape, case, device, alpha)
                    models[kind] = built, TrainStep(built, compiled, device)
                model, step = models[kind]
                row = {"shape": name, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
                       "vocab_size": vocab_size, "n_params": model.get_num_params(), "case": case,
                       "compiled": compiled, "alpha": alpha, "alpha_device": on}

                def train(x, y, model=model, step=step, alpha=dial_tensor(alpha, on, batch_size)):
                    model.train()
                    step(x, y, alpha)

                if "train" in modes:
                    group.append(Case({**row, "mode": "train", "batch_size": batch_size}, train, train_batches,
                                      batch_size * block_size))
                if "generate" not in modes:
                    continue
                dial = dial_tensor(alpha, on, gen_batch)
                # compiled: one-token steps compiled once over a static-shape key/value cache, on a model of its
                # own (the decoder keeps the weights it folded, which the training cases go on changing)
                gen_model = build_model(shape, case, device, alpha).eval() if compiled else model
                decoder = CompiledDecoder(gen_model, dial) if compiled else None

                def gen(p, model=gen_model, alpha=dial, decoder=decoder):
                    model.eval()
                    generate(model, p, Generation(alpha, PLAIN, max_new_tokens=args.gen_tokens), decoder=decoder)

                group.append(Case({**row, "mode": "generate", "batch_size": gen_batch, "new_tokens": args.gen_tokens,
                                   "kv_cache": "static" if compiled else True}, gen, prompts,
                                  gen_batch * args.gen_tokens))
        print(f"  {name}, {'compiled' if compiled else 'eager'}: {len(group)} cases, {args.rounds} rounds", flush=True)
        results += interleave(group, args, device, deadline, compiled)
        save()
        del group
        if device == "cuda":
            torch.cuda.empty_cache()


def add_ratios_and_mfu(results, peak):
    vanilla = {(r["shape"], r["mode"], r["compiled"]): r["tokens_per_s"] for r in results if r["case"] == "vanilla"}
    for r in results:
        base = vanilla.get((r["shape"], r["mode"], r["compiled"]))
        r["ratio_to_vanilla"] = r["tokens_per_s"] / base if base else None
        r["mfu"] = None
        if peak and r["mode"] == "train":  # 6N + 12LHQT FLOPs per token (PaLM, appendix B)
            q = r["n_embd"] // r["n_head"]
            flops_per_token = 6 * r["n_params"] + 12 * r["n_layer"] * r["n_head"] * q * r["block_size"]
            r["mfu"] = flops_per_token * r["tokens_per_s"] / peak


def format_table(results):
    """Every measured case, one row each: tokens/s, its ratio to vanilla, spread, step memory and MFU."""
    rows = []
    for r in results:
        alpha = "-" if r["alpha"] is None else r["alpha"] if r["alpha"] in PER_ROW else f"{r['alpha']:g}"
        alpha += f" ({r['alpha_device']})" if r["alpha_device"] == "cuda" else ""
        rows.append([r["shape"], r["mode"], r["case"], "yes" if r["compiled"] else "no", alpha,
                     f"{r['tokens_per_s']:,.0f}", f"{r['ratio_to_vanilla']:.3f}" if r["ratio_to_vanilla"] else "n/a",
                     f"{r['iqr_s'] / r['median_s']:.1%}",  # IQR relative to the median
                     f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r["peak_memory_bytes"] else "n/a",
                     f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"])
    return markdown_table(["shape", "mode", "case", "compiled", "alpha", "tokens/s", "vs vanilla", "spread",
                           "step MiB", "MFU"], rows, numeric=range(5, 10))


def ratio_rows(results):
    """One row per case across its alphas: (shape, mode, compiled, case, alpha device, the middle alpha's
    row, "x vanilla at alpha 0 / 0.5 / 1 / per-sequence"); the summaries' tables are made of these."""
    cases = {}
    for r in results:
        cases.setdefault((r["shape"], r["mode"], r["compiled"], r["case"], r.get("alpha_device")), {})[r["alpha"]] = r
    for (shape, mode, compiled, case, on), by_alpha in cases.items():
        middle = by_alpha.get(0.5) or by_alpha.get(None) or next(iter(by_alpha.values()))
        ratios = "1" if case == "vanilla" else " / ".join(
            f"{by_alpha[a]['ratio_to_vanilla']:.2f}" if a in by_alpha and by_alpha[a]["ratio_to_vanilla"] else "-"
            for a in (0.0, 0.5, 1.0, "seq"))
        yield shape, mode, compiled, case, on, middle, ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shape, eager, few repeats: finishes in seconds")
    p.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default: reference,gpt2 on CUDA, small on CPU)")
    p.add_argument("--cases", help="comma-separated: vanilla and gate backends (default: vanilla and all available)")
    p.add_argument("--alphas", default="0,0.5,1,seq,point",
                   help="dials to time; seq: one random alpha per sequence; point: the same, as points of the simplex "
                        "over two sources (the pool dial over many sources, at two)")
    p.add_argument("--modes", default="train,generate", help="what to time: train, generate, or both")
    p.add_argument("--compile", choices=["both", "on", "off"], default="both")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per case, spread over the rounds")
    p.add_argument("--rounds", type=int, default=6, help="round-robin passes over all cases")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gen_tokens", type=int, default=64, help="new tokens per generation call")
    p.add_argument("--gen_batch", type=int, default=8, help="sequences generated at once")
    p.add_argument("--alpha_on", choices=["both", "cpu", "cuda"], default="both",
                   help="on CUDA: give alpha as a CPU tensor, a CUDA tensor, or each in turn")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--budget", type=float, help="seconds: groups of cases not started by then are left out")
    p.add_argument("--out", help="write the results as JSON here, again after every group of cases")
    args = p.parse_args(argv)

    device = default_device()
    # every compiled case is its own compiled code for the same functions: room for all of them
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = available_gate_backends(torch.device(device))
    if device != "cuda":
        print("no CUDA device: the triton backend needs CUDA and is left out; peak memory and MFU are not measured")
    if args.quick:
        args.repeats, args.rounds, args.warmup, args.gen_tokens, args.gen_batch = 3, 3, 1, 4, 2
        args.compile = "off" if args.compile == "both" else args.compile
    shapes = (args.shapes or ("tiny" if args.quick else "reference,gpt2" if device == "cuda" else "small")).split(",")
    cases = (args.cases or ",".join(["vanilla", *backends])).split(",")
    for case in cases:
        if case not in ("vanilla", *backends):
            p.error(f"case {case!r} is not available here (have: vanilla, {', '.join(backends)})")
    for shape in shapes:
        if shape not in SHAPES:
            p.error(f"unknown shape {shape!r} (have: {', '.join(SHAPES)})")
    alphas = [a if a in PER_ROW else float(a) for a in args.alphas.split(",")]
    modes = args.modes.split(",")
    if not modes or set(modes) - {"train", "generate"}:
        p.error(f"--modes takes train, generate or both, got {args.modes!r}")
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]

    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}")
    deadline = time.perf_counter() + args.budget if args.budget else float("inf")
    record = {**env, "dtype": "bfloat16 autocast" if device == "cuda" else "float32", "quick": args.quick,
              "repeats": args.repeats, "rounds": args.rounds, "warmup": args.warmup,
              "threads": torch.get_num_threads()}
    results = []

    def save():
        """Every result so far, with its ratios, written out: a run cut short keeps what it measured."""
        add_ratios_and_mfu(results, peak_flops(env["device"]) if device == "cuda" else None)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, {**record, "results": results})

    for shape in shapes:
        run_shape(shape, args, device, cases, alphas, modes, compile_modes, deadline, results, save)
    print(format_table(results))
    if args.out:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
