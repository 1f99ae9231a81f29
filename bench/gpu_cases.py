"""What the GPU suite's tests launch, pinned: a short list of kernel cases and two model scenarios.

Each kernel case is one path of the fused ops as a GPU takes it (the deferred forward, the training forward
and its backward, pointer loads, decoding rows; gate vectors and both table layouts; bf16, fp16, fp32), at
shapes that are no multiple of the tiles. tests/test_gpu_kernels.py holds every case to the reference,
tests/test_cuda.py runs the model scenarios, and nothing else in the suite's tests step launches a kernel.
So the binaries that step compiles are few and counted: launches() plans all of them on any machine,
without launching, and tests/test_gpu_suite.py holds their number and compile time within the step's share.
bench.warm_kernels compiles them side by side before the tests run.
"""
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from abcgpt_kernels.ops import gated_linear_gelu, gated_mlp, record_launches

# the model the GPU tests train and sample from (tests/test_cuda.py)
MODEL = dict(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=64, dropout=0.1)
TRAIN_BATCH = (4, 64)  # sequences, tokens
PROMPT = (4, 3)
ALPHA_KINDS = ("float", "cpu tensor", "device tensor", "per-sequence")


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "up": gated_linear_gelu; "mlp": gated_mlp, whose output width is K
    M: int
    K: int
    N: int
    dtype: torch.dtype
    rows_per_gate: int = 0  # 0: one gate vector; else a table of one gate row per this many rows
    bias: bool = False
    tanh: bool = False
    grad: bool = False  # also the backward, through the slope the forward keeps

    @property
    def interpreted(self):
        """Whether Triton's CPU interpreter can run it: no bf16 dot there, and GPU-sized shapes take minutes."""
        return self.dtype != torch.bfloat16 and self.M * self.K * self.N <= 4_000_000


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [
    Case("deferred forward, gate vector", "up", 300, 96, 200, BF16),
    Case("deferred forward, whole-tile table, tanh, bias", "up", 512, 96, 200, BF16, rows_per_gate=128, bias=True,
         tanh=True),
    Case("deferred forward, row table, fp16", "up", 300, 96, 200, FP16, rows_per_gate=60),
    Case("deferred forward, fp32 through tf32", "up", 200, 64, 120, FP32),
    Case("training, gate vector", "mlp", 300, 96, 200, BF16, grad=True),
    Case("training, row table, bias, tanh", "mlp", 300, 96, 200, BF16, rows_per_gate=60, bias=True, tanh=True,
         grad=True),
    Case("training, pointer loads (rows of 244 bytes), fp32", "mlp", 77, 61, 101, FP32, rows_per_gate=11, bias=True,
         grad=True),
    Case("forward, pointer loads, fp32", "mlp", 77, 61, 101, FP32, bias=True),
    Case("decoding rows, gate vector", "up", 4, 96, 200, BF16),
    Case("decoding rows, one gate row each", "up", 8, 96, 200, BF16, rows_per_gate=1),
    # the model's widths at GPU sizes, forward and backward (the tiles of a real step)
    Case("GPU-sized, 384 wide, table", "mlp", 1024, 384, 1536, BF16, rows_per_gate=256, grad=True),
    Case("GPU-sized, 768 wide, vector", "mlp", 1000, 768, 3072, BF16, grad=True),
    Case("GPU-sized, 768 wide, row table", "mlp", 1000, 768, 3072, BF16, rows_per_gate=200, grad=True),
    Case("GPU-sized decoding, 768 wide", "mlp", 48, 768, 3072, BF16, rows_per_gate=1),
    Case("GPU-sized deferred forward, 768 wide, vector", "mlp", 1000, 768, 3072, BF16),
    Case("GPU-sized deferred forward, 384 wide, table", "mlp", 1024, 384, 1536, BF16, rows_per_gate=256),
]


def case_inputs(case, device, seed=0):
    """x, W1, b1 (or None), W2 and the gates (a vector, or a table of one row per rows_per_gate rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.M, case.K, generator=g)
    w1 = torch.randn(case.N, case.K, generator=g) / case.K**0.5
    b1 = torch.randn(case.N, generator=g) if case.bias else None
    w2 = torch.randn(case.K, case.N, generator=g) / case.N**0.5
    gates = torch.rand(case.M // case.rows_per_gate if case.rows_per_gate else 1, case.N, generator=g)
    gates = gates if case.rows_per_gate else gates[0]
    moved = [t.to(device, case.dtype) if t is not None else None for t in (x, w1, b1, w2)]
    return (*moved, gates.to(device))


def _outputs(case, x, w1, b1, w2, gates, forward):
    """The case's output and, with grad, the gradients of x, W1 and W2 for a fixed output gradient."""
    params = [t.detach().requires_grad_(case.grad) for t in (x, w1, w2)]
    with torch.set_grad_enabled(case.grad):
        out = forward(*params, b1, gates)
    if not case.grad:
        return [out]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, params, dout)]


def fused(case, device, seed=0):
    """The case through the fused ops."""
    tanh = "tanh" if case.tanh else "none"
    if case.op == "up":
        forward = lambda x, w1, w2, b1, gates: gated_linear_gelu(x, w1, b1, gates, tanh)  # noqa: E731
    else:
        forward = lambda x, w1, w2, b1, gates: gated_mlp(x, w1, b1, w2, None, gates, tanh)  # noqa: E731
    return _outputs(case, *case_inputs(case, device, seed), forward)


def reference(case, device, seed=0):
    """The case's math in float32 from the same inputs, each row with its own gate row."""
    x, w1, b1, w2, gates = case_inputs(case, device, seed)
    rows = gates.repeat_interleave(case.rows_per_gate, dim=0) if gates.dim() == 2 else gates

    def forward(x, w1, w2, b1, _):
        z = F.linear(x.float(), w1.float(), None if b1 is None else b1.float())
        h = F.gelu(z, approximate="tanh" if case.tanh else "none") * rows
        return h if case.op == "up" else F.linear(h, w2.float())

    return _outputs(case, x, w1, b1, w2, gates, forward)


def model_alpha(kind, device):
    """alpha as a user may pass it: a float, a CPU tensor, a tensor on the device, or one per sequence."""
    if kind == "float":
        return 0.3
    if kind == "cpu tensor":
        return torch.tensor(0.0)
    if kind == "device tensor":
        return torch.tensor(1.0, device=device)
    return torch.tensor([0.0, 0.4, 1.0, 0.7], device=device)


def training_step(model, optimizer, idx, alpha):
    """One bf16-autocast training step, as train.py takes it."""
    with torch.autocast(idx.device.type, dtype=torch.bfloat16):
        _, loss = model(idx, alpha, idx)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def model_scenarios(device):
    """The model scenarios of tests/test_cuda.py that reach the fused kernels, on device: a training step at
    every alpha kind, and generation with one alpha and one per sequence."""
    from abcgpt.model.gpt import GPT, GPTConfig
    from abcgpt.model.sampling import PLAIN, Generation, generate

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL), "triton").to(device)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), torch.device(device).type)
    idx = torch.randint(0, MODEL["vocab_size"], TRAIN_BATCH, device=device)
    for kind in ALPHA_KINDS:
        training_step(model, optimizer, idx, model_alpha(kind, device))
    model.eval()
    prompt = torch.randint(0, MODEL["vocab_size"], PROMPT, device=device)
    for kind in ("float", "per-sequence"):
        generate(model, prompt, Generation(model_alpha(kind, device), PLAIN, 0, 5))


def launches(target):
    """Every launch the suite's GPU tests make, planned for target on this machine's CPU, launching nothing."""
    with record_launches(target, run=False) as planned:
        for case in CASES:
            fused(case, "cpu")
        model_scenarios("cpu")
    return planned
