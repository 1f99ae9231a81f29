"""Every GPU check in one command: tests, kernel benchmark, end-to-end throughput, a product smoke run.

    python -m bench.gpu_suite --out_dir bench/results/h100-2026-11-23/     # the whole suite, 20 minutes or less
    python -m bench.gpu_suite --quick --out_dir /tmp/suite                 # 5 minutes or less
    python -m bench.gpu_suite --only tests,kernel_bench --out_dir DIR      # some steps

Each step runs as its own process with its own time limit, and its output goes to
DIR/STEP.log as it runs; a step that fails or runs out of time is recorded and the
suite goes on. DIR/summary.md gets every pass or fail with its time, the kernel
speed ratios and the end-to-end ratios to vanilla; DIR/summary.json the same as
data. On a machine without CUDA only the steps that make sense there run (the
interpreter's kernel tests and the quick benchmarks), which is how CI checks
the suite itself.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from abcgpt.device import default_device

ROOT = Path(__file__).resolve().parents[1]

STORY = "the cat sat on the mat. the dog ran to the park. a girl had a red ball and she was happy. "
PLAY = "ROMEO:\nWherefore art thou, my lord? O, hence!\n\nJULIET:\nThy grace doth shine, good sir.\n\n"


def steps(out, quick, cuda):
    """(name, command, time limit in seconds) of every step, in order."""
    py = sys.executable
    tests = ["tests/test_cuda.py", "tests/test_kernels.py", "tests/test_kernel_fuzz.py", "tests/test_backends.py"]
    if not cuda:  # the interpreter's kernel tests run in the ordinary test suite; here a quick check
        tests = ["tests/test_cuda.py", "tests/test_backends.py"]
    smoke = out / "smoke"
    sources = f"stories={smoke / 'stories.txt'},plays={smoke / 'plays.txt'}"
    iters = "40" if quick or not cuda else "300"
    train_shape = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--batch_size", "16"]
    kernel = [py, "-m", "bench.kernel_bench", "--out", str(out / "kernel_bench.json")]
    throughput = [py, "-m", "bench.gate_throughput", "--out", str(out / "gate_throughput.json")]
    if quick or not cuda:
        kernel += ["--quick", "--no-compile"] if not cuda else ["--quick"]
        throughput += ["--quick"]
    return [
        ("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x" if quick else "-ra", *tests],
         180 if cuda else 300),
        ("kernel_bench", kernel, 300),
        ("gate_throughput", throughput, 150 if quick else 600),
        ("smoke_train", [py, "train.py", "--sources", sources, "--out_dir", str(smoke / "run"), "--max_iters", iters,
                         "--eval_interval", iters, "--eval_iters", "4", "--log_interval", "20", *train_shape], 240),
        ("smoke_sample", [py, "sample.py", "--ckpt", str(smoke / "run" / "ckpt.pt"), "--alpha", "0,0.5,1",
                          "--max_new_tokens", "60"], 120),
        ("smoke_evaluate", [py, "evaluate.py", "--ckpt", str(smoke / "run" / "ckpt.pt"), "--max_windows", "20",
                            "--out", str(smoke / "eval.json")], 120),
        ("smoke_report", [py, "report.py", "--ckpt", str(smoke / "run" / "ckpt.pt"), "--out_dir", str(smoke / "report"),
                          "--samples", "2", "--sample_tokens", "60", "--max_windows", "20"], 180),
    ]


def write_corpora(folder):
    """Two small sources of the suite's own: the GPU machine has no network and no shared data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stories.txt").write_text(STORY * 400)
    (folder / "plays.txt").write_text(PLAY * 300)


def run_step(name, command, limit, out):
    """Run one step with its log streamed to out/NAME.log; never raises."""
    log_path = out / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env)
            status = "pass" if result.returncode == 0 else f"fail (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = f"fail (over its {limit} s limit)"
    seconds = time.perf_counter() - start
    print(f"{name:>16}: {status} in {seconds:.0f} s  ({log_path})", flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1), "log": log_path.name}


def kernel_lines(path):
    if not path.exists():
        return ["not measured (the kernel benchmark wrote no results)"]
    record = json.loads(path.read_text())
    lines = [f"{record['device']}, torch {record['torch']}, triton {record['triton']}, {record['dtype']}", "",
             "| M x K x N | op | alpha | pass | fused ms | first call s | vs matmul | vs compiled | vs eager |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    cases = {}
    for r in record["results"]:
        cases.setdefault((r["M"], r["K"], r["N"], r["op"], r["alpha"], r["pass"]), {})[r["impl"]] = r
    for (M, K, N, op, alpha, pas), impl in cases.items():
        fused = impl["fused"]

        def ratio(name):
            r = impl.get(name)
            if r is None:
                return "not measured"
            if r["error"] or fused["error"]:
                return "error"
            return f"{r['median_s'] / fused['median_s']:.2f}"

        ms = f"{fused['median_s'] * 1e3:.3f}" if not fused["error"] else "error"
        first = f"{fused['warmup_s']:.2f}" if fused["warmup_s"] is not None else "-"
        lines.append(f"| {M} x {K} x {N} | {op} | {alpha} | {pas} | {ms} | {first} | {ratio('matmul')} | "
                     f"{ratio('compiled')} | {ratio('eager')} |")
    errors = [r for r in record["results"] if r["error"]]
    lines += [""] + [f"- error: {r['impl']} {r['op']} {r['alpha']} {r['pass']} M={r['M']} K={r['K']}: {r['error']}"
                     for r in errors]
    return lines


def throughput_lines(path):
    if not path.exists():
        return ["not measured (the throughput benchmark wrote no results)"]
    record = json.loads(path.read_text())
    lines = [f"{record['device']}, torch {record['torch']}, triton {record['triton']}", "",
             "| shape | mode | compiled | case | alpha on | x vanilla at alpha 0 / 0.5 / 1 | tokens/s at 0.5 |",
             "| --- | --- | --- | --- | --- | --- | ---: |"]
    cases = {}
    for r in record["results"]:
        key = (r["shape"], r["mode"], r["compiled"], r["case"], r.get("alpha_device"))
        cases.setdefault(key, {})[r["alpha"]] = r
    for (shape, mode, compiled, case, on), by_alpha in cases.items():
        ratios = " / ".join(f"{by_alpha[a]['ratio_to_vanilla']:.2f}" if a in by_alpha else "-" for a in (0.0, 0.5, 1.0))
        middle = by_alpha.get(0.5) or next(iter(by_alpha.values()))
        lines.append(f"| {shape} | {mode} | {'yes' if compiled else 'no'} | {case} | {on or '-'} | "
                     f"{'1' if case == 'vanilla' else ratios} | {middle['tokens_per_s']:,.0f} |")
    return lines


def write_summary(out, results, quick, device):
    lines = [f"# GPU suite: {device}", "", f"{'quick' if quick else 'full'} run, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", "| step | result | seconds | log |",
             "| --- | --- | ---: | --- |"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['log']} |" for r in results]
    lines += ["", "## Kernel (bench.kernel_bench)", "", "Ratios are rival time / fused time: above 1, the fused "
              "kernel is faster.", "", *kernel_lines(out / "kernel_bench.json")]
    lines += ["", "## End to end (bench.gate_throughput)", "", "Ratios are gated tokens/s over vanilla tokens/s, "
              "same run.", "", *throughput_lines(out / "gate_throughput.json")]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"device": device, "quick": quick, "steps": results}, indent=1) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", "--out", required=True, help="the folder this writes logs, results and summary.md into")
    p.add_argument("--quick", action="store_true", help="small versions of every step: 5 minutes or less")
    p.add_argument("--only", help="comma-separated step names (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = default_device() == "cuda"
    device = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: the steps that make sense here)"
    write_corpora(out / "smoke")
    plan = steps(out, args.quick, cuda)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {name for name, _, _ in plan})
        if unknown:
            p.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(name for name, _, _ in plan)}")
        plan = [s for s in plan if s[0] in wanted]
    print(f"GPU suite on {device}: {len(plan)} steps into {out}", flush=True)
    results = []
    for name, command, limit in plan:
        results.append(run_step(name, command, limit, out))
        write_summary(out, results, args.quick, device)  # after every step: a suite cut short keeps what it had
    failed = [r["step"] for r in results if r["status"] != "pass"]
    print(f"wrote {out / 'summary.md'}; " + (f"failed: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
