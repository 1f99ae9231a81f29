"""The dial: frozen specialty scores, the tent gate, and every gate of one forward (docs/design.md, section 1).

The tent formula lives here and nowhere else: the backends and the Triton kernel
all consume the Gates that gates_for() computes once per forward.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch


def sample_scores(n, generator, concentration=0.5):
    """n specialty scores from Beta(a, a), a = concentration: below 1 most units are specialists,
    at 1 scores are uniform, above 1 most are "halfsies". Beta(0.5, 0.5), the default, is drawn as
    sin(pi*u/2)**2 with u ~ U(0, 1); other values through numpy, seeded from the same generator."""
    if concentration == 0.5:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (torch.sin(0.5 * math.pi * u) ** 2).float()
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(concentration, concentration, n)).float()


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


def gates_for(alpha, scores, narrowness=1.0):
    """Every gate of a forward in one tent evaluation over all the scores at once."""
    groups = scores.groups()
    flat = tent_gate(alpha, torch.cat(groups), narrowness)
    pieces = list(flat.split([len(s) for s in groups], dim=-1))
    n_layer = len(scores.heads)
    return Gates(pieces[0], pieces[1 : 1 + n_layer], pieces[1 + n_layer :])


def active_range(gate):
    """[lo, hi): the span holding every nonzero entry of a gate vector on the host (empty if none).

    With units sorted by score the nonzero gates are one interval, so this span is tight.
    """
    on = torch.nonzero(gate > 0).flatten()
    if len(on) == 0:
        return 0, 0
    return int(on[0]), int(on[-1]) + 1
