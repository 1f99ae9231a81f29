"""The fused up forward with its epilogue deferred: the design to switch to if two programs per SM run in step.

The product's kernel (kernels.gated_mlp) hides a tile's epilogue only if the other
program on its SM is in its matmul meanwhile, which nothing guarantees (docs/design.md,
Overlap). This one hides it within one program: it keeps a tile's accumulator while
it runs the next tile's K loop, and in each of that loop's first four steps, right
after the step's wgmma is issued, it finishes a quarter of the kept tile (GELU, gate,
store). So an epilogue quarter always has a wgmma under it, at the price of a second
accumulator in registers and so one program per SM. TMA only, no bias, no slope: the
forward as the kernel benchmark times it, beside the product's (bench.kernel_bench),
and compiled for sm_90a by bench.kernel_static.
"""
import torch
import triton
import triton.language as tl

from kernels.gated_mlp import _halves, _tile_origin, _up_epilogue
from kernels.ops import Launch, _descriptor, _gate_arg, _gate_layout, _precision, _programs, target_of, tile_config


@triton.jit
def _quarter_epilogue(acc, quarter: tl.constexpr, off_m, off_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE, h,
                      GATE: tl.constexpr, FAST_GELU: tl.constexpr, ASM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """h for the columns [quarter * BLOCK_N / 4, +BLOCK_N / 4) of the tile whose accumulator is acc."""
    left, right = _halves(acc, BLOCK_M, BLOCK_N)
    first, second = _halves(left if quarter < 2 else right, BLOCK_M, BLOCK_N // 2)
    z = first if quarter % 2 == 0 else second
    if ASM:  # an opaque move: else the compiler hoists the quarter's math, loop-invariant, out of the K loop
        z = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=False, pack=1)
    _up_epilogue(z, off_m, off_n + quarter * (BLOCK_N // 4), M, N, gate_ptr, gate_ptr, stride_g, ROWS_PER_GATE,
                 h, h, 0, 0, 0, 0, False, GATE, False, False, FAST_GELU, ASM, True, BLOCK_M, BLOCK_N // 4)


@triton.jit(do_not_specialize=["M", "num_programs"])
def deferred_up_kernel(x, w, gate_ptr, h, M, N, K, ROWS_PER_GATE, num_programs, stride_g,
                       GATE: tl.constexpr, FAST_GELU: tl.constexpr, ASM: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """h = GELU(x @ w.T) * G, x, w and h as TMA descriptors (h's blocks a quarter tile wide)."""
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
                for quarter in tl.static_range(4):
                    if k == quarter:
                        _quarter_epilogue(kept, quarter, kept_m, kept_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE,
                                          h, GATE, FAST_GELU, ASM, BLOCK_M, BLOCK_N)
        if tile != tl.program_id(0):  # quarters a short K loop had no step for
            for quarter in tl.static_range(4):
                if steps <= quarter:
                    _quarter_epilogue(kept, quarter, kept_m, kept_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE,
                                      h, GATE, FAST_GELU, ASM, BLOCK_M, BLOCK_N)
        kept = acc
        kept_m = off_m
        kept_n = off_n
    if tl.program_id(0) < tiles:  # the last tile's epilogue has no next K loop
        for quarter in tl.static_range(4):
            _quarter_epilogue(kept, quarter, kept_m, kept_n, M, N, gate_ptr, stride_g, ROWS_PER_GATE,
                              h, GATE, FAST_GELU, ASM, BLOCK_M, BLOCK_N)


def deferred_up_launch(x, w, gate, h, target):
    """h = GELU(x @ w.T) * gate with the product's tile sizes for this shape, one program per SM, no register cap."""
    M, K = x.shape
    N = w.shape[0]
    cfg, _ = tile_config(M, N, target, tma=True)
    cfg.pop("maxnreg", None)  # two accumulators: about 190 registers, so one program per SM
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    programs = _programs(triton.cdiv(M, bm) * triton.cdiv(N, bn), target, 1)
    gate_mode, rows_per_gate, stride_g = _gate_layout(gate, M, bm)
    operands = (_descriptor(x, [bm, bk]), _descriptor(w, [bn, bk]), gate, _descriptor(h, [bm, bn // 4]))
    return Launch(deferred_up_kernel, (programs,), (*operands, M, N, K, rows_per_gate, programs, stride_g), dict(
        GATE=gate_mode, FAST_GELU=h.element_size() <= 2, ASM=target is not None, PRECISION=_precision(x.dtype),
        **cfg))


def deferred_up(x, w, gate):
    """GELU(x @ w.T) * gate through the kernel above; gate is a vector or a per-sequence table, as for the ops."""
    h = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)
    deferred_up_launch(x, w, _gate_arg(gate), h, target_of(x.device))()
    return h
