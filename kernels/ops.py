"""The gated-MLP kernels as PyTorch ops with autograd, opaque to torch.compile.

gated_linear_gelu(x, W, b, alpha, scores)       -> GELU(x @ W.T + b) * g(alpha, scores)
gated_mlp(x, W1, b1, W2, b2, alpha, scores)     -> gated_linear_gelu(x, W1, b1, ...) @ W2.T + b2

Both are torch.library custom ops with registered autograd and fake (meta)
implementations, so torch.compile keeps them as single nodes without graph
breaks. alpha is a 0-dim tensor (one dial) or one value per row of x. Weight and
input gradients use cuBLAS; the GELU and gate backward runs in the epilogue of
the down-projection's input-gradient matmul (gated_mlp) or as one elementwise
pass (gated_linear_gelu).
"""
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.nn import functional as F

from .gated_mlp import gate_grad_kernel, gated_down_grad_kernel, gated_up_kernel, m_bucket

GELU_FORMS = ("none", "tanh")  # as nn.GELU(approximate=...)


def _precision(dtype):
    # fp32 matmuls follow torch's TF32 switch; 16-bit inputs have only one precision
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _up(x, weight, bias, alpha, scores, narrowness, tanh, store_z):
    M, K = x.shape
    N = weight.shape[0]
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_z else x.new_empty(0)
    if M == 0:
        return h, z
    z_arg = z if store_z else h  # never written when STORE_Z is off
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    gated_up_kernel[grid](
        x, weight, bias if bias is not None else weight, alpha, scores, h, z_arg,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        h.stride(0), h.stride(1), z_arg.stride(0), z_arg.stride(1),
        narrowness,
        HAS_BIAS=bias is not None, PER_ROW_ALPHA=alpha.dim() == 1, STORE_Z=store_z, TANH=tanh,
        PRECISION=_precision(x.dtype),
    )
    return h, z


@torch.library.custom_op("abcgpt::gated_up", mutates_args=())
def gated_up(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Tensor, scores: Tensor,
             narrowness: float, tanh: bool, store_z: bool) -> tuple[Tensor, Tensor]:
    return _up(x, weight, bias, alpha, scores, narrowness, tanh, store_z)


@gated_up.register_fake
def _(x, weight, bias, alpha, scores, narrowness, tanh, store_z):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_z else (0,))


@torch.library.custom_op("abcgpt::gated_down_grad", mutates_args=())
def gated_down_grad(dout: Tensor, weight: Tensor, z: Tensor, alpha: Tensor, scores: Tensor,
                    narrowness: float, tanh: bool) -> Tensor:
    """dz = (dout @ W2) * g * GELU'(z), W2 of shape (K, N) as an nn.Linear(N, K) holds it."""
    M, K = dout.shape
    N = weight.shape[1]
    dz = torch.empty((M, N), device=dout.device, dtype=dout.dtype)
    if M == 0:
        return dz
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    gated_down_grad_kernel[grid](
        dout, weight, z, alpha, scores, dz,
        M, N, K, m_bucket(M),
        dout.stride(0), dout.stride(1), weight.stride(0), weight.stride(1),
        z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        narrowness,
        PER_ROW_ALPHA=alpha.dim() == 1, TANH=tanh, PRECISION=_precision(dout.dtype),
    )
    return dz


@gated_down_grad.register_fake
def _(dout, weight, z, alpha, scores, narrowness, tanh):
    return dout.new_empty((dout.shape[0], weight.shape[1]))


@torch.library.custom_op("abcgpt::gate_grad", mutates_args=())
def gate_grad(dh: Tensor, z: Tensor, alpha: Tensor, scores: Tensor, narrowness: float, tanh: bool) -> Tensor:
    """dz = dh * g * GELU'(z) in one elementwise pass."""
    M, N = dh.shape
    dz = torch.empty_like(dh, memory_format=torch.contiguous_format)
    if M == 0:
        return dz
    block_m, block_n = 32, 64
    gate_grad_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        dh, z, alpha, scores, dz, M, N,
        dh.stride(0), dh.stride(1), z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        narrowness,
        PER_ROW_ALPHA=alpha.dim() == 1, TANH=tanh, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return dz


@gate_grad.register_fake
def _(dh, z, alpha, scores, narrowness, tanh):
    return torch.empty_like(dh, memory_format=torch.contiguous_format)


def _up_setup(ctx, inputs, output):
    x, weight, bias, alpha, scores, narrowness, tanh, store_z = inputs
    ctx.save_for_backward(x, weight, output[1], alpha, scores)
    ctx.has_bias, ctx.narrowness, ctx.tanh = bias is not None, narrowness, tanh


def _up_backward(ctx, dh, _):
    x, weight, z, alpha, scores = ctx.saved_tensors
    if z.numel() == 0 and dh.numel() != 0:
        raise RuntimeError("gated_up was run with store_z=False: call it through gated_linear_gelu to train")
    dz = gate_grad(dh, z, alpha, scores, ctx.narrowness, ctx.tanh)
    db = dz.sum(0) if ctx.has_bias else None
    return dz @ weight, dz.t() @ x, db, None, None, None, None, None


gated_up.register_autograd(_up_backward, setup_context=_up_setup)


@torch.library.custom_op("abcgpt::gated_mlp", mutates_args=())
def gated_mlp_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], alpha: Tensor,
                 scores: Tensor, narrowness: float, tanh: bool, store_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    h, z = _up(x, w1, b1, alpha, scores, narrowness, tanh, store_z)
    return F.linear(h, w2, b2), h, z


@gated_mlp_op.register_fake
def _(x, w1, b1, w2, b2, alpha, scores, narrowness, tanh, store_z):
    hidden = (x.shape[0], w1.shape[0])
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden if store_z else (0,))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, alpha, scores, narrowness, tanh, store_z = inputs
    _, h, z = output
    ctx.save_for_backward(x, w1, w2, h, z, alpha, scores)
    ctx.has_b1, ctx.has_b2, ctx.narrowness, ctx.tanh = b1 is not None, b2 is not None, narrowness, tanh


def _mlp_backward(ctx, dout, _dh, _dz):
    x, w1, w2, h, z, alpha, scores = ctx.saved_tensors
    if z.numel() == 0 and dout.numel() != 0:
        raise RuntimeError("gated_mlp was run with store_z=False: call it through gated_mlp to train")
    dout = dout.contiguous()
    dw2 = dout.t() @ h
    db2 = dout.sum(0) if ctx.has_b2 else None
    dz = gated_down_grad(dout, w2, z, alpha, scores, ctx.narrowness, ctx.tanh)
    db1 = dz.sum(0) if ctx.has_b1 else None
    return dz @ w1, dz.t() @ x, db1, dw2, db2, None, None, None, None, None


gated_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check(x, alpha, scores, narrowness, approximate, check_alpha):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if approximate not in GELU_FORMS:
        raise ValueError(f"approximate must be one of {GELU_FORMS}, got {approximate!r}")
    if not narrowness > 0:
        raise ValueError(f"narrowness must be positive, got {narrowness}")
    if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.numel() != x.shape[0]):
        raise ValueError(f"alpha must be 0-dim or one per row ({x.shape[0]}), got shape {tuple(alpha.shape)}")
    if check_alpha and not torch.compiler.is_compiling():  # refuse NaN or out-of-range alpha before launching
        bad = ~((alpha >= 0) & (alpha <= 1))
        if bad.any():
            raise ValueError(f"alpha must be in [0, 1], got {alpha[bad].flatten()[0].item()}")


def gated_linear_gelu(x, weight, bias, alpha, scores, narrowness=1.0, approximate="none", check_alpha=True):
    """GELU(x @ weight.T + bias) * g(alpha, scores) in one kernel; x is (M, K), weight (N, K).

    check_alpha=False skips the range check (a host sync for a CUDA alpha) for callers that checked it.
    """
    _check(x, alpha, scores, narrowness, approximate, check_alpha)
    h, _ = gated_up(x, weight, bias, alpha.float(), scores, float(narrowness), approximate == "tanh",
                    _needs_grad(x, weight, bias))
    return h


def gated_mlp(x, w1, b1, w2, b2, alpha, scores, narrowness=1.0, approximate="none", check_alpha=True):
    """The gated MLP: (GELU(x @ w1.T + b1) * g(alpha, scores)) @ w2.T + b2."""
    _check(x, alpha, scores, narrowness, approximate, check_alpha)
    out, _, _ = gated_mlp_op(x, w1, b1, w2, b2, alpha.float(), scores, float(narrowness), approximate == "tanh",
                             _needs_grad(x, w1, b1, w2, b2))
    return out
