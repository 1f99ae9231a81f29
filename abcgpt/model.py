"""The gated GPT: nanoGPT's GPT with a dial (DESIGN.md section 1).

With gated=False this is exactly nanoGPT's model: same modules, init and
parameter count, and no gate operation in the forward. With gated=True every
residual channel, attention head and MLP hidden unit carries a frozen specialty
score (a buffer, never trained) and the dial alpha decides which of them fire.
"""
import importlib.util
import math
import os
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from .attention import attend
from .folded import FoldedGPT
from .gate import check_alpha, sample_scores, tent_gate
from .permute import sort_units

if importlib.util.find_spec("triton") is not None:
    from kernels.ops import gated_mlp
else:  # no triton on this platform: the reference backend serves
    gated_mlp = None

# reference: elementwise multiplies where DESIGN.md says (the oracle; any alpha).
# folded: gates folded into the weights, silent units skipped (one alpha per batch; folded.py).
# triton: the fused up-projection + GELU + gate kernel (kernels/; CUDA, or the interpreter).
# auto: folded for one alpha, triton for per-sequence alphas on CUDA, reference otherwise.
GATE_BACKENDS = ("auto", "reference", "folded", "triton")


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
    gate_backend: str = "auto"
    sort_units: bool = True  # relabel units in score order at init (function unchanged; see permute.py)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not self.narrowness > 0:
            raise ValueError(f"narrowness must be positive, got {self.narrowness}")
        if self.gate_backend not in GATE_BACKENDS:
            raise ValueError(f"gate_backend must be one of {GATE_BACKENDS}, got {self.gate_backend!r}")

    def to_dict(self):
        return asdict(self)


def rows(gate):
    """Per-sequence gates (B, n) broadcast over time as (B, 1, n); one gate vector (n,) stays."""
    return gate.unsqueeze(1) if gate.dim() == 2 else gate


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.narrowness = config.narrowness
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, alpha=None, kv=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = attend(q, k, v, kv, self.dropout if self.training else 0.0)
        if alpha is not None:  # one gate per head: (nh,) or (B, nh)
            head_gate = tent_gate(alpha, self.head_scores, self.narrowness)
            y = y * head_gate.unsqueeze(-1).unsqueeze(-1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.narrowness = config.narrowness

    def forward(self, x, alpha=None, backend="reference"):
        if alpha is None:
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        if backend == "triton":
            return self.dropout(self._fused(x, alpha))
        hidden_gate = rows(tent_gate(alpha, self.hidden_scores, self.narrowness))
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x)) * hidden_gate))

    def _fused(self, x, alpha):
        B, T, C = x.shape
        if alpha.dim() == 1:  # one alpha per sequence becomes one per row
            alpha = alpha.repeat_interleave(T)
        params = (x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)
        if torch.is_autocast_enabled(x.device.type):  # a custom op is not autocast: cast as F.linear would
            dtype = torch.get_autocast_dtype(x.device.type)
            params = tuple(p.to(dtype) if p is not None else None for p in params)
        out = gated_mlp(params[0].reshape(B * T, C), *params[1:], alpha, self.hidden_scores, self.narrowness,
                        check_alpha=False)  # GPT.forward checked alpha on the host
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, alpha=None, embd_gate=None, backend="reference", kv=None):
        if alpha is None:
            x = x + self.attn(self.ln_1(x), kv=kv)
            return x + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), alpha, kv) * embd_gate
        return x + self.mlp(self.ln_2(x), alpha, backend) * embd_gate


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
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
        self.register_buffer("embd_scores", sample_scores(c.n_embd, generator))
        for block in self.transformer.h:
            block.attn.register_buffer("head_scores", sample_scores(c.n_head, generator))
            block.mlp.register_buffer("hidden_scores", sample_scores(4 * c.n_embd, generator))

    def host_scores(self):
        """CPU copies of the score buffers (residual, then heads and hidden units per layer),
        made again only when a buffer changes (a load, a sort or a move)."""
        blocks = self.transformer.h
        buffers = [self.embd_scores, *(b.attn.head_scores for b in blocks), *(b.mlp.hidden_scores for b in blocks)]
        key = tuple((t.data_ptr(), t._version) for t in buffers)
        if getattr(self, "_host_scores_key", None) != key:
            self._host_scores = [t.detach().to("cpu", copy=True) for t in buffers]  # a copy even on the CPU
            self._host_scores_key = key
        return self._host_scores

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

    def gate_backend(self, device, per_row=False):
        """The backend a forward on device uses, with one alpha (per_row=False) or one per sequence."""
        backend = self.config.gate_backend
        if backend == "auto":
            if not per_row:
                return "folded"
            return "triton" if device.type == "cuda" and gated_mlp is not None else "reference"
        if backend == "folded" and per_row:
            raise ValueError("gate_backend='folded' takes one alpha per batch; per-sequence alphas need "
                             "'reference', 'triton' or 'auto'")
        if gated_mlp is None and backend == "triton":
            raise ValueError("gate_backend='triton' needs the triton package")
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "gate_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
            )
        return backend

    def forward(self, idx, alpha=None, targets=None, cache=None):
        """idx: (B, T) token ids. alpha: a float or 0-dim tensor, or a (B,) tensor (one per sequence).
        cache: a KVCache when generating; idx then holds only the positions not yet cached.

        Returns (logits, loss); logits cover only the last position when no targets are given.
        """
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        gated = self.config.gated
        if gated:
            host_alpha = None if isinstance(alpha, torch.Tensor) and alpha.device.type != "cpu" else alpha
            alpha = self._prepare_alpha(alpha, B, idx.device)
            backend = self.gate_backend(idx.device, per_row=alpha.dim() == 1)
            if backend == "folded":  # skipping needs concrete ranges: off while torch.compile traces
                folded = FoldedGPT(self, alpha, skip=not torch.compiler.is_compiling(), host_alpha=host_alpha)
                return folded(idx, targets, cache)
        elif alpha is not None:
            raise ValueError("this model is not gated (gated=False): call it without alpha")

        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        if gated:
            embd_gate = rows(tent_gate(alpha, self.embd_scores, self.config.narrowness))
            x = x * embd_gate
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            kv = cache.layer(layer) if cache is not None else None
            x = block(x, alpha, embd_gate, backend, kv) if gated else block(x, kv=kv)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if gated:
            x = x * embd_gate

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # only the last position is needed to sample
            loss = None
        return logits, loss

    @staticmethod
    def _prepare_alpha(alpha, batch_size, device):
        """A float32 tensor on device: 0-dim for one alpha, (B,) for one per sequence.

        A tensor (not a Python float) keeps torch.compile from specialising on each
        value. Validation runs eagerly; pass a CPU tensor to keep it off the GPU.
        """
        if alpha is None:
            raise ValueError("a gated model needs alpha: a float in [0, 1] or one per sequence")
        if not torch.compiler.is_compiling():
            check_alpha(alpha)
        alpha = torch.as_tensor(alpha, dtype=torch.float32).to(device, non_blocking=True)
        if alpha.dim() == 1 and alpha.numel() != batch_size:
            raise ValueError(f"got {alpha.numel()} alphas for a batch of {batch_size} sequences")
        return alpha

    @torch.no_grad()
    def at(self, alpha=None):
        """The model fixed at one dial setting, for inference: call it as f(idx, cache=...).

        Where the folded backend serves, the gates are folded into the weights once here,
        not at every call: what makes generation at one alpha fast.
        """
        device = self.lm_head.weight.device
        if self.config.gated:
            alpha = self._prepare_alpha(alpha, torch.as_tensor(alpha).numel(), device)
            if self.gate_backend(device, per_row=alpha.dim() == 1) == "folded":
                return FoldedGPT(self, alpha)
        return partial(self, alpha=alpha)

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
