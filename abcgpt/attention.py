"""Causal attention over the new positions and, when generating, a cache of past keys and values."""
import torch
from torch.nn import functional as F


class LayerKV:
    def __init__(self, cache):
        self.cache = cache
        self.k = self.v = None

    def extend(self, k, v):
        """Store k, v (B, nh, T, hs) at the next positions; return keys and values of all so far, and
        no mask (the new queries are the last positions, see attend)."""
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
    """Past keys and values of every attention layer, filled as generation goes; every sequence of
    the batch at the same position (batching.SlotCache holds sequences at positions of their own).

    The model asks it for the new tokens' positions, checks the length, and advances it after
    each forward; pos counts the positions cached so far.
    """

    layer_type = LayerKV

    def __init__(self, max_len):
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
    def extend(self, k, v):
        """Write k, v (B, nh, T, hs) at the current positions; return the whole buffers and which keys
        each new query sees."""
        where = self.cache.positions(k.size(2), k.device)
        if self.k is None:
            shape = (k.size(0), k.size(1), self.cache.max_len, k.size(3))
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k.index_copy_(2, where, k)
        self.v.index_copy_(2, where, v)
        keys = torch.arange(self.cache.max_len, device=k.device)
        return self.k, self.v, keys[None, :] <= where[:, None]


class StaticKVCache(KVCache):
    """A batch's past keys and values in buffers of one fixed length, its position a tensor on the device:
    every one-token step has the same shapes and no host value, so a compiled decoder compiles once."""

    layer_type = StaticLayerKV

    def __init__(self, max_len):
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


def attend(q, k, v, kv=None, dropout_p=0.0):
    """Causal attention of q over k, v, and over the cached past when kv (a layer of a cache) is given;
    a cache may return the mask of which keys each query sees."""
    if kv is not None:
        k, v, mask = kv.extend(k, v)
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
