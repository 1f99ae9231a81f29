"""The dial's setting as one value (docs/design.md, section 8): where a forward is dialled, how a user
names it, the training draw, and the settings every evaluation visits.

A Dial holds a point for the batch or one per sequence, and whether each is in uniform mode (every gate
1). On the line geometry the point is an alpha in [0, 1] and source k of K sits at k / (K - 1); on the
other geometries it is a mixture of the N sources (weights summing to 1) and source k sits at vertex k.
Every door (the tools, the server, the Python API) turns its input into a Dial here; bad input is
refused here, in one wording.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from abcgpt.core.errors import SettingsError

from .gate import beta_half, check_alpha

UNIFORM = "all"  # the voice name of uniform mode: every gate open


@dataclass(frozen=True)
class Dial:
    point: torch.Tensor  # float32: an alpha, () or (B,), on the line; weights, (N,) or (B, N), on a mixture
    mixture: bool  # the point is weights over the sources, not an alpha
    uniform: Optional[torch.Tensor] = None  # bool, the dial's batch shape, True where every gate is 1; None: none

    @property
    def per_row(self) -> bool:
        return self.point.dim() == 1 + self.mixture

    @property
    def rows(self) -> int:
        return self.point.size(0) if self.per_row else 1

    @property
    def on_host(self) -> bool:
        return self.point.device.type == "cpu"

    def to(self, device, non_blocking=False) -> "Dial":
        move = lambda t: t if t is None else t.to(device, non_blocking=non_blocking)
        return Dial(move(self.point), self.mixture, move(self.uniform))

    def row(self, i) -> "Dial":
        return Dial(self.point[i], self.mixture, None if self.uniform is None else self.uniform[i])

    @classmethod
    def alpha(cls, alpha) -> "Dial":
        """A line dial at alpha: a float or 0-dim tensor, or one per sequence ((B,) tensor)."""
        check_alpha(alpha)
        return cls(torch.as_tensor(alpha, dtype=torch.float32), mixture=False)

    @classmethod
    def mixture_of(cls, weights) -> "Dial":
        """A dial on the simplex: weights over the sources, (N,) or (B, N), made to sum to 1."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.dim() not in (1, 2):
            raise SettingsError(f"a mixture is one weight per source, or a row of them per sequence; got shape "
                                f"{tuple(weights.shape)}")
        total = weights.sum(-1, keepdim=True)
        if weights.device.type == "cpu" and not (torch.isfinite(weights).all() and (weights >= 0).all()
                                                 and (total > 0).all()):
            raise SettingsError("a mixture's weights must be finite, not negative, and sum to a positive number")
        return cls(weights / total, mixture=True)

    @classmethod
    def everywhere(cls, geometry, n_sources, rows=None) -> "Dial":
        """Uniform mode: every gate 1, for the batch (rows=None) or for each of rows sequences."""
        batch = () if rows is None else (rows,)
        mixture = geometry != "line"
        point = torch.full((*batch, n_sources) if mixture else batch, 1.0 / n_sources if mixture else 0.5)
        return cls(point, mixture, torch.ones(batch, dtype=torch.bool))

    @classmethod
    def source(cls, k, geometry, n_sources) -> "Dial":
        """Source k's own setting: its alpha on the line, its vertex otherwise."""
        if geometry == "line":
            return cls.alpha(source_alpha(k, n_sources))
        return cls.mixture_of(torch.nn.functional.one_hot(torch.tensor(k), n_sources).float())

    @classmethod
    def stack(cls, dials) -> "Dial":
        """One per-sequence dial from batch dials, one a row."""
        uniform = None
        if any(d.uniform is not None for d in dials):
            uniform = torch.stack([d.uniform if d.uniform is not None else torch.tensor(False) for d in dials])
        return cls(torch.stack([d.point for d in dials]), dials[0].mixture, uniform)


def source_alpha(k, n_sources):
    """Where source k of n sits on the line: evenly from 0 to 1."""
    return k / (n_sources - 1)


def as_dial(value, geometry) -> Dial:
    """What a forward was given, as a Dial: a Dial as it is, an alpha on the line; a line alpha is refused
    on another geometry, whose dial is a mixture (Dial.mixture_of, Dial.source, parse_voice)."""
    if isinstance(value, Dial):
        if value.mixture != (geometry != "line"):
            kind = "an alpha" if geometry == "line" else "a mixture over the sources"
            raise SettingsError(f"this model's dial ({geometry}) takes {kind}; got a dial of point shape "
                                f"{tuple(value.point.shape)}")
        return value
    if value is None:
        raise ValueError("a gated model needs alpha: a float in [0, 1], one per sequence, or a voice.Dial")
    if geometry != "line":
        raise SettingsError(f"this model's dial ({geometry}) is a mixture of its sources, not an alpha: "
                            f"give a voice.Dial (Dial.source, Dial.mixture_of, Dial.everywhere or parse_voice)")
    return Dial.alpha(value)


def prepare(value, geometry, batch_size, n_sources=0) -> Dial:
    """What a forward over batch_size sequences was given, as a float32 Dial: a batch dial, or one row per
    sequence, with a weight for each of the model's n_sources. Tensors (not Python floats) keep torch.compile
    from specialising on each value; a dial on an accelerator is validated there, never read back
    (gate.check_alpha)."""
    if torch.compiler.is_compiling() and not isinstance(value, Dial):
        return Dial(torch.as_tensor(value, dtype=torch.float32), mixture=False)
    dial = as_dial(value, geometry)
    if dial.mixture and dial.point.size(-1) != n_sources:
        raise SettingsError(f"this model's dial is a mixture of {n_sources} sources; got {dial.point.size(-1)} "
                            "weights")
    if dial.per_row and dial.rows != batch_size:
        raise ValueError(f"got {dial.rows} alphas for a batch of {batch_size} sequences")
    return dial


def parse_voice(text, names, geometry) -> tuple[Dial, str]:
    """(dial, label) from a user's voice: NAME (a source's own setting), NAME=W,NAME=W (a mixture with those
    weights; a source left out has weight 0) or "all" (uniform mode). On the line with more than two
    sources, a mixture sits at its weighted mean place."""
    text = text.strip()
    n = len(names)
    if text == UNIFORM:
        return Dial.everywhere(geometry, n), UNIFORM
    if "=" not in text:
        return Dial.source(source_index(text, names), geometry, n), text
    weights = [0.0] * n
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise SettingsError(f"voice {text!r}: write NAME=WEIGHT for every part of a mixture, got {part!r}")
        k = source_index(name.strip(), names)
        try:
            weight = float(value)
        except ValueError:
            raise SettingsError(f"voice {text!r}: the weight of {name.strip()!r} must be a number, "
                                f"got {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise SettingsError(f"voice {text!r}: weights must be finite and not negative, got {value.strip()}")
        weights[k] += weight
    if sum(weights) <= 0:
        raise SettingsError(f"voice {text!r}: the weights must sum to a positive number")
    if sum(w > 0 for w in weights) == 1:  # one source alone is its own setting, and named so
        k = next(k for k, w in enumerate(weights) if w > 0)
        return Dial.source(k, geometry, n), names[k]
    dial = Dial.mixture_of(weights)
    if geometry == "line":
        dial = Dial.alpha(float(sum(w * source_alpha(k, n) for k, w in enumerate(dial.point.tolist()))))
    return dial, ",".join(f"{names[k]}={w:g}" for k, w in enumerate(weights) if w > 0)


def source_index(name, names):
    if name not in names:
        raise SettingsError(f"no source named {name!r}: this checkpoint's sources are {', '.join(names)} "
                            f"(or {UNIFORM!r} for uniform mode)")
    return names.index(name)


def voices(names, geometry):
    """[(label, dial)]: every source's own setting, then uniform mode; what N-source evaluations visit."""
    n = len(names)
    return [(name, Dial.source(k, geometry, n)) for k, name in enumerate(names)] + [
        (UNIFORM, Dial.everywhere(geometry, n))]


def draw(rows, n_sources, geometry, generator, uniform_share=0.0, concentration=0.5):
    """(dial, sources): a training draw for `rows` dials (one per sequence, or one for the batch) and each
    dial's source.

    Line: alpha ~ Beta(1/2, 1/2), then one of the two sources beside alpha, weighted by closeness (with two
    sources: source 1 with probability alpha). Other geometries: weights ~ Dirichlet(1/2, ..., 1/2), then
    source ~ Categorical(weights); with two sources the same law as the line's. Drawn as normalised squares
    of normal draws (Gamma(1/2) is half a chi-square). Then each dial is in uniform mode with probability
    uniform_share, with a source drawn uniformly.
    """
    if geometry == "line":
        alphas = beta_half(rows, generator)
        position = alphas * (n_sources - 1)
        lower = position.floor().clamp(max=n_sources - 2)
        upper_wins = torch.rand(rows, generator=generator, dtype=torch.float64) < position - lower
        point, sources = alphas.float(), lower.long() + upper_wins.long()
    else:
        if concentration == 0.5:
            squares = torch.randn(rows, n_sources, generator=generator, dtype=torch.float64) ** 2
            weights = squares / squares.sum(-1, keepdim=True)
        else:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
            weights = torch.from_numpy(rng.dirichlet([concentration] * n_sources, rows))
        point, sources = weights.float(), torch.multinomial(weights, 1, generator=generator).flatten()
    uniform = None
    if uniform_share > 0:
        uniform = torch.rand(rows, generator=generator) < uniform_share
        sources = torch.where(uniform, torch.randint(n_sources, (rows,), generator=generator), sources)
    return Dial(point, geometry != "line", uniform), sources


def evaluation_settings(names, geometry, uniform=False):
    """[(label, dial)] that a run's held-out evaluation visits: alpha 0, 0.5 and 1 on the line (and uniform
    mode where uniform), every source's own setting and uniform mode otherwise."""
    if geometry == "line":
        settings = [(f"{a:g}", Dial.alpha(a)) for a in (0.0, 0.5, 1.0)]
        return settings + ([(UNIFORM, Dial.everywhere(geometry, len(names)))] if uniform else [])
    return voices(names, geometry)


def own_label(k, names, geometry):
    """The label of source k's own setting among evaluation_settings."""
    return f"{source_alpha(k, len(names)):g}" if geometry == "line" else names[k]


def loss_key(name, label=None):
    """The key of a held-out loss: source name's at the setting labelled label (None: a vanilla model)."""
    return f"val/{name}" if label is None else f"val/{name}@{label}"
