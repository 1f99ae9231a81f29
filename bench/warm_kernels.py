"""Compile what the GPU suite will launch, side by side, into Triton's cache: its steps then find it there.

    python -m bench.warm_kernels                      # every binary, on all the workers
    python -m bench.warm_kernels --dry-run            # count them per step, compile nothing (any machine)

The kernel benchmark's launches (bench.kernel_static plans them at the benchmark's shapes) and the GPU
tests' (bench.gpu_cases) are planned for an H100 on the CPU, launching nothing; an H200 compiles the
same binaries (sm_90, and the grid is no part of a binary). Each distinct binary, keyed as Triton's
JIT keys it, is compiled once, by one of --workers processes, through triton.compile and so into the
cache the JIT reads (TRITON_CACHE_DIR). Triton compiles a kernel on one core, holding the GIL, so
processes divide the wait and threads do not. On a GPU the target is the device's own; elsewhere sm_90a,
as the static check compiles.
"""
import argparse
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from bench import kernel_static  # first: it makes the kernels Triton's compiled kind, not the interpreter's

WORKERS = 8  # of the GPU machine's 16 cores
# the slowest sm_90a compile of one of these kernels seen on the 2-core development CPU (issue 30: 2-8 s)
SECONDS_PER_BINARY = 8.0
PLANNING_S = 30  # planning every launch on the CPU, first: 19 s on the development CPU
STEPS = ("kernel_bench", "tests")  # the suite's steps whose kernels are warmed, in the order they run


def planned(step):
    """Every launch the suite's step plans, for an H100."""
    from bench import gpu_cases

    if step == "kernel_bench":  # its shapes and rivals, and decoding rows besides
        return [case.launch for case in kernel_static.planned_cases(kernel_static.SHAPES, ("tma",))]
    # the triton backend refuses a CPU unless the interpreter is on; planning launches nothing
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return gpu_cases.launches(kernel_static.H100)
    finally:
        os.environ.pop("TRITON_INTERPRET") if before is None else os.environ.update(TRITON_INTERPRET=before)


def binaries(launches, compiler):
    """{key: the first launch with it}: one entry per binary that Triton's JIT would compile."""
    found = {}
    for launch in launches:
        found.setdefault(compiler.specialize(launch)[0], launch)
    return found


def every_binary(compiler):
    """{key: launch} over the warmed steps, and {step: how many distinct binaries it compiles}."""
    found, per_step = {}, {}
    for step in STEPS:
        own = binaries(planned(step), compiler)
        per_step[step] = len(own)
        for key, launch in own.items():
            found.setdefault(key, launch)
    return found, per_step


def _device_target():
    import torch
    from triton.runtime import driver

    return driver.active.get_current_target() if torch.cuda.is_available() else None


_PLANNED = {}  # what the parent planned, {key: launch}: forked workers inherit it, nothing is sent


def compile_share(index, workers):
    """In a worker: compile every workers-th binary of the plan, for this machine's GPU (or sm_90a)."""
    compiler = kernel_static.Compiler(_device_target())
    keys = sorted(_PLANNED)[index::workers]
    start = time.perf_counter()
    for key in keys:
        compiler.compile(_PLANNED[key])
    return len(keys), time.perf_counter() - start


def predicted_seconds(binaries, workers=WORKERS):
    """The step's wall time, predicted: planning, then each worker's share of compiles at the slowest seen."""
    return PLANNING_S + math.ceil(binaries / workers) * SECONDS_PER_BINARY


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=WORKERS, help=f"processes compiling side by side (default {WORKERS})")
    p.add_argument("--dry-run", action="store_true", help="count the binaries per step, compile nothing")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    start = time.perf_counter()
    found, per_step = every_binary(kernel_static.Compiler())
    counts = ", ".join(f"{step} {n}" for step, n in per_step.items())
    print(f"{len(found)} distinct binaries ({counts}), planned in {time.perf_counter() - start:.1f} s; "
          f"{predicted_seconds(len(found), args.workers):.0f} s predicted on {args.workers} workers", flush=True)
    if args.dry_run:
        return 0
    _PLANNED.update(found)
    workers = min(args.workers, len(found)) or 1
    # forked: the workers start with the plan in memory; planning touched no GPU, so forking is safe
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(compile_share, range(workers), [workers] * workers))
    compiled = sum(n for n, _ in done)
    slowest = max((seconds / n for n, seconds in done if n), default=0.0)
    print(f"compiled {compiled} binaries on {workers} workers in {time.perf_counter() - start:.1f} s "
          f"(at most {slowest:.1f} s a binary on one worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
