"""The GPU suite's pinned kernel cases (bench.gpu_cases) against the reference math in float32.

On a GPU these are the kernel tests the suite runs, a small counted set of binaries; on a CPU the cases
Triton's interpreter can run (no bf16, nothing GPU-sized) run there.
"""
import pytest
import torch

from bench import gpu_cases
from test_kernels import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", gpu_cases.CASES, ids=lambda case: case.name)
def test_a_pinned_case_matches_the_reference(case):
    if DEVICE == "cpu" and not case.interpreted:
        pytest.skip("bf16 or GPU-sized: Triton's interpreter has no bf16 dot, and GPU sizes take it minutes")
    got, want = gpu_cases.fused(case, DEVICE), gpu_cases.reference(case, DEVICE)
    assert len(got) == len(want) == (4 if case.grad else 1)
    for fast, slow in zip(got, want):
        assert fast.shape == slow.shape
        assert_close(fast, slow, case.dtype)


def test_the_cases_cover_every_path():
    """Each path a GPU takes is in the list: both ops, forward and backward, every gate layout, 16-bit and
    fp32, pointer loads (rows that are no multiple of 16 bytes), and decoding rows."""
    cases = gpu_cases.CASES
    assert {c.op for c in cases} == {"up", "mlp"} and {c.grad for c in cases} == {True, False}
    assert {c.dtype for c in cases} == {torch.bfloat16, torch.float16, torch.float32}
    layouts = {"vector" if not c.rows_per_gate else "tile" if c.rows_per_gate % 128 == 0 else "row" for c in cases}
    assert layouts == {"vector", "tile", "row"}
    assert any(c.K * c.dtype.itemsize % 16 for c in cases)  # the pointer path
    assert any(c.M <= 64 for c in cases) and any(c.tanh for c in cases) and any(c.bias for c in cases)
