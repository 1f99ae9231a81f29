"""CPU-sized microbenchmarks with pytest-benchmark; not part of the default test run.

    pytest bench/test_cpu_microbench.py --benchmark-columns=median,iqr,ops
"""
import pytest
import torch

from abcgpt.gates.gate import sample_scores, tent_gate
from abcgpt.model.gpt import GPT, GPTConfig

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0)
BATCH = 16


def make_model(gated):
    torch.manual_seed(0)
    return GPT(GPTConfig(**SHAPE, gated=gated), "reference")


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(65, (BATCH, SHAPE["block_size"]), generator=g)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["one-alpha", "per-sequence"])
def test_gate_computation(benchmark, per_sequence):
    scores = sample_scores(4 * 768, torch.Generator().manual_seed(0))
    alpha = torch.rand(BATCH) if per_sequence else torch.tensor(0.3)
    benchmark(tent_gate, alpha, scores)


@pytest.mark.parametrize("gated", [False, True], ids=["vanilla", "gated"])
def test_forward(benchmark, gated):
    model, idx = make_model(gated).eval(), batch()
    alpha = torch.tensor(0.5) if gated else None
    with torch.no_grad():
        benchmark(model, idx, alpha, idx)


@pytest.mark.parametrize("gated", [False, True], ids=["vanilla", "gated"])
def test_training_step(benchmark, gated):
    model, idx = make_model(gated), batch()
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), "cpu")
    alpha = torch.tensor(0.5) if gated else None

    def step():
        _, loss = model(idx, alpha, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark(step)
