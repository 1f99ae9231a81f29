"""The one key/value cache, in each of its uses (eager, static for a compiled decoder, a block of a
SlotCache's rows): a forward through it, token by token, gives the logits of a forward over the whole
sequence."""
import pytest
import torch

from abcgpt.model.attention import KVCache
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.serving.batching import SlotCache


def caches(kind, model, batch):
    """The cache of each forward: one cache throughout, or a SlotCache's rows (a view made per forward)."""
    if kind == "slots":
        slots = SlotCache(model.config, batch + 1)
        while True:
            yield slots.rows(1, batch + 1)  # not slot 0: rows need not start at the first slot
    cache = KVCache(batch, model.config.block_size, static=kind == "static")
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
        logits, _ = model(piece, alpha, cache=cache)
        seen = 4 + t
        full, _ = model(idx[:, :seen], alpha)
        torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)


def test_rows_at_different_positions_step_together():
    """Two rows of one cache, filled to different lengths by forwards over each alone, then stepped together
    (each at its own position, a mask per row): each row's logits are its own sequence's full forward."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=12, vocab_size=11, n_layer=2, n_head=2, n_embd=8)).double().eval()
    seqs = [torch.randint(0, 11, (1, 8)), torch.randint(0, 11, (1, 8))]
    alphas = [0.2, 0.7]
    cache = KVCache(2, model.config.block_size)
    for row, length in enumerate((3, 5)):
        model(seqs[row][:, :length], alphas[row], cache=cache.rows(row, row + 1))
    assert cache.lengths == [3, 5]
    for step in range(2):
        piece = torch.cat([seqs[0][:, 3 + step:4 + step], seqs[1][:, 5 + step:6 + step]])
        logits, _ = model(piece, torch.tensor(alphas, dtype=torch.float64), cache=cache)
        for row, length in enumerate((4 + step, 6 + step)):
            full, _ = model(seqs[row][:, :length], alphas[row])
            torch.testing.assert_close(logits[row:row + 1], full, rtol=1e-9, atol=1e-9)
    assert cache.lengths == [5, 7]
