"""The benchmark's own Triton kernels against the reference math: our plain matmul (bench.plain_matmul) and
the fused forward with its epilogue deferred into the next tile's K loop (bench.deferred_up). Both are
TMA-only, so the shapes keep 16-byte rows; none is a multiple of the tiles. On a CPU they run in Triton's
interpreter, with small tiles and three programs, so each program carries tiles across its loop."""
import pytest
import torch
from torch.nn import functional as F

from abcgpt.gate import tent_gate
from bench.deferred_up import deferred_up
from bench.plain_matmul import plain_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# (M, K, N): K = 24 is two K steps of the interpreter's 16, fewer than the chunks (4 in float16, 8 in float32);
# 72 is five steps, 48 three
SHAPES = [(37, 24, 40), (70, 72, 104), (130, 48, 64)]


def operands(M, K, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    return x, w, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_plain_matmul_is_a_matmul(M, K, N, dtype):
    x, w, _ = operands(M, K, N, dtype, seed=M + K + N)
    expected = (x.double() @ w.double().T)
    torch.testing.assert_close(plain_matmul(x, w).double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("alpha", ["0.37", "sequences", "rows"])
def test_deferred_up_is_the_gated_gelu(M, K, N, dtype, alpha):
    x, w, g = operands(M, K, N, dtype, seed=3 * M + K + N)
    scores = torch.rand(N, generator=g).to(DEVICE)
    if alpha == "sequences":  # a table read one row per sequence, sequences of 10 or 13 rows (not tile multiples)
        a = torch.rand(M // 10 if M % 10 == 0 else M // 13 if M % 13 == 0 else M, generator=g).to(DEVICE)
    elif alpha == "rows":
        a = torch.rand(M, generator=g).to(DEVICE)
    else:
        a = torch.tensor(float(alpha), device=DEVICE)
    gate = tent_gate(a, scores)
    rows = gate if gate.dim() == 1 else gate.repeat_interleave(M // gate.shape[0], dim=0)
    expected = F.gelu(x.double() @ w.double().T) * rows.double()
    torch.testing.assert_close(deferred_up(x, w, gate).double(), expected, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])
