"""Every GPU check in one command, inside a time budget: kernel benchmark, GPU tests, end to end, smoke run.

    python -m bench.gpu_suite --out_dir bench/results/h100-2026-11-26/     # 6 minutes or less
    python -m bench.gpu_suite --quick --out_dir /tmp/suite                 # 4 minutes or less
    python -m bench.gpu_suite --budget 300 --out_dir DIR                   # later steps shrink or are skipped
    python -m bench.gpu_suite --only tests,kernel_bench --out_dir DIR      # some steps

The steps run in order of value, each as its own process with its own time limit, its output
streamed to DIR/STEP.log. A step's limit is its share of the budget, cut to what is left of it;
a step that cannot get its minimum is skipped, and one that fails or runs out of time is recorded
while the suite goes on. The benchmarks get their limit as a budget of their own and write their
JSON after every group of cases, so a step cut short keeps what it measured. DIR/summary.md and
DIR/summary.json are rewritten before and after every step: a suite killed at any moment leaves
everything it had. On a machine without CUDA the steps that make sense there run (the
interpreter's kernel checks and the quick benchmarks), which is how CI checks the suite itself.

It needs abcgpt installed, since the folder kernels/ is imported as abcgpt_kernels. In a working tree
without network (the lent GPU's), install it first, beside the machine's own packages:

    python -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . &&
    PYTHONPATH=/tmp/site python -m bench.gpu_suite --out_dir DIR
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from abcgpt.core.atomic import write_json, write_text
from abcgpt.core.device import default_device
from abcgpt.core.tables import markdown_table
from bench.gate_throughput import ratio_rows
from bench.kernel_bench import kernel_table

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {False: 360, True: 240}  # seconds of wall time for the whole suite, full and --quick
GPU_TESTS = ["tests/test_cuda.py", "tests/test_gpu_kernels.py"]  # what bench.gpu_cases plans and counts
RESERVE = 15  # of the budget, kept for the suite's own start-up and summaries
BENCH_MARGIN = 10  # a benchmark's own budget ends this long before its step's limit: time to write its JSON

STORY = "the cat sat on the mat. the dog ran to the park. a girl had a red ball and she was happy. "
PLAY = "ROMEO:\nWherefore art thou, my lord? O, hence!\n\nJULIET:\nThy grace doth shine, good sir.\n\n"


@dataclass
class Step:
    name: str
    command: list
    share: float  # seconds this step may take at the default budget
    minimum: float  # below this the step is skipped, not started
    budget_flag: bool = False  # the command takes --budget SECONDS and ends itself within it


def steps(out, quick, cuda):
    """Every step in order of value: the kernel against cuBLAS first, the smoke run last."""
    py = sys.executable
    smoke = out / "smoke"
    sources = f"stories={smoke / 'stories.txt'},plays={smoke / 'plays.txt'}"
    run = smoke / "run" / "ckpt.pt"

    kernel = [py, "-m", "bench.kernel_bench", "--out", str(out / "kernel_bench.json")]
    if quick or not cuda:
        kernel.append("--quick")
    if not cuda:
        kernel.append("--no-compile")

    # the pinned GPU tests, whose binaries bench.warm_kernels compiled; the interpreter's kernel tests run in
    # the ordinary test suite, so without CUDA this is a quick check
    tests = GPU_TESTS if cuda else ["tests/test_cuda.py", "tests/test_backends.py"]
    pytest = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", *(["-x"] if quick else []), *tests]

    # end to end: the compiled training step against vanilla at the reference shape; compiling each case
    # is the slow part, so generation and the eager cases are left to a run of their own
    throughput = [py, "-m", "bench.gate_throughput", "--out", str(out / "gate_throughput.json")]
    throughput += ["--quick"] if quick or not cuda else [
        "--shapes", "reference", "--modes", "train", "--compile", "on", "--cases", "vanilla,triton,folded",
        "--alphas", "0.5,seq", "--alpha_on", "cpu", "--repeats", "12", "--rounds", "3", "--warmup", "3"]

    iters = "30" if quick or not cuda else "100"
    train_shape = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--batch_size", "16"]
    warm = [Step("warm_kernels", [py, "-m", "bench.warm_kernels"], 90, 20)] if cuda else []
    return [  # shares in proportion: fit_to_budget scales them to the budget
        *warm,  # the compiles of the next two steps, side by side, before either needs them
        Step("kernel_bench", kernel, 120, 40, budget_flag=True),
        Step("tests", pytest, 70, 30),
        Step("gate_throughput", throughput, 115, 40, budget_flag=True),
        Step("smoke_train", [py, "train.py", "--sources", sources, "--out_dir", str(smoke / "run"), "--max_iters",
                             iters, "--eval_interval", iters, "--eval_iters", "4", "--log_interval", "10",
                             *train_shape], 30, 10),
        Step("smoke_sample", [py, "sample.py", "--ckpt", str(run), "--alpha", "0,0.5,1", "--max_new_tokens", "60"],
             15, 5),
        Step("smoke_evaluate", [py, "evaluate.py", "--ckpt", str(run), "--max_windows", "20",
                                "--out", str(smoke / "eval.json")], 15, 5),
        Step("smoke_report", [py, "report.py", "--ckpt", str(run), "--out_dir", str(smoke / "report"), "--samples", "2",
                              "--sample_tokens", "60", "--max_windows", "20"], 25, 10),
    ]


def fit_to_budget(plan, budget):
    """The plan with each step's share scaled so that the shares and the reserve fill the budget."""
    scale = (budget - RESERVE) / sum(step.share for step in plan)
    for step in plan:
        step.share *= scale
    return plan


def write_corpora(folder):
    """Two small sources of the suite's own: the GPU machine has no network and no shared data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stories.txt").write_text(STORY * 400)
    (folder / "plays.txt").write_text(PLAY * 300)


def cached_binaries(cache):
    """How many compiled kernels Triton's cache holds: a step's count before and after is what it compiled."""
    return sum(1 for _ in Path(cache).rglob("*.cubin"))


def run_step(step, limit, out, cache):
    """Run one step within limit seconds, its output streamed to out/NAME.log and its kernels compiled into
    the Triton cache folder cache; never raises."""
    log_path = out / f"{step.name}.log"
    command = step.command + (["--budget", str(max(1, int(limit - BENCH_MARGIN)))] if step.budget_flag else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": cache}
    start, binaries = time.perf_counter(), cached_binaries(cache)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env)
            status = "pass" if result.returncode == 0 else f"fail (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"fail (over its {limit:.0f} s limit)"
    seconds = time.perf_counter() - start
    print(f"{step.name:>16}: {status} in {seconds:.0f} s  ({log_path})", flush=True)
    return {"step": step.name, "status": status, "seconds": round(seconds, 1), "limit_s": round(limit),
            "log": log_path.name, "binaries_compiled": cached_binaries(cache) - binaries}


def kernel_lines(path):
    if not path.exists():
        return ["not measured (the kernel benchmark wrote no results)"]
    record = json.loads(path.read_text())
    lines = [f"{record['device']}, torch {record['torch']}, triton {record['triton']}, {record['dtype']}", "",
             kernel_table(record["results"])]
    if record.get("skipped"):
        lines += ["", f"- not measured, out of time: {record['skipped']} cases"]
    return lines


def throughput_lines(path):
    if not path.exists():
        return ["not measured (the throughput benchmark wrote no results)"]
    record = json.loads(path.read_text())
    rows = [[shape, mode, "yes" if compiled else "no", case, on or "-", ratios, f"{middle['tokens_per_s']:,.0f}"]
            for shape, mode, compiled, case, on, middle, ratios in ratio_rows(record["results"])]
    return [f"{record['device']}, torch {record['torch']}, triton {record['triton']}", "",
            markdown_table(["shape", "mode", "compiled", "case", "alpha on", "x vanilla at alpha 0 / 0.5 / 1 / seq",
                            "tokens/s at 0.5"], rows, numeric=[6])]


def write_summary(out, results, quick, budget, device):
    rows = [[r["step"], r["status"], r["seconds"], r["limit_s"], r.get("binaries_compiled", "-"), r["log"]]
            for r in results]
    lines = [f"# GPU suite: {device}", "",
             f"{'quick' if quick else 'full'} run in a budget of {budget:.0f} s, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             markdown_table(["step", "result", "seconds", "limit s", "binaries compiled", "log"], rows,
                            numeric=[2, 3, 4])]
    lines += ["", "## Kernel (bench.kernel_bench)", "", "Ratios are rival time / fused time: above 1, the fused "
              "kernel is faster.", "", *kernel_lines(out / "kernel_bench.json")]
    lines += ["", "## End to end (bench.gate_throughput)", "", "Ratios are gated tokens/s over vanilla tokens/s, "
              "same run.", "", *throughput_lines(out / "gate_throughput.json")]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    record = {"device": device, "quick": quick, "budget_s": budget, "steps": results}
    write_json(out / "summary.json", record)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", "--out", required=True, help="the folder this writes logs, results and summary.md into")
    p.add_argument("--quick", action="store_true", help=f"small versions of every step, in {BUDGET[True]} s")
    p.add_argument("--budget", type=float, help=f"seconds for the whole suite (default: {BUDGET[False]}, "
                   f"or {BUDGET[True]} with --quick); later steps shrink or are skipped to fit")
    p.add_argument("--only", help="comma-separated step names (default: all)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("abcgpt_kernels") is None:  # every step would fail on it, each after a start-up
        p.error("abcgpt is not installed (abcgpt_kernels is not importable): see --help for installing it offline")
    budget = args.budget if args.budget is not None else BUDGET[args.quick]
    if budget <= RESERVE:
        p.error(f"--budget must be above {RESERVE} s, got {budget:g}")
    start = time.perf_counter()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = default_device() == "cuda"
    # Triton's cache: the suite's own unless one is given, cold as on a fresh machine, counted per step
    cache = os.environ.get("TRITON_CACHE_DIR") or tempfile.mkdtemp(prefix="abcgpt-suite-triton-")
    device = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: the steps that make sense here)"
    write_corpora(out / "smoke")
    plan = fit_to_budget(steps(out, args.quick, cuda), budget)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in plan})
        if unknown:
            p.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in plan)}")
        plan = [s for s in plan if s.name in wanted]
    print(f"GPU suite on {device}: {len(plan)} steps into {out}, budget {budget:.0f} s", flush=True)
    results = []
    for step in plan:
        left = budget - RESERVE - (time.perf_counter() - start)
        limit = min(step.share, left)
        if limit < step.minimum:
            results.append({"step": step.name, "status": "skipped (out of budget)", "seconds": 0,
                            "limit_s": round(max(0, limit)), "log": "-"})
            print(f"{step.name:>16}: skipped, {max(0, left):.0f} s of the budget left", flush=True)
            continue
        write_summary(out, [*results, {"step": step.name, "status": "running", "seconds": 0,
                                       "limit_s": round(limit), "log": f"{step.name}.log"}], args.quick, budget, device)
        results.append(run_step(step, limit, out, cache))
        write_summary(out, results, args.quick, budget, device)  # after every step: a suite cut short keeps what it had
    write_summary(out, results, args.quick, budget, device)
    failed = [r["step"] for r in results if r["status"] != "pass"]
    print(f"wrote {out / 'summary.md'} in {time.perf_counter() - start:.0f} s; "
          + (f"not passed: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
