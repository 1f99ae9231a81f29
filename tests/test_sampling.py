"""sampling.py: how tokens are drawn; the caches and the compiled decoder give what a full forward gives."""
import pytest
import torch
from conftest import SMALL_GPT as CONFIG
from conftest import token_batch as batch

from abcgpt.model.attention import KVCache
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.model.sampling import GREEDY_BELOW, Generation, Sampling, draw, generate


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
        generate(model, prompt, Generation(alpha, Sampling(1.5, None), 7, new_tokens), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, prompt_len + new_tokens)


def test_cache_logits_match_a_full_forward():
    model = generation_model()
    idx = batch(T=20).remainder(12)
    full, _ = model(idx, 0.25, idx)
    cache = KVCache(idx.size(0), model.config.block_size)
    decode = model.at(0.25)
    pieces = [decode(idx[:, :7], idx[:, :7], cache)[0]]  # a prompt, then one token at a time
    for t in range(7, 20):
        pieces.append(decode(idx[:, t : t + 1], idx[:, t : t + 1], cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


def test_cache_refuses_to_overflow():
    model = generation_model(gated=False)
    cache = KVCache(1, model.config.block_size)
    model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("case, rows", [("vanilla", 2), ("folded", 2), ("per-sequence", 2), ("folded", 1)])
def test_compiled_decoder_steps_without_recompiling_and_gives_the_same_tokens(case, rows):
    """The one-token steps over a static-shape cache trace once (a recompile would raise here) and give what
    the eager cache gives, into window mode past block_size too."""
    from abcgpt.core.recompiles import forbid_recompiles
    from abcgpt.model.sampling import CompiledDecoder

    model = generation_model(gated=case != "vanilla")
    alpha = {"vanilla": None, "folded": 0.0, "per-sequence": torch.tensor([0.2, 0.9])}[case]
    prompt = torch.randint(0, 12, (rows, 4), generator=torch.Generator().manual_seed(8))  # 1 row: strides of size 1
    torch._dynamo.reset()
    decoder = CompiledDecoder(model, alpha, backend="eager")  # dynamo's tracing and guards, without a compiler
    generate(model, prompt, Generation(alpha, max_new_tokens=3), decoder=decoder)  # the first step traces
    with forbid_recompiles():
        for new_tokens in (10, 30):  # 4 + 30 outgrows block_size 24
            runs = [generate(model, prompt, Generation(alpha, Sampling(1.5, None), 3, new_tokens), decoder=d)
                    for d in (decoder, None)]
            assert torch.equal(runs[0], runs[1])



def test_draw_samples_each_row_from_its_softmax():
    """Inverse-CDF draws from uniforms follow softmax(logits / temperature), row by row."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0], [0.0, 0.0, 0.0, 5.0, 0.0]])
    temperature = torch.tensor([[1.0], [2.0]])
    n = 20_000
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    for row in range(2):
        tokens = draw(logits[row].expand(n, -1), temperature[row].expand(n, 1), None, u).flatten()
        seen = torch.bincount(tokens, minlength=5).float() / n
        expected = torch.softmax(logits[row] / temperature[row], dim=-1)
        assert torch.allclose(seen, expected, atol=0.015), (seen, expected)


def test_draw_cuts_each_row_to_its_top_k_and_never_takes_a_zero_mass_token():
    logits = torch.tensor([[float("-inf"), 3.0, 2.0, 1.0, 0.0]] * 2)
    top_k = torch.tensor([[1], [3]])
    for u in (0.0, 0.3, 0.999999):
        tokens = draw(logits, torch.ones(2, 1), top_k, torch.full((2, 1), u)).flatten().tolist()
        assert tokens[0] == 1 and tokens[1] in (1, 2, 3)
    assert draw(logits, torch.ones(2, 1), None, torch.zeros(2, 1)).flatten().tolist() == [1, 1]  # not the -inf one


@pytest.mark.parametrize("temperature", [GREEDY_BELOW / 2, 1e-40, 1e-300, 0.0])
def test_a_temperature_near_zero_is_greedy_and_never_nan(temperature):
    """logits / 1e-40 overflows to inf, and softmax of inf is NaN: such a temperature takes the argmax."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 30
    temperature = torch.tensor([[temperature], [1.0]] * 3)
    u = torch.rand(6, 1, generator=torch.Generator().manual_seed(2))
    tokens = draw(logits, temperature, None, u).flatten()
    greedy = logits.argmax(-1)
    assert torch.equal(tokens[0::2], greedy[0::2])
    assert torch.equal(tokens[1::2], draw(logits[1::2], temperature[1::2], None, u[1::2]).flatten())  # untouched
