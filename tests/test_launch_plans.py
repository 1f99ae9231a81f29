"""The fused ops' host path: a launch is planned once per layout, recorded on request, and its plan shared
read-only; the descriptors it makes are the ones Triton's own constructor makes."""
import dataclasses

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from abcgpt_kernels import ops
from abcgpt_kernels.ops import gated_linear_gelu, gated_mlp, record_launches

H100 = ops.H100


def operands(M=200, K=64, N=96, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype),
            torch.rand(N, generator=g))


def test_a_repeated_layout_is_planned_once():
    x, w, gate = operands()
    with record_launches(H100, run=False):
        gated_linear_gelu(x, w, None, gate)
        before = ops._up_plan.cache_info()
        x2, w2, gate2 = operands(seed=1)
        gated_linear_gelu(x2, w2, None, gate2)  # fresh tensors, same layouts
        after = ops._up_plan.cache_info()
        assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)
        gated_linear_gelu(x, w.t().contiguous().t(), None, gate)  # the same weight, column-major: a new plan
        assert ops._up_plan.cache_info().misses == after.misses + 1


def test_recording_without_running_plans_each_launch_and_leaves_zeros():
    x, w, gate = operands()
    w2 = torch.randn(64, 96).to(torch.bfloat16)
    with record_launches(H100, run=False) as launches:
        assert not gated_linear_gelu(x, w, None, gate).any()  # zeros, not whatever memory held
        assert [launch.kernel for launch in launches] == [ops.gated_up_deferred_kernel]  # an H100's forward
        params = [t.clone().requires_grad_() for t in (x, w, w2)]
        gated_mlp(params[0], params[1], None, params[2], None, gate).sum().backward()
    assert [launch.kernel for launch in launches[1:]] == [ops.gated_up_kernel, ops.gated_down_grad_kernel]
    assert launches[1].kwargs["STORE_SLOPE"] and launches[1].kwargs["USE_TMA"]


def test_a_plan_is_shared_read_only():
    x, w, gate = operands()
    h = torch.empty(200, 96, dtype=torch.bfloat16)
    launch = ops.up_launch(x, w, None, gate, h, None, False, H100)
    with pytest.raises(TypeError):
        launch.kwargs["num_warps"] = 4
    changed = launch.with_settings(num_warps=4)
    assert changed.kwargs["num_warps"] == 4
    assert ops.up_launch(x, w, None, gate, h, None, False, H100).kwargs["num_warps"] == launch.kwargs["num_warps"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_descriptors_match_triton_s_own(dtype):
    x = torch.randn(200, 64).to(dtype)[:, :48]  # a view: rows longer than they are wide
    theirs, ours = TensorDescriptor.from_tensor(x, [128, 16]), ops._descriptor(x, [128, 16])
    assert type(ours) is TensorDescriptor and ours.base is theirs.base
    for field in dataclasses.fields(TensorDescriptor):
        if field.name != "base":
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


def test_only_descriptor_safe_layouts_get_descriptors():
    """The checks the fast descriptor skips are the plan's: a layout TMA cannot take gets pointers."""
    x, w, gate = operands(K=60)  # rows of 120 bytes: no multiple of 16
    h = torch.empty(200, 96, dtype=torch.bfloat16)
    launch = ops.up_launch(x, w, None, gate, h, None, False, H100)
    assert not launch.kwargs["USE_TMA"]
    assert not any(isinstance(arg, TensorDescriptor) for arg in launch.args)


def test_an_interpreter_that_cannot_run_says_why(monkeypatch):
    """Triton 3.6's interpreter fails every launch under numpy 2.4: the launch refuses with the reason, which
    conftest turns into a skip, and planning without running still works."""
    monkeypatch.setattr(ops, "INTERPRET", True)
    monkeypatch.setattr(ops, "interpreter_problem", lambda: "Triton 3.6.0's interpreter fails every launch")
    x, w, gate = operands()
    with pytest.raises(ops.InterpreterUnavailable, match="fails every launch"):
        gated_linear_gelu(x, w, None, gate)
    with record_launches(H100, run=False) as launches:
        gated_linear_gelu(x, w, None, gate)
    assert len(launches) == 1


@pytest.mark.parametrize("triton_version, numpy_version, fails", [("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False),
                                                                  ("3.9.0", "2.4.6", False)])
def test_the_interpreter_problem_is_triton_3_6_with_numpy_2_4(monkeypatch, triton_version, numpy_version, fails):
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    assert (ops.interpreter_problem() is not None) == fails
