"""The recompile guard every "compiles once" check relies on really fails when code compiles again."""
import pytest
import torch

from abcgpt.core.recompiles import forbid_recompiles
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.model.sampling import CompiledDecoder, Generation, generate


def test_a_recompile_inside_the_guard_raises_and_outside_it_does_not():
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    double(torch.ones(2))
    with forbid_recompiles():
        assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))  # compiled code reused: no error
        with pytest.raises(RuntimeError, match="recompile"):
            double(torch.ones(3))  # a new static shape needs new code
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))  # outside, it simply compiles


def test_the_guard_catches_a_compiled_decoder_stepping_a_new_batch_size():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=12, n_layer=1, n_head=2, n_embd=8, gated=False)).eval()
    torch._dynamo.reset()
    decoder = CompiledDecoder(model, backend="eager")
    generate(model, torch.zeros(2, 3, dtype=torch.long), Generation(max_new_tokens=3), decoder=decoder)
    with forbid_recompiles():
        # the same shapes: no error
        generate(model, torch.ones(2, 3, dtype=torch.long), Generation(max_new_tokens=3), decoder=decoder)
        with pytest.raises(RuntimeError, match="recompile"):
            generate(model, torch.zeros(3, 3, dtype=torch.long), Generation(max_new_tokens=3), decoder=decoder)
