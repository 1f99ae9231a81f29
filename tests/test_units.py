"""Sorting units by score (units.py): the function, the optimizer state and the permute command."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_GPT as CONFIG
from conftest import token_batch as batch

from abcgpt.core.checkpoint import load_checkpoint
from abcgpt.gates.units import sort_units
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.training.run import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("alpha", [0.0, 0.42, 1.0, "rows"])
def test_sorting_units_leaves_the_function_unchanged(alpha):
    torch.manual_seed(3)
    unsorted = GPT(GPTConfig(**CONFIG, bias=True, sort_units=False), "reference")
    ordered = copy.deepcopy(unsorted)
    sort_units(ordered)
    assert not torch.equal(unsorted.embd_scores, ordered.embd_scores)
    assert torch.all(ordered.embd_scores.diff() >= 0)
    assert all(torch.all(b.mlp.hidden_scores.diff() >= 0) for b in ordered.transformer.h)
    assert all(torch.all(b.attn.head_scores.diff() >= 0) for b in ordered.transformer.h)
    idx = batch()
    a = torch.tensor([0.0, 0.6, 1.0]) if alpha == "rows" else alpha
    torch.testing.assert_close(ordered(idx, a, idx)[0], unsorted(idx, a, idx)[0], rtol=1e-5, atol=1e-6)


def test_sorting_carries_the_optimizer_state_along():
    """Step, sort, step equals step, step, sort: training resumes on the sorted model as if unsorted.

    No biases here: the key bias's true gradient is 0 and Adam would amplify its rounding noise.
    """
    torch.manual_seed(4)
    model = GPT(GPTConfig(**CONFIG, sort_units=False), "reference")
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")

    def step(m, opt, alpha, seed):
        idx = batch(seed)
        m(idx, alpha, idx)[1].backward()
        opt.step()
        opt.zero_grad()

    step(model, optimizer, 0.3, 1)
    other = copy.deepcopy(model)
    other_optimizer = other.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
    other_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # loading alone would share tensors

    step(model, optimizer, 0.7, 2)  # step, then sort
    sort_units(model)
    state = sort_units(other, other_optimizer.state_dict())  # sort, then step
    other_optimizer.load_state_dict(state)
    step(other, other_optimizer, 0.7, 2)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_permute_command_sorts_a_checkpoint(trained_checkpoint, tmp_path):
    dest = tmp_path / "sorted.pt"
    result = subprocess.run([sys.executable, "-m", "abcgpt.tools.permute", str(trained_checkpoint), str(dest)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, _, _ = load_model(trained_checkpoint)
    after, _, run = load_model(dest)
    assert torch.all(after.embd_scores.diff() >= 0) and run.model_config.sort_units
    idx = torch.randint(0, before.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for alpha in (0.0, 0.5, 1.0):
        torch.testing.assert_close(after(idx, alpha, idx)[0], before(idx, alpha, idx)[0], rtol=1e-5, atol=1e-6)
    assert load_checkpoint(dest)["optimizer"]["state"]
