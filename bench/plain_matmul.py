"""A plain persistent TMA matmul, C = A @ B.T: the yardstick the fused kernel is judged by.

It has the fused up-projection's structure (persistent grid, grouped tile order, TMA
loads, an epilogue on two column halves, TMA stores) and nothing else, with the
same tile settings as the fused forward's: one program per SM, as Triton's
persistent tutorial runs too. The static check (bench.kernel_static) runs its model
on it to calibrate itself, and the kernel benchmark times it beside cuBLAS and the
fused kernel, which separates what Triton costs from what the epilogue costs.
"""
import torch
import triton
import triton.language as tl

from abcgpt_kernels.gated_mlp import _halves, _tile_origin
from abcgpt_kernels.ops import Launch, _descriptor, _programs, target_of, tile_config


@triton.jit(do_not_specialize=["num_programs"])
def plain_matmul_kernel(a, b, c, M, N, K, num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    HALF_N: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, num_programs, flatten=True):
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            acc = tl.dot(a.load([off_m, k * BLOCK_K]), b.load([off_n, k * BLOCK_K]).T, acc)
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        c.store([off_m, off_n], left.to(c.dtype))
        c.store([off_m, off_n + HALF_N], right.to(c.dtype))


def plain_matmul_launch(a, b, c, target, programs_per_sm=None):
    """c = a @ b.T with the fused kernel's tile settings for this shape and target; TMA only."""
    M, K = a.shape
    N = b.shape[0]
    cfg, per_sm = tile_config(M, N, target, tma=True, deferred=True)
    per_sm = programs_per_sm or per_sm
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    programs = _programs(triton.cdiv(M, bm) * triton.cdiv(N, bn), target, per_sm)
    operands = (_descriptor(a, [bm, bk]), _descriptor(b, [bn, bk]), _descriptor(c, [bm, bn // 2]))
    return Launch(plain_matmul_kernel, (programs,), (*operands, M, N, K, programs), cfg)


def plain_matmul(a, b, programs_per_sm=None):
    """a @ b.T through the kernel above: the kernel benchmark's Triton rival to cuBLAS."""
    c = torch.empty((a.shape[0], b.shape[0]), device=a.device, dtype=a.dtype)
    plain_matmul_launch(a, b, c, target_of(a.device), programs_per_sm)()
    return c
