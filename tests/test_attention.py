"""Every key/value cache implements attention.Cache, and a forward through each, token by token, gives
the logits of a forward over the whole sequence."""
import pytest
import torch

from abcgpt.model.attention import Cache, KVCache, LayerCache, StaticKVCache
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.serving.batching import SlotCache


def caches(kind, model, batch):
    """The cache of each forward: one cache throughout, or a SlotCache's rows (a view made per forward)."""
    if kind == "slots":
        slots = SlotCache(model.config, batch + 1, "cpu", torch.float64)
        while True:
            yield slots.rows(1, batch + 1)  # not slot 0: rows need not start at the first slot
    cache = KVCache(model.config.block_size) if kind == "eager" else StaticKVCache(model.config.block_size)
    while True:
        yield cache


@pytest.mark.parametrize("kind", ["eager", "static", "slots"])
def test_each_cache_gives_the_full_forward(kind):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=11, n_layer=2, n_head=2, n_embd=8)).double().eval()
    idx = torch.randint(0, 11, (2, 9))
    alpha = torch.tensor([0.1, 0.9])
    steps = [idx[:, :4]] + [idx[:, t:t + 1] for t in range(4, 9)]  # a prompt, then one token at a time
    for t, (piece, cache) in enumerate(zip(steps, caches(kind, model, 2))):
        assert isinstance(cache, Cache) and isinstance(cache.layer(0), LayerCache)
        logits, _ = model(piece, alpha, cache=cache)
        seen = 4 + t
        full, _ = model(idx[:, :seen], alpha)
        torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
