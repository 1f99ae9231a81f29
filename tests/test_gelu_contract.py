"""The fused kernel's GELU keeps the accuracy contract of docs/design.md, section 3:

    |GELU~(z) - GELU(z)| <= 2^-10 |GELU(z)| + 2^-14, and the same for the slope GELU'(z),

before its output is rounded to the output dtype. The kernel is fed z exactly (x is the identity,
so x @ W.T is W.T to the last bit) and compared with float64 math; its output's own rounding is
allowed on top. On a CPU the interpreter checks the formula in float32; on a GPU the same test
checks the hardware's approximate 2^x and 1/x too, in bf16 as well.
"""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from abcgpt_kernels import gated_mlp as k
from abcgpt_kernels.ops import gated_linear_gelu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL, ABS = 2.0**-10, 2.0**-14
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def excess(got, want, dtype):
    """How far got is beyond the contract around want, with got's rounding to dtype allowed on top (half
    an ulp at most; a whole one is allowed). Positive anywhere: the contract is broken there."""
    return (got - want).abs() - (REL * want.abs() + ABS) - torch.finfo(dtype).eps * want.abs()


def reference_gelu(z, approximate):
    """GELU and its derivative in float64."""
    z = z.double().requires_grad_()
    value = F.gelu(z, approximate=approximate)
    (slope,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), slope


def test_the_erf_fit_meets_the_contract_with_room_to_spare():
    """The polynomial itself (in float64, over 4 million points from -20 to 20): within 0.8 of the bound."""
    z = np.linspace(-20.0, 20.0, 4_000_001)
    t = np.minimum(z * z, k.T_MAX.value)
    q = k.ERF_Q0.value + (k.ERF_Q1.value + k.ERF_Q2.value * t) * t
    dq = k.ERF_Q0.value + (3 * k.ERF_Q1.value + 5 * k.ERF_Q2.value * t) * t
    s = 1.0 / (1.0 + np.exp2(-z * q))
    value, slope = z * s, s * (1.0 + z * (1.0 - s) * dq * k.LN2.value)
    erf = np.vectorize(math.erf)(z / math.sqrt(2.0))
    exact_value, exact_slope = 0.5 * z * (1 + erf), 0.5 * (1 + erf) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    for got, want in ((value, exact_value), (slope, exact_slope)):
        assert np.max(np.abs(got - want) / (REL * np.abs(want) + ABS)) < 0.8


def identity_inputs(z, dtype):
    """x = I and W = z.T, so that the kernel's pre-activation x @ W.T is exactly z (rows, columns)."""
    rows, cols = z.shape
    x = torch.eye(rows, device=DEVICE, dtype=dtype)
    w = z.t().contiguous().to(DEVICE, dtype).requires_grad_()
    return x, w


def z_grid(dtype, rows=64, cols=256):
    """Every kind of pre-activation: dense over [-8, 8], the far tails, and zero."""
    z = torch.cat([torch.linspace(-8, 8, rows * cols - 6), torch.tensor([-30.0, -12.0, 0.0, 1e-4, 12.0, 30.0])])
    return z.to(dtype).float().view(rows, cols)  # values the dtype holds exactly


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # 2^-p is inf far below zero, by design
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_kernel_gelu_and_its_slope_keep_the_contract(dtype, approximate):
    z = z_grid(dtype)
    x, w = identity_inputs(z, dtype)
    h = gated_linear_gelu(x, w, None, torch.ones(z.shape[1], device=DEVICE), approximate)
    (dw,) = torch.autograd.grad(h, w, torch.ones_like(h))  # dW = (dh * slope).T @ x = slope.T
    for got, want in zip((h, dw.t()), reference_gelu(z, approximate)):
        beyond = excess(got.detach().double().cpu(), want.cpu(), dtype)
        assert beyond.max() <= 0, f"worst at z = {z.flatten()[beyond.flatten().argmax()].item()}"


def test_the_contract_check_catches_a_gelu_slightly_off():
    """The check above fails on a GELU a little further off than the contract allows: the tanh form,
    which is about 5e-4 from the erf form near z = -2.7."""
    z = z_grid(torch.float16)
    exact, _ = reference_gelu(z, "none")
    tanh_form, _ = reference_gelu(z, "tanh")
    assert excess(tanh_form, exact, torch.float16).max() > 0
    assert excess(exact, exact, torch.float16).max() <= 0
