"""The fused up forward with its epilogue deferred: the design to switch to if two programs per SM run in step.

The product's kernel (kernels.gated_mlp) hides a tile's epilogue only if the other
program on its SM is in its matmul meanwhile, which nothing guarantees (docs/design.md,
Overlap). This one hides it within one program: it keeps a tile's accumulator while
it runs the next tile's K loop, and in each of that loop's first eight steps, right
after the step's wgmma is issued, it finishes an eighth of the kept tile (GELU, gate,
store). So an epilogue chunk always has a wgmma under it, at the price of a second
accumulator in registers and so one program per SM. TMA only, no bias, no slope: the
forward as the kernel benchmark times it, beside the product's (bench.kernel_bench),
and compiled for sm_90a by bench.kernel_static.
"""
import torch
import triton
import triton.language as tl

from kernels.gated_mlp import _halves, _tile_origin, _up_epilogue
from kernels.ops import Launch, _descriptor, _gate_arg, _gate_layout, _precision, _programs, target_of, tile_config

# a tile's epilogue in eighths where TMA allows, one under each of the next K loop's first eight wgmma: an
# eighth's MUFU and other work fit under one K step's 512 tensor-core cycles (bench.kernel_static), a quarter's
# do not
MOST_CHUNKS = 8


@triton.jit
def _chunk_epilogue(acc, chunk: tl.constexpr, off_m, off_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE, h,
                    GATE: tl.constexpr, FAST_GELU: tl.constexpr, ASM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LEVELS: tl.constexpr, IN_LOOP: tl.constexpr):
    """h for the columns [chunk, chunk + 1) * BLOCK_N / 2^LEVELS of the tile whose accumulator is acc."""
    CHUNKS: tl.constexpr = 1 << LEVELS
    z = acc
    for level in tl.static_range(LEVELS):  # halve the columns, keeping the half that holds the chunk
        left, right = _halves(z, BLOCK_M, BLOCK_N >> level)
        z = left if (chunk >> (LEVELS - 1 - level)) % 2 == 0 else right
    if ASM and IN_LOOP:  # an opaque move: else the compiler hoists the chunk's math, loop-invariant, out of the K loop
        z = tl.inline_asm_elementwise("mov.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=False, pack=1)
    _up_epilogue(z, off_m, off_n + chunk * (BLOCK_N // CHUNKS), M, N, gate_ptr, gate_ptr, stride_g, ROWS_PER_GATE,
                 h, h, 0, 0, 0, 0, False, GATE, False, False, FAST_GELU, ASM, True, BLOCK_M, BLOCK_N // CHUNKS)


@triton.jit(do_not_specialize=["M", "num_programs"])
def deferred_up_kernel(x, w, gate_ptr, h, M, N, K, ROWS_PER_GATE, num_programs, stride_g,
                       GATE: tl.constexpr, FAST_GELU: tl.constexpr, ASM: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       LEVELS: tl.constexpr, IN_LOOP: tl.constexpr = True):
    """h = GELU(x @ w.T) * G, x, w and h as TMA descriptors, h's blocks one chunk (BLOCK_N / 2^LEVELS) wide.
    IN_LOOP=False lets the compiler hoist the chunks' math out of the K loop (for the test of the guard)."""
    CHUNKS: tl.constexpr = 1 << LEVELS
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    steps = tl.cdiv(K, BLOCK_K)
    kept = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the previous tile's accumulator, once there is one
    kept_m = 0
    kept_n = 0
    for tile in range(tl.program_id(0), tiles, num_programs):
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, steps):
            acc = tl.dot(x.load([off_m, k * BLOCK_K]), w.load([off_n, k * BLOCK_K]).T, acc,
                         input_precision=PRECISION)
            if tile != tl.program_id(0):
                for chunk in tl.static_range(CHUNKS):
                    if k == chunk:
                        _chunk_epilogue(kept, chunk, kept_m, kept_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE, h,
                                        GATE, FAST_GELU, ASM, BLOCK_M, BLOCK_N, LEVELS, IN_LOOP)
        if tile != tl.program_id(0):  # chunks a short K loop had no step for
            for chunk in tl.static_range(CHUNKS):
                if steps <= chunk:
                    _chunk_epilogue(kept, chunk, kept_m, kept_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE, h,
                                    GATE, FAST_GELU, ASM, BLOCK_M, BLOCK_N, LEVELS, IN_LOOP)
        kept = acc
        kept_m = off_m
        kept_n = off_n
    if tl.program_id(0) < tiles:  # the last tile's epilogue has no next K loop
        for chunk in tl.static_range(CHUNKS):
            _chunk_epilogue(kept, chunk, kept_m, kept_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE, h,
                            GATE, FAST_GELU, ASM, BLOCK_M, BLOCK_N, LEVELS, IN_LOOP)


def deferred_up_launch(x, w, gate, h, target):
    """h = GELU(x @ w.T) * gate with the product's tile sizes for this shape, one program per SM, no register cap."""
    M, K = x.shape
    N = w.shape[0]
    cfg, _ = tile_config(M, N, target, tma=True)
    cfg.pop("maxnreg", None)  # two accumulators: about 175 registers, so one program per SM
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    programs = _programs(triton.cdiv(M, bm) * triton.cdiv(N, bn), target, 1)
    gate_mode, rows_per_gate, stride_g = _gate_layout(gate, M, bm)
    chunks = min(MOST_CHUNKS, bn * h.element_size() // 16)  # a TMA block is 16 bytes wide at least
    operands = (_descriptor(x, [bm, bk]), _descriptor(w, [bn, bk]), gate, _descriptor(h, [bm, bn // chunks]))
    return Launch(deferred_up_kernel, (programs,), (*operands, M, N, K, rows_per_gate, programs, stride_g), dict(
        GATE=gate_mode, FAST_GELU=h.element_size() <= 2, ASM=target is not None, PRECISION=_precision(x.dtype),
        LEVELS=chunks.bit_length() - 1, **cfg))


def deferred_up(x, w, gate):
    """GELU(x @ w.T) * gate through the kernel above; gate is a vector or a per-sequence table, as for the ops."""
    h = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)
    deferred_up_launch(x, w, _gate_arg(gate), h, target_of(x.device))()
    return h
