"""The folded backend: one alpha for the batch, gates moved from activations onto weights.

With a single alpha every gate is a per-unit constant, so W_eff = diag(g_out) W diag(g_in):
a gate on a linear layer's input scales that weight's columns, a gate on its output
its rows, and the embedding gate the embedding columns (and, tied, the lm_head
input). The extra work is proportional to the parameters, not the activations.

Units whose gate is exactly 0 contribute nothing, so each group's matmuls keep only
the range [lo, hi) that holds all its nonzero gates. The active units always form an
interval in score order, so with units sorted by score (permute.py) that range is
tight: at the corners, half of every group drops out. The residual stream keeps its
full width (LayerNorm sees every channel), but silent channels stay exactly zero, so
the residual writes and the lm_head input skip them.
"""
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .attention import attend
from .gate import tent_gate


def active_ranges(gates):
    """For each gate vector, the [lo, hi) range holding all its nonzero entries."""
    bounds = []
    for g in gates:
        index = torch.arange(len(g), device=g.device)
        on = g > 0
        bounds.append(torch.stack([torch.where(on, index, len(g)).min(), torch.where(on, index + 1, 0).max()]))
    return [(lo, max(lo, hi)) for lo, hi in torch.stack(bounds).tolist()]


def _cut(t, *ranges):
    """t[ranges], or t itself where the ranges cover it all (a full slice still costs a
    zero-fill and a copy in the backward)."""
    if all(r.start == 0 and r.stop == n for r, n in zip(ranges, t.shape)):
        return t
    return t[ranges]


def _rows_cols(w, rows, cols, row_gate, col_gate):
    """diag(row_gate) W[rows, cols] diag(col_gate), in one pass over the matrix."""
    return _cut(w, rows, cols) * torch.outer(row_gate, col_gate)


def _head_rows(t, heads, c):
    """The active heads' rows of c_attn's q, k and v parts (no copy when every head is active)."""
    if heads.stop - heads.start == c.n_embd:
        return t
    return torch.cat([t[part * c.n_embd + heads.start : part * c.n_embd + heads.stop] for part in range(3)])


@dataclass
class FoldedBlock:
    ln_1: torch.nn.Module
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    n_heads: int  # active heads
    attn_w: torch.Tensor
    attn_b: torch.Tensor | None
    ln_2: torch.nn.Module
    fc_w: torch.Tensor
    fc_b: torch.Tensor | None
    mlp_w: torch.Tensor
    mlp_b: torch.Tensor | None


class FoldedGPT:
    """A gated GPT at one alpha, with its gates folded into (and silent units cut from) its weights."""

    def __init__(self, model, alpha, skip=True, host_alpha=None):
        """alpha: a 0-dim tensor on the model's device; host_alpha: the same on the CPU, if at hand."""
        c = model.config
        self.config, self.training = c, model.training
        w = c.narrowness
        blocks = model.transformer.h
        g_embd = tent_gate(alpha, model.embd_scores, w)
        g_heads = [tent_gate(alpha, b.attn.head_scores, w) for b in blocks]
        g_hidden = [tent_gate(alpha, b.mlp.hidden_scores, w) for b in blocks]
        if skip:  # found on the host from CPU copies of the scores: no device sync
            host_alpha = torch.as_tensor(alpha.cpu() if host_alpha is None else host_alpha, dtype=torch.float32)
            ranges = active_ranges([tent_gate(host_alpha, s, w) for s in model.host_scores()])
        else:
            ranges = [(0, len(g)) for g in (g_embd, *g_heads, *g_hidden)]
        lo, hi = ranges[0]
        self.embd = slice(lo, hi)
        ge = g_embd[self.embd]

        wte = model.transformer.wte.weight
        self.wte = wte * g_embd  # embedding columns; the silent ones become exact zeros
        self.wpe = model.transformer.wpe.weight * g_embd
        self.lm_head = _cut(wte, slice(0, wte.size(0)), self.embd) * ge  # tied: the ln_f output's gate on the lm_head input columns
        self.ln_f = model.transformer.ln_f
        hs = c.n_embd // c.n_head
        self.head_size = hs
        self.blocks = []
        for block, g_head, g_unit, (h_lo, h_hi), (u_lo, u_hi) in zip(
            blocks, g_heads, g_hidden, ranges[1 : 1 + c.n_layer], ranges[1 + c.n_layer :]
        ):
            attn, mlp = block.attn, block.mlp
            heads = slice(h_lo * hs, h_hi * hs)  # the active heads' rows in each of q, k and v
            units = slice(u_lo, u_hi)
            self.blocks.append(FoldedBlock(
                ln_1=block.ln_1,
                qkv_w=_head_rows(attn.c_attn.weight, heads, c),
                qkv_b=None if attn.c_attn.bias is None else _head_rows(attn.c_attn.bias, heads, c),
                n_heads=h_hi - h_lo,
                attn_w=_rows_cols(attn.c_proj.weight, self.embd, heads, ge, g_head[h_lo:h_hi].repeat_interleave(hs)),
                attn_b=None if attn.c_proj.bias is None else _cut(attn.c_proj.bias, self.embd) * ge,
                ln_2=block.ln_2,
                fc_w=_cut(mlp.c_fc.weight, units),
                fc_b=None if mlp.c_fc.bias is None else _cut(mlp.c_fc.bias, units),
                mlp_w=_rows_cols(mlp.c_proj.weight, self.embd, units, ge, g_unit[units]),
                mlp_b=None if mlp.c_proj.bias is None else _cut(mlp.c_proj.bias, self.embd) * ge,
            ))

    def _residual(self, out):
        """A write to the active channels, as a full-width residual update."""
        if out.size(-1) == self.config.n_embd:
            return out
        return F.pad(out, (self.embd.start, self.config.n_embd - self.embd.stop))

    def _dropout(self, x):
        return F.dropout(x, self.config.dropout, self.training)

    def __call__(self, idx, targets=None, cache=None):
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self._dropout(F.embedding(idx, self.wte) + F.embedding(pos, self.wpe))
        for layer, b in enumerate(self.blocks):
            qkv = F.linear(b.ln_1(x), b.qkv_w, b.qkv_b)
            if b.n_heads:  # split, not slicing: its backward concatenates instead of zero-filling
                q, k, v = (t.view(B, T, b.n_heads, self.head_size).transpose(1, 2)
                           for t in qkv.split(b.n_heads * self.head_size, dim=2))
                kv = cache.layer(layer) if cache is not None else None
                y = attend(q, k, v, kv, self.config.dropout if self.training else 0.0)
                y = y.transpose(1, 2).reshape(B, T, b.n_heads * self.head_size)
            else:
                y = qkv  # no head is active: an empty (B, T, 0) output
            x = x + self._residual(self._dropout(F.linear(y, b.attn_w, b.attn_b)))
            h = F.gelu(F.linear(b.ln_2(x), b.fc_w, b.fc_b))
            x = x + self._residual(self._dropout(F.linear(h, b.mlp_w, b.mlp_b)))
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)[..., self.embd]
        if targets is not None:
            logits = F.linear(x, self.lm_head)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return F.linear(x[:, [-1], :], self.lm_head), None

    def active_units(self):
        """How many residual channels, heads and hidden units per layer take part."""
        return {
            "channels": self.embd.stop - self.embd.start,
            "heads": [b.n_heads for b in self.blocks],
            "hidden": [b.fc_w.size(0) for b in self.blocks],
        }
