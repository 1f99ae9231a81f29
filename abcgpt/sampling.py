"""Autoregressive sampling at a chosen dial setting."""
import torch
from torch.nn import functional as F


@torch.no_grad()
def generate(model, idx, max_new_tokens, alpha=None, temperature=1.0, top_k=None, generator=None):
    """Extend idx (B, T) by max_new_tokens tokens sampled at alpha (None for a vanilla model).

    temperature > 0 scales the logits; top_k keeps only the k likeliest tokens. The
    context is cropped to the model's block_size as it grows.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        context = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits, _ = model(context, alpha)
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_id), dim=1)
    return idx
