"""What the fused kernels become on an H100, read off their machine code on any machine: no GPU needed.

    python -m bench.kernel_static                          # every kernel and configuration the ops launch on an H100
    python -m bench.kernel_static --check                  # exit 1 on a spill, a missing wgmma, too much shared memory
    python -m bench.kernel_static --out kernel_static.json --shapes 16384x768x3072

How it works. The ops' own launch code (abcgpt_kernels.ops: up_launch and down_grad_launch)
plans every launch for an H100 (132 SMs, compute capability 9.0) on meta tensors, which have shapes and
strides but no memory, at the benchmark's shapes, with a gate vector and a per-sequence gate table, on
the TMA and the pointer path, for the forward, the training forward (h and z) and the backward. Each
distinct specialization is compiled by Triton for sm_90a as its JIT would compile it, and read with the
CUDA tools Triton's wheel ships: registers and stack from cuobjdump -res-usage, shared memory from the
compiled metadata, and wgmma (HGMMA), special-function (MUFU) and epilogue instruction counts from the
SASS. A plain persistent TMA matmul of our own (bench.plain_matmul) goes through the same model, which
calibrates it: a model that does not put that kernel near a plain matmul is not to be trusted. So does
the forward the other way (up-two-programs: gated_up_kernel at two programs per SM), the overlap design
the kernel benchmark weighs against the deferred forward, and the training forward the other way
(up-train-deferred), weighed against its two programs per SM. The check holds the deferred forward to having
a wgmma in flight under its epilogue. The model is calibrated on cuBLAS too: a latency per tile fitted to
cuBLAS's measured H100 times (CUBLAS_H100_US) and an L2 term give each case a ratio to cuBLAS where it
was measured.

Every time here is predicted by the model below, never measured; --help-model prints it.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler: set before triton.jit wraps the kernels

import torch  # noqa: E402
import triton  # noqa: E402

from abcgpt.core.atomic import write_json
from abcgpt.core.tables import markdown_table  # noqa: E402
from abcgpt_kernels.ops import H100, down_grad_launch, pointer_loads, up_launch  # noqa: E402

MODEL = """The issue-bound model (per output tile, on one SM; H100 SXM figures):
  mma      = BLOCK_M * BLOCK_N * K / 2048         wgmma cycles: 2048 bf16 multiply-adds per SM per clock
  epilogue = max(E * W / 4, U * W / 4 * 8)        E SASS instructions per thread of the epilogue and the
                                                  tile's other work outside the K loop, U of them MUFU, W
                                                  warps: each of the 4 sub-partitions issues one warp
                                                  instruction per clock, and its 4-lane special-function
                                                  unit takes 8 clocks for a warp's MUFU
  kstep    = max(0, S * W / 4 - mma per K step)   S instructions per thread in a K step beyond what the
                                                  step's wgmma hides, for every K step
  per tile = mma + epilogue + kstep               "in step": one program per SM, whose warps issue the
                                                  wgmma and also run the epilogue; or P programs per SM
                                                  that run their matmuls together and then their
                                                  epilogues together, so nothing overlaps an epilogue
  per tile = max(mma, (mma + epilogue + kstep) / P, epilogue + kstep)
                                                  "interleaved": P programs per SM, the tensor cores
                                                  serving one program's tile while another runs its
                                                  epilogue
  epilogue = T * W / 4 + C * max(0, S * W / 4 + Q - mma per K step)
                                                  the deferred forward (gated_up_deferred_kernel), one
                                                  program per SM, K of at least C steps: T instructions
                                                  of the tile's own, then a chunk of the kept tile's
                                                  epilogue, Q = max(E / C * W / 4, U / C * W / 4 * 8),
                                                  after each of the first C K steps' wgmma, which hides
                                                  it up to that step's mma cycles (a short K loop
                                                  leaves the other chunks unhidden); and once per
                                                  program, its last tile's C chunks, unhidden
  time     = max(tiles per SM * per tile / 1.83 GHz, bytes / 3.35 TB/s)
  ratio    = the same product as a plain matmul would take at full rate, max(2 M N K / 989.4 TFLOP/s,
             its own bytes / 3.35 TB/s), over that time; 1 would match an ideal matmul, which cuBLAS
             itself does not reach (0.50-0.73 of it, measured on an H100 at the benchmark's shapes).
Calibrated on cuBLAS: per tile = max(per tile above + L, (BLOCK_M + BLOCK_N) K 2 / (12 TB/s / 132 /
  1.83 GHz)), L the cycles per 128 x 128 tile that make the model reproduce cuBLAS's measured times
  (fitted_tile_latency; charged whole, also with two programs per SM), the second term L2's share of
  bandwidth per SM; "ratio to cuBLAS" is cuBLAS's measured time over that, where cuBLAS was measured.
  If cuBLAS's kernels load the next tile while they finish one, as CUTLASS's warp-specialized sm90
  kernels do (not verified for the kernels cuBLAS chose here), L holds no refill of the load pipeline:
  a kernel whose loop nest refills at every tile (loads in flight under the epilogue: 0) then pays one
  load latency per tile more than the model charges, a figure no measurement here gives.
With two programs per SM it gives both: nothing in the kernels orders them, they start together on
equal work, and two programs that share the tensor cores and the issue slots equally keep whatever
offset they have, so the model cannot say which holds (bench.kernel_bench times the same binary at
one program per SM to find out); a kernel with one program per SM has one figure. Latencies, waits
on TMA and barriers, L2 misses and clock changes are not in the uncalibrated figures, an upper bound
for comparing designs; the calibrated ones carry them as one number per tile, fitted to cuBLAS. Every
ratio it gives is "predicted"."""

CLOCK_HZ = 1.83e9
PEAK_FLOPS = 989.4e12  # dense bf16: 132 SMs * 4096 flops per clock * 1.83 GHz
HBM_BYTES_PER_S = 3.35e12
MMA_PER_CLOCK = 2048  # bf16 multiply-adds per SM per clock
SMEM_PER_BLOCK = 232448  # the most one program may take (227 KiB)
SMEM_PER_SM = 233472  # 228 KiB, of which each resident program also takes 1 KiB
REGS_PER_SM = 65536
THREADS_PER_SM = 2048

SHAPES = [(16384, 384, 1536), (16384, 768, 3072), (65536, 384, 1536), (65536, 768, 3072), (16384, 1024, 4096)]
# cuBLAS measured: the plain bf16 x W^T at the benchmark's shapes on one H100 80GB HBM3, 2026-11-23 (torch 2.11,
# CUDA 13.0; the faster of that run's two timings of each), in microseconds
CUBLAS_H100_US = {(16384, 384, 1536): 39.1, (16384, 768, 3072): 114.4, (65536, 384, 1536): 129.7,
                  (65536, 768, 3072): 429.0}
CALIBRATION_TILE = (128, 128)  # the tile the latency is fitted per: ours, since it is our tiles it charges
# L2's bandwidth to the SMs: a public figure for the H100 SXM (about 12 TB/s), not measured here
L2_BYTES_PER_S = 12e12


def mma_cycles(bm, bn, K):
    return bm * bn * K / MMA_PER_CLOCK


def fitted_tile_latency():
    """The cycles per output tile beyond its wgmma that make the model reproduce cuBLAS's measured times:
    the median over CUBLAS_H100_US of (time * clock / tiles per SM - mma cycles), with our 128 x 128 tiles.
    It stands for what the issue-bound model leaves out: pipeline fill, the tile-to-tile drain, waits, clock
    below its peak."""
    bm, bn = CALIBRATION_TILE
    tiles_per_sm = {shape: -(-(-(-shape[0] // bm) * -(-shape[2] // bn)) // H100.sms) for shape in CUBLAS_H100_US}
    return statistics.median(us * 1e-6 * CLOCK_HZ / tiles_per_sm[(M, K, N)] - mma_cycles(bm, bn, K)
                             for (M, K, N), us in CUBLAS_H100_US.items())


TILE_LATENCY_CYCLES = fitted_tile_latency()
DECODE_BATCHES = (1, 8, 64)  # small batches of one-token steps: one binary for them all
ROWS_PER_SEQUENCE = 256  # the reference recipe's block, as bench.kernel_bench gates it


@dataclass
class Case:
    """One launch the ops would make: what it is, the launch, and what it moves and computes."""
    kernel: str  # up, up-train (h and its slope), down-grad; plain, up-two-programs, up-train-deferred (the
    # benchmark's rivals)
    path: str  # tma, pointer, or - for the elementwise kernel
    gate: str  # vector, table, or -
    shape: tuple  # (M, K, N)
    launch: object
    hbm_bytes: int
    binary: dict = field(default_factory=dict)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def gate_of(kind, M, N, rows_per_sequence=ROWS_PER_SEQUENCE):
    """A gate vector, or a table of one row per sequence (decoding: one token per sequence)."""
    if kind == "vector":
        return meta(N, dtype=torch.float32)
    return meta(max(1, M // rows_per_sequence), N, dtype=torch.float32)


def planned_cases(shapes, paths):
    """Every launch the ops plan for an H100 at these shapes, and at each the kernel benchmark's rivals: our
    plain matmul, and the forward as gated_up_kernel at two programs per SM."""
    from bench.plain_matmul import plain_matmul_launch

    cases = []
    for path in paths:
        with pointer_loads(path == "pointer"):
            for M, K, N in shapes:
                for gate in ("vector", "table"):
                    g = gate_of(gate, M, N)
                    x, w, h = meta(M, K), meta(N, K), meta(M, N)
                    gate_bytes = g.numel() * 4
                    cases.append(Case("up", path, gate, (M, K, N), up_launch(x, w, None, g, h, meta(0), False, H100),
                                      2 * (M * K + N * K + M * N) + gate_bytes))
                    cases.append(Case("up-train", path, gate, (M, K, N),
                                      up_launch(x, w, None, g, h, meta(M, N), False, H100),
                                      2 * (M * K + N * K + 2 * M * N) + gate_bytes))
                    if path == "tma":  # the benchmark's rivals: the forward at two programs per SM, and the
                        # training forward with a deferred epilogue
                        cases.append(Case("up-two-programs", path, gate, (M, K, N),
                                          up_launch(x, w, None, g, h, meta(0), False, H100, deferred=False),
                                          2 * (M * K + N * K + M * N) + gate_bytes))
                        cases.append(Case("up-train-deferred", path, gate, (M, K, N),
                                          up_launch(x, w, None, g, h, meta(M, N), False, H100, deferred=True),
                                          2 * (M * K + N * K + 2 * M * N) + gate_bytes))
                cases.append(Case("down-grad", path, "-", (M, K, N),  # the gate is in the slope the forward kept
                                  down_grad_launch(meta(M, K), meta(K, N), meta(M, N), meta(M, N), H100),
                                  2 * (M * K + N * K + 2 * M * N)))
            for rows in DECODE_BATCHES:
                for M, K, N in sorted({(rows, k, n) for _, k, n in shapes}):
                    for gate in ("vector", "table"):
                        cases.append(Case("up", path, gate, (M, K, N),
                                          up_launch(meta(M, K), meta(N, K), None, gate_of(gate, M, N, 1),
                                                    meta(M, N), meta(0), False, H100), 2 * (M * K + N * K + M * N)))
    for M, K, N in shapes:
        cases.append(Case("plain", "tma", "-", (M, K, N), plain_matmul_launch(meta(M, K), meta(N, K), meta(M, N), H100),
                          2 * (M * K + N * K + M * N)))
    return cases


class Compiler:
    """Triton's JIT steps for a launch (bind, specialize, compile) with sm_90a as the target."""

    def __init__(self, target=None):
        """target: a triton GPUTarget (default sm_90a, an H100's, on any machine)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = target or GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.binders = {}
        self.binaries = {}
        tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        self.cuobjdump = str(tools / "cuobjdump")

    def specialize(self, launch):
        """(key, signature, constexprs, attrs, options): what the JIT would compile for this launch."""
        from triton.runtime.jit import create_function_from_signature

        fn, kwargs = launch.kernel, dict(launch.kwargs)
        kwargs.setdefault("debug", False)
        if fn not in self.binders:
            self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = self.binders[fn](*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        key = json.dumps([fn.__name__, signature, sorted((str(k), repr(v)) for k, v in constexprs.items()),
                          sorted((str(k), repr(v)) for k, v in attrs.items()), repr(options)])
        return key, signature, constexprs, attrs, options

    def compile(self, launch):
        """(the compiled kernel, its options), through Triton's on-disk cache as its JIT would go."""
        from triton.compiler import ASTSource

        _, signature, constexprs, attrs, options = self.specialize(launch)
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=self.target,
                                  options=options.__dict__)
        return compiled, options

    def binary(self, launch):
        """The analysis of the binary this launch runs, compiled once per distinct specialization."""
        key = self.specialize(launch)[0]
        if key not in self.binaries:
            compiled, options = self.compile(launch)
            self.binaries[key] = {"function": launch.kernel.__name__, "num_warps": options.num_warps,
                                  "num_stages": options.num_stages, "maxnreg": options.maxnreg,
                                  "smem_bytes": int(compiled.metadata.shared), **self.read(compiled)}
        return self.binaries[key]

    def read(self, compiled):
        with tempfile.TemporaryDirectory() as folder:
            cubin = Path(folder) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([self.cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True,
                                   check=True).stdout
            sass = subprocess.run([self.cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
        regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
        instructions = parse_sass(sass)
        opcodes = [op for _, op, *_ in instructions]
        return {"regs": regs, "stack_bytes": stack, "local_ops": sum(op in ("LDL", "STL") for op in opcodes),
                "hgmma": sum(op == "HGMMA" for op in opcodes), "hmma": sum(op == "HMMA" for op in opcodes),
                "tma_stores": sum(op == "UTMASTG" for op in opcodes),
                "instructions": len(opcodes), "regions": regions(instructions)}


def parse_sass(text):
    """[(index, opcode without modifiers, the branch target's address or None, the whole instruction)] of
    one kernel's SASS.
    Out-of-line code (such as a barrier wait's retry loop) is entered by a conditional branch forward and
    left by an unconditional branch back to the instruction after it: that way home gets no target, as it
    is no loop's back edge."""
    found, predicated = [], {}
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+((@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*);", line)
        if not m:
            continue
        address, opcode = int(m.group(1), 16), m.group(4)
        target = None
        if opcode == "BRA":
            t = re.search(r"0x([0-9a-f]+)", line[m.end(1):])
            target = int(t.group(1), 16) if t else None
            predicated[address] = bool(m.group(3))
        if opcode != "NOP":
            found.append((address, opcode, target, m.group(2)))
    before = {b[0]: a for a, b in zip(found, found[1:])}  # the instruction before each address
    parsed = []
    for address, opcode, target, text in found:
        if opcode == "BRA" and target is not None and target <= address and not predicated[address]:
            entry = before.get(target)  # a conditional branch into (target, address] left the path just there
            if entry and entry[1] == "BRA" and predicated[entry[0]] and target < (entry[2] or -1) <= address:
                target = None
        parsed.append((address, opcode, target, text))
    return parsed


def regions(instructions):
    """Per-thread instruction counts of a matmul kernel's parts, or None: {"epilogue", "mufu" (of the
    epilogue), "kstep" (one K step), "tile" (the rest of a tile's work: its loads' prologue, its origin),
    "wgmma_in_flight" (wgmma groups left running under the epilogue), "loads_ahead_of_epilogue" (TMA or
    cp.async loads the main loop issues before an epilogue inside it: the next tile's first K steps, in
    flight while the epilogue runs; 0 where each tile refills its pipeline after its epilogue),
    "global_loads_in_loop" (LDG in the main loop: the gate and bias loads of an epilogue inside it)}.

    The main loop is the innermost loop holding the wgmma. Triton's flattened loop nest puts the
    epilogue inside it, behind a forward branch that the K steps before the last take around it (the
    widest such branch after the last wgmma), and so does a deferred epilogue (gated_up_deferred_kernel),
    inside a tile loop; a nested loop puts it after the K loop's back edge, up to the tile loop's. The
    tile loop's other instructions are the tile's own, less what forward branches take some tiles
    around (code that stores: an epilogue's variant for a short K loop)."""
    index = {address: i for i, (address, *_) in enumerate(instructions)}
    mma = [i for i, (_, op, *_) in enumerate(instructions) if op in ("HGMMA", "HMMA")]
    if not mma:
        return None
    loops = sorted((i - index[t], index[t], i) for i, (_, op, t, _) in enumerate(instructions)
                   if op == "BRA" and t in index and index[t] <= i)
    loops = [(head, tail) for _, head, tail in loops if head <= mma[0] and mma[-1] <= tail]
    if not loops:
        return None
    head, tail = loops[0]
    stores = [i for i, (_, op, *_) in enumerate(instructions) if op in ("UTMASTG", "STG")]
    skips = [(index[t] - i, i + 1, index[t]) for i, (_, op, t, _) in enumerate(instructions)
             if op == "BRA" and mma[-1] < i < tail and t in index and i < index[t] <= tail
             and any(i < s < index[t] for s in stores)]
    if skips:
        _, start, end = max(skips)
        epilogue = range(start, end)
        kstep = tail + 1 - head - len(epilogue)
    elif len(loops) > 1:
        epilogue = range(tail + 1, loops[1][1])
        kstep = tail + 1 - head
    else:
        return None
    tile = 0
    if len(loops) > 1:
        outer_head, outer_tail = loops[1]
        own = set(range(outer_head, outer_tail + 1)) - set(range(head, tail + 1)) - set(epilogue)
        for i, (_, op, t, _) in enumerate(instructions):
            if op == "BRA" and i in own and t in index and i < index[t] and any(i < s < index[t] for s in stores):
                own -= set(range(i + 1, index[t]))
        tile = len(own)
    # loads the main loop issues before an epilogue inside it, where no tile loop encloses it (a flattened loop
    # nest): the steps ahead, at a tile's last K step the next tile's first, in flight through the epilogue. A
    # nested loop refills at each tile, also where its epilogue is in the K loop (the deferred forward's chunks).
    flat = skips and len(loops) == 1
    ahead = sum(op in ("UTMALDG", "LDGSTS") for _, op, *_ in instructions[head:epilogue.start]) if flat else 0
    # plain global loads in the main loop: the deferred forward's gates, unless they were loaded before it
    global_loads = sum(op == "LDG" for _, op, *_ in instructions[head:tail + 1])
    # wgmma groups the epilogue leaves in flight: the fewest any wgmma wait from the last wgmma before it on allows
    last_mma = max((i for i in mma if i < epilogue.start), default=epilogue.start)
    in_flight = [int(re.search(r"gsb0, (0x[0-9a-f]+)", text).group(1), 16)
                 for _, op, _, text in instructions[last_mma:epilogue.stop] if op == "WARPGROUP" and "DEPBAR" in text]
    return {"epilogue": len(epilogue), "mufu": sum(instructions[i][1] == "MUFU" for i in epilogue),
            "kstep": kstep, "tile": tile, "wgmma_in_flight": min(in_flight, default=0),
            "loads_ahead_of_epilogue": ahead, "global_loads_in_loop": global_loads}


def programs_per_sm(binary, launch):
    """How many programs of this binary an SM holds at once, and how many the grid gives it."""
    threads = 32 * binary["num_warps"]
    regs = -(-binary["regs"] // 8) * 8  # registers are allocated per warp in steps of 8 per thread
    fit = min(THREADS_PER_SM // threads, REGS_PER_SM // (regs * threads), SMEM_PER_SM // (binary["smem_bytes"] + 1024))
    return fit, -(-launch.grid[0] // H100.sms)


def deferred(case):
    return case.binary["function"] == "gated_up_deferred_kernel"


def predict(case):
    """The model's time and ratio to an ideal plain matmul for one case (see MODEL); {} without a main loop."""
    b, r = case.binary, case.binary["regions"]
    if r is None:
        return {}
    M, K, N = case.shape
    cfg = case.launch.kwargs
    bm, bn, bk, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    fit, given = programs_per_sm(b, case.launch)
    resident = max(1, min(fit, given))
    steps = -(-K // bk)
    mma = bm * bn * K / MMA_PER_CLOCK
    issue = warps / 4  # clocks per instruction per thread: each sub-partition issues one warp instruction a clock
    if deferred(case):  # the first C K steps each carry a chunk of the kept tile's epilogue
        chunks = 2 ** cfg["LEVELS"]
        under = min(steps, chunks)
        chunk = max(r["epilogue"] / chunks * issue, r["mufu"] / chunks * issue * 8)
        epilogue = (r["tile"] * issue + under * max(0.0, r["kstep"] * issue + chunk - mma / steps)
                    + (chunks - under) * chunk)
        kstep = max(0.0, r["kstep"] * issue - mma / steps) * (steps - under)
        last = chunks * chunk  # each program's last tile has no next K loop to hide under
    else:
        epilogue = max((r["epilogue"] + r["tile"]) * issue, r["mufu"] * issue * 8)
        kstep = max(0.0, r["kstep"] * issue - mma / steps) * steps
        last = 0.0
    in_step = mma + epilogue + kstep
    interleaved = max(mma, in_step / resident, epilogue + kstep)
    tiles = -(-M // bm) * -(-N // bn)
    tiles_per_sm = -(-tiles // case.launch.grid[0]) * given  # every program the grid gives an SM runs there
    ideal = max(2 * M * N * K / PEAK_FLOPS, 2 * (M * K + N * K + M * N) / HBM_BYTES_PER_S)

    def seconds(per_tile):
        return max((tiles_per_sm * per_tile + given * last) / CLOCK_HZ, case.hbm_bytes / HBM_BYTES_PER_S)

    # calibrated on cuBLAS: each tile also pays the fitted latency (all of it: that a second program hides
    # it is not shown), and no SM reads its operands through L2 faster than its share of L2's bandwidth
    l2_cycles = (bm + bn) * K * 2 / (L2_BYTES_PER_S / H100.sms / CLOCK_HZ)

    def calibrated(per_tile):
        return seconds(max(per_tile + TILE_LATENCY_CYCLES, l2_cycles))

    cublas = CUBLAS_H100_US.get((M, K, N))
    return {"fit_per_sm": fit, "resident_per_sm": resident, "mma_cycles": mma, "epilogue_cycles": epilogue,
            "kstep_excess_cycles": kstep, "l2_cycles": l2_cycles,
            "predicted_us": seconds(interleaved) * 1e6, "predicted_ratio": ideal / seconds(interleaved),
            "predicted_us_in_step": seconds(in_step) * 1e6, "predicted_ratio_in_step": ideal / seconds(in_step),
            "calibrated_us": calibrated(interleaved) * 1e6, "calibrated_us_in_step": calibrated(in_step) * 1e6,
            "predicted_vs_cublas": cublas * 1e-6 / calibrated(interleaved) if cublas else None,
            "predicted_vs_cublas_in_step": cublas * 1e-6 / calibrated(in_step) if cublas else None}


def problems(case):
    """What the H100 would refuse or pay for: spills, shared memory over the limit, a matmul without wgmma,
    a deferred epilogue with no wgmma under it."""
    b, found = case.binary, []
    if b["stack_bytes"] or b["local_ops"]:
        found.append(f"spills: {b['stack_bytes']} B of stack, {b['local_ops']} local loads and stores")
    if b["smem_bytes"] > SMEM_PER_BLOCK:
        found.append(f"needs {b['smem_bytes']} B of shared memory, over the {SMEM_PER_BLOCK} B an H100 allows")
    if b["hgmma"] == 0:
        found.append("a matmul without wgmma (HGMMA)")
    if deferred(case) and not (b["regions"] or {}).get("wgmma_in_flight"):
        found.append("a deferred epilogue that waits for every wgmma: nothing runs under it")
    return found


def label(case):
    cfg = case.launch.kwargs
    config = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}" + (f"x{cfg['BLOCK_K']}" if "BLOCK_K" in cfg else "")
    return f"{case.kernel} {case.path} {case.gate} {config} w{cfg.get('num_warps', 4)}"


def run(shapes, paths):
    compiler = Compiler()
    cases = planned_cases(shapes, paths)
    for case in cases:
        case.binary = compiler.binary(case.launch)
    return cases, len(compiler.binaries)


def both(in_step, interleaved):
    """A prediction in step and interleaved; one figure where the two agree."""
    return f"{in_step:.2f}" if f"{in_step:.2f}" == f"{interleaved:.2f}" else f"{in_step:.2f} / {interleaved:.2f}"


def report(cases):
    plain = {c.shape: predict(c) for c in cases if c.kernel == "plain"}
    rows = []
    for case in cases:
        b, p, r = case.binary, predict(case), case.binary["regions"]
        ours = plain.get(case.shape) if p else None
        rows.append([label(case), "x".join(map(str, case.shape)), b["regs"], b["stack_bytes"], b["smem_bytes"],
                     p.get("resident_per_sm", "-"), b["hgmma"], f"{r['epilogue']} ({r['mufu']})" if r else "-",
                     r["loads_ahead_of_epilogue"] if r else "-",
                     both(p["predicted_ratio_in_step"], p["predicted_ratio"]) if p else "-",
                     both(p["predicted_vs_cublas_in_step"], p["predicted_vs_cublas"])
                     if p and p["predicted_vs_cublas"] else "-",
                     both(ours["predicted_us_in_step"] / p["predicted_us_in_step"],
                          ours["predicted_us"] / p["predicted_us"]) if ours else "-",
                     "; ".join(problems(case)) or "ok"])
    return markdown_table(["kernel, path, gate, tile, warps", "M x K x N", "registers", "spill B", "shared B",
                           "programs per SM", "wgmma", "epilogue instructions (MUFU) per thread",
                           "loads in flight under the epilogue (0: refilled per tile)",
                           "predicted ratio to an ideal matmul, in step / interleaved",
                           "predicted ratio to cuBLAS as measured on an H100, in step / interleaved",
                           "predicted ratio to our plain matmul, in step / interleaved", "check"],
                          rows, numeric=range(2, 9))


def parse_shape(text):
    try:
        M, K, N = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is MxKxN, such as 16384x768x3072, got {text!r}") from None
    return M, K, N


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")], default=SHAPES,
                   help="comma-separated MxKxN (default: the kernel benchmark's, and K=1024)")
    p.add_argument("--paths", default="tma,pointer", help="load paths: tma, pointer or both")
    p.add_argument("--out", help="write every case and binary as JSON here")
    p.add_argument("--check", action="store_true", help="exit 1 if any launch spills, lacks wgmma, or needs more "
                   "shared memory than an H100 has")
    p.add_argument("--help-model", action="store_true", help="print the model behind the predicted ratios")
    args = p.parse_args(argv)
    if args.help_model:
        print(MODEL)
        return 0
    paths = args.paths.split(",")
    if not paths or set(paths) - {"tma", "pointer"}:
        p.error(f"--paths takes tma, pointer or both, got {args.paths!r}")
    cases, n_binaries = run(args.shapes, paths)
    print(report(cases))
    print(f"\n{len(cases)} launches, {n_binaries} distinct binaries, compiled for sm_90a (emulated H100, "
          f"{H100.sms} SMs); ratios are predicted by the model (--help-model), not measured")
    if args.out:
        record = {"target": "sm_90a", "sms": H100.sms, "triton": triton.__version__, "model": MODEL,
                  "cases": [{"kernel": c.kernel, "path": c.path, "gate": c.gate, "shape": c.shape,
                             "grid": c.launch.grid, "config": {k: v for k, v in c.launch.kwargs.items()
                                                               if k.isupper() or k.startswith("num_")},
                             **c.binary, **predict(c), "problems": problems(c)} for c in cases]}
        write_json(args.out, record)
        print(f"wrote {args.out}")
    failed = [c for c in cases if problems(c)]
    if args.check and failed:
        print(f"check failed: {len(failed)} launches with problems", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
