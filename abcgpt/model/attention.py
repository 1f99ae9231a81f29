"""Causal attention over the new positions and, when generating, the one cache of past keys and values.

KVCache serves every way of decoding: eager generation, the compiled decoder and the batched
server. It keeps a position per row: the model asks it for the new tokens' positions, checks their
length, hands each layer's keys and values to update() with those positions (explicit, as
gpt-fast passes input_pos), and advances it after the forward. Eager and batched decoding
count the positions on the host, a row at a time. A compiled decoder (static) moves its rows
together and counts their one position on the device, so that every one-token step has the
same shapes and reads no host value.
"""
import copy
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F


class KVCache:
    """Past keys and values of every attention layer for `rows` sequences, each at a position of its own.

    A layer's buffers are made at its first write, at the full length max_len and with that layer's heads
    (the folded backend keeps only a layer's active ones). lengths are the positions filled: a list on the
    host, one per row; or, static, one 0-dim tensor on the device for every row, read by no host code.
    rows(start, stop) is a view of a block of rows, sharing the buffers and the lengths, for one forward
    over those rows."""

    def __init__(self, rows: int, max_len: int, static: bool = False):
        self.max_len, self.static, self.capacity = max_len, static, rows
        self.start, self.stop = 0, rows
        self.keys, self.values = [], []  # per layer: (rows, heads, max_len, head size)
        self.lengths = None if static else [0] * rows  # static: made on the first forward's device
        self.end = None  # keys in use after this forward (host lengths): the longest row's
        self.aligned = False  # every row of this forward at the same position (host lengths): no mask needed
        self.seen = None  # which keys each new query sees, unless aligned: the same in every layer, made once

    def rows(self, start: int, stop: int) -> "KVCache":
        view = copy.copy(self)  # the same buffers and lengths
        view.start, view.stop, view.seen = start, stop, None
        return view

    def positions(self, T: int, device: torch.device) -> Tensor:
        """The positions of the next T tokens: (T,) when every row is at the same one, else (rows, T)."""
        if self.static:
            if self.lengths is None:
                self.lengths = torch.zeros((), dtype=torch.long, device=device)
            return self.lengths + torch.arange(T, device=device)
        filled = self.lengths[self.start:self.stop]
        if self.aligned:
            return torch.arange(filled[0], filled[0] + T, device=device)
        return torch.tensor(filled, device=device)[:, None] + torch.arange(T, device=device)

    def check(self, T: int, block_size: int) -> None:
        """Refuse T more tokens where they would not fit (static: only what needs no device value; the caller
        keeps the sequence within max_len)."""
        longest = T if self.static else max(self.lengths[self.start:self.stop]) + T
        if longest > min(block_size, self.max_len):
            raise ValueError(f"sequence of length {longest} is longer than block_size {block_size}")
        self.end = longest
        self.aligned = not self.static and len(set(self.lengths[self.start:self.stop])) == 1

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Store k, v (B, heads, T, head size) at positions; return every key and value the new queries attend
        over, and the mask of which each query sees (None: every row's new queries are its last positions
        and see every key before them)."""
        if layer == len(self.keys):
            shape = (self.capacity, k.size(1), self.max_len, k.size(3))
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        keys, values = self.keys[layer], self.values[layer]
        if self.stop - self.start < self.capacity:  # a block of the rows; a slice costs host time per layer
            keys, values = keys[self.start:self.stop], values[self.start:self.stop]
        if self.static:  # the buffers whole, every step: the same shapes
            keys.index_copy_(2, positions, k)
            values.index_copy_(2, positions, v)
            if self.seen is None:  # (T, max_len)
                self.seen = torch.arange(self.max_len, device=k.device)[None, :] <= positions[:, None]
            return keys, values, self.seen
        if self.aligned:  # narrow, not a scatter: fewer host-side ops per token
            start = self.lengths[self.start]
            keys.narrow(2, start, k.size(2)).copy_(k)
            values.narrow(2, start, k.size(2)).copy_(v)
            return keys.narrow(2, 0, self.end), values.narrow(2, 0, self.end), None
        at = positions[:, None, :, None].expand(k.shape)
        keys.scatter_(2, at, k)
        values.scatter_(2, at, v)
        if self.seen is None:  # (B, 1, T, end)
            self.seen = torch.arange(self.end, device=k.device)[None, None, None, :] <= positions[:, None, :, None]
        return keys[:, :, :self.end], values[:, :, :self.end], self.seen

    def advance(self, T: int) -> None:
        """T tokens were added to every row of this view."""
        if self.static:
            self.lengths += T  # in place: the compiled step reads the same tensor
        else:
            for row in range(self.start, self.stop):
                self.lengths[row] += T
        self.seen = None

    def move(self, source: int, dest: int) -> None:
        """Row source's keys, values and length into row dest (host lengths)."""
        for buffer in self.keys + self.values:
            buffer[dest].copy_(buffer[source])
        self.lengths[dest] = self.lengths[source]


def attend(q: Tensor, k: Tensor, v: Tensor, cache: Optional[KVCache] = None, layer: int = 0,
           positions: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Causal attention of q over k, v, and over the cached past when a cache is given (q, k, v are its layer
    layer's), the new tokens at positions; the cache may return the mask of which keys each query sees. Over
    zero heads (the folded backend cuts a layer whose every head is silent) there is nothing to attend to,
    and no kernel is called: torch 2.11's CPU attention dies of a division by zero (SIGFPE) there."""
    mask = None
    if cache is not None:
        k, v, mask = cache.update(layer, k, v, positions)  # the cache keeps its positions, zero heads or not
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
