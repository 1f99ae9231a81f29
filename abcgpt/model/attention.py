"""Causal attention over the new positions and, when generating, a cache of past keys and values.

Every cache implements Cache: the model asks it for the new tokens' positions, checks
their length, hands each layer's keys and values to that layer's LayerCache together
with those positions (explicit, as gpt-fast passes input_pos), and advances it after
the forward. Three implement it: KVCache (eager, every row at one position), StaticKVCache
(fixed shapes and a device-side position, for a compiled decoder) and
batching.SlotCache's rows (each row at a position of its own, for serving).
"""
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn import functional as F


@runtime_checkable
class LayerCache(Protocol):
    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Store k, v (B, nh, T, hs) at positions ((T,) or (B, T)); return every key and value the new
        queries attend over, and the mask of which each query sees (None: the new queries are the last
        positions and see every key before them)."""


@runtime_checkable
class Cache(Protocol):
    def positions(self, T: int, device: torch.device) -> Tensor:
        """The positions of the next T tokens: (T,) for every row, or (B, T) for a position per row."""

    def check(self, T: int, block_size: int) -> None:
        """Refuse T more tokens where they would not fit."""

    def layer(self, index: int) -> LayerCache:
        """The cache of one attention layer."""

    def advance(self, T: int) -> None:
        """T tokens were added to every row."""


class LayerKV:
    def __init__(self, cache):
        self.cache = cache
        self.k = self.v = None

    def update(self, k, v, positions):
        """Write at the next positions, which the host knows (cache.pos): no device value is read."""
        start, end = self.cache.pos, self.cache.pos + k.size(2)
        if end > self.cache.max_len:
            raise ValueError(f"the cache holds {self.cache.max_len} positions, {end} asked for")
        if self.k is None:
            shape = (k.size(0), k.size(1), self.cache.max_len, k.size(3))
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k.narrow(2, start, end - start).copy_(k)  # narrow, not indexing: fewer host-side ops per token
        self.v.narrow(2, start, end - start).copy_(v)
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end), None


class KVCache:
    """Past keys and values of every attention layer, filled as generation goes; every sequence of the batch
    at the same position, counted on the host (pos)."""

    layer_type = LayerKV

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.layers = []

    def positions(self, T, device):
        return torch.arange(self.pos, self.pos + T, dtype=torch.long, device=device)

    def check(self, T, block_size):
        if self.pos + T > block_size:
            raise ValueError(f"sequence of length {self.pos + T} is longer than block_size {block_size}")

    def advance(self, T):
        self.pos += T  # in place for StaticKVCache's tensor position

    def layer(self, index):
        while len(self.layers) <= index:
            self.layers.append(self.layer_type(self))
        return self.layers[index]


class StaticLayerKV(LayerKV):
    def update(self, k, v, positions):
        """Write at positions in buffers of the full length; return them whole, with each query's mask."""
        if self.k is None:
            shape = (k.size(0), k.size(1), self.cache.max_len, k.size(3))
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        keys = torch.arange(self.cache.max_len, device=k.device)
        return self.k, self.v, keys[None, :] <= positions[:, None]


class StaticKVCache(KVCache):
    """A batch's past keys and values in buffers of one fixed length, its position a tensor on the device:
    every one-token step has the same shapes and no host value, so a compiled decoder compiles once."""

    layer_type = StaticLayerKV

    def __init__(self, max_len: int):
        super().__init__(max_len)
        self.pos = None  # a 0-dim tensor, made on the first forward's device

    def positions(self, T, device):
        if self.pos is None:
            self.pos = torch.zeros((), dtype=torch.long, device=device)
        return self.pos + torch.arange(T, device=device)

    def check(self, T, block_size):
        """Only what needs no device value; the caller keeps the sequence within max_len."""
        if T > min(self.max_len, block_size):
            raise ValueError(f"sequence of length {T} is longer than block_size {block_size}")


def attend(q: Tensor, k: Tensor, v: Tensor, kv: Optional[LayerCache] = None, positions: Optional[Tensor] = None,
           dropout_p: float = 0.0) -> Tensor:
    """Causal attention of q over k, v, and over the cached past when kv (a layer of a cache) is given, the
    new tokens at positions; a cache may return the mask of which keys each query sees. Over zero heads (the
    folded backend cuts a layer whose every head is silent) there is nothing to attend to, and no kernel is
    called: torch 2.11's CPU attention dies of a division by zero (SIGFPE) there."""
    mask = None
    if kv is not None:
        k, v, mask = kv.update(k, v, positions)  # the cache keeps its positions, zero heads or not
    if q.size(1) == 0:  # empty, but still in the graph: the layers before it get their (zero) gradients
        return q.clone()
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    t_q, t_k = q.size(2), k.size(2)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if t_q == 1:  # one new token, the last position: it sees every key, so no mask is needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # the new queries are the last t_q positions: each sees all the past and the new keys up to itself
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
