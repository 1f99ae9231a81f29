"""The benchmark's own Triton matmul (bench.plain_matmul) against the reference: it is TMA-only, so the
shapes keep 16-byte rows; none is a multiple of the tiles. On a CPU it runs in Triton's interpreter, with
small tiles and three programs, so each program walks several tiles."""
import pytest
import torch

from bench.plain_matmul import plain_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(37, 24, 40), (70, 72, 104), (130, 48, 64)])
def test_plain_matmul_is_a_matmul(M, K, N, dtype):
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    expected = x.double() @ w.double().T
    torch.testing.assert_close(plain_matmul(x, w).double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
