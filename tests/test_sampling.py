"""Generation (sampling.py): the key/value caches and the compiled decoder give what a full forward gives."""
import pytest
import torch

from abcgpt.attention import KVCache
from abcgpt.model import GPT, GPTConfig
from abcgpt.sampling import generate
from conftest import SMALL_GPT as CONFIG
from conftest import token_batch as batch


def generation_model(backend="auto", **overrides):
    torch.manual_seed(5)
    return GPT(GPTConfig(**{**CONFIG, "vocab_size": 12, **overrides}), backend).double().eval()  # float64: no ties to break


@pytest.mark.parametrize("case", ["vanilla", "folded", "reference", "per-sequence"])
@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 15), (5, 30)])  # 5 + 30 outgrows block_size 24
def test_cached_generation_gives_the_same_tokens(case, prompt_len, new_tokens):
    model = generation_model("reference" if case == "reference" else "auto", gated=case != "vanilla")
    alpha = {"vanilla": None, "folded": 1.0, "reference": 0.3, "per-sequence": torch.tensor([0.0, 0.5])}[case]
    prompt = torch.randint(0, 12, (2, prompt_len), generator=torch.Generator().manual_seed(6))
    runs = [
        generate(model, prompt, new_tokens, alpha, temperature=1.5, generator=torch.Generator().manual_seed(7),
                 use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, prompt_len + new_tokens)


def test_cache_logits_match_a_full_forward():
    model = generation_model()
    idx = batch(T=20).remainder(12)
    full, _ = model(idx, 0.25, idx)
    cache = KVCache(model.config.block_size)
    decode = model.at(0.25)
    pieces = [decode(idx[:, :7], idx[:, :7], cache)[0]]  # a prompt, then one token at a time
    for t in range(7, 20):
        pieces.append(decode(idx[:, t : t + 1], idx[:, t : t + 1], cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


def test_cache_refuses_to_overflow():
    model = generation_model(gated=False)
    cache = KVCache(model.config.block_size)
    model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("case", ["vanilla", "folded", "per-sequence"])
def test_compiled_decoder_steps_without_recompiling_and_gives_the_same_tokens(case):
    """The one-token steps over a static-shape cache trace once (a recompile would raise here) and give what
    the eager cache gives, into window mode past block_size too."""
    from abcgpt.recompiles import forbid_recompiles
    from abcgpt.sampling import CompiledDecoder

    model = generation_model(gated=case != "vanilla")
    alpha = {"vanilla": None, "folded": 0.0, "per-sequence": torch.tensor([0.2, 0.9])}[case]
    prompt = torch.randint(0, 12, (2, 4), generator=torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    decoder = CompiledDecoder(model, alpha, backend="eager")  # dynamo's tracing and guards, without a compiler
    generate(model, prompt, 3, alpha, decoder=decoder)  # the first step traces
    with forbid_recompiles():
        for new_tokens in (10, 30):  # 4 + 30 outgrows block_size 24
            runs = [generate(model, prompt, new_tokens, alpha, temperature=1.5, decoder=d,
                             generator=torch.Generator().manual_seed(3)) for d in (decoder, None)]
            assert torch.equal(runs[0], runs[1])

