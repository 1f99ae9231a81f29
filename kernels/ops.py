"""The gated-MLP kernels as PyTorch ops with autograd, opaque to torch.compile.

gated_linear_gelu(x, W, b, gate)          -> GELU(x @ W.T + b) * gate
gated_mlp(x, W1, b1, W2, b2, gate)        -> gated_linear_gelu(x, W1, b1, gate) @ W2.T + b2

gate holds precomputed gates (abcgpt.gate.gates_for): a vector over the hidden
units, or a (G, N) table whose row g serves x's rows g*M/G up to (g+1)*M/G, i.e.
one gate row per sequence of a flattened batch. Both ops are torch.library custom
ops with registered autograd and fake implementations, so torch.compile keeps them
as single nodes. Weight and input gradients use cuBLAS; the GELU and gate backward
runs in the epilogue of the down-projection's input-gradient matmul (gated_mlp) or
as one elementwise pass (gated_linear_gelu). Nothing here waits for the device.
"""
import functools
import os
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.nn import functional as F

from .gated_mlp import gate_grad_kernel, gated_down_grad_kernel, gated_up_kernel

GELU_FORMS = ("none", "tanh")  # as nn.GELU(approximate=...)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _device_facts(device):
    """(streaming multiprocessors, compute capability major) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major


def tile_config(M, N, device):
    """Tile sizes and launch settings for an (M, N) output: a fixed choice per device generation
    and size class, so a new shape compiles once and never sweeps configurations."""
    if INTERPRET or device.type != "cuda":  # small tiles: the interpreter is slow and benchmarks nothing
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    _, major = _device_facts(device)
    if M <= 64:  # decoding: a few rows
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    if major >= 9:  # Hopper: 228 KB of shared memory, TMA
        return dict(BLOCK_M=128, BLOCK_N=256 if N >= 2048 else 128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if major == 8:  # Ampere and Ada
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)


def _programs(tiles, device):
    """At most one program per SM (persistent); the interpreter runs a few to exercise the loop."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(tiles, 3))
    return max(1, min(tiles, _device_facts(device)[0]))


def _tma_ok(*tensors):
    """TMA's rules: 2-D, last dimension contiguous, other strides and the base 16-byte aligned."""
    for t in tensors:
        size = t.element_size()
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16:
            return False
    return True


def use_tma(device, *tensors):
    """Tensor descriptors on Hopper and newer (and in the interpreter, which runs them too)."""
    if os.environ.get("ABCGPT_NO_TMA") == "1":
        return False
    supported = INTERPRET or (device.type == "cuda" and _device_facts(device)[1] >= 9)
    return supported and _tma_ok(*tensors)


def _descriptor(t, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _precision(dtype):
    # fp32 matmuls follow torch's TF32 switch; 16-bit inputs have only one precision
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gate_layout(gate, M):
    """(per_row, rows_per_gate, row stride) of a gate vector or table."""
    if gate.dim() == 1:
        return False, 1, 0
    return True, max(1, M // max(1, gate.shape[0])), gate.stride(0)


def _launch(a, b, c, d, M, N, b_is_nk):
    """Tile settings, the four (M, N)-tiled operands (A, B, and two outputs or epilogue inputs) as TMA
    descriptors where the rules allow or as the tensors themselves, whether TMA serves, and the grid size."""
    cfg = tile_config(M, N, a.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tma = use_tma(a.device, a, b, c, d)
    if tma:
        operands = (_descriptor(a, [bm, bk]), _descriptor(b, [bn, bk] if b_is_nk else [bk, bn]),
                    _descriptor(c, [bm, bn // 2]), _descriptor(d, [bm, bn // 2]))
    else:
        operands = (a, b, c, d)
    programs = _programs(triton.cdiv(M, bm) * triton.cdiv(N, bn), a.device)
    return cfg, operands, tma, programs


def _up(x, weight, bias, gate, tanh, store_z):
    M, K = x.shape
    N = weight.shape[0]
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_z else x.new_empty(0)
    if M == 0 or N == 0:
        return h, z
    z_arg = z if store_z else h  # never written when STORE_Z is off
    cfg, (x_op, w_op, h_op, z_op), tma, programs = _launch(x, weight, h, z_arg, M, N, b_is_nk=True)
    per_row, rows_per_gate, stride_g = _gate_layout(gate, M)
    gated_up_kernel[(programs,)](
        x_op, w_op, bias if bias is not None else gate, gate, h_op, z_op,
        M, N, K, rows_per_gate,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), stride_g,
        h.stride(0), h.stride(1), z_arg.stride(0), z_arg.stride(1),
        HAS_BIAS=bias is not None, PER_ROW=per_row, STORE_Z=store_z, TANH=tanh,
        USE_TMA=tma, PRECISION=_precision(x.dtype), NUM_PROGRAMS=programs, **cfg,
    )
    return h, z


def _down_grad(dout, weight, z, gate, tanh):
    M, K = dout.shape
    N = weight.shape[1]
    dz = torch.empty((M, N), device=dout.device, dtype=dout.dtype)
    if M == 0 or N == 0:
        return dz
    cfg, (dout_op, w_op, z_op, dz_op), tma, programs = _launch(dout, weight, z, dz, M, N, b_is_nk=False)
    per_row, rows_per_gate, stride_g = _gate_layout(gate, M)
    gated_down_grad_kernel[(programs,)](
        dout_op, w_op, z_op, gate, dz_op,
        M, N, K, rows_per_gate,
        dout.stride(0), dout.stride(1), weight.stride(0), weight.stride(1), stride_g,
        z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        PER_ROW=per_row, TANH=tanh, USE_TMA=tma, PRECISION=_precision(dout.dtype), NUM_PROGRAMS=programs, **cfg,
    )
    return dz


@torch.library.custom_op("abcgpt::gated_up", mutates_args=())
def gated_up(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor, tanh: bool,
             store_z: bool) -> tuple[Tensor, Tensor]:
    return _up(x, weight, bias, gate, tanh, store_z)


@gated_up.register_fake
def _(x, weight, bias, gate, tanh, store_z):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_z else (0,))


@torch.library.custom_op("abcgpt::gated_down_grad", mutates_args=())
def gated_down_grad(dout: Tensor, weight: Tensor, z: Tensor, gate: Tensor, tanh: bool) -> Tensor:
    """dz = (dout @ W2) * gate * GELU'(z), W2 of shape (K, N) as an nn.Linear(N, K) holds it."""
    return _down_grad(dout, weight, z, gate, tanh)


@gated_down_grad.register_fake
def _(dout, weight, z, gate, tanh):
    return dout.new_empty((dout.shape[0], weight.shape[1]))


@torch.library.custom_op("abcgpt::gate_grad", mutates_args=())
def gate_grad(dh: Tensor, z: Tensor, gate: Tensor, tanh: bool) -> Tensor:
    """dz = dh * gate * GELU'(z) in one elementwise pass."""
    M, N = dh.shape
    dz = torch.empty_like(dh, memory_format=torch.contiguous_format)
    if M == 0 or N == 0:
        return dz
    block_m, block_n = 32, 64
    per_row, rows_per_gate, stride_g = _gate_layout(gate, M)
    gate_grad_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        dh, z, gate, dz, M, N, rows_per_gate,
        dh.stride(0), dh.stride(1), z.stride(0), z.stride(1), stride_g, dz.stride(0), dz.stride(1),
        PER_ROW=per_row, TANH=tanh, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return dz


@gate_grad.register_fake
def _(dh, z, gate, tanh):
    return torch.empty_like(dh, memory_format=torch.contiguous_format)


def _up_setup(ctx, inputs, output):
    x, weight, bias, gate, tanh, store_z = inputs
    ctx.save_for_backward(x, weight, output[1], gate)
    ctx.has_bias, ctx.tanh = bias is not None, tanh


def _up_backward(ctx, dh, _):
    x, weight, z, gate = ctx.saved_tensors
    if z.numel() == 0 and dh.numel() != 0:
        raise RuntimeError("gated_up was run with store_z=False: call it through gated_linear_gelu to train")
    dz = gate_grad(dh, z, gate, ctx.tanh)
    db = dz.sum(0) if ctx.has_bias else None
    return dz @ weight, dz.t() @ x, db, None, None, None


gated_up.register_autograd(_up_backward, setup_context=_up_setup)


@torch.library.custom_op("abcgpt::gated_mlp", mutates_args=())
def gated_mlp_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], gate: Tensor,
                 tanh: bool, store_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    h, z = _up(x, w1, b1, gate, tanh, store_z)
    return F.linear(h, w2, b2), h, z


@gated_mlp_op.register_fake
def _(x, w1, b1, w2, b2, gate, tanh, store_z):
    hidden = (x.shape[0], w1.shape[0])
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden if store_z else (0,))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, gate, tanh, store_z = inputs
    _, h, z = output
    ctx.save_for_backward(x, w1, w2, h, z, gate)
    ctx.has_b1, ctx.has_b2, ctx.tanh = b1 is not None, b2 is not None, tanh


def _mlp_backward(ctx, dout, _dh, _dz):
    x, w1, w2, h, z, gate = ctx.saved_tensors
    if z.numel() == 0 and dout.numel() != 0:
        raise RuntimeError("gated_mlp was run with store_z=False: call it through gated_mlp to train")
    dout = dout.contiguous()
    dw2 = dout.t() @ h
    db2 = dout.sum(0) if ctx.has_b2 else None
    dz = gated_down_grad(dout, w2, z, gate, ctx.tanh)
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
