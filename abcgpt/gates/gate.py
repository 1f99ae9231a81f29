"""The dial: frozen specialty scores, the gate formulas, and every gate of one forward (docs/design.md,
sections 1 and 8).

A geometry says where units sit and how far a dial point reaches: "line" (today's two-source dial, a score
in [0, 1] per unit), or for N sources "pool", "simplex" and "tent", where a unit's place is a point on the
simplex of source mixtures. The gate formulas live here and nowhere else: the backends and the Triton
kernel all consume the Gates that gates_for() computes once per forward.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch


def beta_half(n, generator):
    """n draws of Beta(1/2, 1/2) in float64, as sin(pi*u/2)**2 with u ~ U(0, 1): the specialty scores' law and
    the line dial's training draw."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.sin(0.5 * math.pi * u) ** 2


def sample_scores(n, generator, concentration=0.5):
    """n specialty scores from Beta(a, a), a = concentration: below 1 most units are specialists,
    at 1 scores are uniform, above 1 most are "halfsies". Beta(0.5, 0.5), the default, is drawn as
    sin(pi*u/2)**2 with u ~ U(0, 1); other values through numpy, seeded from the same generator."""
    if concentration == 0.5:
        return beta_half(n, generator).float()
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(concentration, concentration, n)).float()


GEOMETRIES = ("line", "pool", "simplex", "tent")


def place_units(n, generator, geometry="line", n_sources=2, beta=0.5, shared=0.75):
    """n units' frozen places: (n,) scores in [0, 1] on the line; (n, n_sources) points on the simplex
    otherwise. simplex and tent draw each point from Dirichlet(beta, ..., beta); pool makes a share of
    `shared` units shared (the simplex's centre: on at every setting) and gives every other unit one source
    (a vertex), the sources dealt out in turn from a random start so that each has as many units, +-1."""
    if geometry == "line":
        return sample_scores(n, generator, beta)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    if geometry in ("simplex", "tent"):
        return torch.from_numpy(rng.dirichlet([beta] * n_sources, n)).float()
    n_shared = round(shared * n)
    specialists = rng.permutation(n)[n_shared:]
    places = torch.full((n, n_sources), 1.0 / n_sources)
    owner = torch.from_numpy((np.arange(len(specialists)) + rng.integers(n_sources)) % n_sources)
    places[torch.from_numpy(specialists)] = torch.nn.functional.one_hot(owner, n_sources).float()
    return places


def sort_key(places):
    """One number per unit whose order puts units with the same place side by side: the score itself on the
    line; otherwise shared (centre) units first, then each source's units, nearest its vertex first."""
    if places.dim() == 1:
        return places
    top, nearest = places.max(-1)
    key = nearest + 0.5 * (1.0 - top)
    return torch.where(top * places.size(-1) <= 1.0 + 1e-6, torch.full_like(key, -1.0), key)


def check_alpha(alpha):
    """Refuse an alpha that is not a number in [0, 1] before it reaches any math.

    A Python number or a CPU tensor is checked on the host. A tensor on an
    accelerator is checked there, by an assert that fails the next time the device
    is synchronised: no host sync, so a training step never stalls on it.
    """
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() > 1:
            raise ValueError(f"alpha must be a scalar or one value per sequence, got shape {tuple(alpha.shape)}")
        in_range = (alpha >= 0) & (alpha <= 1)  # False for NaN too
        if alpha.device.type != "cpu":
            torch._assert_async(in_range.all(), "alpha must be in [0, 1]")
            return
        if not in_range.all():
            raise ValueError(f"alpha must be in [0, 1], got {alpha[~in_range][0].item()}")
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or a tensor, got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:  # False for NaN too
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def tent_gate(alpha, scores, narrowness=1.0):
    """g(alpha, m) = cos^2(pi/2 * min(1, |alpha - m| / (w * max(m, 1 - m)))).

    alpha: a float or 0-dim tensor, or a tensor of shape (B,) (one dial per sequence).
    scores: tensor of shape (n,). Returns (n,) for one alpha, (B, n) for one per sequence.
    """
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(scores.dtype)
        if alpha.dim() == 1:
            alpha = alpha.unsqueeze(-1)
    reach = narrowness * torch.maximum(scores, 1.0 - scores)
    distance = torch.clamp((alpha - scores).abs() / reach, max=1.0)
    # cos^2(pi/2 * d) written as sin^2(pi/2 * (1 - d)) so that d = 1 gives exactly 0
    return torch.sin(0.5 * math.pi * (1.0 - distance)) ** 2


def point_gate(point, places, geometry, narrowness=1.0):
    """The gates of units at places (n, N) for a dial point on the simplex of N sources: (N,) gives (n,),
    (B, N) gives (B, n). Every geometry fades a unit as cos^2(pi/2 * min(1, distance / reach)):

    - simplex: distance is the total variation 1/2 * sum |point - place|, reach w * (1 - min place), the
      farthest vertex. With two sources this is the line's tent exactly: |alpha - m| over w * max(m, 1 - m).
    - tent: the author's k-dim tent, Euclidean distance over one reach for all, w * sqrt(2), the edge.
    - pool: a source's unit fades with its source's weight (its total variation distance is 1 - weight, its
      reach w), as the simplex has it at a vertex; a shared unit (at the centre) is on everywhere.
    """
    point = point.to(places.dtype)
    if geometry == "pool":  # a unit's source weight, as a matmul: no (..., n, N) tensor at many sources
        distance = (1.0 - point @ places.T) / narrowness
    elif geometry == "tent":  # |d - p|^2 = |d|^2 + |p|^2 - 2 d.p, as a matmul too
        square = (point * point).sum(-1, keepdim=True) + (places * places).sum(-1) - 2.0 * point @ places.T
        distance = square.clamp(min=0.0).sqrt() / (narrowness * math.sqrt(2.0))
    else:
        reach = narrowness * (1.0 - places.min(-1).values)
        distance = 0.5 * (point.unsqueeze(-2) - places).abs().sum(-1) / reach
    gate = torch.sin(0.5 * math.pi * (1.0 - torch.clamp(distance, max=1.0))) ** 2
    if geometry == "pool":
        gate = torch.where(places.max(-1).values < 1.0, torch.ones_like(gate), gate)
    return gate


@dataclass
class UnitGroups:
    """One value for each group of units: the residual channels (embd), then layer l's attention heads
    (heads[l]) and MLP hidden units (hidden[l]). Scores, gates, active ranges and sort orders all take
    this shape."""

    embd: object
    heads: list
    hidden: list

    def groups(self):
        return [self.embd, *self.heads, *self.hidden]

    def map(self, fn):
        """fn applied to every group's value, in the same shape."""
        return UnitGroups(fn(self.embd), [fn(v) for v in self.heads], [fn(v) for v in self.hidden])


class Gates(UnitGroups):
    """Every gate one forward needs, each (n,) for one alpha or (B, n) for one per sequence."""

    @property
    def per_row(self):
        return self.embd.dim() == 2


def gates_for(alpha, scores, narrowness=1.0, geometry="line", uniform=None):
    """Every gate of a forward in one evaluation over all the scores at once.

    alpha: the dial's point (a line alpha, or a mixture over the sources: see point_gate); uniform: None,
    or a bool tensor of the dial's batch shape, True where every gate is 1 (uniform mode)."""
    groups = scores.groups()
    places = torch.cat(groups)
    flat = tent_gate(alpha, places, narrowness) if geometry == "line" else point_gate(alpha, places, geometry,
                                                                                        narrowness)
    if uniform is not None:
        flat = torch.where(uniform.unsqueeze(-1) if uniform.dim() else uniform, torch.ones_like(flat), flat)
    pieces = list(flat.split([len(s) for s in groups], dim=-1))
    n_layer = len(scores.heads)
    return Gates(pieces[0], pieces[1 : 1 + n_layer], pieces[1 + n_layer :])


def active_units(gate):
    """The units of a gate vector on the host with a nonzero gate: (lo, hi) where they are one block (always
    on the line, whose units are sorted by score), else their indices (a LongTensor), gathered once per
    dial setting: on many sources a setting's units are the shared block and its sources' blocks."""
    on = torch.nonzero(gate > 0).flatten()
    if len(on) == 0:
        return 0, 0
    lo, hi = int(on[0]), int(on[-1]) + 1
    return (lo, hi) if hi - lo == len(on) else on
