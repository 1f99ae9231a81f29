"""The gated GPT: nanoGPT's GPT with a dial (docs/design.md, section 1).

With gated=False this is exactly nanoGPT's model: same modules, init and
parameter count, and no gate operation in the forward. With gated=True every
residual channel, attention head and MLP hidden unit carries a frozen specialty
score (a buffer, never trained) and the dial (an alpha on the line, a mixture of many sources: voice.Dial)
decides which of them fire.

The forward is written once. Each forward computes its gates once (gate.py) and
hands them to an executor, built by the gate backend the registry picks
(backends/registry.py), that runs the gated layers.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch.nn import functional as F

from abcgpt.backends import registry
from abcgpt.core import limits
from abcgpt.core.errors import SettingsError
from abcgpt.gates.gate import GEOMETRIES, UnitGroups, gates_for, place_units
from abcgpt.gates.units import sort_units
from abcgpt.gates.voice import Dial

from .attention import KVCache, attend

# a voice.Dial; on the line also one alpha (a float or 0-dim tensor) or one per sequence (a (B,) tensor);
# None for a vanilla model
Alpha = Union[Dial, float, torch.Tensor, None]


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # nanoGPT's training default: no bias in Linears and LayerNorms
    gated: bool = True
    narrowness: float = 1.0  # w in the tent gate; below 1 each unit fires over a narrower range
    mask_seed: int = 1337  # seeds the specialty scores, so one config gives one set of scores
    score_beta: float = 0.5  # scores ~ Beta(a, a) with a = score_beta: how many specialists and "halfsies"
    sort_units: bool = True  # relabel units in score order at init (function unchanged; see units.py)
    geometry: str = "line"  # where units sit and how a dial point reaches them (gate.GEOMETRIES)
    n_sources: int = 0  # sources the units are placed among; 0 on the line, whose scores do not depend on it
    shared: float = 0.75  # pool geometry: the share of units on at every setting

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "mask_seed"):
            limits.check(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise SettingsError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        limits.check("narrowness", self.narrowness)
        limits.check("score_beta", self.score_beta)
        if not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.geometry not in GEOMETRIES:
            raise SettingsError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if self.geometry != "line" and not 2 <= self.n_sources <= 4096:
            raise SettingsError(f"the {self.geometry} geometry needs n_sources from 2 to 4096, got {self.n_sources}")
        if not 0.0 <= self.shared <= 1.0:
            raise SettingsError(f"shared must be in [0, 1], got {self.shared}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """A config from a saved dict; keys of older versions (such as gate_backend) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, run, cache=None, positions=None):
        B, T, _ = x.size()
        qkv = run.qkv(self, x)  # the folded backend keeps only the active heads
        n_heads = qkv.size(-1) // (3 * self.head_size)
        q, k, v = qkv.view(B, T, 3, n_heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        y = attend(q, k, v, cache, self.layer, positions, self.dropout if self.training else 0.0)
        out = run.attn_proj(self, y)
        return self.resid_dropout(out) if self.training else out  # eval: skip a no-op module call per token


class MLP(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, run):
        out = run.mlp(self, x)
        return self.dropout(out) if self.training else out


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, layer)

    def forward(self, x, run, cache=None, positions=None):
        x = run.add(x, self.attn(self.ln_1(x), run, cache, positions))
        return run.add(x, self.mlp(self.ln_2(x), run))


class GPT(nn.Module):
    """backend: how gated layers run (registry.NAMES); a runtime choice, not part of the model."""

    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = registry.check_backend(backend)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.gated:
            self._register_scores()
            if config.sort_units:
                sort_units(self)

    def _register_scores(self):
        # One generator, one fixed order: residual channels, then per layer heads and MLP units.
        c = self.config
        generator = torch.Generator().manual_seed(c.mask_seed)
        place = lambda n: place_units(n, generator, c.geometry, c.n_sources, c.score_beta, c.shared)
        self.register_buffer("embd_scores", place(c.n_embd))
        for block in self.transformer.h:
            block.attn.register_buffer("head_scores", place(c.n_head))
            block.mlp.register_buffer("hidden_scores", place(4 * c.n_embd))

    def scores(self) -> UnitGroups:
        blocks = self.transformer.h
        return UnitGroups(self.embd_scores, [b.attn.head_scores for b in blocks], [b.mlp.hidden_scores for b in blocks])

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; position embeddings excluded by default, as nanoGPT counts."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def gate_backend(self, device: torch.device, per_row: bool = False) -> str:
        """The backend a forward on device uses, with one alpha (per_row=False) or one per sequence."""
        return registry.choose(self.backend, device, per_row).name

    def gates(self, dial: Dial, scores: Optional[UnitGroups] = None):
        """Every gate at dial, from the model's scores (or host copies of them)."""
        return gates_for(dial.point, scores if scores is not None else self.scores(), self.config.narrowness,
                         self.config.geometry, dial.uniform)

    def forward(self, idx: torch.Tensor, alpha: Alpha = None, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None,
                run: Optional[registry.Executor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx: (B, T) token ids. alpha: the dial: a voice.Dial, or on the line a float or 0-dim tensor, or a (B,)
        tensor (one per sequence).
        cache: an attention.KVCache when generating; idx then holds only the positions not yet cached.
        run: an executor made beforehand (see at()); alpha is then not given.

        Returns (logits, loss); logits cover only the last position when no targets are given.
        """
        B, T = idx.size()
        if cache is not None:
            cache.check(T, self.config.block_size)
        elif T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        if run is None:
            run = registry.executor_for(self, alpha, B, idx.device)

        pos = cache.positions(T, idx.device) if cache is not None else torch.arange(T, device=idx.device)
        x = run.embed(self.transformer.wte(idx) + self.transformer.wpe(pos))
        if self.training:  # eval: skip a no-op module call per token
            x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, run, cache, pos)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = run.lm_head(self, x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = run.lm_head(self, x[:, -1:, :])  # only the last position is needed to sample
            loss = None
        return logits, loss

    @torch.no_grad()
    def at(self, alpha: Alpha = None) -> Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """The model fixed at one dial setting, for inference: call it as f(idx, cache=...).

        The gates are computed (and, where the folded backend serves, folded into the
        weights) once here, not at every call: what makes generation at one alpha fast.
        """
        batch = (alpha.rows if isinstance(alpha, Dial) else torch.as_tensor(alpha).numel()) if alpha is not None else 1
        run = registry.executor_for(self, alpha, batch, self.lm_head.weight.device)

        def dialed(idx, targets=None, cache=None):
            return self(idx, targets=targets, cache=cache, run=run)

        return dialed

    def _decay_groups(self):
        """(name, parameter) pairs with weight decay (matrices, embeddings) and without (the rest)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]

    def optimizer_param_names(self):
        """Parameter names in the order configure_optimizers hands them to AdamW."""
        decay, no_decay = self._decay_groups()
        return [n for n, _ in decay + no_decay]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices and embeddings only (not biases or LayerNorms)."""
        decay, no_decay = self._decay_groups()
        groups = [
            {"params": [p for _, p in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
