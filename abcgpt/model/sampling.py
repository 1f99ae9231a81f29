"""Autoregressive sampling at a chosen dial setting, with a key/value cache, and the one token draw."""
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.nn import functional as F

from .attention import KVCache


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: the one value generate(), the server's requests and the draw take whole. Its
    defaults are every front door's; a field's range is in abcgpt.core.limits under its name, and its help is the
    command line's (abcgpt.serving.settings makes and checks these from flags and from the API's fields)."""

    temperature: float = field(default=0.8, metadata={"help": "above 0; lower is more conservative"})
    top_k: Optional[int] = field(default=200, metadata={"help": "sample from the k likeliest tokens only"})


PLAIN = Sampling(temperature=1.0, top_k=None)  # the model's own distribution, uncut


@dataclass(frozen=True, eq=False)  # eq=False: a dial may be a tensor
class Generation:
    """One generation, whole: at which dial, drawn how, from which seed, for how many new tokens. The front
    doors make it from checked settings (abcgpt.serving.settings), and generate() and the batched decoder's
    requests take it as it is."""

    dial: Any = None  # what the model takes as alpha: an alpha, one per sequence, or a voice.Dial; None: vanilla
    sampling: Sampling = Sampling()
    seed: Optional[int] = None  # None: torch's own generator
    max_new_tokens: int = 300  # a generation's length unless asked otherwise


@torch.no_grad()
def generate(model, idx, generation=Generation(), generator=None, use_cache=True, decoder=None, on_token=None):
    """Extend idx (B, T) by generation.max_new_tokens tokens sampled at its dial, drawn as its sampling says,
    from a generator seeded with its seed (or generator, one of the caller's, drawn on from where it is). With
    use_cache, each step feeds only the new token and reuses past keys and values;
    once the sequence outgrows block_size the context is cropped and recomputed every
    step, as without the cache (positions shift, so cached keys no longer apply).
    decoder: a CompiledDecoder to run the one-token steps with (the dial is then its own).
    on_token: called with each step's new tokens (B, 1) as they come, for a caller that streams them.
    """
    block_size = model.config.block_size
    if generator is None and generation.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(generation.seed)
    decode = decoder.eager if decoder else model.at(generation.dial)  # gates folded once for the whole generation
    cache = KVCache(idx.size(0), block_size, static=decoder is not None) if use_cache else None
    cached = 0  # positions in the cache
    for _ in range(generation.max_new_tokens):
        if cache is not None and idx.size(1) <= block_size:
            step = decoder.step if decoder and cached else decode  # the prompt runs eagerly: other shapes
            # the same strides step after step, a row's too: a compiled step recompiles for another stride
            logits, _ = step(idx[:, cached:].clone(memory_format=torch.contiguous_format), cache=cache)
            cached = idx.size(1)
        else:
            logits, _ = decode(idx[:, -block_size:])
        next_id = sample_next(logits[:, -1, :], generation.sampling, generator)
        idx = torch.cat((idx, next_id), dim=1)
        if on_token is not None:
            on_token(next_id)
    return idx


GREEDY_BELOW = 1e-4  # a temperature below this samples greedily: dividing by it could overflow to inf


def sample_next(logits, sampling, generator=None):
    """One token id per row of logits (B, vocab), from one uniform draw per row (generator's next B), every
    row drawn as sampling says. The one place tokens are drawn: generate() and the server (draw_rows(), a
    row per request and its own generator) give the same tokens for the same draws."""
    u = torch.rand(logits.size(0), 1, generator=generator, device=logits.device)
    return draw_rows(logits, [sampling] * logits.size(0), u)


def draw_rows(logits, samplings, u):
    """Token ids (B, 1) for logits (B, vocab), row b drawn as samplings[b] says, from uniforms u (B, 1)."""
    vocab, device = logits.size(-1), logits.device
    temperature = torch.tensor([[s.temperature] for s in samplings], device=device)
    top_k = None
    if any(s.top_k is not None and s.top_k < vocab for s in samplings):  # else no sort to pay
        top_k = torch.tensor([[s.top_k or vocab] for s in samplings], device=device)
    return draw(logits, temperature, top_k, u)


def draw(logits, temperature, top_k, u):
    """Token ids (B, 1) for logits (B, vocab) at per-row temperatures and top-k ((B, 1) tensors; top_k
    None for none) and uniforms u (B, 1). A temperature below GREEDY_BELOW takes the likeliest token;
    no setting can make this produce a NaN or fail."""
    logits = logits.float()
    if top_k is not None:  # each row's k-th largest value, ties kept
        k = top_k.clamp(1, logits.size(-1)).long()
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits / temperature.clamp(min=GREEDY_BELOW), dim=-1)
    cdf = probs.cumsum(-1)  # the first token whose cdf passes u (scaled to the total): never a zero-mass one
    sampled = torch.searchsorted(cdf, u.to(cdf.dtype) * cdf[:, -1:], right=True).clamp(max=logits.size(-1) - 1)
    greedy = logits.argmax(dim=-1, keepdim=True)
    return torch.where(temperature < GREEDY_BELOW, greedy, sampled)


class CompiledDecoder:
    """A model at one dial setting, with its one-token decoding step compiled once (torch.compile) over a
    static KVCache: pass it to generate() as decoder=, and reuse it across generations to keep the
    compiled code."""

    def __init__(self, model, alpha=None, backend="inductor"):
        self.eager = model.at(alpha)
        self.step = torch.compile(self.eager, dynamic=False, backend=backend)
