"""What only a GPU can show: no host sync in a step or a generation, whatever the device of alpha.

Skipped without CUDA; `python -m bench.gpu_suite` runs this file on a GPU.
"""
import subprocess
import sys

import pytest
import torch
from conftest import twin_models

from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.model.sampling import Generation, generate
from bench import gpu_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CONFIG = gpu_cases.MODEL  # bench.gpu_cases counts the binaries this file compiles


def alphas(kind):
    """alpha as a user may pass it: a float, a CPU tensor, a CUDA tensor, or one per sequence on the GPU."""
    return {"float": 0.3, "cpu tensor": torch.tensor(0.0), "cuda tensor": torch.tensor(1.0, device="cuda"),
            "per-sequence": torch.tensor([0.0, 0.4, 1.0, 0.7], device="cuda")}[kind]


@pytest.mark.parametrize("kind", ["float", "cpu tensor", "cuda tensor", "per-sequence"])
@pytest.mark.parametrize("backend", ["auto", "reference", "folded", "triton"])
def test_a_training_step_never_syncs(backend, kind):
    if backend == "folded" and kind == "per-sequence":
        pytest.skip("folded takes one alpha per batch")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG), backend).cuda()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cuda")
    idx = torch.randint(0, 65, (4, 64), device="cuda")
    alpha = alphas(kind)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, alpha, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first call: kernels compile, host copies of the scores are made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("kind", ["float", "cuda tensor", "per-sequence"])
def test_generation_never_syncs(kind):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG)).cuda().eval()
    prompt = torch.randint(0, 65, (4, 3), device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    generate(model, prompt, Generation(alphas(kind), max_new_tokens=5), generator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        generate(model, prompt, Generation(alphas(kind), max_new_tokens=20), generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["folded", "triton"])
def test_bf16_training_matches_the_reference(backend):
    """Autocast casts the fused op's inputs as F.linear would; losses and gradients agree at bf16 precision."""
    fast, reference = twin_models(backend, "cuda", **{**CONFIG, "dropout": 0.0})
    idx = torch.randint(0, 65, (4, 64), device="cuda")
    alpha = 0.6 if backend == "folded" else torch.tensor([0.1, 0.6, 0.9, 1.0], device="cuda")
    losses = []
    for model in (fast, reference):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, alpha, idx)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        scale = q.grad.abs().max().item() + 1e-6
        assert (p.grad - q.grad).abs().max().item() < 5e-2 * scale, name


def test_a_bad_cuda_alpha_fails_at_the_next_sync():
    """In a process of its own: a device-side assert leaves the CUDA context unusable."""
    code = ("import torch; from abcgpt.model.gpt import GPT, GPTConfig; "
            "m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)).cuda(); "
            "m(torch.zeros(1, 4, dtype=torch.long, device='cuda'), torch.tensor(1.5, device='cuda')); "
            "torch.cuda.synchronize()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "assert" in result.stderr.lower()
