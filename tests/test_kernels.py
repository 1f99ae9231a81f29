"""The fused gated-MLP kernels against the reference math.

On a CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest) in
fp32 and fp16; on a GPU the same tests run compiled, bf16 included. The kernels
take precomputed gates (abcgpt.gates.gate); each test makes them from alphas here. Both
load paths, tensor descriptors (TMA) and pointers, run every test.
"""
from contextlib import contextmanager

import pytest
import torch
from conftest import twin_models
from torch.nn import functional as F

from abcgpt.gates.gate import tent_gate
from abcgpt_kernels import ops
from abcgpt_kernels.ops import gated_linear_gelu, gated_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (M, K, N): none a multiple of the tiles; the last two have 16-byte-aligned rows, so TMA serves them
SHAPES = [(1, 5, 7), (37, 29, 45), (50, 64, 33), (130, 17, 96), (37, 24, 40), (70, 32, 104)]
ALPHAS = ["0", "0.5", "1", "0.37", "rows", "rows-with-corners", "sequences"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, params=["tma", "pointers"])
def load_path(request):
    """Every test here runs twice: through tensor descriptors where the strides allow, and through pointers."""
    with ops.pointer_loads(request.param == "pointers"):
        yield request.param


def make_alpha(kind, M, generator):
    """One alpha, one per row, or one per sequence of a batch whose rows are a whole number of sequences."""
    if kind == "rows":
        return torch.rand(M, generator=generator).to(DEVICE)
    if kind == "rows-with-corners":
        return torch.tensor([0.0, 0.5, 1.0] * M)[:M].to(DEVICE)
    if kind == "sequences":
        return torch.rand(sequences(M), generator=generator).to(DEVICE)
    return torch.tensor(float(kind), device=DEVICE)


def sequences(M):
    """A number of sequences that splits M rows evenly, more than one where M allows."""
    return next((b for b in (5, 3, 2) if M % b == 0 and M > b), M)


def row_gates(alpha, m, M, narrowness=1.0):
    """The gates each of the M rows sees: what the kernel must apply, made independently of it."""
    g = tent_gate(alpha, m, narrowness)
    return g.repeat_interleave(M // g.shape[0], dim=0) if g.dim() == 2 else g


def inputs(M, K, N, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    m = torch.rand(N, generator=g).to(DEVICE)
    return x, w, b, m, g


def reference_up(x, w, b, alpha, m, narrowness=1.0, approximate="none"):
    """The math in fp32: GELU(x W^T + b) * g(alpha, m), each row with its own sequence's gates."""
    z = F.linear(x.float(), w.float(), None if b is None else b.float())
    return F.gelu(z, approximate=approximate) * row_gates(alpha, m, x.shape[0], narrowness)


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.detach().abs().max().item())  # absolute error relative to the tensor's scale
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("alpha_kind", ALPHAS)
def test_up_projection_matches_reference(dtype, M, K, N, alpha_kind, load_path):
    x, w, b, m, g = inputs(M, K, N, dtype, seed=M * 1000 + N)
    alpha = make_alpha(alpha_kind, M, g)
    if load_path == "tma" and K % 8 == 0 and N % 8 == 0 and (ops.INTERPRET or torch.cuda.get_device_capability()[0] >= 9):
        assert ops.use_tma(ops.target_of(x.device), x, w, torch.empty(M, N, device=DEVICE, dtype=dtype))  # the path under test
    h = gated_linear_gelu(x, w, b, tent_gate(alpha, m))
    assert h.dtype == dtype and h.shape == (M, N)
    assert_close(h, reference_up(x, w, b, alpha, m), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("narrowness", [0.3, 0.7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_narrowness_bias_and_gelu_form(dtype, narrowness, bias, approximate):
    x, w, b, m, g = inputs(33, 40, 70, dtype, seed=7, bias=bias)
    for alpha in (torch.tensor(0.8, device=DEVICE), torch.rand(33, generator=g).to(DEVICE)):
        h = gated_linear_gelu(x, w, b, tent_gate(alpha, m, narrowness), approximate)
        assert_close(h, reference_up(x, w, b, alpha, m, narrowness, approximate), dtype)
    gate = tent_gate(0.8, m, narrowness)
    silent = gate == 0  # narrow gates silence whole columns, exactly
    assert silent.any() and torch.all(gated_linear_gelu(x, w, b, gate)[:, silent] == 0)


def test_strided_inputs():
    g = torch.Generator().manual_seed(3)
    x_wide = torch.randn(41, 60, generator=g).to(DEVICE)
    x = x_wide[:, ::2]  # column stride 2
    w = torch.randn(23, 30, generator=g).to(DEVICE).t().contiguous().t()  # a transposed view of a (30, 23) tensor
    wt = torch.randn(30, 23, generator=g).to(DEVICE).t()  # another layout: stride (1, 23)
    m = torch.rand(23, generator=g).to(DEVICE)
    for weight in (w, wt):
        h = gated_linear_gelu(x, weight, None, tent_gate(0.3, m))
        assert_close(h, reference_up(x, weight, None, 0.3, m), torch.float32)  # m on the device, as x


@contextmanager
def poisoned_empty():
    """Every floating tensor made by torch.empty starts as NaN, so an unwritten element shows."""
    original = torch.empty

    def empty(*args, **kwargs):
        t = original(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", empty)
        yield


@pytest.mark.parametrize("alpha_kind", ["0.37", "rows"])
def test_every_output_element_is_written(alpha_kind):
    x, w, b, m, g = inputs(45, 19, 77, torch.float32, seed=11)
    alpha = make_alpha(alpha_kind, 45, g)
    w2 = (torch.randn(21, 77, generator=g) / 9).to(DEVICE)
    x.requires_grad_(), w.requires_grad_(), w2.requires_grad_()
    expected_h = reference_up(x, w, b, alpha, m)
    expected_out = F.linear(expected_h, w2)
    dout = torch.randn(45, 21, generator=g).to(DEVICE)
    expected_grads = torch.autograd.grad(expected_out, (x, w, w2), dout)
    gate = tent_gate(alpha, m)
    with poisoned_empty():
        h = gated_linear_gelu(x, w, b, gate)
        (dh,) = torch.autograd.grad(h, x, torch.ones_like(h))
        out = gated_mlp(x, w, b, w2, None, gate)
        grads = torch.autograd.grad(out, (x, w, w2), dout)
    assert not h.isnan().any() and not dh.isnan().any() and not out.isnan().any()
    assert_close(h, expected_h, torch.float32)
    assert_close(out, expected_out, torch.float32)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ["0", "0.37", "rows", "sequences"])
@pytest.mark.parametrize("bias", [True, False])
def test_up_projection_gradients(dtype, alpha_kind, bias):
    x, w, b, m, g = inputs(38, 27, 51, dtype, seed=5, bias=bias)
    alpha = make_alpha(alpha_kind, 38, g)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    dh = torch.randn(38, 51, generator=g).to(DEVICE, dtype)
    got = torch.autograd.grad(gated_linear_gelu(x, w, b, tent_gate(alpha, m, 0.8)), params, dh)
    expected = torch.autograd.grad(reference_up(x, w, b, alpha, m, 0.8), params, dh.float())
    for a, e in zip(got, expected):
        assert a.dtype == dtype
        assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ["1", "0.37", "rows-with-corners", "sequences"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_mlp_forward_and_gradients(dtype, alpha_kind, approximate):
    M, C, H = 30, 24, 72  # 16-byte rows in fp16 and fp32: the TMA path where it is on
    x, w1, b1, m, g = inputs(M, C, H, dtype, seed=9)
    w2 = (torch.randn(C, H, generator=g) / H**0.5).to(DEVICE, dtype)
    b2 = torch.randn(C, generator=g).to(DEVICE, dtype)
    alpha = make_alpha(alpha_kind, M, g)
    params = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    out = gated_mlp(x, w1, b1, w2, b2, tent_gate(alpha, m, 0.9), approximate)
    expected = F.linear(reference_up(x, w1, b1, alpha, m, 0.9, approximate), w2.float(), b2.float())
    assert_close(out, expected, dtype)
    dout = torch.randn(M, C, generator=g).to(DEVICE, dtype)
    for a, e in zip(torch.autograd.grad(out, params, dout), torch.autograd.grad(expected, params, dout.float())):
        assert_close(a, e, dtype)


def test_malformed_gates_are_refused_before_launch():
    x, w, b, _, _ = inputs(4, 8, 8, torch.float32, seed=0)
    for gate, message in [(torch.rand(7), r"gate must be \(8,\)"), (torch.rand(3, 8), "must divide x's 4 rows"),
                          (torch.rand(2, 2, 8), "gate must be")]:
        with pytest.raises(ValueError, match=message):
            gated_mlp(x, w, b, w.t(), None, gate.to(DEVICE))


@pytest.mark.parametrize("sequence_rows, mode", [(32, "tile"), (20, "row")])
def test_per_sequence_gates_whole_tiles_or_not(sequence_rows, mode, load_path):
    """Sequences that fill whole tiles read one gate row per tile, others a row per row: both are right."""
    n_sequences, K, N = 5, 24, 72
    M = n_sequences * sequence_rows
    x, w, b, m, g = inputs(M, K, N, torch.float32, seed=sequence_rows)
    alpha = torch.rand(n_sequences, generator=g).to(DEVICE)
    gate = tent_gate(alpha, m)
    tile_m = ops.tile_config(M, N, ops.target_of(x.device), tma=load_path == "tma")[0]["BLOCK_M"]
    assert ops._gate_layout(ops.Layout(*ops.layout_key(gate)), M, tile_m)[0] == mode  # the layout under test
    h = gated_linear_gelu(x, w, b, gate)
    assert_close(h, reference_up(x, w, b, alpha, m), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K, N", [(130, 24, 40), (70, 72, 104), (200, 48, 64)])
@pytest.mark.parametrize("alpha_kind", ["0.37", "sequences", "rows"])
@pytest.mark.parametrize("bias, approximate", [(False, "none"), (True, "tanh")])
def test_the_deferred_forward(dtype, M, K, N, alpha_kind, bias, approximate, load_path):
    """The forward on the TMA path finishes each tile in chunks under the next tile's K loop: K loops shorter
    than the chunks (K = 24: two steps of the interpreter's 16), longer ones, and each program's last tile."""
    x, w, b, m, g = inputs(M, K, N, dtype, seed=M + 7 * K, bias=bias)
    alpha = make_alpha(alpha_kind, M, g)
    gate = ops._gate_arg(tent_gate(alpha, m))
    h = torch.empty(M, N, device=DEVICE, dtype=dtype)
    target = ops.target_of(x.device)
    launch = ops.up_launch(x, w, b, gate, h, x.new_empty(0), approximate == "tanh", target)
    tma = ops.use_tma(target, x, w, h)
    assert (launch.kernel is ops.gated_up_deferred_kernel) == tma
    assert tma == (load_path == "tma") or not ops.INTERPRET  # in the interpreter, the path under test
    launch()
    assert_close(h, reference_up(x, w, b, alpha, m, approximate=approximate), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K, N", [(130, 24, 40), (200, 48, 64)])
@pytest.mark.parametrize("alpha_kind", ["sequences", "rows"])
@pytest.mark.parametrize("bias, approximate", [(False, "none"), (True, "tanh")])
def test_the_deferred_training_forward(dtype, M, K, N, alpha_kind, bias, approximate, load_path):
    """The kernel benchmark's rival of the training forward: the forward's deferred epilogue, each chunk
    storing the slope dh/dz beside h (a K loop shorter than the chunks, a longer one, each program's last
    tile). Before, the deferred kernel left a slope it was given unwritten."""
    x, w, b, m, g = inputs(M, K, N, dtype, seed=3 * M + K, bias=bias)
    alpha = make_alpha(alpha_kind, M, g)
    gate = ops._gate_arg(tent_gate(alpha, m))
    h, slope = (torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2))
    target = ops.target_of(x.device)
    launch = ops.up_launch(x, w, b, gate, h, slope, approximate == "tanh", target, deferred=True)
    assert (launch.kernel is ops.gated_up_deferred_kernel) == ops.use_tma(target, x, w, h)
    launch()
    z = F.linear(x.float(), w.float(), None if b is None else b.float()).requires_grad_()
    expected = F.gelu(z, approximate=approximate) * row_gates(alpha, m, M)
    (expected_slope,) = torch.autograd.grad(expected.sum(), z)
    assert_close(h, expected, dtype)
    assert_close(slope, expected_slope, dtype)


def test_tensor_descriptors_serve_aligned_strides_only(load_path):
    """The TMA path takes aligned row strides; a row stride off TMA's 16 bytes falls back to pointers."""
    if load_path == "pointers" or not (ops.INTERPRET or torch.cuda.get_device_capability()[0] >= 9):
        pytest.skip("tensor descriptors are not in use here")
    aligned = torch.zeros(8, 16, device=DEVICE)
    assert ops.use_tma(ops.target_of(aligned.device), aligned)
    assert not ops.use_tma(ops.target_of(aligned.device), torch.zeros(8, 5, device=DEVICE))  # 20-byte rows
    assert not ops.use_tma(ops.target_of(aligned.device), aligned[:, 1:])  # a base off 16 bytes


def test_compiles_without_graph_breaks():
    x, w1, b1, m, g = inputs(16, 8, 32, torch.float32, seed=2)
    w2 = torch.randn(8, 32, generator=g).to(DEVICE)
    params = [t.requires_grad_() for t in (x, w1, w2)]

    def step(x, w1, w2, alpha):
        return gated_mlp(x, w1, b1, w2, None, tent_gate(alpha, m)).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    for alpha in (torch.tensor(0.2, device=DEVICE), torch.tensor(0.9, device=DEVICE)):
        got = torch.autograd.grad(compiled(*params, alpha), params)
        expected = torch.autograd.grad(step(*params, alpha), params)
        for a, e in zip(got, expected):
            assert_close(a, e, torch.float32)


@pytest.mark.parametrize("alpha_kind", ["0.37", "1", "rows", "voices"])
def test_model_triton_backend_matches_reference(alpha_kind):
    """"voices": a dial over four sources (pool), a different setting per sequence: per-row gate tables, which
    the kernels take as they take per-sequence alphas."""
    from abcgpt.gates.voice import Dial

    config = dict(block_size=24, vocab_size=40, n_layer=2, n_head=2, n_embd=20, dropout=0.0, bias=True, narrowness=0.8)
    if alpha_kind == "voices":
        config.update(geometry="pool", n_sources=4, shared=0.5)
    fused, reference = twin_models("triton", DEVICE, **config)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (3, 19), generator=g).to(DEVICE)
    if alpha_kind == "voices":
        alpha = Dial.stack([Dial.source(1, "pool", 4), Dial.mixture_of([0.5, 0.0, 0.2, 0.3]),
                            Dial.everywhere("pool", 4)])
    else:
        alpha = torch.rand(3, generator=g).to(DEVICE) if alpha_kind == "rows" else float(alpha_kind)
    fused_logits, fused_loss = fused(idx, alpha, idx)
    ref_logits, ref_loss = reference(idx, alpha, idx)
    assert_close(fused_logits, ref_logits, torch.float32)
    fused_loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32), name
