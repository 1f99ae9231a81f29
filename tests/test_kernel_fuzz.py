"""Property-based fuzzing of the fused kernel against the reference math (Triton's interpreter on a CPU)."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from abcgpt.gates.gate import tent_gate
from abcgpt_kernels.ops import gated_linear_gelu, gated_mlp, pointer_loads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
dials = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))


def close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=tol, atol=tol * scale)


def make(M, K, N, dtype, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, M, generator=g).t() if transposed else torch.randn(M, K, generator=g)  # strided or not
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), torch.randn(N, generator=g).to(DEVICE, dtype), \
        torch.rand(N, generator=g).to(DEVICE)


@FUZZ
@given(M=st.integers(1, 40), K=st.integers(1, 40), N=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       per_row=st.booleans(), dial=dials, rows=st.lists(dials, min_size=40, max_size=40),
       narrowness=st.floats(0.05, 1.0), bias=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16),
       pointers=st.booleans())
def test_up_projection_fuzz(M, K, N, dtype, per_row, dial, rows, narrowness, bias, transposed, seed, pointers):
    x, w, b, m = make(M, K, N, dtype, transposed, seed)
    b = b if bias else None
    # per-row: one alpha per group of rows, as a batch of M // T sequences of T rows each
    T = next(t for t in (4, 3, 2, 1) if M % t == 0)
    alpha = torch.tensor(rows[: M // T], device=DEVICE) if per_row else torch.tensor(dial, device=DEVICE)
    gate = tent_gate(alpha, m, narrowness)
    row_gate = gate.repeat_interleave(T, dim=0) if per_row else gate
    expected = F.gelu(F.linear(x.float(), w.float(), None if b is None else b.float())) * row_gate
    with pointer_loads(pointers):
        close(gated_linear_gelu(x, w, b, gate), expected, dtype)


@FUZZ
@given(M=st.integers(1, 24), C=st.integers(1, 24), H=st.integers(1, 48), per_row=st.booleans(), dial=dials,
       narrowness=st.floats(0.05, 1.0), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_mlp_gradients_fuzz(M, C, H, per_row, dial, narrowness, transposed, seed):
    dtype = torch.float32
    x, w1, b1, m = make(M, C, H, dtype, transposed, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w2 = (torch.randn(C, H, generator=g) / math.sqrt(H)).to(DEVICE)
    alpha = torch.rand(M, generator=g).to(DEVICE) if per_row else torch.tensor(dial, device=DEVICE)
    params = [t.requires_grad_() for t in (x, w1, b1, w2)]
    out = gated_mlp(x, w1, b1, w2, None, tent_gate(alpha, m, narrowness))
    expected = F.linear(F.gelu(F.linear(x, w1, b1)) * tent_gate(alpha, m, narrowness), w2)
    close(out, expected, dtype)
    dout = torch.randn(M, C, generator=g).to(DEVICE)
    for a, e in zip(torch.autograd.grad(out, params, dout), torch.autograd.grad(expected, params, dout)):
        close(a, e, dtype)
