"""The dial: frozen specialty scores and the tent gate (DESIGN.md section 1)."""
import math

import torch


def sample_scores(n, generator):
    """n specialty scores from Beta(0.5, 0.5), drawn as sin(pi*u/2)**2 with u ~ U(0, 1)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (torch.sin(0.5 * math.pi * u) ** 2).float()


def check_alpha(alpha):
    """Refuse an alpha that is not a number in [0, 1] before it reaches any math."""
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() > 1:
            raise ValueError(f"alpha must be a scalar or one value per sequence, got shape {tuple(alpha.shape)}")
        bad = ~((alpha >= 0) & (alpha <= 1))  # also catches NaN
        if bad.any():
            raise ValueError(f"alpha must be in [0, 1], got {alpha[bad][0].item()}")
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
