"""The one map of the units: which rows and columns of which tensors belong to each gated unit.

Three groups carry scores: the residual channels ("embd"), each layer's attention
heads ("heads") and each layer's MLP hidden units ("hidden"). For every parameter
and score buffer, unit_map() lists its unit axes. An axis says:

- unit_size: rows per unit along that dimension (a head owns head_size rows);
- parts: the group repeats in that many consecutive blocks (c_attn holds q, k, v);
- fold: the unit's gate multiplies what flows through this axis right at this
  tensor, so one alpha's gate may be folded into it (W_eff = diag(g_out) W diag(g_in));
- cut: what a silent unit (gate 0) puts through this axis is discarded, so the
  folded backend may leave it out of the matmul.

Sorting units by score (sort_units), folding and skipping (folded.py) and
`python -m abcgpt.tools.permute` all read this map.
"""
from dataclasses import dataclass

import torch

from .gate import sort_key


@dataclass(frozen=True)
class Axis:
    group: str  # "embd", "heads" or "hidden"
    layer: int | None  # None for the residual channels, shared by all layers
    dim: int
    unit_size: int = 1
    parts: int = 1
    fold: bool = False
    cut: bool = False


def unit_map(config):
    """{tensor name: [Axis, ...]} for every parameter and score buffer of a gated GPT."""
    hs = config.n_embd // config.n_head
    embd = lambda dim, **kw: Axis("embd", None, dim, **kw)
    units = {
        "embd_scores": [embd(0)],
        "transformer.wte.weight": [embd(1, fold=True)],  # tied with lm_head.weight
        "lm_head.weight": [embd(1, fold=True, cut=True)],  # the ln_f output's gate is on its input
        "transformer.wpe.weight": [embd(1, fold=True)],
        "transformer.ln_f.weight": [embd(0)],
        "transformer.ln_f.bias": [embd(0)],
    }
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        heads = lambda dim, **kw: Axis("heads", i, dim, unit_size=hs, **kw)
        hidden = lambda dim, **kw: Axis("hidden", i, dim, **kw)
        units.update({
            p + "ln_1.weight": [embd(0)], p + "ln_1.bias": [embd(0)],
            p + "ln_2.weight": [embd(0)], p + "ln_2.bias": [embd(0)],
            p + "attn.head_scores": [Axis("heads", i, 0)],
            # q, k and v rows of a silent head are discarded after attention, but not gated there
            p + "attn.c_attn.weight": [heads(0, parts=3, cut=True), embd(1)],
            p + "attn.c_attn.bias": [heads(0, parts=3, cut=True)],
            p + "attn.c_proj.weight": [embd(0, fold=True, cut=True), heads(1, fold=True, cut=True)],
            p + "attn.c_proj.bias": [embd(0, fold=True, cut=True)],
            p + "mlp.hidden_scores": [hidden(0)],
            # the hidden gate comes after the GELU: it can be cut here, not folded
            p + "mlp.c_fc.weight": [hidden(0, cut=True), embd(1)],
            p + "mlp.c_fc.bias": [hidden(0, cut=True)],
            p + "mlp.c_proj.weight": [embd(0, fold=True, cut=True), hidden(1, fold=True, cut=True)],
            p + "mlp.c_proj.bias": [embd(0, fold=True, cut=True)],
        })
    return units


def group_of(values, axis):
    """The entry of gate.UnitGroups values (scores, gates, ranges, orders) for axis's group."""
    return values.embd if axis.group == "embd" else getattr(values, axis.group)[axis.layer]


def _index(axis, units, size):
    """Row indices along axis.dim for the given unit indices, in every part."""
    per_part = size // axis.parts
    rows = (units[:, None] * axis.unit_size + torch.arange(axis.unit_size)).flatten()
    return torch.cat([part * per_part + rows for part in range(axis.parts)])


def _expand(axis, per_unit):
    """A per-unit vector stretched to one entry per row along axis.dim (no host sync)."""
    if axis.unit_size > 1:
        per_unit = per_unit[:, None].expand(-1, axis.unit_size).reshape(-1)
    return per_unit.repeat(axis.parts) if axis.parts > 1 else per_unit


def fold(tensor, axes, gates, active):
    """tensor scaled by each fold axis's gate, with each cut axis narrowed to its active units.

    gates: one dial setting's Gates; active: the same groups, each a (lo, hi) block of units or the active
    units' indices (gate.active_units). A block that covers the whole axis costs no copy; other blocks are
    views, except across parts (q, k, v), which are concatenated; indices are gathered.
    """
    for axis in axes:
        units = group_of(active, axis)
        per_part = tensor.size(axis.dim) // axis.parts
        gate = group_of(gates, axis)
        if axis.cut and isinstance(units, torch.Tensor):
            tensor = tensor.index_select(axis.dim, _index(axis, units, tensor.size(axis.dim)).to(tensor.device))
            gate = gate[units.to(gate.device)]
        elif axis.cut and units != (0, per_part // axis.unit_size):
            lo, hi = units
            pieces = [tensor.narrow(axis.dim, part * per_part + lo * axis.unit_size, (hi - lo) * axis.unit_size)
                      for part in range(axis.parts)]
            tensor = pieces[0] if axis.parts == 1 else torch.cat(pieces, axis.dim)
            gate = gate[lo:hi]
        if axis.fold:
            shape = [1] * tensor.dim()
            shape[axis.dim] = -1
            tensor = tensor * _expand(axis, gate).to(tensor.dtype).view(shape)
    return tensor


@torch.no_grad()
def sort_units(model, optimizer_state=None):
    """Reorder a gated model's units by ascending score, in place: its function is unchanged.

    Afterwards, at any alpha each group's active units are one contiguous block. An
    AdamW optimizer_state from model.configure_optimizers is permuted alike and
    returned, so training can resume on the sorted model.
    """
    if not model.config.gated:
        raise ValueError("a vanilla model has no scores to sort by")
    orders = model.scores().map(lambda s: torch.argsort(sort_key(s.cpu()), stable=True))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    moves = permutations(model.config, tensors, orders)
    for name, t in tensors.items():
        t.copy_(permute(t, moves[name]))
    if optimizer_state is not None:
        for index, name in enumerate(model.optimizer_param_names()):
            state = optimizer_state["state"].get(index, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = permute(state[key], moves[name])
    return optimizer_state


def permutations(config, tensors, orders):
    """{name: [(dim, index), ...]} moving every tensor's units into the given orders.

    Refuses a name the map does not know, rather than leave a tensor unsorted.
    """
    units = unit_map(config)
    unknown = sorted(set(tensors) - set(units))
    if unknown:
        raise ValueError(f"no unit map for {', '.join(unknown)}: refusing to permute a model of unknown layout")
    return {
        name: [(a.dim, _index(a, group_of(orders, a), t.size(a.dim))) for a in units[name]]
        for name, t in tensors.items()
    }


def permute(t, moves):
    for dim, index in moves:
        t = t.index_select(dim, index.to(t.device))
    return t
