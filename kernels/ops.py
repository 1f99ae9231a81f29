"""The gated-MLP kernels as PyTorch ops with autograd, opaque to torch.compile.

gated_linear_gelu(x, W, b, gate)          -> GELU(x @ W.T + b) * gate
gated_mlp(x, W1, b1, W2, b2, gate)        -> gated_linear_gelu(x, W1, b1, gate) @ W2.T + b2

gate holds precomputed gates (abcgpt.gate.gates_for): a vector over the hidden
units, or a (G, N) table whose row g serves x's rows g*M/G up to (g+1)*M/G, i.e.
one gate row per sequence of a flattened batch. Both ops are torch.library custom
ops with registered autograd and fake implementations, so torch.compile keeps them
as single nodes. A forward that will be differentiated also stores the slope
dh/dz = GELU'(z) * gate, which its epilogue computes from the same exp2 and
reciprocal as h; the backward then multiplies by it, in the epilogue of the
down-projection's input-gradient matmul (gated_mlp) or as one elementwise product
(gated_linear_gelu). Weight and input gradients use cuBLAS. Nothing here waits for
the device.
"""
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.nn import functional as F

from .gated_mlp import gated_down_grad_kernel, gated_up_deferred_kernel, gated_up_kernel

GELU_FORMS = ("none", "tanh")  # as nn.GELU(approximate=...)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the deferred forward finishes a kept tile in eighths where TMA allows (chunks 16 bytes wide at least): an
# eighth's work fits under one K step's wgmma on an H100, a quarter's does not (bench.kernel_static)
MOST_CHUNKS = 8
DECODE_ROWS = 64  # up to this many rows (decoding), one tile row: a program has one tile, nothing to defer into


@dataclass(frozen=True)
class Target:
    """The GPU a launch is planned for: what tile_config and the grid depend on."""
    sms: int
    capability: tuple


@functools.cache
def _cuda_target(index):
    props = torch.cuda.get_device_properties(index)
    return Target(props.multi_processor_count, (props.major, props.minor))


def target_of(device):
    """The Target of a CUDA device; None for Triton's CPU interpreter."""
    if INTERPRET or device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def tile_config(M, N, target, tma, deferred=False):
    """(tile sizes and launch settings, programs per SM) for an (M, N) output: a fixed choice per device
    generation, size class, load path and overlap design (deferred: gated_up_deferred_kernel), so a new
    shape compiles once and never sweeps configurations."""
    if target is None:  # the interpreter: small tiles, and a few programs to exercise the persistent loop
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1), 0
    major, per_sm = target.capability[0], 1
    if M <= DECODE_ROWS:  # decoding: a few rows
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    elif major >= 9 and tma and not deferred:  # two programs per SM, so that one's epilogue can run under the
        # other's matmul: 128 registers each, which pointer loads would spill from (bench.kernel_static checks)
        cfg, per_sm = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, maxnreg=128), 2
    elif major >= 9:  # one program per SM: pointer loads, or the deferred forward's two accumulators
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    elif major == 8:  # Ampere and Ada
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    return {**cfg, "enable_fp_fusion": True}, per_sm  # multiply-adds fused: Triton 3.10 stops doing it by default


def _programs(tiles, target, per_sm):
    """The persistent grid: per_sm programs per SM at most; the interpreter runs a few to exercise the loop."""
    if target is None:
        return max(1, min(tiles, 3))
    return max(1, min(tiles, per_sm * target.sms))


def _tma_ok(*tensors):
    """TMA's rules: 2-D, last dimension contiguous, other strides and the base 16-byte aligned."""
    for t in tensors:
        size = t.element_size()
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16:
            return False
    return True


def use_tma(target, *tensors):
    """Tensor descriptors on Hopper and newer (and in the interpreter, which runs them too)."""
    if os.environ.get("ABCGPT_NO_TMA") == "1":
        return False
    return (target is None or target.capability[0] >= 9) and _tma_ok(*tensors)


def _descriptor(t, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _precision(dtype):
    # fp32 matmuls follow torch's TF32 switch; 16-bit inputs have only one precision
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gate_layout(gate, M, block_m):
    """(GATE, rows per gate row, row stride) of a gate vector or table (see kernels.gated_mlp)."""
    if gate.dim() == 1:
        return "vector", 1, 0
    rows = max(1, M // max(1, gate.shape[0]))
    return ("tile" if rows % block_m == 0 else "row"), rows, gate.stride(0)


@dataclass
class Launch:
    """A kernel launch decided in full: the static check (bench.kernel_static) compiles exactly these."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.kwargs)


def _matmul_launch(a, b, outputs, M, N, target, b_is_nk, chunks, deferred=False, programs_per_sm=None):
    """Tile settings, the operands A, B and the (M, N) outputs (which the epilogue stores in chunks column
    blocks per tile) as TMA descriptors where the rules allow or as the tensors themselves, whether TMA
    serves, and the grid size. deferred, where TMA serves, plans the deferred forward: its chunk count
    goes in the settings as LEVELS (2^LEVELS chunks). programs_per_sm overrides the configuration's, for
    the kernel benchmark."""
    tma = use_tma(target, a, b, *outputs)
    deferred = deferred and tma and M > DECODE_ROWS
    cfg, per_sm = tile_config(M, N, target, tma, deferred)
    per_sm = programs_per_sm or per_sm
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if deferred:
        chunks = min(MOST_CHUNKS, bn * outputs[0].element_size() // 16)
        cfg["LEVELS"] = chunks.bit_length() - 1
    if tma:
        operands = (_descriptor(a, [bm, bk]), _descriptor(b, [bn, bk] if b_is_nk else [bk, bn]),
                    *(_descriptor(out, [bm, bn // chunks]) for out in outputs))
    else:
        operands = (a, b, *outputs)
    programs = _programs(triton.cdiv(M, bm) * triton.cdiv(N, bn), target, per_sm)
    return cfg, operands, tma, programs


def up_launch(x, weight, bias, gate, h, slope, tanh, target, deferred=None, programs_per_sm=None):
    """h = GELU(x @ weight.T + bias) * gate into h, and its slope dh/dz into slope unless slope is empty.
    The forward (no slope) defers its epilogue where TMA serves; deferred=False, and programs_per_sm, are
    for the kernel benchmark's comparison of overlap designs."""
    M, K = x.shape
    N = weight.shape[0]
    store_slope = slope.numel() > 0
    slope_arg = slope if store_slope else h  # never written when STORE_SLOPE is off
    cfg, (x_op, w_op, h_op), tma, programs = _matmul_launch(
        x, weight, (h,), M, N, target, b_is_nk=True, chunks=4 if store_slope else 2,
        deferred=not store_slope if deferred is None else deferred, programs_per_sm=programs_per_sm)
    gate_mode, rows_per_gate, stride_g = _gate_layout(gate, M, cfg["BLOCK_M"])
    kernel = gated_up_deferred_kernel if "LEVELS" in cfg else gated_up_kernel
    return Launch(kernel, (programs,), (
        x_op, w_op, bias if bias is not None else gate, gate, h_op, slope_arg,
        M, N, K, rows_per_gate, programs,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), stride_g,
        h.stride(0), h.stride(1), slope_arg.stride(0), slope_arg.stride(1),
    ), dict(HAS_BIAS=bias is not None, GATE=gate_mode, STORE_SLOPE=store_slope, TANH=tanh,
            FAST_GELU=h.element_size() <= 2, ASM=target is not None, USE_TMA=tma, PRECISION=_precision(x.dtype),
            **cfg))


def down_grad_launch(dout, weight, slope, dz, target):
    """dz = (dout @ weight) * slope, weight (K, N) as an nn.Linear(N, K) holds it."""
    M, K = dout.shape
    N = weight.shape[1]
    cfg, (dout_op, w_op, dz_op), tma, programs = _matmul_launch(dout, weight, (dz,), M, N, target,
                                                                 b_is_nk=False, chunks=2)
    return Launch(gated_down_grad_kernel, (programs,), (
        dout_op, w_op, slope, dz_op, M, N, K, programs,
        dout.stride(0), dout.stride(1), weight.stride(0), weight.stride(1),
        slope.stride(0), slope.stride(1), dz.stride(0), dz.stride(1),
    ), dict(USE_TMA=tma, PRECISION=_precision(dout.dtype), **cfg))


def _up(x, weight, bias, gate, tanh, store_slope):
    M, N = x.shape[0], weight.shape[0]
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    slope = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_slope else x.new_empty(0)
    if M and N:
        up_launch(x, weight, bias, gate, h, slope, tanh, target_of(x.device))()
    return h, slope


@torch.library.custom_op("abcgpt::gated_up", mutates_args=())
def gated_up(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor, tanh: bool,
             store_slope: bool) -> tuple[Tensor, Tensor]:
    return _up(x, weight, bias, gate, tanh, store_slope)


@gated_up.register_fake
def _(x, weight, bias, gate, tanh, store_slope):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_slope else (0,))


@torch.library.custom_op("abcgpt::gated_down_grad", mutates_args=())
def gated_down_grad(dout: Tensor, weight: Tensor, slope: Tensor) -> Tensor:
    """dz = (dout @ W2) * slope, W2 of shape (K, N) as an nn.Linear(N, K) holds it."""
    dz = torch.empty((dout.shape[0], weight.shape[1]), device=dout.device, dtype=dout.dtype)
    if dz.numel():
        down_grad_launch(dout, weight, slope, dz, target_of(dout.device))()
    return dz


@gated_down_grad.register_fake
def _(dout, weight, slope):
    return dout.new_empty((dout.shape[0], weight.shape[1]))


def _slope_of(ctx, op):
    if not ctx.store_slope:
        raise RuntimeError(f"{op} ran without keeping its slope (store_slope=False), so it has no backward")
    return ctx.saved_tensors[-1]


def _up_setup(ctx, inputs, output):
    x, weight, bias, gate, tanh, store_slope = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias, ctx.store_slope = bias is not None, store_slope


def _up_backward(ctx, dh, _):
    x, weight, _ = ctx.saved_tensors
    dz = dh * _slope_of(ctx, "gated_up")
    db = dz.sum(0) if ctx.has_bias else None
    return dz @ weight, dz.t() @ x, db, None, None, None


gated_up.register_autograd(_up_backward, setup_context=_up_setup)


@torch.library.custom_op("abcgpt::gated_mlp", mutates_args=())
def gated_mlp_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], gate: Tensor,
                 tanh: bool, store_slope: bool) -> tuple[Tensor, Tensor, Tensor]:
    h, slope = _up(x, w1, b1, gate, tanh, store_slope)
    return F.linear(h, w2, b2), h, slope


@gated_mlp_op.register_fake
def _(x, w1, b1, w2, b2, gate, tanh, store_slope):
    hidden = (x.shape[0], w1.shape[0])
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden if store_slope else (0,))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, gate, tanh, store_slope = inputs
    _, h, slope = output
    ctx.save_for_backward(x, w1, w2, h, slope)
    ctx.has_b1, ctx.has_b2, ctx.store_slope = b1 is not None, b2 is not None, store_slope


def _mlp_backward(ctx, dout, _dh, _dslope):
    x, w1, w2, h, _ = ctx.saved_tensors
    slope = _slope_of(ctx, "gated_mlp_op")
    dout = dout.contiguous()
    dw2 = dout.t() @ h
    db2 = dout.sum(0) if ctx.has_b2 else None
    dz = gated_down_grad(dout, w2, slope)
    db1 = dz.sum(0) if ctx.has_b1 else None
    return dz @ w1, dz.t() @ x, db1, dw2, db2, None, None, None


gated_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check(x, n_hidden, gate, approximate):
    """Shapes and options only: nothing that reads device memory (no host sync)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if approximate not in GELU_FORMS:
        raise ValueError(f"approximate must be one of {GELU_FORMS}, got {approximate!r}")
    if gate.shape[-1] != n_hidden or gate.dim() > 2:
        raise ValueError(f"gate must be ({n_hidden},) or (groups, {n_hidden}), got shape {tuple(gate.shape)}")
    if gate.dim() == 2 and (gate.shape[0] == 0 or x.shape[0] % gate.shape[0]):
        raise ValueError(f"a gate table of {gate.shape[0]} rows must divide x's {x.shape[0]} rows evenly")


def _gate_arg(gate):
    # float32 and unit stride along the hidden units, as the kernels index it
    return gate.float() if gate.stride(-1) == 1 else gate.float().contiguous()


def gated_linear_gelu(x, weight, bias, gate, approximate="none"):
    """GELU(x @ weight.T + bias) * gate in one kernel; x is (M, K), weight (N, K)."""
    _check(x, weight.shape[0], gate, approximate)
    h, _ = gated_up(x, weight, bias, _gate_arg(gate), approximate == "tanh", _needs_grad(x, weight, bias))
    return h


def gated_mlp(x, w1, b1, w2, b2, gate, approximate="none"):
    """The gated MLP: (GELU(x @ w1.T + b1) * gate) @ w2.T + b2."""
    _check(x, w1.shape[0], gate, approximate)
    out, _, _ = gated_mlp_op(x, w1, b1, w2, b2, _gate_arg(gate), approximate == "tanh",
                             _needs_grad(x, w1, b1, w2, b2))
    return out
