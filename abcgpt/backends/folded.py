"""The folded backend: one dial setting for the batch, gates moved from activations onto weights.

With a single setting every gate is a per-unit constant, so W_eff = diag(g_out) W diag(g_in):
the cost is proportional to the parameters, not the activations. Units whose gate is
exactly 0 contribute nothing, so the matmuls keep only each group's active units: on the
line one range [lo, hi), tight because units are sorted by score (units.sort_units), so that
at the corners half of every group drops out; over many sources the shared block and the
dialled sources' blocks, gathered by index once per setting. The residual stream keeps its full width
(LayerNorm sees every channel), but silent channels stay exactly zero, so the
residual writes and the lm_head input skip them. Which rows and columns to scale or
cut comes from the unit map (units.py).
"""
import weakref
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from abcgpt.gates.gate import UnitGroups, active_units
from abcgpt.gates.units import fold, unit_map

from .executors import Backend, Ungated, merge_heads


@dataclass
class FoldedLayer:
    qkv_w: torch.Tensor  # the active heads' q, k and v rows
    qkv_b: torch.Tensor | None
    attn_w: torch.Tensor
    attn_b: torch.Tensor | None
    fc_w: torch.Tensor  # the active hidden units' rows
    fc_b: torch.Tensor | None
    mlp_w: torch.Tensor
    mlp_b: torch.Tensor | None


class Folded(Ungated):
    """A gated GPT's layers at one alpha: gates folded into (and silent units cut from) the weights.

    gates: one dial setting's Gates; active: the same groups, each the units to keep (gate.active_units).
    """

    def __init__(self, model, gates, active):
        units = folding_state(model).units
        tensors = dict(model.named_parameters(remove_duplicate=False))  # lm_head.weight is tied to wte

        def folded(name):
            return fold(tensors[name], units[name], gates, active) if name in tensors else None

        self.n_embd = model.config.n_embd
        self.head_size = model.config.n_embd // model.config.n_head
        device = gates.embd.device
        channels = active.embd
        if isinstance(channels, torch.Tensor):  # a gather where the channels are not one block
            self.channels = self.channel_index = channels.to(device)
        else:
            self.channels = slice(*channels)
            self.channel_index = torch.arange(*channels, device=device)
        self.embd_gate = gates.embd
        self.lm_w = folded("lm_head.weight")
        self.layers = []
        for i in range(model.config.n_layer):
            p = f"transformer.h.{i}."
            self.layers.append(FoldedLayer(*(folded(p + name) for name in (
                "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"))))

    def qkv(self, attn, x):
        layer = self.layers[attn.layer]
        return F.linear(x, layer.qkv_w, layer.qkv_b)

    def attn_proj(self, attn, y):
        layer = self.layers[attn.layer]
        return F.linear(merge_heads(y), layer.attn_w, layer.attn_b)

    def mlp(self, mlp, x):
        layer = self.layers[mlp.layer]
        return F.linear(F.gelu(F.linear(x, layer.fc_w, layer.fc_b)), layer.mlp_w, layer.mlp_b)

    def embed(self, x):
        return x * self.embd_gate

    def add(self, x, out):
        """A write to the active channels only: one index_add, no zero-padded full-width update."""
        if out.size(-1) == self.n_embd:
            return x + out
        return x.index_add(-1, self.channel_index, out if out.dtype == x.dtype else out.to(x.dtype))

    def lm_head(self, model, x):
        return F.linear(x[..., self.channels], self.lm_w)

    def active_units(self):
        """How many residual channels, heads and hidden units per layer take part."""
        return {
            "channels": len(self.channel_index),
            "heads": [layer.qkv_w.size(0) // (3 * self.head_size) for layer in self.layers],
            "hidden": [layer.fc_w.size(0) for layer in self.layers],
        }


class FoldingState:
    """What folding keeps per model: the unit map (built once, read at every dial setting) and host copies
    of the scores, from which the silent units are found without touching the device."""

    def __init__(self, model):
        self.units = unit_map(model.config)
        self._host_scores, self._key = None, None

    def host_scores(self, model) -> UnitGroups:
        """CPU copies of the scores, made again only when a buffer changes (a load, a sort or a move)."""
        scores = model.scores()
        key = tuple((t.data_ptr(), t._version) for t in scores.groups())
        if self._key != key:
            self._host_scores = scores.map(lambda t: t.detach().to("cpu", copy=True))
            self._key = key
        return self._host_scores


def active_ranges(model, host_dial, gates):
    """Each group's units with a nonzero gate (gate.active_units), found on the host; every unit where the dial is only
    on the device (finding them would be a sync) or while torch.compile traces (shapes must not depend on
    the dial)."""
    if host_dial is None or torch.compiler.is_compiling():
        return model.scores().map(lambda s: (0, len(s)))
    if gates.embd.device.type != "cpu":  # the same gates again, from the host's copies of the scores
        gates = model.gates(host_dial, folding_state(model).host_scores(model))
    return gates.map(active_units)


_STATES = weakref.WeakKeyDictionary()  # model -> its FoldingState, gone with the model


def folding_state(model) -> FoldingState:
    """The folding state of model, made at its first fold."""
    if model not in _STATES:
        _STATES[model] = FoldingState(model)
    return _STATES[model]


def _build(model, gates, host_dial):
    return Folded(model, gates, active_ranges(model, host_dial, gates))


FOLDED = Backend("folded", _build, per_row=False, devices=("cpu", "cuda"), auto_priority=2)
