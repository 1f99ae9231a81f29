"""Autoregressive sampling at a chosen dial setting, with a key/value cache."""
import torch
from torch.nn import functional as F

from .attention import KVCache, StaticKVCache


@torch.no_grad()
def generate(model, idx, max_new_tokens, alpha=None, temperature=1.0, top_k=None, generator=None, use_cache=True,
             decoder=None):
    """Extend idx (B, T) by max_new_tokens tokens sampled at alpha (None for a vanilla model).

    temperature > 0 scales the logits; top_k keeps only the k likeliest tokens. With
    use_cache, each step feeds only the new token and reuses past keys and values;
    once the sequence outgrows block_size the context is cropped and recomputed every
    step, as without the cache (positions shift, so cached keys no longer apply).
    decoder: a CompiledDecoder to run the one-token steps with (alpha is then its own).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    block_size = model.config.block_size
    decode = decoder.eager if decoder else model.at(alpha)  # gates folded once for the whole generation
    cache = (StaticKVCache(block_size) if decoder else KVCache(block_size)) if use_cache else None
    cached = 0  # positions in the cache
    for _ in range(max_new_tokens):
        if cache is not None and idx.size(1) <= block_size:
            step = decoder.step if decoder and cached else decode  # the prompt runs eagerly: other shapes
            logits, _ = step(idx[:, cached:].contiguous(), cache=cache)  # one stride, step after step
            cached = idx.size(1)
        else:
            logits, _ = decode(idx[:, -block_size:])
        next_id = sample_next(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """One token id per row of logits (B, vocab): scaled by temperature, cut to the top_k, sampled.
    The one place tokens are drawn, so that the server draws what generate() would."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


class CompiledDecoder:
    """A model at one dial setting, with its one-token decoding step compiled once (torch.compile) over a
    StaticKVCache: pass it to generate() as decoder=, and reuse it across generations to keep the
    compiled code."""

    def __init__(self, model, alpha=None, backend="inductor"):
        self.eager = model.at(alpha)
        self.step = torch.compile(self.eager, dynamic=False, backend=backend)
