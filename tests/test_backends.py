"""Every gate backend computes the reference's function: logits and gradients, on random alphas and odd shapes."""
import pytest
import torch
from conftest import twin_models

from abcgpt.model.gpt import GPT, GPTConfig

# none of these a multiple of a kernel tile: 5 heads of 4, 80 hidden units, 19 positions
CONFIG = dict(block_size=24, vocab_size=37, n_layer=2, n_head=5, n_embd=20, dropout=0.0, bias=True, narrowness=0.8)


def twins(backend):
    return twin_models(backend, **CONFIG)


def compare(fast, reference, idx, alpha, tol):
    got_logits, got_loss = fast(idx, alpha, idx)
    want_logits, want_loss = reference(idx, alpha, idx)
    torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    got_loss.backward()
    want_loss.backward()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol * 10, atol=tol, msg=name)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", ["folded", "triton"])
def test_one_random_alpha(backend, seed):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand((), generator=g).item() if seed else 0.0  # a corner, then random dials
    idx = torch.randint(0, 37, (3, 19), generator=g)
    compare(*twins(backend), idx, alpha, 1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_per_sequence_alphas_in_the_fused_kernel(seed):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(4, generator=g)
    alpha[0] = float(seed % 2)  # a corner among them
    idx = torch.randint(0, 37, (4, 19), generator=g)
    compare(*twins("triton"), idx, alpha, 1e-5)


def test_alpha_as_a_tensor_or_a_float_is_the_same_dial():
    model, _ = twins("folded")
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(idx, 0.25, idx)[0], model(idx, torch.tensor(0.25), idx)[0], rtol=0, atol=0)


def test_auto_follows_the_registry():
    from abcgpt.backends.registry import choose

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose("auto", cpu, per_row=False).name == "folded"
    assert choose("auto", cpu, per_row=True).name == "reference"  # triton runs on CUDA
    if torch.cuda.is_available():
        assert choose("auto", cuda, per_row=True).name == "triton"
    assert choose("auto", cuda, per_row=False).name == "folded"


def test_a_new_backend_is_one_registration(monkeypatch):
    """A backend registered with the highest priority is what auto picks, and what the model's forward runs."""
    from abcgpt.backends import registry
    from abcgpt.backends.executors import Backend, Reference

    built = []

    class Counting(Reference):
        def __init__(self, gates):
            super().__init__(gates)
            built.append(self)

    counting = Backend("counting", lambda model, gates, host_alpha: Counting(gates), per_row=True,
                       devices=("cpu",), auto_priority=99)
    monkeypatch.setitem(registry.REGISTRY, "counting", counting)
    monkeypatch.setattr(registry, "NAMES", (*registry.NAMES, "counting"))
    fast, reference = twins("auto")
    idx = torch.randint(0, 37, (2, 5))
    compare(fast, reference, idx, torch.tensor([0.2, 0.8]), 1e-6)
    assert built and fast.gate_backend(torch.device("cpu"), per_row=True) == "counting"
    assert "counting" in registry.auto_rule()


def test_auto_backend_picks_by_alpha_and_device():
    model = GPT(GPTConfig(**CONFIG))
    assert model.gate_backend(torch.device("cpu")) == "folded"
    assert model.gate_backend(torch.device("cuda")) == "folded"
    assert model.gate_backend(torch.device("cpu"), per_row=True) == "reference"
    assert model.gate_backend(torch.device("cuda"), per_row=True) == "triton"
